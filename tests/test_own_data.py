"""Bringing your own data (README "Your own data"): the folder dataset and its classes.txt, split lists named and
recorded, small data end to end with every method, the Python API (scripts/predict.py's Segmenter) and its streamed sliding
windows, and the interfaces (--stop-at's last line, trackers, --help, the CPU multi-process command)."""
import hashlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import common
import datasets
from scripts.predict import load_segmenter
from conftest import (FOLDER_CLASSES, FOLDER_TINY, ROOT, TINY, _free_port, assert_resume_equivalent,
                      make_folder_dataset, read_metrics, run_method)


def folder_args(root, **overrides):
    return SimpleNamespace(**{**dict(dataset="folder", data_root=str(root), split="full", protocol="classic",
                                     split_dir=None, seed=0, crop_size=[32, 48], image_scale=1.0,
                                     cache_images=False, batch_size=2, unlabeled_batch_size=2, num_workers=0,
                                     check_data=True), **overrides})


def exit_message(call, *args) -> str:
    with pytest.raises(SystemExit) as stop:
        call(*args)
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code, stop.value.code
    return stop.value.code


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


# ----------------------------------------------------------------------------------------------------------
# The folder dataset
# ----------------------------------------------------------------------------------------------------------
def test_classes_txt_gives_names_and_colours_and_refuses_bad_lines(tmp_path):
    (tmp_path / "classes.txt").write_text("road 128,64,128\ntraffic sign\n  sky   70,130,180  \n\n")
    names, palette = datasets.read_classes(tmp_path)
    assert names == ["road", "traffic sign", "sky"]
    assert palette[0] == (128, 64, 128) and palette[2] == (70, 130, 180) and len(set(palette)) == 3
    for text, expected in (("road 300,0,0\nsky\n", "line 1"), ("road\n\nsky\n", "line 2"),
                           ("road,128,64,128\nsky\n", "line 1"), ("road\n", "1 classes: expected 2 to 255")):
        (tmp_path / "classes.txt").write_text(text)
        message = exit_message(datasets.read_classes, tmp_path)
        assert "classes.txt" in message and expected in message, message
    (tmp_path / "classes.txt").unlink()
    assert "classes.txt" in exit_message(datasets.read_classes, tmp_path)


