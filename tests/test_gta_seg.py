"""methods/gta_seg.py: the released code's behaviour (Jin-Ying/GTA-Seg@534f10f, cited in the method's docstring) as
invariants on tiny networks (EMA equalities, the closed form of L_u, CutMix, gradient flow, storage sharing under
--official-code, pass count, the U2PL scale rule), then end-to-end runs through the command line in 1 and 2
processes (the student's and the assistant's mIoU logged beside the teacher's) and exact resume (all three
networks, both optimisers)."""
import copy
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, TINY, assert_resume_equivalent, load_checkpoint, read_metrics, run_method

sys.path.insert(0, str(ROOT / "methods"))
import common  # noqa: E402
import gta_seg  # noqa: E402

WARMUP = 2  # iterations per epoch in the in-process tests: steps 0-1 warm-up, 2-3 first semi epoch, 4+ after


# ----------------------------------------------------------------------------------------------------------
# L_u, percentile, CutMix
# ----------------------------------------------------------------------------------------------------------
def code_loss(logits, target, conf):
    """The official compute_unsupervised_loss_conf_weight computed step by step as the code does
    (gta/utils/loss_helper.py:69-94), numpy percentile included; no ignored pixels (as in the code)."""
    b, _, h, w = logits.shape
    target, conf = target.clone(), conf.clone()
    thresh = np.percentile(conf[target != 255].numpy().flatten(), 100 - 80)  # drop_percent: 80 (config.yaml:42)
    drop = conf.le(float(thresh)) & (target != 255)
    target[drop], conf[drop] = 255, 0
    weight = b * h * w / (torch.sum(target != 255) + 1e-6)
    conf = (conf + 1) / (conf + 1).sum() * (torch.sum(target != 255) + 1e-6)
    return torch.mean(weight * F.cross_entropy(logits, target, ignore_index=255, reduction="none") * conf)


def test_unsup_loss_closed_form_and_code():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, 9, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (3, 7, 9), generator=g)
    conf = torch.rand(3, 7, 9, generator=g)
    valid = torch.ones(3, 7, 9, dtype=torch.bool)
    loss = gta_seg.gta_unsup_loss(logits, target, conf, valid)
    # closed form: sum_K (1+c) CE / (sum_K (1+c) + |D|)
    q = np.percentile(conf.numpy(), 20)
    dropped = conf <= float(q)
    ce = F.cross_entropy(logits.detach(), target, reduction="none")
    expected = ((1 + conf) * ce)[~dropped].sum() / ((1 + conf)[~dropped].sum() + dropped.sum())
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0)
    assert torch.allclose(loss, code_loss(logits.detach(), target, conf), atol=1e-6, rtol=0)
    assert dropped.sum() >= 0.2 * conf.numel()
    # logits at dropped pixels change neither the loss nor the gradient elsewhere; their gradient is zero
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.permute(0, 2, 3, 1)[dropped].abs().max() == 0
    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[dropped] = torch.randn(int(dropped.sum()), 5, generator=g)
    other.requires_grad_(True)
    loss2 = gta_seg.gta_unsup_loss(other, target, conf, valid)
    (grad2,) = torch.autograd.grad(loss2, other)
    assert torch.equal(loss, loss2.detach()) or torch.allclose(loss, loss2, atol=1e-7)
    assert torch.allclose(grad, grad2, atol=1e-9)
    # padded (invalid) pixels take no part: same as removing them
    valid[0, :3] = False
    part = gta_seg.gta_unsup_loss(logits.detach(), target, conf, valid)
    c, t_, l_ = conf[valid], target[valid], logits.detach().permute(0, 2, 3, 1)[valid]
    d = c <= float(np.percentile(c.numpy(), 20))
    ce = F.cross_entropy(l_, t_, reduction="none")
    assert torch.allclose(part, ((1 + c) * ce)[~d].sum() / ((1 + c)[~d].sum() + d.sum()), atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentile_matches_numpy(n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n))
    for q in (0.0, 0.2, 0.5, 1.0):
        assert abs(gta_seg.percentile(values, q).item() - np.percentile(values.numpy(), 100 * q)) < 1e-6


