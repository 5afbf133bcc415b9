"""Calibrate the CamVid protocol on supervised runs only: where do labels limit the baseline?

A protocol setting shared by every method must not be chosen by looking at a semi-supervised run. So each cell of
this grid trains the supervised baseline twice, on a labeled share and on all 367 labels, and scores the test split
(233 frames, 171 of them from a sequence no training frame comes from) at every eighth of the schedule. A cell is
usable when (a) all-label training has converged: its test mIoU gains < 0.5 over the last quarter of the schedule,
and (b) all labels beat the share by >= 5 test mIoU (mean over seeds, paired by seed). The walk goes from the
cheapest cell, one knob at a time; results/camvid_protocol.md holds every cell run, its figures and the choice.

Knobs: --iters (schedule), --head-lr-mult (1: protocol v2's; 10: UniMatch's VOC recipe, LiheYoung/UniMatch@0324f3d
configs/pascal.yaml `lr_multi`), the labeled share, --labeled-draw (spread evenly over each video sequence, or
uniform random as the field's split files), the resolution (--image-scale 0.5 with 96x128 crops, or 1.0 with
192x256). Everything else is the CamVid CPU setting of cli.DATASET_DEFAULTS (Lite0 ImageNet, decoder 64, batch 8).
The data is read from --data-root (default data/CamVid).

  python scripts/camvid_protocol.py --cells full_h10_i3200 1-8_h10_i3200 --seeds 0 1   # run what is missing
  python scripts/camvid_protocol.py                                                     # rewrite the report only
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESOLUTIONS = {"240": ["--image-scale", "0.5", "--crop-size", "96", "128"],
               "480": ["--image-scale", "1.0", "--crop-size", "192", "256"]}
KEPT = ("args.json", "metrics.jsonl", "train.jsonl", "log.txt")


def parse_cell(name: str) -> dict:
    """'1-8_h10_i3200' (share 1/8, head lr x10, 3,200 iterations, spread draw, 240x180) and optional '_random',
    '_480' suffixes; 'full_...' is all 367 labels."""
    share, head, iters, *rest = name.split("_")
    return {"split": share.replace("-", "/"), "head": head[1:], "iters": int(iters[1:]),
            "draw": "random" if "random" in rest else "spread", "res": "480" if "480" in rest else "240"}


def run_dir(name: str, seed: int) -> Path:
    return ROOT / "runs" / "protocol" / f"{name}_s{seed}"


def archive_dir(name: str, seed: int) -> Path:
    return ROOT / "results" / "camvid_protocol_runs" / f"{name}_s{seed}"


def command(name: str, seed: int, data_root: str = "data/CamVid") -> list[str]:
    cell = parse_cell(name)
    return [sys.executable, "methods/supervised.py", "--dataset", "camvid", "--data-root",
            str(Path(data_root).resolve()), *RESOLUTIONS[cell["res"]],
            "--iters", str(cell["iters"]), "--eval-every", str(cell["iters"] // 8), "--eval-test", "every",
            "--split", cell["split"], "--head-lr-mult", cell["head"], "--labeled-draw", cell["draw"],
            "--seed", str(seed), "--num-overlays", "0", "--out", str(run_dir(name, seed).relative_to(ROOT))]


def records(name: str, seed: int) -> list[dict]:
    for folder in (run_dir(name, seed), archive_dir(name, seed)):
        path = folder / "metrics.jsonl"
        if path.exists():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def finished(name: str, seed: int) -> bool:
    metrics = records(name, seed)
    return bool(metrics) and metrics[-1]["iteration"] == parse_cell(name)["iters"]


def summary(name: str, seed: int) -> dict | None:
    metrics = records(name, seed)
    if not finished(name, seed):
        return None
    by_iter = {m["iteration"]: m for m in metrics}
    iters = parse_cell(name)["iters"]
    folder = run_dir(name, seed) if (run_dir(name, seed) / "train.jsonl").exists() else archive_dir(name, seed)
    train = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines() if x.strip()]
    sec = statistics.median(t["sec_per_iter"] for t in train if "sec_per_iter" in t)
    end, three_quarters = by_iter[iters], by_iter[iters * 3 // 4]
    return {"test": end["test_miou"], "test_3q": three_quarters["test_miou"],
            "gain_last_quarter": end["test_miou"] - three_quarters["test_miou"], "val": end["miou"],
            "curve": [by_iter[k]["test_miou"] for k in sorted(by_iter)], "sec_per_iter": sec,
            "minutes": sec * iters / 60, "test_iou": end["test_iou"]}


def report(path: Path) -> None:
    names = sorted({p.name.rsplit("_s", 1)[0] for base in (ROOT / "runs" / "protocol",
                                                          ROOT / "results" / "camvid_protocol_runs")
                    if base.is_dir() for p in base.iterdir() if p.is_dir()})
    rows = ["| cell | seed | test mIoU (last) | test at 3/4 | gain, last quarter ((a): < 0.5 with all labels) | "
            "val (last) | test curve (8 evals) "
            "| s/iter | min/run |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pairs = ["| share cell | all-label cell | seeds | test: share | test: all labels | all - share, paired ((b): >= 5) "
             "|",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in names:
        for seed in range(5):
            s = summary(name, seed)
            if s:
                rows.append(f"| {name} | {seed} | {s['test']:.1f} | {s['test_3q']:.1f} | {s['gain_last_quarter']:+.2f}"
                            f" | {s['val']:.1f} | {' '.join(f'{v:.1f}' for v in s['curve'])} | "
                            f"{s['sec_per_iter']:.2f} | {s['minutes']:.0f} |")
        if name.startswith("full"):
            continue
        full = "full_" + "_".join(x for x in name.split("_")[1:] if x != "random")
        seeds = [k for k in range(5) if summary(name, k) and summary(full, k)]
        if seeds:
            share = [summary(name, k)["test"] for k in seeds]
            every = [summary(full, k)["test"] for k in seeds]
            gaps = [b - a for a, b in zip(share, every)]
            spread = f" ± {statistics.stdev(gaps):.1f}" if len(gaps) > 1 else ""
            pairs.append(f"| {name} | {full} | {' '.join(map(str, seeds))} | {' / '.join(f'{v:.1f}' for v in share)}"
                         f" | {' / '.join(f'{v:.1f}' for v in every)} | {statistics.mean(gaps):+.1f}{spread} |")
    text = path.read_text() if path.exists() else "# CamVid protocol v3: calibration on supervised runs\n"
    head = text.split("<!-- grid -->")[0]
    tail = text.split("<!-- /grid -->")[1] if "<!-- /grid -->" in text else "\n"
    path.write_text(head + "<!-- grid -->\nEvery cell run (written by `scripts/camvid_protocol.py`; runs archived in "
                    "`results/camvid_protocol_runs/`):\n\n" + "\n".join(rows) + "\n\nCriterion (b), paired by seed:"
                    "\n\n" + "\n".join(pairs) + "\n<!-- /grid -->" + tail)


def main():
    parser = argparse.ArgumentParser(description="Run the supervised calibration cells that are missing, then "
                                                 "rewrite the grid in results/camvid_protocol.md.")
    parser.add_argument("--cells", nargs="*", default=[], help="cell names, e.g. full_h10_i3200 1-8_h10_i3200")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--data-root", default="data/CamVid", help="the CamVid folder (README, 'Data layouts')")
    cli = parser.parse_args()
    for name in cli.cells:
        parse_cell(name)
    for name in cli.cells:
        for seed in cli.seeds:
            if not finished(name, seed):
                subprocess.run(command(name, seed, cli.data_root), cwd=ROOT, check=True)
            if not archive_dir(name, seed).exists():
                archive_dir(name, seed).mkdir(parents=True)
                for kept in KEPT:
                    shutil.copy2(run_dir(name, seed) / kept, archive_dir(name, seed) / kept)
            report(ROOT / "results" / "camvid_protocol.md")
    report(ROOT / "results" / "camvid_protocol.md")


if __name__ == "__main__":
    main()
