"""The result-table script (scripts/camvid_table.py) on fabricated run folders: mean ± std over seeds, the
all-pixel probe column, per-budget folders and reports, PNGs written. No training, except the
benchmark run end to end on the toy data."""
import importlib.util
import json
import subprocess
import sys

from PIL import Image

from conftest import ROOT

spec = importlib.util.spec_from_file_location("camvid_table", ROOT / "scripts" / "camvid_table.py")
camvid_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(camvid_table)


def _fake_run(root, name, seed, iters, mious, probe_all=None, sec=0.5):
    out = root / camvid_table.run_dir(name, seed, iters)
    (out / "overlays").mkdir(parents=True)
    records = []
    for k, miou in enumerate(mious, 1):
        r = {"iteration": k * iters // len(mious), "miou": miou, "best_miou": max(mious[:k]),
             "iou": {"sky": miou, "road": miou / 2}, "pseudo_acc": 90.0 + seed, "pseudo_share": 50.0}
        if probe_all is not None:
            r["pseudo_acc_all"] = probe_all
        records.append(r)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "train.jsonl").write_text("".join(json.dumps({"iteration": i, "sec_per_iter": sec + seed}) + "\n"
                                             for i in (20, 40, 60)))
    Image.new("RGB", (8, 4), "red").save(out / "overlays" / "iter_0000800.png")


def test_report_mean_std_columns_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(camvid_table, "ROOT", tmp_path)
    _fake_run(tmp_path, "supervised_1-8", 0, 800, [40.0, 44.0])
    _fake_run(tmp_path, "supervised_1-8", 1, 800, [41.0, 42.0], probe_all=80.0)
    _fake_run(tmp_path, "dual_teacher_1-8", 0, 1600, [30.0, 50.0])  # another budget: its own report
    camvid_table.report([0, 1], 800, 400)
    text = (tmp_path / "results" / "camvid.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| supervised_1-8 |"))
    # last 44/42 -> 43.0 ± 1.4; best the same; probe acc 90/91 -> 90.5 ± 0.7; all-pixel only seed 1; s/iter min
    assert row == "| supervised_1-8 | 2/2 | 43.0 ± 1.4 | 43.0 ± 1.4 | 90.5 ± 0.7 | 50.0 ± 0.0 | 80.0 | 0.50 |"
    assert "dual_teacher_1-8" not in text and "--out runs/camvid/supervised_1-8_s1" in text
    assert "| supervised_1-8 | 43.0 | 21.5 |" in text  # per-class IoU, mean over seeds
    for png in ("camvid_miou.png", "camvid_pseudo_acc.png", "camvid_probe_all.png", "camvid_overlays.png"):
        assert (tmp_path / "results" / png).is_file()
    camvid_table.report([0], 1600, 400)
    text = (tmp_path / "results" / "camvid_1600it.md").read_text()
    assert "| dual_teacher_1-8 | 1/1 | 50.0 | 50.0 |" in text and "--out runs/camvid_1600it/dual_teacher" in text


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
