"""Mean teacher with CutMix pseudo-labels: the control every method of this project extends and claims to beat.

The plain recipe of French et al., "Semi-supervised semantic segmentation needs strong, varied perturbations"
(BMVC 2020, the "CutMix-Seg" mean teacher), with the data pipeline and loss of UniMatch's FixMatch baseline
(Yang et al., CVPR 2023, `LiheYoung/UniMatch@0324f3d fixmatch.py`), which is the same recipe with the student as
its own teacher. One student S, one teacher T = EMA of S; per iteration:
  p = softmax(T(x_w)) on the weak unlabeled view, no gradient;  c = max p,  y^ = argmax p
  M = one CutMix box per image (probability 0.5, area U(0.02, 0.4) of the crop, aspect U(0.3, 3.3));
      x~ = M * x_s[partner] + (1 - M) * x_s,  y~, c~, V~ mixed with the same boxes     (fixmatch.py:139-158)
  L_sup = CE(S(x_l), y_l), ignore 255 (OHEM CE on Cityscapes, UniMatch's configs/cityscapes.yaml)
  L_u   = sum_px CE(S(x~), y~) [c~ >= tau] V~ / sum_px V~                                (fixmatch.py:162-164)
  L     = L_sup + lambda_u L_u, lambda_u = 1 (ours; see below)
  one SGD step on S, then T <- a T + (1 - a) S on parameters and BN statistics, a = min(1 - 1/(t+1), 0.99)
x_s is x_w with UniMatch's photometric strong view (colour jitter, grayscale, blur); V is the unlabeled padding
mask. The teacher is evaluated and deployed, as in French et al.'s code (`eval_net = teacher_net`,
`Britefury/cutmix-semisup-seg@af6183a train_seg_semisup_mask_mt.py:109`); the student's mIoU is logged beside it.
Passes per iteration: 1 teacher forward (no gradient), 2 student forwards (x_l, x~) + 1 backward.

Deviations from the two sources, one line each (the reasons, with their sources: docs/methods/mean_teacher.md):
- EMA decay ramps as min(1 - 1/(t+1), 0.99); French et al.: a constant 0.99  (docs/methods/mean_teacher.md#ema)
- The teacher labels in eval mode (French et al.: train mode)  (docs/methods/mean_teacher.md#teacher)
- CutMix partner: image i+1 of the same batch; UniMatch's box rule in one draw  (docs/methods/mean_teacher.md#cutmix)
- tau 0.95 (UniMatch; CamVid/toy: ours), Cityscapes 0; lambda_u = 1 with CE (ours)  (docs/methods/mean_teacher.md#tau)
- Two student forwards, x_l and x~; --joint-forward (ours): one on [x_l; x~]  (docs/methods/mean_teacher.md#forwards)
- Ablations from French et al.'s code: --cutmix-box french, --freeze-bn  (docs/methods/mean_teacher.md#ablations)
- Schedule, optimiser, crops, evaluation: the shared conventions  (docs/methods/mean_teacher.md#shared)

  accelerate launch methods/mean_teacher.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: cli, common, datasets
import cli  # noqa: E402

# Where the control differs from the field's conventions (cli.DATASET_DEFAULTS): tau from UniMatch's configs
# (pascal.yaml 0.95, cityscapes.yaml 0 with OHEM), 0.95 on CamVid/toy (ours).
PAPER_DEFAULTS = {"voc": dict(threshold=0.95), "cityscapes": dict(ohem=True, threshold=0.0),
                  "camvid": dict(threshold=0.95), "toy": dict(threshold=0.95)}


def parse_args(argv=None):
    parser = cli.base_parser(cli.description(__doc__))
    parser.add_argument("--threshold", type=cli.probability, help="tau: teacher confidence a pseudo-label needs")
    parser.add_argument("--lambda-u", type=cli.non_negative_float, default=1.0, help="weight of L_u (ours: 1)")
    parser.add_argument("--ema-decay", type=cli.bounded(float, "[0, 1)"), default=0.99,
                        help="cap of the teacher's EMA decay ramp")
    parser.add_argument("--ohem", action=argparse.BooleanOptionalAction, help="OHEM cross-entropy for L_sup")
    parser.add_argument("--joint-forward", action="store_true", help="ours: one student forward on [labeled; "
                        "mixed], BN statistics over both (default: two forwards, as French et al. and UniMatch)")
    parser.add_argument("--cutmix-box", choices=["unimatch", "french"], default="unimatch",
                        help="unimatch: one box on half the images, area U(0.02, 0.4); french: one box of half the "
                             "area on every image (French et al.'s code)")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="French et al.'s --freeze_bn: the backbone's BN layers normalise with their ImageNet "
                             "statistics and never update them (student and teacher); their affine weights learn")
    return cli.resolve_args(parser, PAPER_DEFAULTS, "mean_teacher", argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below spend seconds loading torch

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from datasets import build_data, cutmix_box_mask, mix, to_device  # noqa: E402

IGNORE = common.IGNORE_INDEX


def unsupervised_loss(logits, target, confidence, valid, threshold):
    """L_u: CE on the confident pixels, normalised by the number of valid (non-padded) pixels, not of the
    confident ones (fixmatch.py:162-164). Returns (loss, share of valid pixels that pass)."""
    return common.confident_ce(logits, target, confidence, valid, threshold)


def french_box_mask(batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """bool [B,H,W], True = the partner's pixels: on every image one box of half the crop's area, its height a
    fraction h = 0.5^u (u ~ U(0, 1)) of the crop's and its width 0.5 / h, placed uniformly inside the crop (French
    et al.'s BoxMaskGenerator with mask_prop_range 0.5, `Britefury/cutmix-semisup-seg@af6183a mask_gen.py:75-105`,
    `run_pascal_aug_deeplab3plus_experiments.sh:21`; the box holds the second image, invert=True, :111-114)."""
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    for i, (u, y, x) in enumerate(torch.rand(batch, 3).tolist()):
        h = 0.5 ** u
        box_h, box_w = round(h * height), round(0.5 / h * width)
        top, left = round((height - box_h) * y), round((width - box_w) * x)
        mask[i, top:top + box_h, left:left + box_w] = True
    return mask


class _FrozenStatistics:
    """Mixed into a BatchNorm's class by freeze_bn: the layer stays in eval mode whatever .train() says."""

    def train(self, mode: bool = True):
        return super().train(False)


