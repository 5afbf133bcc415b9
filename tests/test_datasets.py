"""Unit tests of datasets.py, scripts/prepare_cityscapes.py and scripts/make_splits.py: split counts and
determinism, loaders on miniature on-disk trees (VOC, Cityscapes, CamVid), split files, bad-input errors,
augmentation alignment, mixing masks, the per-step sampler and the toy dataset. Tiny inputs only."""
import importlib.util
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import datasets
from conftest import ROOT

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # identity normalisation: items hold the [0,1] image


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_cityscapes = _load_script("prepare_cityscapes")
make_splits = _load_script("make_splits")


def split_args(dataset, root, split="1/8", protocol="classic", seed=0, split_dir=None):
    return SimpleNamespace(dataset=dataset, data_root=str(root), split=split, protocol=protocol, seed=seed,
                           split_dir=None if split_dir is None else str(split_dir))


def keys(entries):
    return [e[2] for e in entries]


def val_item(entry, dataset, num_classes, scale=1.0):
    return datasets.SegmentationSet([entry], "val", dataset, num_classes, (8, 8), MEAN, STD, scale)[0]


# ----------------------------------------------------------------------------------------------------------
# Miniature trees (list-only trees for counts; real files for loading)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voc_lists(tmp_path_factory):
    """Only the lists of a full VOC tree: 1,464 fine train ids inside 10,582 train_aug ids, 3 val ids."""
    root = tmp_path_factory.mktemp("voc_lists")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClassAug").mkdir()
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    fine = [f"2007_{i:06d}" for i in range(1464)]
    aug = fine + [f"2008_{i:06d}" for i in range(10582 - 1464)]
    (sets / "train.txt").write_text("\n".join(fine) + "\n")
    (sets / "train_aug.txt").write_text("\n".join(aug))  # no final newline (as UniMatch's lists)
    (sets / "val.txt").write_text("2009_000001\n2009_000002\n2009_000003\n")
    return root


@pytest.fixture(scope="module")
def cityscapes_lists(tmp_path_factory):
    """2,975 empty train images over 3 cities and 2 val images (listing never opens them)."""
    root = tmp_path_factory.mktemp("cs_lists")
    for split, n in (("train", 2975), ("val", 2)):
        for i in range(n):
            city = ["aachen", "bochum", "zurich"][i % 3]
            folder = root / "leftImg8bit" / split / city
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{city}_{i:06d}_000019_leftImg8bit.png").touch()
    return root


CAMVID_SEQUENCES = {"0001TP": 62, "0006R0": 101, "0016E5": 204}  # the real train set: 367 frames


@pytest.fixture(scope="module")
def camvid_lists(tmp_path_factory):
    root = tmp_path_factory.mktemp("camvid_lists")
    for d in ("train", "trainannot", "val", "valannot"):
        (root / d).mkdir()
    for seq, n in CAMVID_SEQUENCES.items():
        for i in range(n):
            (root / "train" / f"{seq}_{i * 30:06d}.png").touch()
    (root / "val" / "0016E5_099999.png").touch()
    return root


def _voc_mask(i, h=12, w=16, hi=20):
    mask = np.zeros((h, w), np.uint8)
    mask[2:8, 3 + i: 9 + i] = (i % hi) + 1
    mask[0, :] = 255
    return mask


def _save_palette(mask, path):
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    palette = [c for rgb in datasets.voc_palette() for c in rgb]
    palette += [0] * (768 - len(palette))
    palette[255 * 3: 256 * 3] = [224, 224, 192]
    img.putpalette(palette)
    img.save(path)


def _rgb(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


VOC_TRAIN = ["2007_000032", "2007_000039", "2007_000063"]
VOC_VAL = ["2007_000121", "2007_000123"]
VOC_SBD = ["2008_000002", "2008_000003"]


@pytest.fixture
def voc_tree(tmp_path):
    """Real files in VOC's layout: JPEGs, palette PNGs in SegmentationClass (train + val), grayscale
    SegmentationClassAug (train + val + SBD-only ids) whose class differs from the fine mask."""
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for n, i in enumerate(VOC_TRAIN + VOC_VAL + VOC_SBD):
        _rgb(12, 16, n).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(_voc_mask(n)).save(root / "SegmentationClassAug" / f"{i}.png")
        if i not in VOC_SBD:
            _save_palette(_voc_mask(n + 5), root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL))
    return root


# ----------------------------------------------------------------------------------------------------------
# Split counts, determinism, errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol,count", [("classic", 183), ("blender", 1323)])
def test_voc_split_counts(voc_lists, protocol, count):
    labeled, unlabeled, val = datasets.resolve_split(split_args("voc", voc_lists, "1/8", protocol))
    assert len(labeled) == count
    assert len(labeled) + len(unlabeled) == 10582
    assert len(val) == 3
    if protocol == "classic":
        assert all(k.startswith("2007_") for k in keys(labeled)), "classic labels come from the 1,464 fine images"
    else:
        assert sum(k.startswith("2008_") for k in keys(labeled)) > 1000, "blender labels come from all 10,582"


@pytest.mark.parametrize("split,pool,count", [("1/16", 1464, 92), ("1/8", 1464, 183), ("1/4", 1464, 366),
                                              ("1/2", 1464, 732), ("full", 1464, 1464), ("183", 1464, 183),
                                              ("1/16", 10582, 662), ("1/4", 10582, 2646), ("1/2", 10582, 5291),
                                              ("1/16", 2975, 186), ("1/4", 2975, 744), ("1/2", 2975, 1488),
                                              ("1/30", 2975, 100), ("1/8", 367, 46)])
def test_split_count_reproduces_the_standard_protocols(split, pool, count):
    assert datasets.split_count(split, pool) == count


