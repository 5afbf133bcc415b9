"""methods/ctt.py against Xiao et al. (Neurocomputing 2022) §3 (Eq. 1-10) and the official code
1181110317/SSL_CTT@33d7e3c: invariants on tiny tensors and tiny networks, then end to end through the command line
(1 process + resume, 2 processes with identical banks)."""
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import (ROOT, TINY, _free_port, assert_resume_equivalent, assert_same, load_checkpoint, read_metrics,
                      run_method)

_spec = importlib.util.spec_from_file_location("ctt", ROOT / "methods" / "ctt.py")
ctt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ctt)
import common  # noqa: E402  (conftest put the repo root on sys.path)
import datasets  # noqa: E402

ACC = types.SimpleNamespace(num_processes=1, autocast=contextlib.nullcontext, unwrap_model=lambda m: m)
C = 5  # toy classes


def make_args(**over):
    args = dict(mix="none", ema_decay=0.99, teacher_bn="train", ct_threshold=0.968, queue_size=4, bank_threshold=0.0,
                gamma=0.75, hc_labeled="confident", tau_hc=0.1, tau_lc=0.5, lambda_ct=1.0, lambda_hc=0.1, lambda_lc=0.1)
    args.update(over)
    return types.SimpleNamespace(**args)


def make_pairs(n=2, dim=8):
    students = []
    for i in range(n):
        torch.manual_seed(100 + i)
        students.append(common.build_model("resnet18", C, "none", 16, dim).train())
    return students, [common.frozen_copy(s).train() for s in students]


