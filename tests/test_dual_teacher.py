"""methods/dual_teacher.py: the released code's behaviour (naver-ai/dual-teacher@868e6e7, cited in the method's
docstring) as invariants on tiny tensors and a tiny model, the logged shift statistics against their closed forms,
the train-mode pseudo-label probe, then end to end through the command line (1 and 2 processes) and resume
equivalence in the middle of a teacher shift."""
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
    return dt.train_step(i, bl, bu, student=student, teachers=teachers, optimizer=optimizer, mean=MEAN, std=STD,
                         accelerator=accelerator, args=args)


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


def test_ema_ramp_caps_at_099():
    assert common.ema_decay(0, dt.EMA_CAP) == 0 and common.ema_decay(98, dt.EMA_CAP) == pytest.approx(98 / 99)
    assert common.ema_decay(99, dt.EMA_CAP) == 0.99 and common.ema_decay(5000, dt.EMA_CAP) == 0.99
    assert dt.RAMP == 100 and common.ema_decay(dt.RAMP - 2, dt.EMA_CAP) < dt.EMA_CAP


def test_ema_step_teacher_starts_each_ramp_at_its_first_shift(accelerator):
    """--ema-step teacher: the ramp counts the active teacher's own updates. T2's first update (global step 3,
    epoch 1) copies the student (the former --ema-step global gave a = 3/4 of T2's initial copy: this test fails
    with it), and T1's second shift continues its ramp (a = 3/4 at step 6) where the method restarts it (a copy)."""
    assert [dt.ramp_index(s, 3, "teacher") for s in range(12)] == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert [dt.ramp_index(s, 3, "epoch") for s in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    for mode in ("teacher", "epoch"):
        args, student, (t1, t2), optimizer = setup_nets(iters_per_epoch=3, ema_step=mode)
        for i in range(3):
            step(i, args, student, (t1, t2), optimizer, accelerator)
        step(3, args, student, (t1, t2), optimizer, accelerator)
        assert all(torch.equal(t, s) for t, s in zip(t2.parameters(), student.parameters()))
        for i in (4, 5):
            step(i, args, student, (t1, t2), optimizer, accelerator)
        old = params(t1)
        step(6, args, student, (t1, t2), optimizer, accelerator)
        expected = [0.75 * o + 0.25 * s if mode == "teacher" else s for o, s in zip(old, student.parameters())]
        assert all(torch.allclose(t, e, atol=1e-6) for t, e in zip(t1.parameters(), expected))
    with pytest.raises(SystemExit):  # the former choice is gone (argparse names the valid ones)
        dt.main([*TINY, "--ema-step", "global"])


def lag_closed_form(i):
    """The lag after update i of a shift that starts at a = 0: the running mean of steps 0..i (i/2) until the cap,
    then lag <- 0.99 (lag + 1), whose fixed point is 0.99 / 0.01 = 99."""
    return i / 2 if i <= 99 else 99 - 49.5 * 0.99 ** (i - 99)


@pytest.mark.parametrize("n", [1, 40, 100, 400, 1299])
def test_shift_stats_closed_form(n):
    for epoch in (0, 1, 4):  # the ramp restarts: every shift has the same statistics
        a_max, lag, mean = dt.shift_stats(epoch * n + n - 1, n, "epoch")
        assert a_max == min(1 - 1 / n, 0.99)
        assert lag == pytest.approx(lag_closed_form(n - 1), abs=1e-9)
        assert mean == pytest.approx(sum(lag_closed_form(i) for i in range(n)) / n, abs=1e-9)
    expected = {40: (0.975, 19.5, 9.75), 400: (0.99, 96.572, 68.787), 1299: (0.99, 99.0, 89.512)}.get(n)
    if expected:
        assert [round(v, 3) for v in dt.shift_stats(n - 1, n, "epoch")] == pytest.approx(expected, abs=1e-3)
    mid = dt.shift_stats(2 * n + n // 2, n, "epoch")  # part of a shift: over its updates so far
    assert mid[1] == pytest.approx(lag_closed_form(n // 2))


@pytest.mark.parametrize("mode", ["epoch", "teacher"])
def test_lag_is_the_ema_weighted_mean_age(mode):
    """A one-parameter student whose value after step j is j: the teacher's value is sum_j w_j j, so its lag
    sum_j w_j (s - j) is exactly s - value. Driven through the method's EMA (ema_decay of ramp_index, ema_update)
    over 4 shifts of 5, the logged lag and its mean over the shift match it at every step; in teacher mode an idle
    teacher comes back lagging by the other teacher's shift."""
    n = 5
    student, teachers = nn.Linear(1, 1, bias=False), [nn.Linear(1, 1, bias=False) for _ in range(2)]
    lags = []
    for s in range(4 * n):
        epoch = s // n
        teacher = teachers[dt.active(epoch)[0]]
        student.weight.data.fill_(float(s))
        common.ema_update(teacher, student, common.ema_decay(dt.ramp_index(s, n, mode), dt.EMA_CAP), buffers="keep")
        lags = (lags if s % n else []) + [s - teacher.weight.item()]
        a_max, lag, mean = dt.shift_stats(s, n, mode)
        assert lag == pytest.approx(lags[-1], abs=1e-5) and mean == pytest.approx(np.mean(lags), abs=1e-5)
        assert a_max == common.ema_decay(dt.ramp_index(s, n, mode), dt.EMA_CAP)
    assert (lag > n) == (mode == "teacher")  # T2 at step 19: ages of its own shift 1 + the idle shift 2


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
        terms = dt.train_step(0, bl, bu, student=student, teachers=teachers, optimizer=optimizer, mean=MEAN, std=STD,
                              accelerator=accelerator, args=args)
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
        x, y, c = dt.make_mix("cutmix", x_w, x_w + 100, label, conf, rng=np.random.default_rng(seed), mean=MEAN,
                              std=STD)
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
        x, y, c = dt.make_mix("classmix", x_s * 0, x_s, label, conf, rng=np.random.default_rng(3), mean=MEAN, std=STD)
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


# ---------------------------------------------------------------------------------------------- probe
def probe_counts(net, probe_set, batch, rule):
    """The probe's figures by hand: forwards of consecutive batches of `batch` images in the net's current mode."""
    valid = passed = correct = all_correct = 0
    with torch.no_grad():
        for k in range(0, len(probe_set), batch):
            x = torch.stack([s["image"] for s in probe_set[k:k + batch]])
            y = torch.stack([s["mask"] for s in probe_set[k:k + batch]])
            conf, label = net(x).softmax(1).max(1)
            v = y != 255
            p_ = v & (conf >= rule)
            valid, passed = valid + v.sum().item(), passed + p_.sum().item()
            correct += (p_ & (label == y)).sum().item()
            all_correct += (v & (label == y)).sum().item()
    return {"pseudo_acc": round(100 * correct / max(passed, 1), 3), "pseudo_share": round(100 * passed / valid, 3),
            "pseudo_acc_all": round(100 * all_correct / valid, 3)}


def test_probe_in_train_mode_as_the_teacher_labels(accelerator):
    """pseudo_label_probe(train_batch=B) = train-mode forwards (BN batch statistics) of batches of B probe images,
    and leaves every buffer (running statistics, counters) and the mode as they were; the default is unchanged
    (eval mode, one image at a time), and here the two modes give different figures."""
    import copy
    torch.manual_seed(0)
    net = common.build_model("resnet18", K, "none", 16, 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):  # running statistics that differ from the probe batches' statistics
            net(3 * torch.randn(4, 3, 32, 32, generator=g) + 2)
    probe_set = [{"image": torch.randn(3, 32, 32, generator=g), "mask": torch.randint(0, K, (32, 32), generator=g)}
                 for _ in range(6)]
    for sample in probe_set:
        sample["mask"][:3] = 255
    data = SimpleNamespace(probe_set=probe_set, num_classes=K)
    results = {}
    for was_training in (True, False):
        net.train(was_training)
        before = state(net)
        train = common.pseudo_label_probe(net, data, accelerator, 0.4, train_batch=4)  # batches of 4 and 2
        evaluation = common.pseudo_label_probe(net, data, accelerator, 0.4)
        assert net.training == was_training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        results[was_training] = train, evaluation
    assert results[True] == results[False]
    train, evaluation = results[True]
    overall = ("pseudo_acc", "pseudo_share", "pseudo_acc_all")
    assert {k: train[k] for k in overall} == probe_counts(copy.deepcopy(net).train(), probe_set, 4, 0.4)
    assert {k: evaluation[k] for k in overall} == probe_counts(copy.deepcopy(net).eval(), probe_set, 1, 0.4)
    assert train != evaluation


def toy_data(accelerator, batch=2):
    """The toy run's data as TINY builds it (for its probe set and val loader)."""
    from datasets import build_data
    args = SimpleNamespace(dataset="toy", data_root="", split="1/8", seed=0, split_dir=None, protocol="classic",
                           crop_size=[32, 48], image_scale=1.0, cache_images=False, batch_size=batch,
                           unlabeled_batch_size=batch, num_workers=0)
    return build_data(args, accelerator, *common.normalization("resnet18"))


# ---------------------------------------------------------------------------------------------- end to end
def test_two_processes(tmp_path):
    out = tmp_path / "run2"
    run_method("dual_teacher.py", [*TINY, "--iters", "2", "--iters-per-epoch", "1", "--eval-every", "2",
                                   "--out", str(out)], processes=2)
    assert (out / "checkpoints" / "last" / "random_states_1.pkl").exists()
    log = (out / "log.txt").read_text()
    assert "epoch 0 (iteration 0): teacher T1 + CutMix" in log and "epoch 1 (iteration 1): teacher T2 + ClassMix" in log
    assert read_metrics(out)[-1]["teacher"] == "T2"


def test_single_process_and_resume_mid_shift(tmp_path, accelerator):
    """4 iterations, 3 per epoch: straight == stop at 2 (inside T1's shift) + resume; the resumed run knows
    the epoch and the active teacher, switches at iteration 3, and both teachers, the student, the optimizer,
    the counters and the RNG states are bit-identical. Both shifts are shorter than the ramp: each start line
    warns; each shift end and evaluation logs the closed-form shift statistics; the probe figures are those of
    the active teacher (from the checkpoint) probed in train mode on batches of 2, as it labels."""
    args = [*TINY, "--iters-per-epoch", "3"]
    ckpt = assert_resume_equivalent("dual_teacher.py", args, tmp_path, iters=4)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log = (resumed / "log.txt").read_text()
    assert ("epoch 0 (iteration 2, resumed mid-epoch): teacher T1 + CutMix. WARNING: this shift (3 iterations) "
            "ends at a = 0.6667, below the cap 0.99: the ramp needs 100 updates") in log
    assert "epoch 1 (iteration 3): teacher T2 + ClassMix. WARNING: this shift (1 iterations) ends at a = 0.0000" in log
    assert "end of epoch 0 (T1, iteration 3): largest a 0.6667, teacher lag 1.0 steps (mean over the shift 0.5)" in log
    metrics = read_metrics(straight)
    assert [(m["iteration"], m["epoch"], m["teacher"]) for m in metrics] == [(2, 0, "T1"), (4, 1, "T2")]
    assert [(m["ema_a_max"], m["teacher_lag"], m["teacher_lag_mean"]) for m in metrics] == [(0.5, 0.5, 0.25),
                                                                                             (0.0, 0.0, 0.0)]
    keys = ("ema_a_max", "teacher_lag", "teacher_lag_mean", "pseudo_acc", "pseudo_share", "pseudo_acc_all")
    assert [metrics[-1][k] for k in keys] == [read_metrics(resumed)[-1][k] for k in keys]
    train_state, t1, t2 = (ckpt[f"custom_checkpoint_{i}.pkl"] for i in range(3))
    teacher = common.build_model("resnet18", 5, "none", 16, 16)
    teacher.load_state_dict(t2)
    probe = common.pseudo_label_probe(teacher, toy_data(accelerator), accelerator, dt.THRESHOLD, train_batch=2)
    assert probe == {k: metrics[-1][k] for k in probe} and len(probe) == 4
    assert train_state["step"] == 4 and train_state["extra"] == {"epoch": 1, "iters_per_epoch": 3}
    assert not torch.equal(t1["classifier.weight"], t2["classifier.weight"])
    for name in ("model_last.pt", "overlays/iter_0000004.png"):
        assert (straight / name).exists()
    first = load_checkpoint(straight / "checkpoints" / "last")["model.safetensors"]
    assert not any(k.startswith("module.") for k in first)


def test_default_toy_shift_reaches_the_cap_no_warning(tmp_path):
    """Without --iters-per-epoch a toy shift is 100 iterations (ours; the unlabeled pass would be 105 at batch 2):
    its last update reaches the cap, so no warning; the first update copies the student (a = 0, lag 0)."""
    out = tmp_path / "run"
    run_method("dual_teacher.py", [*TINY, "--iters", "200", "--stop-at", "1", "--eval-every", "1", "--out", str(out)])
    log = (out / "log.txt").read_text()
    assert "an epoch (one teacher shift) = 100 iterations (one pass over the unlabeled set: 105)" in log
    assert "WARNING" not in log
    assert dt.PAPER_DEFAULTS["camvid"]["iters_per_epoch"] == 400
    metrics = read_metrics(out)[-1]
    assert (metrics["ema_a_max"], metrics["teacher_lag"], metrics["teacher_lag_mean"]) == (0.0, 0.0, 0.0)
    result = run_method("dual_teacher.py", [*TINY, "--iters-per-epoch", "0", "--out", str(out)], check=False)
    assert result.returncode != 0 and "--iters-per-epoch: expected a positive integer, got '0'" in result.stderr
