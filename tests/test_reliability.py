"""Reliability and security, tried as a hostile or unlucky user would: every state a crash in the checkpoint
swap can leave, payloads in weights and checkpoint files, a run folder reused with other arguments, bad data
found at start-up, an incomplete checkpoint, unclear errors, duplicate records after a resume."""
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
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
    common.save_checkpoint(accelerator, out)
    return common.checkpoint_dir(out)


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
    assert common.maybe_resume(accelerator, args, state, common.RunLog(tmp_path, True)) == expected
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
    assert saved["lr"] == 0.02 and saved["git_commit"] and saved["versions"]["torch"] == torch.__version__.split("+")[0]


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