def make_batch(seed=0, b=2, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    x_l, y_l = torch.randn(b, 3, h, w, generator=g), torch.randint(0, C, (b, h, w), generator=g)
    y_l[:, :4] = 255  # some ignored pixels
    unlabeled = dict(image=torch.randn(b, 3, h, w, generator=g), image_strong=torch.randn(b, 3, h, w, generator=g),
                     valid=torch.ones(b, h, w, dtype=torch.bool))
    unlabeled["valid"][:, :, -5:] = False  # padding
    return x_l, y_l, unlabeled


def full_banks(n=2, q=4, dim=8, seed=0, classes=C):
    banks = ctt.MemoryBanks(n, classes, q, dim)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        banks.push(i, torch.randn(classes, q, dim, generator=g), torch.full((classes,), q))
    banks.ready.fill_(True)
    return banks


def constant_classifier(model, k):
    """Make `model` predict class k everywhere with probability ~1."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-20.0)
        model.classifier.bias[k] = 20.0


# ---------------------------------------------------------------------------------------------------------
# Memory bank: FIFO, entry rule, top-k, multi-process gather, switch-on (paper §3.3 "Memory Bank", "Feature
# Selection Criteria", §3.4)
# ---------------------------------------------------------------------------------------------------------
def test_fifo_keeps_the_newest_q_in_insertion_order():
    q, d = 4, 3
    banks = ctt.MemoryBanks(1, 2, q, d)
    vectors = F.normalize(torch.stack([torch.tensor([float(j + 1), 1.0, 0.5]) for j in range(q + 2)]), dim=1)
    sizes = []
    for chunk in (vectors[:3], vectors[3:]):  # 3 then 3: Q + 2 vectors in all
        new = torch.zeros(2, 3, d)
        new[0] = chunk
        banks.push(0, new, torch.tensor([3, 0]))
        sizes.append(banks.size[0].tolist())
    assert sizes == [[3, 0], [4, 0]]  # never above Q, never decreasing; class 1 untouched
    assert torch.allclose(banks.feats[0, 0], vectors[2:])  # oldest two dropped, order kept
    assert torch.equal(banks.feats[0, 1], torch.zeros(q, d))
    assert not banks.feats.requires_grad


def test_bank_entry_paper_rule_correct_pixels_top_k_no_confidence_gate():
    """Paper §3.3: EMA-teacher features whose prediction equals the ground truth, per class the top-k by confidence
    among those: a correct low-confidence pixel enters, a wrong confident one never does, nor takes a slot."""
    banks = ctt.MemoryBanks(1, 2, 4, 3)
    feature = torch.randn(1, 3, 2, 3)
    conf1 = torch.tensor([[0.30, 0.60, 0.55], [0.999, 0.02, 0.98]])  # P(class 1) per pixel
    prob = torch.stack([1 - conf1, conf1])[None]  # predictions: [[0, 1, 1], [1, 0, 1]]
    label = torch.tensor([[[0, 1, 1], [0, 1, 255]]])  # (1,0) and (1,1): wrong at 0.999 and 0.98; (1,2) ignored
    banks.update(0, feature, prob, label, n_add=2, accelerator=ACC)  # default threshold 0 = the paper's rule
    flat = F.normalize(feature[0].permute(1, 2, 0).reshape(-1, 3), dim=1)
    assert banks.size[0].tolist() == [1, 2] and banks.candidates[0].tolist() == [1, 2]
    assert torch.allclose(banks.feats[0, 0, 3], flat[0])  # correct at confidence 0.70 (below 0.95): enters
    assert torch.allclose(banks.feats[0, 1, 2:], flat[[1, 2]])  # 0.60 then 0.55, not the wrong 0.98 pixel
    one = ctt.MemoryBanks(1, 2, 4, 3)
    one.update(0, feature, prob, label, n_add=1, accelerator=ACC)  # k = 1: each class's most confident correct pixel
    assert torch.allclose(one.feats[0, 1, 3], flat[1]) and torch.allclose(one.feats[0, 0, 3], flat[0])
    gated = ctt.MemoryBanks(1, 2, 4, 3)
    gated.update(0, feature, prob, label, n_add=2, accelerator=ACC, threshold=0.95)  # ablation: none passes
    assert gated.size.sum() == 0 and gated.candidates.sum() == 0


def test_bank_entry_with_the_confidence_gate_ablation_takes_top_k_correct_confident_pixels_only():
    banks = ctt.MemoryBanks(1, 2, 4, 3)
    feature = torch.randn(1, 3, 2, 3)
    conf1 = torch.tensor([[0.99, 0.97, 0.96], [0.90, 0.999, 0.98]])  # P(class 1) per pixel
    prob = torch.stack([1 - conf1, conf1])[None]  # teacher predicts class 1 everywhere
    label = torch.tensor([[[1, 1, 1], [1, 0, 255]]])  # (1,1) wrong, (1,2) ignored, (1,0) not confident
    banks.update(0, feature, prob, label, n_add=2, accelerator=ACC, threshold=0.95)
    flat = F.normalize(feature[0].permute(1, 2, 0).reshape(-1, 3), dim=1)
    assert banks.size[0].tolist() == [0, 2] and banks.candidates[0].tolist() == [0, 3]
    assert torch.allclose(banks.feats[0, 1, 2:], flat[[0, 1]])  # 0.99 then 0.97: the two most confident
    before = banks.feats.clone()
    banks.update(0, feature, prob, torch.zeros_like(label), n_add=2, accelerator=ACC, threshold=0.95)  # all wrong
    assert torch.equal(banks.feats, before) and banks.size[0].tolist() == [0, 2]


def test_gathered_update_equals_top_k_over_every_process_batch():
    """Two 'processes' with their own labeled batches: each keeps the global top-k, identical to one process
    seeing both batches."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 6, 4, 4, generator=g) for _ in range(2)]
    probs = [torch.rand(2, 3, 4, 4, generator=g).softmax(1) for _ in range(2)]
    labels = [p.argmax(1) for p in probs]  # all correct: confidence decides
    recorded = []
    peer = types.SimpleNamespace(num_processes=2, gather=lambda t: (recorded.append(t), torch.cat([t, t]))[1])
    ctt.MemoryBanks(1, 3, 8, 6).update(0, feats[1], probs[1], labels[1], n_add=3, accelerator=peer, threshold=0.0)
    outputs = []
    for order in ([0, 1], [1, 0]):  # rank 0 and rank 1 see the gather in rank order
        local = list(recorded)
        acc = types.SimpleNamespace(num_processes=2, gather=lambda t, o=order, loc=local: torch.cat(
            [t, loc.pop(0)] if o == [0, 1] else [loc.pop(0), t]))
        banks = ctt.MemoryBanks(1, 3, 8, 6)
        banks.update(0, feats[0], probs[0], labels[0], n_add=3, accelerator=acc, threshold=0.0)
        outputs.append(banks.feats.clone())
    single = ctt.MemoryBanks(1, 3, 8, 6)
    single.update(0, torch.cat(feats), torch.cat(probs), torch.cat(labels), n_add=3, accelerator=ACC, threshold=0.0)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.allclose(outputs[0], single.feats)
    assert single.size[0].tolist() == [3, 3, 3]


def test_switch_on_needs_every_queue_of_every_bank_and_stays_on():
    banks = ctt.MemoryBanks(2, 2, 2, 3)
    feature = torch.randn(1, 3, 2, 2)
    onehot = lambda lab: F.one_hot(lab, 2).permute(0, 3, 1, 2).float()  # noqa: E731
    both, only0 = torch.tensor([[[0, 1], [0, 1]]]), torch.zeros(1, 2, 2, dtype=torch.long)
    banks.update(0, feature, onehot(both), both, n_add=2, accelerator=ACC)
    banks.update(1, feature, onehot(only0), only0, n_add=2, accelerator=ACC)
    assert not banks.ready  # bank 1's class-1 queue is empty
    banks.update(1, feature, onehot(both), both, n_add=2, accelerator=ACC)
    assert bool(banks.ready)
    banks.update(0, feature, onehot(both), 1 - both, n_add=2, accelerator=ACC)  # nothing enters: stays on
    assert bool(banks.ready)
    restored = ctt.MemoryBanks(2, 2, 2, 3)
    restored.load_state_dict(banks.state_dict())  # the checkpointed state holds the switch and the queues
    assert bool(restored.ready) and torch.equal(restored.feats, banks.feats) and torch.equal(restored.size, banks.size)


# ---------------------------------------------------------------------------------------------------------
# HC and LC (paper Eq. 6-9): closed forms, loop references, the pixel sets of Eq. 7 and 9
# ---------------------------------------------------------------------------------------------------------
def naive_hc(anchors, labels, bank, tau):
    """Eq. 6 with loops; `bank` is a list of per-class [Q_c, D] tensors (Q_c = Q when full)."""
    a, m = F.normalize(anchors, dim=1), [F.normalize(b, dim=-1) for b in bank]
    per_class = {}
    for x, c in zip(a, labels.tolist()):
        neg = sum(torch.exp(x @ v / tau) for k in range(len(m)) if k != c for v in m[k])
        terms = [-torch.log(torch.exp(x @ p / tau) / (torch.exp(x @ p / tau) + neg)) for p in m[c]]
        per_class.setdefault(c, []).extend(terms)
    return sum(sum(v) / len(v) for v in per_class.values() if v) / sum(1 for v in per_class.values() if v)


def naive_lc(anchors, positives, labels, banks, tau):
    a, p, m = F.normalize(anchors, dim=1), F.normalize(positives, dim=1), F.normalize(banks, dim=-1)
    per_class = {}
    for x, y, c in zip(a, p, labels.tolist()):
        neg = sum(torch.exp(x @ v / tau) for b in m for k in range(m.shape[1]) if k != c for v in b[k])
        per_class.setdefault(c, []).append(-torch.log(torch.exp(x @ y / tau) / (torch.exp(x @ y / tau) + neg)))
    return sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)


