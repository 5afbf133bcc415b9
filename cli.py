"""The command line of every method script: the shared flags, their checks, the per-dataset defaults that fill
the flags left unset, and the run folder a command claims (its lock, args.json, which runs may continue there,
the states a crash can leave its checkpoint and logs in, Ctrl-C), and its checkpoints: written atomically,
checked file by file before a resume loads them.

Nothing here imports torch at import time, on purpose: each method parses its command line before it imports
torch and the rest of the project, so `--help` and a mistyped flag answer at once instead of after the seconds
that loading torch takes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from fractions import Fraction
from pathlib import Path

# The names common.build_model accepts: its RESNETS and LITE_STAGES (tests/test_common.py checks that they agree).
BACKBONES = ["resnet18", "resnet50", "resnet101", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]

# The field's per-dataset conventions: UniMatch's configs (`LiheYoung/UniMatch@0324f3d configs/pascal.yaml`,
# `cityscapes.yaml`; SGD momentum 0.9, wd 1e-4, poly 0.9 in supervised.py:113-115, 182-184). A method overrides
# what its paper changes; camvid and toy are this project's CPU settings (not from any paper), and a folder
# dataset (your own data) starts from CamVid's, with the method's CamVid values (FOLDER_DEFAULTS_FROM).
DATASET_DEFAULTS = {
    "voc": dict(backbone="resnet101", pretrained="imagenet", output_stride=16, decoder_channels=256,
                crop_size=[321, 321], image_scale=1.0, global_batch=8, global_unlabeled_batch=8, lr=0.001,
                head_lr_mult=10.0, weight_decay=1e-4, epochs=80, eval_mode="whole"),
    "cityscapes": dict(backbone="resnet101", pretrained="imagenet", output_stride=16, decoder_channels=256,
                       crop_size=[801, 801], image_scale=1.0, global_batch=8, global_unlabeled_batch=8, lr=0.005,
                       head_lr_mult=1.0, weight_decay=1e-4, epochs=240, eval_mode="sliding"),
    # CamVid: protocol v3, chosen on supervised runs only (results/camvid_protocol.md): full 480x360 frames,
    # 192x256 crops, head lr x10 (as UniMatch's configs), 3,200 iterations, 13 labels (1/30) spread over each sequence
    "camvid": dict(backbone="efficientnet_lite0", pretrained="imagenet", output_stride=16, decoder_channels=64,
                   crop_size=[192, 256], image_scale=1.0, global_batch=8, global_unlabeled_batch=8, lr=0.01,
                   head_lr_mult=10.0, weight_decay=1e-4, iters=3200, eval_every=400, eval_mode="whole",
                   cache_images=True, labeled_draw="spread", split="1/30"),
    "toy": dict(backbone="resnet18", pretrained="none", output_stride=16, decoder_channels=32, crop_size=[48, 64],
                image_scale=1.0, global_batch=8, global_unlabeled_batch=8, lr=0.01, head_lr_mult=1.0,
                weight_decay=1e-4, iters=300, eval_every=100, eval_mode="whole"),
}
FOLDER_DEFAULTS_FROM = "camvid"
# Ours: the folder's images may be many and large, so decoded images are not kept in the workers unless asked.
DATASET_DEFAULTS["folder"] = {**DATASET_DEFAULTS[FOLDER_DEFAULTS_FROM], "cache_images": False, "split": "full",
                              "labeled_draw": "random"}
# --split: the field's 1/8 of a labeled pool; on your own data every train image with a mask is labeled.
for _conventions in DATASET_DEFAULTS.values():
    _conventions.setdefault("split", "1/8")


# ----------------------------------------------------------------------------------------------------------
# Value checks: a bad value stops at the argparse line that names its flag, not deep inside training
# ----------------------------------------------------------------------------------------------------------
def bounded(kind: type, interval: str, expected: str | None = None):
    """An argparse type: a number of `kind` (int or float) in `interval`, written as in mathematics ("[0, 1)",
    "(0, inf)"); nan and inf are never in it. A value outside stops at argparse's one line naming the flag and the
    range ("argument --lr: expected a number in (0, 10], got '1e308'"); `expected` words the range otherwise."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    low_open, high_open = interval[0] == "(", interval[-1] == ")"
    if expected is None and high == float("inf"):
        expected = f"{'an integer' if kind is int else 'a finite number'} {'>' if low_open else '>='} {low:g}"
    elif expected is None:
        expected = f"{'an integer' if kind is int else 'a number'} in {interval}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        inside = (value is not None and (kind is int or math.isfinite(value))
                  and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} in {interval}"  # how argparse names the type in its own messages
    return parse


