"""Speed and memory of every method's training iteration against the network passes it really needs.

For each method and backbone, on one fixed small CPU configuration (crop 128x128, 4 labeled + 4 unlabeled
images per iteration, decoder 64 channels, CamVid if present (at half size, 1/8 labeled) else the toy dataset):
  - iteration: the method script itself, run through its command line (its `main`, in a subprocess); the time
    from the end of one iteration to the end of the next (LossMeter.update), after a warm-up, evaluation
    excluded;
  - required passes: the network passes the method needs (PASSES below, read off each method file), timed in
    isolation on the same batch sizes (random inputs; a forward without gradient, or a forward + backward + SGD
    step) in the same process right after every iteration, on networks of their own: the speed of a shared
    2-core machine drifts by 10-30% within minutes, so a ratio is only trustworthy between timings taken
    side by side;
  - overhead = median over iterations of (iteration / the required passes timed right after it) (goal: <= 1.15);
    `spread` = the interquartile range of those per-iteration ratios;
  - in-run passes: the same iterations, with every network forward, backward and SGD step timed as it runs
    inside the script (timers wrapped around DeepLabV3Plus.forward, Tensor.backward and SGD.step);
    `outside` = the share of the iteration spent elsewhere (losses, EMA, banks, mixing, data, logging): the
    figure that finds waste. The backward of the loss terms counts as a pass here, so in-run passes exceed
    the required passes by that backward (CTT's contrastive losses);
  - loader: batches per second the data streams deliver (same workers) against what training consumes, at
    steady state (CamVid's decoded images are cached in the workers after their first epochs; the first
    epoch runs at about a third of this rate);
  - peak memory: the highest resident set size (VmHWM) of the training process at the end of the warm-up
    (before the isolated networks exist).
Prints a markdown table and writes JSON.

  python scripts/benchmark.py [--methods supervised gta_seg ...] [--backbones efficientnet_lite0 resnet18]
  python scripts/benchmark.py --inside METHOD BACKBONE NUM_CLASSES WARMUP -- <method flags>   (one timed run)
"""
import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cli import base_parser, description, resolve_args  # noqa: E402
import common  # noqa: E402
from datasets import build_data  # noqa: E402

L, U = 4, 4  # labeled and unlabeled images per iteration
# The passes each iteration needs: (kind, images, network). kind 'fwd' = forward without gradient,
# 'train' = forward + backward + SGD step. 'senior' is SegKC's second architecture.
PASSES = {
    "supervised": [("train", L, "net")],
    # the EMA teacher on the weak view; the student on the labeled and on the CutMixed strong view in separate
    # passes (mean_teacher.py; one backward and SGD step in the run, two here, as for segkc)
    "mean_teacher": [("fwd", U, "net"), ("train", L, "net"), ("train", U, "net")],
    # teacher: pseudo-labels (eval, weak view) and confidence (train mode, labeled + mixed batch); assistant and
    # student each learn on labeled + mixed (the code's joint batch for BN statistics, gta_seg.py)
    "gta_seg": [("fwd", U, "net"), ("fwd", L + U, "net"), ("train", L + U, "net"), ("train", L + U, "net")],
    # active teacher on the weak view; student on [labeled, mixed] and on the strong view (dual_teacher.py)
    "dual_teacher": [("fwd", U, "net"), ("train", L + U, "net"), ("train", U, "net")],
    # per pair: its teacher on the weak unlabeled view, its student on labeled + mixed strong view, its updated
    # teacher on the labeled batch to fill the bank (ctt.py, 2 pairs)
    "ctt": [("fwd", U, "net")] * 2 + [("train", L + U, "net")] * 2 + [("fwd", L, "net")] * 2,
    # each network: pseudo-labels on the unmixed batch (no grad, once), then training on the labeled batch and
    # on the mixed batch in separate passes (segkc.py)
    "segkc": [("fwd", U, "senior"), ("fwd", U, "net"), ("train", L, "senior"), ("train", U, "senior"),
              ("train", L, "net"), ("train", U, "net")],
}
SENIOR = {"efficientnet_lite0": "efficientnet_lite2", "resnet18": "resnet50"}  # SegKC's heavier partner here


def method_flags(method: str, backbone: str) -> list:
    """Every loss switched on from the first iterations: GTA-Seg's supervised-only first epoch lasts one
    iteration, CTT's contrastive losses start at iteration 1 instead of when the banks are full."""
    if method == "segkc":
        return ["--junior-backbone", backbone, "--senior-backbone", SENIOR[backbone]]
    extra = {"gta_seg": ["--iters-per-epoch", "1"], "ctt": ["--contrast-after", "1"]}.get(method, [])
    return ["--backbone", backbone, *extra]