def test_hc_closed_form():
    q, tau = 4, 0.1
    bank = torch.zeros(3, q, 3)
    bank[0, :, 0] = torch.tensor([1.0, 2.0, 0.5, 3.0])  # positives: multiples of e0
    bank[1:, :, 1:] = torch.rand(2, q, 2) + 0.1  # negatives: orthogonal to e0
    loss = ctt.hc_loss(torch.tensor([[2.5, 0.0, 0.0]]), torch.tensor([0]), bank, tau)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * q))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_hc_matches_reference_and_is_cosine_and_per_class_normalised():
    g = torch.Generator().manual_seed(1)
    anchors, labels = torch.randn(7, 6, generator=g), torch.tensor([0, 0, 0, 0, 2, 2, 1])
    bank = torch.randn(3, 5, 6, generator=g)
    loss = ctt.hc_loss(anchors, labels, bank, 0.1)
    assert loss.item() == pytest.approx(naive_hc(anchors, labels, list(bank), 0.1).item(), rel=1e-5)
    # partly filled queues (only with --contrast-after): the empty entries are neither positives nor negatives,
    # anchors of a class with an empty queue drop out
    filled = torch.ones(3, 5, dtype=torch.bool)
    filled[1, :3] = False
    filled[2] = False
    partial = ctt.hc_loss(anchors, labels, bank, 0.1, filled)
    kept = [0, 1, 2, 3, 6]  # the class-2 anchors drop out
    reference = naive_hc(anchors[kept], labels[kept], [bank[0], bank[1, 3:], bank[2, :0]], 0.1)
    assert partial.item() == pytest.approx(reference.item(), rel=1e-5)
    only_one = torch.zeros(3, 5, dtype=torch.bool)
    only_one[0] = True  # a single filled class: no negatives at all, loss 0 and finite gradients
    x = anchors.clone().requires_grad_()
    lone = ctt.hc_loss(x, labels, bank, 0.1, only_one)
    lone.backward()
    assert lone.item() == 0.0 and torch.isfinite(x.grad).all()
    scaled = ctt.hc_loss(anchors * torch.rand(7, 1, generator=g).add(0.1), labels, bank * 3.0, 0.1)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)
    twice = ctt.hc_loss(torch.cat([anchors, anchors]), torch.cat([labels, labels]), bank, 0.1)
    assert twice.item() == pytest.approx(loss.item(), rel=1e-6)
    # a sharp temperature: e^(1/tau) = e^100 overflows float32, the masked logsumexp stays exact
    sharp = ctt.hc_loss(anchors, labels, bank, 0.01)
    assert sharp.item() == pytest.approx(naive_hc(anchors.double(), labels, list(bank.double()), 0.01).item(),
                                         rel=1e-5)


@pytest.mark.parametrize("flag, value, expected", [("--tau-hc", "0", "a finite number > 0"),
                                                   ("--tau-lc", "-0.5", "a finite number > 0"),
                                                   ("--gamma", "1.5", "a number in [0, 1]"),
                                                   ("--pairs", "9", "an integer in [1, 8]"),
                                                   ("--bank-threshold", "-0.1", "a number in [0, 1]")])
