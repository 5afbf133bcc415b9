"""One markdown table of any set of run folders, and optionally their mIoU curves in one PNG.

  python scripts/summarize.py runs/*                            # prints the table
  python scripts/summarize.py runs/ctt_* runs/supervised_* --plot curves.png

Reads what every method script writes to its --out folder: args.json (method, dataset, split or --split-dir list, seed),
metrics.jsonl (one record per evaluation: iteration, miou) and train.jsonl (sec_per_iter, training seconds per
iteration with evaluations excluded). Last mIoU = the last evaluation, best = the highest evaluation (chosen on
val, so optimistic); s/iter = the median over train.jsonl, robust to the slow first iterations. Folders without
metrics.jsonl (not a run, or not evaluated yet) are listed as skipped on stderr.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import description  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                sys.exit(f"{path}: line {number} is not JSON ({error})")
    return records


def read_run(folder: Path) -> dict | None:
    """The table row of one run folder, with its mIoU curve; None when the folder holds no evaluation."""
    metrics = read_jsonl(folder / "metrics.jsonl")
    if not metrics:
        return None
    args = json.loads((folder / "args.json").read_text()) if (folder / "args.json").is_file() else {}
    speeds = [r["sec_per_iter"] for r in read_jsonl(folder / "train.jsonl") if "sec_per_iter" in r]
    split, listed = args.get("split", "?"), args.get("split_list")
    if isinstance(listed, dict):  # a --split-dir run: its list's name, label count and hash (args.json has all)
        split += f" ({listed.get('labels', '?')} labels, sha256 {str(listed.get('labeled_sha256', '?'))[:8]})"
    return {"run": folder.name, "method": args.get("method", "?"), "dataset": args.get("dataset", "?"),
            "split": split, "seed": args.get("seed", "?"), "iteration": metrics[-1]["iteration"],
            "last": metrics[-1]["miou"], "best": max(r["miou"] for r in metrics),
            "sec_per_iter": statistics.median(speeds) if speeds else None,
            "curve": [(r["iteration"], r["miou"]) for r in metrics]}


def table(runs: list[dict]) -> str:
    lines = ["| run | method | dataset | split | seed | iterations | last mIoU | best mIoU | median s/iter |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        speed = f"{r['sec_per_iter']:.3f}" if r["sec_per_iter"] is not None else "-"
        lines.append(f"| {r['run']} | {r['method']} | {r['dataset']} | {r['split']} | {r['seed']} | "
                     f"{r['iteration']} | {r['last']:.2f} | {r['best']:.2f} | {speed} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, r in enumerate(runs):
        iterations, mious = zip(*r["curve"])
        # the colour cycle has 10 colours: the next 10 runs get dashed lines, and so on
        ax.plot(iterations, mious, marker="o", markersize=3, linestyle=["-", "--", ":", "-."][i // 10 % 4],
                label=r["run"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("runs", nargs="+", help="run folders (the --out of method scripts)")
    parser.add_argument("--plot", help="also draw every run's mIoU over iterations into this PNG file")
    cli = parser.parse_args(argv)
    if cli.plot and not cli.plot.lower().endswith(".png"):
        sys.exit(f"--plot {cli.plot}: expected a .png file name")
    runs = []
    for folder in map(Path, cli.runs):
        run = read_run(folder) if folder.is_dir() else None
        if run is None:
            print(f"skipped {folder}: no metrics.jsonl with an evaluation in it", file=sys.stderr)
        else:
            runs.append(run)
    if not runs:
        sys.exit(f"no run folder with metrics.jsonl among the {len(cli.runs)} paths given "
                 "(expected the --out folders of method scripts)")
    print(table(runs))
    if cli.plot:
        Path(cli.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(runs, Path(cli.plot))
        print(f"mIoU curves: {cli.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