def peak_rss_mb() -> float:
    """Highest resident set size of this process so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


class IsolatedPasses:
    """The required passes of one method on networks of their own and fixed random inputs (own generator:
    the method's RNG streams are untouched). `__call__` runs each distinct pass once and returns the seconds
    of the whole list (a pass listed twice counts twice)."""

    def __init__(self, passes, backbone, num_classes):
        with torch.random.fork_rng(devices=[]):
            self.nets = {which: common.build_model(backbone if which == "net" else SENIOR[backbone], num_classes,
                                                   "none", 16, 64).train() for which in {w for _, _, w in passes}}
        self.optimizers = {w: torch.optim.SGD(n.parameters(), lr=1e-9, momentum=0.9) for w, n in self.nets.items()}
        generator = torch.Generator().manual_seed(0)
        self.inputs = {n: (torch.randn(n, 3, 128, 128, generator=generator),
                           torch.randint(0, num_classes, (n, 128, 128), generator=generator)) for _, n, _ in passes}
        self.counts = collections.Counter(passes)

    def __call__(self) -> float:
        total = 0.0
        for (kind, n, which), count in self.counts.items():
            net, (x, y) = self.nets[which], self.inputs[n]
            start = time.perf_counter()
            if kind == "fwd":
                with torch.no_grad():
                    net(x)
            else:
                torch.nn.functional.cross_entropy(net(x), y).backward()
                self.optimizers[which].step()
                self.optimizers[which].zero_grad(set_to_none=True)
            total += count * (time.perf_counter() - start)
        return total


def run_inside(method: str, backbone: str, num_classes: int, argv: list, warmup: int) -> None:
    """Run METHOD's main(argv) in this process with a timer around every network pass (forward of a
    DeepLabV3Plus, Tensor.backward, SGD.step; a pass inside a pass counts once) and, from the end of the
    warm-up on, the method's required passes in isolation right after every iteration (at LossMeter.update,
    outside the iteration's own time). Writes OUT/passes.json: per timed iteration its seconds, the seconds
    of its own passes, of the isolated required passes, and the peak memory at the end of the warm-up."""
    import functools
    import importlib.util
    rows, spans, depth, state = [], [], [0], {"done": 0, "start": 0.0, "isolated": None, "peak": 0.0}

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0], start = 1, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans.append((start, time.perf_counter()))
                depth[0] = 0
        return wrapper

    def isolated_passes():
        depth[0] = 1  # not the method's own passes
        seconds = state["isolated"]()
        depth[0] = 0
        return seconds

    common.DeepLabV3Plus.forward = timed(common.DeepLabV3Plus.forward)
    torch.Tensor.backward = timed(torch.Tensor.backward)
    torch.optim.SGD.step = timed(torch.optim.SGD.step)
    update = common.LossMeter.update

    def update_and_time_passes(self, **terms):  # the end of one iteration of the method
        update(self, **terms)
        end, start = time.perf_counter(), state["start"]
        state["done"] += 1
        if state["isolated"] is not None:
            rows.append(dict(iteration=end - start, in_run=sum(min(e, end) - s for s, e in spans if s >= start),
                             isolated=isolated_passes()))
        elif state["done"] == warmup:
            state["peak"], state["isolated"] = peak_rss_mb(), IsolatedPasses(PASSES[method], backbone, num_classes)
            isolated_passes()  # their own warm-up
        spans.clear()
        state["start"] = time.perf_counter()
    common.LossMeter.update = update_and_time_passes
    spec = importlib.util.spec_from_file_location(method, ROOT / "methods" / f"{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)
    out = Path(argv[argv.index("--out") + 1])
    (out / "passes.json").write_text(json.dumps({"iterations": rows, "peak_rss_mb": state["peak"]}))


def time_iteration(method, backbone, num_classes, dataset_flags, warmup, iters, workers):
    """Per-iteration medians: seconds, overhead (iteration / isolated required passes right after it) with its
    interquartile range, the share of the iteration inside its own passes; the required seconds; peak memory."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--inside", method, backbone,
               str(num_classes), str(warmup), "--", *dataset_flags, *method_flags(method, backbone),
               "--pretrained", "none", "--decoder-channels", "64", "--crop-size", "128", "128", "--batch-size", str(L),
               "--unlabeled-batch-size", str(U), "--iters", str(warmup + iters), "--eval-every",
               str(warmup + iters), "--log-every", "1", "--num-overlays", "0", "--num-workers", str(workers),
               "--out", out, "--resume", "none"]
        result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{method} failed: {result.stderr[-2000:]}")
        inside = json.loads((Path(out) / "passes.json").read_text())
    rows = inside["iterations"]

    def median(values, q=0.5):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]
    ratios = [r["iteration"] / r["isolated"] for r in rows]
    return dict(sec_per_iter=median(r["iteration"] for r in rows), sec_required=median(r["isolated"] for r in rows),
                overhead=median(ratios), spread=median(ratios, 0.75) - median(ratios, 0.25),
                share=median(r["in_run"] / r["iteration"] for r in rows), peak_rss_mb=inside["peak_rss_mb"],
                timed=len(rows))