def test_bad_flags_are_refused_with_one_clear_line(flag, value, expected, capsys):
    with pytest.raises(SystemExit):
        ctt.main(["--dataset", "toy", flag, value, "--iters", "1"])
    assert f"argument {flag}: expected {expected}, got {value!r}" in capsys.readouterr().err


def test_lc_matches_reference_and_is_zero_without_nan_when_nothing_is_selected():
    g = torch.Generator().manual_seed(2)
    anchors, positives = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    labels, banks = torch.tensor([1, 1, 0, 2, 1]), torch.randn(2, 3, 4, 6, generator=g)
    loss = ctt.lc_loss(anchors, positives, labels, banks, 0.5)
    assert loss.item() == pytest.approx(naive_lc(anchors, positives, labels, banks, 0.5).item(), rel=1e-5)
    sharp = ctt.lc_loss(anchors, positives, labels, banks, 0.01)
    reference = naive_lc(anchors.double(), positives.double(), labels, banks.double(), 0.01)
    assert sharp.item() == pytest.approx(reference.item(), rel=1e-5)
    empty = torch.zeros(0, 6, requires_grad=True)
    zero = ctt.lc_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.long), banks, 0.5)
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(zero)
    assert ctt.hc_loss(empty, torch.zeros(0, dtype=torch.long), banks[0], 0.1).item() == 0.0


def pixel_sets(gamma=0.75, hc_labeled="confident", student=0):
    """Which pixels of a hand-made 2x4 feature grid HC and LC of `student` use (non-zero gradient): masks
    [image, h, w] for one labeled image (index 0) and one unlabeled image (index 1); also the two losses."""
    n_l, b_u, dim, h, w = 1, 1, 6, 2, 4
    g = torch.Generator().manual_seed(3)
    gt = torch.tensor([[[0, 1, 255, 2], [2, 255, 0, 1]]])
    valid = torch.tensor([[[True, True, True, True], [True, True, True, False]]])
    teacher_conf = torch.tensor([[[0.9, 0.8, 0.5, 0.5], [0.5, 0.5, 0.6, 0.5]]])  # first two: m = 1, rest: m = 0
    teacher_label = torch.tensor([[[1, 0, 2, 2], [0, 1, 1, 2]]])
    own_l = torch.tensor([[[0.9, 0.5, 0.9, 0.8], [0.7, 0.9, 0.3, 0.76]]])  # student 0 on the labeled image
    own = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.8, 0.9, 0.5, 0.5]]])  # student 0 on the unlabeled image
    peer = torch.tensor([[[0.9, 0.9, 0.9, 0.7], [0.9, 0.9, 0.9, 0.95]]])  # student 1 on the unlabeled image
    student_conf = torch.stack([torch.cat([own_l, own]), torch.cat([torch.full_like(own_l, 0.99), peer])])
    student_pred = torch.randint(0, 3, (2, b_u, h, w), generator=g)
    student_feats = torch.randn(2, b_u, h, w, dim, generator=g)
    banks = full_banks(2, 3, dim, classes=3)
    feat = torch.randn(n_l + b_u, dim, h, w, generator=g, requires_grad=True)
    args = make_args(gamma=gamma, hc_labeled=hc_labeled)
    hc, lc = ctt.contrastive_losses(student, feat, n_l=n_l, gt=gt, valid=valid, teacher_conf=teacher_conf,
                                    teacher_label=teacher_label, student_conf=student_conf, student_pred=student_pred,
                                    student_feats=student_feats, banks=banks, args=args)
    hc_grad, = torch.autograd.grad(hc, feat, retain_graph=True)
    lc_grad, = torch.autograd.grad(lc, feat)
    return hc_grad.abs().sum(1) > 0, lc_grad.abs().sum(1) > 0, hc, lc


def as_mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_hc_queries_are_gamma_gated_labeled_and_unlabeled_pixels_lc_the_rest_with_a_more_confident_peer():
    """Eq. 7: HC queries = labeled pixels with the student's own confidence >= gamma (--hc-labeled all: every
    labeled pixel) + unlabeled pixels with cross-teacher confidence >= gamma. Eq. 9: LC = the other (m = 0)
    unlabeled pixels where the peer is strictly more confident; never a labeled or padding pixel."""
    hc_used, lc_used, _, _ = pixel_sets()
    assert torch.equal(hc_used[0], as_mask([[1, 0, 0, 1], [0, 0, 0, 1]]))  # own conf 0.9, 0.8, 0.76 >= 0.75
    assert torch.equal(hc_used[1], as_mask([[1, 1, 0, 0], [0, 0, 0, 0]]))  # cross-teacher conf >= 0.75
    # LC: (0,3) too (peer 0.7 < gamma but above the student's 0.5); not (1,1) (tie), (1,3) (padding)
    assert not lc_used[0].any() and torch.equal(lc_used[1], as_mask([[0, 0, 1, 1], [1, 0, 1, 0]]))
    assert not (hc_used[1] & lc_used[1]).any()
    hc_all, lc_all, _, _ = pixel_sets(hc_labeled="all")  # the official scripts' labeled queries
    assert torch.equal(hc_all[0], as_mask([[1, 1, 0, 1], [1, 0, 1, 1]])) and torch.equal(hc_all[1], hc_used[1])
    assert torch.equal(lc_all, lc_used)
    _, lc_peer, _, lc_value = pixel_sets(student=1)  # the more confident student learns from nobody
    assert not lc_peer.any() and lc_value.item() == 0.0