def test_folder_layout_labeled_unlabeled_and_errors_name_the_file(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    pool, labeled_pool, val = datasets.list_folder(root)
    assert [e[2] for e in pool] == [f"scene_{i:02d}" for i in range(8)] and len(val) == 3
    assert [e[2] for e in labeled_pool] == [f"scene_{i:02d}" for i in range(5)]
    labeled, unlabeled, _ = datasets.resolve_split(folder_args(root))  # --split full: masked = labeled
    assert len(labeled) == 5 and [e[1] for e in unlabeled] == [None] * 3
    labeled, unlabeled, _ = datasets.resolve_split(folder_args(root, split="2"))  # 2 labeled, 3 masked unlabeled
    assert len(labeled) == 2 and len(unlabeled) == 6
    shutil.copy(root / "masks" / "val" / "scene_00.png", root / "masks" / "train" / "photo_17.png")
    message = exit_message(datasets.resolve_split, folder_args(root))
    assert "photo_17.png has no image" in message
    (root / "masks" / "train" / "photo_17.png").unlink()
    (root / "masks" / "val" / "scene_01.png").unlink()
    assert "scene_01.jpg has no mask" in exit_message(datasets.resolve_split, folder_args(root))
    shutil.copy(root / "masks" / "val" / "scene_00.png", root / "masks" / "val" / "scene_01.png")
    shutil.copy(root / "images" / "train" / "scene_00.jpg", root / "images" / "train" / "scene_00.png")
    assert "share the name 'scene_00'" in exit_message(datasets.resolve_split, folder_args(root))
    (root / "images" / "train" / "scene_00.png").unlink()
    shutil.rmtree(root / "images" / "val")
    message = exit_message(datasets.resolve_split, folder_args(root))
    assert "images/val does not exist" in message and "classes.txt" in message  # with the expected layout
    shutil.rmtree(root / "masks" / "train")
    assert "no image of" in exit_message(datasets.resolve_split, folder_args(root))  # a mask names its image


def test_mask_value_outside_the_classes_is_refused_at_start_up(tmp_path, accelerator, monkeypatch):
    """A mask value >= K (not 255) stops build_data with the file named, also after the same mask passed a check
    with more classes (the start-up check's cache remembers K)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_folder_dataset(tmp_path / "data")
    mask = np.array(Image.open(root / "masks" / "train" / "scene_03.png"))
    mask[:2, :2] = 3
    Image.fromarray(mask).save(root / "masks" / "train" / "scene_03.png")
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    data = datasets.build_data(folder_args(root), accelerator, (0, 0, 0), (1, 1, 1), need_unlabeled=False)
    assert data.num_classes == 4 and data.class_names == ["a", "b", "c", "d"]
    (root / "classes.txt").write_text("a\nb\nc\n")
    message = exit_message(datasets.build_data, folder_args(root), accelerator, (0, 0, 0), (1, 1, 1), False)
    assert "scene_03.png holds values [3]" in message and "3 classes" in message


def test_sixteen_bit_images_are_refused_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(path)
    with pytest.raises(ValueError, match="deep.png has I.* pixels .16 or 32 bits"):
        datasets.read_image(path)


def test_miou_over_present_classes_leaves_absent_classes_out():
    cm = torch.tensor([[3, 1, 0], [1, 3, 0], [0, 0, 0]])  # class 2 never in the ground truth nor predicted
    miou, iou = common.iou_from_confusion(cm, present_only=True)
    assert iou[2] is None and miou == pytest.approx(60.0)  # IoU 3/5 for both present classes
    miou, iou = common.iou_from_confusion(cm)  # the benchmarks' definition: every class counts
    assert iou[2] == 0.0 and miou == pytest.approx(40.0)


def test_folder_dataset_trains_evaluates_predicts_and_resumes(tmp_path):
    """mean_teacher on 5 labeled + 3 unlabeled + 3 val (+ 2 test) images whose classes.txt lists a 4th class that no
    mask holds: an exact resume, classes named as in classes.txt, the absent one reported absent and out of the mIoU,
    the stopped run's last line, evaluate.py's mIoU, predict.py's labels with the run's colours and a legend."""
    root = make_folder_dataset(tmp_path / "data", test=2)
    (root / "classes.txt").write_text((root / "classes.txt").read_text() + "unused thing 200,0,200\n")
    assert_resume_equivalent("mean_teacher.py", [*FOLDER_TINY, "--data-root", str(root)], tmp_path)
    run = tmp_path / "resumed"
    assert "stopped at 2 of 4 iterations" in (run / "log.txt").read_text()
    last = read_metrics(run)[-1]
    assert list(last["iou"]) == [*FOLDER_CLASSES, "unused thing"] and last["iou"]["unused thing"] is None
    assert last["absent_classes"] == ["unused thing"]
    assert last["miou"] == pytest.approx(np.mean([last["iou"][n] for n in FOLDER_CLASSES]), abs=0.01)
    assert "unused thing absent" in (run / "log.txt").read_text()
    assert last["test_iou"]["unused thing"] is None and "test_miou" in last  # images/test, scored at the end
    saved = torch.load(run / "model_best.pt", weights_only=True)
    assert saved["class_names"][3] == "unused thing" and tuple(saved["palette"][3]) == (200, 0, 200)
    printed = run_method("../scripts/evaluate.py", ["--weights", str(run / "model_last.pt"), "--num-workers", "0"])
    assert f"mIoU (whole, 3 val images): {last['miou']:.2f}" in printed.stdout
    out = tmp_path / "predictions"
    run_method("../scripts/predict.py", ["--weights", str(run / "model_best.pt"), "--images",
                                         str(root / "images" / "val"), "--out", str(out)])
    labels = np.array(Image.open(out / "labels" / "scene_00.png"))
    assert labels.shape == (64, 80) and labels.max() < 4
    assert Image.open(out / "labels" / "scene_00.png").getpalette()[:6] == [40, 40, 40, *saved["palette"][1]]
    overlay = np.array(Image.open(out / "overlays" / "scene_00.png"))
    assert overlay.shape[0] > 64 + 10 and overlay.shape[1] == 80  # the legend below the image
    legend = overlay[64:].reshape(-1, 3)
    for c in set(labels.flatten().tolist()):  # each class of the image has its swatch in the legend
        assert (legend == saved["palette"][c]).all(1).any(), c


METHOD_FLAGS = {"supervised": [], "mean_teacher": [], "gta_seg": ["--iters-per-epoch", "1"],
                "dual_teacher": ["--iters-per-epoch", "1"], "ctt": [],
                "segkc": ["--senior-backbone", "resnet18"]}


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_every_method_runs_on_five_labeled_three_unlabeled_three_val(method, tmp_path):
    """8 masked train images, --split 5: 3 unlabeled images whose masks the pseudo-label probe reads, in batches
    of 2 (Dual Teacher's and SegKC's teachers label in train mode: the last batch of 1 must not crash)."""
    root = make_folder_dataset(tmp_path / "data", unlabeled_masks=True)
    out = tmp_path / "run"
    result = run_method(f"{method}.py", [*FOLDER_TINY, *METHOD_FLAGS[method], "--data-root", str(root), "--split",
                                         "5", "--iters", "2", "--eval-every", "2", "--out", str(out)])
    record = read_metrics(out)[-1]
    assert record["iteration"] == 2 and list(record["iou"]) == FOLDER_CLASSES
    assert "pseudo_acc" in record  # the probe ran on the 3 unlabeled images
    assert "5 labeled" in (out / "log.txt").read_text() and "done: best mIoU" in result.stdout + result.stderr


def test_train_mode_probe_merges_a_last_batch_of_one(accelerator):
    """3 probe images in train-mode batches of 2: the third joins the first batch (BN in train mode cannot take
    one image: the image pooling leaves one value per channel); a lone image is skipped and counted."""
    torch.manual_seed(0)
    net = common.build_model("resnet18", 3, "none", 16, 8)
    g = torch.Generator().manual_seed(1)
    probe_set = [{"image": torch.randn(3, 32, 32, generator=g), "mask": torch.randint(0, 3, (32, 32), generator=g)}
                 for _ in range(3)]
    result = common.pseudo_label_probe(net, SimpleNamespace(probe_set=probe_set, num_classes=3), accelerator, 0.0,
                                       train_batch=2)
    assert sum(v["pixels"] for v in result["probe_per_class"].values()) == pytest.approx(100.0)
    assert result == common.pseudo_label_probe(net, SimpleNamespace(probe_set=probe_set, num_classes=3),
                                               accelerator, 0.0, train_batch=3)  # the same batch of 3
    lone = common.pseudo_label_probe(net, SimpleNamespace(probe_set=probe_set[:1], num_classes=3), accelerator, 0.0,
                                     train_batch=2)
    assert lone["probe_skipped"] == 1


# ----------------------------------------------------------------------------------------------------------
# Split lists
# ----------------------------------------------------------------------------------------------------------
def test_split_dir_run_is_named_after_its_list_and_records_it(tmp_path, capsys):
    lists = tmp_path / "splits" / "pascal" / "366"
    lists.mkdir(parents=True)
    (lists / "labeled.txt").write_text("JPEGImages/a.jpg SegmentationClass/a.png\nJPEGImages/b.jpg x\n\n")
    (lists / "unlabeled.txt").write_text("c\n")
    args = cli.resolve_args(cli.base_parser(""), {}, "mean_teacher", ["--dataset", "voc", "--split-dir", str(lists)])
    assert args.out == "runs/mean_teacher_voc_list-366_s0" and args.split == "list-366"
    assert args.split_list == {
        "path": str(lists.resolve()), "labels": 2,
        "labeled_sha256": hashlib.sha256((lists / "labeled.txt").read_bytes()).hexdigest(),
        "unlabeled_sha256": hashlib.sha256(b"c\n").hexdigest()}
    with pytest.raises(SystemExit):
        cli.resolve_args(cli.base_parser(""), {}, "t", ["--dataset", "voc", "--split-dir", str(lists), "--split", "2"])
    assert "--split and --split-dir: give one" in capsys.readouterr().err
    (lists / "unlabeled.txt").unlink()
    with pytest.raises(SystemExit):
        cli.resolve_args(cli.base_parser(""), {}, "t", ["--dataset", "voc", "--split-dir", str(lists)])
    assert "unlabeled.txt" in capsys.readouterr().err
    run = tmp_path / "run"  # summarize.py shows the list: name, labels, hash
    run.mkdir()
    (run / "args.json").write_text(json.dumps(vars(args)))
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 4, "miou": 12.5}) + "\n")
    shown = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(run)], capture_output=True,
                           text=True, timeout=120).stdout
    assert f"| list-366 (2 labels, sha256 {args.split_list['labeled_sha256'][:8]}) |" in shown


def test_split_lines_name_images_by_path_pair_file_name_or_stem_in_every_layout(tmp_path):
    """UniMatch's path pairs, file names and bare stems all name the same image, for CamVid and folder too."""
    camvid = tmp_path / "camvid"
    for split in ("train", "trainannot", "val", "valannot"):
        (camvid / split).mkdir(parents=True)
        for name in (["0001TP_000010.png", "0001TP_000020.png", "0006R0_000030.png"] if "train" in split
                     else ["0016E5_000040.png"]):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(camvid / split / name)
    folder = make_folder_dataset(tmp_path / "folder")
    lists = tmp_path / "lists"
    lists.mkdir()
    for dataset, root, labeled, unlabeled, expected in (
            ("camvid", camvid, "train/0001TP_000010.png trainannot/0001TP_000010.png\n0006R0_000030.png\n",
             "0001TP_000020\n", (["0001TP_000010.png", "0006R0_000030.png"], ["0001TP_000020.png"])),
            ("folder", folder, "images/train/scene_00.jpg masks/train/scene_00.png\nscene_01\n", "scene_05.jpg\n",
             (["scene_00", "scene_01"], ["scene_05"]))):
        (lists / "labeled.txt").write_text(labeled)
        (lists / "unlabeled.txt").write_text(unlabeled)
        got = datasets.resolve_split(folder_args(root, dataset=dataset, split_dir=str(lists)))
        assert ([e[2] for e in got[0]], [e[2] for e in got[1]]) == expected, dataset
    (lists / "labeled.txt").write_text("0016E5_000040.png\n")  # a val image
    message = exit_message(datasets.resolve_split, folder_args(camvid, dataset="camvid", split_dir=str(lists)))
    assert "not in the training pool" in message and "1 of them are val images" in message
    (lists / "labeled.txt").write_text("scene_06\n")  # a folder image without a mask cannot be labeled
    message = exit_message(datasets.resolve_split, folder_args(folder, split_dir=str(lists)))
    assert "labeled.txt names 1 images without a mask" in message and "scene_06.jpg" in message


# ----------------------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    run_method("supervised.py", [*TINY, "--iters", "2", "--eval-every", "2", "--out", str(out)])
    return out / "model_best.pt"


def test_readme_python_api_block_runs(toy_weights, tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) == 3
    weights = re.search(r'load_segmenter\("([^"]+)"\)', block).group(1)
    (tmp_path / weights).parent.mkdir(parents=True)
    shutil.copy(toy_weights, tmp_path / weights)
    Image.fromarray(datasets.toy_scene(100_001)[0]).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block, namespace)
    labels = namespace["labels"]
    assert isinstance(labels, np.ndarray) and labels.shape == (64, 80) and labels.dtype == np.uint8
    assert labels.max() < len(datasets.TOY_CLASSES)


