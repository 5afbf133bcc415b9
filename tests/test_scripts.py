"""The result-table script (scripts/camvid_table.py) on fabricated run folders: per-seed and mean ± std columns,
gains paired by seed, ablation rows, the archive in results/ that outlives runs/, PNGs written; its overlay montage
from the weights of a one-iteration run on a fabricated CamVid tree. scripts/summarize.py on fabricated run folders
(a real run's row is tested in test_predict.py). The benchmark end to end on the toy data."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import cli
import common
import datasets
from conftest import ROOT, run_method

spec = importlib.util.spec_from_file_location("camvid_table", ROOT / "scripts" / "camvid_table.py")
camvid_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(camvid_table)
T = camvid_table.TAG  # the labeled share in row names, e.g. 1-30


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
    test = mious[-1] - 10  # the test split, scored once with the last weights
    records[-1].update(test_miou=test, test_iou={"sky": test, "road": test / 2}, **last)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "train.jsonl").write_text("".join(json.dumps({"iteration": i, "sec_per_iter": sec + seed}) + "\n"
                                             for i in (20, 40, 60)))
    Image.new("RGB", (8, 4), "red").save(out / "overlays" / "iter_0001600.png")


def test_paired_gain_closed_form():
    """Per-seed differences 2, 3, 4: mean 3, std 1, standard error 1/sqrt(3): beyond the spread. Differences
    -1, 3, 4 (mean 2 but one seed below): not. One seed: no spread claimed."""
    base = {0: 40.0, 1: 41.0, 2: 42.0}
    assert camvid_table.paired_gain({0: 42.0, 1: 44.0, 2: 46.0}, base) == "+3.0 ± 1.0 **above**"
    assert camvid_table.paired_gain({0: 39.0, 1: 44.0, 2: 46.0}, base) == "+2.0 ± 2.6 within"
    assert camvid_table.paired_gain({0: 45.0}, base) == "+5.0 (1 seed)"
    # a loss beyond the spread is reported as such (differences -2, -3, -4), not as "no gain"
    assert camvid_table.paired_gain({0: 38.0, 1: 38.0, 2: 38.0}, base) == "-3.0 ± 1.0 **below**"
    assert camvid_table.paired_gain({5: 45.0}, base) == "-"
    # differences 1, 3, 5: mean 3 > 2 * 2 / sqrt(3) = 2.31 -> above; 0.1, 0.2, 6: mean 2.1 < 2 * 3.4 / sqrt(3) -> within
    assert camvid_table.paired_gain({0: 41.0, 1: 44.0, 2: 47.0}, base) == "+3.0 ± 2.0 **above**"
    assert camvid_table.paired_gain({0: 40.1, 1: 41.2, 2: 48.0}, base) == "+2.1 ± 3.4 within"


def test_report_rows_gains_ablations_archive_and_pictures(tmp_path, monkeypatch):
    monkeypatch.setattr(camvid_table, "ROOT", tmp_path)
    for seed, (sup, mt) in enumerate([(40.0, 44.0), (41.0, 45.0), (42.0, 47.0)]):
        _fake_run(f"supervised_{T}", seed, [30.0, sup], probe_all=85.0, sec=0.3)
        _fake_run(f"mean_teacher_{T}", seed, [35.0, mt], probe_all=88.0, miou_student=mt - 1)
    _fake_run(f"ctt_{T}", 0, [20.0, 43.0], archived=True, banks_ready=True, contrast_on_iteration=120)
    _fake_run(f"ctt_{T}", 1, [20.0, 30.0])
    (camvid_table.run_dir(f"ctt_{T}", 1) / "metrics.jsonl").write_text(json.dumps(  # interrupted at 400
        {"iteration": 400, "miou": 20.0, "best_miou": 20.0, "iou": {"sky": 1.0, "road": 1.0}}) + "\n")
    _fake_run(f"ctt_contrast_{T}", 0, [20.0, 41.5])
    _fake_run(f"dual_teacher_{T}", 0, [20.0, 42.0], ema_a_max=0.99, teacher_lag=96.57)
    for seed, share in ((0, 30.0), (1, 50.0)):  # the per-class probe, logged by two of the three control seeds
        path = camvid_table.run_dir(f"mean_teacher_{T}", seed) / "metrics.jsonl"
        *earlier, record = [json.loads(x) for x in path.read_text().splitlines()]
        record["probe_per_class"] = {"sky": {"pixels": 60.0, "share": share, "acc": 99.0, "target_share": 90.0},
                                     "road": {"pixels": 40.0, "share": 6.0 * seed, "acc": 10.0 if seed else None,
                                              "target_share": 10.0}}
        path.write_text("".join(json.dumps(r) + "\n" for r in [*earlier, record]))
    text = camvid_table.report([0, 1, 2], [0, 1])
    assert text == (tmp_path / "results" / "camvid_v3_report.md").read_text()
    row = lambda name: next(x for x in text.splitlines() if x.startswith(f"| {name} |"))  # noqa: E731
    # the headline is the test split (10 below val in these fabricated runs); val beside it
    assert row(f"supervised_{T}").endswith("| 3/3 | 30.0 / 31.0 / 32.0 | 31.0 ± 1.0 | - | - | 41.0 ± 1.0 | "
                                            "85.0 ± 0.0 | 0.30 |")
    # mean teacher: +4, +4, +5 over supervised: 4.3 ± 0.6, beyond the spread
    assert "| 3/3 | 34.0 / 35.0 / 37.0 | 35.3 ± 1.5 | +4.3 ± 0.6 **above** | - | 45.3 ± 1.5 |" in row(
        f"mean_teacher_{T}")
    # CTT: seed 0 from the archive (runs/ has none), seed 1 unfinished and left out
    assert "| 1/3 | 33.0 / - / - | 33.0 | +3.0 (1 seed) | -1.0 (1 seed) |" in row(f"ctt_{T}")
    assert f"| ctt_{T}: -1.5 (1 seed) |" in row(f"ctt_contrast_{T}")
    assert f"| ctt_{T} | pseudo_share 50.0; contrast_on_iteration 120.0; banks_ready 1/1 |" in text
    assert f"| mean_teacher_{T} | miou_student 44.3 ± 1.5; pseudo_share 50.0 ± 0.0 |" in text
    # a decay of 0.99 is not rounded to 1.0 (fractions keep 3 digits), a lag in steps keeps 1
    assert f"| dual_teacher_{T} | pseudo_share 50.0; ema_a_max 0.990; teacher_lag 96.6 |" in text
    assert f"| supervised_{T} | 31.0 | 15.5 |" in text  # per-class test IoU, mean over seeds
    # per-class probe: share passing / accuracy, mean over the seeds that log it; rows without it are left out
    # an accuracy is averaged over the seeds where some pixel of the class passed (road: seed 1 only)
    assert f"| mean_teacher_{T} | 2 | 40 / 99 | 3 / 10 |" in text and f"| supervised_{T} | 3 |" not in text
    assert f"--seed 0 --out runs/camvid_v3/ctt_{T}_s0" in text and f"gta_seg_{T}_s0" not in text
    for png in ("camvid_table.png", "camvid_miou.png", "camvid_probe_all.png"):
        assert (tmp_path / "results" / png).is_file(), png
    assert not (tmp_path / "results" / "camvid_overlays.png").exists()  # no run folder holds weights
    assert camvid_table.finished(f"ctt_{T}", 0) and not camvid_table.finished(f"ctt_{T}", 1)
    camvid_table.archive(f"supervised_{T}", 0, "abc123")
    archived = camvid_table.archive_dir(f"supervised_{T}", 0)
    assert (archived / "commit.txt").read_text() == "abc123\n" and (archived / "train.jsonl").exists()
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: the archive alone rebuilds the rows it holds
    text = camvid_table.report([0, 1, 2], [0, 1])
    assert "| 1/3 | 30.0 / - / - | 30.0 |" in row(f"supervised_{T}") and "| 1/3 | 33.0 / - / - |" in row(f"ctt_{T}")
    assert not (tmp_path / "runs").exists()


def test_a_run_made_by_another_command_is_never_reused(tmp_path, monkeypatch):
    """A finished run whose command.txt is not its row's current command (e.g. Dual Teacher with one-pass
    shifts under the default row's name) is not finished, not in the table, and named as stale."""
    monkeypatch.setattr(camvid_table, "ROOT", tmp_path)
    _fake_run(f"dual_teacher_{T}", 0, [30.0, 50.0])
    _fake_run(f"dual_teacher_{T}", 1, [30.0, 48.0])
    out = camvid_table.run_dir(f"dual_teacher_{T}", 0)
    (out / "command.txt").write_text(" ".join(camvid_table.command(f"dual_teacher_pass_{T}", 0)) + "\n")
    (camvid_table.run_dir(f"dual_teacher_{T}", 1) / "command.txt").write_text(
        " ".join(camvid_table.command(f"dual_teacher_{T}", 1)) + "\n")
    assert camvid_table.stale(f"dual_teacher_{T}", 0) and not camvid_table.finished(f"dual_teacher_{T}", 0)
    assert camvid_table.finished(f"dual_teacher_{T}", 1) and not camvid_table.stale(f"dual_teacher_{T}", 1)
    text = camvid_table.report([0, 1], [0])
    assert "| 1/2 | - / 38.0 |" in text and f"(delete to rerun): dual_teacher_{T}_s0" in text
    # an older archive without command.txt is judged by the command line its log.txt begins with
    (out / "command.txt").unlink()
    (out / "log.txt").write_text("2026-12-02 10:07:47 command: methods/dual_teacher.py --iters-per-epoch 40\n")
    assert camvid_table.stale(f"dual_teacher_{T}", 0)
    script, *flags = camvid_table.command(f"dual_teacher_{T}", 0)[1:]  # the same flags in another order
    shuffled = " ".join([script, *flags[-4:], *flags[:-4]])
    (out / "log.txt").write_text(f"2026-12-02 10:07:47 command: {shuffled}\n2026-12-02 10:07:48 processes: 1\n")
    assert not camvid_table.stale(f"dual_teacher_{T}", 0) and camvid_table.finished(f"dual_teacher_{T}", 0)
    # the same command, but its args.json says a default it no longer has (or lacks a flag it has now): stale
    today = dict(camvid_table.expected_args(f"dual_teacher_{T}", 0))
    (out / "args.json").write_text(json.dumps({**today, "data_root": "/elsewhere", "out": "x", "versions": {}}))
    assert not camvid_table.stale(f"dual_teacher_{T}", 0)  # machine-local and provenance keys do not count
    for processes, stale in ((1, False), (2, True)):  # the row's command runs one process
        (out / "args.json").write_text(json.dumps({**today, "num_processes": processes}))
        assert camvid_table.stale(f"dual_teacher_{T}", 0) == stale
    for changed in ({**today, "lr": today["lr"] / 2}, {k: v for k, v in today.items() if k != "ema_step"}):
        (out / "args.json").write_text(json.dumps(changed))
        assert camvid_table.stale(f"dual_teacher_{T}", 0) and not camvid_table.finished(f"dual_teacher_{T}", 0)