def test_gamma_ends_give_the_hc_only_and_lc_only_rows_of_table_8():
    """gamma = 0: every query is high-quality, LC is empty (Table 8's 60.79 = Table 4's HC-only row); gamma = 1:
    HC is empty, LC covers every unlabeled pixel with a more confident peer (61.31 = the LC-only row)."""
    hc_used, lc_used, _, lc = pixel_sets(gamma=0.0)
    assert torch.equal(hc_used[0], as_mask([[1, 1, 0, 1], [1, 0, 1, 1]]))  # every labeled pixel
    assert torch.equal(hc_used[1], as_mask([[1, 1, 1, 1], [1, 1, 1, 0]]))  # every non-padded unlabeled pixel
    assert not lc_used.any() and lc.item() == 0.0
    hc_used, lc_used, hc, _ = pixel_sets(gamma=1.0)
    assert not hc_used.any() and hc.item() == 0.0
    assert not lc_used[0].any() and torch.equal(lc_used[1], as_mask([[1, 1, 1, 1], [1, 0, 1, 0]]))
    hc_all, _, hc_value, _ = pixel_sets(gamma=1.0, hc_labeled="all")  # not an LC-only run with the code's rule
    assert hc_all[0].any() and hc_value.item() > 0


# ---------------------------------------------------------------------------------------------------------
# Cross-teacher wiring (§3.2), gradient isolation, mixing, CT weight (Eq. 5), EMA, bank timing, no-HC/LC runs
# ---------------------------------------------------------------------------------------------------------
def test_students_learn_only_from_the_other_teacher_with_isolated_gradients():
    students, teachers = make_pairs()
    x_l, y_l, unlabeled = make_batch()
    constant_classifier(teachers[1], 3)  # teacher B says "class 3" everywhere, confidently
    args = make_args(gamma=0.3)
    banks = full_banks()
    results = ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=banks,
                                 accelerator=ACC, args=args)
    assert (results[0]["target"] == 3).all() and results[0]["w"].item() == pytest.approx(1.0)
    assert not (results[1]["target"] == 3).all()  # student B's target comes from teacher A
    assert results[0]["hc"].item() > 0 and results[1]["hc"].item() > 0
    assert results[1]["lc"].item() > 0  # LC path exercised (A is confident where teacher B's label is)
    for me, peer in ((1, 0), (0, 1)):  # L^B reaches student B only (LC positives from A are detached), and back
        for model in students:
            model.zero_grad(set_to_none=True)
        results[me]["total"].backward(retain_graph=True)
        assert all(p.grad is None for p in students[peer].parameters())
        assert all(p.grad is None and not p.requires_grad for t in teachers for p in t.parameters())
        assert all(p.grad is not None for p in students[me].parameters())
    # perturbing teacher A changes nothing of student A's CT loss (no mixing draw here: --mix none)
    ct_before = results[0]["ct"].detach().clone()
    with torch.no_grad():
        for p in teachers[0].parameters():
            p.add_(torch.randn_like(p))
    again = ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=banks,
                               accelerator=ACC, args=args)
    assert torch.equal(again[0]["ct"].detach(), ct_before)
    assert not torch.equal(again[1]["ct"].detach(), results[1]["ct"].detach())


def test_three_pairs_learn_from_the_mean_of_the_other_teachers():
    students, teachers = make_pairs(3)
    x_l, y_l, unlabeled = make_batch()
    results = ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=full_banks(3),
                                 accelerator=ACC, args=make_args(gamma=0.3))
    with torch.no_grad():
        probs = [t(unlabeled["image"]).softmax(1) for t in teachers]
    for i in range(3):
        others = sum(p for j, p in enumerate(probs) if j != i) / 2
        assert torch.equal(results[i]["target"], others.argmax(1))
        assert torch.isfinite(results[i]["total"]) and results[i]["hc"].item() > 0


def test_probe_and_overlay_network_gives_exactly_the_targets_student_a_trains_on():
    """One pseudo-label rule (§3.2): CrossTeacher, the network the pseudo-label probe scores and the overlays draw,
    labels exactly as student A's training targets (--mix none), with 2 and with 3 pairs."""
    for n in (2, 3):
        students, teachers = make_pairs(n)
        x_l, y_l, unlabeled = make_batch()
        results = ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=full_banks(n),
                                     accelerator=ACC, args=make_args())
        with torch.no_grad():
            probe = ctt.CrossTeacher(teachers)(unlabeled["image"])
        assert torch.equal(probe.argmax(1), results[0]["target"])
        assert not torch.equal(teachers[0](unlabeled["image"]).argmax(1), results[0]["target"])  # not its own


