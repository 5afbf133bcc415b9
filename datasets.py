"""Datasets, splits, augmentations and the per-step data streams shared by every method.

Layouts (what `--data-root` must hold; see README "Data"):
  voc        JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (SBD-merged, grayscale) and/or
             SegmentationClass/<id>.png (VOC palette PNGs), ImageSets/Segmentation/{train,val}.txt
             [, train_aug.txt]
  cityscapes leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png
  camvid     {train,val,test}/*.png and {trainannot,valannot,testannot}/*.png (SegNet layout; value 11 = void
             -> 255; test optional)
  folder     your own data: images/{train,val[,test]}/*, masks/{train,val[,test]}/<stem>.png, classes.txt
  toy        nothing: procedural scenes generated from the index

Determinism and resume: the sample seen by process `rank` at iteration t is a pure function of (--seed, t,
rank): the stream order is a per-epoch permutation drawn from the seed, and each sample's augmentation draws
come from a generator seeded by (seed, stream, position). So resuming at iteration t restarts the streams at
t without replaying the loader, and the number of loader workers does not change what is seen.
"""
from __future__ import annotations

import math
import re
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cli import parse_split

IGNORE_INDEX = 255

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
                  "bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
TOY_CLASSES = ["background", "disk", "box", "stripes", "triangle"]
TOY_PALETTE = [(40, 40, 40), (230, 60, 60), (60, 200, 60), (60, 90, 230), (230, 200, 40)]
TOY_SIZE, TOY_TRAIN, TOY_VAL, TOY_TEST = (64, 80), 240, 48, 24  # (H, W) of a toy scene, pool sizes


def voc_palette() -> list[tuple]:
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette[:21]


CLASSES = {"voc": (VOC_CLASSES, voc_palette()), "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
           "camvid": (CAMVID_CLASSES, CAMVID_PALETTE), "toy": (TOY_CLASSES, TOY_PALETTE)}  # folder: classes.txt