def test_api_takes_paths_images_and_arrays_and_raises_instead_of_exiting(toy_weights, tmp_path):
    segment = load_segmenter(toy_weights, device="cpu")
    image = datasets.toy_scene(100_002)[0]
    Image.fromarray(image).save(tmp_path / "scene.png")
    from_path = segment(tmp_path / "scene.png")
    assert np.array_equal(from_path, segment(Image.fromarray(image))) and np.array_equal(from_path, segment(image))
    assert segment.class_names == datasets.TOY_CLASSES
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        common.load_weights(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not readable as plain weights"):
        load_segmenter(tmp_path / "junk.pt")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="deep.png has I"):
        segment(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="uint8 array, got float64"):
        segment(image / 255.0)


def _largest_tensor_while(call) -> int:
    """The most elements of any tensor an operator returned while `call` ran (every CPU allocation of the
    network and of the accumulators passes through an operator)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    largest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t):
                    largest[0] = max(largest[0], t.numel())
            return out

    with Watch():
        call()
    return largest[0]


def test_streamed_sliding_windows_equal_all_at_once_and_memory_does_not_grow_with_the_image(toy_weights):
    """Sliding windows streamed into an accumulator give common.predict's all-at-once labels (at scale 1 and, up
    to the bilinear resize, at scale 0.5); the largest tensor held does not grow with the image's height, and no
    forward takes more than --window-batch windows."""
    tall = np.concatenate([datasets.toy_scene(j)[0] for j in range(8)])  # 512 x 80
    options = dict(device="cpu", mode="sliding", window=(32, 48))
    for scale in (1.0, 0.5):
        segment = load_segmenter(toy_weights, window_batch=1000, image_scale=scale, **options)
        resized = Image.fromarray(tall[:256]).resize((round(80 * scale), round(256 * scale)), Image.BILINEAR)
        x = (torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255 - segment.mean) / segment.std
        probs = common.predict(segment.model, x[None], segment.num_classes, "sliding", (32, 48))
        expected = common.upsample(probs, (256, 80)).argmax(1)[0] if scale != 1 else probs.argmax(1)[0]
        assert np.array_equal(segment(tall[:256]), expected.numpy()), scale
    segment = load_segmenter(toy_weights, window_batch=2, memory_mb=0.2, image_scale=0.5, **options)
    batches = []
    segment.model.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    small, large = (_largest_tensor_while(lambda: segment(tall[:rows])) for rows in (128, 512))
    assert small == large and max(batches) <= 2
    with pytest.raises(ValueError, match="band of windows"):  # too wide for the limit: refused, not swapped
        load_segmenter(toy_weights, memory_mb=0.01, **options)(np.zeros((64, 4000, 3), np.uint8))


def test_predict_one_line_for_an_unwritable_out_and_a_16_bit_image(toy_weights, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("predict", ROOT / "scripts" / "predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(datasets.toy_scene(1)[0]).save(images / "a.png")
    (tmp_path / "file").write_text("a file where the output folder should go")
    message = exit_message(predict.main, ["--weights", str(toy_weights), "--images", str(images), "--out",
                                          str(tmp_path / "file" / "out")])
    assert message.startswith(f"--out {tmp_path / 'file' / 'out'}: cannot create")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(images / "b.png")
    message = exit_message(predict.main, ["--weights", str(toy_weights), "--images", str(images), "--out",
                                          str(tmp_path / "out")])
    assert message.startswith("--images: image ") and "b.png has I" in message and "8-bit" in message


# ----------------------------------------------------------------------------------------------------------
# Interfaces
# ----------------------------------------------------------------------------------------------------------
SCRIPTS = sorted(p.relative_to(ROOT) for p in [*(ROOT / "methods").glob("*.py"), *(ROOT / "scripts").glob("*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_help_description_is_a_whole_sentence(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code == 0
    text = capsys.readouterr().out
    description = " ".join(text.split("\n\n")[1].split())  # usage, blank line, description
    assert description.endswith(".") and description[0].isupper(), description
    assert description.count("(") == description.count(")"), description


def test_trackers_get_lr_every_miou_and_the_overlays(tmp_path, monkeypatch):
    """--log-with tensorboard through Accelerate, with a recording tracker standing in for TensorBoard's (not a
    dependency): the learning rate, the teacher's and the student's mIoU and the overlay grid arrive."""
    import types
    from accelerate import tracking
    calls = []

    class Recorder(tracking.GeneralTracker):
        name, requires_logging_directory = "tensorboard", False

        def __init__(self, run_name, logging_dir=None, **kwargs):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            calls.append(("config", values))

        def log(self, values, step=None, **kwargs):
            calls.append(("log", step, values))

        def log_images(self, values, step=None, **kwargs):
            calls.append(("images", step, {k: np.asarray(v).shape for k, v in values.items()}, kwargs))

    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", Recorder)
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [tracking.LoggerType.TENSORBOARD])
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    mean_teacher = runpy.run_path(str(ROOT / "methods" / "mean_teacher.py"), run_name="mean_teacher")
    mean_teacher["main"]([*TINY, "--iters", "2", "--eval-every", "2", "--log-with", "tensorboard",
                          "--out", str(tmp_path / "run")])
    logged = {k: v for call in calls if call[0] == "log" for k, v in call[2].items()}
    assert {"train/lr", "train/loss", "eval/mIoU", "eval/miou_student", "eval/pseudo_acc"} <= set(logged)
    images = [call for call in calls if call[0] == "images"]
    assert images and images[0][1] == 2 and images[0][3] == {"dataformats": "NHWC"}
    assert images[0][2]["overlays"][0] == 1 and images[0][2]["overlays"][3] == 3


def test_readme_cpu_multi_process_command_starts_two_processes_and_cpu_flag_one(tmp_path):
    """The README's CPU command (`accelerate launch --multi_gpu --num_processes 2`, its dataset flags swapped for
    the toy's) runs 2 processes; `--cpu --num_processes 2` runs 1, as the README says."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "2 processes on CPU" in line)
    tokens = line.split("#")[0].split()
    launch, script = tokens[2:tokens.index("methods/supervised.py")], tokens[tokens.index("methods/supervised.py")]
    assert "--multi_gpu" in launch and launch[launch.index("--num_processes") + 1] == "2"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for flags, out in ((launch, tmp_path / "multi"), (["--cpu", "--num_processes", "2"], tmp_path / "cpu")):
        command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   str(ROOT / script), *TINY, "--iters", "1", "--eval-every", "1", "--out", str(out)]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in (tmp_path / "multi" / "log.txt").read_text()
    assert "processes: 1" in (tmp_path / "cpu" / "log.txt").read_text()
