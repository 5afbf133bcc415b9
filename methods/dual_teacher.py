"""Dual Teacher: "Switching Temporary Teachers for Semi-Supervised Semantic Segmentation" (Na et al., NeurIPS 2023).

One student S with stochastic depth and two temporary teachers T1, T2 that work in shifts (spec = the project's
../shared/specs/dual_teacher.md; the official code covers ADE20K/SegFormer only, this is the DeepLabv3+ port the
paper's VOC and Cityscapes tables use):
  epoch e even: teacher T1, CutMix;   e odd: teacher T2, ClassMix                                   (spec §2)
  an epoch = one pass over the unlabeled set at the global unlabeled batch (UniMatch's epoch; --iters-per-epoch)
  per iteration, with x_w the weak unlabeled view and x_s its photometric strong view:
    p = softmax(T(x_w)) (no grad);  c = max p, y^ = argmax p                                        (spec §3.3)
    L_sup = CE(S(x_l), y_l), ignore 255 (OHEM CE on Cityscapes)                                      (spec §5)
    L_mix = L_cutmix (even) = mean_{CE>0} w_i CE(S(x~), y~),  w_i = share of image i with c >= 0.95  (spec §3.4)
          | L_classmix (odd) = mean_all w CE(S(x~), y~),     w = share of the batch with c~ >= 0.95 (spec §3.5)
    L_ic  = sum CE(S(x_s), y^) [c >= 0.95] V / sum V, V = the unlabeled padding mask                 (spec §4.1)
    L = L_sup + L_mix + 0.2 L_ic;  one SGD step;  then EMA of the active teacher only:
    theta_T <- a theta_T + (1-a) theta_S, a = min(1 - 1/(i+1), 0.99), i = iteration *within the epoch* (spec §1.3)
  so every shift starts by copying the student (a = 0) and the teacher is the running mean of the student's
  weights over the shift. S has per-sample drop-path on the residual branch of every backbone block, rates
  linear from 0 to --drop-path = 0.1 (the "sub-models" of the implicit consistency); the teachers have none.
  The student is evaluated (spec §1.4).

Released-code behaviour -> what we do (spec §9.3, §11):
- S13 teachers start with random heads -> copies of the student (only the first batch of epochs 0 and 1 differs).
- S2 the consistency mask V comes from the *labeled* batch's ground truth (a bug) -> the unlabeled images' own
  padding mask; --ic-valid-from-labeled restores the released behaviour.
- S1 the EMA ramp restarts every epoch -> kept (it is the method); --ema-step global is an ablation only.
- S3 no shuffling under DDP, the same first unlabeled images every epoch -> both streams reshuffle every epoch.
- S4 the strong view jitters normalised batch tensors with one factor set per batch -> UniMatch's per-image
  strong view (datasets.strong_photometric), spec §6.2's recommendation for VOC/Cityscapes; the coded variant is an
  ADE20K/SegFormer quirk and is not offered.
- S8 teachers make pseudo-labels in train mode (BN batch statistics) -> kept. The released code calls the teacher
  twice per iteration (mix, consistency) because SegFormer's head has dropout; DeepLabv3+ has none, so a second
  train-mode forward of the same x_w returns the same output: we forward once (tested).
- S5/S6/S7 kept: CutMix mixes the weak images and hard labels with a ReCo-style box (one Beta(4,4) lambda per
  batch, centres drawn from [H/8, H) x [W/8, W)), then jitters/blurs/flips each mixed image; its weight uses the
  *un-mixed* confidence quantised to 8 bits (floor(255c)/255, the PIL round trip; the released code also flips
  that map with the image, which cannot change a per-image fraction, so we don't); ClassMix pastes floor(n/2)
  classes on the strong view with one full-precision batch weight; neither mix loss masks anything (no threshold
  mask, padding included). The released code round-trips the CutMix image through 8-bit PIL; we jitter and blur
  in float on the device (PIL's GaussianBlur(radius) ~ a Gaussian of std radius), a <= 1/255 difference.
- the teachers keep their own BN statistics (EMA on parameters only, as coded); they only matter for the
  eval-mode overlays and the pseudo-label probe, since pseudo-labels use batch statistics.
- VOC/Cityscapes recipe: not released (spec §6.2, [U]); UniMatch's (conventions.md §4): SGD, poly 0.9, VOC lr 1e-3
  head x10, 80 epochs, crop 321, ResNet-50 (the paper's VOC table); Cityscapes lr 5e-3 head x1, 240 epochs,
  crop 801, OHEM, sliding-window eval, threshold 0.95 (not UniMatch's 0). Drop-path on ResNet blocks is our
  assumption (spec §4.2): linspace(0, 0.1) over all residual blocks. Evaluation: full val set, original
  resolution; best and last are both logged (the released code reports the best epoch on half the val set).
Shared deviations: common.py (torchvision-layout ResNet, SyncBN only on CUDA).

Passes per iteration: 1 teacher forward without grad (x_w), 2 student forward+backward ([x_l; x~] and x_s).

  accelerate launch methods/dual_teacher.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms.v2.functional as TF  # noqa: E402

import common  # noqa: E402
from datasets import build_data, classmix_mask, mix, to_device  # noqa: E402

THRESHOLD = 0.95  # confidence threshold of all three unsupervised terms (spec §3.6)
IC_WEIGHT = 0.2   # weight of the implicit consistency loss (spec §5, train.py:139)
EMA_CAP = 0.99    # cap of the EMA ramp (spec §1.3, train.py:246-250)

# The paper's values where they differ from the field's conventions (common.DATASET_DEFAULTS = UniMatch's).
PAPER_DEFAULTS = {
    "voc": {"backbone": "resnet50"},  # the paper's VOC classic table is DeepLabv3+ ResNet-50 (spec §8.2)
    "cityscapes": {"ohem": True},     # UniMatch's Cityscapes supervised loss (spec §6.2, conventions.md §4)
}


def active(epoch: int) -> tuple[int, str]:
    """The switching rule (spec §2): even epochs teacher 1 with CutMix, odd epochs teacher 2 with ClassMix."""
    return (0, "cutmix") if epoch % 2 == 0 else (1, "classmix")


# ----------------------------------------------------------------------------------------------------------
# CutMix (even epochs, spec §3.4) and ClassMix (odd epochs, spec §3.5)
# ----------------------------------------------------------------------------------------------------------
def cutmix_boxes(b: int, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """bool [B,H,W], True = take the partner's pixels. One lambda ~ Beta(4,4) per batch gives one box size
    2(a//2) x 2(b//2), a = floor(H sqrt(1-lambda)); each image draws its own centre in [H//8, H) x [W//8, W),
    and the box is clipped to the image (so boxes near the bottom/right edges are truncated)."""
    lam = rng.beta(4.0, 4.0)
    a, c = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    box = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        row, col = int(rng.integers(h // 8, h)), int(rng.integers(w // 8, w))
        box[i, max(row - a // 2, 0):row + a // 2, max(col - c // 2, 0):col + c // 2] = True
    return box


def cutmix_photometric(images, labels, rng, mean, std):
    """Per mixed image (spec §3.4 step 2): colour jitter with brightness/contrast/saturation U(0.75, 1.25) and hue
    U(-0.25, 0.25) in random order with p=0.8, Gaussian blur sigma U(0.15, 1.15) with p=0.5, and a horizontal flip
    of image and label together with p=0.5; on the de-normalised [0,1] image."""
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


def make_mix(kind, x_w, x_s, label, conf, rng, mean, std):
    """The mixed batch (x~, y~, c~) of the active teacher's pseudo-labels (label, conf)."""
    b, h, w = label.shape
    if kind == "cutmix":  # on the WEAK images; the confidence stays the un-mixed image's (as coded, S5)
        perm = torch.from_numpy(rng.permutation(b)).to(label.device)  # fixed points allowed
        box = cutmix_boxes(b, h, w, rng).to(label.device)
        images, labels = cutmix_photometric(mix(box, x_w[perm], x_w), mix(box, label[perm], label), rng, mean, std)
        return images, labels, conf
    m = classmix_mask(label, round_up=False, rng=rng)  # floor(n/2) as coded; pasted onto image perm(i)
    perm = torch.tensor([1, 0] if b == 2 else rng.permutation(b), device=label.device)
    # argmax/max of the mixed soft target M p_i + (1-M) p_perm(i) is the source pixel's own label/confidence
    return mix(m, x_s, x_s[perm]), mix(m, label, label[perm]), mix(m, conf, conf[perm])


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def cutmix_loss(logits, label, conf):
    """spec §3.4 step 4 (ReCo's weighting): w_i = share of pixels of image i whose 8-bit-quantised confidence is
    >= 0.95; the mean of w_i CE over the pixels with CE > 0. No pixel is masked. Returns (loss, mean w)."""
    w = (torch.floor(conf * 255) / 255 >= THRESHOLD).float().mean((1, 2))
    ce = F.cross_entropy(logits.float(), label, reduction="none")
    nonzero = (ce > 0).float()
    return (w[:, None, None] * ce * nonzero).sum() / nonzero.sum().clamp(min=1), w.mean()


def classmix_loss(logits, label, conf):
    """spec §3.5 step 7 (DACS's weighting): one scalar w = share of all mixed pixels with confidence >= 0.95,
    times the CE averaged over every pixel. Returns (loss, w)."""
    w = (conf >= THRESHOLD).float().mean()
    return w * F.cross_entropy(logits.float(), label), w


def consistency_loss(logits, label, conf, valid):
    """L_ic (spec §4.1): hard weak-view target, only confident valid pixels count, normalised by the number of
    valid pixels (not of confident ones). Returns (loss, share of valid pixels that are confident)."""
    ce = F.cross_entropy(logits.float(), label, reduction="none")
    keep = (conf >= THRESHOLD) & valid
    n_valid = valid.sum().clamp(min=1)
    return (ce * keep).sum() / n_valid, keep.sum() / n_valid


# ----------------------------------------------------------------------------------------------------------
# One training iteration
# ----------------------------------------------------------------------------------------------------------
def train_step(step, batch_l, batch_u, student, teachers, optimizer, accelerator, args, mean, std):
    epoch, i = divmod(step, args.iters_per_epoch)
    index, kind = active(epoch)
    teacher = teachers[index]
    # all of this step's mixing draws: a pure function of (seed, step, rank), so resume is exact
    rng = np.random.default_rng([args.seed, 3, step, accelerator.process_index])
    x_l, y_l, x_w, x_s = batch_l["image"], batch_l["mask"], batch_u["image"], batch_u["image_strong"]

    # pseudo-labels of the active teacher, before this step's EMA; train mode as coded (BN batch statistics)
    with torch.no_grad(), accelerator.autocast():
        conf, label = teacher(x_w).float().softmax(1).max(1)
    x_mix, y_mix, c_mix = make_mix(kind, x_w, x_s, label, conf, rng, mean, std)

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
    decay = common.ema_decay(i if args.ema_step == "epoch" else step, EMA_CAP)
    common.ema_update(teacher, accelerator.unwrap_model(student), decay, buffers="keep")
    return dict(loss=loss, loss_sup=loss_sup, loss_mix=loss_mix, loss_ic=loss_ic, mix_weight=mix_weight,
                ic_ratio=ic_ratio)


def build_networks(args, num_classes, device):
    """The student with drop-path (rates linear from 0 to --drop-path over the backbone blocks) and two
    teachers: the same network without drop-path, initialised as copies of the student (S13), no gradients,
    plain BN (as coded; they stay outside DDP), always in train mode."""
    student = common.build_model(args.backbone, num_classes, args.pretrained, args.output_stride,
                                 args.decoder_channels, drop_path=args.drop_path)
    teachers = []
    for _ in range(2):
        t = common.build_model(args.backbone, num_classes, "none", args.output_stride, args.decoder_channels)
        t.load_state_dict(student.state_dict())
        teachers.append(t.requires_grad_(False).to(device).train())
    return student, teachers


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--drop-path", type=float, default=0.1,
                        help="student's maximum drop-path rate, linear from 0 over the backbone blocks (spec §4)")
    parser.add_argument("--iters-per-epoch", type=int,
                        help="length of an epoch (one teacher shift); default one pass over the unlabeled set")
    parser.add_argument("--ic-valid-from-labeled", action="store_true",
                        help="released-code bug S2: consistency mask/normaliser from the labeled batch's labels")
    parser.add_argument("--ema-step", choices=["epoch", "global"], default="epoch",
                        help="EMA ramp index: within the epoch (the method) or global (ablation, spec S1)")
    parser.add_argument("--ohem", type=lambda s: s.lower() in ("1", "true", "yes"),
                        help="OHEM cross-entropy for L_sup (default: on for Cityscapes only)")
    args = common.resolve_args(parser, PAPER_DEFAULTS, "dual_teacher", argv)
    args.ohem = bool(args.ohem)
    accelerator, log = common.setup(args)
    if args.ic_valid_from_labeled and args.batch_size != args.unlabeled_batch_size:
        parser.error("--ic-valid-from-labeled needs --batch-size == --unlabeled-batch-size")
    mean, std = common.normalization(args.backbone)
    data = build_data(args, accelerator, mean, std)
    args.iters_per_epoch = args.iters_per_epoch or data.unlabeled_epoch
    total = common.total_iterations(args, args.iters_per_epoch)
    eval_every = args.eval_every or args.iters_per_epoch
    log.info(f"{len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled ({args.split}), {len(data.val_set)} "
             f"val; an epoch (one teacher shift) = {args.iters_per_epoch} iterations"
             + (" (one pass over the unlabeled set)" if args.iters_per_epoch == data.unlabeled_epoch else "")
             + f"; {total} iterations")

    # --- networks and optimiser --------------------------------------------------------------------------
    student, teachers = build_networks(args, data.num_classes, accelerator.device)
    student = common.prepare_network(student, accelerator)
    mean_t, std_t = (torch.tensor(v, device=accelerator.device).view(3, 1, 1) for v in (mean, std))
    optimizer = common.sgd(common.param_groups(student, args.lr, args.head_lr_mult), args.lr, args.weight_decay)
    student, optimizer = accelerator.prepare(student, optimizer)
    state = common.TrainState()
    accelerator.register_for_checkpointing(state, *teachers)
    start = common.maybe_resume(accelerator, args, state, log)
    saved = state.extra.get("iters_per_epoch", args.iters_per_epoch)
    if saved != args.iters_per_epoch:
        sys.exit(f"--resume: the checkpoint used {saved} iterations per epoch, this run {args.iters_per_epoch}; "
                 f"the teacher shifts would change (pass --iters-per-epoch {saved})")

    def pseudo_labels(image):  # overlays: the active teacher with its own BN statistics
        teacher = teachers[active(state.extra["epoch"])[0]]
        teacher.eval()
        out = teacher(image).argmax(1)
        teacher.train()
        return out

    # --- training ----------------------------------------------------------------------------------------
    labeled, unlabeled = data.labeled_stream(start), data.unlabeled_stream(start)
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    student.train()
    for step in range(start, total):
        epoch, i = divmod(step, args.iters_per_epoch)
        if i == 0 or step == start:
            index, kind = active(epoch)
            log.info(f"epoch {epoch} (iteration {step}{', resumed mid-epoch' if i else ''}): teacher T{index + 1} "
                     f"+ {'CutMix' if kind == 'cutmix' else 'ClassMix'}")
        state.extra.update(epoch=epoch, iters_per_epoch=args.iters_per_epoch)
        batch_l = to_device(next(labeled), accelerator.device)
        batch_u = to_device(next(unlabeled), accelerator.device)
        lr = common.poly_lr(optimizer, args.lr, step, total)
        terms = train_step(step, batch_l, batch_u, student, teachers, optimizer, accelerator, args, mean_t, std_t)
        meter.update(**terms)
        bar.update(1)

        done = step + 1
        if done % args.log_every == 0 or done % eval_every == 0 or done in (total, args.stop_at):
            losses = meter.read(accelerator, done, args.out)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", mix_w=f"{losses['mix_weight']:.2f}", lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({f"train/{k}": v for k, v in losses.items()}, step=done)
        if done % eval_every == 0 or done == total or done == args.stop_at:
            teacher = teachers[active(epoch)[0]]
            common.evaluate_and_checkpoint(accelerator, args, state, log, data, student, done,
                                           pseudo_label_fn=pseudo_labels, probe=(teacher, THRESHOLD),
                                           extra_record={"epoch": epoch, "teacher": f"T{active(epoch)[0] + 1}"})
        if done == args.stop_at:
            break
    bar.close()
    log.info(f"done: best mIoU {state.best_miou:.2f} at iteration {state.best_step}")
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
