"""methods/mean_teacher.py: the closed form of L_u, the CutMix of image/label/confidence/padding, the EMA
teacher, then end to end through the command line (1 and 2 processes) and exact resume."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import TINY, assert_resume_equivalent, load_checkpoint, read_metrics, run_method
from methods import mean_teacher as mt

K = 3  # classes of the tiny model


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def test_unsupervised_loss_closed_form():
    """Two pixels pass (confident and valid), one is confident but padded, one valid but unconfident: the loss is
    the CE of the two passing pixels summed, divided by the 3 valid pixels (not by the 2 passing ones)."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]).t()[None, :, None]
    target = torch.tensor([[[0, 2, 2, 1]]])
    confidence = torch.tensor([[[0.96, 0.99, 0.99, 0.5]]])
    valid = torch.tensor([[[True, True, False, True]]])
    loss, passed = mt.unsupervised_loss(logits, target, confidence, valid, 0.95)
    ce0 = -torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]), 0)[0]
    ce1 = -torch.log_softmax(torch.tensor([0.0, 1.0, 0.0]), 0)[2]
    assert torch.allclose(loss, (ce0 + ce1) / 3)
    assert torch.allclose(passed, torch.tensor(2 / 3))
    loss, passed = mt.unsupervised_loss(logits, target, confidence, torch.zeros_like(valid), 0.95)
    assert loss == 0 and passed == 0  # no valid pixel: no division by zero


