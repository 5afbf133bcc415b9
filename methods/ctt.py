"""CTT: Cross-Teacher Training (Xiao et al., Neurocomputing 508 (2022) 36-46).

N student-teacher pairs (--pairs, default 2; paper Table 6). Each teacher is the EMA of its own student; each student
learns on unlabeled images from the pseudo-labels of the OTHER pairs' teachers (§3.2). Per pair a class-wise FIFO
memory bank of teacher features of correctly predicted labeled pixels feeds two contrastive losses (§3.3). Official
code cited as file:line at 1181110317/SSL_CTT@33d7e3c (HEAD; same lines in the first upload 2e26335). Per student i:
  L_sup = CE(up(f_i(x_l)), y_l)                                                                        (Eq. 1-2)
  L_ct  = w * mean_px CE(up(f_i(S(x_u))), argmax p_T),  p_T = S(softmax of the other teachers on weak x_u),
          w = share of pixels with max p_T >= 0.968, no gradient (cross_teacher_contr.py:180)            (Eq. 3-5)
  L_hc  = queries with m = 1[max p >= gamma], p = student i's softmax on a labeled pixel (class: GT), p_T on an
          unlabeled one (class: pseudo-label); per query a of class c and entry k of M_i[c]: -log e^{s(a,k)/t} /
          (e^{s(a,k)/t} + sum_{n in M_i[c'!=c]} e^{s(a,n)/t}), mean over (a, k) per class, then over classes (Eq. 6-7)
  L_lc  = unlabeled pixels with m = 0 where the peer student is more confident than f_i: positive = the peer's
          feature there (detached), negatives = all banks' entries of the classes other than the peer's argmax;
          per-class mean, then mean over classes                                                        (Eq. 8-9)
  L_i   = L_sup + L_ct + [banks full] * (0.1 L_hc + 0.1 L_lc)   (Eq. 10; weights: 2e26335 cross_teacher_contr.py:991)
After the optimiser steps: teachers <- EMA (decay min(1-1/(t+1), 0.99), parameters only; cross_teacher_contr.py:334),
then each bank takes per class the n_add most confident labeled pixels its UPDATED teacher predicts correctly (§3.3;
the losses at t see the banks of t-1: cross_teacher_contr.py:1026-1037), n_add = max(floor(2Q/N_l), B) (same file
:491-494). HC/LC switch on for good once every queue of every bank holds Q = 128 (§3.4, Table 7; the code checks
both banks alike, with Q = 256: cross_teacher_contr.py:1041). Students are evaluated; pair A is reported.

Deviations from the paper or the code, one line each (the reasons, with their sources: docs/methods/ctt.md):
- Shared pipeline; one forward per student on [labeled; unlabeled]; features at stride 4  (docs/methods/ctt.md#pipeline)
- Bank entry: correct pixels, top-k by softmax, no raw-logit gate (code :484, :498)  (docs/methods/ctt.md#bank-entry)
- Labeled HC queries gamma-gated (Eq. 7); --hc-labeled all: every pixel, as the code  (docs/methods/ctt.md#hc-queries)
- LC: m = 0 and the peer strictly more confident (Eq. 9), the v3+ script's gamma gate left out  (docs/methods/ctt.md#lc)
- Mixing: ClassMix of floor(n/2) classes, ONE draw for all students (the code: one each)  (docs/methods/ctt.md#mixing)
- N > 2 pairs (ours): the mean of the other teachers, the most confident other peer  (docs/methods/ctt.md#pairs)
- Multi-process: the same global top-n_add on every process, identical banks  (docs/methods/ctt.md#multi-process)
- Teachers' BN in train mode, as the code; pair i built under seed*100+i  (docs/methods/ctt.md#teachers)
- --contrast-after K (ours, off): HC/LC on after K iterations, filled entries only  (docs/methods/ctt.md#contrast-after)
- Schedule: §4.1 and the configs; what the paper leaves open is the project's (ours)  (docs/methods/ctt.md#schedule)

  accelerate launch methods/ctt.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: cli, common, datasets
import cli  # noqa: E402


# Paper values (§4.1) and the official configs; everything not listed comes from cli.DATASET_DEFAULTS.
PAPER_DEFAULTS = {
    "voc": dict(lr=2.5e-4, head_lr_mult=10.0, weight_decay=5e-4, global_batch=10, global_unlabeled_batch=10,
                crop_size=[321, 321], iters=80_000, eval_every=4000),
    "cityscapes": dict(lr=2.5e-4, head_lr_mult=10.0, weight_decay=5e-4, global_batch=2, global_unlabeled_batch=2,
                       crop_size=[256, 512], image_scale=0.5, iters=80_000, eval_every=4000, eval_mode="whole"),
}


def parse_args(argv=None):
    parser = cli.base_parser(cli.description(__doc__))
    parser.add_argument("--pairs", type=cli.bounded(int, "[1, 8]"), default=2,
                        help="student-teacher pairs (paper Table 6: 1, 2, 3)")
    parser.add_argument("--mix", choices=["classmix", "cutmix", "none"], default="classmix",
                        help="how each student's strong view of the unlabeled batch is mixed")
    parser.add_argument("--ema-decay", type=cli.probability, default=0.99, help="cap of each teacher's EMA decay ramp")
    parser.add_argument("--teacher-bn", choices=["train", "eval"], default="train", help="teachers' BatchNorm: "
                        "train = batch statistics; eval = running statistics copied from the student")
    parser.add_argument("--ct-threshold", type=cli.probability, default=0.968, help="confidence counted in w (Eq. 5)")
    parser.add_argument("--queue-size", type=cli.positive_int, default=128, help="Q per class (paper Table 7)")
    parser.add_argument("--bank-threshold", type=cli.probability, default=0.0, help="bank entry also needs softmax "
                        ">= this (0: the paper's rule, correct + top-k; e.g. 0.95: a confidence-gated entry, ours)")
    parser.add_argument("--gamma", type=cli.probability, default=0.75, help="HC/LC split of pixels (Eq. 7, Table 8)")
    parser.add_argument("--hc-labeled", choices=["confident", "all"], default="confident",
                        help="labeled HC queries: own confidence >= gamma (paper Eq. 7) or all (official code)")
    parser.add_argument("--tau-hc", type=cli.positive_float, default=0.1, help="temperature of L_hc (Eq. 6)")
    parser.add_argument("--tau-lc", type=cli.positive_float, default=0.5, help="temperature of L_lc (Eq. 8)")
    parser.add_argument("--lambda-ct", type=cli.non_negative_float, default=1.0, help="weight of L_ct (Eq. 10)")
    parser.add_argument("--lambda-hc", type=cli.non_negative_float, default=0.1,
                        help="weight of L_hc (Eq. 10); 0 and --lambda-lc 0: Table 5's 'CTT w/o HC and LC', no banks")
    parser.add_argument("--lambda-lc", type=cli.non_negative_float, default=0.1, help="weight of L_lc (Eq. 10)")
    parser.add_argument("--contrast-after", type=cli.non_negative_int, help="ours, off by default: switch HC/LC on "
                        "after this many iterations even if some queue is not full, using the filled entries only")
    return cli.resolve_args(parser, PAPER_DEFAULTS, "ctt", argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below spend seconds loading torch

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from datasets import build_data, classmix_mask, cutmix_box_mask, mix, to_device  # noqa: E402

IGNORE = common.IGNORE_INDEX
PAIR_NAMES = "ABCDEFGH"  # pair i's name in the logs and metrics (at most 8 pairs)


class MemoryBanks(nn.Module):
    """Per pair a class-wise FIFO bank: feats [N, C, Q, D] (L2-normalised), `size` [N, C] (valid entries at a queue's
    end, oldest first). `ready` switches HC/LC on for good. `candidates` [N, C] counts the pixels that passed the
    entry rule (this process; not checkpointed)."""

    def __init__(self, pairs, num_classes, queue, dim):
        super().__init__()
        self.register_buffer("feats", torch.zeros(pairs, num_classes, queue, dim))
        self.register_buffer("size", torch.zeros(pairs, num_classes, dtype=torch.long))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("candidates", torch.zeros(pairs, num_classes, dtype=torch.long), persistent=False)

    def filled(self):  # bool [N, C, Q]: the entries holding a feature (all once `ready`, unless --contrast-after)
        q = self.feats.shape[2]
        return torch.arange(q, device=self.size.device) >= q - self.size[..., None]

    @torch.no_grad()
    def push(self, i, new, count):
        """Append new[c, :count[c]] to queue c of bank i, dropping the oldest entries beyond Q (FIFO)."""
        q, d = self.feats.shape[2:]
        combined = torch.cat([self.feats[i], F.normalize(new.float(), dim=-1)], 1)  # [C, Q + k, D]
        index = torch.arange(q, device=new.device)[None] + count[:, None]  # keep the last Q of old + new
        self.feats[i] = combined.gather(1, index[..., None].expand(-1, -1, d))
        self.size[i] = (self.size[i] + count).clamp(max=q)

    @torch.no_grad()
    def update(self, i, feature, prob, label, *, n_add, accelerator, threshold=0.0):
        """Bank i takes per class the n_add most confident candidates (the entry rule: module docstring) of the
        global batch. feature [B,D,h,w], prob [B,C,h,w], label [B,h,w] (ignore never matches a class)."""
        num_classes = self.feats.shape[1]
        conf, pred = prob.max(1)
        candidate = (pred == label) & (conf >= threshold)
        self.candidates[i] += torch.bincount(label[candidate], minlength=num_classes)
        of_class = label.flatten()[None] == torch.arange(num_classes, device=label.device)[:, None]  # [C, P]
        score = torch.where(candidate.flatten() & of_class, conf.flatten(), -1.0)  # -1 = not a candidate of that class
        k = min(n_add, score.shape[1])
        top, index = score.topk(k, dim=1)  # local top-k per class
        chosen = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).float()[index]  # [C, k, D]
        if accelerator.num_processes > 1:  # the same global top-k on every process -> identical banks
            top = accelerator.gather(top[None]).permute(1, 0, 2).reshape(num_classes, -1)
            chosen = accelerator.gather(chosen[None]).permute(1, 0, 2, 3).reshape(num_classes, -1, chosen.shape[-1])
            top, index = top.topk(k, dim=1)  # the top-k of a union lies in the union of the top-k's
            chosen = chosen.gather(1, index[..., None].expand(-1, -1, chosen.shape[-1]))
        self.push(i, chosen, (top >= 0).sum(1))
        self.ready |= (self.size == self.feats.shape[2]).all()  # every queue of every bank full: on for good


def class_mean(values, labels, num_classes):
    """Mean per class, then mean over the classes present (Eq. 6 and 8 normalisation). 0 (with graph) if empty."""
    counts = torch.bincount(labels, minlength=num_classes)
    sums = values.new_zeros(num_classes).index_add(0, labels, values)
    return (sums[counts > 0] / counts[counts > 0]).mean() if values.numel() else values.sum()


def similarities(anchors, bank, own, tau, filled):
    """HC/LC core. anchors [A, D], bank [C, K, D], own [A, C] (the anchor's class), filled [C, K]. Returns sim = cos/tau
    [A, C, K] and n [A] = log sum e^sim over the filled entries of the other classes (a masked logsumexp, exact for any
    tau), so -log(e^p / (e^p + e^n)) = softplus(n - p); n = -inf (no negative) makes the anchor's term exactly 0."""
    sim = (F.normalize(anchors.float(), dim=1) / tau) @ F.normalize(bank, dim=-1).flatten(0, 1).t()
    sim = sim.view(-1, *bank.shape[:2])
    per_class = sim.masked_fill(~filled, float("-inf")).logsumexp(2)  # [A, C]
    return sim, per_class.masked_fill(own, float("-inf")).logsumexp(1)


def hc_loss(anchors, labels, bank, tau, filled=None):
    """High-level contrast (Eq. 6) on student i's bank [C, Q, D]. anchors [A, D], labels [A]; `filled` [C, Q]: the
    entries in use (all once the banks are full; with --contrast-after anchors of an empty class drop out)."""
    num_classes, q, _ = bank.shape
    filled = bank.new_ones(num_classes, q, dtype=torch.bool) if filled is None else filled
    sim, negatives = similarities(anchors, bank, F.one_hot(labels, num_classes).bool(), tau, filled)
    positives, used = sim[torch.arange(len(labels), device=labels.device), labels], filled[labels]  # [A, Q]
    per_anchor = (F.softplus(negatives[:, None] - positives) * used).sum(1) / used.sum(1).clamp(min=1)
    keep = used.any(1)
    return class_mean(per_anchor[keep], labels[keep], num_classes)


def lc_loss(anchors, positives, labels, banks, tau, filled=None):
    """Low-level contrast (Eq. 8). anchors [S, D], positives [S, D] (the peer's features, detached), labels [S] (the
    peer's classes); the negatives come from all banks [N, C, Q, D] (the entries marked in `filled` [N, C, Q])."""
    num_classes = banks.shape[1]
    filled = banks.new_ones(banks.shape[:3], dtype=torch.bool) if filled is None else filled
    pos = (F.normalize(anchors.float(), dim=1) * F.normalize(positives.float(), dim=1)).sum(1) / tau  # [S]
    _, negatives = similarities(anchors, banks.transpose(0, 1).flatten(1, 2), F.one_hot(labels, num_classes).bool(),
                                tau, filled.transpose(0, 1).flatten(1))  # the N banks as one: [C, N * Q, D]
    return class_mean(F.softplus(negatives - pos), labels, num_classes)


def partner_mask(kind, label, valid):
    """bool [B,H,W], True where the mixed image takes the pixels of its partner, image i+1 (as cutmix_box_mask)."""
    if kind == "classmix":  # image i keeps floor(n/2) of its classes (padding is never one), the partner fills the rest
        return ~classmix_mask(label.masked_fill(~valid, IGNORE), round_up=False)
    if kind == "cutmix":
        return cutmix_box_mask(*label.shape, p=1.0, area=(0.5, 0.5), device=label.device)
    return torch.zeros_like(valid)


def downsample(x, size):
    """Nearest-neighbour resize of a [B,H,W] label/confidence/bool map to the feature grid (ignore survives)."""
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(x.dtype)


def cross_teacher_probs(probs, i):
    """Student i's pseudo-label distribution (§3.2) from every teacher's softmax, probs [N, B, C, H, W]."""
    return probs[i] if len(probs) == 1 else (probs.sum(0) - probs[i]) / (len(probs) - 1)


class CrossTeacher(nn.ModuleList):
    """The teachers; as a network, cross_teacher_probs for student A (log-probabilities), which the pseudo-label probe
    scores and the overlays draw."""

    def forward(self, image):
        return cross_teacher_probs(torch.stack([t(image).float().softmax(1) for t in self]), 0).log()


def contrastive_losses(i, feat, *, n_l, gt, valid, teacher_conf, teacher_label, student_conf, student_pred,
                       student_feats, banks, args):
    """HC and LC of student i, every map on the feature grid. feat [B_l + B_u, D, h, w]: its features (with grad);
    gt: the labeled ground truth; valid, teacher_conf, teacher_label: the mixed unlabeled images' padding mask,
    cross-teacher confidence and label. Every student's, detached: student_conf [N, B_l + B_u, h, w]; student_pred
    [N, B_u, h, w] and student_feats [N, B_u, h, w, D] on the unlabeled images."""
    f_l, f_u = feat[:n_l].permute(0, 2, 3, 1), feat[n_l:].permute(0, 2, 3, 1)
    # (Eq. 7) HC queries, m = 1: labeled by own confidence (or all), unlabeled by cross-teacher confidence
    labeled = (gt != IGNORE) & ((student_conf[i, :n_l] >= args.gamma) | (args.hc_labeled == "all"))
    high, filled = valid & (teacher_conf >= args.gamma), banks.filled()
    loss_hc = hc_loss(torch.cat([f_l[labeled], f_u[high]]), torch.cat([gt[labeled], teacher_label[high]]),
                      banks.feats[i], args.tau_hc, filled[i])
    # (Eq. 9) LC: m = 0 and the peer, the most confident OTHER student, strictly more confident than student i
    others = student_conf[:, n_l:].clone()
    others[i] = -1.0
    conf_peer, peer = others.max(0)
    where = (valid & (teacher_conf < args.gamma) & (conf_peer > student_conf[i, n_l:])).nonzero(as_tuple=True)
    at_peer = (peer[where], *where)
    loss_lc = lc_loss(f_u[where], student_feats[at_peer], student_pred[at_peer], banks.feats, args.tau_lc, filled)
    return loss_hc, loss_lc


def student_losses(x_l, y_l, batch_u, *, students, teachers, banks, accelerator, args):
    """One iteration up to the backward: per student a dict of loss terms, the mix mask `from_partner` (True = the
    partner's pixels) and the pseudo-label `target`."""
    n_l = x_l.shape[0]
    with torch.no_grad(), accelerator.autocast():  # (Eq. 3) every teacher on the weak view
        probs = torch.stack([t(batch_u["image"]).float().softmax(1) for t in teachers])  # [N, B, C, H, W]
    # strong view: ONE mix draw for all students, applied alike to image, teacher maps and padding mask
    from_partner = partner_mask(args.mix, probs.mean(0).argmax(1), batch_u["valid"])
    x_s, valid = (mix(from_partner, x.roll(-1, 0), x) for x in (batch_u["image_strong"], batch_u["valid"]))
    probs = mix(from_partner, probs.roll(-1, 1), probs)  # the [B, 1, H, W] mask broadcasts over N and C
    outputs = [s(torch.cat([x_l, x_s]), return_features=True) for s in students]  # one forward per student
    contrast = bool(banks.ready) and (args.lambda_hc > 0 or args.lambda_lc > 0)  # (Eq. 10) once the banks are full
    if contrast:
        with torch.no_grad():  # every student's own prediction on the feature grid (Eq. 7, 9), detached
            feats = torch.stack([f.detach().float() for _, f in outputs])  # [N, B_l + B_u, D, h, w]
            student_conf, student_pred = torch.stack(
                [accelerator.unwrap_model(s).classifier(f) for s, f in zip(students, feats)]).softmax(2).max(2)
        grid = feats.shape[-2:]
        on_grid = dict(n_l=n_l, gt=downsample(y_l, grid), valid=downsample(valid, grid), student_conf=student_conf,
                       student_pred=student_pred[:, n_l:], student_feats=feats[:, n_l:].permute(0, 1, 3, 4, 2),
                       banks=banks, args=args)
    count = valid.sum().clamp(min=1)  # non-padded pixels: the normaliser of L_ct and w
    results = []
    for i, (logits, feat) in enumerate(outputs):
        conf_t, label_t = cross_teacher_probs(probs, i).max(1)  # cross-teacher confidence and pseudo-label
        loss_sup = F.cross_entropy(logits[:n_l].float(), y_l, ignore_index=IGNORE)  # (Eq. 2)
        w = ((conf_t >= args.ct_threshold) & valid).sum() / count  # (Eq. 5) no gradient
        loss_ct = w * F.cross_entropy(logits[n_l:].float(), label_t.masked_fill(~valid, IGNORE),
                                      ignore_index=IGNORE, reduction="sum") / count
        loss_hc = loss_lc = torch.zeros((), device=x_l.device)
        if contrast:
            loss_hc, loss_lc = contrastive_losses(i, feat, teacher_conf=downsample(conf_t, grid),
                                                  teacher_label=downsample(label_t, grid), **on_grid)
        total = loss_sup + args.lambda_ct * loss_ct + args.lambda_hc * loss_hc + args.lambda_lc * loss_lc
        results.append(dict(total=total, sup=loss_sup, ct=loss_ct, hc=loss_hc, lc=loss_lc, w=w, target=label_t,
                            from_partner=from_partner))
    return results


@torch.no_grad()
def update_teachers_and_banks(step, x_l, y_l, *, teachers, students, banks, n_add, accelerator, args):
    """teacher_i <- EMA of student_i, then bank i from the updated teacher i on the labeled batch (if HC or LC)."""
    decay = common.ema_decay(step, args.ema_decay)
    buffers = "keep" if args.teacher_bn == "train" else "copy"  # train-mode BN: the teacher keeps its own statistics
    for i, (t, s) in enumerate(zip(teachers, students)):
        common.ema_update(t, accelerator.unwrap_model(s), decay, buffers=buffers)
        if args.lambda_hc > 0 or args.lambda_lc > 0:
            with accelerator.autocast():
                feat = t(x_l, return_features=True)[1].float()
            banks.update(i, feat, t.classifier(feat).softmax(1), downsample(y_l, feat.shape[-2:]), n_add=n_add,
                         accelerator=accelerator, threshold=args.bank_threshold)


def train_step(step, batch_l, batch_u, *, students, teachers, banks, optimizers, n_add, accelerator, args):
    """One iteration: every student's L_i (Eq. 10), one backward (disjoint graphs: each student gets its own L), an
    SGD step per student, then the EMA teachers and the banks. Returns the loss terms per pair."""
    x_l, y_l = batch_l["image"], batch_l["mask"]
    results = student_losses(x_l, y_l, batch_u, students=students, teachers=teachers, banks=banks,
                             accelerator=accelerator, args=args)
    accelerator.backward(sum(r["total"] for r in results))
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    update_teachers_and_banks(step, x_l, y_l, teachers=teachers, students=students, banks=banks, n_add=n_add,
                              accelerator=accelerator, args=args)
    return {f"{k}_{PAIR_NAMES[i]}": r[k] for i, r in enumerate(results) for k in ("sup", "ct", "hc", "lc", "w")}


def switch_contrast_on(step, *, banks, state, log, args):
    """Before iteration `step`: --contrast-after K switches HC/LC on at K; the first iteration with HC/LC in the loss
    is kept in the checkpoint (state.extra) and logged."""
    if args.contrast_after is not None and step >= args.contrast_after:
        banks.ready.fill_(True)
    if (args.lambda_hc > 0 or args.lambda_lc > 0) and state.extra["contrast_on_iteration"] is None and banks.ready:
        state.extra["contrast_on_iteration"] = step
        full = bool((banks.size == args.queue_size).all())
        log.info(f"HC/LC on from iteration {step + 1}: " + (f"every queue of every bank holds Q = {args.queue_size} "
                 "entries" if full else f"--contrast-after {args.contrast_after}"))


def bank_diagnostics(done, total, evaluate, *, banks, state, log, accelerator, class_names, args):
    """After iteration `done`: a WARNING at 10% of the run while HC/LC are off; at an evaluation a log line and the
    metrics.jsonl fields (entries, candidates since the last evaluation per pair and class; HC/LC's share)."""
    def per_class(table):  # [N, C] -> {pair: {class: value}}
        return {pair: dict(zip(class_names, row)) for pair, row in zip(PAIR_NAMES, table.tolist())}

    if (args.lambda_hc > 0 or args.lambda_lc > 0) and done == (total + 9) // 10 and not banks.ready:
        log.info(f"WARNING: memory banks not full after {done} of {total} iterations (10%), HC/LC still off; queues "
                 "below Q: " + ", ".join(f"{pair} {c} {n}" for pair, row in per_class(banks.size).items()
                                          for c, n in row.items() if n < args.queue_size))
    if not evaluate:
        return {}
    entries, candidates = per_class(banks.size), per_class(accelerator.reduce(banks.candidates, "sum"))
    banks.candidates.zero_()
    on = state.extra["contrast_on_iteration"]
    share = 0.0 if on is None else (done - on) / done  # share of the iterations so far with HC/LC
    queues = "; ".join(f"{pair} " + ", ".join(f"{c} {n} ({candidates[pair][c]})" for c, n in row.items())
                       for pair, row in entries.items())
    log.info(("HC/LC off" if on is None else f"HC/LC on after iteration {on} ({share:.0%} of the iterations)")
             + f"; bank entries per class (candidates since the last evaluation): {queues}")
    return {"banks_ready": bool(banks.ready), "contrast_on_iteration": on, "contrast_on_share": round(share, 4),
            "bank_fill_min": round(banks.size.min().item() / args.queue_size, 3), "bank_entries": entries,
            "bank_candidates": candidates}


def main(argv=None):
    args = parse_args(argv)
    accelerator, log = common.setup(args)
    mean, std = common.normalization(args.backbone)
    data = build_data(args, accelerator, mean, std)
    total = common.total_iterations(args, data.unlabeled_epoch)
    eval_every = args.eval_every or data.unlabeled_epoch
    n_add = max(2 * args.queue_size // len(data.labeled), args.batch_size * accelerator.num_processes)
    banks_note = (f"bank: Q={args.queue_size} per class, n_add={n_add}" if args.lambda_hc > 0 or args.lambda_lc > 0
                  else "no HC/LC, no memory banks (paper Table 5, 'CTT w/o HC and LC')")
    log.info(f"{len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled, {len(data.val_set)} val; {total} "
             f"iterations; {args.pairs} pairs; {banks_note}")

    # --- networks and optimisers: N students (DDP, own SGD), N EMA teachers, N memory banks -----------------
    students, teachers, optimizers = [], [], []
    for i in range(args.pairs):
        with torch.random.fork_rng(devices=[]):  # own init per pair, identical on every process
            torch.manual_seed(args.seed * 100 + i)
            student = common.prepare_network(common.build_model(args.backbone, data.num_classes, args.pretrained,
                                                                args.output_stride, args.decoder_channels), accelerator)
        teachers.append(common.frozen_copy(student).train(args.teacher_bn == "train"))
        optimizer = common.sgd(common.param_groups(student, args.lr, args.head_lr_mult), args.lr, args.weight_decay)
        student, optimizer = accelerator.prepare(student, optimizer)
        students.append(student.train())
        optimizers.append(optimizer)
    banks = MemoryBanks(args.pairs, data.num_classes, args.queue_size, args.decoder_channels).to(accelerator.device)
    state = common.TrainState()
    accelerator.register_for_checkpointing(*teachers, banks, state)
    start = cli.maybe_resume(accelerator, args, state, log)
    state.extra.setdefault("contrast_on_iteration", None)  # HC/LC are in the loss of every later iteration
    cross_teacher = CrossTeacher(teachers).train(args.teacher_bn == "train")

    # --- training ----------------------------------------------------------------------------------------
    labeled, unlabeled = data.labeled_stream(start), data.unlabeled_stream(start)
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    for step in range(start, total):
        batch_l = to_device(next(labeled), accelerator.device)
        batch_u = to_device(next(unlabeled), accelerator.device)
        lr = [common.poly_lr(o, args.lr, step, total) for o in optimizers][0]
        switch_contrast_on(step, banks=banks, state=state, log=log, args=args)
        meter.update(**train_step(step, batch_l, batch_u, students=students, teachers=teachers, banks=banks,
                                  optimizers=optimizers, n_add=n_add, accelerator=accelerator, args=args))
        bar.update(1)

        done = step + 1
        evaluate = done % eval_every == 0 or done in (total, args.stop_at)
        bank_record = bank_diagnostics(done, total, evaluate, banks=banks, state=state, log=log,
                                       accelerator=accelerator, class_names=data.class_names, args=args)
        if done % args.log_every == 0 or evaluate:
            losses = meter.read(accelerator, done, log)
            bar.set_postfix(sup=f"{losses['sup_A']:.3f}", ct=f"{losses['ct_A']:.3f}", hc=f"{losses['hc_A']:.3f}",
                            lc=f"{losses['lc_A']:.3f}", on=int(banks.ready), lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({"train/lr": lr, **{f"train/{k}": v for k, v in losses.items()}}, step=done)
        if evaluate:
            common.evaluate_and_checkpoint(
                accelerator, args, state, log, data, model=students[0], step=done, final=done == total,
                extra_models={f"student_{PAIR_NAMES[i]}": students[i] for i in range(1, args.pairs)},
                pseudo_label_fn=lambda image: cross_teacher.eval()(image).argmax(1),
                # probe rule 0: CE trains on every pixel; the teachers label as in training (BN mode, batch size)
                probe_net=cross_teacher, probe_rule=0.0,
                probe_batch=args.unlabeled_batch_size if args.teacher_bn == "train" else None,
                extra_record={**bank_record, **{f"train_{k}": round(v, 4) for k, v in losses.items()}})
            cross_teacher.train(args.teacher_bn == "train")  # the overlays ran the teachers in eval mode
        if done == args.stop_at:
            break
    bar.close()
    log.info(common.final_line(state, total, "mIoU (student A)"))
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