@pytest.mark.parametrize("split,count", [("1/16", 186), ("1/8", 372), ("1/30", 100), ("full", 2975)])
def test_cityscapes_split_counts(cityscapes_lists, split, count):
    labeled, unlabeled, val = datasets.resolve_split(split_args("cityscapes", cityscapes_lists, split))
    assert len(labeled) == count and len(labeled) + len(unlabeled) == 2975 and len(val) == 2
    assert keys(labeled)[0].startswith("leftImg8bit/train/")


def test_camvid_split_spread_over_sequences(camvid_lists):
    labeled, unlabeled, _ = datasets.resolve_split(split_args("camvid", camvid_lists, "1/8"))
    assert len(labeled) == 46 and len(unlabeled) == 367 - 46
    assert len(set(keys(labeled))) == 46
    for seq, n in CAMVID_SEQUENCES.items():
        frames = sorted(int(k.split("_")[1][:-4]) // 30 for k in keys(labeled) if k.startswith(seq))
        assert abs(len(frames) - 46 * n / 367) < 1, (seq, len(frames))
        gaps = np.diff(frames)
        step = n / len(frames)
        assert gaps.min() >= math.floor(step) - 1 and gaps.max() <= math.ceil(step) + 1, (seq, gaps)


@pytest.mark.parametrize("dataset,fixture", [("voc", "voc_lists"), ("cityscapes", "cityscapes_lists"),
                                             ("camvid", "camvid_lists")])
def test_split_determinism_disjoint_and_cover(request, dataset, fixture):
    root = request.getfixturevalue(fixture)
    a = datasets.resolve_split(split_args(dataset, root, "1/8", seed=0))
    b = datasets.resolve_split(split_args(dataset, root, "1/8", seed=0))
    c = datasets.resolve_split(split_args(dataset, root, "1/8", seed=1))
    assert keys(a[0]) == keys(b[0]) and keys(a[1]) == keys(b[1])
    assert keys(a[0]) != keys(c[0])
    pool = {"voc": 10582, "cityscapes": 2975, "camvid": 367}[dataset]
    for labeled, unlabeled, _ in (a, c):
        assert not set(keys(labeled)) & set(keys(unlabeled))
        assert len(set(keys(labeled)) | set(keys(unlabeled))) == pool == len(labeled) + len(unlabeled)


@pytest.mark.parametrize("split", ["abc", "0", "2/1", "1/0", "-3", "0/8", "1/8/2", ""])
def test_bad_split_exits_naming_flag(split):
    with pytest.raises(SystemExit) as error:
        datasets.split_count(split, 1464)
    assert "--split" in str(error.value.code)


def test_bad_or_too_large_split_through_resolve_split(voc_lists):
    with pytest.raises(SystemExit) as error:
        datasets.resolve_split(split_args("voc", voc_lists, "abc"))
    assert "--split 'abc'" in str(error.value.code)
    with pytest.raises(SystemExit) as error:  # 1,465 labels but the classic pool has 1,464
        datasets.resolve_split(split_args("voc", voc_lists, "1465", "classic"))
    message = str(error.value.code)
    assert "--split 1465" in message and "1464" in message
    with pytest.raises(SystemExit) as error:
        datasets.split_count("10583", 10582)
    assert "--split" in str(error.value.code) and "10582" in str(error.value.code)


# ----------------------------------------------------------------------------------------------------------
# Split files: make_splits.py round trip, UniMatch and U2PL formats
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,fixture,split", [("voc", "voc_lists", "1/16"),
                                                   ("cityscapes", "cityscapes_lists", "1/30"),
                                                   ("camvid", "camvid_lists", "1/8"), ("toy", None, "1/8")])
def test_make_splits_round_trip(request, tmp_path, capsys, dataset, fixture, split):
    root = request.getfixturevalue(fixture) if fixture else ""
    out = tmp_path / "split"
    make_splits.main(["--dataset", dataset, "--data-root", str(root), "--split", split, "--seed", "3",
                      "--out-dir", str(out)])
    assert "labeled" in capsys.readouterr().out
    drawn = datasets.resolve_split(split_args(dataset, root, split, seed=3))
    read = datasets.resolve_split(split_args(dataset, root, "ignored", seed=99, split_dir=out))
    assert keys(read[0]) == keys(drawn[0]) and keys(read[1]) == keys(drawn[1])
    assert read[0] == drawn[0]  # the same (image, mask, key) entries


def test_make_splits_without_split_writes_the_split_a_method_draws_without_one(camvid_lists, tmp_path):
    """CamVid's default share is the protocol's 1/30 (13 of 367 labels), not the field's 1/8: make_splits follows
    the method scripts' default, so its files are the labels a run without --split trains on."""
    import importlib
    args = importlib.import_module("methods.supervised").parse_args(["--dataset", "camvid", "--data-root",
                                                                     str(camvid_lists), "--seed", "3"])
    make_splits.main(["--dataset", "camvid", "--data-root", str(camvid_lists), "--seed", "3", "--out-dir",
                      str(tmp_path / "split")])
    labeled = (tmp_path / "split" / "labeled.txt").read_text().splitlines()
    drawn = datasets.resolve_split(split_args("camvid", camvid_lists, args.split, seed=3))[0]
    assert args.split == "1/30" and len(labeled) == len(drawn) == 13
    assert keys(datasets.resolve_split(split_args("camvid", camvid_lists, "x", seed=9,
                                                  split_dir=tmp_path / "split"))[0]) == keys(drawn)


def test_make_splits_blender_and_missing_root(voc_lists, tmp_path):
    make_splits.main(["--dataset", "voc", "--data-root", str(voc_lists), "--split", "1/8", "--protocol", "blender",
                      "--out-dir", str(tmp_path / "b")])
    assert len((tmp_path / "b" / "labeled.txt").read_text().splitlines()) == 1323
    assert len((tmp_path / "b" / "unlabeled.txt").read_text().splitlines()) == 10582 - 1323
    with pytest.raises(SystemExit) as error:
        make_splits.main(["--dataset", "voc", "--data-root", str(tmp_path / "none"), "--out-dir", str(tmp_path / "x")])
    assert "--data-root" in str(error.value.code)


