"""The CamVid table v3: every method, the supervised baselines and the mean-teacher control under one protocol,
judged on the test split.

Protocol (every run; chosen on supervised runs only, results/camvid_protocol.md): CamVid from --data-root,
the labeled share SPLIT drawn by --labeled-draw, EfficientNet-Lite0 with ImageNet weights, decoder 64 channels,
8 labeled + 8 unlabeled images per iteration, head lr x10, ITERS iterations; val is evaluated every EVAL_EVERY
iterations for monitoring and the 233 test images once, with the last weights. Each method's own paper settings
otherwise (its file's defaults). A seed fixes the labeled split, the initialisation and the data streams, so rows
with the same seed share their labeled images. Reported: the LAST weights' test mIoU (nothing is selected on val
or test), mean ± std over seeds, gains over supervised and over the control paired by seed; val beside it. The
ablations measure what our defaults change against the released code (GTA-Seg's storage sharing, Dual Teacher's
shift length), an earlier switch-on (CTT's HC/LC), and the three differences between the control and French et
al.'s code that act on every row (their BN freezing and box, our joint forward).

Runs go to runs/camvid_v3/<row>_s<seed>; a finished run is not repeated, an interrupted one resumes (--resume
auto), and the report (results/camvid_v3_report.md; the readings are written by hand in results/camvid.md) is
rewritten after every run. The small files of every finished run (args.json, metrics.jsonl, train.jsonl, log.txt,
the commit it ran from) are archived in results/camvid_runs/<row>_s<seed>/,
which the report reads when runs/ is gone (a fresh clone) and which also counts as finished: delete a row's
archive to rerun it. The two supervised rows are the calibration's runs of the chosen cell where it has them
(results/camvid_protocol_runs/: the same arguments, evaluated on test at every evaluation). A run folder records
its command (command.txt); one made by another command than its row's, or whose args.json is not what that
command means today, is never reused. The v2 table (judged on val) is in
results/camvid_v2.md with its archives.

  python scripts/camvid_table.py                                   # every row, seeds 0 1 2, ablations 0 1
  python scripts/camvid_table.py --rows mean_teacher_1-30 --seeds 0  # one row, one seed
  python scripts/camvid_table.py --report-only                     # rebuild results/ from what exists
"""
import argparse
import functools
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # common and datasets (imported where the montage needs them)
import cli  # noqa: E402
from cli import description  # noqa: E402

# Protocol v3, chosen on supervised runs only (scripts/camvid_protocol.py, results/camvid_protocol.md: cell
# 1-30_h10_i3200_480); CamVid's defaults in cli.DATASET_DEFAULTS are the same values.
ITERS, SPLIT, LABELED_DRAW, HEAD_LR_MULT, RESOLUTION = 3200, "1/30", "spread", "10", "480"
EVAL_EVERY = ITERS // 8  # as the calibration, so that its supervised runs are this table's (CALIBRATION below)
TAG = SPLIT.replace("/", "-")
UNLABELED_PASS = (367 - math.ceil(367 * Fraction(SPLIT))) // 8  # iterations per pass over the unlabeled images
RESOLUTIONS = {"240": ["--image-scale", "0.5", "--crop-size", "96", "128"],  # as scripts/camvid_protocol.py
               "480": ["--image-scale", "1.0", "--crop-size", "192", "256"]}
PROTOCOL = ["--dataset", "camvid", *RESOLUTIONS[RESOLUTION], "--decoder-channels", "64",
            "--pretrained", "imagenet", "--batch-size", "8", "--unlabeled-batch-size", "8", "--head-lr-mult",
            HEAD_LR_MULT, "--labeled-draw", LABELED_DRAW, "--iters", str(ITERS), "--eval-every", str(EVAL_EVERY),
            "--num-workers", "2"]
