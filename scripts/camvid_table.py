"""Every method under one protocol on real data (CamVid 1/8), written to results/camvid.md with PNG plots.

Protocol (all runs): CamVid from ../shared/data/camvid at half resolution (240x180, --image-scale 0.5), crop
96x128 (scale 0.5-2.0, flip), EfficientNet-Lite0 with ImageNet weights, decoder 64 channels, 8 labeled + 8
unlabeled images per iteration, the same iteration budget for every method, whole-image evaluation on the
101 val images; each method's own paper settings otherwise. The supervised baseline runs at 1/8 and with all
labels. The main table uses 800 iterations (what 2 CPU cores allow for every method and two seeds); another
budget gets its own run folders and report (results/camvid_<iters>it.md). Runs go to
runs/camvid[_<iters>it]/<name>_s<seed>; a finished run is not repeated and an interrupted one resumes
(--resume auto), and the table is rewritten after every run, so an interruption loses nothing.

  python scripts/camvid_table.py --seeds 0 1                                   # the main table, 800 iterations
  python scripts/camvid_table.py --seeds 0 --iters 1600 --runs supervised_1-8 dual_teacher_1-8
  python scripts/camvid_table.py --seeds 0 1 --report-only   # rebuild results/ from the runs that exist
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (script, split)
    "supervised_1-8": ("supervised", "1/8"),
    "gta_seg_1-8": ("gta_seg", "1/8"),
    "dual_teacher_1-8": ("dual_teacher", "1/8"),
    "ctt_1-8": ("ctt", "1/8"),
    "segkc_1-8": ("segkc", "1/8"),
    "supervised_full": ("supervised", "full"),
}
PROTOCOL = ["--dataset", "camvid", "--image-scale", "0.5", "--crop-size", "96", "128", "--decoder-channels", "64",
            "--pretrained", "imagenet", "--batch-size", "8", "--unlabeled-batch-size", "8"]
# SegKC needs a second, different architecture: ResNet-18, whose ImageNet weights (torchvision) cannot be
# downloaded on these machines, so the senior starts from scratch here (said in the table).
EXTRA = {"segkc": ["--junior-backbone", "efficientnet_lite0", "--senior-backbone", "resnet18",
                   "--senior-pretrained", "none"]}
MAIN_ITERS = 800
COLORS = [(31, 119, 180), (127, 127, 127), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def run_dir(name: str, seed: int, iters: int) -> str:
    return f"runs/camvid{'' if iters == MAIN_ITERS else f'_{iters}it'}/{name}_s{seed}"


def command(name: str, seed: int, iters: int, eval_every: int) -> list[str]:
    script, split = RUNS[name]
    backbone = EXTRA.get(script, ["--backbone", "efficientnet_lite0"])
    return ["python", f"methods/{script}.py", *PROTOCOL, *backbone, "--split", split, "--seed", str(seed),
            "--iters", str(iters), "--eval-every", str(eval_every), "--num-workers", "2",
            "--out", run_dir(name, seed, iters)]


def records(out: Path, file: str = "metrics.jsonl") -> list[dict]:
    path = out / file
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def finished(out: Path, iters: int) -> bool:
    return any(r["iteration"] == iters for r in records(out))


def line_plot(series: dict, path: Path, title: str, ylabel: str) -> None:
    """A small line chart with PIL (no plotting dependency): series = {name: [(x, y), ...]}."""
    width, height, left, bottom, top, right = 720, 420, 60, 40, 30, 190
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    if not points:
        return
    x0, x1 = 0, max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    y0, y1 = (y0 - 1, y1 + 1) if y0 == y1 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    sx = lambda x: left + (x - x0) / max(x1 - x0, 1) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        y = y0 + i * (y1 - y0) / 4
        draw.text((5, sy(y) - 6), f"{y:.1f}", fill="black")
        draw.line([left, sy(y), width - right, sy(y)], fill=(230, 230, 230))
    for i in range(5):
        x = x0 + i * (x1 - x0) / 4
        draw.text((sx(x) - 10, height - bottom + 5), f"{x:.0f}", fill="black")
    draw.text((left, 8), f"{title}  ({ylabel} vs iteration)", fill="black")
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        pts = sorted(pts)
        if len(pts) > 1:
            draw.line([(sx(x), sy(y)) for x, y in pts], fill=color, width=2)
        for x, y in pts:
            draw.ellipse([sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3], fill=color)
        draw.text((width - right + 10, top + 16 * k), name, fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def mean_std(values: list) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(seeds, iters, eval_every) -> None:
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    stem = "camvid" if iters == MAIN_ITERS else f"camvid_{iters}it"
    lines = [f"# CamVid 1/8 (46 labeled of 367), one protocol, {iters} iterations", "",
             f"Protocol: {' '.join(PROTOCOL)}, {iters} iterations, whole-image evaluation on the 101 val images "
             f"at 240x180, seeds {seeds} (split and initialisation). mIoU of each method's evaluated network: "
             "last evaluation and best over the run (mean ± std over seeds). Pseudo-label accuracy = pixel accuracy "
             "of the pseudo-labels that pass the method's own confidence rule, on 32 fixed unlabeled training "
             "images against their ground truth (for the supervised baseline: its own predictions at 0.95); "
             "share = fraction of pixels that pass; all-pixel acc = accuracy of the same network's argmax on every "
             "labeled pixel of those images (the figure comparable across methods; logged from seed 1 on). "
             "s/iter: median of train.jsonl (evaluation excluded), the lowest over seeds (the least disturbed "
             "run); measured on 2 CPU cores.", "",
             "| run | seeds done | last mIoU | best mIoU | pseudo-label acc | share | all-pixel acc | s/iter |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    curves_miou, curves_probe, curves_all, per_class, commands = {}, {}, {}, {}, []
    for name in RUNS:
        last, best, acc, share, acc_all, speed, done = [], [], [], [], [], [], []
        for seed in seeds:
            out = ROOT / run_dir(name, seed, iters)
            rec = records(out)
            if not rec:
                continue
            commands.append(" ".join(command(name, seed, iters, eval_every)))
            if rec[-1]["iteration"] == iters:
                done.append(seed)
                last.append(rec[-1]["miou"])
                best.append(rec[-1]["best_miou"])
                if "pseudo_acc" in rec[-1]:
                    acc.append(rec[-1]["pseudo_acc"])
                    share.append(rec[-1]["pseudo_share"])
                if "pseudo_acc_all" in rec[-1]:
                    acc_all.append(rec[-1]["pseudo_acc_all"])
                per_class.setdefault(name, []).append(rec[-1]["iou"])
            train = records(out, "train.jsonl")
            if train:
                speed.append(statistics.median(r["sec_per_iter"] for r in train))
            if seed == seeds[0]:
                curves_miou[name] = [(r["iteration"], r["miou"]) for r in rec]
                curves_probe[name] = [(r["iteration"], r["pseudo_acc"]) for r in rec if "pseudo_acc" in r]
            if name not in curves_all and any("pseudo_acc_all" in r for r in rec):
                curves_all[name] = [(r["iteration"], r["pseudo_acc_all"]) for r in rec if "pseudo_acc_all" in r]
        if done or speed:
            lines.append(f"| {name} | {len(done)}/{len(seeds)} | {mean_std(last)} | {mean_std(best)} | "
                         f"{mean_std(acc)} | {mean_std(share)} | {mean_std(acc_all)} | "
                         + (f"{min(speed):.2f} |" if speed else "- |"))
    if per_class:
        classes = list(next(iter(per_class.values()))[0])
        lines += ["", "Per-class IoU (last evaluation, mean over finished seeds):", "",
                  "| run | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
        for name, ious in per_class.items():
            lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(i[c] for i in ious):.1f}" for c in classes)
                         + " |")
    lines += ["", f"Curves (seed {seeds[0]}): `{stem}_miou.png`, `{stem}_pseudo_acc.png`; all-pixel probe accuracy "
              f"(first seed that logs it): `{stem}_probe_all.png`; overlays of the last "
              f"evaluation: `{stem}_overlays.png` (rows: val images; columns: image | ground truth | prediction | "
              "pseudo-label where the method has one).", "", "Commands (from the repository root):", "", "```"]
    lines += commands + ["```", ""]
    (results / f"{stem}.md").write_text("\n".join(lines))
    line_plot(curves_miou, results / f"{stem}_miou.png", "CamVid 1/8 val", "mIoU")
    line_plot(curves_probe, results / f"{stem}_pseudo_acc.png", "CamVid 1/8 unlabeled",
              "accuracy of passing pseudo-labels")
    line_plot(curves_all, results / f"{stem}_probe_all.png", "CamVid 1/8 unlabeled", "all-pixel accuracy")
    overlays = []
    for name in RUNS:
        found = sorted((ROOT / run_dir(name, seeds[0], iters) / "overlays").glob("*.png"))
        if found:
            overlays.append((name, Image.open(found[-1]).convert("RGB")))
    if overlays:
        width = max(o.width for _, o in overlays)
        canvas = Image.new("RGB", (width, sum(o.height + 18 for _, o in overlays)), "white")
        y = 0
        for name, o in overlays:
            ImageDraw.Draw(canvas).text((4, y + 3), name, fill="black")
            canvas.paste(o, (0, y + 18))
            y += o.height + 18
        canvas.save(results / f"{stem}_overlays.png")
    print((results / f"{stem}.md").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iters", type=int, default=MAIN_ITERS)
    parser.add_argument("--eval-every", type=int, default=None, help="default: iters / 4")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--report-only", action="store_true")
    cli = parser.parse_args()
    cli.eval_every = cli.eval_every or cli.iters // 4
    if not cli.report_only:
        for seed in cli.seeds:
            for name in cli.runs:
                out = ROOT / run_dir(name, seed, cli.iters)
                if finished(out, cli.iters) or not (ROOT / "methods" / f"{RUNS[name][0]}.py").exists():
                    continue
                cmd = command(name, seed, cli.iters, cli.eval_every)
                cmd[0] = sys.executable
                print("running:", " ".join(cmd), flush=True)
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "stdout.txt", "a") as log:
                    subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
                report(cli.seeds, cli.iters, cli.eval_every)
    report(cli.seeds, cli.iters, cli.eval_every)


if __name__ == "__main__":
    main()