def test_cutmix_boxes_partner_and_labels():
    h, w, b = 33, 40, 3
    x = torch.randn(b, 3, h, w)
    y = torch.randint(0, 5, (b, h, w))
    valid = torch.rand(b, h, w) > 0.3
    x_mix, y_mix, v_mix, box = gta_seg.gta_cutmix(np.random.default_rng(0), 1.0, x, y, valid)
    for i in range(b):
        m = box[i]
        area = int(m.sum())
        assert h * w / 2 - w <= area <= h * w / 2 + w
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        assert area == len(rows) * len(cols)  # one rectangle
        j = (i + 1) % b
        assert torch.equal(x_mix[i][:, m], x[j][:, m]) and torch.equal(x_mix[i][:, ~m], x[i][:, ~m])
        assert torch.equal(y_mix[i][m], y[j][m]) and torch.equal(y_mix[i][~m], y[i][~m])
        assert torch.equal(v_mix[i][m], valid[j][m])
    same = gta_seg.gta_cutmix(np.random.default_rng(0), 0.0, x, y, valid)
    assert torch.equal(same[0], x) and torch.equal(same[1], y) and not same[3].any()
    # one Bernoulli(p) per batch: either every image is mixed or none, and both happen
    outcomes = set()
    for seed in range(20):
        mixed = gta_seg.gta_cutmix(np.random.default_rng(seed), 0.5, x)[1].flatten(1).any(1)
        assert mixed.all() or not mixed.any()
        outcomes.add(bool(mixed.all()))
    assert outcomes == {True, False}


class ScriptedRng:
    """uniform() -> the scripted values in turn (uniform(low, high) maps them onto [low, high)); integers() -> low.
    Records the ranges of the uniform draws."""

    def __init__(self, *values):
        self.values, self.ranges = list(values), []

    def uniform(self, low=0.0, high=1.0):
        self.ranges.append((low, high))
        return low + self.values.pop(0) * (high - low)

    def integers(self, low, high):
        return low


@pytest.mark.parametrize("rule, draws, width", [("uniform", [0.5, 0.0], 25),         # factor 1.25
                                                ("u2pl", [0.3, 0.5, 0.0], 15),      # coin < 1/2: U[0.5, 1) -> 0.75
                                                ("u2pl", [0.7, 0.5, 0.0], 30)])     # coin >= 1/2: U[1, 2) -> 1.5
def test_scale_rule(rule, draws, width):
    """--scale-rule u2pl: one coin, then the factor from U[0.5, 1) or U[1, 2) (augmentation.py:190-194); the shared
    rule draws U(0.5, 2.0) directly. A 10 x 20 image in a 64 x 64 crop: the valid region is the rescaled image."""
    from PIL import Image
    from datasets import weak_augment
    rng = ScriptedRng(*draws)
    image = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    _, mask, valid = weak_augment(image, Image.fromarray(np.zeros((10, 20), np.uint8)), (64, 64), rng,
                                  scale_rule=rule)
    assert valid.sum(1).max() == width and valid.sum(0).max() == int(10 * width / 20 + 0.5)
    assert (mask[~valid] == 255).all() and (mask[valid] == 0).all()
    factor_range = {"uniform": (0.5, 2.0), "u2pl": (0.5, 1.0) if draws[0] < 0.5 else (1.0, 2.0)}[rule]
    assert rng.ranges[:len(draws) - 1] == ([(0.0, 1.0)] if rule == "u2pl" else []) + [factor_range]


def test_scale_rule_reaches_both_training_sets(accelerator):
    data = toy_data(accelerator, scale_rule="u2pl")
    assert data.labeled_set.scale_rule == data.unlabeled_set.scale_rule == "u2pl"
    assert toy_data(accelerator).labeled_set.scale_rule == "uniform"


def test_mask_predictor_names():
    model = common.build_model("resnet18", 5, "none", 16, 8)
    names = [n for n, _ in model.named_parameters() if gta_seg.is_mask_predictor(n)]
    assert names == ["fuse.0.0.weight", "fuse.0.1.weight", "fuse.0.1.bias", "fuse.1.0.weight", "fuse.1.1.weight",
                     "fuse.1.1.bias", "classifier.weight", "classifier.bias"]
    assert common.ema_decay(0, 0.999) == 0 and common.ema_decay(1, 0.999) == 0.5
    assert common.ema_decay(999, 0.999) == common.ema_decay(10 ** 6, 0.999) == 0.999


# ----------------------------------------------------------------------------------------------------------
# One iteration on tiny networks
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def toy_data(accelerator, **extra):
    """The toy run's data as TINY builds it (val loader, training sets)."""
    from datasets import build_data
    args = SimpleNamespace(dataset="toy", data_root="", split="1/8", seed=0, split_dir=None, protocol="classic",
                           crop_size=[32, 48], image_scale=1.0, cache_images=False, batch_size=2,
                           unlabeled_batch_size=2, num_workers=0, **extra)
    return build_data(args, accelerator, *common.normalization("resnet18"), strong=False)


