"""Reliability and security, tried as a hostile or unlucky user would: every state a crash in the checkpoint
swap can leave, payloads in weights and checkpoint files, a run folder reused with other arguments, bad data
found at start-up, an incomplete checkpoint, unclear errors, duplicate records after a resume."""
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, read_metrics, run_method

import cli
import common
import datasets

RUN = [*TINY, "--num-overlays", "0", "--iters", "8", "--eval-every", "4"]


def output_of(result) -> str:
    return result.stdout + result.stderr


def last_line(result) -> str:
    return [line for line in output_of(result).splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A supervised toy run stopped (and checkpointed) at iteration 4 of 8."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run_method("supervised.py", [*RUN, "--stop-at", "4", "--out", str(out)])
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def reseal(folder: Path) -> None:
    """Rewrite a checkpoint's COMPLETE with the checksums of its files as they are now: a forger who knows the
    format gets past the checksum, so what is checked after it is exercised too."""
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir() if f.name != "COMPLETE"}
    (folder / "COMPLETE").write_text(json.dumps({"sha256": sums}))


# ----------------------------------------------------------------------------------------------------------
# 1. The checkpoint swap is recoverable from every intermediate state
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    acc = Accelerator()
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def _saved(accelerator, out: Path, step: int, state) -> Path:
    state.step = step
    cli.save_checkpoint(accelerator, out)
    return cli.checkpoint_dir(out)


@pytest.mark.parametrize("leftover, expected", [
    ("last + last.old", 1),            # killed after the swap, before last.old was deleted (the case)
    ("last.old", 1),                   # killed between the two renames, before last.tmp was whole
    ("last.old + half last.tmp", 1),
    ("last.old + whole last.tmp", 2),  # killed between the two renames: last.tmp is whole and newest
    ("last + whole last.tmp", 2),      # killed after COMPLETE was written, before the first rename
    ("last + half last.tmp", 1),       # killed during save_state
    ("whole last.tmp", 2),             # killed while the older folders were being deleted
])
def test_every_crash_state_of_the_swap_is_recovered(accelerator, tmp_path, leftover, expected):
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    folder = tmp_path / "checkpoints"
    last = _saved(accelerator, tmp_path, 1, state)
    shutil.copytree(last, folder / "step1")
    _saved(accelerator, tmp_path, 2, state)
    shutil.copytree(last, folder / "step2")
    shutil.rmtree(last)
    parts = leftover.split(" + ")
    for part in parts:
        if part == "last":
            shutil.copytree(folder / "step1", last)
        elif part == "last.old":
            shutil.copytree(folder / "step1", folder / "last.old")
        elif part == "whole last.tmp":
            shutil.copytree(folder / "step2", folder / "last.tmp")  # save_checkpoint marked it COMPLETE
        elif part == "half last.tmp":
            (folder / "last.tmp").mkdir()
            (folder / "last.tmp" / "model.safetensors").write_bytes(b"half-written")
    shutil.rmtree(folder / "step1")
    shutil.rmtree(folder / "step2")
    args = SimpleNamespace(resume="auto", out=str(tmp_path))
    state.step = 0
    assert cli.maybe_resume(accelerator, args, state, common.RunLog(tmp_path, True)) == expected
    assert sorted(p.name for p in folder.iterdir()) == ["last"]
    _saved(accelerator, tmp_path, 3, state)  # the next save is not wedged
    assert sorted(p.name for p in folder.iterdir()) == ["last"]


def test_leftover_old_folder_does_not_wedge_a_run(stopped_run, tmp_path):
    """The issue's reproduction: a copy of `last` left as last.old made every later save fail with
    'Directory not empty', and each rerun lost --eval-every iterations."""
    out = copy_of(stopped_run, tmp_path)
    shutil.copytree(out / "checkpoints" / "last", out / "checkpoints" / "last.old")
    run_method("supervised.py", [*RUN, "--out", str(out)])
    assert [m["iteration"] for m in read_metrics(out)] == [4, 8]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last"]


# ----------------------------------------------------------------------------------------------------------
# 3. No code runs from a file someone else wrote
# ----------------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_evaluate_refuses_a_weights_file_with_a_payload(tmp_path):
    marker = tmp_path / "payload_ran"
    weights = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": _Payload(marker)}, weights)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--weights", str(weights)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and not marker.exists()
    assert last_line(result).startswith(f"--weights {weights}: not readable as plain weights") and "Traceback" not in output_of(result)


