"""Segment a folder of images with saved weights (OUT/model_best.pt or model_last.pt of any method): one
class-index PNG and one colour overlay PNG per image, both at the input's size.

  python scripts/predict.py --weights runs/supervised_camvid_1-30_s0/model_best.pt --images photos/ --out predictions/

Writes OUT/labels/<name>.png (palette PNG: each pixel's value is its class index, and image viewers show the
dataset's class colours) and OUT/overlays/<name>.png (the image with the class colours blended over it, and a
legend of the classes below it). The command line of Segmenter, the Python API (below): each image is first
resized by the run's --image-scale (the scale the network was trained at, e.g. 0.5 for a run made at half resolution),
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


# ---- The Python API: a run's weights as a function from images to label maps ------------------------------
class Segmenter:
    """A run's saved weights as a function from images to label maps: the Python API (main() below is its command
    line).

        from scripts.predict import load_segmenter   # from the repository root
        segment = load_segmenter("runs/supervised_camvid_1-30_s0/model_best.pt")
        labels = segment("photo.jpg")   # or a PIL image, or an H x W x 3 uint8 array -> H x W uint8 class indices

    Each image is resized by the run's --image-scale (`image_scale` overrides it), classified whole (the run's
    --eval-mode) or in sliding windows of the run's crop (`window`; auto mode: for images of more than
    `max_whole_pixels` after the resize), the class probabilities are brought back to the input's size
    (bilinear) and the argmax is taken there. Sliding windows are streamed, `window_batch` per forward, into an
    accumulator of the window rows under way; its finished rows become labels strip by strip. So besides the
    image and its label map, the probabilities held at once stay within `memory_mb` whatever the image's height
    (a band of window rows grows with the width: an image too wide for `memory_mb` is refused). Bad input raises
    FileNotFoundError or ValueError naming the file."""

    def __init__(self, weights, device=None, mode="auto", window=None, window_batch=8, max_whole_pixels=1 << 20,
                 image_scale=None, memory_mb=256.0):
        saved = common.load_weights(weights)
        args = saved["args"]
        self.num_classes = saved["model"]["classifier.weight"].shape[0]
        self.class_names, self.palette = _class_names_and_palette(saved, self.num_classes)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = common.build_model(args["backbone"], self.num_classes, "none", args["output_stride"],
                                        args["decoder_channels"])
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as error:
            raise ValueError(f"{weights}: the weights do not fit the network its arguments describe "
                             f"({' '.join(str(error).split())[:200]})") from None
        self.model.to(self.device).eval()
        mean, std = common.normalization(args["backbone"])
        self.mean, self.std = (torch.tensor(v, device=self.device).view(3, 1, 1) for v in (mean, std))
        self.scale = image_scale if image_scale is not None else args.get("image_scale", 1.0)
        self.window, self.eval_mode = tuple(window or args["crop_size"]), args.get("eval_mode", "whole")
        self.mode, self.window_batch, self.max_whole_pixels = mode, window_batch, max_whole_pixels
        self.memory = memory_mb * 2 ** 20
        if mode not in ("auto", "whole", "sliding") or window_batch < 1 or not self.memory > 0 or not self.scale > 0:
            raise ValueError(f"expected mode auto/whole/sliding, window_batch >= 1, memory_mb > 0 and image_scale > 0; "
                             f"got {mode!r}, {window_batch}, {memory_mb}, {self.scale}")

    @staticmethod
    def read(path):
        """The image file as 8-bit RGB (datasets.read_image: a 16- or 32-bit image is refused, not clipped)."""
        from datasets import read_image
        return read_image(Path(path))

    def mode_for(self, width: int, height: int) -> str:
        """'whole' or 'sliding' for an image of this size (before the resize)."""
        if self.mode != "auto":
            return self.mode
        pixels = max(1, round(width * self.scale)) * max(1, round(height * self.scale))
        return "sliding" if pixels > self.max_whole_pixels else self.eval_mode

    @torch.no_grad()
    def __call__(self, image) -> np.ndarray:
        from PIL import Image
        from datasets import require_8_bit
        if isinstance(image, (str, Path)):
            image = self.read(image)
        elif isinstance(image, Image.Image):
            require_8_bit(image.mode, "the image")
            image = image.convert("RGB")
        else:
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
                raise ValueError(f"expected an H x W x 3 (or H x W) uint8 array, got {array.dtype} {array.shape}")
            image = Image.fromarray(array).convert("RGB")
        width, height = image.size
        mode = self.mode_for(width, height)
        if self.scale != 1.0:
            image = image.resize((max(1, round(width * self.scale)), max(1, round(height * self.scale))),
                                 Image.BILINEAR)
        pixels = np.asarray(image)
        labels = np.empty((height, width), np.uint8)
        bands = self._whole(pixels) if mode == "whole" else self._sliding(pixels)
        for first, last, rows in _resized_strips(bands, pixels.shape[:2], (height, width), self.memory / 2):
            labels[first:last] = rows.argmax(0).cpu().numpy()
        return labels

    def _normalized(self, pixels) -> torch.Tensor:
        x = torch.from_numpy(pixels.copy()).to(self.device).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std

    def _whole(self, pixels):
        yield 0, self.model(self._normalized(pixels)[None]).float().softmax(1)[0]

    def _sliding(self, pixels):
        """(first row, probabilities of the rows from there that no later window touches), top to bottom: the
        windows of common.predict's sliding mode, in its order, summed and averaged the same way."""
        h, w = pixels.shape[:2]
        wh, ww, boxes = common.sliding_windows(h, w, self.window)
        band_rows = int(self.memory / 2 // ((self.num_classes + 1) * w * 4 * 2))  # accumulator, counts, a copy
        if band_rows < wh:
            raise ValueError(f"one band of windows ({wh} rows) of this {w}-pixel-wide image needs "
                             f"{(self.num_classes + 1) * w * wh * 16 / 2 ** 20:.3g} MB, more than the memory limit "
                             f"({self.memory / 2 ** 20:.3g} MB): raise it or lower the image scale")
        total = torch.zeros(self.num_classes, 0, w, device=self.device)
        count = torch.zeros(0, w, device=self.device)
        top, k = 0, 0
        while k < len(boxes):
            end = k + 1  # windows of this forward: at most window_batch, their rows within the band's budget
            while end < len(boxes) and end - k < self.window_batch and boxes[end][0] + wh - top <= band_rows:
                end += 1
            bottom = boxes[end - 1][0] + wh
            if bottom - top > total.shape[1]:
                grow = bottom - top - total.shape[1]
                total = torch.cat([total, total.new_zeros(self.num_classes, grow, w)], 1)
                count = torch.cat([count, count.new_zeros(grow, w)])
            crops = torch.stack([self._normalized(pixels[y:y + wh, x:x + ww]) for y, x in boxes[k:end]])
            for (y, x), p in zip(boxes[k:end], self.model(crops).float().softmax(1)):
                total[:, y - top:y - top + wh, x:x + ww] += p
                count[y - top:y - top + wh, x:x + ww] += 1
            k = end
            done = boxes[k][0] if k < len(boxes) else h  # rows above the next window are final
            if done > top:
                yield top, total[:, :done - top] / count[:done - top]
                total, count, top = total[:, done - top:], count[done - top:], done


def _resized_strips(bands, size, out_size, memory: float):
    """Probability bands (first row, [K, n, w]) of an h x w map, top to bottom, resized to H x W as
    common.upsample() does (bilinear, align_corners=True) and yielded as (first, last, [K, last - first, W]) strips
    of at most `memory` bytes; a band is kept only until the output rows that need it are out."""
    (h, w), (H, W) = size, out_size

    def source(n_in, n_out):  # source index pair and weight of every output index, as torch's CPU kernel
        scale = torch.tensor(float(n_in - 1)) / (n_out - 1) if n_out > 1 else torch.tensor(0.0)
        real = scale * torch.arange(n_out, dtype=torch.float32)
        low = real.floor().long().clamp(max=n_in - 1)
        return low, (low + 1).clamp(max=n_in - 1), (real - low).clamp(0, 1)

    y0, y1, ty = source(h, H)
    x0, x1, tx = source(w, W)
    kept, kept_top, first = None, 0, 0
    for top, band in bands:
        if (h, w) == (H, W):  # no resize: the band's rows are the output's
            yield top, top + band.shape[1], band
            continue
        kept = band if kept is None else torch.cat([kept, band], 1)
        available = top + band.shape[1]
        last = int((y1 < available).sum())  # output rows whose two source rows are in
        step = max(1, int(memory // (band.shape[0] * W * 4 * 3)))
        for a in range(first, last, step):
            b = min(a + step, last)
            x0d, x1d, txd = x0.to(band.device), x1.to(band.device), tx.to(band.device)
            r0, r1 = y0[a:b].to(band.device) - kept_top, y1[a:b].to(band.device) - kept_top
            lower, upper = kept[:, r0], kept[:, r1]
            lower = lower[:, :, x0d] * (1 - txd) + lower[:, :, x1d] * txd
            upper = upper[:, :, x0d] * (1 - txd) + upper[:, :, x1d] * txd
            t = ty[a:b].to(band.device)[None, :, None]
            yield a, b, lower * (1 - t) + upper * t
        first = last
        if first < H:  # drop the source rows no later output row needs
            keep_from = int(y0[first])
            kept, kept_top = kept[:, keep_from - kept_top:], keep_from


def _class_names_and_palette(saved: dict, num_classes: int) -> tuple[list, list]:
    """The class names and colours saved with the weights; for weights saved without them, the dataset's own,
    else class numbers and fixed colours."""
    if saved.get("class_names") and saved.get("palette"):
        return list(saved["class_names"]), [tuple(c) for c in saved["palette"]]
    from datasets import CLASSES
    names, palette = CLASSES.get(saved["args"].get("dataset"), (None, None))
    if names is None or len(names) != num_classes:
        names = [str(c) for c in range(num_classes)]
        palette = [tuple(np.random.default_rng([7, c]).integers(0, 256, 3).tolist()) for c in range(num_classes)]
    return list(names), palette


def load_segmenter(weights, **options) -> Segmenter:
    """Segmenter(weights, **options): a run's weights (OUT/model_best.pt) as a function from images to label maps."""
    return Segmenter(weights, **options)


# ---- The command line ---------------------------------------------------------------------------------------
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
        segment = load_segmenter(args.weights, device=args.device, mode=args.mode, window=args.window,
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
