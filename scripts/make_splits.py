"""Write the labeled / unlabeled lists of a split (exactly the one a method draws from --split/--seed) so it
can be inspected, shared and reused with --split-dir.

  python scripts/make_splits.py --dataset voc --data-root data/VOC2012 --split 1/8 --seed 0 \
      --out-dir splits/voc/classic_1-8_s0

Writes OUT_DIR/labeled.txt and OUT_DIR/unlabeled.txt, one key a line (VOC id, Cityscapes image path relative to
the root, CamVid file name, folder image stem, toy index); every method reads them back with `--split-dir OUT_DIR`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
from cli import description  # noqa: E402
from datasets import resolve_split, write_split  # noqa: E402

DEFAULT_ROOTS = {"voc": "data/VOC2012", "cityscapes": "data/cityscapes", "camvid": "data/CamVid", "toy": ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--dataset", choices=["voc", "cityscapes", "camvid", "toy", "folder"], required=True)
    parser.add_argument("--data-root", help="dataset folder (default as the method scripts)")
    parser.add_argument("--split", help="a fraction (1/8), a count (183) or 'full' (default: the methods' for the "
                                        "dataset: 1/8; CamVid 1/30; folder full)")
    parser.add_argument("--protocol", choices=["classic", "blender"], default="classic",
                        help="VOC only: classic (labels from the 1,464 fine images) or blender (from all 10,582)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", help="folder for labeled.txt / unlabeled.txt "
                                          "(default splits/<dataset>/<protocol>_<split>_s<seed>)")
    args = parser.parse_args(argv)
    if args.data_root is None and args.dataset == "folder":
        parser.error("--dataset folder needs --data-root")
    if args.data_root is None:
        args.data_root = DEFAULT_ROOTS[args.dataset]
    args.split = args.split or cli.DATASET_DEFAULTS[args.dataset]["split"]
    args.split_dir = None  # draw the split, do not read one
    if args.out_dir is None:
        tag = (f"{args.protocol}_" if args.dataset == "voc" else "") + args.split.replace("/", "-")
        args.out_dir = f"splits/{args.dataset}/{tag}_s{args.seed}"
    labeled, unlabeled, _ = resolve_split(args)
    out = Path(args.out_dir)
    write_split(out, labeled, unlabeled)
    print(f"{args.dataset} --split {args.split} (protocol {args.protocol}, seed {args.seed}): {len(labeled)} labeled, "
          f"{len(unlabeled)} unlabeled -> {out / 'labeled.txt'}, {out / 'unlabeled.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