class Recorder(nn.Module):
    """A tiny segmentation network (1x1 conv) that records every input batch."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.bn = nn.Conv2d(3, K, 1), nn.BatchNorm2d(K)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.bn(self.conv(x))


def batches(b=2, h=8, w=10):
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, :, -3:] = False
    return ({"image": torch.randn(b, 3, h, w, generator=g), "mask": torch.randint(0, K, (b, h, w), generator=g)},
            {"image": torch.randn(b, 3, h, w, generator=g), "image_strong": torch.randn(b, 3, h, w, generator=g),
             "valid": valid})


def test_cutmix_mixes_image_label_confidence_and_padding_alike(accelerator, monkeypatch):
    """Inside the box the student sees the partner's strong image and learns the partner's teacher label under the
    partner's confidence and padding; outside, its own. The teacher sees the weak, un-mixed view."""
    student, teacher = Recorder(0), Recorder(1).eval()
    box = torch.zeros(2, 8, 10, dtype=torch.bool)
    box[0, 2:6, 3:9] = True
    monkeypatch.setattr(mt, "cutmix_box_mask", lambda *a, **k: box.clone())
    seen = {}
    real = mt.unsupervised_loss

    def spy(logits, target, confidence, valid, threshold):
        seen.update(target=target, confidence=confidence, valid=valid)
        return real(logits, target, confidence, valid, threshold)

    monkeypatch.setattr(mt, "unsupervised_loss", spy)
    bl, bu = batches()
    with torch.no_grad():
        confidence, label = teacher(bu["image"]).softmax(1).max(1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    args = SimpleNamespace(ohem=False, threshold=0.95, lambda_u=1.0, ema_decay=0.99, joint_forward=False,
                           cutmix_box="unimatch")
    mt.train_step(5, bl, bu, student=student, teacher=teacher, optimizer=optimizer, accelerator=accelerator, args=args)
    assert torch.equal(teacher.inputs[-1], bu["image"])
    assert torch.equal(student.inputs[0], bl["image"])  # two forwards: labeled, then mixed
    x_mix = student.inputs[1]
    partner = lambda t: t.roll(-1, 0)  # noqa: E731
    for got, own in ((x_mix, bu["image_strong"]), (seen["target"], label), (seen["confidence"], confidence),
                     (seen["valid"], bu["valid"])):
        m = box if got.dim() == 3 else box[:, None].expand_as(got)
        assert torch.equal(got[m], partner(own)[m]) and torch.equal(got[~m], own[~m])


@pytest.mark.parametrize("joint", [False, True])
def test_labeled_batch_has_its_own_bn_statistics_unless_joint_forward(accelerator, joint):
    """Default (French et al.): the labeled batch is normalised by its own BN statistics, so L_sup does not depend
    on the unlabeled images. --joint-forward: one forward on [labeled; mixed], BN over both, so it does."""
    args = SimpleNamespace(ohem=False, threshold=0.95, lambda_u=1.0, ema_decay=0.99, joint_forward=joint,
                           cutmix_box="unimatch")
    bl, bu = batches()
    other = dict(bu, image_strong=bu["image_strong"] * 3 + 1)  # another strong view: other BN statistics
    sups = []
    for unlabeled in (bu, other):
        student, teacher = Recorder(0), Recorder(1).eval()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        terms = mt.train_step(5, bl, unlabeled, student=student, teacher=teacher, optimizer=optimizer,
                              accelerator=accelerator, args=args)
        sups.append(terms["loss_sup"])
        assert len(student.inputs) == (1 if joint else 2)
    assert torch.equal(sups[0], sups[1]) != joint


def test_teacher_is_the_ema_of_parameters_and_bn_statistics(accelerator):
    """Step 0 (a = 0): the teacher becomes the student, BN statistics included. Step 1 (a = 1/2): the mean of
    the two. The student's gradient never reaches the teacher."""
    student, teacher = Recorder(0), Recorder(1).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    args = SimpleNamespace(ohem=False, threshold=0.0, lambda_u=1.0, ema_decay=0.99, joint_forward=False,
                           cutmix_box="unimatch")
    bl, bu = batches()
    terms = mt.train_step(0, bl, bu, student=student, teacher=teacher, optimizer=optimizer, accelerator=accelerator,
                          args=args)
    for (name, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), name
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    mt.train_step(1, bl, bu, student=student, teacher=teacher, optimizer=optimizer, accelerator=accelerator, args=args)
    after = student.state_dict()
    for name, t in teacher.state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(t, 0.5 * before[name] + 0.5 * after[name]), name
    assert all(p.grad is None for p in teacher.parameters())
    assert terms["loss_u"] > 0 and torch.allclose(terms["loss"], terms["loss_sup"] + terms["loss_u"])


def test_threshold_above_one_leaves_the_supervised_loss(accelerator):
    student, teacher = Recorder(0), Recorder(1).eval()
    args = SimpleNamespace(ohem=False, threshold=1.0 + 1e-6, lambda_u=1.0, ema_decay=0.99, joint_forward=False,
                           cutmix_box="unimatch")
    bl, bu = batches()
    terms = mt.train_step(3, bl, bu, student=student, teacher=teacher,
                          optimizer=torch.optim.SGD(student.parameters(), lr=0.1), accelerator=accelerator, args=args)
    assert terms["loss_u"] == 0 and terms["passed"] == 0 and torch.equal(terms["loss"], terms["loss_sup"])


def test_defaults_per_dataset():
    """tau 0.95 and plain CE, except Cityscapes: tau 0 and OHEM (UniMatch's configs/cityscapes.yaml)."""
    for dataset, threshold, ohem in (("voc", 0.95, False), ("cityscapes", 0.0, True), ("camvid", 0.95, False)):
        args = mt.parse_args(["--dataset", dataset])
        assert (args.threshold, args.ohem, args.ema_decay, args.lambda_u, args.joint_forward) == (
            threshold, ohem, 0.99, 1.0, False)
    assert mt.parse_args(["--dataset", "cityscapes", "--threshold", "0.9"]).threshold == 0.9


def test_bad_threshold_is_one_line(tmp_path):
    result = run_method("mean_teacher.py", [*TINY, "--iters", "2", "--threshold", "1.5", "--out", str(tmp_path)],
                        check=False)
    assert result.returncode == 2 and "argument --threshold: expected a number in [0, 1], got '1.5'" in result.stderr


def test_single_process_end_to_end_and_resume(tmp_path):
    ckpt = assert_resume_equivalent("mean_teacher.py", TINY, tmp_path, iters=4)
    metrics = read_metrics(tmp_path / "straight")
    assert [m["iteration"] for m in metrics] == [2, 4]
    for key in ("miou", "miou_student", "pseudo_acc", "pseudo_share", "pseudo_acc_all", "train_passed"):
        assert key in metrics[-1], key
    teacher = ckpt["custom_checkpoint_0.pkl"]
    saved = torch.load(tmp_path / "straight" / "model_last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], teacher[k]) for k in saved)  # the deployed network is the teacher


def test_two_processes(tmp_path):
    out = tmp_path / "run2"
    run_method("mean_teacher.py", [*TINY, "--iters", "2", "--eval-every", "2", "--out", str(out)], processes=2)
    assert (out / "checkpoints" / "last" / "random_states_1.pkl").exists()
    assert read_metrics(out)[-1]["iteration"] == 2
    load_checkpoint(out / "checkpoints" / "last")


def test_french_box_is_half_the_crop_on_every_image_inside_it():
    """French et al.'s box: on every image exactly one rectangle (True = partner) of about half the crop's area,
    height and width each at least half the crop's; the rounding of the two sides moves the area by a few pixels."""
    torch.manual_seed(0)
    masks = mt.french_box_mask(64, 48, 64)
    for m in masks:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert int(m.sum()) == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # one box
        assert h >= 24 and w >= 32 and abs(h * w - 48 * 64 / 2) <= 48 + 64
    assert len({tuple(m.nonzero()[0].tolist()) for m in masks}) > 10  # placed at random


def test_freeze_bn_keeps_the_backbone_statistics_through_train_copy_and_steps():
    """--freeze-bn: after any .train() call the backbone's BN layers normalise with their stored statistics and never
    update them, in the student and in its deep copy (the teacher); their affine weights still get gradients; the
    decoder's BN trains as usual."""
    import common
    net = common.build_model("resnet18", K, "none", 16, 16)
    mt.freeze_bn(net.backbone)
    teacher = common.frozen_copy(net)
    net.train()
    teacher.train()
    frozen = [m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in frozen]
    decoder_bn = next(m for m in net.aspp.modules() if isinstance(m, nn.BatchNorm2d))
    decoder_before = decoder_bn.running_mean.clone()
    net(torch.randn(2, 3, 32, 32) * 5 + 3).sum().backward()
    assert all(not m.training for m in frozen) and decoder_bn.training
    assert all(torch.equal(m.running_mean, b) for m, b in zip(frozen, before))
    assert not torch.equal(decoder_bn.running_mean, decoder_before)
    assert all(m.weight.grad is not None for m in frozen)
    assert all(not m.training for m in teacher.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert sorted(net.state_dict()) == sorted(common.build_model("resnet18", K, "none", 16, 16).state_dict())


def test_french_variants_end_to_end_resume_exactly_and_keep_the_backbone_statistics(tmp_path):
    """--cutmix-box french --freeze-bn through the command line: an interrupted run continues bit for bit, and the
    deployed teacher's backbone BN statistics are still the initial ones (zeros / ones without pretrained weights)
    while the decoder's have moved."""
    assert_resume_equivalent("mean_teacher.py", [*TINY, "--cutmix-box", "french", "--freeze-bn"], tmp_path, iters=4)
    saved = torch.load(tmp_path / "straight" / "model_last.pt", weights_only=True)["model"]
    backbone = [k for k in saved if k.startswith("backbone.") and k.endswith("running_mean")]
    assert backbone and all(not saved[k].any() for k in backbone)
    assert any(saved[k].any() for k in saved if k.startswith("aspp.") and k.endswith("running_mean"))