def test_the_supervised_rows_are_the_calibrations_runs_when_their_arguments_match(tmp_path, monkeypatch):
    """scripts/camvid_protocol.py's run of the chosen cell (another script's command, same arguments) is archived
    as the supervised row's run and counts as finished; one with other arguments (another lr) is not imported,
    and a row that already has a run keeps it."""
    monkeypatch.setattr(camvid_table, "ROOT", tmp_path)
    base, full = camvid_table.BASELINE, "supervised_full"
    for row, seed, lr_scale in ((base, 0, 1.0), (base, 1, 0.5), (full, 0, 1.0)):
        origin = tmp_path / "results" / "camvid_protocol_runs" / f"{camvid_table.CALIBRATION[row]}_s{seed}"
        _fake_run(row, seed, [30.0, 40.0 + seed])
        origin.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(camvid_table.run_dir(row, seed), origin)
        args = dict(camvid_table.expected_args(row, seed))
        (origin / "args.json").write_text(json.dumps({**args, "lr": args["lr"] * lr_scale, "eval_test": "every",
                                                      "git_commits": ["abc"]}))
        (origin / "log.txt").write_text("2026-12-07 20:11:09 command: methods/supervised.py --eval-test every\n")
    _fake_run(full, 0, [30.0, 45.0])  # the row's own run, already there
    assert camvid_table.import_calibration(base, 0) and not camvid_table.import_calibration(base, 1)
    assert not camvid_table.import_calibration(full, 0)
    archived = camvid_table.archive_dir(base, 0)
    assert (archived / "calibration.txt").read_text().startswith("results/camvid_protocol_runs/")
    assert camvid_table.finished(base, 0) and not camvid_table.stale(base, 0)
    assert not camvid_table.finished(base, 1) and camvid_table.source(base, 1) is None
    text = camvid_table.report([0, 1], [0])
    assert f"their calibration.txt names each): {base}_s0" in text


