"""Make Cityscapes' *_gtFine_labelTrainIds.png (19 train ids, everything else 255) from the official
*_gtFine_labelIds.png, offline, with numpy + pillow only (the table of cityscapesScripts' labels.py).

  python scripts/prepare_cityscapes.py --root data/cityscapes [--splits train val] [--overwrite]

Reads   ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png
Writes  ROOT/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png next to it.
Idempotent: files already converted are skipped (--overwrite redoes them); every file is written to a temporary
name and renamed, so an interrupted run never leaves a half-written mask behind.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import description  # noqa: E402

# labelId -> trainId (cityscapesScripts/helpers/labels.py); every other id (void classes, license plate, ...)
# becomes 255 (ignore).
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IGNORE = 255
SUFFIX_IN, SUFFIX_OUT = "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"


def lookup_table() -> np.ndarray:
    table = np.full(256, IGNORE, np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        table[label_id] = train_id
    return table


def convert_array(label_ids: np.ndarray) -> np.ndarray:
    """uint8 trainId map of a labelId map (any integer dtype); ids outside 0..255 also become 255."""
    label_ids = np.asarray(label_ids)
    out = np.full(label_ids.shape, IGNORE, np.uint8)
    inside = (label_ids >= 0) & (label_ids < 256)
    out[inside] = lookup_table()[label_ids[inside].astype(np.int64)]
    return out


def convert_file(src: Path, dst: Path) -> None:
    try:
        with Image.open(src) as img:
            label_ids = np.array(img)
    except Exception as error:
        raise SystemExit(f"unreadable label file {src}: {error}") from None
    if label_ids.ndim != 2:
        raise SystemExit(f"{src} has shape {label_ids.shape}: expected a single-channel labelIds PNG "
                         f"(did you pass a *_gtFine_color.png?)")
    tmp = dst.with_name(dst.name + ".tmp")
    Image.fromarray(convert_array(label_ids)).save(tmp, format="PNG")
    os.replace(tmp, dst)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--root", required=True, help="Cityscapes folder holding gtFine/ (and leftImg8bit/)")
    parser.add_argument("--splits", nargs="+", help="sub-folders of gtFine to convert (default: all present, "
                                                    "e.g. train val test)")
    parser.add_argument("--overwrite", action="store_true", help="convert again files already converted")
    args = parser.parse_args(argv)

    root = Path(args.root)
    if not root.is_dir():
        sys.exit(f"--root: {root} does not exist (expected the Cityscapes folder with "
                 f"gtFine/<split>/<city>/*{SUFFIX_IN})")
    gt = root / "gtFine"
    if not gt.is_dir():
        sys.exit(f"--root: {gt} does not exist. Expected {root}/gtFine/<split>/<city>/*{SUFFIX_IN} "
                 f"(unzip gtFine_trainvaltest.zip into --root)")
    splits = args.splits or sorted(p.name for p in gt.iterdir() if p.is_dir())
    for split in splits:
        if not (gt / split).is_dir():
            sys.exit(f"--splits: {gt / split} does not exist (found: {sorted(p.name for p in gt.iterdir())})")
    sources = [p for split in splits for p in sorted((gt / split).glob(f"*/*{SUFFIX_IN}"))]
    if not sources:
        sys.exit(f"--root: no *{SUFFIX_IN} under {gt}/{{{','.join(splits)}}}/<city>/")
    done = skipped = 0
    for src in sources:
        dst = src.with_name(src.name[: -len(SUFFIX_IN)] + SUFFIX_OUT)
        if dst.exists() and not args.overwrite:
            skipped += 1
            continue
        convert_file(src, dst)
        done += 1
    print(f"converted {done} label files, skipped {skipped} already converted ({', '.join(splits)}) under {gt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