def test_resume_refuses_a_registered_state_with_a_payload(stopped_run, tmp_path):
    """Accelerate unpickles custom_checkpoint_*.pkl with weights_only=False: a payload there used to run."""
    out = copy_of(stopped_run, tmp_path)
    marker = tmp_path / "payload_ran"
    torch.save({"step": _Payload(marker)}, out / "checkpoints" / "last" / "custom_checkpoint_0.pkl")
    reseal(out / "checkpoints" / "last")
    result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
    assert result.returncode != 0 and not marker.exists()
    assert "custom_checkpoint_0.pkl holds objects other than tensors" in last_line(result)


def test_weights_files_load_with_weights_only(stopped_run):
    saved = torch.load(stopped_run / "model_last.pt", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 4 and saved["args"]["method"] == "supervised"


# ----------------------------------------------------------------------------------------------------------
# 4. A run folder belongs to one set of arguments
# ----------------------------------------------------------------------------------------------------------
def test_resume_none_refuses_to_overwrite_a_run(stopped_run, tmp_path):
    out = copy_of(stopped_run, tmp_path)
    before = (out / "model_best.pt").read_bytes()
    result = run_method("supervised.py", [*RUN, "--out", str(out), "--resume", "none"], check=False)
    assert result.returncode != 0 and "holds a run already" in last_line(result)
    assert (out / "model_best.pt").read_bytes() == before and len(read_metrics(out)) == 1


def test_other_arguments_are_refused_naming_the_flags(stopped_run, tmp_path):
    out = copy_of(stopped_run, tmp_path)
    before = (out / "args.json").read_text()
    result = run_method("supervised.py", [*RUN, "--out", str(out), "--lr", "0.5", "--seed", "3"], check=False)
    assert result.returncode != 0
    assert "--lr 0.01 -> 0.5" in last_line(result) and "--seed 0 -> 3" in last_line(result)
    assert (out / "args.json").read_text() == before


def test_a_run_made_before_a_flag_existed_is_refused(stopped_run, tmp_path):
    """args.json without a key today's code has (here: --ohem, as if the run predated it) and with one it no longer
    has: the run may have done what neither default does now, so it is not continued."""
    out = copy_of(stopped_run, tmp_path)
    saved = json.loads((out / "args.json").read_text())
    saved.pop("ohem")
    saved["retired_flag"] = 1
    (out / "args.json").write_text(json.dumps(saved))
    result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
    assert result.returncode != 0
    assert "--ohem (absent) -> False" in last_line(result) and "--retired-flag 1 -> (absent)" in last_line(result)


def test_overwrite_starts_over_and_args_record_the_code(stopped_run, tmp_path):
    out = copy_of(stopped_run, tmp_path)
    run_method("supervised.py", [*RUN, "--out", str(out), "--lr", "0.02", "--overwrite"])
    assert [m["iteration"] for m in read_metrics(out)] == [4, 8]  # from scratch, nothing of the old run
    saved = json.loads((out / "args.json").read_text())
    assert saved["lr"] == 0.02 and len(saved["git_commits"]) == 1
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0]


# ----------------------------------------------------------------------------------------------------------
# 5. Every data file is checked at start-up; 7. unclear errors
# ----------------------------------------------------------------------------------------------------------
def write_camvid(root: Path, train: int = 4, val: int = 2, size=(32, 24)) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"0001TP_{i:06d}.png"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / split / name)
            Image.fromarray(rng.integers(0, 12, (size[1], size[0]), dtype=np.uint8)).save(root / f"{split}annot" / name)
    return root


CAMVID = ["--dataset", "camvid", "--backbone", "resnet18", "--pretrained", "none", "--decoder-channels", "16",
          "--crop-size", "16", "--batch-size", "2", "--num-workers", "0", "--num-overlays", "0", "--split", "full",
          "--image-scale", "1", "--iters", "4", "--eval-every", "2"]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_bad_val_mask_stops_the_run_before_training(tmp_path, cache_home):
    """Val masks used to be read first at the first evaluation, after all training so far."""
    root = write_camvid(tmp_path / "camvid")
    bad = root / "valannot" / "0001TP_000001.png"
    Image.fromarray(np.full((24, 32), 50, dtype=np.uint8)).save(bad)
    out = tmp_path / "run"
    result = run_method("supervised.py", [*CAMVID, "--data-root", str(root), "--out", str(out)], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert last_line(result).startswith(f"--data-root: mask {bad} holds values [50]")
    assert not out.exists()  # the folder this command created is not left behind
    ok = run_method("supervised.py", [*CAMVID, "--data-root", str(root), "--out", str(out), "--no-check-data",
                                      "--iters", "1", "--eval-every", "100"], check=False)
    # without the check the same file stops the run only at its first evaluation, after the training
    assert "holds values [50]" in output_of(ok) and json.loads((out / "train.jsonl").read_text())["iteration"] == 1


def test_check_files_sizes_and_cache(tmp_path, cache_home):
    root = write_camvid(tmp_path / "camvid")
    entries = [(root / "train" / n, root / "trainannot" / n, n) for n in sorted(os.listdir(root / "train"))]
    datasets.check_files(entries, [], "camvid", 11)
    assert len(json.loads((cache_home / "semiseg-ref" / "checked_files.json").read_text())) == 4 + 4  # images, masks
    Image.fromarray(np.zeros((20, 32), dtype=np.uint8)).save(entries[0][1])  # a changed file is checked again
    with pytest.raises(SystemExit, match=r"size mismatch: image .* is 32x24 but mask .* is 32x20"):
        datasets.check_files(entries, [], "camvid", 11)
    entries[1][0].write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"size mismatch: .*\(and 1 more bad files\)"):  # + the unreadable one
        datasets.check_files(entries, [], "camvid", 11)
    with pytest.raises(SystemExit, match=r"unreadable image .*0001TP_000001.png"):
        datasets.check_files(entries[1:], [], "camvid", 11)


