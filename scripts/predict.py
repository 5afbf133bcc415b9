"""Segment a folder of images with saved weights (OUT/model_best.pt or model_last.pt of any method): one
class-index PNG and one colour overlay PNG per image, both at the input's size.

  python scripts/predict.py --weights runs/supervised_camvid_1-8_s0/model_best.pt --images photos/ --out predictions/

Writes OUT/labels/<name>.png (palette PNG: each pixel's value is its class index, and image viewers show the
dataset's class colours) and OUT/overlays/<name>.png (the image with the class colours blended over it). Each
image is first resized by the run's --image-scale (the scale the network was trained at; CamVid runs see
half-resolution images), the class probabilities are brought back to the input's size, and the argmax is taken
there. Inference mode: the run's --eval-mode, except that images of more than --max-whole-pixels pixels (after
the resize) go through sliding windows of the run's crop size, batched --window-batch at a time, so memory
stays bounded on large photos.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import draw_segmentation_masks  # noqa: E402

import common  # noqa: E402
import datasets  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PALETTES = {"voc": datasets.voc_palette(), "cityscapes": datasets.CITYSCAPES_PALETTE,
            "camvid": datasets.CAMVID_PALETTE, "toy": datasets.TOY_PALETTE}


class WindowBatches(nn.Module):
    """The network applied to a batch in chunks of `size` images. common.predict stacks every sliding window
    of an image into one batch; on a large photo that is hundreds of windows, and the network's activations
    for all of them at once would not fit in memory."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(chunk) for chunk in x.split(self.size)])


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


def read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:
        sys.exit(f"--images: cannot read {path} as an image ({' '.join(str(error).split())})")


@torch.no_grad()
def segment(model: nn.Module, image: Image.Image, num_classes: int, mean, std, scale: float, mode: str,
            window, device) -> torch.Tensor:
    """Class index [H, W] at the input's size. The resize is PIL's bilinear, as the training loader's."""
    width, height = image.size
    if scale != 1.0:
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    x = ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0).to(device)
    probs = common.predict(model, x, num_classes, mode, window)
    if probs.shape[-2:] != (height, width):
        probs = common.upsample(probs, (height, width))
    return probs.argmax(1)[0].cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a model_*.pt file written by a method script")
    parser.add_argument("--images", required=True, help="folder of images (" + ", ".join(IMAGE_SUFFIXES) + ")")
    parser.add_argument("--out", required=True, help="output folder: labels/ and overlays/ are written in it")
    parser.add_argument("--mode", choices=["auto", "whole", "sliding"], default="auto",
                        help="auto: the run's --eval-mode, and sliding windows for images over --max-whole-pixels")
    parser.add_argument("--window", type=int, nargs=2, metavar=("H", "W"),
                        help="sliding window size (default: the run's --crop-size)")
    parser.add_argument("--window-batch", type=int, default=8, help="sliding windows per network forward")
    parser.add_argument("--max-whole-pixels", type=int, default=1024 * 1024,
                        help="auto mode: larger images (after --image-scale) use sliding windows")
    parser.add_argument("--image-scale", type=float, help="resize factor before inference (default: the run's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours in the overlays")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli = parser.parse_args(argv)
    if cli.window_batch <= 0:
        parser.error(f"--window-batch must be positive, got {cli.window_batch}")
    saved = common.load_weights(cli.weights)
    images = list_images(cli.images)
    args = saved["args"]
    num_classes = saved["model"]["classifier.weight"].shape[0]
    palette = PALETTES.get(args["dataset"])
    if palette is None or len(palette) < num_classes:  # a dataset not listed in PALETTES: fixed random colours
        palette = [tuple(np.random.default_rng([7, c]).integers(0, 256, 3).tolist()) for c in range(num_classes)]
    model = common.build_model(args["backbone"], num_classes, "none", args["output_stride"], args["decoder_channels"])
    model.load_state_dict(saved["model"])
    model.to(cli.device).eval()
    windowed = WindowBatches(model, cli.window_batch)
    mean, std = common.normalization(args["backbone"])
    scale = cli.image_scale if cli.image_scale is not None else args.get("image_scale", 1.0)
    window = cli.window or args["crop_size"]
    out = Path(cli.out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    flat_palette = [v for colour in palette[:num_classes] for v in colour]
    for path in images:
        image = read_rgb(path)
        scaled_pixels = round(image.size[0] * scale) * round(image.size[1] * scale)
        mode = cli.mode
        if mode == "auto":
            mode = "sliding" if scaled_pixels > cli.max_whole_pixels else args.get("eval_mode", "whole")
        label = segment(windowed, image, num_classes, mean, std, scale, mode, window, cli.device)
        indices = Image.fromarray(label.numpy().astype(np.uint8))
        indices.putpalette(flat_palette)  # grayscale -> palette PNG: values stay class indices, viewers show colours
        indices.save(out / "labels" / f"{path.stem}.png")
        rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        masks = label.unsqueeze(0) == torch.arange(num_classes).view(-1, 1, 1)
        overlay = draw_segmentation_masks(rgb, masks, alpha=cli.alpha, colors=[tuple(c) for c in palette])
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(out / "overlays" / f"{path.stem}.png")
        print(f"{path.name}: {image.size[0]}x{image.size[1]}, {mode}", flush=True)
    print(f"wrote {len(images)} label maps to {out / 'labels'} and overlays to {out / 'overlays'}")


if __name__ == "__main__":
    main()
