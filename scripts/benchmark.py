"""Speed and memory of every method's training iteration against the network passes it really needs.

For each method and backbone, on one fixed small CPU configuration (crop 128x128, 4 labeled + 4 unlabeled
images per iteration, decoder 64 channels, CamVid if present else the toy dataset):
  - iteration: the method script itself, run through its command line; the median of the per-iteration
    seconds after a warm-up, evaluation excluded (OUT/train.jsonl, logged every iteration);
  - required passes: the network passes the method needs (PASSES below, read off each method file), each
    timed in isolation on the same batch sizes (median of repeats): a forward without gradient, or a
    forward + backward + SGD step; timed right before AND right after the iteration run, because the speed
    of a shared 2-core machine drifts by 10-30% over minutes: `drift` = their relative difference, a
    measure of how far the row can be trusted;
  - overhead ratio = iteration time / mean of the two sums of required passes (goal: <= 1.15);
  - in-run passes: the same iterations, with every network forward, backward and SGD step timed as it runs
    inside the script (timers wrapped around DeepLabV3Plus.forward, Tensor.backward and SGD.step);
    `outside` = the share of the iteration spent elsewhere (losses, EMA, banks, mixing, data, logging). It
    is immune to the machine's drift, which hits passes and iteration alike, so it is the figure that
    finds waste; the backward of the loss terms counts as a pass here;
  - loader: batches per second the data streams deliver (same workers) against what training consumes, at
    steady state (CamVid's decoded images are cached in the workers after their first epochs; the first
    epoch runs at about a third of this rate);
  - peak memory: the highest resident set size (VmHWM) of the training process.
Prints a markdown table and writes JSON.

  python scripts/benchmark.py [--methods supervised gta_seg ...] [--backbones efficientnet_lite0 resnet18]
  python scripts/benchmark.py --inside METHOD -- <method flags>   (one timed run; used by the above)
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402
from datasets import build_data  # noqa: E402

L, U = 4, 4  # labeled and unlabeled images per iteration
# The passes each iteration needs: (kind, images, network). kind 'fwd' = forward without gradient,
# 'train' = forward + backward + SGD step. 'senior' is SegKC's second architecture.
PASSES = {
    "supervised": [("train", L, "net")],
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
SENIOR = {"efficientnet_lite0": "resnet18", "resnet18": "resnet50"}  # SegKC's heavier partner in this benchmark


def method_flags(method: str, backbone: str) -> list:
    """Every loss switched on from the first iterations: GTA-Seg's supervised-only first epoch lasts one
    iteration, CTT's contrastive losses start at iteration 1 instead of when the banks are full."""
    if method == "segkc":
        return ["--junior-backbone", backbone, "--senior-backbone", SENIOR[backbone]]
    extra = {"gta_seg": ["--iters-per-epoch", "1"], "ctt": ["--contrast-after", "1"]}.get(method, [])
    return ["--backbone", backbone, *extra]


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_inside(method: str, argv: list) -> None:
    """Run METHOD's main(argv) in this process with a timer around every network pass (forward of a
    DeepLabV3Plus, Tensor.backward, SGD.step; a pass inside a pass counts once) and a mark at the end of each
    iteration (LossMeter.update). Writes OUT/passes.json: per iteration, the seconds spent in passes."""
    import functools
    import importlib.util
    marks, spans, depth = [], [], [0]

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

    common.DeepLabV3Plus.forward = timed(common.DeepLabV3Plus.forward)
    torch.Tensor.backward = timed(torch.Tensor.backward)
    torch.optim.SGD.step = timed(torch.optim.SGD.step)
    update = common.LossMeter.update

    def update_and_mark(self, **terms):
        update(self, **terms)
        marks.append(time.perf_counter())
    common.LossMeter.update = update_and_mark
    spec = importlib.util.spec_from_file_location(method, ROOT / "methods" / f"{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)
    out = Path(argv[argv.index("--out") + 1])
    per_iteration = [sum(min(e, b) - s for s, e in spans if a <= s < b) for a, b in zip(marks, marks[1:])]
    (out / "passes.json").write_text(json.dumps({"iteration_seconds": [b - a for a, b in zip(marks, marks[1:])],
                                                 "pass_seconds": per_iteration}))


def time_iteration(method, backbone, dataset_flags, warmup, iters, workers):
    """Median seconds per iteration (train.jsonl), median in-run pass seconds, peak memory."""
    with tempfile.TemporaryDirectory() as out:
        total = warmup + iters
        cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--inside", method, "--",
               *dataset_flags, *method_flags(method, backbone),
               "--pretrained", "none", "--decoder-channels", "64", "--crop-size", "128", "128", "--batch-size", str(L),
               "--unlabeled-batch-size", str(U), "--iters", str(total), "--eval-every", str(total), "--log-every",
               "1", "--num-overlays", "0", "--num-workers", str(workers), "--out", out, "--resume", "none"]
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, peak_rss_mb(process.pid))
            time.sleep(0.2)
        if process.returncode != 0:
            raise RuntimeError(f"{method} failed: {process.stderr.read()[-2000:]}")
        records = [json.loads(x) for x in (Path(out) / "train.jsonl").read_text().splitlines()]
        timed = sorted(r["sec_per_iter"] for r in records if r["iteration"] > warmup)
        inside = json.loads((Path(out) / "passes.json").read_text())  # entry j = iteration j + 2
        shares = sorted(p / t for p, t in zip(inside["pass_seconds"][warmup - 1:],
                                              inside["iteration_seconds"][warmup - 1:]))
        return timed[len(timed) // 2], shares[len(shares) // 2], peak


def time_passes(passes, backbone, num_classes, repeats=7):
    """Seconds of each kind of pass, in isolation, on random inputs of the benchmark's size."""
    nets = {"net": common.build_model(backbone, num_classes, "none", 16, 64),
            "senior": common.build_model(SENIOR[backbone], num_classes, "none", 16, 64)}
    cache, total = {}, 0.0
    for kind, n, which in passes:
        key = (kind, n, which)
        if key not in cache:
            net = nets[which].train()
            opt = torch.optim.SGD(net.parameters(), lr=1e-9, momentum=0.9)
            x = torch.randn(n, 3, 128, 128)
            y = torch.randint(0, num_classes, (n, 128, 128))
            times = []
            for r in range(repeats + 1):
                t = time.perf_counter()
                if kind == "fwd":
                    with torch.no_grad():
                        net(x)
                else:
                    torch.nn.functional.cross_entropy(net(x), y).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if r:
                    times.append(time.perf_counter() - t)
            cache[key] = sorted(times)[len(times) // 2]
        total += cache[key]
    return total


def loader_rate(dataset_flags, method, workers, batches=40):
    """Iterations per second the labeled + unlabeled streams can deliver, after two epochs of warm-up (the
    image cache of every worker filled)."""
    from accelerate import Accelerator
    parser = common.base_parser("")
    args = common.resolve_args(parser, {}, "bench", [*dataset_flags, "--crop-size", "128", "128", "--iters", "1",
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
        return run_inside(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(PASSES))
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--dataset", choices=["camvid", "toy"], help="default: camvid if ../shared has it")
    parser.add_argument("--json", default="results/benchmark.json")
    cli = parser.parse_args()
    camvid = ROOT.parent / "shared" / "data" / "camvid"
    dataset = cli.dataset or ("camvid" if camvid.is_dir() else "toy")
    dataset_flags = ["--dataset", "camvid", "--data-root", str(camvid)] if dataset == "camvid" else ["--dataset", "toy"]
    num_classes = 11 if dataset == "camvid" else 5
    rows = []
    for method in cli.methods:
        if not (ROOT / "methods" / f"{method}.py").exists():
            print(f"skipping {method}: methods/{method}.py not found")
            continue
        rate = loader_rate(dataset_flags, method, cli.num_workers)
        for backbone in cli.backbones:
            before = time_passes(PASSES[method], backbone, num_classes)
            iteration, share, peak = time_iteration(method, backbone, dataset_flags, cli.warmup, cli.iters, cli.num_workers)
            after = time_passes(PASSES[method], backbone, num_classes)
            required, drift = (before + after) / 2, abs(after - before) / ((before + after) / 2)
            rows.append(dict(method=method, backbone=backbone, passes=len(PASSES[method]), sec_per_iter=iteration,
                             sec_required=required, required_before=before, required_after=after, drift=drift,
                             overhead=iteration / required, in_run_overhead=1 / share, outside=1 - share,
                             loader_it_per_s=rate, train_it_per_s=1 / iteration,
                             peak_rss_mb=peak))
            print(f"{method:13s} {backbone:18s} iteration {iteration:.3f}s required {before:.3f}/{after:.3f}s "
                  f"overhead {iteration / required:.2f} in-run {1 / share:.2f} loader {rate:.1f} it/s peak {peak:.0f} MB", flush=True)
    lines = ["| method | backbone | passes | s/iter | required s | drift | overhead | in-run overhead | outside | "
             "loader it/s | train it/s | peak MB |", "| --- " * 12 + "|"]
    lines += [f"| {r['method']} | {r['backbone']} | {r['passes']} | {r['sec_per_iter']:.3f} | {r['sec_required']:.3f} | "
              f"{100 * r['drift']:.0f}% | {r['overhead']:.2f} | {r['in_run_overhead']:.2f} | {100 * r['outside']:.0f}% | "
              f"{r['loader_it_per_s']:.1f} | {r['train_it_per_s']:.2f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    print("\n".join(lines))
    Path(cli.json).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.json).write_text(json.dumps({"config": {"labeled": L, "unlabeled": U, "crop": 128, "dataset":
                                                     dataset_flags[1], "threads": torch.get_num_threads()},
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