def truncate(path: Path) -> Path:
    """Cut a file to half its bytes: the header still opens, the pixel data ends early."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_truncated_image_stops_the_run_at_start_up(tmp_path, cache_home, split):
    """The check read only image headers: a truncated training image crashed the run at iteration 1, a
    truncated val image at the first evaluation, each with a traceback, and the run folder stayed."""
    root = write_camvid(tmp_path / "camvid")
    bad = truncate(root / split / "0001TP_000001.png")
    out = tmp_path / "run"
    result = run_method("supervised.py", [*CAMVID, "--data-root", str(root), "--out", str(out)], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert last_line(result).startswith(f"--data-root: unreadable image {bad}")
    assert not out.exists()  # the folder this command created is not left behind


def test_image_decodes_are_remembered_and_a_truncated_jpeg_is_named(tmp_path, cache_home, monkeypatch):
    root = write_camvid(tmp_path / "camvid")
    entries = [(root / "train" / n, root / "trainannot" / n, n) for n in sorted(os.listdir(root / "train"))]
    decoded = []
    real_read_image = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda path: decoded.append(path) or real_read_image(path))
    datasets.check_files(entries[:2], entries[2:], "camvid", 11)
    assert sorted(decoded) == sorted(e[0] for e in entries)  # every image decoded in full once...
    datasets.check_files(entries[:2], entries[2:], "camvid", 11)
    assert len(decoded) == 4  # ...and not again while it is unchanged
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(jpeg)
    datasets.check_files([], [(jpeg, None, "photo")], "voc", 21)
    truncate(jpeg)  # a changed file (its size) is decoded again
    with pytest.raises(SystemExit, match=f"^--data-root: unreadable image {jpeg}: "):
        datasets.check_files([], [(jpeg, None, "photo")], "voc", 21)


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b'{"camvid|x|1|2": "ab"}', b'{"camvid|x|1|2": [1]}',
                                     b"\xff\xfe{}"])
def test_a_malformed_check_cache_is_rebuilt_with_one_warning(tmp_path, cache_home, capsys, content):
    """A cache that was a list stopped the check with an AttributeError traceback; other malformed ones were
    read as they came or dropped without a word."""
    root = write_camvid(tmp_path / "camvid")
    entries = [(root / "train" / n, root / "trainannot" / n, n) for n in sorted(os.listdir(root / "train"))]
    cache = cache_home / "semiseg-ref" / "checked_files.json"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    datasets.check_files(entries, [], "camvid", 11)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: {cache}: ") and "rebuilt" in warning[0]
    assert len(json.loads(cache.read_text())) == 8  # 4 images and 4 masks


@pytest.mark.parametrize("empty", ["train", "val"])
def test_an_empty_data_folder_is_one_line(tmp_path, cache_home, empty):
    """An empty val folder gave a fake mIoU 0.0, model_best.pt and then a stack error; an empty train folder a
    ZeroDivisionError."""
    root = write_camvid(tmp_path / "camvid")
    for f in (root / empty).iterdir():
        f.unlink()
    result = run_method("supervised.py", [*CAMVID, "--data-root", str(root), "--out", str(tmp_path / "run")],
                        check=False)
    name = {"train": "training", "val": "validation"}[empty]
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert last_line(result).startswith(f"--data-root {root}: no {name} images found")
    assert not (tmp_path / "run").exists()


def test_out_at_a_file_or_unwritable_place_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, expected in ((afile, f"--out {afile}: is a file"), (afile / "sub", f"--out {afile / 'sub'}: cannot")):
        result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
        assert result.returncode != 0 and "Traceback" not in output_of(result)
        assert last_line(result).startswith(expected)


def test_accelerate_launch_quiet_stops_in_one_line(tmp_path):
    """Under `accelerate launch` a script that stops on bad input used to end in a CalledProcessError
    traceback; with -q (as the README's commands use it) the script's own line is the last, and the run folder
    it created is removed."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "methods" / "supervised.py"),
           "--dataset", "camvid", "--data-root", str(tmp_path / "nowhere"), "--out", str(out), "--iters", "2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and "CalledProcessError" not in output_of(result)
    assert last_line(result).startswith("--data-root") and not out.exists()


# ----------------------------------------------------------------------------------------------------------
# Every numeric flag of every method is range-checked when the command line is parsed
# ----------------------------------------------------------------------------------------------------------
METHODS = ["supervised", "mean_teacher", "gta_seg", "dual_teacher", "ctt", "segkc"]


@functools.cache
def method_module(name):
    spec = importlib.util.spec_from_file_location(f"method_{name}", ROOT / "methods" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The values a hostile pass found accepted silently or failing later with a traceback, then neighbours of them.
SHARED_BAD = [("--head-lr-mult", "-1"), ("--head-lr-mult", "nan"), ("--weight-decay", "-1"), ("--weight-decay", "nan"),
              ("--seed", "-1"), ("--lr", "1e308"), ("--image-scale", "1e-9"), ("--image-scale", "1e300"),
              ("--head-lr-mult", "inf"), ("--head-lr-mult", "0"), ("--weight-decay", "inf"), ("--lr", "nan"),
              ("--lr", "-inf"), ("--lr", "-1e-3"), ("--lr", "0"), ("--image-scale", "nan"), ("--seed", "1.5"), ("--seed", "2147483648")]
OWN_BAD = [("mean_teacher", "--lambda-u", "-1"), ("mean_teacher", "--lambda-u", "nan"),
           ("gta_seg", "--ema-decay", "nan"), ("gta_seg", "--ta-ema-decay", "5"), ("gta_seg", "--cutmix-p", "nan"),
           ("gta_seg", "--iters-per-epoch", "0"), ("gta_seg", "--iters-per-epoch", "-1"),
           ("gta_seg", "--drop-ratio", "nan"), ("gta_seg", "--drop-ratio", "-1"),
           ("ctt", "--ema-decay", "nan"), ("ctt", "--ct-threshold", "nan"), ("ctt", "--contrast-after", "-1"),
           ("ctt", "--queue-size", "0"), ("ctt", "--queue-size", "-5"), ("ctt", "--lambda-ct", "nan"),
           ("dual_teacher", "--drop-path", "nan"), ("dual_teacher", "--drop-path", "-1"),
           ("dual_teacher", "--drop-path", "2"),
           ("segkc", "--kc-temperature", "nan"), ("segkc", "--kc-temperature", "inf"), ("segkc", "--lambda-cps", "nan"),
           ("mean_teacher", "--lambda-u", "inf"), ("mean_teacher", "--ema-decay", "nan"),
           ("mean_teacher", "--ema-decay", "1"), ("mean_teacher", "--threshold", "nan"),
           ("gta_seg", "--drop-ratio", "1"), ("gta_seg", "--cutmix-p", "1.5"), ("gta_seg", "--ema-decay", "-0.1"),
           ("gta_seg", "--ta-ema-decay", "nan"),
           ("dual_teacher", "--iters-per-epoch", "0"),
           ("ctt", "--ema-decay", "1.5"), ("ctt", "--ct-threshold", "-1"), ("ctt", "--lambda-hc", "-1"),
           ("ctt", "--lambda-lc", "inf"), ("ctt", "--tau-hc", "inf"), ("ctt", "--tau-lc", "nan"),
           ("ctt", "--gamma", "nan"), ("ctt", "--bank-threshold", "nan"), ("ctt", "--pairs", "0"),
           ("ctt", "--contrast-after", "1.5"),
           ("segkc", "--kc-temperature", "0"), ("segkc", "--lambda-cps", "-1"), ("segkc", "--kc-feat-s2j", "-1"),
           ("segkc", "--kc-feat-j2s", "nan"), ("segkc", "--kc-pred-s2j", "inf"), ("segkc", "--kc-pred-j2s", "-0.5")]


@pytest.mark.parametrize("method, flag, value", [(m, f, v) for m in METHODS for f, v in SHARED_BAD] + OWN_BAD)
def test_a_numeric_flag_out_of_its_range_is_one_line_naming_it(method, flag, value, capsys):
    """Each of these was accepted without a word (and trained on, or failed hours later), or ended in a
    traceback; now argparse's one line names the flag and the range it expects."""
    with pytest.raises(SystemExit) as error:
        method_module(method).parse_args(["--dataset", "toy", flag, value])
    assert error.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {flag}: expected " in last and f"got {value!r}" in last, last


def test_every_numeric_flag_has_a_range(monkeypatch):
    """A flag typed plain int or float takes nan, inf and negative counts: none is left."""
    parsers = []
    resolve = cli.resolve_args
    monkeypatch.setattr(cli, "resolve_args", lambda parser, *rest: parsers.append(parser) or resolve(parser, *rest))
    for name in METHODS:
        method_module(name).parse_args(["--dataset", "toy"])
    unchecked = [(p.description, a.option_strings) for p in parsers for a in p._actions
                 if a.type in (int, float) and not a.choices]
    assert len(parsers) == len(METHODS) and not unchecked


@pytest.mark.parametrize("method, flags", [
    ("supervised", ["--lr", "10", "--head-lr-mult", "100", "--weight-decay", "0", "--seed", "0", "--image-scale", "4"]),
    ("supervised", ["--lr", "1e-8", "--weight-decay", "1", "--seed", "2147483647", "--image-scale", "0.05"]),
    ("mean_teacher", ["--lambda-u", "0", "--ema-decay", "0", "--threshold", "1"]),
    ("gta_seg", ["--ema-decay", "1", "--ta-ema-decay", "0", "--cutmix-p", "1", "--drop-ratio", "0",
                 "--iters-per-epoch", "1"]),
    ("dual_teacher", ["--drop-path", "0", "--iters-per-epoch", "1"]),
    ("ctt", ["--ema-decay", "1", "--ct-threshold", "0", "--contrast-after", "0", "--queue-size", "1", "--pairs", "8",
             "--lambda-ct", "0", "--lambda-hc", "0", "--lambda-lc", "0", "--tau-hc", "1e-3"]),
    ("segkc", ["--lambda-cps", "0", "--kc-temperature", "0.01", "--kc-feat-s2j", "0", "--kc-pred-j2s", "2.5"]),
])
def test_numeric_flags_at_the_ends_of_their_ranges_are_accepted(method, flags):
    args = method_module(method).parse_args(["--dataset", "toy", *flags])
    for flag, value in zip(flags[::2], flags[1::2]):
        parsed = getattr(args, flag[2:].replace("-", "_"))
        assert parsed == float(value) and isinstance(parsed, int if flag in INTEGER_FLAGS else float), flag


INTEGER_FLAGS = {"--seed", "--iters-per-epoch", "--contrast-after", "--queue-size", "--pairs"}


# ----------------------------------------------------------------------------------------------------------
# 6. An incomplete checkpoint is refused instead of resumed inexactly; 8. no duplicate records
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_refuses_a_missing_or_corrupt_rng_state(stopped_run, tmp_path, damage):
    """Accelerate skipped an unloadable random_states_0.pkl with an info-level message: the resumed run then
    silently drew other random numbers."""
    out = copy_of(stopped_run, tmp_path)
    rng = out / "checkpoints" / "last" / "random_states_0.pkl"
    if damage == "missing":
        rng.unlink()
    else:
        rng.write_bytes(b"\x80\x04garbage")
        reseal(rng.parent)
    result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert "random_states_0.pkl" in last_line(result) and ("missing" in last_line(result) or "unreadable" in
                                                            last_line(result))


def test_resume_drops_records_written_after_the_checkpoint(stopped_run, tmp_path):
    """Records written after the last checkpoint (before a kill) used to be repeated after the resume."""
    out = copy_of(stopped_run, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 6, "miou": 1.0}) + "\n")
    with open(out / "train.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 5, "loss_sup": 1.0}) + "\n")
    run_method("supervised.py", [*RUN, "--out", str(out)])
    assert [m["iteration"] for m in read_metrics(out)] == [4, 8]
    train = [json.loads(line)["iteration"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert train == sorted(set(train)) and train[-1] == 8


# ----------------------------------------------------------------------------------------------------------
# Reliability II (issue 31): one run per folder at a time, every resume exact or refused, torn logs
# ----------------------------------------------------------------------------------------------------------
PROCESSES_CHANGE = "processes (accelerate launch --num_processes)"


def test_resume_with_another_process_count_is_refused_before_anything(stopped_run, tmp_path):
    """2 -> 1 used to be accepted (half the global batch, other data streams, random_states_1.pkl ignored);
    1 -> 2 was refused only after rank 0 had logged "resumed"."""
    two = tmp_path / "two"
    run_method("supervised.py", [*RUN, "--stop-at", "4", "--out", str(two)], processes=2)
    before = (two / "metrics.jsonl").read_text()
    result = run_method("supervised.py", [*RUN, "--out", str(two)], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert last_line(result).startswith(f"--out {two} holds a run with other arguments ({PROCESSES_CHANGE} 2 -> 1)")
    assert (two / "metrics.jsonl").read_text() == before
    assert json.loads((two / "args.json").read_text())["num_processes"] == 2
    one = copy_of(stopped_run, tmp_path)
    result = run_method("supervised.py", [*RUN, "--out", str(one)], processes=2, check=False)
    refusal = f"--out {one} holds a run with other arguments ({PROCESSES_CHANGE} 1 -> 2)"
    assert result.returncode != 0 and "resumed from" not in output_of(result)
    assert output_of(result).count(refusal) == 2  # each process stops on the main process's line


def test_two_runs_on_one_folder_at_once_the_second_is_refused(tmp_path):
    """Two runs on one folder both used to pass the argument check (no run files yet) and interleave their logs;
    with a lock the second is refused naming the folder. Ctrl-C ends the first in one line, and its end releases
    the lock."""
    out, stdout, stderr = tmp_path / "run", open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    first = subprocess.Popen([sys.executable, str(ROOT / "methods" / "supervised.py"), *RUN, "--iters", "100000",
                              "--eval-every", "2", "--out", str(out)], cwd=ROOT, stdout=stdout, stderr=stderr,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    stdout.close(), stderr.close()  # the child holds its own descriptors

    def wait_for(path: Path):
        deadline = time.time() + 600
        while not path.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
    try:
        wait_for(out / "log.txt")  # written once the folder is claimed
        second = run_method("supervised.py", [*RUN, "--iters", "4", "--eval-every", "2", "--out", str(out)],
                            check=False)
        assert second.returncode != 0 and "Traceback" not in output_of(second)
        assert last_line(second).startswith(f"--out {out}: another run is using this folder (process {first.pid} ")
        wait_for(out / "checkpoints" / "last")  # the first run went on
        first.send_signal(signal.SIGINT)
        first.wait(timeout=300)
    finally:
        first.kill()
    output = (tmp_path / "stdout").read_text() + (tmp_path / "stderr").read_text()
    assert first.returncode == 128 + signal.SIGINT and "Traceback" not in output
    assert (tmp_path / "stderr").read_text().strip().splitlines()[-1] == (
        f"stopped by SIGINT: continue the run from its last checkpoint ({out / 'checkpoints' / 'last'}) with the "
        f"same command (--resume auto)")
    third = run_method("supervised.py", [*RUN, "--iters", "2", "--eval-every", "2", "--out", str(out), "--overwrite"])
    assert third.returncode == 0 and [m["iteration"] for m in read_metrics(out)] == [2]


def test_sigterm_ends_in_one_line_saying_where_to_continue(tmp_path, capsys):
    """A scheduler's SIGTERM ended a run without a word of where it could be continued from (Ctrl-C: a
    KeyboardInterrupt traceback, tried end to end in test_two_runs_on_one_folder_at_once_the_second_is_refused)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cli.stop_in_one_line_on_signals(tmp_path, True)
        last = tmp_path / "checkpoints" / "last"
        for saved, expected in ((False, "no checkpoint was written yet; the same command starts the run over"),
                                (True, f"continue the run from its last checkpoint ({last}) with the same command "
                                       f"(--resume auto)")):
            if saved:
                cli.checkpoint_dir(tmp_path).mkdir(parents=True)
            with pytest.raises(SystemExit) as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # cut short: the handler raises as the signal arrives
            assert stop.value.code == 128 + signal.SIGTERM
            assert capsys.readouterr().err == f"stopped by SIGTERM: {expected}\n"
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_a_torn_last_log_line_is_dropped_with_a_warning(stopped_run, tmp_path):
    """A full disk (or a kill) during an append left half a JSON line; every later resume died on it."""
    out = copy_of(stopped_run, tmp_path)
    for name in ("metrics.jsonl", "train.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"iteration": 6, "mi')
    result = run_method("supervised.py", [*RUN, "--out", str(out)])
    assert f"warning: {out / 'metrics.jsonl'}: dropped its torn last line" in output_of(result)
    assert [m["iteration"] for m in read_metrics(out)] == [4, 8]
    train = [json.loads(line)["iteration"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert train == list(range(1, 9))


def test_drop_records_after_rewrites_atomically_and_names_a_bad_line(tmp_path, capsys):
    log, file = common.RunLog(tmp_path, True), tmp_path / "metrics.jsonl"
    file.write_text('{"iteration": 2}\n{"iteration": 4}\n{"iteration": 6}\n{"iter')
    cli.drop_records_after(file, 4, log)
    assert file.read_text() == '{"iteration": 2}\n{"iteration": 4}\n'
    assert "dropped its torn last line" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "metrics.jsonl"]  # no temporary file left
    file.write_text('{"iteration": 2}\n{"iter\n{"iteration": 4}\n')
    with pytest.raises(SystemExit, match=rf"^{file}: line 2 is not a JSON record"):
        cli.drop_records_after(file, 4, log)


def test_resume_path_checks_the_arguments_of_the_checkpoints_run(stopped_run, tmp_path):
    """--resume PATH skipped the argument check: a checkpoint of --lr 0.01 continued under another --lr and
    decoder width (the width then failed in a load_state traceback)."""
    last = stopped_run / "checkpoints" / "last"
    result = run_method("supervised.py", [*RUN, "--out", str(tmp_path / "new"), "--resume", str(last), "--lr", "0.05",
                                          "--decoder-channels", "8"], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert last_line(result).startswith(f"--resume {last}: the checkpoint's run {stopped_run} ran with other "
                                        f"arguments (--decoder-channels 16 -> 8, --lr 0.01 -> 0.05)")
    alone = tmp_path / "elsewhere"
    shutil.copytree(last, alone)  # a checkpoint without its run: its arguments cannot be known
    result = run_method("supervised.py", [*RUN, "--out", str(tmp_path / "new"), "--resume", str(alone)], check=False)
    assert result.returncode != 0 and last_line(result).startswith(f"--resume {alone}: cannot tell which run")
    result = run_method("supervised.py", [*RUN, "--out", str(tmp_path / "new"), "--resume", str(last)])
    assert f"resumed from {last} at iteration 4" in output_of(result)


def test_resume_after_a_code_change_is_refused_unless_allowed_and_the_commits_are_kept(stopped_run, tmp_path):
    """A resume after a code change was silent and overwrote args.json's git_commit: the run's origin was lost."""
    out = copy_of(stopped_run, tmp_path)
    saved = json.loads((out / "args.json").read_text())
    saved.pop("git_commits", None)  # as args.json was before the history was kept: the history starts from it
    (out / "args.json").write_text(json.dumps({**saved, "git_commit": "0123abc"}))
    result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
    assert result.returncode != 0 and "resumed from" not in output_of(result)
    assert last_line(result).startswith(f"--out {out} holds a run with other code (0123abc -> ")
    assert "--allow-code-change" in last_line(result)
    run_method("supervised.py", [*RUN, "--out", str(out), "--allow-code-change"])
    commits = json.loads((out / "args.json").read_text())["git_commits"]
    assert commits == ["0123abc", cli.provenance()["git_commits"][0]]
    assert [m["iteration"] for m in read_metrics(out)] == [4, 8]


def test_the_code_version_is_the_last_commit_that_changed_code(tmp_path):
    """A commit of results or docs alone made a run's code version change, so a run stopped by the end of a
    working session could not continue after its results were committed. The version is the last commit that
    changed a Python file outside tests/; an uncommitted edit of one is still seen."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "cli.py", repo / "cli.py")

    def git(*arguments):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
                       check=True, capture_output=True)
    git("init", "-q")
    git("add", "cli.py")
    git("commit", "-q", "-m", "code")
    spec = importlib.util.spec_from_file_location("cli_in_repo", repo / "cli.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    first = copy.provenance()["git_commits"][0]
    for path in ("results.md", "tests/test_x.py"):  # results, a test: not the code a run uses
        (repo / path).parent.mkdir(exist_ok=True)
        (repo / path).write_text("x = 1\n")
        git("add", path)
        git("commit", "-q", "-m", path)
        assert copy.provenance()["git_commits"][0] == first
    (repo / "datasets.py").write_text("x = 1\n")
    git("add", "datasets.py")
    assert copy.provenance()["git_commits"][0].startswith(f"{first} (with uncommitted changes ")
    git("commit", "-q", "-m", "more code")
    assert copy.provenance()["git_commits"][0] not in (first, "unknown")


def test_an_args_json_that_is_not_an_object_is_one_line(stopped_run, tmp_path):
    out = copy_of(stopped_run, tmp_path)
    (out / "args.json").write_text("[1, 2]")
    result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert last_line(result).startswith(f"--out {out} holds a run without a readable args.json (a JSON object")


def test_resume_refuses_an_rng_state_that_is_not_one(stopped_run, tmp_path):
    """random_states_0.pkl replaced by torch.save({}) loaded fine and accelerate skipped it: 58 tensors differed
    at the end."""
    out = copy_of(stopped_run, tmp_path)
    torch.save({}, out / "checkpoints" / "last" / "random_states_0.pkl")
    reseal(out / "checkpoints" / "last")
    result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert "random_states_0.pkl is not an RNG state" in last_line(result)


@pytest.mark.parametrize("damage", ["truncated", "empty", "changed"])
def test_resume_refuses_a_checkpoint_file_that_does_not_match_its_checksum(stopped_run, tmp_path, damage):
    """A truncated or empty model.safetensors gave a 20-line SafetensorError; changed bytes loaded silently."""
    out = copy_of(stopped_run, tmp_path)
    weights = out / "checkpoints" / "last" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                         "changed": data[:-4] + bytes(b ^ 1 for b in data[-4:])}[damage])
    result = run_method("supervised.py", [*RUN, "--out", str(out)], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result) and "resumed" not in output_of(result)
    assert last_line(result).startswith(f"--resume {weights.parent}: model.safetensors does not match its checksum")


def test_no_repeated_records_when_no_checkpoint_completed(stopped_run, tmp_path):
    """A kill before the first checkpoint completed left its evaluation record, and every retry added one
    more (8 copies after 7 tries): there was nothing to resume, so nothing was trimmed."""
    out = copy_of(stopped_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "last")
    (out / "checkpoints" / "last.tmp").mkdir()  # killed during the first save
    (out / "checkpoints" / "last.tmp" / "model.safetensors").write_bytes(b"half")
    run_method("supervised.py", [*RUN, "--out", str(out)])
    assert [m["iteration"] for m in read_metrics(out)] == [4, 8]
    train = [json.loads(line)["iteration"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert train == list(range(1, 9))


def test_overwrite_refuses_a_folder_without_a_run_of_ours(tmp_path):
    """--overwrite used to delete checkpoints/ (with a file of the user's in it), overlays/ and log.txt in any
    folder."""
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "keep.txt").write_text("mine")
    (out / "notes.txt").write_text("mine")
    (out / "log.txt").write_text("my log")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    result = run_method("supervised.py", [*RUN, "--out", str(out), "--overwrite"], check=False)
    assert result.returncode != 0 and "Traceback" not in output_of(result)
    assert last_line(result).startswith(f"--overwrite: {out} holds no run of this project")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing deleted, nothing added


def test_pretrained_payload_is_one_line(tmp_path):
    marker = tmp_path / "payload_ran"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(marker)}, weights)
    with pytest.raises(SystemExit, match=rf"^--pretrained {weights}: {weights} is not readable as plain weights"):
        common.build_model("resnet18", 5, str(weights))
    torch.save([torch.zeros(1)], weights)
    with pytest.raises(SystemExit, match=rf"^--pretrained {weights}: {weights} holds a list, expected a state dict"):
        common.build_model("resnet18", 5, str(weights))
    assert not marker.exists()


def test_checkpoint_of_another_method_or_width_is_one_line(accelerator, tmp_path):
    """A checkpoint with other registered state used to be called incomplete; one whose tensors do not fit
    ended in a load_state traceback."""
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    accelerator.prepare(torch.nn.Linear(2, 3))
    args = SimpleNamespace(resume="auto", out=str(tmp_path))
    cli.save_checkpoint(accelerator, tmp_path)
    accelerator.register_for_checkpointing(common.TrainState())  # as a method with one more registered object
    with pytest.raises(SystemExit, match=r"holds the state of another method, configuration or process count "
                                         r"\(missing: custom_checkpoint_1.pkl; not of this run: none\)"):
        cli.maybe_resume(accelerator, args, state, common.RunLog(tmp_path, True))
    accelerator._custom_objects.pop()
    accelerator._models[0] = torch.nn.Linear(2, 4)  # as a network of another width
    with pytest.raises(SystemExit, match=r"the checkpoint does not fit this run's networks \(.*size mismatch"):
        cli.maybe_resume(accelerator, args, state, common.RunLog(tmp_path, True))


def test_every_checkpoint_file_and_the_marker_reach_the_disk_before_the_swap(accelerator, tmp_path, monkeypatch):
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    events, real_fsync, real_rename = [], os.fsync, Path.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(self)))
        return real_rename(self, target)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    cli.save_checkpoint(accelerator, tmp_path)
    folder = tmp_path / "checkpoints" / "last.tmp"
    swap = events.index(("rename", str(folder)))
    synced = {Path(path).name for kind, path in events[:swap] if kind == "fsync"}
    assert {"custom_checkpoint_0.pkl", "random_states_0.pkl", "last.tmp"} <= synced
    assert any(kind == "fsync" and path.endswith("COMPLETE.tmp") for kind, path in events[:swap])
    assert json.loads((tmp_path / "checkpoints" / "last" / "COMPLETE").read_text())["sha256"].keys() == {
        "custom_checkpoint_0.pkl", "random_states_0.pkl"}
