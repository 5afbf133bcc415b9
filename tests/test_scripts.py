"""The result-table script (scripts/camvid_table.py) on fabricated run folders: per-seed and mean ± std columns,
gains paired by seed, ablation rows, the archive in results/ that outlives runs/, PNGs written. No training, except the
benchmark run end to end on the toy data."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys

from PIL import Image

from conftest import ROOT

spec = importlib.util.spec_from_file_location("camvid_table", ROOT / "scripts" / "camvid_table.py")
camvid_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(camvid_table)


def _fake_run(name, seed, mious, probe_all=None, sec=0.5, archived=False, **last):
    out = (camvid_table.archive_dir if archived else camvid_table.run_dir)(name, seed)
    (out / "overlays").mkdir(parents=True)
    records = []
    for k, miou in enumerate(mious, 1):
        r = {"iteration": k * camvid_table.ITERS // len(mious), "miou": miou, "best_miou": max(mious[:k]),
             "iou": {"sky": miou, "road": miou / 2}, "pseudo_acc": 90.0 + seed, "pseudo_share": 50.0}
        if probe_all is not None:
            r["pseudo_acc_all"] = probe_all
        records.append(r)
    records[-1].update(last)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "train.jsonl").write_text("".join(json.dumps({"iteration": i, "sec_per_iter": sec + seed}) + "\n"
                                             for i in (20, 40, 60)))
    Image.new("RGB", (8, 4), "red").save(out / "overlays" / "iter_0001600.png")


def test_paired_gain_closed_form():
    """Per-seed differences 2, 3, 4: mean 3, std 1, standard error 1/sqrt(3): beyond the spread. Differences
    -1, 3, 4 (mean 2 but one seed below): not. One seed: no spread claimed."""
    base = {0: 40.0, 1: 41.0, 2: 42.0}
    assert camvid_table.paired_gain({0: 42.0, 1: 44.0, 2: 46.0}, base) == "+3.0 ± 1.0 **yes**"
    assert camvid_table.paired_gain({0: 39.0, 1: 44.0, 2: 46.0}, base) == "+2.0 ± 2.6 no"
    assert camvid_table.paired_gain({0: 45.0}, base) == "+5.0 (1 seed)"
    assert camvid_table.paired_gain({5: 45.0}, base) == "-"
    # differences 1, 3, 5: mean 3 > 2 * 2 / sqrt(3) = 2.31 -> yes; 0.1, 0.2, 6: mean 2.1 < 2 * 3.4 / sqrt(3) -> no
    assert camvid_table.paired_gain({0: 41.0, 1: 44.0, 2: 47.0}, base) == "+3.0 ± 2.0 **yes**"
    assert camvid_table.paired_gain({0: 40.1, 1: 41.2, 2: 48.0}, base) == "+2.1 ± 3.4 no"


def test_report_rows_gains_ablations_archive_and_pictures(tmp_path, monkeypatch):
    monkeypatch.setattr(camvid_table, "ROOT", tmp_path)
    for seed, (sup, mt) in enumerate([(40.0, 44.0), (41.0, 45.0), (42.0, 47.0)]):
        _fake_run("supervised_1-8", seed, [30.0, sup], probe_all=85.0, sec=0.3)
        _fake_run("mean_teacher_1-8", seed, [35.0, mt], probe_all=88.0, miou_student=mt - 1)
    _fake_run("ctt_1-8", 0, [20.0, 43.0], archived=True, banks_ready=True, contrast_on_iteration=120)
    _fake_run("ctt_1-8", 1, [20.0, 30.0])
    (camvid_table.run_dir("ctt_1-8", 1) / "metrics.jsonl").write_text(json.dumps(  # interrupted at 400
        {"iteration": 400, "miou": 20.0, "best_miou": 20.0, "iou": {"sky": 1.0, "road": 1.0}}) + "\n")
    _fake_run("ctt_no_contrast_1-8", 0, [20.0, 41.5])
    _fake_run("dual_teacher_1-8", 0, [20.0, 42.0], ema_a_max=0.99, teacher_lag=96.57)
    text = camvid_table.report([0, 1, 2], [0, 1])
    assert text == (tmp_path / "results" / "camvid.md").read_text()
    row = lambda name: next(x for x in text.splitlines() if x.startswith(f"| {name} |"))  # noqa: E731
    assert row("supervised_1-8").endswith("| 3/3 | 40.0 / 41.0 / 42.0 | 41.0 ± 1.0 | - | - | 85.0 ± 0.0 | 0.30 |")
    # mean teacher: +4, +4, +5 over supervised: 4.3 ± 0.6, beyond the spread
    assert "| 3/3 | 44.0 / 45.0 / 47.0 | 45.3 ± 1.5 | +4.3 ± 0.6 **yes** | - |" in row("mean_teacher_1-8")
    # CTT: seed 0 from the archive (runs/ has none), seed 1 unfinished and left out
    assert "| 1/3 | 43.0 / - / - | 43.0 | +3.0 (1 seed) | -1.0 (1 seed) |" in row("ctt_1-8")
    assert "| ctt_1-8: -1.5 (1 seed) |" in row("ctt_no_contrast_1-8")
    assert "| ctt_1-8 | pseudo_share 50.0; contrast_on_iteration 120.0; banks_ready 1/1 |" in text
    assert "| mean_teacher_1-8 | miou_student 44.3 ± 1.5; pseudo_share 50.0 ± 0.0 |" in text
    # a decay of 0.99 is not rounded to 1.0 (fractions keep 3 digits), a lag in steps keeps 1
    assert "| dual_teacher_1-8 | pseudo_share 50.0; ema_a_max 0.990; teacher_lag 96.6 |" in text
    assert "| supervised_1-8 | 41.0 | 20.5 |" in text  # per-class IoU, mean over seeds
    assert "--seed 0 --out runs/camvid/ctt_1-8_s0" in text and "gta_seg_1-8_s0" not in text
    for png in ("camvid_table.png", "camvid_miou.png", "camvid_probe_all.png", "camvid_overlays.png"):
        assert (tmp_path / "results" / png).is_file(), png
    assert camvid_table.finished("ctt_1-8", 0) and not camvid_table.finished("ctt_1-8", 1)
    camvid_table.archive("supervised_1-8", 0, "abc123")
    archived = camvid_table.archive_dir("supervised_1-8", 0)
    assert (archived / "commit.txt").read_text() == "abc123\n" and (archived / "train.jsonl").exists()
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: the archive alone rebuilds the rows it holds
    text = camvid_table.report([0, 1, 2], [0, 1])
    assert "| 1/3 | 40.0 / - / - | 40.0 |" in row("supervised_1-8") and "| 1/3 | 43.0 / - / - |" in row("ctt_1-8")
    assert not (tmp_path / "runs").exists()


def test_a_run_made_by_another_command_is_never_reused(tmp_path, monkeypatch):
    """A finished run whose command.txt is not its row's current command (e.g. Dual Teacher with the old
    40-iteration shifts under the default row's name) is not finished, not in the table, and named as stale."""
    monkeypatch.setattr(camvid_table, "ROOT", tmp_path)
    _fake_run("dual_teacher_1-8", 0, [30.0, 50.0])
    _fake_run("dual_teacher_1-8", 1, [30.0, 48.0])
    out = camvid_table.run_dir("dual_teacher_1-8", 0)
    (out / "command.txt").write_text(" ".join(camvid_table.command("dual_teacher_shift40_1-8", 0)) + "\n")
    (camvid_table.run_dir("dual_teacher_1-8", 1) / "command.txt").write_text(
        " ".join(camvid_table.command("dual_teacher_1-8", 1)) + "\n")
    assert camvid_table.stale("dual_teacher_1-8", 0) and not camvid_table.finished("dual_teacher_1-8", 0)
    assert camvid_table.finished("dual_teacher_1-8", 1) and not camvid_table.stale("dual_teacher_1-8", 1)
    text = camvid_table.report([0, 1], [0])
    assert "| 1/2 | - / 48.0 |" in text and "(delete to rerun): dual_teacher_1-8_s0" in text


