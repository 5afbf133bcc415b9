"""methods/supervised.py end to end through its command line: 1 process, 2 processes (gloo), resume."""
import importlib.util
import json

import pytest
import torch

from conftest import ROOT, TINY, assert_resume_equivalent, read_metrics, run_method


def test_supervised_single_process(tmp_path):
    out = tmp_path / "run"
    result = run_method("supervised.py", [*TINY, "--iters", "4", "--eval-every", "2", "--out", str(out)])
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [2, 4]
    assert set(metrics[0]["iou"]) == {"background", "disk", "box", "stripes", "triangle"}
    args = json.loads((out / "args.json").read_text())
    assert args["iters"] == 4 and args["dataset"] == "toy"
    for name in ("log.txt", "model_best.pt", "model_last.pt", "checkpoints/last/model.safetensors",
                 "overlays/iter_0000004.png"):
        assert (out / name).exists(), name
    assert "mIoU" in (out / "log.txt").read_text()
    weights = torch.load(out / "model_last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in weights["model"])
    assert "done: best mIoU" in result.stdout + result.stderr
    # scripts/evaluate.py --probe 0.95 on the last weights: the run's own last probe (the baseline's 0.95 rule)
    printed = run_method("../scripts/evaluate.py", ["--weights", str(out / "model_last.pt"), "--num-workers", "0",
                                                    "--probe", "0.95"]).stdout
    last = metrics[-1]
    assert (f"{last['pseudo_share']:.1f}% of the pixels pass, {last['pseudo_acc']:.1f}% of them right; "
            f"{last['pseudo_acc_all']:.1f}% of all pixels right") in printed
    assert ", ".join(f"{n} " + " / ".join("-" if v[k] is None else f"{v[k]:.1f}" for k in (
        "pixels", "share", "acc", "target_share")) for n, v in last["probe_per_class"].items()) in printed
    assert sum(v["pixels"] for v in last["probe_per_class"].values()) == pytest.approx(100.0, abs=0.01)
    if last["pseudo_share"] > 0:
        assert sum(v["target_share"] for v in last["probe_per_class"].values()) == pytest.approx(100.0, abs=0.01)


def test_test_split_scored_once_at_the_end_and_equal_to_evaluate_py(tmp_path):
    """A run scores the test split with its last weights at the last iteration only (--eval-test end), and that
    figure is exactly scripts/evaluate.py --split test on model_last.pt; --eval-test every scores it at every
    evaluation, never at none; --stop-at before the end scores nothing (the schedule has not ended)."""
    out = tmp_path / "run"
    run_method("supervised.py", [*TINY, "--iters", "4", "--eval-every", "2", "--out", str(out)])
    first, last = read_metrics(out)
    assert "test_miou" not in first and set(last["test_iou"]) == set(last["iou"])
    assert last["test_miou"] != last["miou"]  # another split (24 toy test scenes, 48 val)
    printed = run_method("../scripts/evaluate.py", ["--weights", str(out / "model_last.pt"), "--num-workers", "0",
                                                    "--split", "test"]).stdout
    assert f"(whole, 24 test images): {last['test_miou']:.2f}" in printed
    every = tmp_path / "every"
    run_method("supervised.py", [*TINY, "--iters", "4", "--eval-every", "2", "--out", str(every),
                                 "--eval-test", "every"])
    assert [m["test_miou"] for m in read_metrics(every)][-1] == last["test_miou"]  # same run, same weights
    assert "test_miou" in read_metrics(every)[0]
    for flags in (["--eval-test", "never"], ["--stop-at", "2"]):
        other = tmp_path / flags[0][2:]
        run_method("supervised.py", [*TINY, "--iters", "4", "--eval-every", "2", "--out", str(other), *flags])
        assert not any("test_miou" in m for m in read_metrics(other))


def test_supervised_two_processes_same_confusion_as_one(tmp_path):
    """Train in 2 processes; then evaluate the saved weights in 1 and in 2 processes: exactly the same
    confusion matrix (each val image counted once, sums across processes), and with --probe the same pseudo-label
    probe, per class included (each probe image counted once)."""
    out = tmp_path / "run2"
    run_method("supervised.py", [*TINY, "--iters", "2", "--eval-every", "2", "--out", str(out)], processes=2)
    assert (out / "checkpoints" / "last" / "random_states_1.pkl").exists()  # really two processes
    weights = out / "model_last.pt"
    one = tmp_path / "cm1.pt"
    two = tmp_path / "cm2.pt"
    printed = [run_method("../scripts/evaluate.py", ["--weights", str(weights), "--save-confusion", str(path),
                                                     "--num-workers", "0", "--probe", "0.95"], processes=n).stdout
               for path, n in ((one, 1), (two, 2))]
    cm1, cm2 = torch.load(one), torch.load(two)
    assert cm1.sum() == 48 * 64 * 80  # every toy val pixel once (toy has no ignore pixels)
    assert torch.equal(cm1, cm2)
    assert "probe (32 unlabeled training images" in printed[0] and printed[0] == printed[1]


def test_supervised_resume_is_exact(tmp_path):
    assert_resume_equivalent("supervised.py", TINY, tmp_path)


def test_recalibrate_bn_is_the_plain_average_over_the_batches_and_restores_momentum():
    """scripts/evaluate.py --recalibrate-bn K: running mean = the mean of the K per-batch channel means, running var
    = the mean of the K unbiased per-batch variances, whatever the statistics were before; momentum restored."""
    spec = importlib.util.spec_from_file_location("evaluate", ROOT / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(3, momentum=0.3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), norm).eval()
    with torch.no_grad():  # identity convolution: the BN sees the batches as they are
        model[0].weight.copy_(torch.eye(3)[..., None, None])
        model[0].bias.zero_()
    norm.running_mean.fill_(7.0)  # stale statistics, e.g. from strong views
    batches = [torch.randn(2, 3, 4, 5) * (k + 1) + k for k in range(3)]
    evaluate.recalibrate_bn(model, iter({"image": b} for b in batches), 3, "cpu")
    means = torch.stack([b.mean((0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in batches])
    assert torch.allclose(norm.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(norm.running_var, variances.mean(0), atol=1e-5)
    assert norm.momentum == 0.3 and not model.training