LAYOUTS = {
    "voc": "JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png or SegmentationClass/<id>.png (VOC's, or UniMatch's "
           "with the SBD masks), ImageSets/Segmentation/train.txt and val.txt [and train_aug.txt] (lines: ids, or "
           "UniMatch's path pairs)",
    "cityscapes": "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                  "gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (make them with scripts/prepare_cityscapes.py)",
    "camvid": "train/*.png, trainannot/*.png, val/*.png, valannot/*.png (SegNet's 11-class CamVid)",
    "folder": "images/train/*, images/val/* [, images/test/*] (.png, .jpg, ...), masks/train/<stem>.png for the "
              "labeled train images and masks/val/<stem>.png [masks/test/<stem>.png] for every val [test] image "
              "(single-channel class indices, 255 = ignore), classes.txt (one class name a line, optionally "
              "followed by R,G,B)",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Labeled counts of the standard protocols: fraction -> ceil(fraction x pool) reproduces all of them
# (classic 92/183/366/732/1464 of 1,464; blender 662/1323/2646/5291 of 10,582; Cityscapes 186/372/744/1488/100).


# ----------------------------------------------------------------------------------------------------------
# Listing the files and resolving splits
# ----------------------------------------------------------------------------------------------------------
def _require(path: Path, dataset: str, flag="--data-root") -> Path:
    if not path.exists():
        sys.exit(f"{flag}: {path} does not exist. --dataset {dataset} expects under --data-root: {LAYOUTS[dataset]}")
    return path


def _read_list(path: Path) -> list[str]:
    """The first token of each line of a list file: VOC's and U2PL's lines are bare ids (`2007_000032`,
    Haochen-Wang409/U2PL@05a8b1b u2pl/dataset/base.py:23-30 adds the folders), UniMatch's are path pairs
    (`JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png`, LiheYoung/UniMatch@77cf3bf
    splits/pascal/val.txt; LiheYoung/UniMatch@7292bac dataset/semi.py:35-36 splits the line at the space).
    Tolerates a missing final newline (UniMatch) and blank lines."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def list_voc(root: Path, protocol: str):
    _require(root / "JPEGImages", "voc")
    sets = _require(root / "ImageSets" / "Segmentation", "voc")
    aug, fine = root / "SegmentationClassAug", root / "SegmentationClass"
    if not aug.is_dir() and not fine.is_dir():
        _require(aug, "voc")

    def mask_of(i):
        return aug / f"{i}.png" if (aug / f"{i}.png").exists() else fine / f"{i}.png"

    def ids(name):  # a list file's ids, whether its lines are ids or UniMatch's path pairs
        return [Path(token).stem for token in _read_list(_require(sets / name, "voc"))]

    train_fine, val = ids("train.txt"), ids("val.txt")
    if (sets / "train_aug.txt").exists():
        pool = ids("train_aug.txt")
    else:
        # Every mask that is not a val mask. With SegmentationClassAug that is SBD's 10,582 train_aug masks;
        # without it, SegmentationClass is either VOC's own (1,464 train + 1,449 val masks: the fine train set)
        # or UniMatch's, which holds the SBD-merged masks (LiheYoung/UniMatch@0324f3d README.md, "Dataset").
        val_set = set(val)
        pool = sorted(p.stem for p in (aug if aug.is_dir() else fine).glob("*.png") if p.stem not in val_set)
        if not aug.is_dir() and set(pool) <= set(train_fine):
            print("warning: no SegmentationClassAug and no SBD masks in SegmentationClass: the training pool is "
                  "the fine train images only")
    entry = lambda i: (root / "JPEGImages" / f"{i}.jpg", mask_of(i), i)  # noqa: E731
    labeled_pool = train_fine if protocol == "classic" else pool
    return [entry(i) for i in pool], [entry(i) for i in labeled_pool], [entry(i) for i in val]


def list_cityscapes(root: Path):
    def entries(split):
        images = sorted(_require(root / "leftImg8bit" / split, "cityscapes").glob("*/*_leftImg8bit.png"))
        if not images:
            sys.exit(f"--data-root: no *_leftImg8bit.png under {root / 'leftImg8bit' / split}. Expected "
                     f"{LAYOUTS['cityscapes']}")
        return [(p, root / "gtFine" / split / p.parent.name / p.name.replace("leftImg8bit.png",
                                                                             "gtFine_labelTrainIds.png"),
                 str(p.relative_to(root))) for p in images]
    pool = entries("train")
    return pool, pool, entries("val")


def list_camvid(root: Path):
    def entries(split):
        images = sorted(_require(root / split, "camvid").glob("*.png"))
        _require(root / f"{split}annot", "camvid")
        return [(p, root / f"{split}annot" / p.name, p.name) for p in images]
    pool = entries("train")
    return pool, pool, entries("val")


def read_classes(root: Path) -> tuple[list[str], list[tuple]]:
    """Class names and colours of a folder dataset from DATA/classes.txt: line k names class k (mask value k),
    optionally followed by its colour as R,G,B ("road 128,64,128"); a class without one gets a fixed colour."""
    path = root / "classes.txt"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        sys.exit(f"--data-root: cannot read {path} ({getattr(error, 'strerror', None) or error}); --dataset folder "
                 f"expects {LAYOUTS['folder']}")
    while lines and not lines[-1].strip():
        lines.pop()
    names, palette = [], []
    for number, line in enumerate(lines, 1):
        words = line.split()
        colour = re.fullmatch(r"(\d+),(\d+),(\d+)", words[-1]) if len(words) > 1 else None
        if colour:
            words = words[:-1]
        if not words or (colour and max(map(int, colour.groups())) > 255) or (not colour and re.search(r"\d,", line)):
            sys.exit(f"{path}: line {number} is {line!r}: expected a class name, optionally followed by R,G,B "
                     f"(three integers 0-255)")
        names.append(" ".join(words))
        palette.append(tuple(map(int, colour.groups())) if colour else
                       tuple(np.random.default_rng([7, len(palette)]).integers(0, 256, 3).tolist()))
    if not 2 <= len(names) <= IGNORE_INDEX:
        sys.exit(f"{path}: {len(names)} classes: expected 2 to {IGNORE_INDEX} (mask values 0..K-1, {IGNORE_INDEX} "
                 f"= ignore)")
    return names, palette


def folder_entries(root: Path, split: str, masks_required: bool) -> list:
    """(image, mask or None, stem) of DATA/images/<split>, sorted; a mask is DATA/masks/<split>/<stem>.png. An
    image without a mask is unlabeled (train) or refused (val, test); so is a mask without an image (a naming
    mismatch) and two images of one stem."""
    folder, mask_folder = root / "images" / split, root / "masks" / split
    if not folder.is_dir():
        sys.exit(f"--data-root: {folder} does not exist. --dataset folder expects under --data-root: "
                 f"{LAYOUTS['folder']}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    by_stem = {}
    for path in images:
        if path.stem in by_stem:
            sys.exit(f"--data-root: {by_stem[path.stem]} and {path} share the name {path.stem!r} (one mask "
                     f"{path.stem}.png cannot belong to both); rename one")
        by_stem[path.stem] = path
    masks = {p.stem: p for p in mask_folder.glob("*.png")} if mask_folder.is_dir() else {}
    orphans = sorted(set(masks) - set(by_stem))
    if orphans:
        sys.exit(f"--data-root: {masks[orphans[0]]} has no image {folder}/{orphans[0]}.* ({len(orphans)} masks "
                 f"without an image); a mask is named after its image's stem")
    missing = [p for p in images if p.stem not in masks]
    if masks_required and missing:
        sys.exit(f"--data-root: {missing[0]} has no mask {mask_folder / (missing[0].stem + '.png')} ({len(missing)} "
                 f"{split} images without a mask); every {split} image needs one")
    return [(p, masks.get(p.stem), p.stem) for p in images]


def list_folder(root: Path):
    """Training pool: every image of images/train; labeled pool: those with a mask; val: images/val (the
    optional images/test: list_test)."""
    pool = folder_entries(root, "train", masks_required=False)
    if pool and all(e[1] is None for e in pool):
        sys.exit(f"--data-root: no image of {root / 'images' / 'train'} has a mask in {root / 'masks' / 'train'} "
                 f"(a mask is <image stem>.png): nothing to learn the classes from")
    return pool, [e for e in pool if e[1] is not None], folder_entries(root, "val", masks_required=True)


def list_toy():
    pool = [(None, None, i) for i in range(TOY_TRAIN)]
    return pool, pool, [(None, None, 100_000 + i) for i in range(TOY_VAL)]


def list_test(args) -> list:
    """The held-out split a run reports, where the dataset has one with public labels: CamVid's 233 test frames
    (SegNet's protocol; 171 of them from a sequence no other split holds), a toy test set, a folder dataset's
    images/test; [] for VOC and Cityscapes, whose test labels are not public (their papers report val). A CamVid
    or folder dataset without a test folder has none."""
    root = Path(args.data_root)
    if args.dataset == "camvid" and (root / "test").is_dir():
        _require(root / "testannot", "camvid")
        return [(p, root / "testannot" / p.name, p.name) for p in sorted((root / "test").glob("*.png"))]
    if args.dataset == "folder" and (root / "images" / "test").is_dir():
        return folder_entries(root, "test", masks_required=True)
    if args.dataset == "toy":
        return [(None, None, 200_000 + i) for i in range(TOY_TEST)]
    return []


def split_count(split: str, pool_size: int) -> int:
    """'full', a count ('183') or a fraction ('1/8' -> ceil(pool/8)); the syntax is cli.parse_split's, which
    the command line already checked."""
    try:
        value = parse_split(split)
    except ValueError as error:
        sys.exit(f"--split {split!r}: {error}")
    if value == "full":
        return pool_size
    count = math.ceil(value * pool_size) if isinstance(value, Fraction) else value
    if not 0 < count <= pool_size:
        sys.exit(f"--split {split}: {count} labeled images asked for, but the labeled pool has {pool_size}")
    return count


def _sequence(entry) -> str:
    return entry[2].split("_")[0]  # CamVid: 0001TP_006690.png -> 0001TP


def choose_labeled(labeled_pool: list, count: int, seed: int, draw: str = "random") -> list:
    """Deterministic labeled subset. draw 'random': uniform without replacement, as the field's split files are
    drawn; 'spread' (CamVid's video frames): spread over the video sequences in proportion to their length and
    evenly within each, so that no two labeled frames are neighbours."""
    rng = np.random.default_rng([seed, 7])
    if count == len(labeled_pool):
        return list(labeled_pool)
    if draw == "random":
        picked = rng.choice(len(labeled_pool), count, replace=False)
        return [labeled_pool[i] for i in sorted(picked)]
    groups: dict[str, list] = {}
    for e in labeled_pool:
        groups.setdefault(_sequence(e), []).append(e)
    names = sorted(groups)
    exact = [count * len(groups[n]) / len(labeled_pool) for n in names]
    quota = [int(x) for x in exact]
    for i in sorted(range(len(names)), key=lambda i: exact[i] - quota[i], reverse=True)[:count - sum(quota)]:
        quota[i] += 1
    chosen = []
    for name, k in zip(names, quota):
        frames, offset = groups[name], rng.uniform()
        chosen += [frames[int((j + offset) * len(frames) / k)] for j in range(k)]
    return chosen


def resolve_split(args):
    """(labeled entries, unlabeled entries, val entries); labeled and unlabeled are disjoint."""
    root = Path(args.data_root)
    if args.dataset == "voc":
        pool, labeled_pool, val = list_voc(root, args.protocol)
    elif args.dataset == "cityscapes":
        pool, labeled_pool, val = list_cityscapes(root)
    elif args.dataset == "camvid":
        pool, labeled_pool, val = list_camvid(root)
    elif args.dataset == "folder":
        pool, labeled_pool, val = list_folder(root)
    else:
        pool, labeled_pool, val = list_toy()
    for name, entries in (("training", labeled_pool), ("validation", val)):
        if not entries:
            sys.exit(f"--data-root {root}: no {name} images found; --dataset {args.dataset} expects "
                     f"{LAYOUTS[args.dataset]}")
    if args.split_dir:
        by_key = {_key(args.dataset, e[2]): e for e in pool}
        lists = []
        for name in ("labeled.txt", "unlabeled.txt"):
            path = Path(args.split_dir) / name
            if not path.is_file():
                sys.exit(f"--split-dir: {path} not found (expected labeled.txt and unlabeled.txt)")
            keys = [_key(args.dataset, line.split()[0]) for line in _read_list(path)]
            unknown = [k for k in keys if k not in by_key]
            if unknown:
                in_val = {_key(args.dataset, e[2]) for e in val} & set(unknown)
                sys.exit(f"--split-dir: {path} names {len(unknown)} images not in the training pool of "
                         f"--data-root {root}, e.g. {unknown[:3]}" + (f" ({len(in_val)} of them are val images)"
                                                                     if in_val else ""))
            lists.append([by_key[k] for k in keys])
        labeled, unlabeled = lists
        unmasked = [e[0] for e in labeled if e[1] is None and args.dataset != "toy"]
        if unmasked:
            sys.exit(f"--split-dir: {Path(args.split_dir) / 'labeled.txt'} names {len(unmasked)} images without a "
                     f"mask, e.g. {unmasked[0]}")
        if set(e[2] for e in labeled) & set(e[2] for e in unlabeled):
            sys.exit(f"--split-dir: labeled.txt and unlabeled.txt of {args.split_dir} overlap")
        return labeled, unlabeled, val
    draw = getattr(args, "labeled_draw", None) or ("spread" if args.dataset == "camvid" else "random")  # older runs
    labeled = choose_labeled(labeled_pool, split_count(args.split, len(labeled_pool)), args.seed, draw)
    taken = set(e[2] for e in labeled)
    return labeled, [e for e in pool if e[2] not in taken], val


def _key(dataset: str, token):
    """Normalise a split-file token (UniMatch's path, U2PL's bare id, or our own key) and an entry's key alike:
    the file's stem (Cityscapes: without _leftImg8bit), so `train/x.png`, `x.png` and `x` all name image x."""
    if dataset == "toy":
        return int(token)
    name = Path(str(token).replace("\\", "/")).name
    stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
    return stem.split("_leftImg8bit")[0] if dataset == "cityscapes" else stem


def write_split(path: Path, labeled: list, unlabeled: list) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "labeled.txt").write_text("".join(f"{e[2]}\n" for e in labeled))
    (path / "unlabeled.txt").write_text("".join(f"{e[2]}\n" for e in unlabeled))


# ----------------------------------------------------------------------------------------------------------
# Reading samples
# ----------------------------------------------------------------------------------------------------------
def toy_scene(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A procedural scene, a pure function of `index`: a textured background with 2-5 objects (disk, box,
    striped patch, triangle) whose colours overlap between classes, so shape and texture matter."""
    rng = np.random.default_rng([12345, index])
    h, w = TOY_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 140, 3)
    image = base + rng.uniform(-0.6, 0.6, 3) * (xx[..., None] + yy[..., None]) + rng.normal(0, 12, (h, w, 3))
    mask = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(1, 5))
        cy, cx, r = rng.uniform(8, h - 8), rng.uniform(8, w - 8), rng.uniform(6, 16)
        if cls == 1:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        elif cls == 2:
            region = (abs(yy - cy) < r * 0.8) & (abs(xx - cx) < r)
        elif cls == 3:
            region = (abs(yy - cy) < r * 0.7) & (abs(xx - cx) < r * 0.9)
        else:
            region = (yy > cy - r) & (yy < cy + r) & (abs(xx - cx) < (yy - cy + r) * 0.6)
        colour = np.array(TOY_PALETTE[cls], np.float32) * rng.uniform(0.6, 1.1) + rng.normal(0, 25, 3)
        texture = np.where((xx // 3) % 2 == 0, 35.0, -35.0)[..., None] if cls == 3 else 0.0
        obj = colour + texture + rng.normal(0, 10, (h, w, 3))
        image = np.where(region[..., None], obj, image)
        mask[region] = cls
    return np.clip(image, 0, 255).astype(np.uint8), mask


def require_8_bit(mode: str, path) -> None:
    """PIL's convert("RGB") clips 16- and 32-bit images at 255 (a bright photo turns white): refuse them."""
    if mode.startswith(("I", "F")):
        raise ValueError(f"image {path} has {mode} pixels (16 or 32 bits): expected 8-bit RGB, grayscale or "
                         f"palette; convert it to 8 bits first")


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            mode = img.mode
            image = None if mode.startswith(("I", "F")) else img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file missing: {path}") from None
    except Exception as error:
        raise ValueError(f"unreadable image {path}: {error}") from None
    require_8_bit(mode, path)
    return image


def read_mask(path: Path, dataset: str, num_classes: int) -> Image.Image:
    """Class-index mask (palette PNGs are read as indices, never converted to colours). Values other than
    0..K-1 and 255 are an error naming the file."""
    try:
        with Image.open(path) as img:
            mask = np.array(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file missing: {path}") from None
    except Exception as error:
        raise ValueError(f"unreadable mask {path}: {error}") from None
    if mask.ndim != 2:
        raise ValueError(f"mask {path} has shape {mask.shape}: expected a single-channel class-index PNG "
                         f"(grayscale or palette), not colours")
    if dataset == "camvid":
        mask = np.where(mask == 11, IGNORE_INDEX, mask)
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"mask {path} holds values {sorted(set(np.unique(mask[bad]).tolist()))[:10]} outside the "
                         f"{num_classes} classes (0..{num_classes - 1}) and {IGNORE_INDEX} (ignore)")
    return Image.fromarray(mask.astype(np.uint8))


def load_pair(entry, dataset: str, num_classes: int, scale: float, with_mask: bool):
    image_path, mask_path, key = entry
    if dataset == "toy":
        image, mask = toy_scene(key)
        image, mask = Image.fromarray(image), Image.fromarray(mask)
    else:
        image = read_image(image_path)
        mask = read_mask(mask_path, dataset, num_classes) if with_mask else None
        if mask is not None and mask.size != image.size:
            raise ValueError(f"size mismatch: image {image_path} is {image.size[0]}x{image.size[1]} but mask "
                             f"{mask_path} is {mask.size[0]}x{mask.size[1]} (W x H)")
    if scale != 1.0:
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.BILINEAR)
        mask = mask.resize(size, Image.NEAREST) if mask is not None else None
    return image, (mask if with_mask else None)


def _scan_cache_file() -> Path:
    import os
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semiseg-ref" / "checked_files.json"


def _read_scan_cache(cache_file: Path) -> dict:
    """The files that passed the check before: {key: [width, height]}. A cache that is not that (malformed JSON,
    a list, a value that is no size) is dropped with a one-line warning and rebuilt by this check."""
    import json
    try:
        checked = json.loads(cache_file.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        problem = f"unreadable ({error})"
    else:
        def is_size(value) -> bool:
            return isinstance(value, list) and len(value) == 2 and all(type(n) is int and n > 0 for n in value)

        if isinstance(checked, dict) and all(map(is_size, checked.values())):
            return checked
        problem = "not a JSON object of [width, height] sizes"
    print(f"warning: {cache_file}: {problem}; rebuilt from this check", file=sys.stderr)
    return {}


def check_files(with_mask: list, image_only: list, dataset: str, num_classes: int) -> None:
    """Start-up check of every file a run will read, so that a bad file stops the run before any training is
    lost: each image decoded in full (a truncated file opens, and fails only when its pixels are read), each
    mask's values (read_mask's rule: 0..K-1 and 255) and its size against its image's. Each file is decoded once:
    one that passed is remembered (by path, size in bytes and modification time; masks per dataset) in
    ~/.cache/semiseg-ref/checked_files.json. Any bad file stops the run with one line naming it.
    `--no-check-data` skips the check (files are then checked only when drawn)."""
    import json
    from concurrent.futures import ThreadPoolExecutor
    cache_file = _scan_cache_file()
    checked = _read_scan_cache(cache_file)

    def cache_key(kind: str, path: Path) -> str | None:
        stat = path.stat() if path.is_file() else None
        return f"{kind}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}" if stat else None

    def image_size(path: Path):
        key = cache_key("image", path)
        return key, tuple(checked[key]) if key in checked else read_image(path).size

    def check(entry_and_mask):
        (image_path, mask_path, _), mask_too = entry_and_mask
        image_key, size = image_size(image_path)
        passed = {image_key: list(size)}
        if mask_too:
            key = cache_key(f"{dataset}|{num_classes}", mask_path)  # the values passed for K classes
            mask_size = tuple(checked[key]) if key in checked else read_mask(mask_path, dataset, num_classes).size
            if mask_size != tuple(size):
                raise ValueError(f"size mismatch: image {image_path} is {size[0]}x{size[1]} but mask {mask_path} "
                                 f"is {mask_size[0]}x{mask_size[1]} (W x H)")
            passed[key] = list(mask_size)
        return passed

    jobs = [(e, True) for e in with_mask] + [(e, False) for e in image_only]
    with ThreadPoolExecutor(max_workers=4) as pool:  # decoding releases the GIL
        futures = [pool.submit(check, job) for job in jobs]
    errors, passed = [], {}
    for future in futures:
        try:
            passed.update(future.result())
        except (ValueError, FileNotFoundError) as error:
            errors.append(str(error))
    if passed.keys() - checked.keys():
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({**checked, **passed}))
            tmp.replace(cache_file)
        except OSError:
            pass  # the cache only saves time
    if errors:
        more = f" (and {len(errors) - 1} more bad files)" if len(errors) > 1 else ""
        sys.exit(f"--data-root: {errors[0]}{more}; fix the file or --no-check-data to train without checking")


# ----------------------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------------------
def weak_augment(image: Image.Image, mask: Image.Image | None, crop: tuple[int, int], rng: np.random.Generator,
                 scale_range=(0.5, 2.0), scale_rule: str = "uniform"):
    """Random rescale (long side x U(0.5, 2.0), aspect kept), pad to the crop (image 0, mask 255, valid False),
    random crop, horizontal flip p=0.5 (`LiheYoung/UniMatch@0324f3d dataset/semi.py:41-44`,
    dataset/transform.py:9-56). Returns uint8 image HxWx3, mask HxW, valid HxW.
    scale_rule 'u2pl': the factor is U[0.5, 1) or U[1, 2) with probability 1/2 each (mean 1.125, not 1.25), as in
    U2PL's and GTA-Seg's RandResize (Jin-Ying/GTA-Seg@534f10f gta/dataset/augmentation.py:190-194)."""
    w, h = image.size
    low, high = scale_range
    if scale_rule == "u2pl":
        low, high = (low, 1.0) if rng.uniform() < 0.5 else (1.0, high)
    long_side = int(max(h, w) * rng.uniform(low, high))
    if h > w:
        nh, nw = long_side, int(w * long_side / h + 0.5)
    else:
        nw, nh = long_side, int(h * long_side / w + 0.5)
    image = np.asarray(image.resize((nw, nh), Image.BILINEAR))
    mask = np.asarray(mask.resize((nw, nh), Image.NEAREST)) if mask is not None else np.zeros((nh, nw), np.uint8)
    ch, cw = crop
    ph, pw = max(ch - nh, 0), max(cw - nw, 0)
    valid = np.ones((nh, nw), bool)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        valid = np.pad(valid, ((0, ph), (0, pw)), constant_values=False)
    y, x = rng.integers(0, image.shape[0] - ch + 1), rng.integers(0, image.shape[1] - cw + 1)
    image, mask, valid = image[y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw], valid[y:y + ch, x:x + cw]
    if rng.uniform() < 0.5:
        image, mask, valid = image[:, ::-1], mask[:, ::-1], valid[:, ::-1]
    return image.copy(), mask.copy(), valid.copy()


def strong_photometric(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """UniMatch's strong view without CutMix, on a [3,H,W] float image in [0,1]: colour jitter (0.5, 0.5, 0.5,
    0.25) with p=0.8 in random order, grayscale p=0.2, Gaussian blur sigma U(0.1, 2.0) with p=0.5."""
    if rng.uniform() < 0.8:
        b, c, s, hue = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(-0.25, 0.25)
        ops = [lambda t: TF.adjust_brightness(t, b), lambda t: TF.adjust_contrast(t, c),
               lambda t: TF.adjust_saturation(t, s), lambda t: TF.adjust_hue(t, hue)]
        for i in rng.permutation(4):
            image = ops[i](image)
    if rng.uniform() < 0.2:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.uniform() < 0.5:
        sigma = rng.uniform(0.1, 2.0)
        k = 2 * math.ceil(3 * sigma) + 1
        image = TF.gaussian_blur(image, [k, k], [sigma, sigma])
    return image.clamp(0, 1)


def cutmix_box_mask(batch: int, height: int, width: int, p: float = 0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3),
                    device=None) -> torch.Tensor:
    """bool [B,H,W]: per image, with probability p, one box of area U(area) x H x W and aspect ratio U(ratio),
    fully inside the image; True = take the partner's pixels. UniMatch's obtain_cutmix_box
    (LiheYoung/UniMatch@0324f3d dataset/transform.py:66-84, square crops only) redraws ratio and corner until the
    box fits, which favours shapes that fit in more places; here one draw: the corner is uniform over the places
    the box fits, and a side longer than the crop (a thin box on a non-square crop) is cut to the crop."""
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    draws = torch.rand(batch, 5).tolist()
    for i, (u, a, r, y, x) in enumerate(draws):
        if u >= p:
            continue
        size = (area[0] + a * (area[1] - area[0])) * height * width
        aspect = ratio[0] + r * (ratio[1] - ratio[0])
        bw, bh = min(int(math.sqrt(size / aspect)), width), min(int(math.sqrt(size * aspect)), height)
        top, left = int(y * (height - bh + 1)), int(x * (width - bw + 1))
        mask[i, top:top + bh, left:left + bw] = True
    return mask


def classmix_mask(labels: torch.Tensor, round_up: bool = True, rng: np.random.Generator | None = None,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """bool [B,H,W]: per image, half of the n classes present in its (pseudo-)label map, chosen uniformly
    without replacement; True where the pixel belongs to a chosen class. round_up: ceil(n/2) as in the ClassMix
    paper (Olsson et al. 2021); False: floor(n/2) as Dual Teacher's released code (one class -> empty mask).
    Draws from `rng` (numpy) when given, else from torch's global generator."""
    masks = []
    for label in labels:
        classes = label.unique()
        classes = classes[classes != ignore_index]
        k = (len(classes) + 1) // 2 if round_up else len(classes) // 2
        if rng is None:
            pick = torch.randperm(len(classes), device=label.device)[:k]
        else:
            pick = torch.from_numpy(rng.choice(len(classes), k, replace=False)).to(label.device)
        masks.append(torch.isin(label, classes[pick]))
    return torch.stack(masks)


def mix(mask: torch.Tensor, partner: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Where mask is True take `partner`, else `base`; works for images [B,C,H,W] and labels [B,H,W] alike."""
    m = mask if mask.dim() == base.dim() else mask.unsqueeze(1)
    return torch.where(m, partner, base)


# ----------------------------------------------------------------------------------------------------------
# Datasets and per-step streams
# ----------------------------------------------------------------------------------------------------------
class SegmentationSet(torch.utils.data.Dataset):
    """kind 'labeled' -> image, mask; 'unlabeled' -> image (weak), image_strong, valid (False on padding),
    and never reads a mask; 'val' -> the whole (rescaled) image and its mask. Training items are fetched as
    (index, seed) pairs from StepBatchSampler."""

    def __init__(self, entries, kind, dataset, num_classes, crop, mean, std, image_scale=1.0, strong=True,
                 cache=False, scale_rule="uniform"):
        self.entries, self.kind, self.dataset, self.num_classes = entries, kind, dataset, num_classes
        self.scale_rule = scale_rule  # weak_augment's rescale rule (training sets only)
        self.strong = strong  # build the photometric strong view (methods that never use it skip the cost)
        # Decoded (and rescaled) images kept in this process's memory: PNG decoding is over half of a CamVid
        # sample's CPU cost, and on a 2-core machine the loader workers take it from the network's threads.
        # Each worker process fills its own copy; the augmentation draws are unchanged.
        self.cache = {} if cache else None
        self.crop, self.image_scale = tuple(crop), image_scale
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.entries)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if self.cache is not None and index in self.cache:
            image, mask = self.cache[index]
        else:
            image, mask = load_pair(self.entries[index], self.dataset, self.num_classes, self.image_scale,
                                    self.kind != "unlabeled")
            if self.cache is not None:
                self.cache[index] = (image, mask)
        if self.kind == "val":
            image = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
            return {"image": self.normalize(image), "mask": torch.from_numpy(np.array(mask)).long()}
        rng = np.random.default_rng(seed)
        image, mask, valid = weak_augment(image, mask, self.crop, rng, scale_rule=self.scale_rule)
        image = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        if self.kind == "labeled":
            return {"image": self.normalize(image), "mask": torch.from_numpy(mask).long()}
        sample = {"image": self.normalize(image), "valid": torch.from_numpy(valid), "index": index}
        if self.strong:
            sample["image_strong"] = self.normalize(strong_photometric(image, rng))
        return sample


class StepBatchSampler:
    """Infinite batches for one process, starting at iteration `start`. Epoch e is a permutation of the set
    drawn from (seed, stream, e), cut into global batches of B x W images (the leftover < B x W images are
    dropped, like drop_last, and differ from epoch to epoch); process r takes its B images of each global
    batch, so no image is repeated within an iteration. A set smaller than one global batch is streamed as a
    concatenation of permutations instead (the labeled loader 'cycles'; repeats are then unavoidable)."""

    def __init__(self, size, batch_size, rank, world, seed, stream, start):
        self.size, self.batch, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.stream, self.start = seed, stream, start
        self.steps_per_epoch = size // (batch_size * world)
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.size)}
        return self._perms[epoch]

    def _positions(self, step):
        """(epoch, offset) of each of this process's samples at `step`; the offset is the sample's unique
        position, which seeds its augmentation."""
        global_batch = self.batch * self.world
        if self.steps_per_epoch > 0:
            epoch, k = divmod(step, self.steps_per_epoch)
            first = k * global_batch + self.rank * self.batch
            return [(epoch, first + j, epoch * self.size + first + j) for j in range(self.batch)]
        first = (step * self.world + self.rank) * self.batch
        return [((p // self.size), p % self.size, p) for p in range(first, first + self.batch)]

    def __iter__(self):
        step = self.start
        while True:
            yield [(int(self._perm(e)[o]), [self.seed, self.stream, p]) for e, o, p in self._positions(step)]
            step += 1


# Loaders get their own torch.Generator: creating an iterator draws a seed from it, and that draw must not
# touch the global RNG that resume restores (nothing in our samples depends on it).
def _worker_init(_):
    torch.set_num_threads(1)  # workers only decode and augment; leave the cores to the network


def build_data(args, accelerator, mean, std, need_unlabeled=True, strong=True) -> SimpleNamespace:
    """Everything a method needs from the data: streams (labeled_stream(t), unlabeled_stream(t)), the val and
    test loaders (this process's shard; test_loader None where the dataset has no labeled test split), epoch
    lengths, class names, palette, denormalize, and `probe_set` (a fixed sample of unlabeled training images
    with their ground truth, for the pseudo-label probe only).
    strong=False: unlabeled samples come without the photometric strong view."""
    names, palette = read_classes(Path(args.data_root)) if args.dataset == "folder" else CLASSES[args.dataset]
    num_classes = len(names)
    labeled, unlabeled, val = resolve_split(args)
    if need_unlabeled and not unlabeled:
        sys.exit(f"--split {args.split}: no unlabeled images left for a semi-supervised method" + (
            f" (every image of {Path(args.data_root) / 'images' / 'train'} has a mask: add images without one, "
            f"or use a --split such as 1/8 to train on part of the labels)" if args.dataset == "folder" else ""))
    # the pseudo-label probe needs ground truth: the unlabeled images that have a mask
    probe_pool = [e for e in unlabeled if e[1] is not None] if args.dataset == "folder" else \
        unlabeled if args.dataset in ("camvid", "toy") else []
    probe_entries = probe_pool[:: max(1, len(probe_pool) // 32)][:32]
    test = list_test(args)
    if args.dataset != "toy" and getattr(args, "check_data", True) and accelerator.is_main_process:
        unlabeled_read = unlabeled if need_unlabeled else []
        check_files(labeled + val + test + probe_entries, [e for e in unlabeled_read if e not in probe_entries],
                    args.dataset, num_classes)
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()  # the others wait for the main process's check
    common = dict(dataset=args.dataset, num_classes=num_classes, crop=args.crop_size, mean=mean, std=std,
                  image_scale=args.image_scale, cache=bool(getattr(args, "cache_images", False)),
                  scale_rule=getattr(args, "scale_rule", "uniform"))
    labeled_set = SegmentationSet(labeled, "labeled", **common)
    unlabeled_set = SegmentationSet(unlabeled, "unlabeled", strong=strong, **common)
    val_set = SegmentationSet(val, "val", **common)
    test_set = SegmentationSet(test, "val", **common)
    probe_set = SegmentationSet(probe_entries, "val", **common)
    rank, world = accelerator.process_index, accelerator.num_processes
    pin = accelerator.device.type == "cuda"

    def loader(dataset, batch_size, stream, start):
        sampler = StepBatchSampler(len(dataset), batch_size, rank, world, args.seed, stream, start)
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                                pin_memory=pin, worker_init_fn=_worker_init,
                                                generator=torch.Generator()))

    val_batch = 1 if args.dataset in ("voc", "cityscapes", "folder") else 8  # sizes vary; Cityscapes is large

    def eval_loader(dataset):  # this process's shard: every image evaluated exactly once over the processes
        shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
        return torch.utils.data.DataLoader(shard, batch_size=val_batch, num_workers=min(args.num_workers, 2),
                                           worker_init_fn=_worker_init, generator=torch.Generator())
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return SimpleNamespace(
        num_classes=num_classes, class_names=names, palette=palette,
        # your own data: a class absent from val is reported as absent, not as IoU 0 in the mean (the field's
        # datasets keep their benchmarks' definition: every class counts)
        miou_over_present=args.dataset == "folder",
        labeled=labeled, unlabeled=unlabeled, labeled_set=labeled_set, unlabeled_set=unlabeled_set,
        val_set=val_set, val_loader=eval_loader(val_set), probe_set=probe_set,
        test_set=test_set, test_loader=eval_loader(test_set) if test else None,
        labeled_stream=lambda start: loader(labeled_set, args.batch_size, 1, start),
        unlabeled_stream=lambda start: loader(unlabeled_set, args.unlabeled_batch_size, 2, start),
        labeled_epoch=max(1, len(labeled) // (args.batch_size * world)),
        unlabeled_epoch=max(1, len(unlabeled) // (args.unlabeled_batch_size * world)) if unlabeled else 0,
        denormalize=lambda image: ((image * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8),
    )


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