def test_contrastive_terms_are_exactly_zero_until_the_banks_are_full():
    students, teachers = make_pairs()
    x_l, y_l, unlabeled = make_batch()
    banks = full_banks()
    banks.ready.fill_(False)
    for r in ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=banks,
                                accelerator=ACC, args=make_args(gamma=0.3)):
        assert r["hc"].item() == 0.0 and r["lc"].item() == 0.0 and not r["hc"].requires_grad


def test_without_hc_and_lc_no_contrastive_terms_and_no_banks():
    """--lambda-hc 0 --lambda-lc 0 (paper Table 5, 'CTT w/o HC and LC'): no contrastive terms even with full banks,
    no bank updates (the labeled teacher pass is skipped); the same call with the paper's weights fills them."""
    students, teachers = make_pairs()
    x_l, y_l, unlabeled = make_batch()
    off = make_args(gamma=0.3, lambda_hc=0.0, lambda_lc=0.0)
    for r in ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=full_banks(),
                                accelerator=ACC, args=off):
        assert r["hc"].item() == 0.0 and r["lc"].item() == 0.0 and not r["hc"].requires_grad
    banks = ctt.MemoryBanks(2, C, 4, 8)
    ctt.update_teachers_and_banks(0, x_l, y_l, teachers=teachers, students=students, banks=banks, n_add=3,
                                  accelerator=ACC, args=off)
    assert banks.size.sum() == 0 and banks.candidates.sum() == 0
    ctt.update_teachers_and_banks(0, x_l, y_l, teachers=teachers, students=students, banks=banks, n_add=3,
                                  accelerator=ACC, args=make_args())
    assert banks.size.sum() > 0 and banks.candidates.sum() > 0


@pytest.mark.parametrize("kind", ["classmix", "cutmix"])
def test_pseudo_label_and_strong_image_share_one_mix_mask(kind):
    students, teachers = make_pairs()
    x_l, y_l, unlabeled = make_batch(seed=4)
    unlabeled["valid"][:] = True
    torch.manual_seed(0)
    results = ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=full_banks(),
                                 accelerator=ACC, args=make_args(mix=kind))
    from_partner = results[0]["from_partner"]  # True = image i+1's pixels, as datasets.cutmix_box_mask
    assert from_partner.any() and (~from_partner).any()
    with torch.no_grad():
        label_b = teachers[1](unlabeled["image"]).argmax(1)  # what student A learns from, before mixing
    assert torch.equal(results[0]["target"], datasets.mix(from_partner, label_b.roll(-1, 0), label_b))
    assert torch.equal(results[1]["from_partner"], from_partner)  # one draw for both students