def test_a_method_run_on_camvid_without_flags_is_its_table_row():
    """CamVid's defaults are the table's protocol: `python methods/<m>.py --dataset camvid` (with `--split full` for
    the upper bound) trains what the row's command does, run-control flags and the data's location aside."""
    import importlib
    for name, (script, split, _, _) in camvid_table.ROWS.items():
        plain = ["--dataset", "camvid"] + (["--split", split] if split != camvid_table.SPLIT else [])
        args = vars(importlib.import_module(f"methods.{script}").parse_args(plain))
        # per-process batch sizes are set from the global ones once the process count is known (global_batch counts)
        assert not cli.changed_args(json.loads(json.dumps(args, default=str)), camvid_table.expected_args(name, 0),
                                    ignore={"data_root", "out", "batch_size", "unlabeled_batch_size"}), name


def test_every_diagnostic_key_is_logged_by_some_method():
    """The table's diagnostics column reads metrics.jsonl keys by name: each must be written by a method."""
    sources = "".join((ROOT / "methods" / f).read_text() for f in
                      ("ctt.py", "dual_teacher.py", "gta_seg.py", "segkc.py", "mean_teacher.py"))
    sources += (ROOT / "common.py").read_text()
    for key in camvid_table.DIAGNOSTICS:  # miou_<x>: an extra model named x; CTT names its students by letter
        name = re.sub(r"_[A-H]$", "_{PAIR_NAMES[i]}", key[len("miou_"):] if key.startswith("miou_") else key)
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


