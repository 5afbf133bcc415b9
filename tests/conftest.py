"""Shared test helpers: run a method script through its real command line (1 or 2 processes) and compare
checkpoints bit for bit."""
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A tiny configuration: seconds per run on 2 CPU cores.
TINY = ["--dataset", "toy", "--backbone", "resnet18", "--pretrained", "none", "--decoder-channels", "16",
        "--crop-size", "32", "48", "--batch-size", "2", "--unlabeled-batch-size", "2", "--num-workers", "0",
        "--num-overlays", "1", "--log-every", "1"]


FOLDER_CLASSES = ["ground", "round thing", "square thing"]


def make_folder_dataset(root: Path, labeled: int = 5, unlabeled: int = 3, val: int = 3, test: int = 0,
                        unlabeled_masks: bool = False) -> Path:
    """A --dataset folder tree of toy scenes (64x80) with 3 classes (toy background; disks; boxes, stripes and
    triangles): `labeled` train images with masks, `unlabeled` without (with, if unlabeled_masks: then only a
    --split makes them unlabeled), `val` and `test` images, classes.txt with a colour on two of its three lines."""
    import numpy as np
    from PIL import Image
    import datasets
    to_three = np.array([0, 1, 2, 2, 2], np.uint8)
    for split, count, first in (("train", labeled + unlabeled, 0), ("val", val, 100_000), ("test", test, 200_000)):
        if not count:
            continue
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            image, mask = datasets.toy_scene(first + i)
            Image.fromarray(image).save(root / "images" / split / f"scene_{i:02d}.jpg", quality=95)
            if split != "train" or i < labeled or unlabeled_masks:
                Image.fromarray(to_three[mask]).save(root / "masks" / split / f"scene_{i:02d}.png")
    (root / "classes.txt").write_text("ground 40,40,40\nround thing\nsquare thing 60,200,60\n")
    return root


FOLDER_TINY = ["--dataset", "folder", "--backbone", "resnet18", "--pretrained", "none", "--decoder-channels", "16",
               "--crop-size", "32", "48", "--image-scale", "1", "--batch-size", "2", "--unlabeled-batch-size", "2",
               "--num-workers", "0", "--num-overlays", "1", "--log-every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_method(script: str, args: list, processes: int = 1, timeout: int = 300, check: bool = True):
    """Run methods/<script> with `args` in 1 process (python) or N processes (accelerate launch --multi_gpu,
    gloo on CPU). Returns the CompletedProcess; raises with the output tail if it failed and check is set."""
    path = str(ROOT / "methods" / script)
    if processes == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), path, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def load_checkpoint(folder: Path) -> dict:
    """Every file of an accelerate save_state folder, loaded (weights, optimizers, registered objects, RNG)."""
    from safetensors.torch import load_file
    state = {}
    for f in sorted(Path(folder).iterdir()):
        if f.suffix == ".safetensors":
            state[f.name] = load_file(f)
        elif f.suffix in (".bin", ".pt", ".pth"):
            state[f.name] = torch.load(f, map_location="cpu", weights_only=False)
        elif f.suffix == ".pkl":
            try:
                state[f.name] = torch.load(f, map_location="cpu", weights_only=False)
            except Exception:
                with open(f, "rb") as fh:
                    state[f.name] = pickle.load(fh)
    return state


def assert_same(a, b, where="checkpoint"):
    """Recursive exact equality of nested dicts/lists/tensors/arrays/numbers."""
    import numpy as np
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where}: tensors differ (max diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where}: arrays differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_resume_equivalent(script: str, args: list, tmp_path: Path, iters: int = 4, ignore=("best",)):
    """N iterations straight == N/2, stop (checkpoint), resume, N/2: identical networks, optimizers,
    registered objects (teachers, banks, counters) and RNG states."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*args, "--iters", str(iters), "--eval-every", str(iters // 2)]
    run_method(script, [*common, "--out", str(straight)])
    run_method(script, [*common, "--out", str(resumed), "--stop-at", str(iters // 2)])
    assert read_metrics(resumed)[-1]["iteration"] == iters // 2
    run_method(script, [*common, "--out", str(resumed)])
    a = load_checkpoint(straight / "checkpoints" / "last")
    b = load_checkpoint(resumed / "checkpoints" / "last")
    assert_same(a, b)
    return a


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: more intra-op threads only fight over the shared cores (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return list(TINY)