def test_split_dir_voc_unimatch_and_u2pl_formats(voc_tree, tmp_path):
    unimatch, u2pl = tmp_path / "unimatch", tmp_path / "u2pl"
    unimatch.mkdir(), u2pl.mkdir()
    lab, unl = VOC_TRAIN[:1], VOC_TRAIN[1:] + VOC_SBD
    (unimatch / "labeled.txt").write_text("\n".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in lab))
    (unimatch / "unlabeled.txt").write_text("\n".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in unl))
    (u2pl / "labeled.txt").write_text("\n".join(lab) + "\n\n")
    (u2pl / "unlabeled.txt").write_text("\n".join(unl))  # no final newline
    for folder in (unimatch, u2pl):
        labeled, unlabeled, val = datasets.resolve_split(split_args("voc", voc_tree, split_dir=folder))
        assert keys(labeled) == lab and keys(unlabeled) == unl and keys(val) == VOC_VAL
        assert labeled[0][0] == voc_tree / "JPEGImages" / f"{lab[0]}.jpg"


def test_split_dir_cityscapes_and_camvid_formats(cityscapes_lists, camvid_lists, tmp_path):
    pool = keys(datasets.list_cityscapes(cityscapes_lists)[0])
    lab, unl = pool[:2], pool[2:]
    def gt(p):
        return p.replace("leftImg8bit/", "gtFine/", 1).replace("leftImg8bit.png", "gtFine_labelTrainIds.png")
    for name, fmt in (("unimatch", lambda p: f"{p} {gt(p)}"), ("u2pl", lambda p: p)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "labeled.txt").write_text("\n".join(fmt(p) for p in lab))
        (folder / "unlabeled.txt").write_text("\n".join(fmt(p) for p in unl) + "\n")
        labeled, unlabeled, _ = datasets.resolve_split(split_args("cityscapes", cityscapes_lists, split_dir=folder))
        assert keys(labeled) == lab and keys(unlabeled) == unl
    pool = keys(datasets.list_camvid(camvid_lists)[0])
    folder = tmp_path / "camvid"
    folder.mkdir()
    (folder / "labeled.txt").write_text("\n".join(f"/SegNet/CamVid/train/{k} /SegNet/CamVid/trainannot/{k}"
                                                  for k in pool[:3]))
    (folder / "unlabeled.txt").write_text("\n".join(pool[3:]))
    labeled, unlabeled, _ = datasets.resolve_split(split_args("camvid", camvid_lists, split_dir=folder))
    assert keys(labeled) == pool[:3] and keys(unlabeled) == pool[3:]


def test_split_dir_errors(voc_tree, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "labeled.txt").write_text(VOC_TRAIN[0])
    with pytest.raises(SystemExit) as error:  # unlabeled.txt missing
        datasets.resolve_split(split_args("voc", voc_tree, split_dir=folder))
    assert "--split-dir" in str(error.value.code) and "unlabeled.txt" in str(error.value.code)
    (folder / "unlabeled.txt").write_text("2099_123456\n")
    with pytest.raises(SystemExit) as error:  # an id outside the pool
        datasets.resolve_split(split_args("voc", voc_tree, split_dir=folder))
    assert "2099_123456" in str(error.value.code) and "labeled" in str(error.value.code)
    (folder / "unlabeled.txt").write_text(VOC_TRAIN[0])
    with pytest.raises(SystemExit, match="overlap"):
        datasets.resolve_split(split_args("voc", voc_tree, split_dir=folder))


# ----------------------------------------------------------------------------------------------------------
# Loaders on miniature real trees
# ----------------------------------------------------------------------------------------------------------
def test_voc_tree_pool_and_masks(voc_tree):
    pool, labeled_pool, val = datasets.list_voc(voc_tree, "classic")
    assert sorted(keys(pool)) == sorted(VOC_TRAIN + VOC_SBD)  # SegmentationClassAug minus val
    assert keys(labeled_pool) == VOC_TRAIN and keys(val) == VOC_VAL
    all_ids = VOC_TRAIN + VOC_VAL + VOC_SBD
    for entry in pool + val:
        n = all_ids.index(entry[2])
        item = val_item(entry, "voc", 21)
        assert item["image"].shape == (3, 12, 16)
        assert torch.equal(item["mask"], torch.from_numpy(_voc_mask(n)).long()), "SegmentationClassAug preferred"
    _, blender_pool, _ = datasets.list_voc(voc_tree, "blender")
    assert sorted(keys(blender_pool)) == sorted(VOC_TRAIN + VOC_SBD)


def test_voc_palette_masks_are_read_as_indices(voc_tree):
    """Only SegmentationClass (palette 'P' PNGs): the loader must return class indices, not colours."""
    import shutil
    shutil.rmtree(voc_tree / "SegmentationClassAug")
    assert Image.open(voc_tree / "SegmentationClass" / f"{VOC_TRAIN[0]}.png").mode == "P"
    pool, _, val = datasets.list_voc(voc_tree, "classic")
    assert keys(pool) == VOC_TRAIN  # no SBD: the pool is the fine train set
    for entry in pool + val:
        n = (VOC_TRAIN + VOC_VAL).index(entry[2])
        mask = val_item(entry, "voc", 21)["mask"]
        assert torch.equal(mask, torch.from_numpy(_voc_mask(n + 5)).long())
        assert set(mask.unique().tolist()) <= set(range(21)) | {255}


def test_voc_train_aug_list_defines_pool(voc_tree):
    (voc_tree / "ImageSets/Segmentation/train_aug.txt").write_text(f"{VOC_TRAIN[0]}\n{VOC_SBD[1]}")
    pool, _, _ = datasets.list_voc(voc_tree, "classic")
    assert keys(pool) == [VOC_TRAIN[0], VOC_SBD[1]]