def test_every_diagnostic_key_is_logged_by_some_method():
    """The table's diagnostics column reads metrics.jsonl keys by name: each must be written by a method."""
    sources = "".join((ROOT / "methods" / f).read_text() for f in
                      ("ctt.py", "dual_teacher.py", "gta_seg.py", "segkc.py", "mean_teacher.py"))
    sources += (ROOT / "common.py").read_text()
    for key in camvid_table.DIAGNOSTICS:  # miou_<x>: an extra model named x; CTT names its students by letter
        name = re.sub(r"_[A-H]$", "_{names[i]}", key[len("miou_"):] if key.startswith("miou_") else key)
        assert f'"{name}"' in sources, key


def test_benchmark_times_the_passes_inside_the_run(tmp_path):
    """scripts/benchmark.py end to end on the toy data (tiny sizes): the in-run timers see the network passes
    (a share of the iteration strictly between 0 and 1), the isolated passes are timed after every timed
    iteration, the JSON is written."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--dataset", "toy",
                             "--methods", "supervised", "--backbones", "resnet18", "--warmup", "2", "--iters", "2",
                             "--num-workers", "0", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert 0.0 < row["outside"] < 1.0 and row["in_run_overhead"] > 1.0
    assert row["sec_required"] > 0 and row["overhead"] > 0 and row["spread"] >= 0 and row["peak_rss_mb"] > 0
    assert row["timed"] == 2
    assert "| supervised | resnet18 | 1 |" in result.stdout
