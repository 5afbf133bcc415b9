"""scripts/predict.py and scripts/summarize.py on a real (tiny) toy run, and the overlay PNG that run writes:
label maps at the input's size holding class indices, the same labels as the network's own forward, sliding
windows for large images, one-line errors; the run's row in the summary table."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import datasets
from conftest import ROOT, TINY, run_method

spec = importlib.util.spec_from_file_location("predict", ROOT / "scripts" / "predict.py")
predict = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict)

TOY_CLASSES = len(datasets.TOY_CLASSES)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two training iterations of the supervised baseline on the toy data, one evaluation (a few seconds)."""
    out = tmp_path_factory.mktemp("predict") / "run"
    run_method("supervised.py", [*TINY, "--iters", "2", "--eval-every", "2", "--out", str(out)])
    return out


@pytest.fixture
def images(tmp_path):
    """Three toy val scenes (80x64 PNG) and one larger JPEG of another shape (240x128: six scenes tiled)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(datasets.toy_scene(100_000 + i)[0]).save(folder / f"scene{i}.png")
    big = np.concatenate([np.concatenate([datasets.toy_scene(j)[0] for j in range(k, k + 3)], 1) for k in (0, 3)])
    Image.fromarray(big).save(folder / "big.jpg")
    return folder


def network(weights):
    saved = torch.load(weights, weights_only=True)
    args = saved["args"]
    model = common.build_model(args["backbone"], TOY_CLASSES, "none", args["output_stride"], args["decoder_channels"])
    model.load_state_dict(saved["model"])
    return model.eval(), args


def normalized(path, backbone):
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    mean, std = common.normalization(backbone)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)


def test_predict_command_line_writes_a_label_map_and_an_overlay_per_image(run, images, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--weights",
                             str(run / "model_best.pt"), "--images", str(images), "--out", str(out),
                             "--max-whole-pixels", "10000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "big.jpg: 240x128, sliding" in result.stdout and "scene0.png: 80x64, whole" in result.stdout
    for source in sorted(images.iterdir()):
        label = Image.open(out / "labels" / f"{source.stem}.png")
        overlay = Image.open(out / "overlays" / f"{source.stem}.png")
        width, height = Image.open(source).size
        assert label.size == (width, height) and overlay.size[0] == width, source.name
        assert overlay.size[1] > height  # the legend of the image's classes below it
        assert label.mode == "P" and overlay.mode == "RGB"
        values = np.array(label)
        assert values.dtype == np.uint8 and values.max() < TOY_CLASSES, source.name


def test_labels_are_the_networks_argmax_whole_and_sliding(run, images, tmp_path):
    """In process (same threads as the reference): whole mode gives exactly the argmax of one forward of the
    normalised image; sliding mode with every window in one batch exactly common.predict's sliding windows;
    windows fed 2 at a time give the same labels up to float noise."""
    model, args = network(run / "model_best.pt")
    scene, big = images / "scene1.png", images / "big.jpg"
    predict.main(["--weights", str(run / "model_best.pt"), "--images", str(images), "--out", str(tmp_path / "a"),
                  "--mode", "whole"])
    expected = common.predict(model, normalized(scene, args["backbone"]), TOY_CLASSES, "whole").argmax(1)[0]
    assert np.array_equal(np.array(Image.open(tmp_path / "a" / "labels" / "scene1.png")), expected.numpy())
    window = ["--window", "32", "48"]
    predict.main(["--weights", str(run / "model_best.pt"), "--images", str(images), "--out", str(tmp_path / "b"),
                  "--mode", "sliding", *window, "--window-batch", "1000"])
    probs = common.predict(model, normalized(big, args["backbone"]), TOY_CLASSES, "sliding", (32, 48))
    sliding = np.array(Image.open(tmp_path / "b" / "labels" / "big.png"))
    assert np.array_equal(sliding, probs.argmax(1)[0].numpy())
    predict.main(["--weights", str(run / "model_best.pt"), "--images", str(images), "--out", str(tmp_path / "c"),
                  "--mode", "sliding", *window, "--window-batch", "2"])
    chunked = np.array(Image.open(tmp_path / "c" / "labels" / "big.png"))
    assert (chunked == sliding).mean() > 0.99


def test_image_scale_predicts_at_the_training_scale_and_returns_the_input_size(run, images, tmp_path):
    predict.main(["--weights", str(run / "model_best.pt"), "--images", str(images), "--out", str(tmp_path),
                  "--image-scale", "0.5"])
    for source in images.iterdir():
        assert Image.open(tmp_path / "labels" / f"{source.stem}.png").size == Image.open(source).size


def _exit_message(argv) -> str:
    with pytest.raises(SystemExit) as stop:
        predict.main(argv)
    assert isinstance(stop.value.code, str), stop.value.code  # a message, not a bare status
    return stop.value.code


def test_predict_errors_are_one_line_naming_the_flag_and_file(run, images, tmp_path):
    weights, out = str(run / "model_best.pt"), str(tmp_path / "out")
    message = _exit_message(["--weights", str(tmp_path / "nope.pt"), "--images", str(images), "--out", out])
    assert message.startswith("--weights ") and "nope.pt: no such file" in message and "\n" not in message
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    message = _exit_message(["--weights", weights, "--images", str(empty), "--out", out])
    assert message.startswith(f"--images {empty}: no image files") and ".png" in message
    (images / "broken.png").write_bytes(b"this is not a PNG")
    message = _exit_message(["--weights", weights, "--images", str(images), "--out", out])
    assert message.startswith("--images: unreadable image") and "broken.png" in message and "\n" not in message
    (images / "broken.png").unlink()
    (images / "scene0.jpg").write_bytes((images / "big.jpg").read_bytes())  # would overwrite scene0.png's output
    assert "scene0.jpg and scene0.png" in _exit_message(["--weights", weights, "--images", str(images), "--out", out])


def test_weights_with_python_objects_are_refused_not_unpickled(run, images, tmp_path):
    """torch.load(weights_only=True): a file whose 'args' hold a Path (any non-plain object) is an error that
    says so, not code run from the file."""
    saved = torch.load(run / "model_best.pt", weights_only=True)
    bad = tmp_path / "objects.pt"
    torch.save({**saved, "args": {**saved["args"], "out": tmp_path}}, bad)  # a PosixPath inside
    message = _exit_message(["--weights", str(bad), "--images", str(images), "--out", str(tmp_path / "out")])
    assert message.startswith(f"--weights {bad}: not readable as plain weights") and "weights_only=True" in message
    torch.save({"state_dict": saved["model"]}, bad)
    assert "expected a dict with 'model' and 'args'" in _exit_message(
        ["--weights", str(bad), "--images", str(images), "--out", str(tmp_path / "out")])


def test_saved_arguments_are_plain_values(run):
    """The arguments stored next to the weights are plain JSON-like values (what weights_only=True accepts)."""
    saved = torch.load(run / "model_best.pt", weights_only=True)
    assert set(saved) >= {"model", "args"} and saved["args"]["method"] == "supervised"
    assert json.loads(json.dumps(saved["args"])) == saved["args"]


def test_training_overlay_has_titled_columns_flat_class_colours_and_is_small(run):
    """The overlay the run wrote (common.save_overlays): 3 tiles of 200 pixels (the 80-pixel toy image
    enlarged) with 4-pixel gaps, the ground-truth tile drawn only in palette colours (nearest scaling, no
    blending), a legend line below the tiles, well under 1 MB."""
    path = run / "overlays" / "iter_0000002.png"
    image = np.array(Image.open(path).convert("RGB"))
    assert image.shape[1] == 3 * 200 + 2 * 4
    top, tile_h = 22, 160  # column titles above; 64 x 80 toy image -> 160 x 200 tile
    assert image.shape[0] > top + tile_h + 18  # the legend below
    ground_truth = image[top + 2:top + tile_h - 2, 204 + 2:404 - 2].reshape(-1, 3)
    palette = {tuple(c) for c in datasets.TOY_PALETTE}
    assert {tuple(c) for c in np.unique(ground_truth, axis=0)} <= palette
    assert len(np.unique(image[top:top + tile_h, :200].reshape(-1, 3), axis=0)) > 50  # the photo, not flat
    assert path.stat().st_size < 1_000_000


def test_summarize_reads_a_real_run(run, tmp_path):
    plot = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(run), "--plot", str(plot)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    miou = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]["miou"]
    assert f"\n| run | supervised | toy | 1/8 | 0 | 2 | {miou:.2f} | {miou:.2f} | " in result.stdout
    assert Image.open(plot).format == "PNG"