def test_classmix_pastes_floor_half_of_the_classes_and_with_one_class_the_partner():
    """CTT's ClassMix (1181110317/SSL_CTT@33d7e3c cross_teacher_contr.py:121): floor(n/2) of the n classes of
    image i are kept, the rest comes from image i+1; with one class nothing is kept, the partner is pasted whole.
    Padding (ignored) pixels are never kept."""
    h, w = 4, 6
    label = torch.stack([torch.arange(w).repeat(h, 1) * n // w for n in range(1, 6)])  # image b: b + 1 classes
    valid = torch.ones(5, h, w, dtype=torch.bool)
    valid[:, -1] = False  # a padded row: every class is still present above it
    for seed in range(10):
        torch.manual_seed(seed)
        from_partner = ctt.partner_mask("classmix", label, valid)  # True = image i+1's pixels
        for b in range(5):
            kept = label[b][~from_partner[b]].unique()
            assert len(kept) == (b + 1) // 2  # floor(n/2): 0, 1, 1, 2, 2 (ceil would be 1, 1, 2, 2, 3)
            assert torch.equal(~from_partner[b], torch.isin(label[b], kept) & valid[b])
    image = torch.randn(5, 3, h, w)
    mixed = datasets.mix(from_partner, image.roll(-1, 0), image)
    assert torch.equal(mixed[0], image[1])  # one class: the partner image everywhere


def test_partner_mask_has_the_polarity_of_cutmix_box_mask():
    """One mask polarity in every method: True = the partner's pixels (datasets.cutmix_box_mask), used as
    datasets.mix(mask, partner, base)."""
    label, valid = torch.zeros(3, 8, 12, dtype=torch.long), torch.ones(3, 8, 12, dtype=torch.bool)
    torch.manual_seed(1)
    box = datasets.cutmix_box_mask(3, 8, 12, p=1.0, area=(0.5, 0.5))
    torch.manual_seed(1)
    assert torch.equal(ctt.partner_mask("cutmix", label, valid), box)
    assert not ctt.partner_mask("none", label, valid).any()  # --mix none: every pixel its own


def test_ct_weight_is_zero_exactly_when_no_pixel_is_confident():
    students, teachers = make_pairs()
    x_l, y_l, unlabeled = make_batch()
    for r in ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=full_banks(),
                                accelerator=ACC, args=make_args(ct_threshold=1.01)):
        assert r["w"].item() == 0.0 and r["ct"].item() == 0.0 and not r["w"].requires_grad
    for r in ctt.student_losses(x_l, y_l, unlabeled, students=students, teachers=teachers, banks=full_banks(),
                                accelerator=ACC, args=make_args()):
        assert 0.0 <= r["w"].item() <= 1.0


def test_ema_then_banks_from_each_pairs_own_updated_teacher():
    students, teachers = make_pairs()
    x_l, y_l, _ = make_batch()
    y_l[:] = 1
    constant_classifier(students[0], 1)  # teacher A (after the t=0 copy) is right everywhere
    constant_classifier(students[1], 2)  # teacher B is wrong everywhere
    banks = ctt.MemoryBanks(2, C, 4, 8)
    args = make_args()
    ctt.update_teachers_and_banks(0, x_l, y_l, teachers=teachers, students=students, banks=banks, n_add=3,
                                  accelerator=ACC, args=args)
    for t, s in zip(teachers, students):  # t = 0: teacher = student
        assert all(torch.equal(a, b) for a, b in zip(t.parameters(), s.parameters()))
    assert banks.size[0].tolist() == [0, 3, 0, 0, 0] and banks.size[1].sum() == 0  # bank B unchanged
    with torch.no_grad():
        feat = teachers[0](x_l, return_features=True)[1]
    entries = F.normalize(feat.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    assert ((banks.feats[0, 1, 1:] @ entries.t()).max(1).values > 1 - 1e-5).all()  # teacher A's own features
    # t >= 99: exactly 0.99 teacher + 0.01 student; teacher A does not depend on student B
    old = [p.clone() for p in teachers[0].parameters()]
    with torch.no_grad():
        for s in students:
            for p in s.parameters():
                p.add_(0.1)
    other = [common.frozen_copy(t) for t in teachers]
    students_b_changed = [students[0], common.build_model("resnet18", C, "none", 16, 8)]
    ctt.update_teachers_and_banks(150, x_l, y_l, teachers=teachers, students=students, banks=banks, n_add=3,
                                  accelerator=ACC, args=args)
    ctt.update_teachers_and_banks(150, x_l, y_l, teachers=other, students=students_b_changed,
                                  banks=ctt.MemoryBanks(2, C, 4, 8), n_add=3, accelerator=ACC, args=args)
    for t, o, s, t2 in zip(teachers[0].parameters(), old, students[0].parameters(), other[0].parameters()):
        assert torch.allclose(t, 0.99 * o + 0.01 * s, atol=1e-6)
        assert torch.equal(t, t2)
    with torch.no_grad():  # now teacher and student differ: the newest entries are the teacher's features
        by_teacher = F.normalize(teachers[0](x_l, return_features=True)[1].permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
        by_student = F.normalize(students[0](x_l, return_features=True)[1].permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    newest = banks.feats[0, 1, 1:]
    assert ((newest @ by_teacher.t()).max(1).values > 1 - 1e-5).all()
    assert ((newest @ by_student.t()).max(1).values < 1 - 1e-3).all()


# ---------------------------------------------------------------------------------------------------------
# End to end (toy data, tiny network): one process + resume, two processes
# ---------------------------------------------------------------------------------------------------------
# A random tiny network rarely fills every queue in a few iterations: small queues and the --contrast-after
# fallback switch HC/LC on after iteration 1 so both run (with gamma 0.3, LC selects pixels).
FAST = [*TINY, "--queue-size", "2", "--gamma", "0.3", "--contrast-after", "1"]


def test_ctt_single_process_and_resume_is_exact(tmp_path):
    ckpt = assert_resume_equivalent("ctt.py", FAST, tmp_path, iters=4)  # 4 straight == 2 + resume + 2
    out = tmp_path / "straight"
    metrics, resumed = read_metrics(out), read_metrics(tmp_path / "resumed")
    assert [m["iteration"] for m in metrics] == [2, 4]
    assert "miou_student_B" in metrics[-1] and metrics[-1]["banks_ready"]
    assert metrics[-1]["train_hc_A"] > 0 and metrics[-1]["train_lc_B"] >= 0 and "pseudo_acc" in metrics[-1]
    # the switch-on iteration is logged, checkpointed and survives the resume (recomputed it would read 2)
    assert [m["contrast_on_iteration"] for m in metrics] == [1, 1] == [m["contrast_on_iteration"] for m in resumed]
    assert [m["contrast_on_share"] for m in metrics] == [0.5, 0.75]  # iterations 2 of 2, then 2-4 of 4
    args = json.loads((out / "args.json").read_text())  # the paper's rules are the defaults
    assert args["bank_threshold"] == 0.0 and args["hc_labeled"] == "confident" and args["mix"] == "classmix"
    log = (out / "log.txt").read_text()
    assert log.count("HC/LC on from iteration 2: --contrast-after 1") == 1
    assert "WARNING: memory banks not full after 1 of 4 iterations" in log  # not full by 10% of training
    classes = list(metrics[-1]["bank_entries"]["A"])
    assert len(classes) == 5 and set(metrics[-1]["bank_entries"]) == set(metrics[-1]["bank_candidates"]) == {"A", "B"}
    for m in metrics:
        sizes = [n for pair in m["bank_entries"].values() for n in pair.values()]
        assert all(0 <= n <= 2 for n in sizes) and m["bank_fill_min"] == min(sizes) / 2
        assert sum(n for pair in m["bank_candidates"].values() for n in pair.values()) > 0
    # candidates are counted from one evaluation to the next (not checkpointed): after the resume at iteration 2
    # the run counts exactly what the straight run counted for iterations 3-4 (a running total would differ)
    assert resumed[-1]["bank_candidates"] == metrics[-1]["bank_candidates"]
    banks = next(v for v in ckpt.values() if isinstance(v, dict) and "ready" in v)
    assert bool(banks["ready"]) and banks["size"].sum() > 0 and "candidates" not in banks
    for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"):
        assert (out / "checkpoints" / "last" / name).exists(), name
    assert (out / "overlays" / "iter_0000004.png").exists() and (out / "model_last.pt").exists()


# Runs ctt.main in each process and saves that process's banks (and the labels it fed them) at the end.
DRIVER = """
import importlib.util, os, sys, torch
spec = importlib.util.spec_from_file_location("ctt", sys.argv[1])
ctt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ctt)
made, labels, init, update = [], [], ctt.MemoryBanks.__init__, ctt.MemoryBanks.update
def record_init(self, *a, **k):
    init(self, *a, **k)
    made.append(self)
def record_update(self, i, feature, prob, label, *a, **k):
    labels.append(label.clone())
    return update(self, i, feature, prob, label, *a, **k)
ctt.MemoryBanks.__init__, ctt.MemoryBanks.update = record_init, record_update
ctt.main(sys.argv[2:])
out = sys.argv[sys.argv.index("--out") + 1]
torch.save(dict(banks=made[0].state_dict(), labels=labels), os.path.join(out, "banks_%s.pt" % os.environ["RANK"]))
"""


def test_until_the_banks_fill_ctt_trains_exactly_as_ctt_without_hc_and_lc(tmp_path):
    """The v2 CamVid table's CTT rows never filled the bicyclist queues, so HC/LC never switch on: the bank updates must
    then change nothing in training (no random draw, no gradient), and the default run is bit for bit the
    'w/o HC and LC' run (--lambda-hc 0 --lambda-lc 0), and so is the run with the old confidence-gated entry
    (--bank-threshold 0.95; the v2 table used both identities). A queue of 10,000 never fills in 3 iterations."""
    common_args = [*TINY, "--iters", "3", "--eval-every", "3"]
    run_method("ctt.py", [*common_args, "--queue-size", "10000", "--out", str(tmp_path / "banks")])
    run_method("ctt.py", [*common_args, "--lambda-hc", "0", "--lambda-lc", "0", "--out", str(tmp_path / "none")])
    run_method("ctt.py", [*common_args, "--queue-size", "10000", "--bank-threshold", "0.95",
                          "--out", str(tmp_path / "gated")])
    with_banks, without, gated = (read_metrics(tmp_path / run)[-1] for run in ("banks", "none", "gated"))
    assert not with_banks["banks_ready"] and sum(with_banks["bank_entries"]["A"].values()) > 0  # banks did fill up
    assert sum(gated["bank_entries"]["A"].values()) < sum(with_banks["bank_entries"]["A"].values())  # gate binds
    for other in (without, gated):
        assert with_banks["miou"] == other["miou"] and with_banks["miou_student_B"] == other["miou_student_B"]
    a, b, c = (load_checkpoint(tmp_path / run / "checkpoints" / "last") for run in ("banks", "none", "gated"))
    for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"):
        assert_same(a[name], b[name])
        assert_same(a[name], c[name])


def test_ctt_two_processes_keep_identical_banks(tmp_path):
    """Two processes see different labeled batches, yet after every gathered update their banks are identical."""
    driver, out = tmp_path / "driver.py", tmp_path / "run2"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(driver), str(ROOT / "methods" / "ctt.py"), *FAST, "--iters", "3", "--eval-every", "3", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(out / f"banks_{r}.pt", weights_only=False) for r in (0, 1)]
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["labels"], ranks[1]["labels"]))  # different batches
    assert ranks[0]["banks"]["size"].sum() > 0
    assert_same(ranks[0]["banks"], ranks[1]["banks"])
    assert (out / "checkpoints" / "last" / "random_states_1.pkl").exists()
    assert read_metrics(out)[-1]["iteration"] == 3 and read_metrics(out)[-1]["banks_ready"]
    load_checkpoint(out / "checkpoints" / "last")
