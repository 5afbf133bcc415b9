"""Dual Teacher: "Switching Temporary Teachers for Semi-Supervised Semantic Segmentation" (Na et al., NeurIPS 2023).

One student S with stochastic depth and two temporary teachers T1, T2 that work in shifts. The official code,
naver-ai/dual-teacher@868e6e7 (every path:line below is in it unless another repository is named), covers ADE20K
with SegFormer only; the paper's VOC and Cityscapes results use DeepLabv3+ (VOC: ResNet-50, its Table 1), which the
first author says to port (github.com/naver-ai/dual-teacher/issues/3). This file is that port:
  shift (= epoch) e even: teacher T1 + CutMix;  e odd: teacher T2 + ClassMix               tools/train.py:99-106
  per iteration, with x_w the weak unlabeled view and x_s its photometric strong view:
    p = softmax(T(x_w)) (no grad, train mode);  c = max p, y^ = argmax p           seg_core/augmentations.py:21-25
    L_sup = CE(S(x_l), y_l), ignore 255 (OHEM CE on Cityscapes)                       seg_core/augmentations.py:36-37
    L_mix = L_cutmix (even) = mean_{CE>0} w_i CE(S(x~), y~), w_i = share of image i with c >= 0.95        :146-152
          | L_classmix (odd) = mean_all w CE(S(x~), y~), w = share of the batch with c~ >= 0.95   :235-241, 285-293
    L_ic  = sum CE(S(x_s), y^) [c >= 0.95] V / sum V, V = the unlabeled padding mask                    :271-282
    L = L_sup + L_mix + 0.2 L_ic (tools/train.py:139);  one SGD step;  then EMA of the active teacher only:
    theta_T <- a theta_T + (1-a) theta_S, a = min(1 - 1/(i+1), 0.99), i = iteration within the shift (:246-250)
  so a shift starts by copying the student (a = 0), then the teacher is the running mean of the student over its
  first 100 updates and an EMA with a = 0.99 after. S has per-sample drop-path on the residual branch of the backbone
  blocks that have a residual connection (every ResNet block; the stride-1 equal-width MBConv blocks of
  EfficientNet-Lite0), rates linear from 0 to --drop-path = 0.1 over those blocks (the MiT student's 0.1,
  seg_core/mix_transformer.py:222, 389-394); the teachers have none (:397-402). S is evaluated (tools/train.py:161).

Shift length (--iters-per-epoch): one unlabeled pass on VOC and Cityscapes (UniMatch's epoch); 400 iterations on
CamVid, 100 on toy (ours), so that every shift reaches the EMA cap  (docs/methods/dual_teacher.md#shift-length).
Each shift end logs the largest a and the teacher's lag behind the student  (docs/methods/dual_teacher.md#logged).

Released code -> what we do, one line each (the reasons, with their sources: docs/methods/dual_teacher.md):
- Teachers with their own random heads -> student copies  (docs/methods/dual_teacher.md#teacher-init)
- V from the labeled batch's ground truth (a bug) -> the unlabeled padding mask  (docs/methods/dual_teacher.md#ic-mask)
- The EMA ramp restarts every shift: kept (--ema-step teacher: no reset)  (docs/methods/dual_teacher.md#ema-ramp)
- No shuffling under DDP, the same unlabeled order each epoch -> reshuffled  (docs/methods/dual_teacher.md#streams)
- Strong view: jitter of the batch tensor -> UniMatch's per-image view  (docs/methods/dual_teacher.md#strong-view)
- Pseudo-labels in train mode: kept; one teacher forward, not two  (docs/methods/dual_teacher.md#teacher-forward)
- Mixing as coded; jitter and blur in float, not 8-bit PIL  (docs/methods/dual_teacher.md#mixing)
- Teachers keep their own BN statistics: used by the overlays only  (docs/methods/dual_teacher.md#teacher-bn)
- VOC/Cityscapes recipe, not released -> UniMatch's; ResNet drop-path (ours)  (docs/methods/dual_teacher.md#recipe)
Passes per iteration: 1 teacher forward without grad (x_w), 2 student forward+backward ([x_l; x~] and x_s).

  accelerate launch methods/dual_teacher.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: cli, common, datasets
import cli  # noqa: E402

# Our defaults where they differ from the field's conventions (cli.DATASET_DEFAULTS = UniMatch's).
PAPER_DEFAULTS = {
    "voc": {"backbone": "resnet50"},  # the paper's VOC classic table is DeepLabv3+ ResNet-50 (its Table 1)
    "cityscapes": {"ohem": True},     # UniMatch's loss (LiheYoung/UniMatch@0324f3d configs/cityscapes.yaml:12-17)
    "camvid": {"iters_per_epoch": 400},  # ours, not the paper's: 8 shifts at the cap in 3,200 iterations (docs)
    "toy": {"iters_per_epoch": 100},     # ours: 3 shifts of 300, each reaching the cap (docs/methods/dual_teacher.md)
}


def parse_args(argv=None):
    parser = cli.base_parser(cli.description(__doc__))
    parser.add_argument("--drop-path", type=cli.bounded(float, "[0, 1)"), default=0.1,
                        help="student's maximum drop-path rate, linear from 0 over the backbone blocks that have a "
                             "residual connection (every ResNet block); the MiT student's 0.1")
    parser.add_argument("--iters-per-epoch", type=cli.positive_int,
                        help="length of an epoch = one teacher shift (where no value is listed: one pass over the "
                             "unlabeled set; ours on CamVid and toy, so the EMA reaches its cap in every shift)")
    parser.add_argument("--ic-valid-from-labeled", action="store_true",
                        help="the released code's bug: consistency mask/normaliser from the labeled batch's labels")
    parser.add_argument("--ema-step", choices=["epoch", "teacher"], default="epoch",
                        help="EMA ramp index: the iteration within the shift (the method), or 'teacher': the "
                             "active teacher's own update count, never restarting (no-reset ablation)")
    parser.add_argument("--ohem", action=argparse.BooleanOptionalAction, help="OHEM cross-entropy for L_sup")
    return cli.resolve_args(parser, PAPER_DEFAULTS, "dual_teacher", argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below spend seconds loading torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms.v2.functional as TF  # noqa: E402

import common  # noqa: E402
from datasets import build_data, classmix_mask, mix, to_device  # noqa: E402

THRESHOLD = 0.95  # confidence threshold of all three terms (tools/train.py:134-138)
IC_WEIGHT = 0.2   # weight of the implicit consistency loss (tools/train.py:139)
EMA_CAP = 0.99    # cap of the EMA ramp (tools/train.py:149, 248)
RAMP = round(1 / (1 - EMA_CAP))  # updates until a reaches the cap: 100


def active(epoch: int) -> tuple[int, str]:
    """The switching rule (tools/train.py:99-106): even epochs T1 with CutMix, odd epochs T2 with ClassMix."""
    return (0, "cutmix") if epoch % 2 == 0 else (1, "classmix")


def ramp_index(step: int, iters_per_epoch: int, ema_step: str) -> int:
    """i of a = min(1 - 1/(i+1), 0.99) at `step`: the iteration within the shift, or the active teacher's count of
    earlier updates (--ema-step teacher; its shifts are every other epoch)."""
    epoch, i = divmod(step, iters_per_epoch)
    return i if ema_step == "epoch" else (epoch // 2) * iters_per_epoch + i


def shift_stats(step: int, iters_per_epoch: int, ema_step: str) -> tuple[float, float, float]:
    """(largest a, lag, mean lag) of the active teacher over its current shift up to the update of `step`. lag =
    sum_j w_j (step - j) for theta_T = sum_j w_j theta_S(j) (docs/methods/dual_teacher.md#logged), by its recursion
    lag <- a (lag + g) over the teacher's updates, g = steps since its previous one; a = 0 at its first update makes
    earlier history irrelevant."""
    epoch = step // iters_per_epoch
    lag, previous, lags, a_max = 0.0, None, [], 0.0
    for e in range(epoch if ema_step == "epoch" else epoch % 2, epoch + 1, 2):
        for s in range(e * iters_per_epoch, min((e + 1) * iters_per_epoch, step + 1)):
            a = common.ema_decay(ramp_index(s, iters_per_epoch, ema_step), EMA_CAP)
            lag, previous = a * (lag + (s - previous if previous is not None else 0)), s
            if e == epoch:
                lags.append(lag)
                a_max = max(a_max, a)
    return a_max, lag, sum(lags) / len(lags)


def cutmix_boxes(b: int, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """CutMix of even epochs (seg_core/augmentations.py:20-42): bool [B,H,W], True = take the partner's pixels.
    One lambda ~ Beta(4,4) per batch gives one box size 2(a//2) x 2(b//2), a = floor(H sqrt(1-lambda)); each image
    draws its own centre in [H//8, H) x [W//8, W), and the box is clipped to the image (so boxes near the
    bottom/right edges are truncated)."""
    lam = rng.beta(4.0, 4.0)
    a, c = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    box = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        row, col = int(rng.integers(h // 8, h)), int(rng.integers(w // 8, w))
        box[i, max(row - a // 2, 0):row + a // 2, max(col - c // 2, 0):col + c // 2] = True
    return box


def cutmix_photometric(images, labels, rng, mean, std):
    """Per mixed image (seg_core/augmentations.py:94-110): colour jitter with brightness/contrast/saturation
    U(0.75, 1.25) and hue U(-0.25, 0.25) in random order with p=0.8, Gaussian blur sigma U(0.15, 1.15) with p=0.5,
    and a horizontal flip of image and label together with p=0.5; on the de-normalised [0,1] image."""
    out_images, out_labels = [], []
    for x, y in zip(images, labels):
        x = (x * std + mean).clamp(0, 1)
        if rng.uniform() < 0.8:
            bright, contrast, sat, hue = *rng.uniform(0.75, 1.25, 3), rng.uniform(-0.25, 0.25)
            ops = [lambda t: TF.adjust_brightness(t, bright), lambda t: TF.adjust_contrast(t, contrast),
                   lambda t: TF.adjust_saturation(t, sat), lambda t: TF.adjust_hue(t, hue)]
            for k in rng.permutation(4):
                x = ops[k](x)
        if rng.uniform() < 0.5:
            sigma = rng.uniform(0.15, 1.15)
            k = 2 * math.ceil(3 * sigma) + 1
            x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        if rng.uniform() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        out_images.append((x - mean) / std)
        out_labels.append(y)
    return torch.stack(out_images), torch.stack(out_labels)


def make_mix(kind, x_w, x_s, label, conf, *, rng, mean, std):
    """The mixed batch (x~, y~, c~) of the active teacher's pseudo-labels (label, conf): CutMix in even epochs,
    ClassMix in odd ones (seg_core/augmentations.py:209-243)."""
    b, h, w = label.shape
    if kind == "cutmix":  # on the WEAK images; the confidence stays the un-mixed image's (augmentations.py:27-31)
        perm = torch.from_numpy(rng.permutation(b)).to(label.device)  # fixed points allowed
        box = cutmix_boxes(b, h, w, rng).to(label.device)
        images, labels = cutmix_photometric(mix(box, x_w[perm], x_w), mix(box, label[perm], label), rng, mean, std)
        return images, labels, conf
    # image i keeps floor(n/2) of its classes (as coded) on top of its partner, image perm(i)
    from_partner = ~classmix_mask(label, round_up=False, rng=rng)
    perm = torch.tensor([1, 0] if b == 2 else rng.permutation(b), device=label.device)
    # argmax/max of the mixed soft target M p_perm(i) + (1-M) p_i is the source pixel's own label/confidence
    return (mix(from_partner, x_s[perm], x_s), mix(from_partner, label[perm], label),
            mix(from_partner, conf[perm], conf))


def cutmix_loss(logits, label, conf):
    """seg_core/augmentations.py:146-152 (ReCo's weighting): w_i = share of pixels of image i whose 8-bit-quantised
    confidence is >= 0.95; the mean of w_i CE over the pixels with CE > 0. No pixel is masked. Returns (loss, w)."""
    w = (torch.floor(conf * 255) / 255 >= THRESHOLD).float().mean((1, 2))
    ce = F.cross_entropy(logits.float(), label, reduction="none")
    nonzero = (ce > 0).float()
    return (w[:, None, None] * ce * nonzero).sum() / nonzero.sum().clamp(min=1), w.mean()


def classmix_loss(logits, label, conf):
    """seg_core/augmentations.py:238-241, 290-293 (DACS's weighting): one scalar w = share of all mixed pixels
    with confidence >= 0.95, times the CE averaged over every pixel. Returns (loss, w)."""
    w = (conf >= THRESHOLD).float().mean()
    return w * F.cross_entropy(logits.float(), label), w


def consistency_loss(logits, label, conf, valid):
    """L_ic (seg_core/augmentations.py:271-282): hard weak-view target, only confident valid pixels count,
    normalised by the number of valid pixels (not of confident ones). Returns (loss, confident share of valid)."""
    return common.confident_ce(logits, label, conf, valid, THRESHOLD)


def train_step(step, batch_l, batch_u, *, student, teachers, optimizer, mean, std, accelerator, args):
    """One iteration: the active teacher labels, the epoch's mix, L = L_sup + L_mix + 0.2 L_ic, an SGD step, then
    the EMA of the active teacher. Returns the loss terms."""
    epoch, i = divmod(step, args.iters_per_epoch)
    index, kind = active(epoch)
    teacher = teachers[index]
    # all of this step's mixing draws: a pure function of (seed, step, rank), so resume is exact
    rng = np.random.default_rng([args.seed, 3, step, accelerator.process_index])
    x_l, y_l, x_w, x_s = batch_l["image"], batch_l["mask"], batch_u["image"], batch_u["image_strong"]

    # pseudo-labels of the active teacher, before this step's EMA; train mode as coded (BN batch statistics)
    with torch.no_grad(), accelerator.autocast():
        conf, label = teacher(x_w).float().softmax(1).max(1)
    x_mix, y_mix, c_mix = make_mix(kind, x_w, x_s, label, conf, rng=rng, mean=mean, std=std)

    # student pass 1: labeled and mixed images in one batch (shared BN statistics, as coded)
    logits = student(torch.cat([x_l, x_mix]))
    logits_l, logits_mix = logits[:len(x_l)], logits[len(x_l):]
    if args.ohem:
        loss_sup = common.ohem_cross_entropy(logits_l, y_l)
    else:
        loss_sup = F.cross_entropy(logits_l, y_l, ignore_index=common.IGNORE_INDEX)
    loss_mix, mix_weight = (cutmix_loss if kind == "cutmix" else classmix_loss)(logits_mix, y_mix, c_mix)

    # student pass 2: a fresh drop-path sub-model on the un-mixed strong view, the weak-view teacher target
    valid = (y_l != common.IGNORE_INDEX) if args.ic_valid_from_labeled else batch_u["valid"]
    loss_ic, ic_ratio = consistency_loss(student(x_s), label, conf, valid)

    loss = loss_sup + loss_mix + IC_WEIGHT * loss_ic
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # EMA of the active teacher only, parameters only; the ramp restarts with every shift (i = 0 copies S)
    decay = common.ema_decay(ramp_index(step, args.iters_per_epoch, args.ema_step), EMA_CAP)
    common.ema_update(teacher, accelerator.unwrap_model(student), decay, buffers="keep")
    return dict(loss=loss, loss_sup=loss_sup, loss_mix=loss_mix, loss_ic=loss_ic, mix_weight=mix_weight,
                ic_ratio=ic_ratio)


def build_networks(args, num_classes, device):
    """The student with drop-path (rates linear from 0 to --drop-path over the backbone blocks that have a residual
    connection) and two teachers: the same network without drop-path, initialised as copies of the student (the
    code builds them with random heads: docs/methods/dual_teacher.md#teacher-init), no gradients, plain BN (as
    coded; outside DDP), train mode."""
    student = common.build_model(args.backbone, num_classes, args.pretrained, args.output_stride,
                                 args.decoder_channels, drop_path=args.drop_path)
    teachers = []
    for _ in range(2):
        t = common.build_model(args.backbone, num_classes, "none", args.output_stride, args.decoder_channels)
        t.load_state_dict(student.state_dict())
        teachers.append(t.requires_grad_(False).to(device).train())
    return student, teachers


def main(argv=None):
    args = parse_args(argv)
    accelerator, log = common.setup(args)
    if args.ic_valid_from_labeled and args.batch_size != args.unlabeled_batch_size:  # both known after setup
        sys.exit("--ic-valid-from-labeled needs --batch-size == --unlabeled-batch-size")
    mean, std = common.normalization(args.backbone)
    data = build_data(args, accelerator, mean, std)
    args.iters_per_epoch = ipe = args.iters_per_epoch or data.unlabeled_epoch
    total = common.total_iterations(args, ipe)
    eval_every = args.eval_every or ipe
    log.info(f"{len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled ({args.split}), {len(data.val_set)} "
             f"val; an epoch (one teacher shift) = {ipe} iterations (one pass over the unlabeled set: "
             f"{data.unlabeled_epoch}); {total} iterations; EMA ramp index: {args.ema_step}")

    # --- networks and optimiser --------------------------------------------------------------------------
    student, teachers = build_networks(args, data.num_classes, accelerator.device)
    student = common.prepare_network(student, accelerator)
    mean_t, std_t = (torch.tensor(v, device=accelerator.device).view(3, 1, 1) for v in (mean, std))
    optimizer = common.sgd(common.param_groups(student, args.lr, args.head_lr_mult), args.lr, args.weight_decay)
    student, optimizer = accelerator.prepare(student, optimizer)
    state = common.TrainState()
    accelerator.register_for_checkpointing(state, *teachers)
    start = cli.maybe_resume(accelerator, args, state, log)
    saved = state.extra.get("iters_per_epoch", args.iters_per_epoch)
    if saved != args.iters_per_epoch:
        sys.exit(f"--resume: the checkpoint used {saved} iterations per epoch, this run {args.iters_per_epoch}; "
                 f"the teacher shifts would change (pass --iters-per-epoch {saved})")

    def pseudo_labels(image):  # overlays only: the active teacher in eval mode, with its own BN statistics
        teacher = teachers[active(state.extra["epoch"])[0]].eval()
        out = teacher(image).argmax(1)
        teacher.train()
        return out

    # --- training ----------------------------------------------------------------------------------------
    labeled, unlabeled = data.labeled_stream(start), data.unlabeled_stream(start)
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    student.train()
    for step in range(start, total):
        epoch, i = divmod(step, ipe)
        if i == 0 or step == start:
            index, kind = active(epoch)
            last = min((epoch + 1) * ipe, total) - 1  # the shift's last update has its largest a
            a_end = common.ema_decay(ramp_index(last, ipe, args.ema_step), EMA_CAP)
            log.info(f"epoch {epoch} (iteration {step}{', resumed mid-epoch' if i else ''}): teacher T{index + 1} "
                     f"+ {'CutMix' if kind == 'cutmix' else 'ClassMix'}" + (
                         f". WARNING: this shift ({last + 1 - epoch * ipe} iterations) ends at a = {a_end:.4f}, "
                         f"below the cap {EMA_CAP}: the ramp needs {RAMP} updates" if a_end < EMA_CAP else ""))
        state.extra.update(epoch=epoch, iters_per_epoch=ipe)
        batch_l = to_device(next(labeled), accelerator.device)
        batch_u = to_device(next(unlabeled), accelerator.device)
        lr = common.poly_lr(optimizer, args.lr, step, total)
        meter.update(**train_step(step, batch_l, batch_u, student=student, teachers=teachers, optimizer=optimizer,
                                  mean=mean_t, std=std_t, accelerator=accelerator, args=args))
        bar.update(1)

        done, index = step + 1, active(epoch)[0]
        evaluate = done % eval_every == 0 or done in (total, args.stop_at)
        a_max, lag, lag_mean = shift_stats(step, ipe, args.ema_step) if done % ipe == 0 or evaluate else (None,) * 3
        if done % ipe == 0 or done == total:
            log.info(f"end of epoch {epoch} (T{index + 1}, iteration {done}): largest a {a_max:.4f}, "
                     f"teacher lag {lag:.1f} steps (mean over the shift {lag_mean:.1f})")
        if done % args.log_every == 0 or evaluate:
            losses = meter.read(accelerator, done, log)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", mix_w=f"{losses['mix_weight']:.2f}", lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({"train/lr": lr, **{f"train/{k}": v for k, v in losses.items()}}, step=done)
        if evaluate:
            common.evaluate_and_checkpoint(accelerator, args, state, log, data, model=student, step=done,
                                           final=done == total, pseudo_label_fn=pseudo_labels,  # probe: as it labels
                                           probe_net=teachers[index], probe_rule=THRESHOLD,
                                           probe_batch=args.unlabeled_batch_size,
                                           extra_record={"epoch": epoch, "teacher": f"T{index + 1}",
                                                         "ema_a_max": round(a_max, 5), "teacher_lag": round(lag, 3),
                                                         "teacher_lag_mean": round(lag_mean, 3)})
        if done == args.stop_at:
            break
    bar.close()
    log.info(common.final_line(state, total))
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
