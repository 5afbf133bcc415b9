"""methods/dual_teacher.py: the invariants of spec §10 on tiny tensors and a tiny model, then end to end through
the command line (1 and 2 processes) and resume equivalence in the middle of a teacher shift."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from datasets import classmix_mask
from conftest import TINY, assert_resume_equivalent, load_checkpoint, read_metrics, run_method
from methods import dual_teacher as dt

K = 3  # classes of the tiny model


def tiny_args(**kw):
    base = dict(backbone="resnet18", pretrained="none", output_stride=16, decoder_channels=8, drop_path=0.1,
                iters_per_epoch=3, seed=0, ohem=False, ic_valid_from_labeled=False, ema_step="epoch")
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def batches(seed=0, b=2, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    y_l = torch.randint(0, K, (b, h, w), generator=g)
    y_l[:, :4] = 255
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[:, :, -5:] = False
    return ({"image": torch.randn(b, 3, h, w, generator=g), "mask": y_l},
            {"image": torch.randn(b, 3, h, w, generator=g), "image_strong": torch.randn(b, 3, h, w, generator=g),
             "valid": valid})


def setup_nets(**kw):
    torch.manual_seed(0)
    args = tiny_args(**kw)
    student, teachers = dt.build_networks(args, K, "cpu")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    return args, student, teachers, optimizer


MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def step(i, args, student, teachers, optimizer, accelerator, seed=None):
    bl, bu = batches(i if seed is None else seed)
    return dt.train_step(i, bl, bu, student, teachers, optimizer, accelerator, args, MEAN, STD)


def params(m):
    return [p.detach().clone() for p in m.parameters()]


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------------------------- switching, EMA
def test_switching_rule():
    assert [dt.active(e) for e in range(4)] == [(0, "cutmix"), (1, "classmix"), (0, "cutmix"), (1, "classmix")]


def test_shifts_ema_reset_and_running_mean(accelerator):
    """Epoch 0 (i = 0, 1, 2): T1 = copy of S after step 0, then the running mean of S over the shift; T2 bit-
    identical (parameters and buffers). Epoch 1: T1 frozen, T2 = copy of S after its first step. The EMA leaves
    teacher buffers alone, and the teacher is forwarded once per step (its BN counter), the student twice."""
    args, student, (t1, t2), optimizer = setup_nets()
    t2_before = state(t2)
    snapshots = []
    for i in range(3):
        step(i, args, student, (t1, t2), optimizer, accelerator)
        snapshots.append(params(student))
        if i == 0:
            assert all(torch.equal(a, b) for a, b in zip(t1.parameters(), student.parameters()))
        mean = [torch.stack(ps).mean(0) for ps in zip(*snapshots)]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(t1.parameters(), mean))
        assert all(torch.equal(v, t2_before[k]) for k, v in t2.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(t1.parameters(), student.parameters()))
    assert t1.backbone.bn1.num_batches_tracked.item() == 3 and student.backbone.bn1.num_batches_tracked.item() == 6
    assert not torch.equal(t1.backbone.bn1.running_mean, student.backbone.bn1.running_mean)
    t1_before = state(t1)
    step(3, args, student, (t1, t2), optimizer, accelerator)  # epoch 1, i = 0
    assert all(torch.equal(v, t1_before[k]) for k, v in t1.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(t2.parameters(), student.parameters()))
    for t in (t1, t2):
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for t in (t1, t2) for p in t.parameters()}


def test_ema_ramp_caps_at_099_and_global_ablation(accelerator):
    assert common.ema_decay(0, dt.EMA_CAP) == 0 and common.ema_decay(98, dt.EMA_CAP) == pytest.approx(98 / 99)
    assert common.ema_decay(99, dt.EMA_CAP) == 0.99 and common.ema_decay(5000, dt.EMA_CAP) == 0.99
    # --ema-step global: the first step of epoch 1 (global step 3) is not a copy but a = 3/4
    args, student, (t1, t2), optimizer = setup_nets(iters_per_epoch=3, ema_step="global")
    for i in range(3):
        step(i, args, student, (t1, t2), optimizer, accelerator)
    old = params(t2)
    step(3, args, student, (t1, t2), optimizer, accelerator)
    assert all(torch.allclose(t, 0.75 * o + 0.25 * s, atol=1e-6)
               for t, o, s in zip(t2.parameters(), old, student.parameters()))


class Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x)
        return self.net(x)


def test_inputs_targets_and_total_loss(accelerator, monkeypatch):
    """Teacher sees x_w; student pass 1 = [x_l; mix], pass 2 = x_s un-mixed; the consistency target is the
    hard argmax/confidence of the teacher *before* this step's EMA, V = the unlabeled padding mask (or the
    labeled GT != 255 with the flag); total = L_sup + L_mix + 0.2 L_ic (mocked terms)."""
    for flag in (False, True):
        args, student, teachers, optimizer = setup_nets(ic_valid_from_labeled=flag)
        student, teachers = Recorder(student), [Recorder(t) for t in teachers]
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
        bl, bu = batches(7)
        with torch.no_grad():
            expected_conf, expected_label = teachers[0].net(bu["image"]).softmax(1).max(1)
        seen = {}

        def fake_ic(logits, label, conf, valid):
            seen.update(label=label, conf=conf, valid=valid)
            return logits.sum() * 0 + 5.0, torch.tensor(0.0)

        monkeypatch.setattr(dt, "consistency_loss", fake_ic)
        monkeypatch.setattr(dt, "cutmix_loss", lambda logits, label, conf: (logits.sum() * 0 + 3.0, conf.mean()))
        total = []
        monkeypatch.setattr(accelerator, "backward", lambda loss: (total.append(loss.detach()), loss.backward()))
        terms = dt.train_step(0, bl, bu, student, teachers, optimizer, accelerator, args, MEAN, STD)
        assert torch.allclose(total[0], terms["loss_sup"] + 3.0 + 0.2 * 5.0)
        assert torch.equal(teachers[0].inputs[0], bu["image"]) and not teachers[1].inputs
        assert len(student.inputs) == 2 and torch.equal(student.inputs[1], bu["image_strong"])
        assert torch.equal(student.inputs[0][:2], bl["image"]) and student.inputs[0].shape[0] == 4
        assert torch.equal(seen["label"], expected_label) and torch.allclose(seen["conf"], expected_conf)
        assert torch.equal(seen["valid"], bl["mask"] != 255 if flag else bu["valid"])


# ---------------------------------------------------------------------------------------------- stochastic depth
def test_drop_path_student_only_linear_rates():
    args, student, teachers, _ = setup_nets()
    rates = [b.drop_rate for layer in ("layer1", "layer2", "layer3", "layer4")
             for b in getattr(student.backbone, layer)]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())
    for t in teachers:
        assert all(b.drop_rate == 0 for layer in ("layer1", "layer2", "layer3", "layer4")
                   for b in getattr(t.backbone, layer))
        assert t.training
    x = torch.randn(8, 3, 32, 32)
    student.eval()
    assert torch.equal(student(x), student(x))  # eval: deterministic
    student.train()
    torch.manual_seed(1)
    assert not torch.equal(student(x), student(x))  # train: two sub-models
    # a teacher in train mode is deterministic: the single teacher forward equals a second one
    assert torch.equal(teachers[0](x), teachers[0](x))


def test_drop_path_on_residual_branch_scaled():
    block = common.BasicBlock(4, 4, drop_rate=0.5).train()
    x = torch.randn(64, 4, 8, 8)
    with torch.no_grad():
        residual = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        out = block(x)
    dropped = torch.relu(x)
    kept = torch.relu(residual / (1 - 0.5) + x)
    is_dropped = [torch.allclose(o, d) for o, d in zip(out, dropped)]
    is_kept = [torch.allclose(o, k, atol=1e-6) for o, k in zip(out, kept)]
    assert all(a or b for a, b in zip(is_dropped, is_kept)) and 10 < sum(is_dropped) < 54
    y = common.drop_path(torch.ones(20000, 1, 1, 1), 0.3, True)
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / 0.7])) and abs(y.mean().item() - 1) < 0.03
    assert torch.equal(common.drop_path(x, 0.3, False), x)


# ---------------------------------------------------------------------------------------------- CutMix
class FakeRng:
    """Scripted draws for cutmix_boxes: beta -> lam, integers -> the given centres (records the ranges)."""

    def __init__(self, lam, centres):
        self.lam, self.values, self.calls = lam, list(centres), []

    def beta(self, a, b):
        assert (a, b) == (4.0, 4.0)
        return self.lam

    def integers(self, low, high):
        self.calls.append((low, high))
        return self.values.pop(0)


def test_cutmix_boxes_one_size_biased_centres_clipped():
    # lam = 0.75: sqrt(1 - lam) = 1/2 -> a = 16, b = 20 on 32 x 40, box 16 x 20 before clipping
    rng = FakeRng(0.75, [20, 10, 31, 39, 3, 2])
    box = dt.cutmix_boxes(3, 32, 40, rng)
    assert rng.calls == [(4, 32), (5, 40)] * 3  # centres from [H//8, H) x [W//8, W)
    expected = torch.zeros(3, 32, 40, dtype=torch.bool)
    expected[0, 12:28, 0:20] = True   # col 10 - 10 = 0
    expected[1, 23:32, 29:40] = True  # clipped at the bottom/right
    expected[2, 0:11, 0:12] = True    # clipped at the top/left
    assert torch.equal(box, expected)
    rng = np.random.default_rng(0)
    for _ in range(20):
        box = dt.cutmix_boxes(4, 32, 32, rng)
        rows, cols = box.any(2), box.any(1)
        for i in range(4):
            assert box[i].sum() == rows[i].sum() * cols[i].sum()  # a rectangle


def test_cutmix_moves_image_and_label_together_confidence_unmixed(monkeypatch):
    monkeypatch.setattr(dt, "cutmix_photometric", lambda x, y, *a: (x, y))
    b = 4
    x_w = torch.arange(b, dtype=torch.float)[:, None, None, None].expand(b, 3, 32, 32).clone()
    label = torch.arange(b)[:, None, None].expand(b, 32, 32).clone()
    conf = torch.rand(b, 32, 32)
    for seed in range(5):
        x, y, c = dt.make_mix("cutmix", x_w, x_w + 100, label, conf, np.random.default_rng(seed), MEAN, STD)
        assert c is conf  # the weight uses the un-mixed confidence (as coded)
        assert torch.equal(x[:, 0], y.float()) and torch.equal(x[:, 2], y.float())  # from the weak view, same source
        partners = []
        for i in range(b):  # image i outside one rectangle, one partner inside it
            other = y[i] != i
            assert other.sum() == other.any(1).sum() * other.any(0).sum() and len(y[i][other].unique()) <= 1
            partners += y[i][other].unique().tolist()
        assert len(partners) == len(set(partners))  # a permutation


def test_cutmix_photometric_label_exact_flip_shared():
    """A gray image bright on the left: jitter/blur keep left > right, so the image says whether it was flipped;
    the label must say the same, and it is never altered otherwise."""
    img = torch.full((1, 3, 16, 16), 0.2)
    img[..., :8] = 0.8
    x = (img - MEAN) / STD
    y = torch.zeros(1, 16, 16, dtype=torch.long)
    y[..., :8] = 2
    flips = 0
    for seed in range(30):
        out, lab = dt.cutmix_photometric(x.expand(1, 3, 16, 16), y, np.random.default_rng(seed), MEAN, STD)
        rgb = out[0] * STD + MEAN
        flipped = rgb[:, :, :8].mean() < rgb[:, :, 8:].mean()
        assert torch.equal(lab[0], y[0].flip(-1) if flipped else y[0])
        flips += int(flipped)
    assert 5 < flips < 25


def test_cutmix_weight_quantised_per_image():
    logits = torch.randn(2, K, 8, 8)
    label = torch.randint(0, K, (2, 8, 8))
    ce = F.cross_entropy(logits, label, reduction="none")
    for value, w in ((0.951, 0.0), (0.96, 1.0)):  # 0.951 < 243/255 after 8-bit quantisation
        loss, mean_w = dt.cutmix_loss(logits, label, torch.full((2, 8, 8), value))
        assert mean_w.item() == w and torch.allclose(loss, w * ce.mean())
    conf = torch.full((2, 8, 8), 0.5)
    conf[0, :4] = 0.99  # image 0: half its pixels confident, image 1: none
    loss, mean_w = dt.cutmix_loss(logits, label, conf)
    assert mean_w.item() == 0.25 and torch.allclose(loss, (0.5 * ce[0]).sum() / ce.numel())


# ---------------------------------------------------------------------------------------------- ClassMix
def test_classmix_masks_half_the_classes_floor():
    label = torch.zeros(4, 8, 8, dtype=torch.long)
    label[0] = torch.arange(64).view(8, 8) % 4   # 4 classes -> 2
    label[1] = 2                                  # 1 class -> none
    label[2] = torch.arange(64).view(8, 8) % 5   # 5 classes -> 2
    label[3] = torch.arange(64).view(8, 8) % 3   # 3 classes -> 1
    for seed in range(10):
        m = classmix_mask(label, round_up=False, rng=np.random.default_rng(seed))
        for i, n in enumerate([4, 1, 5, 3]):
            chosen = label[i][m[i]].unique()
            assert len(chosen) == n // 2 and torch.equal(m[i], torch.isin(label[i], chosen))


def test_classmix_uses_strong_view_and_source_labels():
    for b in (2, 4):
        x_s = torch.arange(b, dtype=torch.float)[:, None, None, None].expand(b, 3, 8, 8) + 10
        label = (torch.arange(64).view(8, 8) % 4)[None].repeat(b, 1, 1)
        label[0] = 1  # a single class: its mask is empty
        conf = torch.rand(b, 8, 8)
        x, y, c = dt.make_mix("classmix", x_s * 0, x_s, label, conf, np.random.default_rng(3), MEAN, STD)
        src = (x[:, 0] - 10).long()  # which image each pixel came from (x_w would give negatives)
        assert (src >= 0).all()
        pix = torch.arange(64).view(8, 8)
        for i in range(b):
            assert len(src[i].unique()) <= 2
            assert torch.equal(y[i], label[src[i], pix // 8, pix % 8])
            assert torch.equal(c[i], conf[src[i], pix // 8, pix % 8])
        assert torch.equal(src[0], torch.full((8, 8), int(src[0, 0, 0])))  # empty mask: wholly the partner
        if b == 2:
            assert set(src[0].unique().tolist()) == {1} and set(src[1].unique().tolist()) <= {0, 1}


def test_classmix_weight_batch_scalar_no_mask():
    logits = torch.randn(2, K, 8, 8)
    label = torch.randint(0, K, (2, 8, 8))
    conf = torch.full((2, 8, 8), 0.5)
    conf[1, :2] = 0.97  # 16 of 128 pixels
    loss, w = dt.classmix_loss(logits, label, conf)
    ce = F.cross_entropy(logits, label, reduction="none")
    assert w.item() == 0.125 and torch.allclose(loss, (0.125 * ce).mean())


# ---------------------------------------------------------------------------------------------- consistency
def test_consistency_mask_and_normaliser():
    logits = torch.randn(2, K, 4, 4)
    label = torch.randint(0, K, (2, 4, 4))
    conf = torch.full((2, 4, 4), 0.9)
    conf[:, 0] = 0.99
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[:, :, 0] = False
    ce = F.cross_entropy(logits, label, reduction="none")
    keep = (conf >= 0.95) & valid
    loss, ratio = dt.consistency_loss(logits, label, conf, valid)
    assert torch.allclose(loss, (ce * keep).sum() / 24) and ratio.item() == pytest.approx(6 / 24)
    loss, ratio = dt.consistency_loss(logits, label, torch.full_like(conf, 0.949), valid)
    assert loss.item() == 0.0 and ratio.item() == 0.0


# ---------------------------------------------------------------------------------------------- end to end
def test_two_processes(tmp_path):
    out = tmp_path / "run2"
    run_method("dual_teacher.py", [*TINY, "--iters", "2", "--iters-per-epoch", "1", "--eval-every", "2",
                                   "--out", str(out)], processes=2)
    assert (out / "checkpoints" / "last" / "random_states_1.pkl").exists()
    log = (out / "log.txt").read_text()
    assert "epoch 0 (iteration 0): teacher T1 + CutMix" in log and "epoch 1 (iteration 1): teacher T2 + ClassMix" in log
    assert read_metrics(out)[-1]["teacher"] == "T2"


def test_single_process_and_resume_mid_shift(tmp_path):
    """4 iterations, 3 per epoch: straight == stop at 2 (inside T1's shift) + resume; the resumed run knows
    the epoch and the active teacher, switches at iteration 3, and both teachers, the student, the optimizer,
    the counters and the RNG states are bit-identical."""
    args = [*TINY, "--iters-per-epoch", "3"]
    ckpt = assert_resume_equivalent("dual_teacher.py", args, tmp_path, iters=4)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log = (resumed / "log.txt").read_text()
    assert "epoch 0 (iteration 2, resumed mid-epoch): teacher T1 + CutMix" in log
    assert "epoch 1 (iteration 3): teacher T2 + ClassMix" in log
    assert [(m["iteration"], m["epoch"], m["teacher"]) for m in read_metrics(straight)] == [(2, 0, "T1"), (4, 1, "T2")]
    train_state, t1, t2 = (ckpt[f"custom_checkpoint_{i}.pkl"] for i in range(3))
    assert train_state["step"] == 4 and train_state["extra"] == {"epoch": 1, "iters_per_epoch": 3}
    assert not torch.equal(t1["classifier.weight"], t2["classifier.weight"])
    for name in ("model_last.pt", "overlays/iter_0000004.png"):
        assert (straight / name).exists()
    first = load_checkpoint(straight / "checkpoints" / "last")["model.safetensors"]
    assert not any(k.startswith("module.") for k in first)