CITYSCAPES_TABLE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _label_ids(seed, h=6, w=8):
    values = np.arange(h * w) % 36  # every labelId 0..33 (and 34, 35) appears
    return np.random.default_rng(seed).permutation(values).reshape(h, w).astype(np.uint8)


def _expected_train_ids(label_ids):
    return np.vectorize(lambda v: CITYSCAPES_TABLE.get(int(v), 255))(label_ids).astype(np.uint8)


@pytest.fixture
def cityscapes_tree(tmp_path):
    root = tmp_path / "cityscapes"
    n = 0
    for split, cities in (("train", ["aachen", "bremen"]), ("val", ["lindau"])):
        for city in cities:
            for frame in range(2):
                name = f"{city}_{frame:06d}_000019"
                for kind in ("leftImg8bit", "gtFine"):
                    (root / kind / split / city).mkdir(parents=True, exist_ok=True)
                _rgb(6, 8, n).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
                Image.fromarray(_label_ids(n)).save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
                n += 1
    return root


def test_prepare_cityscapes_then_load(cityscapes_tree):
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_cityscapes.py"), "--root", str(cityscapes_tree)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "converted 6" in result.stdout
    sources = sorted(cityscapes_tree.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    assert len(sources) == 6
    for src in sources:
        dst = src.with_name(src.name.replace("labelIds", "labelTrainIds"))
        out = np.array(Image.open(dst))
        assert out.dtype == np.uint8 and Image.open(dst).mode == "L"
        assert np.array_equal(out, _expected_train_ids(np.array(Image.open(src))))
    pool, _, val = datasets.list_cityscapes(cityscapes_tree)
    assert len(pool) == 4 and len(val) == 2
    for entry in pool + val:
        mask = val_item(entry, "cityscapes", 19)["mask"].numpy()
        raw = np.array(Image.open(str(entry[1]).replace("labelTrainIds", "labelIds")))
        assert np.array_equal(mask, _expected_train_ids(raw))
    labeled = datasets.SegmentationSet(pool, "labeled", "cityscapes", 19, (4, 4), MEAN, STD)
    item = labeled[(0, 5)]
    assert item["image"].shape == (3, 4, 4) and item["mask"].shape == (4, 4)


def test_prepare_cityscapes_idempotent_and_overwrite(cityscapes_tree, capsys):
    assert prepare_cityscapes.main(["--root", str(cityscapes_tree)]) == 0
    outputs = sorted(cityscapes_tree.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    before = {p: p.read_bytes() for p in outputs}
    assert prepare_cityscapes.main(["--root", str(cityscapes_tree)]) == 0
    assert "converted 0" in capsys.readouterr().out.splitlines()[-1]
    assert prepare_cityscapes.main(["--root", str(cityscapes_tree), "--overwrite", "--splits", "val"]) == 0
    assert "converted 2" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in outputs} == before
    assert sorted(cityscapes_tree.glob("gtFine/*/*/*_gtFine_labelTrainIds.png")) == outputs
    assert not list(cityscapes_tree.glob("gtFine/**/*.tmp"))
    assert len(list(cityscapes_tree.glob("gtFine/*/*/*labelTrainIds*"))) == 6  # no labelTrainIds of labelTrainIds


def test_prepare_cityscapes_errors(tmp_path, cityscapes_tree):
    with pytest.raises(SystemExit) as error:
        prepare_cityscapes.main(["--root", str(tmp_path / "missing")])
    assert str(tmp_path / "missing") in str(error.value.code)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as error:
        prepare_cityscapes.main(["--root", str(tmp_path / "empty")])
    assert "gtFine" in str(error.value.code)
    with pytest.raises(SystemExit, match="--splits"):
        prepare_cityscapes.main(["--root", str(cityscapes_tree), "--splits", "test"])
    (tmp_path / "nolabels" / "gtFine" / "train" / "x").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no \\*_gtFine_labelIds.png"):
        prepare_cityscapes.main(["--root", str(tmp_path / "nolabels")])
    color = next(cityscapes_tree.glob("gtFine/train/aachen/*_labelIds.png"))
    _rgb(6, 8, 0).save(color)
    with pytest.raises(SystemExit) as error:
        prepare_cityscapes.main(["--root", str(cityscapes_tree)])
    assert str(color) in str(error.value.code) and "single-channel" in str(error.value.code)


def test_cityscapes_without_train_ids_names_the_script(cityscapes_tree):
    pool, _, _ = datasets.list_cityscapes(cityscapes_tree)
    with pytest.raises(FileNotFoundError, match="labelTrainIds"):
        val_item(pool[0], "cityscapes", 19)


def test_camvid_tree_void_becomes_ignore(tmp_path):
    root = tmp_path / "camvid"
    for d in ("train", "trainannot", "val", "valannot"):
        (root / d).mkdir(parents=True)
    mask = (np.arange(48) % 12).reshape(6, 8).astype(np.uint8)  # 0..11
    for split, name in (("train", "0001TP_006690.png"), ("val", "0016E5_07959.png")):
        _rgb(6, 8, 1).save(root / split / name)
        Image.fromarray(mask).save(root / f"{split}annot" / name)
    pool, _, val = datasets.list_camvid(root)
    assert keys(pool) == ["0001TP_006690.png"] and keys(val) == ["0016E5_07959.png"]
    loaded = val_item(pool[0], "camvid", 11)["mask"].numpy()
    assert np.array_equal(loaded, np.where(mask == 11, 255, mask))
    half = val_item(pool[0], "camvid", 11, scale=0.5)  # --image-scale resizes image and mask together
    assert half["image"].shape == (3, 3, 4) and half["mask"].shape == (3, 4)
    assert set(half["mask"].unique().tolist()) <= set(range(11)) | {255}



def test_image_cache_gives_identical_samples_and_reads_each_file_once(tmp_path, monkeypatch):
    root = tmp_path / "camvid"
    for d in ("train", "trainannot", "val", "valannot"):
        (root / d).mkdir(parents=True)
    for i in range(3):
        _rgb(12, 16, i).save(root / "train" / f"0001TP_00{i}.png")
        Image.fromarray((np.arange(192) % 11).reshape(12, 16).astype(np.uint8)).save(
            root / "trainannot" / f"0001TP_00{i}.png")
    pool, _, _ = datasets.list_camvid(root)
    reads = []
    real_load_pair = datasets.load_pair
    monkeypatch.setattr(datasets, "load_pair", lambda entry, *a: reads.append(entry[2]) or real_load_pair(entry, *a))
    common = dict(dataset="camvid", num_classes=11, crop=(8, 8), mean=MEAN, std=STD, image_scale=0.5)
    plain = datasets.SegmentationSet(pool, "labeled", **common)
    cached = datasets.SegmentationSet(pool, "labeled", cache=True, **common)
    for index, seed in [(0, [1]), (1, [2]), (0, [3]), (0, [1]), (2, [4]), (1, [5])]:
        a, b = plain[(index, seed)], cached[(index, seed)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert len(reads) == 6 + 3  # the plain set reads at every fetch, the cached one once per image
    strong = datasets.SegmentationSet(pool, "unlabeled", cache=True, **common)
    first, again = strong[(0, [9])], strong[(0, [9])]  # the cached image is not altered by augmentation
    assert torch.equal(first["image_strong"], again["image_strong"])
    parse = lambda *flags: cli.resolve_args(cli.base_parser(""), {}, "t", list(flags))  # noqa
    assert parse("--dataset", "camvid").cache_images is True
    assert parse("--dataset", "camvid", "--no-cache-images").cache_images is False
    assert not parse("--dataset", "toy").cache_images


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: each error names the file or the flag
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,hint", [("voc", "JPEGImages/<id>.jpg"), ("cityscapes", "leftImg8bit"),
                                          ("camvid", "trainannot")])