def loader_rate(dataset_flags, method, workers, batches=40):
    """Iterations per second the labeled + unlabeled streams can deliver, after two epochs of warm-up (the
    image cache of every worker filled)."""
    from accelerate import Accelerator
    parser = base_parser("")
    args = resolve_args(parser, {}, "bench", [*dataset_flags, "--crop-size", "128", "128", "--iters", "1",
                                              "--batch-size", str(L), "--unlabeled-batch-size", str(U),
                                              "--num-workers", str(workers)])
    mean, std = common.normalization(args.backbone)
    data = build_data(args, Accelerator(), mean, std, need_unlabeled=method != "supervised")
    streams = [data.labeled_stream(0)] + ([data.unlabeled_stream(0)] if method != "supervised" else [])
    for _ in range(2 * max(data.labeled_epoch, data.unlabeled_epoch if method != "supervised" else 0)):
        for s in streams:
            next(s)
    t = time.perf_counter()
    for _ in range(batches):
        for s in streams:
            next(s)
    return batches / (time.perf_counter() - t)


def main():
    if sys.argv[1:2] == ["--inside"]:  # the timed run of one method (a subprocess of the benchmark)
        method, backbone, num_classes, warmup = sys.argv[2:6]
        return run_inside(method, backbone, int(num_classes), sys.argv[7:], int(warmup))
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--methods", nargs="+", default=list(PASSES))
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--dataset", choices=["camvid", "toy"], help="default: camvid if --data-root exists, else toy")
    parser.add_argument("--data-root", default="data/CamVid", help="the CamVid folder (README, 'Data layouts')")
    parser.add_argument("--json", default="results/benchmark.json")
    cli = parser.parse_args()
    if cli.warmup < 1 or cli.iters < 1:  # the isolated passes start at the end of the warm-up
        parser.error(f"--warmup and --iters must be at least 1, got {cli.warmup} and {cli.iters}")
    camvid = Path(cli.data_root).resolve()
    dataset = cli.dataset or ("camvid" if camvid.is_dir() else "toy")
    setting = ["--image-scale", "0.5", "--split", "1/8"] if dataset == "camvid" else []  # the published table's
    dataset_flags = ["--dataset", dataset] + (["--data-root", str(camvid)] if dataset == "camvid" else []) + setting
    num_classes = 11 if dataset == "camvid" else 5
    rows = []
    for method in cli.methods:
        if not (ROOT / "methods" / f"{method}.py").exists():
            print(f"skipping {method}: methods/{method}.py not found")
            continue
        rate = loader_rate(dataset_flags, method, cli.num_workers)
        for backbone in cli.backbones:
            row = time_iteration(method, backbone, num_classes, dataset_flags, cli.warmup, cli.iters, cli.num_workers)
            share = row.pop("share")
            rows.append(dict(method=method, backbone=backbone, passes=len(PASSES[method]), **row,
                             in_run_overhead=1 / share, outside=1 - share, loader_it_per_s=rate,
                             train_it_per_s=1 / row["sec_per_iter"]))
            print(f"{method:13s} {backbone:18s} iteration {row['sec_per_iter']:.3f}s required "
                  f"{row['sec_required']:.3f}s overhead {row['overhead']:.2f} in-run {1 / share:.2f} loader "
                  f"{rate:.1f} it/s", flush=True)
    lines = ["| method | backbone | passes | s/iter | required s | overhead | spread | in-run overhead | outside | "
             "loader it/s | train it/s | peak MB |", "| --- " * 12 + "|"]
    lines += [f"| {r['method']} | {r['backbone']} | {r['passes']} | {r['sec_per_iter']:.3f} | "
              f"{r['sec_required']:.3f} | {r['overhead']:.2f} | {r['spread']:.2f} | {r['in_run_overhead']:.2f} | "
              f"{100 * r['outside']:.0f}% | "
              f"{r['loader_it_per_s']:.1f} | {r['train_it_per_s']:.2f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    print("\n".join(lines))
    Path(cli.json).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.json).write_text(json.dumps({"config": {"labeled": L, "unlabeled": U, "crop": 128, "dataset":
                                                     dataset_flags[1], "flags": setting,
                                                     "threads": torch.get_num_threads()},
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