def freeze_bn(module: nn.Module) -> None:
    """French et al.'s --freeze_bn (every published setting of theirs, supervised baseline included:
    `Britefury/cutmix-semisup-seg@af6183a run_pascal_aug_deeplab3plus_experiments.sh:14`): every BN layer of the
    backbone in eval mode for good (`architectures/util.py:2-10`, `deeplab3plus.py:120-121`), so it normalises with
    its ImageNet statistics and never averages a batch's, strong views included; its affine weights still learn.
    A class swap rather than a flag, so that a deep copy (the teacher) and every later .train() keep it."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FrozenStatistics):
            base = type(m)
            if base not in _FROZEN:
                _FROZEN[base] = type(f"Frozen{base.__name__}", (_FrozenStatistics, base), {})
            m.__class__ = _FROZEN[base]
            m.eval()


_FROZEN: dict = {}  # BatchNorm class -> its frozen-statistics subclass


def train_step(step, batch_l, batch_u, *, student, teacher, optimizer, accelerator, args):
    """One iteration: teacher labels on the weak view, CutMix on the strong view, L = L_sup + lambda_u L_u, an
    SGD step, then the EMA. Returns the detached loss terms."""
    x_l, y_l = batch_l["image"], batch_l["mask"]
    with torch.no_grad(), accelerator.autocast():
        confidence, label = teacher(batch_u["image"]).float().softmax(1).max(1)
    x_s, valid = batch_u["image_strong"], batch_u["valid"]
    if args.cutmix_box == "french":
        box = french_box_mask(*label.shape, device=label.device)  # True = the partner's pixels
    else:
        box = cutmix_box_mask(*label.shape, p=0.5, device=label.device)
    x_mix, y_mix, c_mix, v_mix = (mix(box, t.roll(-1, 0), t) for t in (x_s, label, confidence, valid))

    if args.joint_forward:  # ours: BN statistics over labeled and mixed images together
        logits = student(torch.cat([x_l, x_mix]))
        logits_l, logits_u = logits[:len(x_l)], logits[len(x_l):]
    else:  # each batch normalised by its own statistics (train_seg_semisup_mask_mt.py:299, :358)
        logits_l, logits_u = student(x_l), student(x_mix)
    if args.ohem:
        loss_sup = common.ohem_cross_entropy(logits_l, y_l)
    else:
        loss_sup = F.cross_entropy(logits_l, y_l, ignore_index=IGNORE)
    loss_u, passed = unsupervised_loss(logits_u, y_mix, c_mix, v_mix, args.threshold)
    loss = loss_sup + args.lambda_u * loss_u
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    common.ema_update(teacher, accelerator.unwrap_model(student), common.ema_decay(step, args.ema_decay),
                      buffers="ema")
    return dict(loss=loss, loss_sup=loss_sup, loss_u=loss_u, passed=passed)


def main(argv=None):
    args = parse_args(argv)
    accelerator, log = common.setup(args)
    mean, std = common.normalization(args.backbone)
    data = build_data(args, accelerator, mean, std)
    total = common.total_iterations(args, data.unlabeled_epoch)
    eval_every = args.eval_every or data.unlabeled_epoch
    log.info(f"{len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled ({args.split}), {len(data.val_set)} "
             f"val; {total} iterations")

    # --- networks and optimiser: S trains, T = EMA of S (eval mode, no gradient, outside DDP) ----------------
    student = common.prepare_network(common.build_model(args.backbone, data.num_classes, args.pretrained,
                                                        args.output_stride, args.decoder_channels), accelerator)
    if args.freeze_bn:
        freeze_bn(student.backbone)
    teacher = common.frozen_copy(student).eval()
    optimizer = common.sgd(common.param_groups(student, args.lr, args.head_lr_mult), args.lr, args.weight_decay)
    student, optimizer = accelerator.prepare(student, optimizer)
    state = common.TrainState()
    accelerator.register_for_checkpointing(teacher, state)
    start = cli.maybe_resume(accelerator, args, state, log)

    @torch.no_grad()
    def pseudo_labels(image):  # overlays: the teacher's hard labels (eval mode, as it labels)
        return teacher(image).argmax(1)

    # --- training ----------------------------------------------------------------------------------------
    labeled, unlabeled = data.labeled_stream(start), data.unlabeled_stream(start)
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    student.train()
    for step in range(start, total):
        batch_l = to_device(next(labeled), accelerator.device)
        batch_u = to_device(next(unlabeled), accelerator.device)
        lr = common.poly_lr(optimizer, args.lr, step, total)
        meter.update(**train_step(step, batch_l, batch_u, student=student, teacher=teacher, optimizer=optimizer,
                                  accelerator=accelerator, args=args))
        bar.update(1)

        done = step + 1
        evaluate = done % eval_every == 0 or done in (total, args.stop_at)
        if done % args.log_every == 0 or evaluate:
            losses = meter.read(accelerator, done, log)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", passed=f"{losses['passed']:.2f}", lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({"train/lr": lr, **{f"train/{k}": v for k, v in losses.items()}}, step=done)
        if evaluate:
            common.evaluate_and_checkpoint(accelerator, args, state, log, data, model=teacher, step=done,
                                           final=done == total,
                                           extra_models={"student": student}, pseudo_label_fn=pseudo_labels,
                                           probe_net=teacher, probe_rule=args.threshold,
                                           extra_record={"train_passed": round(losses["passed"], 4)})
        if done == args.stop_at:
            break
    bar.close()
    log.info(common.final_line(state, total, "mIoU (teacher)"))
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
