"""CTT: Cross-Teacher Training (Xiao et al., Neurocomputing 508 (2022) 36-46; ../shared/specs/ctt.md).

N student-teacher pairs (--pairs, default 2; paper Table 6). Each teacher is the EMA of its own student, but
each student learns on unlabeled images from the pseudo-labels of the OTHER pairs' teachers (paper §3.2).
Per pair a class-wise FIFO memory bank of teacher features of correctly and confidently predicted labeled
pixels feeds two contrastive losses (paper §3.3). Per student i (spec §4, E1-E10):
  L_sup = CE(up(f_i(x_l)), y_l)                                                       (paper Eq. 2, spec E1)
  L_ct  = w * mean_px CE(up(f_i(S(x_u))), argmax p_T),  p_T = S(softmax of the other teachers on weak x_u),
          w = fraction of pixels with max p_T >= 0.968 (ClassMix's batch weight, no gradient)  (Eq. 5, E4)
  L_hc  = InfoNCE of anchors (labeled pixels; unlabeled pixels with max p_T >= gamma) against bank M_i:
          per anchor a of class c and positive k in M_i[c]: -log e^{s(a,k)/t} / (e^{s(a,k)/t} +
          sum_{n in M_i[c'!=c]} e^{s(a,n)/t}), averaged over (a, k) per class, then over classes (Eq. 6-7, E5-E7)
  L_lc  = unlabeled pixels with max p_T < gamma where the peer student is more confident than f_i and >= gamma:
          positive = peer feature at the same pixel (detached), negatives = every bank's entries of the other
          classes than the peer's argmax, per-class mean then mean over classes (Eq. 8-9, E8-E9)
  L_i   = L_sup + L_ct + [banks full] * (0.1 L_hc + 0.1 L_lc)                           (Eq. 10, E10)
After the optimiser steps: teachers <- EMA (decay min(1-1/(t+1), 0.99), parameters only), then every bank
takes the top-n_add most confident correct (p >= 0.95) features per class of its updated teacher on the
labeled batch, n_add = max(floor(2Q/N_l), B) (spec §5). HC/LC switch on (for good) once every queue of every
bank holds Q = 128 entries (paper §3.4, Table 7). Students are evaluated; pair A's is the reported number.

Network passes per iteration (N = 2): N teacher forwards (no grad) on the weak unlabeled batch, N student
forward+backward passes on [labeled; mixed strong unlabeled], N teacher forwards (no grad) on the labeled
batch for the banks. --pairs 1 is the paper's 1-pair row (a mean teacher: the student learns from its own).

Decisions [D] and deviations (reason in brackets):
- Model: the project's DeepLabv3+ (the paper runs DeepLabv2 and v3+). Features = the decoder output at stride 4,
  the network output resolution before upsampling; labels, pseudo-labels, confidences and the padding mask are
  nearest-downsampled to it, features are never upsampled (paper §4.1 does this "to save computational
  costs": 16x fewer anchors). Confidences on that grid = classifier of the stride-4 feature. Bank entries are
  stored L2-normalised (every similarity is a cosine).
- One strong-view draw shared by all students (mix mask and photometric draw), so their features are
  pixel-aligned for LC (spec §3 [D]; [C2] draws per student). ClassMix (default; ceil(n/2) classes as in the
  ClassMix code) takes its classes from the argmax of the mean softmax of all teachers (one map for a shared
  draw), so under ClassMix a student's mix REGION (never its target) depends on its own teacher too; --mix
  cutmix pastes a box of half the image ([C2] "cut"); the partner is the next image of the local batch.
  Photometric part = the project's shared strong view (UniMatch strengths, per image, before mixing; [C2]:
  jitter 0.25 + blur after mixing). Weak view = the shared rescale/crop/flip (paper: "rotations, flips and
  translations"; [C2]: random scale + crop). Evaluation = the shared whole-image protocol (Cityscapes at
  512x1024 as in ClassMix; VOC unpadded rather than padded to 505).
- Padding pixels of unlabeled crops are excluded from L_ct (mean and w over non-padded pixels), HC and LC.
- N > 2 pairs (the paper leaves it open): student i's pseudo-label is the argmax of the MEAN softmax of all
  other teachers; the LC peer at a pixel is the most confident other student; LC negatives come from all N
  banks. For N = 2 all three are exactly the paper's rule.
- Multi-process: each process takes its local top-n_add candidates per class; these are all-gathered and every
  process keeps the same global top-n_add (the top-k of a union lies in the union of the top-k's), so banks are
  identical everywhere (checked at every evaluation). B in n_add is the global labeled batch.
- Bank entry uses the softmax probability ([C2] thresholds raw logits, spec §9.4); LC classes are counted after
  the gating (no 0/0, §9.6); the peer rule is strict in both directions (§4.4).
- One forward per student on [labeled; unlabeled] (BN statistics over both; [C2] runs two).
- Teachers keep BatchNorm in train mode ([C2]; --teacher-bn eval: eval mode, BN buffers copied from the student).
- Different initialisations: pair i builds its network under seed*100+i (same on every process); with
  --pretrained only the decoder draws differ (as in [C3]).
- --contrast-after K (off by default; spec §5 [D]) switches HC/LC on at iteration K even if some queue is not
  full; the losses then use the filled entries only (with full banks they are exactly E6-E9).
- Schedule: 80k iterations (paper §4.1), lr 2.5e-4 (head x10), wd 5e-4, VOC crop 321 batch 10+10, Cityscapes
  512x1024 -> crop 256x512 batch 2+2 ([C2]/[CFG], spec §6; the paper's lr symbol is lost); evaluation every
  4000 iterations. VOC's default split protocol is the classic one of the paper's DeepLabv3+ table. An epoch
  (--epochs) is one pass over the unlabeled set. CamVid/toy use the project's CPU settings (common.py).

  accelerate launch methods/ctt.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from datasets import build_data, classmix_mask, cutmix_box_mask, mix, to_device  # noqa: E402

IGNORE = common.IGNORE_INDEX
# Paper values (spec §0b/§1b/§6); everything not listed comes from common.DATASET_DEFAULTS.
PAPER_DEFAULTS = {
    "voc": dict(lr=2.5e-4, head_lr_mult=10.0, weight_decay=5e-4, global_batch=10, global_unlabeled_batch=10,
                crop_size=[321, 321], iters=80_000, eval_every=4000),
    "cityscapes": dict(lr=2.5e-4, head_lr_mult=10.0, weight_decay=5e-4, global_batch=2, global_unlabeled_batch=2,
                       crop_size=[256, 512], image_scale=0.5, iters=80_000, eval_every=4000, eval_mode="whole"),
}


class MemoryBanks(nn.Module):
    """One class-wise FIFO queue bank per pair: feats [N, C, Q, D] (L2-normalised), size [N, C]. Each queue is
    right-aligned: its `size` valid entries sit at the end, oldest first. `ready` switches HC/LC on for good."""

    def __init__(self, pairs, num_classes, queue, dim):
        super().__init__()
        self.register_buffer("feats", torch.zeros(pairs, num_classes, queue, dim))
        self.register_buffer("size", torch.zeros(pairs, num_classes, dtype=torch.long))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def filled(self):
        """bool [N, C, Q]: the entries holding a feature (all of them once `ready`, unless --contrast-after)."""
        q = self.feats.shape[2]
        return torch.arange(q, device=self.size.device) >= q - self.size[..., None]

    @torch.no_grad()
    def push(self, i, new, count):
        """Append new[c, :count[c]] to queue c of bank i, dropping the oldest entries beyond Q (FIFO)."""
        q, d = self.feats.shape[2], self.feats.shape[3]
        combined = torch.cat([self.feats[i], F.normalize(new.float(), dim=-1)], 1)  # [C, Q + k, D]
        index = torch.arange(q, device=new.device)[None] + count[:, None]  # keep the last Q of old + new
        self.feats[i] = combined.gather(1, index[..., None].expand(-1, -1, d))
        self.size[i] = (self.size[i] + count).clamp(max=q)

    @torch.no_grad()
    def update(self, i, feature, prob, label, n_add, accelerator, threshold):
        """Spec §5: candidates = labeled pixels the teacher predicts correctly with p >= threshold; per class
        the n_add most confident of the whole global batch. feature [B,D,h,w], prob [B,C,h,w], label [B,h,w]."""
        num_classes = self.feats.shape[1]
        conf, pred = prob.max(1)
        candidate = (pred == label) & (conf >= threshold)
        classes = torch.arange(num_classes, device=label.device)[:, None]
        score = torch.where(candidate.flatten()[None] & (label.flatten()[None] == classes), conf.flatten()[None],
                            torch.full_like(conf.flatten()[None], -1.0))  # [C, P]; -1 = not a candidate
        k = min(n_add, score.shape[1])
        top, index = score.topk(k, dim=1)  # local top-k per class
        flat = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).float()
        chosen = flat[index]  # [C, k, D]
        if accelerator.num_processes > 1:  # the same global top-k on every process -> identical banks
            world = accelerator.num_processes
            top = accelerator.gather(top[None]).permute(1, 0, 2).reshape(num_classes, world * k)
            chosen = accelerator.gather(chosen[None]).permute(1, 0, 2, 3).reshape(num_classes, world * k, -1)
            top, index = top.topk(k, dim=1)  # sorted: candidates first, most confident first
            chosen = chosen.gather(1, index[..., None].expand(-1, -1, chosen.shape[-1]))
        self.push(i, chosen, (top >= 0).sum(1))
        self.ready |= (self.size == self.feats.shape[2]).all()  # every queue of every bank full: on for good


def class_mean(values, labels, num_classes):
    """Mean per class, then mean over the classes present (E7/E9 normalisation). 0 (with graph) if empty."""
    if values.numel() == 0:
        return values.sum()
    sums = values.new_zeros(num_classes).index_add(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def shifted_similarities(unit_anchors, bank, own, tau, filled):
    """HC/LC core. unit_anchors [A, D], bank [C, K, D] (unit rows), own [A, C], filled [C, K]. Returns
    sim = cos/tau - 1/tau [A, C, K] and neg [A] = log sum_{filled entries of other classes} e^{cos/tau} - 1/tau.
    cos <= 1 bounds e^sim by 1, so the [A, C, K] tensor (the step's largest at VOC scale) needs no max pass:
    one matmul with the shift folded in, one exp, one sum; tau >= 0.025 keeps e^sim >= e^-80 in float32."""
    num_classes, k, d = bank.shape
    sim = torch.addmm(unit_anchors.new_full((1,), -1 / tau), unit_anchors / tau, bank.reshape(-1, d).t())
    sim = sim.view(-1, num_classes, k)
    terms = sim.exp() if bool(filled.all()) else sim.exp() * filled  # partly filled only with --contrast-after
    total = terms.sum(2).masked_fill(own, 0.0).sum(1)
    # no negatives at all (only with --contrast-after): -inf, so the term is exactly 0 with a zero gradient
    return sim, total.clamp(min=torch.finfo(total.dtype).tiny).log().masked_fill(total == 0, float("-inf"))


def hc_loss(anchors, labels, bank, tau, filled=None):
    """High-level contrast (E6-E7). anchors [A, D], labels [A], bank [C, Q, D]: every same-class entry is a
    positive (one term each), every other-class entry of the same bank a negative. Vectorised over classes.
    `filled` [C, Q] marks the entries in use: all of them once the banks are full (only --contrast-after
    switches the losses on earlier; anchors of a class with an empty queue then drop out)."""
    num_classes, q, d = bank.shape
    filled = torch.ones(num_classes, q, dtype=torch.bool, device=bank.device) if filled is None else filled
    own = F.one_hot(labels, num_classes).bool()
    sim, negatives = shifted_similarities(F.normalize(anchors.float(), dim=1), F.normalize(bank, dim=-1), own,
                                          tau, filled)
    positives, used = sim[torch.arange(len(labels), device=labels.device), labels], filled[labels]  # [A, Q]
    # -log(e^p / (e^p + e^n)) = softplus(n - p), n = log-sum-exp of the negatives (stable, exact in float)
    per_anchor = (F.softplus(negatives[:, None] - positives) * used).sum(1) / used.sum(1).clamp(min=1)
    keep = used.any(1)
    return class_mean(per_anchor[keep], labels[keep], num_classes)


def lc_loss(anchors, positives, labels, banks, tau, filled=None):
    """Low-level contrast (E9). anchors [S, D], positives [S, D] (the peer's features, already detached),
    labels [S] (the peer's classes), banks [N, C, Q, D]: negatives = all banks' entries of the other classes
    (those marked in `filled` [N, C, Q])."""
    num_classes, d = banks.shape[1], banks.shape[-1]
    filled = torch.ones(banks.shape[:3], dtype=torch.bool, device=banks.device) if filled is None else filled
    a = F.normalize(anchors.float(), dim=1)
    pos = (a * F.normalize(positives.float(), dim=1)).sum(1) / tau  # [S]
    bank = F.normalize(banks, dim=-1).transpose(0, 1).reshape(num_classes, -1, d)  # [C, N*Q, D]
    _, negatives = shifted_similarities(a, bank, F.one_hot(labels, num_classes).bool(), tau,
                                        filled.transpose(0, 1).reshape(num_classes, -1))
    return class_mean(F.softplus(negatives + 1 / tau - pos), labels, num_classes)


def strong_mix_mask(kind, label, valid):
    """bool [B,H,W], True where the mixed image keeps image i (False: takes image i+1). One draw per
    iteration, shared by every student."""
    if kind == "classmix":  # ClassMix: the pixels of half of the classes of image i (padding never chosen)
        return classmix_mask(label.masked_fill(~valid, IGNORE))
    if kind == "cutmix":  # [C2] "cut": a box of half the image area is taken from the partner
        b, h, w = label.shape
        return ~cutmix_box_mask(b, h, w, p=1.0, area=(0.5, 0.5), device=label.device)
    return torch.ones_like(valid)


def downsample(x, size):
    """Nearest-neighbour resize of a [B,H,W] label/confidence/bool map to the feature grid (ignore survives)."""
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(x.dtype)


def others_mean(probs, i):
    """Cross-teacher softmax for student i: mean of every OTHER pair's teacher (exactly the other teacher for
    N = 2; [D] for N > 2); with a single pair its own teacher (the paper's 1-pair mean-teacher baseline)."""
    return probs[i] if len(probs) == 1 else (probs.sum(0) - probs[i]) / (len(probs) - 1)


class CrossTeacher(nn.Module):
    """Student A's pseudo-label source, for the overlays and the pseudo-label probe: log of the mean softmax
    of the other pairs' teachers (shares the teachers, adds no weights)."""

    def __init__(self, teachers):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)

    def forward(self, image):
        return others_mean(torch.stack([t(image).float().softmax(1) for t in self.teachers]), 0).log()


def contrastive_losses(i, feat, n_l, y4, valid4, conf_t4, label_t4, conf4, pred4, peer_feats, banks, args):
    """HC and LC of student i on the feature grid. feat [B_l + B_u, D, h, w]: student i's features (with grad);
    y4: labeled GT; valid4, conf_t4, label_t4: padding mask and cross-teacher confidence/label of the mixed
    unlabeled images; conf4, pred4 [N, B_u, h, w] and peer_feats [N, B_u, h, w, D]: all students, detached."""
    f_l, f_u = feat[:n_l].permute(0, 2, 3, 1), feat[n_l:].permute(0, 2, 3, 1)
    # (E5) anchors: every labeled pixel with a label (GT class), unlabeled pixels with confidence >= gamma
    labeled, high = y4 != IGNORE, valid4 & (conf_t4 >= args.gamma)
    filled = banks.filled()
    loss_hc = hc_loss(torch.cat([f_l[labeled], f_u[high]]), torch.cat([y4[labeled], label_t4[high]]),
                      banks.feats[i], args.tau_hc, filled[i])
    # (E8) LC pixels: the rest of the unlabeled pixels, where the peer is more confident than i and >= gamma
    others = conf4.clone()
    others[i] = -1.0  # the peer is the most confident OTHER student (the other one for N = 2)
    conf_peer, peer = others.max(0)
    low = valid4 & (conf_t4 < args.gamma) & (conf_peer > conf4[i]) & (conf_peer >= args.gamma)
    where = low.nonzero(as_tuple=True)
    at_peer = (peer[where], *where)
    loss_lc = lc_loss(f_u[where], peer_feats[at_peer], pred4[at_peer], banks.feats, args.tau_lc, filled)
    return loss_hc, loss_lc


def student_losses(students, teachers, banks, x_l, y_l, unlabeled, args, accelerator):
    """Spec §7, one iteration up to the backward: a list with each student's loss terms (dict), plus the
    shared strong-view mix mask `keep` and the student's pseudo-label `target` (for tests and overlays)."""
    n_l = x_l.shape[0]
    with torch.no_grad(), accelerator.autocast():  # (E3) every teacher on the weak view
        probs = torch.stack([t(unlabeled["image"]).float().softmax(1) for t in teachers])  # [N, B, C, H, W]
    # strong view: ONE mix draw for all students, applied alike to image, teacher maps and padding mask
    keep = strong_mix_mask(args.mix, probs.mean(0).argmax(1), unlabeled["valid"])
    x_s = mix(keep, unlabeled["image_strong"], unlabeled["image_strong"].roll(-1, 0))
    valid = mix(keep, unlabeled["valid"], unlabeled["valid"].roll(-1, 0))
    probs = torch.where(keep[None, :, None], probs, probs.roll(-1, 1))
    outputs = [s(torch.cat([x_l, x_s]), return_features=True) for s in students]  # one forward per student
    size = outputs[0][1].shape[-2:]
    with torch.no_grad():  # each student's own prediction on the feature grid (LC peer gating), detached
        p4 = torch.stack([accelerator.unwrap_model(s).classifier(f[n_l:].detach().float()).softmax(1)
                          for s, (_, f) in zip(students, outputs)])
        conf4, pred4 = p4.max(2)
        peer_feats = torch.stack([f[n_l:].detach().float() for _, f in outputs]).permute(0, 1, 3, 4, 2)
    y4, valid4 = downsample(y_l, size), downsample(valid, size)
    results = []
    for i, (logits, feat) in enumerate(outputs):
        conf_t, label_t = others_mean(probs, i).max(1)  # cross-teacher confidence and pseudo-label
        # (E1) supervised; (E4) CE on every non-padded pixel times the batch weight w (no gradient)
        loss_sup = F.cross_entropy(logits[:n_l].float(), y_l, ignore_index=IGNORE)
        count = valid.sum().clamp(min=1)
        w = ((conf_t >= args.ct_threshold) & valid).sum() / count
        loss_ct = w * F.cross_entropy(logits[n_l:].float(), label_t.masked_fill(~valid, IGNORE),
                                      ignore_index=IGNORE, reduction="sum") / count
        loss_hc = loss_lc = torch.zeros((), device=x_l.device)
        if bool(banks.ready):  # (E10) HC and LC only once every queue of every bank is full
            loss_hc, loss_lc = contrastive_losses(i, feat, n_l, y4, valid4, downsample(conf_t, size),
                                                  downsample(label_t, size), conf4, pred4, peer_feats, banks, args)
        total = loss_sup + args.lambda_ct * loss_ct + args.lambda_hc * loss_hc + args.lambda_lc * loss_lc
        results.append(dict(total=total, sup=loss_sup, ct=loss_ct, hc=loss_hc, lc=loss_lc, w=w, target=label_t,
                            keep=keep))
    return results


@torch.no_grad()
def update_teachers_and_banks(teachers, students, banks, x_l, y_l, step, n_add, args, accelerator):
    """(E2) teacher_i <- EMA of student_i (parameters only), then bank i from the UPDATED teacher i on the
    labeled batch (spec §5: the losses of iteration t see the banks of iteration t-1)."""
    decay = common.ema_decay(step, args.ema_decay)
    for i, (t, s) in enumerate(zip(teachers, students)):
        common.ema_update(t, accelerator.unwrap_model(s), decay, buffers="keep" if args.teacher_bn == "train"
                          else "copy")
        with accelerator.autocast():
            feat = t(x_l, return_features=True)[1].float()
        banks.update(i, feat, t.classifier(feat).softmax(1), downsample(y_l, feat.shape[-2:]), n_add, accelerator,
                     args.bank_threshold)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="student-teacher pairs (paper Table 6: 1, 2, 3)")
    parser.add_argument("--mix", choices=["classmix", "cutmix", "none"], default="classmix")
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--teacher-bn", choices=["train", "eval"], default="train")
    parser.add_argument("--ct-threshold", type=float, default=0.968, help="confidence counted in the CT weight w")
    parser.add_argument("--queue-size", type=int, default=128, help="Q per class (paper Table 7)")
    parser.add_argument("--bank-threshold", type=float, default=0.95, help="delta: bank-entry confidence")
    parser.add_argument("--gamma", type=float, default=0.75, help="HC/LC split of pixels (paper Table 8)")
    parser.add_argument("--tau-hc", type=float, default=0.1)
    parser.add_argument("--tau-lc", type=float, default=0.5)
    parser.add_argument("--lambda-ct", type=float, default=1.0)
    parser.add_argument("--lambda-hc", type=float, default=0.1, help="0 and --lambda-lc 0 = official HEAD")
    parser.add_argument("--lambda-lc", type=float, default=0.1)
    parser.add_argument("--contrast-after", type=int, help="fallback (off by default; spec §5 [D]): switch HC/LC on "
                        "after this many iterations even if some queue is not full, using the filled entries only")
    args = common.resolve_args(parser, PAPER_DEFAULTS, "ctt", argv)
    if not 1 <= args.pairs <= 8:
        parser.error("--pairs must be between 1 and 8")
    if min(args.tau_hc, args.tau_lc) < 0.025:  # below it exp(-2/tau) underflows float32 (shifted_similarities)
        parser.error(f"--tau-hc and --tau-lc must be at least 0.025, got {args.tau_hc} and {args.tau_lc}")
    accelerator, log = common.setup(args)
    mean, std = common.normalization(args.backbone)
    data = build_data(args, accelerator, mean, std)
    total = common.total_iterations(args, data.unlabeled_epoch)
    eval_every = args.eval_every or data.unlabeled_epoch
    n_add = max(2 * args.queue_size // len(data.labeled), args.batch_size * accelerator.num_processes)
    num_classes, pairs, names = data.num_classes, args.pairs, "ABCDEFGH"
    log.info(f"{len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled, {len(data.val_set)} val; {total} "
             f"iterations; {pairs} pairs; bank: Q={args.queue_size} per class, n_add={n_add}")

    # --- networks: N students (DDP, own optimiser), N EMA teachers, N memory banks --------------------------
    students, teachers, optimizers = [], [], []
    for i in range(pairs):
        with torch.random.fork_rng(devices=[]):  # own init per pair, identical on every process
            torch.manual_seed(args.seed * 100 + i)
            model = common.build_model(args.backbone, num_classes, args.pretrained, args.output_stride,
                                       args.decoder_channels)
        model = common.prepare_network(model, accelerator)
        teacher = common.frozen_copy(model).train(args.teacher_bn == "train")
        optimizer = common.sgd(common.param_groups(model, args.lr, args.head_lr_mult), args.lr, args.weight_decay)
        model, optimizer = accelerator.prepare(model, optimizer)
        students.append(model.train())
        teachers.append(teacher)
        optimizers.append(optimizer)
    banks = MemoryBanks(pairs, num_classes, args.queue_size, args.decoder_channels).to(accelerator.device)
    state = common.TrainState()
    accelerator.register_for_checkpointing(*teachers, banks, state)
    start = common.maybe_resume(accelerator, args, state, log)

    cross_teacher = CrossTeacher(teachers).train(args.teacher_bn == "train")

    @torch.no_grad()
    def pseudo_label_fn(image):  # overlay: what student A learns from (eval mode: teachers' BN stats untouched)
        label = cross_teacher.eval()(image).argmax(1)
        cross_teacher.train(args.teacher_bn == "train")
        return label

    # --- training ----------------------------------------------------------------------------------------
    labeled, unlabeled = data.labeled_stream(start), data.unlabeled_stream(start)
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    for step in range(start, total):
        bl, bu = to_device(next(labeled), accelerator.device), to_device(next(unlabeled), accelerator.device)
        lr = [common.poly_lr(o, args.lr, step, total) for o in optimizers][0]
        if args.contrast_after is not None and step >= args.contrast_after:
            banks.ready.fill_(True)
        results = student_losses(students, teachers, banks, bl["image"], bl["mask"], bu, args, accelerator)
        accelerator.backward(sum(r["total"] for r in results))  # disjoint graphs: each student gets its own L
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        update_teachers_and_banks(teachers, students, banks, bl["image"], bl["mask"], step, n_add, args, accelerator)
        terms = {f"{k}_{names[i]}": r[k] for i, r in enumerate(results) for k in ("sup", "ct", "hc", "lc", "w")}
        meter.update(**terms)
        bar.update(1)

        done = step + 1
        if done % args.log_every == 0 or done % eval_every == 0 or done in (total, args.stop_at):
            losses = meter.read(accelerator, done, args.out)
            bar.set_postfix(sup=f"{losses['sup_A']:.3f}", ct=f"{losses['ct_A']:.3f}", hc=f"{losses['hc_A']:.3f}",
                            lc=f"{losses['lc_A']:.3f}", on=int(banks.ready), lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({f"train/{k}": v for k, v in losses.items()}, step=done)
        if done % eval_every == 0 or done == total or done == args.stop_at:
            if accelerator.num_processes > 1:  # the banks must be identical on every process
                copies = accelerator.gather(torch.cat([banks.feats.flatten(), banks.size.flatten().float()])[None])
                if not (copies == copies[0]).all():
                    raise RuntimeError("memory banks differ between processes")
                log.info(f"memory banks identical on {accelerator.num_processes} processes")
            fill = (banks.size.float() / args.queue_size).tolist()
            log.info(f"banks ready: {bool(banks.ready)}; fill per class: "
                     + "; ".join(names[i] + " " + " ".join(f"{v:.2f}" for v in f) for i, f in enumerate(fill)))
            common.evaluate_and_checkpoint(
                accelerator, args, state, log, data, students[0], done,
                extra_models={f"student_{names[i]}": students[i] for i in range(1, pairs)},
                pseudo_label_fn=pseudo_label_fn, probe=(cross_teacher, 0.0),  # CE trains on every pixel (rule 0)
                extra_record={"banks_ready": bool(banks.ready), "bank_fill_min": round(min(map(min, fill)), 3),
                              **{f"train_{k}": round(v, 4) for k, v in losses.items()}})
        if done == args.stop_at:
            break
    bar.close()
    log.info(f"done: best mIoU (student A) {state.best_miou:.2f} at iteration {state.best_step}")
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