LITE0 = ["--backbone", "efficientnet_lite0"]
BASELINE, CONTROL = f"supervised_{TAG}", f"mean_teacher_{TAG}"
# row -> (script, split, flags, what the row is)
ROWS = {
    BASELINE: ("supervised", SPLIT, LITE0, "labeled images only (the baseline)"),
    "supervised_full": ("supervised", "full", LITE0, "all 367 labels (the upper bound)"),
    CONTROL: ("mean_teacher", SPLIT, LITE0, "the control: EMA teacher + CutMix pseudo-labels"),
    f"gta_seg_{TAG}": ("gta_seg", SPLIT, LITE0, "paper mode (EMA teacher evaluated)"),
    f"dual_teacher_{TAG}": ("dual_teacher", SPLIT, LITE0, "400-iteration shifts (student evaluated)"),
    f"ctt_{TAG}": ("ctt", SPLIT, LITE0, "paper's bank entry and switch-on rule (student A evaluated)"),
    f"segkc_{TAG}": ("segkc", SPLIT, ["--junior-backbone", "efficientnet_lite0", "--senior-backbone",
                                      "efficientnet_lite2", "--senior-pretrained", "imagenet"],
                     "Lite2 senior (ImageNet), Lite0 junior evaluated"),
}
# row -> (script, split, flags, what it measures, the row it is compared with)
ABLATIONS = {
    f"gta_seg_official_{TAG}": ("gta_seg", SPLIT, LITE0 + ["--official-code"],
                                "the released code's storage sharing (all T/A/S parameters in the first "
                                "semi-supervised epoch, then the mask predictor of student and assistant)",
                                f"gta_seg_{TAG}"),
    f"dual_teacher_pass_{TAG}": ("dual_teacher", SPLIT, LITE0 + ["--iters-per-epoch", str(UNLABELED_PASS)],
                                 f"a shift per pass over the unlabeled images ({UNLABELED_PASS} iterations), as the "
                                 "paper's epochs", f"dual_teacher_{TAG}"),
    f"mean_teacher_freeze_bn_{TAG}": ("mean_teacher", SPLIT, LITE0 + ["--freeze-bn"],
                                     "backbone BN frozen at its ImageNet statistics (French et al.'s --freeze_bn): "
                                     "no strong view in the statistics the teacher averages", CONTROL),
    f"mean_teacher_french_box_{TAG}": ("mean_teacher", SPLIT, LITE0 + ["--cutmix-box", "french"],
                                       "French et al.'s CutMix box: half the area, on every image", CONTROL),
    f"mean_teacher_joint_{TAG}": ("mean_teacher", SPLIT, LITE0 + ["--joint-forward"],
                                  "one student forward on [labeled; mixed], BN statistics over both (ours, as "
                                  "GTA-Seg, Dual Teacher and CTT here)", CONTROL),
    f"ctt_contrast_{TAG}": ("ctt", SPLIT, LITE0 + ["--contrast-after", str(ITERS // 10)],
                            f"HC/LC on from iteration {ITERS // 10} (10%) with the filled queue entries (ours: the "
                            "paper's rule waits for every class queue to fill)", f"ctt_{TAG}"),
}
ALL = {**{k: v[:3] for k, v in ROWS.items()}, **{k: v[:3] for k, v in ABLATIONS.items()}}
# The supervised rows are the calibration's runs of the chosen cell where it has them (the same arguments: its
# command differs only in run-control flags such as --eval-test and --num-overlays); see import_calibration.
_DRAW, _RES = "_random" if LABELED_DRAW == "random" else "", "_480" if RESOLUTION == "480" else ""
CALIBRATION = {BASELINE: f"{TAG}_h{HEAD_LR_MULT}_i{ITERS}{_DRAW}{_RES}",  # scripts/camvid_protocol.py's cell names
               "supervised_full": f"full_h{HEAD_LR_MULT}_i{ITERS}{_RES}"}
# what explains each row, read from the last evaluation of its runs (mean over seeds where numeric)
DIAGNOSTICS = ["miou_student", "miou_assistant", "miou_senior", "miou_student_B", "pseudo_share",
               "contrast_on_iteration", "contrast_on_share", "banks_ready", "bank_fill_min", "ema_a_max",
               "teacher_lag", "teacher_lag_mean", "train_passed"]


def run_dir(name: str, seed: int) -> Path:
    return ROOT / "runs" / "camvid_v3" / f"{name}_s{seed}"


def archive_dir(name: str, seed: int) -> Path:
    return ROOT / "results" / "camvid_runs" / f"{name}_s{seed}"


def command(name: str, seed: int) -> list[str]:
    script, split, flags = ALL[name]
    return ["python", f"methods/{script}.py", *PROTOCOL, *flags, "--split", split, "--seed", str(seed),
            "--out", f"runs/camvid_v3/{name}_s{seed}"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def source(name: str, seed: int) -> Path | None:
    """The folder holding this run's records: the live run folder, else its archive."""
    for folder in (run_dir(name, seed), archive_dir(name, seed)):
        if (folder / "metrics.jsonl").exists():
            return folder
    return None


def recorded_command(folder: Path) -> str | None:
    """The command that made a run: its command.txt, else the "command:" line of its log.txt (older archives)."""
    if (folder / "command.txt").exists():
        return (folder / "command.txt").read_text().strip()
    logged = re.search(r" command: (.+)", (folder / "log.txt").read_text()) if (folder / "log.txt").exists() else None
    return "python " + logged.group(1).strip() if logged else None


def flag_groups(line: str) -> tuple:
    """A command as (program and script, sorted [flag, values...] groups): the order of the flags does not matter."""
    head, *groups = re.split(r" (?=--)", line.strip())
    return head, sorted(groups)


@functools.lru_cache(maxsize=None)
def expected_args(name: str, seed: int) -> dict:
    """The arguments this row's command resolves to with today's code and defaults (the method's own parser), as
    args.json records them. Not to be modified (cached)."""
    import importlib
    args = vars(importlib.import_module(f"methods.{ALL[name][0]}").parse_args(command(name, seed)[2:]))
    return json.loads(json.dumps(args, default=str))


def import_calibration(name: str, seed: int) -> bool:
    """Archive the calibration's run of a supervised row as this row's run, if it has one with the arguments the
    row's command means today (run-control flags aside) and the row has no run yet. calibration.txt names its
    origin; its command (another script's) is then not compared. Returns whether it was imported."""
    origin = ROOT / "results" / "camvid_protocol_runs" / f"{CALIBRATION.get(name)}_s{seed}"
    if name not in CALIBRATION or source(name, seed) is not None or not (origin / "args.json").exists():
        return False
    saved = json.loads((origin / "args.json").read_text())
    if saved.get("num_processes", 1) != 1 or cli.changed_args(expected_args(name, seed), saved,
                                                               ignore={"data_root", "num_processes"}):
        return False
    target = archive_dir(name, seed)
    target.mkdir(parents=True, exist_ok=True)
    for file in ("args.json", "metrics.jsonl", "train.jsonl", "log.txt"):
        shutil.copyfile(origin / file, target / file)
    (target / "calibration.txt").write_text(f"{origin.relative_to(ROOT)} (scripts/camvid_protocol.py)\n")
    (target / "commit.txt").write_text(" ".join(saved.get("git_commits", ["unknown"])) + "\n")
    return True


def stale(name: str, seed: int) -> bool:
    """A run folder (or archive) made by another command than this row's current one (flags in any order), or
    whose args.json is not what that command means today (a default changed, a flag was added or removed)."""
    folder = source(name, seed)
    if folder is None:
        return False
    recorded = None if (folder / "calibration.txt").exists() else recorded_command(folder)
    if recorded is not None and flag_groups(recorded) != flag_groups(" ".join(command(name, seed))):
        return True
    if not (folder / "args.json").exists():
        return False
    saved = json.loads((folder / "args.json").read_text())
    if saved.get("num_processes", 1) != 1:  # the row's command runs one process (absent: run before it was recorded)
        return True
    return bool(cli.changed_args(expected_args(name, seed), saved, ignore={"data_root", "num_processes"}))


def finished(name: str, seed: int) -> bool:
    folder = source(name, seed)
    return (folder is not None and not stale(name, seed)
            and any(r["iteration"] == ITERS and "test_miou" in r for r in read_jsonl(folder / "metrics.jsonl")))


def archive(name: str, seed: int, commit: str) -> None:
    """Copy the small files of a finished run into results/ (committed), so the table outlives runs/."""
    out, target = run_dir(name, seed), archive_dir(name, seed)
    target.mkdir(parents=True, exist_ok=True)
    for file in ("args.json", "metrics.jsonl", "train.jsonl", "log.txt", "command.txt"):
        if (out / file).exists():
            shutil.copyfile(out / file, target / file)
    (target / "calibration.txt").unlink(missing_ok=True)  # this row's own run now, not the calibration's
    (target / "commit.txt").write_text(commit + "\n")


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain",
                                                                                     "--", "*.py") else "")


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------
def mean_std(values: list, digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_gain(a: dict, b: dict) -> str:
    """Gain of row a over row b paired by seed (same labeled split): mean ± std of the per-seed differences, and
    beyond the spread (**above** / **below**) when a is on the same side of b in every seed and the mean difference
    exceeds twice its standard error in size; otherwise 'within'."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "-"
    d = [a[s] - b[s] for s in seeds]
    if len(d) == 1:
        return f"{d[0]:+.1f} (1 seed)"
    sd = statistics.stdev(d)
    mean, beyond = statistics.mean(d), abs(statistics.mean(d)) > 2 * sd / math.sqrt(len(d))
    side = " **above**" if min(d) > 0 and beyond else " **below**" if max(d) < 0 and beyond else " within"
    return f"{mean:+.1f} ± {sd:.1f}" + side


def mean_or_dash(values: list) -> str:
    return f"{statistics.mean(values):.0f}" if values else "-"


def collect(name: str, seeds: list) -> dict:
    """Per seed: the last metrics record, the val mIoU curve and the median training s/iter, for finished runs."""
    runs = {}
    for seed in seeds:
        folder = source(name, seed)
        if folder is None or not finished(name, seed):
            continue
        records = read_jsonl(folder / "metrics.jsonl")
        train = read_jsonl(folder / "train.jsonl")
        runs[seed] = {"last": records[-1], "curve": [(r["iteration"], r["miou"]) for r in records],
                      "probe": [(r["iteration"], r["pseudo_acc_all"]) for r in records if "pseudo_acc_all" in r],
                      "speed": statistics.median(r["sec_per_iter"] for r in train) if train else None}
    return runs


def diagnostics(runs: dict) -> str:
    parts = []
    for key in DIAGNOSTICS:
        values = [r["last"][key] for r in runs.values() if r["last"].get(key) is not None]
        if not values:
            continue
        if all(isinstance(v, bool) for v in values):
            parts.append(f"{key} {sum(values)}/{len(values)}")
        elif all(isinstance(v, (int, float)) for v in values):  # fractions (an EMA decay, a share) keep 3 digits
            parts.append(f"{key} {mean_std([float(v) for v in values], 3 if max(map(abs, values)) <= 1 else 1)}")
    return "; ".join(parts) or "-"


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def report(seeds: list, ablation_seeds: list) -> str:
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    data = {name: collect(name, seeds) for name in ROWS}
    data.update({name: collect(name, ablation_seeds) for name in ABLATIONS})
    last = {name: {s: r["last"]["test_miou"] for s, r in runs.items()} for name, runs in data.items()}
    val = {name: {s: r["last"]["miou"] for s, r in runs.items()} for name, runs in data.items()}
    lines = [f"# CamVid {SPLIT}: {ITERS} iterations, protocol v3, judged on test", "",
             "Written by `python scripts/camvid_table.py` (commands below). Protocol: " + " ".join(PROTOCOL[:-6]) +
             f", {ITERS} iterations (chosen on supervised runs only: `results/camvid_protocol.md`). Test mIoU = the "
             "233 test images scored once, with each run's LAST weights (nothing is selected on val or test); val = "
             "the 101 val images at the same iteration (monitoring); per seed, then mean ± std over seeds. A seed "
             "fixes the labeled split, so gains are paired by seed: mean ± std of the per-seed differences; "
             "**above** / **below** = on that side of the reference in every seed, and the mean difference is "
             "more than twice its standard error (std / sqrt(seeds)); within = not beyond the spread. Probe = "
             "pixel accuracy of the network that makes the pseudo-labels (for the baselines: the evaluated "
             "network), on every labeled pixel of 32 fixed unlabeled training images "
             "(ground truth read for the probe only). s/iter: median over the run (evaluations excluded), lowest "
             "over seeds, 2 CPU cores (the machine's speed drifts, see results/benchmark.md).", "",
             f"| row | what it is | seeds | test mIoU per seed | mean ± std | vs supervised {SPLIT} | vs the control | "
             "val mIoU | probe acc | s/iter |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def per_seed(name, wanted):
        return " / ".join(f"{last[name][s]:.1f}" if s in last[name] else "-" for s in wanted)

    for name, (_, _, _, what) in ROWS.items():
        runs = data[name]
        speed = [r["speed"] for r in runs.values() if r["speed"]]
        probe = [r["last"]["pseudo_acc_all"] for r in runs.values() if "pseudo_acc_all" in r["last"]]
        lines.append(f"| {name} | {what} | {len(runs)}/{len(seeds)} | {per_seed(name, seeds)} | "
                     f"{mean_std(list(last[name].values()))} | "
                     f"{paired_gain(last[name], last[BASELINE]) if name != BASELINE else '-'} | "
                     f"{paired_gain(last[name], last[CONTROL]) if name not in (BASELINE, CONTROL) else '-'} | "
                     f"{mean_std(list(val[name].values()))} | {mean_std(probe)} | {f'{min(speed):.2f}' if speed else '-'} |")
    calibrated = [f"{n}_s{s}" for n in CALIBRATION for s in seeds
                  if source(n, s) is not None and (source(n, s) / "calibration.txt").exists()]
    if calibrated:
        lines += ["", "The calibration's own runs (`results/camvid_protocol_runs/`, the same arguments; their "
                  "calibration.txt names each): " + ", ".join(calibrated)]
    old = [f"{n}_s{s}" for n in ALL for s in (seeds if n in ROWS else ablation_seeds) if stale(n, s)]
    if old:
        lines += ["", "Not shown, made by another command than their row's (delete to rerun): " + ", ".join(old)]
    lines += ["", "Ablations, each paired by seed with the row it is compared with (test mIoU): what a default of "
              "ours changes against the released code or the paper's rule.", "",
              "| row | what it measures | seeds | test mIoU per seed | mean ± std | vs its default row | "
              f"vs supervised {SPLIT} |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, (_, _, _, what, reference) in ABLATIONS.items():
        lines.append(f"| {name} | {what} | {len(data[name])}/{len(ablation_seeds)} | "
                     f"{per_seed(name, ablation_seeds)} | {mean_std(list(last[name].values()))} | {reference}: "
                     f"{paired_gain(last[name], last[reference])} | {paired_gain(last[name], last[BASELINE])} |")
    lines += ["", "What the logs say at the last evaluation (mean ± std over seeds; `miou_*` = the method's other "
              "networks, booleans = runs where true):", "", "| row | logged |", "| --- | --- |"]
    lines += [f"| {name} | {diagnostics(runs)} |" for name, runs in data.items() if runs]
    classes = next((list(r["last"]["test_iou"]) for runs in data.values() for r in runs.values()), [])
    if classes:
        lines += ["", "Per-class test IoU (last weights, mean over seeds):", "",
                  "| row | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
        for name, runs in data.items():
            if runs:
                lines.append(f"| {name} | " + " | ".join(
                    f"{statistics.mean(r['last']['test_iou'][c] for r in runs.values()):.1f}" for c in classes)
                    + " |")
        probed = {name: [r["last"]["probe_per_class"] for r in runs.values() if "probe_per_class" in r["last"]]
                  for name, runs in data.items()}
        if any(probed.values()):
            lines += ["", "Pseudo-labels per class (the probe's `probe_per_class` at the last evaluation, mean over "
                      "the seeds that log it, older runs do not): % of the class's pixels that pass the method's "
                      "rule / % of those that are right; `python scripts/evaluate.py --weights ... --probe TAU` "
                      "gives it for saved weights.", "", "| row | seeds | " + " | ".join(classes) + " |",
                      "| --- | --- |" + " --- |" * len(classes)]
            for name, per_class in probed.items():
                if per_class:
                    lines.append(f"| {name} | {len(per_class)} | " + " | ".join(
                        f"{statistics.mean(p[c]['share'] for p in per_class):.0f} / " + mean_or_dash(
                            [p[c]["acc"] for p in per_class if p[c]["acc"] is not None]) for c in classes) + " |")
    lines += ["", "Pictures: `camvid_table.png` (test mIoU per row, a dot per seed), `camvid_miou.png` (val mIoU "
              "over training, mean over seeds), `camvid_probe_all.png` (probe accuracy over training), "
              "`camvid_overlays.png` (3 val images, their ground truth and every row's prediction with its last "
              "weights, first seed; only rebuilt where runs/ exists).", "",
              "Commands (repository root); archived records in `results/camvid_runs/`:", "", "```"]
    lines += [" ".join(command(name, s)) for name in ALL for s in (seeds if name in ROWS else ablation_seeds)
              if source(name, s) is not None] + ["```", ""]
    text = "\n".join(lines)
    (results / "camvid_v3_report.md").write_text(text)
    plots(data, last, results)
    overlays(seeds[0], results)
    return text


def plots(data: dict, last: dict, results: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in data if last[n]]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    for y, name in enumerate(names):
        values = list(last[name].values())
        ax.barh(y, statistics.mean(values), color="tab:orange" if name in ABLATIONS else "tab:blue", alpha=0.6)
        ax.plot(values, [y] * len(values), "o", color="black", markersize=4)
    if last[BASELINE]:
        ax.axvline(statistics.mean(last[BASELINE].values()), color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    lo = min(min(v.values()) for v in last.values() if v)
    ax.set_xlim(max(0, lo - 5), max(max(v.values()) for v in last.values() if v) + 2)
    ax.set_xlabel(f"test mIoU (%), last weights after {ITERS} iterations\nbar = mean, dot = seed, dashed = "
                  f"supervised {SPLIT}")
    ax.set_title(f"CamVid {SPLIT} ({math.ceil(367 * Fraction(SPLIT))} labels), Lite0 DeepLabv3+, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(results / "camvid_table.png", dpi=100)
    plt.close(fig)
    for key, file, label in (("curve", "camvid_miou.png", "val mIoU (%)"),
                             ("probe", "camvid_probe_all.png", "probe accuracy, all pixels (%)")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in ROWS:
            curves = [dict(r[key]) for r in data[name].values() if r[key]]
            if curves:
                xs = sorted(set.intersection(*(set(c) for c in curves)))
                ax.plot(xs, [statistics.mean(c[x] for c in curves) for x in xs], "o-", label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{label}, mean over seeds")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results / file, dpi=100)
        plt.close(fig)


def overlays(seed: int, results: Path, count: int = 3) -> None:
    """camvid_overlays.png: `count` val images spread over val, their ground truth, and under them the
    prediction of every row's last weights (runs/camvid_v3/<row>_s<seed>/model_last.pt: live run folders only), in
    flat class colours, so the rows are compared on the same pixels in one small PNG (flat colours compress
    well). Each run's own overlays, with its pseudo-labels, stay in its overlays/ folder."""
    found = [(name, run_dir(name, seed) / "model_last.pt") for name in ALL]
    found = [(name, path) for name, path in found if path.is_file()]
    if not found:
        return
    import torch
    from accelerate import Accelerator
    from matplotlib.figure import Figure  # no pyplot: nothing global to close
    from matplotlib.patches import Patch
    import common
    from datasets import build_data
    args = argparse.Namespace(**torch.load(found[0][1], map_location="cpu", weights_only=True)["args"])
    args.num_workers = 0
    if not Path(args.data_root).is_dir():
        print(f"camvid_overlays.png not rebuilt: the runs' --data-root {args.data_root} does not exist here")
        return
    mean, std = common.normalization(args.backbone)
    data = build_data(args, Accelerator(cpu=True), mean, std, need_unlabeled=False)
    samples = [data.val_set[k * len(data.val_set) // count] for k in range(min(count, len(data.val_set)))]
    rows = [("image", [data.denormalize(s["image"]).permute(1, 2, 0) for s in samples]),
            ("ground truth", [s["mask"] for s in samples])]
    pixels = [s["image"] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1) for s in samples]
    for name, path in found:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        run = saved["args"]
        model = common.build_model(run["backbone"], data.num_classes, "none", run["output_stride"],
                                   run["decoder_channels"])
        model.load_state_dict(saved["model"])
        run_mean, run_std = (torch.tensor(v).view(3, 1, 1) for v in common.normalization(run["backbone"]))
        with torch.no_grad():
            rows.append((name, [model.eval()(((p - run_mean) / run_std)[None]).argmax(1)[0] for p in pixels]))
    colours = torch.tensor([*data.palette, (255, 255, 255)], dtype=torch.uint8)  # index num_classes = ignored
    height, width = samples[0]["mask"].shape
    tile_w = min(max(width, 200), 320)
    tile_h, gap, left = round(tile_w * height / width), 4, 180  # pixels (drawn at 100 dpi); left: row names
    names = [*data.class_names, "ignored"]
    legend_columns = 8
    legend_h = 18 * ((len(names) + legend_columns - 1) // legend_columns) + 8
    fig_w = left + len(samples) * (tile_w + gap)
    fig_h = len(rows) * (tile_h + gap) + legend_h
    fig = Figure(figsize=(fig_w / 100, fig_h / 100), dpi=100)
    for r, (name, tiles) in enumerate(rows):
        y = r * (tile_h + gap)  # pixels from the top
        fig.text((left - 8) / fig_w, 1 - (y + tile_h / 2) / fig_h, name, ha="right", va="center", fontsize=8)
        for c, tile in enumerate(tiles):
            ax = fig.add_axes(((left + c * (tile_w + gap)) / fig_w, 1 - (y + tile_h) / fig_h, tile_w / fig_w,
                               tile_h / fig_h))
            if r == 0:
                ax.imshow(tile.numpy())
            else:
                ax.imshow(colours[tile.where(tile < data.num_classes, data.num_classes)].numpy(),
                          interpolation="nearest")
            ax.set_axis_off()
    fig.legend(handles=[Patch(facecolor=colours[c].numpy() / 255, edgecolor="black", linewidth=0.5, label=n)
                        for c, n in enumerate(names)], loc="lower center", ncol=legend_columns, fontsize=8,
               frameon=False, handlelength=1.2, columnspacing=1.0, borderaxespad=0.2)
    fig.savefig(results / "camvid_overlays.png", dpi=100)


def main():
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the main rows")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the ablation rows")
    parser.add_argument("--rows", nargs="+", default=list(ALL), choices=list(ALL), help="rows to run (in order)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--data-root", default="data/CamVid", help="the CamVid folder (README, 'Data layouts'); "
                        "where the data lives is not part of a row's command: it is added to the run, not to "
                        "command.txt")
    cli = parser.parse_args()
    if not cli.report_only:
        for name in cli.rows:
            for seed in cli.seeds if name in ROWS else cli.ablation_seeds:
                if import_calibration(name, seed):
                    print(f"{name} seed {seed}: the calibration's run, {archive_dir(name, seed)}", flush=True)
                if finished(name, seed):
                    continue
                if stale(name, seed):
                    print(f"skipped {name} seed {seed}: {source(name, seed)} was made by another command or with "
                          "other arguments than the row's today; delete it to rerun this row", flush=True)
                    continue
                cmd = command(name, seed)
                cmd[0] = sys.executable
                cmd += ["--data-root", str(Path(cli.data_root).resolve())]
                print("running:", " ".join(cmd), flush=True)
                out, commit = run_dir(name, seed), git_commit()
                out.mkdir(parents=True, exist_ok=True)
                (out / "command.txt").write_text(" ".join(command(name, seed)) + "\n")
                with open(out / "stdout.txt", "a") as log:
                    subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
                if finished(name, seed):
                    archive(name, seed, commit)
                report(cli.seeds, cli.ablation_seeds)
    for name in ALL:  # runs finished outside this script (or before an archive existed) are archived too
        for seed in cli.seeds if name in ROWS else cli.ablation_seeds:
            live = run_dir(name, seed) / "metrics.jsonl"
            if finished(name, seed) and live.exists() and not (archive_dir(name, seed) / "metrics.jsonl").exists():
                archive(name, seed, git_commit() + " (archived after the run)")
    print(report(cli.seeds, cli.ablation_seeds))


if __name__ == "__main__":
    main()