def test_missing_dataset_folder_shows_layout(tmp_path, dataset, hint):
    with pytest.raises(SystemExit) as error:
        datasets.resolve_split(split_args(dataset, tmp_path / "nothing"))
    message = str(error.value.code)
    assert "--data-root" in message and str(tmp_path / "nothing") in message and hint in message


def test_voc_missing_masks_folder_and_lists(voc_tree):
    import shutil
    (voc_tree / "ImageSets/Segmentation/train.txt").unlink()
    with pytest.raises(SystemExit, match="train.txt"):
        datasets.list_voc(voc_tree, "classic")
    shutil.rmtree(voc_tree / "SegmentationClassAug")
    shutil.rmtree(voc_tree / "SegmentationClass")
    with pytest.raises(SystemExit, match="SegmentationClass"):
        datasets.list_voc(voc_tree, "classic")


def test_cityscapes_empty_image_folder(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(SystemExit, match="_leftImg8bit.png"):
        datasets.list_cityscapes(tmp_path)


def _voc_entry(voc_tree, i=0):
    pool, _, _ = datasets.list_voc(voc_tree, "classic")
    return next(e for e in pool if e[2] == VOC_TRAIN[i])


def test_mask_value_outside_classes(voc_tree):
    entry = _voc_entry(voc_tree)
    bad = _voc_mask(0)
    bad[5, 5] = 21
    Image.fromarray(bad).save(entry[1])
    with pytest.raises(ValueError) as error:
        val_item(entry, "voc", 21)
    assert str(entry[1]) in str(error.value) and "21" in str(error.value)
    labeled = datasets.SegmentationSet([entry], "labeled", "voc", 21, (8, 8), MEAN, STD)
    with pytest.raises(ValueError, match=re.escape(str(entry[1]))):
        labeled[(0, 1)]


def test_image_mask_size_mismatch(voc_tree):
    entry = _voc_entry(voc_tree)
    Image.fromarray(np.zeros((12, 15), np.uint8)).save(entry[1])
    with pytest.raises(ValueError) as error:
        val_item(entry, "voc", 21)
    message = str(error.value)
    assert "size mismatch" in message and str(entry[0]) in message and str(entry[1]) in message


def test_corrupt_image(voc_tree):
    entry = _voc_entry(voc_tree)
    entry[0].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError) as error:
        val_item(entry, "voc", 21)
    assert "unreadable image" in str(error.value) and str(entry[0]) in str(error.value)
    unlabeled = datasets.SegmentationSet([entry], "unlabeled", "voc", 21, (8, 8), MEAN, STD)
    with pytest.raises(ValueError, match="unreadable image"):
        unlabeled[(0, 1)]


def test_rgb_mask_rejected(voc_tree):
    entry = _voc_entry(voc_tree)
    _rgb(12, 16, 3).save(entry[1])
    with pytest.raises(ValueError) as error:
        val_item(entry, "voc", 21)
    assert str(entry[1]) in str(error.value) and "single-channel" in str(error.value)


def test_missing_files_named(voc_tree):
    entry = _voc_entry(voc_tree)
    entry[1].unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(entry[1]))):
        val_item(entry, "voc", 21)
    entry[0].unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(entry[0]))):
        val_item(entry, "voc", 21)


def test_unlabeled_items_never_read_masks(voc_tree):
    entry = _voc_entry(voc_tree)
    entry[1].write_bytes(b"garbage")  # would fail if read
    item = datasets.SegmentationSet([entry], "unlabeled", "voc", 21, (8, 10), MEAN, STD)[(0, 4)]
    assert set(item) == {"image", "image_strong", "valid", "index"}
    assert item["image"].shape == item["image_strong"].shape == (3, 8, 10) and item["valid"].shape == (8, 10)
    assert item["valid"].dtype == torch.bool