def make_run(official, student_lr=0.01):
    torch.manual_seed(0)
    student = common.build_model("resnet18", 4, "none", 16, 8)
    teacher = common.frozen_copy(student)
    assistant = common.build_model("resnet18", 4, "none", 16, 8)  # a different init, as in the code
    opt_s = common.sgd(common.param_groups(student, student_lr, 10.0), student_lr)
    opt_a = common.sgd(common.param_groups(assistant, 0.01, 10.0), 0.01)
    args = SimpleNamespace(iters_per_epoch=WARMUP, total_iters=20, lr=student_lr, official_code=official,
                           ema_decay=0.999, ta_ema_decay=0.999, drop_ratio=0.2, cutmix_p=1.0)
    return SimpleNamespace(S=student, A=assistant, T=teacher, opt_s=opt_s, opt_a=opt_a, args=args)


def batches(step):
    g = torch.Generator().manual_seed(step)
    batch_l = {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": torch.randint(0, 4, (2, 32, 32), generator=g)}
    batch_u = {"image": torch.randn(2, 3, 32, 32, generator=g), "valid": torch.ones(2, 32, 32, dtype=torch.bool)}
    return batch_l, batch_u


def run_step(run, step, accelerator):
    batch_l, batch_u = batches(step)
    return gta_seg.train_step(step, batch_l, batch_u, student=run.S, assistant=run.A, teacher=run.T,
                              opt_student=run.opt_s, opt_assistant=run.opt_a, rng=np.random.default_rng(step),
                              accelerator=accelerator, args=run.args)


def params(model, pred=lambda n: True):
    return {n: p.detach().clone() for n, p in model.named_parameters() if pred(n)}


def buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def ptrs(model):
    return {n: p.data_ptr() for n, p in model.named_parameters()}


def test_warmup_trains_only_the_student(accelerator):
    run = make_run(False)
    s0, a0, t0, tb0 = params(run.S), params(run.A), params(run.T), buffers(run.T)
    batch_l, _ = batches(0)
    gta_seg.train_step(0, batch_l, None, student=run.S, assistant=run.A, teacher=run.T, opt_student=run.opt_s,
                       opt_assistant=run.opt_a, rng=np.random.default_rng(0), accelerator=accelerator, args=run.args)
    assert all(not torch.equal(s0[n], p) for n, p in run.S.named_parameters() if n.endswith("weight")
               and "bn" not in n and p.dim() > 1)
    assert all(torch.equal(a0[n], p) for n, p in run.A.named_parameters())
    assert all(torch.equal(t0[n], p) for n, p in run.T.named_parameters())
    assert all(torch.equal(tb0[n], b) for n, b in run.T.named_buffers())


def test_semi_iteration_invariants_paper_mode(accelerator):
    """Forward passes and their modes/inputs, gradient flow, constant TA lr, EMA equalities."""
    run = make_run(False, student_lr=0.0)  # lr 0: the student's SGD step is a no-op, so S after = S after EMA
    for step in range(WARMUP):
        run.args.lr = 0.01
        run_step(run, step, accelerator)
    run.args.lr = 0.0
    calls = []
    for name in "STA":
        getattr(run, name).register_forward_hook(
            lambda m, i, o, name=name: calls.append((name, m.training, i[0].clone(), torch.is_grad_enabled())))
    grads = {}
    for name, opt in (("A", run.opt_a), ("S", run.opt_s)):
        original = opt.step

        def step_and_record(*a, name=name, original=original, **k):
            grads[name] = {net: [n for n, p in getattr(run, net).named_parameters() if p.grad is not None]
                           for net in "STA"}
            return original(*a, **k)
        opt.step = step_and_record
    for t in range(3):  # t = 0 (copy), 1 (d = 0.5), 2
        step = WARMUP + t
        calls.clear()
        s0, a0, t0 = params(run.S), params(run.A), params(run.T)
        tb0, sb0 = buffers(run.T), buffers(run.S)
        run_step(run, step, accelerator)
        d = common.ema_decay(t, 0.999)
        batch_l, batch_u = batches(step)
        # passes: T eval no-grad on x_u (un-mixed), A train on x_l ++ x_mix, T train no-grad on the same, S train
        assert [(c[0], c[1], c[3]) for c in calls] == [("T", False, False), ("A", True, True), ("T", True, False),
                                                      ("S", True, True)]
        assert torch.equal(calls[0][2], batch_u["image"])
        assert torch.equal(calls[1][2][:2], batch_l["image"]) and not torch.equal(calls[1][2][2:], batch_u["image"])
        assert torch.equal(calls[1][2], calls[2][2]) and torch.equal(calls[1][2], calls[3][2])
        # pseudo-labels: L_u reaches only A, L_sup only S, T never has gradients nor an optimiser
        names = [n for n, _ in run.A.named_parameters()]
        assert grads["A"] == {"S": [], "T": [], "A": names}
        assert grads["S"] == {"S": names, "T": [], "A": []}
        assert not any(p.requires_grad for p in run.T.parameters())
        held = {id(p) for o in (run.opt_s, run.opt_a) for g in o.param_groups for p in g["params"]}
        assert not held & {id(p) for p in run.T.parameters()}
        # student: non mask predictor = d S0 + (1-d) A1; mask predictor untouched (the student's lr is 0)
        for n, p in run.S.named_parameters():
            if gta_seg.is_mask_predictor(n):
                assert torch.equal(p, s0[n]), n
            else:
                expected = torch.lerp(s0[n], run.A.state_dict()[n], 1 - d)
                assert torch.allclose(p, expected, atol=1e-7, rtol=0), n
                assert t or torch.equal(p, run.A.state_dict()[n])  # d(0) = 0: S = A1 exactly
        # teacher: d T0 + (1-d) S1 on every parameter (T = S exactly at t = 0); its BN stats moved by the conf. pass
        for n, p in run.T.named_parameters():
            expected = torch.lerp(t0[n], run.S.state_dict()[n], 1 - d)
            assert torch.allclose(p, expected, atol=1e-7, rtol=0), n
            assert t or torch.equal(p, run.S.state_dict()[n])  # d(0) = 0: T = S1 exactly
        assert not torch.equal(tb0["fuse.0.1.running_mean"], run.T.state_dict()["fuse.0.1.running_mean"])
        assert not torch.equal(sb0["fuse.0.1.running_mean"], run.S.state_dict()["fuse.0.1.running_mean"])
        # nothing shares storage in paper mode; the assistant keeps its base lr
        sp, ap, tp = ptrs(run.S), ptrs(run.A), ptrs(run.T)
        assert not set(sp.values()) & (set(ap.values()) | set(tp.values()))
        assert [g["lr"] for g in run.opt_a.param_groups] == [0.01, 0.1]


def test_student_lr_poly_and_mask_predictor_only_from_labels(accelerator):
    """Default mode: over a whole semi iteration the student's mask predictor moves by exactly its own SGD step
    on L_sup (replayed here from the recorded gradient); the assistant's step never reaches it."""
    run = make_run(False)
    for step in range(WARMUP + 2):
        run_step(run, step, accelerator)
    recorded = {}
    original = run.opt_s.step

    def record(*a, **k):
        recorded.update({n: (p.detach().clone(), p.grad.clone()) for n, p in run.S.named_parameters()
                         if gta_seg.is_mask_predictor(n)})
        return original(*a, **k)
    run.opt_s.step = record
    before = params(run.S, gta_seg.is_mask_predictor)
    momentum = {n: run.opt_s.state[p]["momentum_buffer"].clone() for n, p in run.S.named_parameters()
                if gta_seg.is_mask_predictor(n)}
    step = WARMUP + 2
    run_step(run, step, accelerator)
    base = 0.01 * (1 - step / 20) ** 0.9
    assert [g["lr"] for g in run.opt_s.param_groups] == pytest.approx([base, base * 10])
    for n, p in run.S.named_parameters():
        if gta_seg.is_mask_predictor(n):
            value, grad = recorded[n]
            assert torch.equal(value, before[n])  # the assistant's step and the EMA left it alone
            buf = momentum[n] * 0.9 + grad + 1e-4 * value
            assert torch.allclose(p, value - base * 10 * buf, atol=1e-7), n


def test_official_code_storage_sharing(accelerator):
    """--official-code: all parameters aliased during the first semi epoch; afterwards S's and A's
    mask predictor are the same storage (BN buffers separate), nothing else shared, and one iteration moves the
    student's mask predictor by the assistant's pseudo-label step too."""
    run = make_run(True, student_lr=0.0)
    for step in range(WARMUP):
        run.args.lr = 0.01
        run_step(run, step, accelerator)
    run.args.lr = 0.0
    seen = []
    original = run.opt_a.step

    def check_aliased(*a, **k):
        seen.append(ptrs(run.S) == ptrs(run.A) == ptrs(run.T))
        return original(*a, **k)
    run.opt_a.step = check_aliased
    for step in range(WARMUP, 2 * WARMUP + 2):
        before = params(run.S, gta_seg.is_mask_predictor)
        run_step(run, step, accelerator)
        sp, ap, tp = ptrs(run.S), ptrs(run.A), ptrs(run.T)
        for n in sp:
            assert (sp[n] == ap[n]) == gta_seg.is_mask_predictor(n), n
            assert sp[n] != tp[n] and ap[n] != tp[n]
        sb, ab = run.S.state_dict(), run.A.state_dict()
        assert sb["fuse.0.1.running_mean"].data_ptr() != ab["fuse.0.1.running_mean"].data_ptr()
        for n, p in run.S.named_parameters():  # S's lr is 0: its mask predictor moved by A's L_u step only
            if gta_seg.is_mask_predictor(n):
                assert torch.equal(p, run.A.state_dict()[n]) and not torch.equal(p, before[n]), n
    assert seen == [True] * WARMUP + [False] * 2  # aliased at every step of the first semi epoch only


# ----------------------------------------------------------------------------------------------------------
# Through the command line
# ----------------------------------------------------------------------------------------------------------
SHORT = [*TINY, "--iters-per-epoch", "1"]  # iteration 0 warm-up, 1 the first semi epoch, 2-3 after


def mask_predictor_shared(ckpt):
    """Whether the saved student's and assistant's mask-predictor parameters (not BN buffers) are equal."""
    s, a = ckpt["model.safetensors"], ckpt["model_1.safetensors"]
    names = [n for n in s if gta_seg.is_mask_predictor(n) and not any(b in n for b in ("running", "num_batches"))]
    assert len(names) == 8
    return all(torch.equal(s[n], a[n]) for n in names)


def test_end_to_end_paper_mode(tmp_path, accelerator):
    """One process, default mode: teacher evaluated, files written, the mask predictors not shared. Every
    evaluation logs miou_student and miou_assistant beside miou: in the warm-up (iteration 1) miou is the
    student's; at the end both equal a fresh evaluation of the checkpointed student and assistant."""
    out = tmp_path / "run"
    result = run_method("gta_seg.py", [*SHORT, "--iters", "4", "--eval-every", "1", "--out", str(out)])
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["evaluated"] == "teacher"
    assert metrics[0]["evaluated"] == "student" and metrics[0]["miou"] == metrics[0]["miou_student"]
    assert all("miou_student" in m and "miou_assistant" in m for m in metrics)
    ckpt = load_checkpoint(out / "checkpoints" / "last")
    data = toy_data(accelerator)
    for name, key in (("student", "model.safetensors"), ("assistant", "model_1.safetensors")):
        net = common.build_model("resnet18", data.num_classes, "none", 16, 16)
        net.load_state_dict(ckpt[key])
        miou = common.evaluate(net, data.val_loader, accelerator, data.num_classes)["miou"]
        assert metrics[-1][f"miou_{name}"] == round(miou, 3), name
    assert metrics[-1]["miou_student"] != metrics[-1]["miou_assistant"]
    teacher = ckpt["custom_checkpoint_1.pkl"]
    saved = torch.load(out / "model_last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], teacher[k]) for k in saved)  # the evaluated network is the teacher
    assert not torch.equal(ckpt["model.safetensors"]["backbone.conv1.weight"], teacher["backbone.conv1.weight"])
    assert not mask_predictor_shared(ckpt)
    assert (out / "overlays" / "iter_0000004.png").exists()
    assert "done: best mIoU" in result.stdout + result.stderr


def test_exact_resume_official_code(tmp_path):
    """4 iterations straight == 2 + resume + 2 under --official-code (the harder case: the shared mask predictor
    must be re-linked): student, assistant, teacher, both optimisers, counters and RNG all identical, and the
    evaluated network is the teacher."""
    ckpt = assert_resume_equivalent("gta_seg.py", [*SHORT, "--official-code"], tmp_path)
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin",
            "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= set(ckpt)
    assert mask_predictor_shared(ckpt)
    saved = torch.load(tmp_path / "resumed" / "model_last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], ckpt["custom_checkpoint_1.pkl"][k]) for k in saved)


def test_two_processes_official_code(tmp_path):
    """DDP (gloo) with the storage aliasing of --official-code."""
    out = tmp_path / "run2"
    run_method("gta_seg.py", [*SHORT, "--official-code", "--iters", "3", "--eval-every", "3", "--out", str(out)],
               processes=2)
    folder = out / "checkpoints" / "last"
    assert (folder / "random_states_1.pkl").exists()
    assert read_metrics(out)[-1]["iteration"] == 3
    ckpt = {"model.safetensors": load_file(folder / "model.safetensors"),
            "model_1.safetensors": load_file(folder / "model_1.safetensors")}
    assert mask_predictor_shared(ckpt)
    s, a = ckpt["model.safetensors"], ckpt["model_1.safetensors"]
    assert not torch.equal(s["backbone.conv1.weight"], a["backbone.conv1.weight"])