positive_int = bounded(int, "[1, inf)", "a positive integer")
non_negative_int = bounded(int, "[0, inf)")
positive_float = bounded(float, "(0, inf)")
non_negative_float = bounded(float, "[0, inf)")  # loss weights
probability = bounded(float, "[0, 1]")  # probabilities, confidence thresholds, caps of EMA decays


def parse_split(text: str) -> str | int | Fraction:
    """'full', a label count ('183') or a fraction of the labeled pool in (0, 1] ('1/8'); ValueError saying what
    is expected otherwise. datasets.split_count turns it into a number of images."""
    expected = "expected 'full', a fraction in (0, 1] such as 1/8, or a label count such as 183"
    if text == "full":
        return text
    try:
        value = Fraction(text) if "/" in text else int(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(expected) from None
    if not (0 < value <= 1 if isinstance(value, Fraction) else value > 0):
        raise ValueError(expected)
    return value


def split_type(text: str) -> str:
    try:
        parse_split(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return text


def available_cores() -> int:
    """Cores this process may run on: its affinity mask where the system has one (containers, job schedulers
    and `taskset` restrict it below os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------
def description(doc: str) -> str:
    """--help's description: the first sentence of a script's docstring, whole (its first paragraph, up to the
    first full stop outside parentheses), on one line."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "." and depth == 0 and text[i + 1:i + 2] in ("", " "):
            return text[:i + 1]
    return text


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help ends every flag's line with its default. (argparse's ArgumentDefaultsHelpFormatter would print
    'default: None' for the flags filled per dataset; resolve_args writes their per-dataset values instead.)"""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def base_parser(description: str, unlabeled_stream: bool = True) -> argparse.ArgumentParser:
    """Flags shared by every method. Flags left at None are filled by resolve_args from the method's paper
    values, then from DATASET_DEFAULTS. unlabeled_stream=False (the supervised baseline): no unlabeled batch
    to size, so --unlabeled-batch-size is not offered."""
    p = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dataset", choices=[*DATASET_DEFAULTS], default="voc",
                   help="which dataset; its values fill the flags left unset (listed per dataset below); folder: "
                        "your own data under --data-root (README, 'Your own data')")
    p.add_argument("--data-root", help="dataset folder (default: data/VOC2012, data/cityscapes, data/CamVid; "
                                       "unused for toy; required for folder)")
    p.add_argument("--split", type=split_type,
                   help="labeled subset of the labeled pool: a fraction (1/8), a count (183) or 'full'")
    p.add_argument("--protocol", choices=["classic", "blender"], default="classic",
                   help="VOC only: classic draws labels from the 1,464 fine images (1/8 = 183), blender from all "
                        "10,582 (1/8 = 1,323)")
    p.add_argument("--labeled-draw", choices=["spread", "random"],
                   help="how --split draws the labeled images from --seed: 'random' uniformly, as the field's split "
                        "files are; 'spread' (CamVid only) evenly over each video sequence, no two neighbouring frames")
    p.add_argument("--split-dir", help="folder with labeled.txt / unlabeled.txt (UniMatch or U2PL format) "
                                       "instead of --split; the run is named list-<folder name>")
    p.add_argument("--backbone", choices=BACKBONES)
    p.add_argument("--pretrained", help="imagenet, none, or the path of a backbone state dict")
    p.add_argument("--output-stride", type=int, choices=[16, 8])
    p.add_argument("--decoder-channels", type=positive_int, help="width of ASPP and decoder (256 in DeepLabv3+)")
    p.add_argument("--crop-size", type=positive_int, nargs="+", help="one size (square) or H W")
    p.add_argument("--image-scale", type=bounded(float, "[0.05, 4]"),
                   help="resize every image and mask by this factor when read (0.05 to 4, a range of ours: a toy "
                        "scene at 0.05 is 3x4 pixels and still trains)")
    p.add_argument("--batch-size", type=positive_int,
                   help="labeled images per process and iteration (default: the paper's global batch divided "
                        "by the number of processes)")
    # Hidden rather than absent without an unlabeled stream: a command line shared by every method (such as
    # scripts/camvid_table.py's protocol) still runs the baseline; the baseline never reads the value.
    p.add_argument("--unlabeled-batch-size", type=positive_int,
                   help="unlabeled images per process and iteration (default: as --batch-size when that is given, "
                        "else the paper's global unlabeled batch divided by the number of processes)"
                   if unlabeled_stream else argparse.SUPPRESS)
    # The ranges of --lr, --head-lr-mult and --weight-decay are ours: far beyond any paper's values, yet finite
    # for SGD (lr x mult x decay), so a typo stops here rather than as a non-finite loss.
    p.add_argument("--lr", type=bounded(float, "(0, 10]"),
                   help="backbone learning rate (the head uses lr x --head-lr-mult)")
    p.add_argument("--head-lr-mult", type=bounded(float, "(0, 100]"),
                   help="learning-rate factor of ASPP, decoder and classifier")
    p.add_argument("--weight-decay", type=bounded(float, "[0, 1]"))
    p.add_argument("--epochs", type=positive_int, help="training length in epochs (the method says what an epoch "
                                                       "is); --iters wins when both are set")
    p.add_argument("--iters", type=positive_int, help="training length in iterations; wins over --epochs")
    p.add_argument("--eval-every", type=positive_int, help="iterations between evaluations (where no value is "
                                                           "listed: once per epoch)")
    p.add_argument("--eval-mode", choices=["whole", "sliding"])
    p.add_argument("--eval-test", choices=["end", "every", "never"], default="end",
                   help="evaluate the test split (where the dataset has one with labels, e.g. CamVid) with the last "
                        "weights at the end of the run, at every evaluation as well (a learning curve; select "
                        "nothing on it), or never")
    p.add_argument("--out", help="run folder (default runs/<method>_<dataset>_<split>_s<seed>)")
    # up to 2**31 - 1: each process seeds numpy with --seed + its index, which must stay below 2**32
    p.add_argument("--seed", type=bounded(int, "[0, 2147483647]"), default=0,
                   help="seed of the split, the initialisation and the streams")
    p.add_argument("--stop-at", type=positive_int, help="checkpoint and exit after this iteration (time-limited "
                                                        "jobs); the schedule still runs to --iters, continue with "
                                                        "--resume auto")
    p.add_argument("--resume", default="auto", help="auto (continue OUT's last checkpoint if any), PATH or none")
    p.add_argument("--num-workers", type=non_negative_int, default=min(4, available_cores()),
                   help="loader worker processes per training process (at most 4, and no more than this "
                        "machine's cores)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction,
                   help="keep decoded (rescaled) images in each loader worker's memory (~0.7 MB per CamVid "
                        "image and mask at full size; off for the large datasets)")
    p.add_argument("--log-every", type=positive_int, default=20, help="iterations between progress/loss updates")
    p.add_argument("--num-overlays", type=non_negative_int, default=4,
                   help="val images drawn as PNG overlays per eval")
    p.add_argument("--log-with", choices=["tensorboard", "wandb"],
                   help="also log losses, lr, every mIoU and the overlays to an Accelerate tracker (pip install -r "
                        "requirements-extra.txt; wandb offline: WANDB_MODE=offline)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run of this project (deletes its checkpoints, "
                        "weights and logs, nothing else)")
    p.add_argument("--allow-code-change", action="store_true",
                   help="continue a run (--resume) with code other than the commit it last ran under (args.json "
                        "lists them): the continuation may not be what one run of either code would give")
    p.add_argument("--check-data", action=argparse.BooleanOptionalAction, default=True,
                   help="decode every image and mask before training (each file once; remembered in "
                        "~/.cache/semiseg-ref) and check their sizes and the mask values")
    return p


def _show_dataset_defaults(parser: argparse.ArgumentParser, method_defaults: dict) -> None:
    """End the help of every flag that resolve_args fills per dataset with the value it gets on each dataset
    (unless its help says its default itself)."""
    for action in parser._actions:
        if (action.default is not None or not action.option_strings or action.help == argparse.SUPPRESS
                or "default" in (action.help or "")):
            continue
        shown = {}
        for dataset, conventions in DATASET_DEFAULTS.items():
            value = {**conventions, **method_table(method_defaults, dataset)}.get(action.dest)
            if value is None and isinstance(action, argparse.BooleanOptionalAction):
                value = False  # a switch that no table turns on is off
            if value is not None:
                shown[dataset] = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        if not shown:
            continue
        if len(shown) == len(DATASET_DEFAULTS) and len(set(shown.values())) == 1:
            note = f"(default: {next(iter(shown.values()))})"
        else:
            note = "(default: " + ", ".join(f"{dataset} {value}" for dataset, value in shown.items()) + ")"
        if note not in (action.help or ""):
            action.help = f"{action.help} {note}" if action.help else note


def _looks_negative(text: str) -> bool:
    return text[:1] == "-" and (text[1:2].isdigit() or text[1:2] == "."
                                or text[1:].lower() in ("inf", "infinity", "nan"))


def method_table(method_defaults: dict, dataset: str) -> dict:
    """A method's per-dataset values; a folder dataset takes the method's CamVid values (the CPU settings)."""
    return method_defaults.get(dataset, method_defaults.get(FOLDER_DEFAULTS_FROM, {}) if dataset == "folder" else {})


def read_split_list(parser: argparse.ArgumentParser, split_dir: str) -> dict:
    """What args.json records of a --split-dir: its path, its number of labeled images and the sha256 of each list
    (`sha256sum labeled.txt unlabeled.txt` prints the same), so that a run names the exact list it used."""
    import hashlib
    record = {"path": str(Path(split_dir).resolve())}
    for name in ("labeled.txt", "unlabeled.txt"):
        try:
            content = (Path(split_dir) / name).read_bytes()
        except OSError as error:
            parser.error(f"--split-dir {split_dir}: cannot read {name} ({error.strerror or error}); expected "
                         f"labeled.txt and unlabeled.txt")
        if name == "labeled.txt":
            record["labels"] = sum(1 for line in content.decode(errors="replace").splitlines() if line.strip())
        record[f"{name.split('.')[0]}_sha256"] = hashlib.sha256(content).hexdigest()
    return record


def resolve_args(parser: argparse.ArgumentParser, method_defaults: dict, method: str, argv=None) -> argparse.Namespace:
    """Parse, then fill every flag left at None from method_defaults[dataset] (the paper's values), then from
    DATASET_DEFAULTS[dataset] (the field's conventions). --iters wins over --epochs. A switch that nothing sets
    is False, so args.json holds true/false."""
    _show_dataset_defaults(parser, method_defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse (Python 3.11) reads "--split -1/8", "--lr -1e-3" or "--lr -inf" as the flag followed by an unknown
    # option and says only "expected one argument"; glued as "--lr=-inf" the value reaches the flag's type, which
    # says what is expected.
    for i in range(len(argv) - 2, -1, -1):
        action = parser._option_string_actions.get(argv[i])
        if action is not None and action.nargs is None and _looks_negative(argv[i + 1]):
            argv[i:i + 2] = [f"{argv[i]}={argv[i + 1]}"]
    args = parser.parse_args(argv)
    if args.split_dir is not None and args.split is not None:
        parser.error("--split and --split-dir: give one (--split-dir's lists decide the labeled images)")
    epochs_only = args.epochs is not None and args.iters is None
    for table in (method_table(method_defaults, args.dataset), DATASET_DEFAULTS[args.dataset]):
        for key, value in table.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    for action in parser._actions:
        if isinstance(action, argparse.BooleanOptionalAction) and getattr(args, action.dest) is None:
            setattr(args, action.dest, False)
    if epochs_only:
        args.iters = None  # the user asked for epochs: an iteration default must not override them
    if args.data_root is None and args.dataset == "folder":
        parser.error("--dataset folder needs --data-root DATA (DATA/images/train, DATA/masks/train, DATA/images/val, "
                     "DATA/masks/val, DATA/classes.txt)")
    if args.data_root is None:
        args.data_root = {"voc": "data/VOC2012", "cityscapes": "data/cityscapes",
                          "camvid": "data/CamVid", "toy": ""}[args.dataset]
    if len(args.crop_size) not in (1, 2):
        parser.error("--crop-size takes one size (square) or H W")
    args.crop_size = list(args.crop_size) * (2 // len(args.crop_size))
    if args.labeled_draw is None:
        args.labeled_draw = "random"
    if args.labeled_draw == "spread" and args.dataset != "camvid":
        parser.error(f"--labeled-draw spread needs video sequences in the file names (CamVid); --dataset "
                     f"{args.dataset} draws 'random'")
    if args.iters is None and args.epochs is None:
        parser.error("give --iters or --epochs")
    if args.split_dir is not None:
        args.split_list = read_split_list(parser, args.split_dir)
        args.split = f"list-{Path(args.split_list['path']).name}"  # names the run; the lists decide the labels
    if args.out is None:
        dataset = args.dataset if args.dataset != "folder" else f"folder-{Path(args.data_root).resolve().name}"
        args.out = f"runs/{method}_{dataset}_{args.split.replace('/', '-')}_s{args.seed}"
    args.method = method
    return args


# ----------------------------------------------------------------------------------------------------------
# The run folder (common.setup claims it): one run at a time (run.lock), one set of arguments and code
# (args.json), a Ctrl-C that says where to continue
# ----------------------------------------------------------------------------------------------------------
# Flags that change how a run is driven, never what it computes: they may differ when a run is continued.
RUN_CONTROL_FLAGS = {"out", "resume", "stop_at", "overwrite", "num_workers", "log_every", "num_overlays", "log_with",
                     "cache_images", "check_data", "eval_test", "allow_code_change"}
PROVENANCE_KEYS = {"git_commit", "git_commits", "versions"}
LOCK_FILE = "run.lock"  # flock-ed by the main process for the run's life: one run per folder at a time
RUN_FILES = ["checkpoints", "model_best.pt", "model_last.pt", "metrics.jsonl", "train.jsonl", "overlays", "log.txt",
             "args.json", LOCK_FILE]


def provenance() -> dict:
    """The code and packages a run used, recorded in args.json: `git_commits` lists every code version the run
    ran under: the last commit that changed a Python file a run uses (those outside tests/), so that a commit of
    results or docs alone is not a code change and a run continues across it; uncommitted changes to those files
    are named by a hash of their diff (an edit between two resumes is seen too)."""
    import hashlib
    import platform
    import subprocess
    from importlib import metadata

    def git(*arguments):
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *arguments], capture_output=True,
                              text=True, timeout=30).stdout
    code = ("--", "*.py", ":!tests")
    try:
        commit = git("rev-list", "-1", "HEAD", *code).strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        commit = commit or git("rev-parse", "HEAD").strip() or "unknown"
        diff = git("diff", "HEAD", *code)
        if diff and commit != "unknown":
            commit += f" (with uncommitted changes {hashlib.sha256(diff.encode()).hexdigest()[:12]})"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "accelerate", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"git_commits": [commit], "versions": versions}


def run_in_folder(out: Path) -> bool:
    """Does OUT hold results of a run (a checkpoint, weights or metrics)? args.json and log.txt alone, left by
    a run that stopped before its first evaluation, hold nothing to lose."""
    return any((out / name).exists() for name in ("checkpoints", "model_best.pt", "model_last.pt", "metrics.jsonl"))


ABSENT = "(absent)"


def changed_args(current: dict, saved: dict, ignore=frozenset()) -> list[str]:
    """The argument names whose values differ between two runs' records (RUN_CONTROL_FLAGS, provenance and `ignore`
    aside). A flag only one side knows counts: a run made before a flag existed may have run what its default no
    longer does."""
    keys = (current.keys() | saved.keys()) - RUN_CONTROL_FLAGS - PROVENANCE_KEYS - set(ignore)
    return sorted(k for k in keys if current.get(k, ABSENT) != saved.get(k, ABSENT))


def claim_run_folder(args: argparse.Namespace, out: Path, accelerator) -> None:
    """A run folder belongs to one run at a time (OUT/run.lock) and to one set of arguments. A used folder is
    continued only with the same arguments (RUN_CONTROL_FLAGS aside; the process count counts) and code (or
    --allow-code-change), started over only with --overwrite in a folder that holds a run of ours, and never
    silently replaced; `--resume PATH` is checked against PATH's run the same way. A folder this command creates
    is removed again if the run stops before writing anything but its arguments and log. The main process
    decides (and holds the lock); the others stop with its line."""
    refusal = None
    if accelerator.is_main_process:
        try:
            _claim_run_folder(args, out)
        except SystemExit as stop:
            refusal = str(stop.code)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        sys.exit(refusal)


def _claim_run_folder(args: argparse.Namespace, out: Path) -> None:
    if out.exists() and not out.is_dir():
        sys.exit(f"--out {out}: is a file, expected a run folder")
    created, new_lock = not out.exists(), not (out / LOCK_FILE).exists()
    try:
        _lock_run_folder(out)
    except OSError as error:
        sys.exit(f"--out {out}: cannot write the run folder ({error.strerror or error})")
    if created:
        import atexit
        atexit.register(_remove_if_unused, out)
    current = {**json.loads(json.dumps(vars(args), default=str)), **provenance()}
    try:
        history, delete = _checked_run_folder(args, out, current)
    except SystemExit:
        if new_lock:  # a refused command leaves the folder as it found it
            (out / LOCK_FILE).unlink(missing_ok=True)
        raise
    try:
        for name in delete:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        write_atomically(out / "args.json", json.dumps({**current, "git_commits": history}, indent=2))
    except OSError as error:
        sys.exit(f"--out {out}: cannot write the run folder ({error.strerror or error})")


def _checked_run_folder(args: argparse.Namespace, out: Path, current: dict) -> tuple[list, list]:
    """The commits the run has run under and the files --overwrite deletes, or exit in one line."""
    history, delete = current["git_commits"], []
    if getattr(args, "overwrite", False):
        delete = [name for name in RUN_FILES if name != LOCK_FILE and (out / name).exists()]
        if delete and not {"method", "versions"} <= (_saved_args(out) or {}).keys():
            sys.exit(f"--overwrite: {out} holds no run of this project (no args.json written by a method script) "
                     f"but {', '.join(delete)}; nothing deleted: choose another --out")
    elif run_in_folder(out):
        if args.resume == "none":
            sys.exit(f"--out {out} holds a run already; continue it with --resume auto, start over there with "
                     f"--overwrite (deletes it), or choose another --out")
        history = _same_run(current, out, f"--out {out} holds a run",
                            "choose another --out, or --overwrite to start over there")
    if args.resume not in ("auto", "none") and Path(args.resume).is_dir():
        path = Path(args.resume).resolve()
        if path.parent.name != "checkpoints":
            sys.exit(f"--resume {args.resume}: cannot tell which run this checkpoint belongs to, so not whether "
                     f"its arguments are these (expected OUT/checkpoints/last beside the run's OUT/args.json)")
        history = _same_run(current, path.parent.parent, f"--resume {args.resume}: the checkpoint's run "
                            f"{path.parent.parent} ran", "resume it with that run's arguments")
    return history, delete


def _same_run(current: dict, folder: Path, refused: str, fix: str) -> list[str]:
    """Exit in one line unless the run in `folder` was made with `current`'s arguments (the process count
    included) by the same code (or --allow-code-change); returns the commits it ran under."""
    saved = _saved_args(folder)
    if saved is None:
        sys.exit(f"{refused} without a readable args.json (a JSON object of its arguments); {fix}")
    differ = changed_args(current, saved)
    if differ:
        change = ", ".join(("processes (accelerate launch --num_processes)" if k == "num_processes" else
                            f"--{k.replace('_', '-')}") + f" {saved.get(k, ABSENT)} -> {current.get(k, ABSENT)}"
                           for k in differ)
        sys.exit(f"{refused} with other arguments ({change}); {fix}")
    history = saved.get("git_commits")
    if not isinstance(history, list) or not history:  # args.json of a run made before the history was kept
        history = [saved.get("git_commit", ABSENT)]
    code = current["git_commits"][-1]
    if history[-1] != code and not current.get("allow_code_change"):
        sys.exit(f"{refused} with other code ({history[-1]} -> {code}): a resume across a code change may not be "
                 f"exact; pass --allow-code-change to continue anyway (args.json keeps the commits), or {fix}")
    return history + [code] if history[-1] != code else history


def _saved_args(folder: Path) -> dict | None:
    try:
        saved = json.loads((folder / "args.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _lock_run_folder(out: Path) -> None:
    """flock OUT/run.lock for the life of this process (the OS releases it when the process ends, killed or
    not), or exit naming the folder. The file locked must still be the one at that path: a run that removes
    its unused folder at exit may unlink it between our open and our lock."""
    import fcntl
    for _ in range(3):
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            sys.exit(f"--out {out}: another run is using this folder (process {holder or '?'} holds "
                     f"{out / LOCK_FILE}); wait for it to end, or choose another --out")
        try:
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(out / LOCK_FILE)):
                lock.truncate(0)
                lock.write(str(os.getpid()))
                lock.flush()
                _HELD_LOCKS.append(lock)
                return
        except FileNotFoundError:
            pass
        lock.close()
    sys.exit(f"--out {out}: the folder keeps being removed while this run claims it; choose another --out")


_HELD_LOCKS = []  # kept open (and so locked) until the process ends


def _remove_if_unused(out: Path) -> None:
    """atexit: a folder created by a run that stopped before its first evaluation (bad input, a crash at
    start-up) is removed, so that it neither litters nor claims the folder for those arguments."""
    if out.is_dir() and not run_in_folder(out) and all(p.name in ("args.json", "log.txt", LOCK_FILE)
                                                       for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


def stop_in_one_line_on_signals(out: Path, is_main: bool) -> None:
    """Ctrl-C (SIGINT) and SIGTERM end the run with one line saying where it can be continued from, instead of
    a KeyboardInterrupt traceback; the exit status is the shell's 128 + signal number."""
    import signal
    pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != pid:  # a loader worker forked from this process: the main process speaks
            raise KeyboardInterrupt
        if is_main:
            from tqdm import tqdm
            for bar in sorted(getattr(tqdm, "_instances", []), key=lambda bar: -abs(getattr(bar, "pos", 0))):
                bar.close()  # nested (evaluation) bars first: the bars end their lines, the message has its own
            folder = checkpoint_dir(out)
            saved = folder.is_dir() or folder.with_name("last.old").is_dir() or (folder.with_name("last.tmp")
                                                                                / COMPLETE).is_file()
            print(f"stopped by {signal.Signals(signum).name}: " + (
                f"continue the run from its last checkpoint ({folder}) with the same command (--resume auto)"
                if saved else "no checkpoint was written yet; the same command starts the run over"),
                file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


# ----------------------------------------------------------------------------------------------------------
# Its files kept whole through kills, crashes and power losses: atomic writes, the checkpoint folder's states,
# log records past the checkpoint
# ----------------------------------------------------------------------------------------------------------
COMPLETE = "COMPLETE"  # written into checkpoints/last.tmp once every process has saved: the folder is whole


def checkpoint_dir(out) -> Path:
    return Path(out) / "checkpoints" / "last"


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file, flushed to disk, renamed over `path`: a reader, a kill or a power loss
    sees the old or the new text, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(file: Path, sync: bool = False) -> str:
    """The file's sha256; sync=True also makes sure the file is on disk."""
    import hashlib
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())  # on disk before the marker says the folder is whole
    return digest.hexdigest()


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_checkpoint(out) -> None:
    """Bring OUT/checkpoints back to one whole `last` from any state a crash in save_checkpoint can leave:
    a whole last.tmp (marked COMPLETE) is the newest state and replaces the others; a half-written one is
    dropped; last.old replaces a missing `last` and is dropped beside a present one. Main process only."""
    final = checkpoint_dir(out)
    tmp, old = final.with_name("last.tmp"), final.with_name("last.old")
    if (tmp / COMPLETE).is_file():
        for folder in (final, old):
            if folder.exists():
                shutil.rmtree(folder)
        tmp.rename(final)
        return
    if tmp.exists():
        shutil.rmtree(tmp)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)