# ----------------------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------------------
# Colours chosen so that no blend of two or more of them equals another one exactly.
CODE = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (255, 255, 0), 4: (0, 255, 255), 255: (255, 255, 255)}


def _coded_scene(h=40, w=56):
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((xx // 9) + 2 * (yy // 7) + (xx // 23)) % 5  # irregular, not mirror-symmetric blocks
    mask[(yy > 30) & (xx < 12)] = 255
    image = np.zeros((h, w, 3), np.uint8)
    for label, colour in CODE.items():
        image[mask == label] = colour
    return Image.fromarray(image), Image.fromarray(mask.astype(np.uint8))


def test_weak_augment_keeps_image_and_mask_aligned():
    image, mask = _coded_scene()
    crop = (32, 48)
    pure_total = padded_runs = 0
    for seed in range(40):
        out_image, out_mask, valid = datasets.weak_augment(image, mask, crop, np.random.default_rng(seed))
        assert out_image.shape == (*crop, 3) and out_mask.shape == crop and valid.shape == crop
        assert out_image.dtype == np.uint8 and out_mask.dtype == np.uint8 and valid.dtype == bool
        # padding: image 0, mask 255, valid False
        assert (out_image[~valid] == 0).all() and (out_mask[~valid] == 255).all()
        padded_runs += int((~valid).any())
        # wherever the image colour is exactly one of the codes, the mask holds that label
        for label, colour in CODE.items():
            pure = (out_image == colour).all(-1) & valid
            assert (out_mask[pure] == label).all(), f"seed {seed}: misaligned for label {label}"
            pure_total += pure.sum()
        # at every valid pixel the mask label's colour takes part in the (bilinear) blend: the nearest source
        # pixel has the largest weight, so a channel at 255 in the label's code cannot be 0 and vice versa
        code = np.array([CODE[v] for v in out_mask[valid].tolist()]).reshape(-1, 3)
        pixel = out_image[valid].astype(int)
        consistent = np.where(code == 255, pixel > 0, pixel < 255).all(-1)
        assert consistent.all(), f"seed {seed}: {np.count_nonzero(~consistent)} pixels whose label is not in the image"
    assert pure_total > 0.3 * 40 * crop[0] * crop[1], "too few unblended pixels for the check to mean anything"
    assert padded_runs > 0, "the scale range should sometimes need padding for this crop"


def test_weak_augment_flip_and_scale_happen():
    image, mask = _coded_scene()
    widths, flips = set(), 0
    reference = np.asarray(mask)
    for seed in range(30):
        _, out_mask, valid = datasets.weak_augment(image, mask, (40, 56), np.random.default_rng(seed),
                                                   scale_range=(1.0, 1.0))
        assert valid.all()
        if np.array_equal(out_mask, reference[:, ::-1]):
            flips += 1
        else:
            assert np.array_equal(out_mask, reference)
    assert 5 < flips < 25
    for seed in range(10):
        _, _, valid = datasets.weak_augment(image, mask, (40, 56), np.random.default_rng(seed))
        widths.add(int(valid.sum()))
    assert len(widths) > 3


def test_weak_augment_unlabeled_and_deterministic():
    image, _ = _coded_scene()
    a = datasets.weak_augment(image, None, (120, 120), np.random.default_rng(5))
    b = datasets.weak_augment(image, None, (120, 120), np.random.default_rng(5))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    out_image, out_mask, valid = a
    assert (~valid).any() and (out_image[~valid] == 0).all()  # the long side is at most 2 x 56 < 120
    assert out_mask.shape == (120, 120) and (out_mask[~valid] == 255).all()


def test_strong_photometric_shape_range_and_effect():
    torch.manual_seed(0)
    image = torch.rand(3, 16, 20)
    changed = 0
    for seed in range(40):
        out = datasets.strong_photometric(image.clone(), np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == image.dtype
        assert out.min() >= 0 and out.max() <= 1
        changed += int(not torch.allclose(out, image))
        again = datasets.strong_photometric(image.clone(), np.random.default_rng(seed))
        assert torch.equal(out, again)
    assert changed >= 30  # unchanged only with p = 0.2 x 0.8 x 0.5 = 0.08


def _box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    assert mask[top:bottom + 1, left:right + 1].all() and mask.sum() == (bottom - top + 1) * (right - left + 1)
    return int(bottom - top + 1), int(right - left + 1)


def test_cutmix_box_mask_bounds_and_probability():
    torch.manual_seed(0)
    h, w = 60, 80
    masks = torch.cat([datasets.cutmix_box_mask(100, h, w) for _ in range(6)])
    assert masks.shape == (600, h, w) and masks.dtype == torch.bool
    has_box = masks.flatten(1).any(1)
    assert 0.42 < has_box.float().mean() < 0.58
    areas = []
    for m in masks[has_box]:
        bh, bw = _box(m)
        area = bh * bw / (h * w)
        areas.append(area)
        assert area <= 0.4 + 1e-9
        assert area >= 0.02 * 0.5  # int truncation of both sides
        if bh < h and bw < w:  # not clipped by the image
            assert 0.3 * 0.75 <= bh / bw <= (1 / 0.3) / 0.75
    assert max(areas) > 0.25 and min(areas) < 0.05
    assert not datasets.cutmix_box_mask(50, h, w, p=0.0).any()
    assert datasets.cutmix_box_mask(50, h, w, p=1.0).flatten(1).any(1).all()


@pytest.mark.parametrize("present,chosen", [([0, 1, 2], 2), ([3], 1), ([0, 1, 2, 3], 2), ([1, 2, 4, 5, 6], 3)])
def test_classmix_mask_picks_half_of_present_classes(present, chosen):
    torch.manual_seed(0)
    label = torch.full((1, 6, 10), 255)
    for k, c in enumerate(present):
        label[0, :, k * 2:(k + 1) * 2] = c  # columns 8-9 stay 255 for <= 4 classes
    seen = set()
    for _ in range(30):
        mask = datasets.classmix_mask(label)[0]
        taken = set(label[0][mask].unique().tolist())
        assert len(taken) == chosen and taken <= set(present)
        assert not mask[label[0] == 255].any()
        for c in present:  # a class is taken entirely or not at all
            assert mask[label[0] == c].all() or not mask[label[0] == c].any()
        seen |= taken
    assert seen == set(present)


def test_mix_moves_image_and_label_together():
    torch.manual_seed(0)
    base_label, partner_label = torch.randint(0, 5, (2, 6, 7)), torch.randint(0, 5, (2, 6, 7))
    base_image = base_label[:, None].float().expand(2, 3, 6, 7) * 10  # image encodes the label
    partner_image = partner_label[:, None].float().expand(2, 3, 6, 7) * 10
    mask = datasets.cutmix_box_mask(2, 6, 7, p=1.0)
    image = datasets.mix(mask, partner_image, base_image)
    label = datasets.mix(mask, partner_label, base_label)
    assert image.shape == (2, 3, 6, 7) and label.shape == (2, 6, 7)
    assert torch.equal(image[:, 0] / 10, label.float()) and torch.equal(image[:, 2] / 10, label.float())
    assert torch.equal(label[mask], partner_label[mask]) and torch.equal(label[~mask], base_label[~mask])


# ----------------------------------------------------------------------------------------------------------
# StepBatchSampler
# ----------------------------------------------------------------------------------------------------------
def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_step_sampler_deterministic_and_resumable():
    straight = _take(datasets.StepBatchSampler(10, 3, 0, 1, seed=4, stream=1, start=0), 12)
    assert straight == _take(datasets.StepBatchSampler(10, 3, 0, 1, seed=4, stream=1, start=0), 12)
    for t in (1, 3, 7):
        assert _take(datasets.StepBatchSampler(10, 3, 0, 1, seed=4, stream=1, start=t), 12 - t) == straight[t:]
    other_seed = _take(datasets.StepBatchSampler(10, 3, 0, 1, seed=5, stream=1, start=0), 12)
    other_stream = _take(datasets.StepBatchSampler(10, 3, 0, 1, seed=4, stream=2, start=0), 12)
    assert straight != other_seed and straight != other_stream


def test_step_sampler_ranks_disjoint_and_epochs_cover():
    size, batch, world, steps = 11, 2, 2, 22  # 2 global batches of 4 per epoch (3 left over), 11 epochs
    ranks = [_take(datasets.StepBatchSampler(size, batch, r, world, seed=0, stream=1, start=0), steps)
             for r in range(world)]
    epochs = {}
    for t in range(steps):
        for r in range(world):
            for index, seed in ranks[r][t]:
                epochs.setdefault(seed[2] // size, []).append(index)
    assert sorted(epochs) == list(range(steps // 2))
    for e, indices in epochs.items():
        assert len(indices) == 8 and len(set(indices)) == 8, f"epoch {e}: a sample repeated within an epoch"
    assert epochs[0] != epochs[1], "each epoch is a new permutation"
    seen = {i for indices in epochs.values() for i in indices}
    assert seen == set(range(size)), "the dropped leftover differs between epochs"
    positions = [seed[2] for r in range(world) for t in range(steps) for _, seed in ranks[r][t]]
    assert len(set(positions)) == len(positions), "augmentation seeds are unique"


def test_step_sampler_small_set_cycles():
    """A set smaller than one global batch (e.g. 3 labels, batch 2 x 2 processes) still streams."""
    ranks = [_take(datasets.StepBatchSampler(3, 2, r, 2, seed=0, stream=1, start=0), 6) for r in range(2)]
    stream = [i for t in range(6) for r in range(2) for i, _ in ranks[r][t]]
    for epoch in range(len(stream) // 3):
        assert sorted(stream[epoch * 3:(epoch + 1) * 3]) == [0, 1, 2]


def test_step_sampler_ranks_never_share_a_sample_in_a_step():
    size, batch, world, steps = 11, 2, 2, 22
    ranks = [_take(datasets.StepBatchSampler(size, batch, r, world, seed=0, stream=1, start=0), steps)
             for r in range(world)]
    for t in range(steps):
        a, b = ([i for i, _ in ranks[r][t]] for r in range(world))
        assert not set(a) & set(b), f"step {t}: ranks share {set(a) & set(b)}"
        assert len(set(a)) == len(a) and len(set(b)) == len(b), f"step {t}: a batch holds a sample twice"


def test_step_sampler_seeds_are_per_position():
    a = _take(datasets.StepBatchSampler(10, 2, 1, 2, seed=3, stream=2, start=0), 3)
    b = _take(datasets.StepBatchSampler(10, 2, 1, 2, seed=3, stream=2, start=2), 1)
    assert a[2] == b[0]
    assert a[0][0][1] == [3, 2, 2]  # (seed, stream, position) of rank 1's first sample


# ----------------------------------------------------------------------------------------------------------
# Toy dataset and the data bundle
# ----------------------------------------------------------------------------------------------------------
def test_toy_scene_deterministic_classes_and_shapes():
    for index in (0, 7, 100_003):
        image, mask = datasets.toy_scene(index)
        again_image, again_mask = datasets.toy_scene(index)
        assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
        assert image.shape == (*datasets.TOY_SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == datasets.TOY_SIZE and set(np.unique(mask).tolist()) <= set(range(5))
        assert len(np.unique(mask)) >= 2
    assert not np.array_equal(datasets.toy_scene(0)[1], datasets.toy_scene(1)[1])
    pool, labeled_pool, val = datasets.list_toy()
    assert len(pool) == datasets.TOY_TRAIN and len(val) == datasets.TOY_VAL
    assert not set(keys(pool)) & set(keys(val))


def test_toy_sets_items():
    pool, _, val = datasets.list_toy()
    common = dict(dataset="toy", num_classes=5, crop=(32, 48), mean=MEAN, std=STD)
    item = datasets.SegmentationSet(val, "val", **common)[0]
    assert item["image"].shape == (3, *datasets.TOY_SIZE) and item["mask"].shape == datasets.TOY_SIZE
    assert torch.equal(item["mask"], torch.from_numpy(datasets.toy_scene(val[0][2])[1]).long())
    labeled = datasets.SegmentationSet(pool, "labeled", **common)
    a, b = labeled[(3, [0, 1, 5])], labeled[(3, [0, 1, 5])]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert a["image"].shape == (3, 32, 48) and a["mask"].dtype == torch.long


def test_build_data_streams_resume_at_a_step():
    args = SimpleNamespace(dataset="toy", data_root="", split="1/8", protocol="classic", split_dir=None, seed=0,
                           crop_size=[16, 24], image_scale=1.0, batch_size=2, unlabeled_batch_size=2, num_workers=0)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    data = datasets.build_data(args, accelerator, MEAN, STD)
    assert len(data.labeled) == 30 and len(data.unlabeled) == 210 and data.num_classes == 5
    assert data.labeled_epoch == 15 and data.unlabeled_epoch == 105
    stream = data.labeled_stream(0)
    next(stream)
    second = next(stream)
    resumed = next(data.labeled_stream(1))
    assert torch.equal(second["image"], resumed["image"]) and torch.equal(second["mask"], resumed["mask"])
    unlabeled = next(data.unlabeled_stream(0))
    assert unlabeled["image"].shape == (2, 3, 16, 24) and unlabeled["valid"].shape == (2, 16, 24)
    assert len(data.probe_set) == 32
    rgb = data.denormalize(data.val_set[0]["image"])
    assert rgb.dtype == torch.uint8 and np.array_equal(rgb.permute(1, 2, 0).numpy(), datasets.toy_scene(100_000)[0])


# ----------------------------------------------------------------------------------------------------------
# UniMatch's VOC layout, used as it is
# ----------------------------------------------------------------------------------------------------------
def _path_pair(i):
    return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png"  # a line of UniMatch's splits/pascal/*.txt


@pytest.fixture
def unimatch_voc_tree(tmp_path):
    """VOC as UniMatch's README lays it out (LiheYoung/UniMatch@0324f3d README.md, "Dataset"): JPEGImages from
    VOCtrainval and UniMatch's SegmentationClass, which holds the SBD-merged grayscale masks of every train_aug
    and val image (no SegmentationClassAug folder); VOCtrainval's train.txt (bare ids) and UniMatch's val.txt
    (path pairs, splits/pascal/val.txt)."""
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for n, i in enumerate(VOC_TRAIN + VOC_VAL + VOC_SBD):
        _rgb(20, 24, n).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(_voc_mask(n, 20, 24)).save(root / "SegmentationClass" / f"{i}.png")
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(_path_pair(i) for i in VOC_VAL))
    return root


def _first_batches(root, split_dir=None):
    args = SimpleNamespace(dataset="voc", data_root=str(root), split="1", protocol="classic", split_dir=split_dir,
                           seed=0, crop_size=[16, 16], image_scale=1.0, batch_size=2, unlabeled_batch_size=2,
                           num_workers=0, check_data=False)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                  device=torch.device("cpu"), wait_for_everyone=lambda: None)
    data = datasets.build_data(args, accelerator, MEAN, STD)
    return data, next(data.labeled_stream(0)), next(data.unlabeled_stream(0))


def test_unimatch_voc_layout_builds_and_reads_a_batch(unimatch_voc_tree):
    """SBD's masks in SegmentationClass join the pool (not only the 1,464 fine ids), path-pair lines are read as
    ids, and a first batch of each stream and a val image load."""
    data, labeled, unlabeled = _first_batches(unimatch_voc_tree)
    assert sorted(keys(data.labeled + data.unlabeled)) == sorted(VOC_TRAIN + VOC_SBD)
    assert keys(data.labeled)[0] in VOC_TRAIN and keys(data.val_set.entries) == VOC_VAL
    assert labeled["image"].shape == (2, 3, 16, 16) and unlabeled["image"].shape == (2, 3, 16, 16)
    assert set(labeled["mask"].unique().tolist()) <= set(range(21)) | {255}
    n = (VOC_TRAIN + VOC_VAL + VOC_SBD).index(VOC_VAL[0])
    assert torch.equal(data.val_set[0]["mask"], torch.from_numpy(_voc_mask(n, 20, 24)).long())


def test_unimatch_voc_layout_with_a_path_pair_train_aug_list(unimatch_voc_tree, tmp_path):
    """A train_aug.txt of path pairs used to give JPEGImages/JPEGImages/... at the first batch."""
    pool = VOC_TRAIN + VOC_SBD[:1]
    (unimatch_voc_tree / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(_path_pair(i) for i in pool))
    data, labeled, unlabeled = _first_batches(unimatch_voc_tree)
    assert sorted(keys(data.labeled + data.unlabeled)) == sorted(pool)
    assert data.labeled[0][0] == unimatch_voc_tree / "JPEGImages" / f"{keys(data.labeled)[0]}.jpg"
    assert labeled["mask"].shape == (2, 16, 16) and unlabeled["valid"].shape == (2, 16, 16)
    splits = tmp_path / "splits"  # and UniMatch's own split lists (splits/pascal/<n>/*.txt) on this tree
    splits.mkdir()
    (splits / "labeled.txt").write_text(_path_pair(VOC_TRAIN[1]) + "\n")
    (splits / "unlabeled.txt").write_text("\n".join(_path_pair(i) for i in [VOC_TRAIN[0], VOC_SBD[0]]))
    data, labeled, _ = _first_batches(unimatch_voc_tree, str(splits))
    assert keys(data.labeled) == [VOC_TRAIN[1]] and keys(data.unlabeled) == [VOC_TRAIN[0], VOC_SBD[0]]
