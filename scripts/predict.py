"""Segment a folder of images with saved weights (OUT/model_best.pt or model_last.pt of any method): one
class-index PNG and one colour overlay PNG per image, both at the input's size.

  python scripts/predict.py --weights runs/supervised_camvid_1-8_s0/model_best.pt --images photos/ --out predictions/

Writes OUT/labels/<name>.png (palette PNG: each pixel's value is its class index, and image viewers show the
dataset's class colours) and OUT/overlays/<name>.png (the image with the class colours blended over it, and a
legend of the classes below it). The command line of common.Segmenter (the Python API): each image is first
resized by the run's --image-scale (the scale the network was trained at; CamVid runs see half-resolution images),
the class probabilities are brought back to the input's size, and the argmax is taken there. Inference mode: the
run's --eval-mode, except that images of more than --max-whole-pixels pixels (after the resize) go through sliding
windows of the run's crop size, --window-batch at a time, streamed into an accumulator: besides the image, its
label map and its overlay (7 bytes a pixel), memory stays within --memory-mb whatever the image's height.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cli  # noqa: E402
import common  # noqa: E402
from datasets import IMAGE_SUFFIXES  # noqa: E402


def list_images(folder: str) -> list[Path]:
    if not Path(folder).is_dir():
        sys.exit(f"--images {folder}: no such folder")
    images = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        sys.exit(f"--images {folder}: no image files in this folder (expected {', '.join(IMAGE_SUFFIXES)})")
    stems = {}
    for path in images:  # outputs are named <stem>.png: a.jpg and a.png would overwrite each other
        if path.stem in stems:
            sys.exit(f"--images {folder}: {stems[path.stem].name} and {path.name} would both be written as "
                     f"{path.stem}.png; rename one")
        stems[path.stem] = path
    return images


def overlay(image: Image.Image, labels: np.ndarray, palette: list, alpha: float, legend: np.ndarray) -> Image.Image:
    """The class colours blended over the image (alpha), strip by strip (a few MB at a time), the legend below."""
    width, height = image.size
    colours = np.array(palette, np.float32)
    out = np.empty((height + legend.shape[0], width, 3), np.uint8)
    step = max(1, (1 << 20) // width)
    for top in range(0, height, step):
        rgb = np.asarray(image.crop((0, top, width, min(top + step, height))), np.float32)
        out[top:top + len(rgb)] = rgb * (1 - alpha) + colours[labels[top:top + len(rgb)]] * alpha
    out[height:] = legend
    return Image.fromarray(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=cli.description(__doc__))
    parser.add_argument("--weights", required=True, help="a model_*.pt file written by a method script")
    parser.add_argument("--images", required=True, help="folder of images (" + ", ".join(IMAGE_SUFFIXES) + ")")
    parser.add_argument("--out", required=True, help="output folder: labels/ and overlays/ are written in it")
    parser.add_argument("--mode", choices=["auto", "whole", "sliding"], default="auto",
                        help="auto: the run's --eval-mode, and sliding windows for images over --max-whole-pixels")
    parser.add_argument("--window", type=cli.positive_int, nargs=2, metavar=("H", "W"),
                        help="sliding window size (default: the run's --crop-size)")
    parser.add_argument("--window-batch", type=cli.positive_int, default=8, help="sliding windows per network forward")
    parser.add_argument("--max-whole-pixels", type=cli.positive_int, default=1024 * 1024,
                        help="auto mode: larger images (after --image-scale) use sliding windows")
    parser.add_argument("--memory-mb", type=cli.positive_float, default=256.0,
                        help="sliding windows: the most memory the class probabilities may hold at once")
    parser.add_argument("--image-scale", type=cli.bounded(float, "[0.05, 4]"),
                        help="resize factor before inference (default: the run's)")
    parser.add_argument("--alpha", type=cli.probability, default=0.5,
                        help="opacity of the class colours in the overlays")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        segment = common.load_segmenter(args.weights, device=args.device, mode=args.mode, window=args.window,
                                        window_batch=args.window_batch, max_whole_pixels=args.max_whole_pixels,
                                        image_scale=args.image_scale, memory_mb=args.memory_mb)
    except (OSError, ValueError) as error:
        sys.exit(f"--weights {error}")
    images = list_images(args.images)
    out = Path(args.out)
    try:
        for folder in (out / "labels", out / "overlays"):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        sys.exit(f"--out {out}: cannot create the output folders ({error.strerror or error})")
    flat_palette = [v for colour in segment.palette for v in colour]
    for path in images:
        try:
            image = segment.read(path)
            mode = segment.mode_for(*image.size)
            labels = segment(image)
        except (OSError, ValueError) as error:
            sys.exit(f"--images: {' '.join(str(error).split())}")
        indices = Image.fromarray(labels)
        indices.putpalette(flat_palette)  # grayscale -> palette PNG: values stay class indices, viewers show colours
        present = sorted(set(np.unique(labels).tolist()))  # the legend lists the classes in this image
        legend = common.class_legend([segment.class_names[c] for c in present], [segment.palette[c] for c in present],
                                     image.size[0], scale=max(1.0, image.size[0] / 800))
        try:
            indices.save(out / "labels" / f"{path.stem}.png")
            overlay(image, labels, segment.palette, args.alpha, legend).save(out / "overlays" / f"{path.stem}.png")
        except OSError as error:
            sys.exit(f"--out {out}: cannot write {path.stem}.png ({error.strerror or error})")
        print(f"{path.name}: {image.size[0]}x{image.size[1]}, {mode}", flush=True)
    print(f"wrote {len(images)} label maps to {out / 'labels'} and overlays to {out / 'overlays'}")


if __name__ == "__main__":
    main()