def drop_records_after(file: Path, step: int, log) -> None:
    """Keep the records of iterations <= step in a jsonl log (the later ones are about to be written again);
    a torn last line (a kill or a full disk during an append) is dropped with a warning, another unreadable
    line stops the run naming it. Rewritten through a temporary file."""
    if not file.is_file():
        return
    text = file.read_text(errors="replace")
    lines, kept = text.splitlines(), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number < len(lines):
                sys.exit(f"{file}: line {number} is not a JSON record ({line[:80]!r}); repair or delete it to "
                         f"continue the run")
            log.info(f"warning: {file}: dropped its torn last line ({line[:80]!r}), left by an interrupted write")
            continue
        if record.get("iteration", 0) <= step:
            kept.append(line + "\n")
    if "".join(kept) != text:
        write_atomically(file, "".join(kept))


# ----------------------------------------------------------------------------------------------------------
# Writing a checkpoint, and checking one before a resume loads it (torch and accelerate imported only here)
# ----------------------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, out) -> None:
    """Full resumable state (prepared networks, optimizers, registered objects, RNG of every process) via
    accelerate's save_state into last.tmp, marked COMPLETE (with the sha256 of every file, all of them synced
    to disk first), then swapped in for `last`; recover_checkpoint resolves every state a crash can leave, so a
    crash or a power loss never loses the previous state nor wedges the run."""
    final = checkpoint_dir(out)
    tmp, old = final.with_name("last.tmp"), final.with_name("last.old")
    if accelerator.is_main_process:
        recover_checkpoint(out)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sums = {str(f.relative_to(tmp)): file_sha256(f, sync=True)
                for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_atomically(tmp / COMPLETE, json.dumps({"sha256": sums}, indent=1))
        fsync_folder(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync_folder(final.parent)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _expected_checkpoint_files(accelerator) -> list[str]:
    """What accelerate's save_state writes for this run's registered state (load_state reads exactly these),
    an RNG state per process."""
    names = [f"model{f'_{i}' if i else ''}.safetensors" for i in range(len(accelerator._models))]
    names += [f"optimizer{f'_{i}' if i else ''}.bin" for i in range(len(accelerator._optimizers))]
    names += [f"custom_checkpoint_{i}.pkl" for i in range(len(accelerator._custom_objects))]
    return names + [f"random_states_{i}.pkl" for i in range(accelerator.num_processes)]


def check_checkpoint_files(accelerator, path: Path) -> None:
    """Before load_state, in one line on every process: the checkpoint holds this run's state (the files that
    its networks, optimizers, registered objects and process count make), each file is there with the sha256
    that COMPLETE recorded, loads as plain tensors and values, and each RNG state is one. Accelerate unpickles
    registered objects with weights_only=False (a pickle can run code), and skips a missing or unreadable RNG
    state with an info-level message (an inexact resume): both are refused."""
    import torch
    from accelerate.utils import load
    try:
        sums = json.loads((path / COMPLETE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        sums = None
    if not isinstance(sums, dict):
        sys.exit(f"--resume {path}: no {COMPLETE} marker with the checksums of its files (a checkpoint of an older "
                 f"version, or one whose save did not finish): it cannot be verified (start over with --overwrite)")
    expected = set(_expected_checkpoint_files(accelerator))
    state = {n for n in sums if n.startswith(("model", "optimizer", "custom_checkpoint_", "random_states_"))}
    if state != expected:
        sys.exit(f"--resume {path}: the checkpoint holds the state of another method, configuration or process "
                 f"count (missing: {', '.join(sorted(expected - state)) or 'none'}; not of this run: "
                 f"{', '.join(sorted(state - expected)) or 'none'})")
    for name, digest in sorted(sums.items()):
        file = path / name
        if not file.is_file():
            sys.exit(f"--resume {path}: {name} is missing; the checkpoint is incomplete and a resume would "
                     f"not be exact (start over with --overwrite)")
        if file_sha256(file) != digest:
            sys.exit(f"--resume {path}: {name} does not match its checksum in {COMPLETE} (truncated or changed "
                     f"since it was saved); a resume would not be exact (start over with --overwrite)")
        if file.suffix not in (".bin", ".pkl", ".pt"):
            continue  # safetensors holds tensors only
        try:
            value = load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            kind = "holds objects other than tensors and plain values (refused: unpickling could run code)" \
                if "weights_only" in str(error).lower() or "weights only" in str(error).lower() else \
                f"is unreadable ({type(error).__name__})"
            sys.exit(f"--resume {path}: {file.name} {kind}")
        rng_state = isinstance(value, dict) and all(isinstance(value.get(key), kind) for key, kind in (
            ("random_state", tuple), ("numpy_random_seed", tuple), ("torch_manual_seed", torch.Tensor)))
        if name.startswith("random_states_") and not rng_state:
            sys.exit(f"--resume {path}: {name} is not an RNG state (expected the Python, NumPy and torch generator "
                     f"states that accelerate saves); a resume would not be exact")


def maybe_resume(accelerator, args, state, log) -> int:
    """--resume auto: continue OUT/checkpoints/last if present (once recover_checkpoint has resolved what a crash
    mid-save left); PATH: that checkpoint folder (claim_run_folder checked its run's arguments); none: start
    fresh. Every file is checked first (check_checkpoint_files). Returns the iteration started from; the records
    of metrics.jsonl and train.jsonl past it (all of them without a checkpoint) are dropped, to be written again."""
    path = None
    if args.resume == "auto":
        if accelerator.is_main_process:
            recover_checkpoint(args.out)
        accelerator.wait_for_everyone()
        path = checkpoint_dir(args.out) if checkpoint_dir(args.out).is_dir() else None
    elif args.resume != "none":
        path = Path(args.resume)
        if not path.is_dir():
            sys.exit(f"--resume {args.resume}: no checkpoint folder there (expected OUT/checkpoints/last)")
    if path is not None:
        check_checkpoint_files(accelerator, path)
        try:
            accelerator.load_state(str(path))
        except (RuntimeError, KeyError, ValueError) as error:
            if isinstance(error, RuntimeError) and "state_dict" not in str(error):
                raise  # not a mismatch of the saved tensors (e.g. out of memory)
            sys.exit(f"--resume {path}: the checkpoint does not fit this run's networks "
                     f"({' '.join(str(error).split())[:200]})")
    start = state.step if path is not None else 0
    if accelerator.is_main_process:
        for name in ("metrics.jsonl", "train.jsonl"):
            drop_records_after(Path(args.out) / name, start, log)
    if path is not None:
        log.info(f"resumed from {path} at iteration {start}")
    return start