def _camvid_tree(root, height=24, width=32):
    """SegNet's CamVid layout with 8 train and 3 val frames of random pixels and labels (11 = void)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            name = f"0001TP_{i:06d}.png"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / split / name)
            Image.fromarray(rng.integers(0, 12, (height, width), dtype=np.uint8)).save(root / f"{split}annot" / name)


def test_overlay_montage_shows_every_rows_prediction_on_the_same_val_images(tmp_path, monkeypatch):
    """camvid_overlays.png: rows image, ground truth, then one per run with weights (180-pixel name column, 200-pixel
    tiles for the 32-pixel-wide frames, 4-pixel gaps); a run's tile holds its own network's argmax in the class
    colours; the file stays small."""
    data_root, run = tmp_path / "camvid", tmp_path / "one_iteration"
    _camvid_tree(data_root)
    run_method("supervised.py", ["--dataset", "camvid", "--data-root", str(data_root), "--image-scale", "1",
                                 "--crop-size", "16", "16", "--backbone", "resnet18", "--pretrained", "none",
                                 "--decoder-channels", "8", "--batch-size", "2", "--iters", "1", "--eval-every", "1",
                                 "--num-workers", "0", "--num-overlays", "0", "--out", str(run)])
    monkeypatch.setattr(camvid_table, "ROOT", tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    montage = results / "camvid_overlays.png"
    for count, name in enumerate((f"supervised_{T}", f"ctt_{T}"), 1):
        camvid_table.run_dir(name, 0).mkdir(parents=True)
        shutil.copyfile(run / "model_last.pt", camvid_table.run_dir(name, 0) / "model_last.pt")
        camvid_table.overlays(0, results)
        if count == 1:
            one_row = np.array(Image.open(montage).convert("RGB"))
    two_rows = np.array(Image.open(montage).convert("RGB"))
    tile = round(200 * 24 / 32) + 4
    assert two_rows.shape[0] - one_row.shape[0] == tile and two_rows.shape[1] == 180 + 3 * (200 + 4)
    saved = torch.load(run / "model_last.pt", weights_only=True)
    model = common.build_model("resnet18", 11, "none", 16, 8)
    model.load_state_dict(saved["model"])
    mean, std = common.normalization("resnet18")
    x = torch.from_numpy(np.array(Image.open(data_root / "val" / "0001TP_000000.png"))).permute(2, 0, 1) / 255
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        label = model.eval()(x[None]).argmax(1)[0]
    # the first run's row (third from the top), first val image, pixel (12, 16) at 6.25 tile pixels per pixel
    for y, x_ in [(12, 16), (3, 5), (20, 28)]:
        colour = two_rows[2 * tile + round((y + 0.5) * 6.25), 180 + round((x_ + 0.5) * 6.25)]
        assert tuple(colour) == datasets.CAMVID_PALETTE[label[y, x_]], (y, x_)
    assert montage.stat().st_size < 1_000_000


def _summarize_run(folder, method, seed, mious, speeds=(0.5, 0.4, 9.0)):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"method": method, "dataset": "camvid", "split": "1/8",
                                                  "seed": seed}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"iteration": 400 * (k + 1), "miou": m}) + "\n"
                                                  for k, m in enumerate(mious)))
    (folder / "train.jsonl").write_text("".join(json.dumps({"iteration": 20 * (k + 1), "loss": 1.0,
                                                            "sec_per_iter": s}) + "\n" for k, s in enumerate(speeds)))


def test_summarize_table_and_plot(tmp_path):
    """Last and best mIoU per run, the median s/iter (robust to one slow record), one row per run in the order
    given; folders without evaluations are skipped with a note; --plot writes a PNG; nothing to show is an error."""
    _summarize_run(tmp_path / "runs" / "ctt_a", "ctt", 0, [40.0, 47.25, 45.5])
    _summarize_run(tmp_path / "runs" / "sup_b", "supervised", 1, [30.0], speeds=(0.25,))
    (tmp_path / "runs" / "empty").mkdir()
    script, plot = str(ROOT / "scripts" / "summarize.py"), tmp_path / "plots" / "miou.png"
    runs = [str(tmp_path / "runs" / n) for n in ("ctt_a", "empty", "sup_b")]
    result = subprocess.run([sys.executable, script, *runs, "--plot", str(plot)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "| run | method | dataset | split | seed | iterations | last mIoU | best mIoU | median s/iter |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| ctt_a | ctt | camvid | 1/8 | 0 | 1200 | 45.50 | 47.25 | 0.500 |",
        "| sup_b | supervised | camvid | 1/8 | 1 | 400 | 30.00 | 30.00 | 0.250 |"]
    assert "skipped" in result.stderr and "empty" in result.stderr
    assert Image.open(plot).format == "PNG" and Image.open(plot).size == (1000, 450)
    result = subprocess.run([sys.executable, script, str(tmp_path / "runs" / "empty")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "no run folder with metrics.jsonl" in result.stderr
