"""GTA-Seg: Semi-Supervised Semantic Segmentation via Gentle Teaching Assistant (Jin, Wang, Lin, NeurIPS 2022).

Three DeepLabv3+ networks of the same architecture. Official code: Jin-Ying/GTA-Seg@534f10f (every path:line below is
in it unless another repository is named; config.yaml = experiments/pascal/183/gta/config.yaml):
  teacher T    no gradient; EMA of the whole student (parameters only); makes the pseudo-labels; evaluated.
  assistant A  the "gentle teaching assistant": SGD on the pseudo-label loss L_u only, at a constant lr.
  student S    first pulled by EMA towards A on every parameter except the mask predictor (the GTA's "gentle"
               feature transfer), then SGD on the labeled cross-entropy L_sup only (poly lr).
One iteration after the supervised-only first epoch (train_gta.py:301-322), t = iteration - one epoch:
  1. yhat = argmax softmax T_eval(x_u)                   pseudo-labels on the weak view, train_gta.py:338-344
  2. CutMix (p=0.5 per batch) on x_u, the same boxes on yhat     :346-357; gta/dataset/augmentation.py:471-541
  3. z_A = A(x_l ++ x_mix)[unlabeled];  c = max softmax T_train(x_l ++ x_mix)[unlabeled]                 :359-390
  4. L_u = sum_K (1+c) CE(z_A, yhat) / (sum_K (1+c) + |D|), D = c <= 20th percentile  gta/utils/loss_helper.py:69-94
  5. A <- SGD step on L_u                                                                                :404-406
  6. S[n] <- d S[n] + (1-d) A[n] for n outside the mask predictor,  d = min(1 - 1/(t+1), 0.999)          :408-426
  7. L_sup = CE(S(x_l ++ x_mix)[labeled], y_l);  S <- SGD step on L_sup                                  :430-452
  8. T <- d T + (1-d) S on all parameters (cap: config.yaml:68)                                          :454-472
An epoch is one pass over the unlabeled set (both loaders have its length: gta/dataset/pascal_voc.py:24-33,
train_gta.py:271-273). Two consequences are the method, not bugs of ours: the student's feature extractor is the
assistant's, and A trains at a constant lr, the student at poly 0.9  (docs/methods/gta_seg.md#consequences).
T is evaluated, S's and A's mIoU logged beside it  (docs/methods/gta_seg.md#evaluation).
--official-code (the ablation): the released code's storage sharing  (docs/methods/gta_seg.md#official-code);
the default is the paper's method, where only L_sup touches the student's mask predictor.

Deviations from the official code, one line each (the reasons, with their sources: docs/methods/gta_seg.md):
- Model: the shared DeepLabv3+, not U2PL's; mask predictor = fuse + classifier  (docs/methods/gta_seg.md#model)
- Data: the shared weak pipeline (--scale-rule u2pl: the code's); black, ignored padding  (docs/methods/gta_seg.md#data)
- Evaluation: the shared evaluator, not the 513 centre crop  (docs/methods/gta_seg.md#evaluation-protocol)
- At t = 0 T and A take S's parameters and BN buffers (the code: parameters only)  (docs/methods/gta_seg.md#start)
- CutMix boxes drawn from (seed, iteration, rank); partner (i+1) mod B, as coded  (docs/methods/gta_seg.md#cutmix)
- Resume: A and its optimiser are checkpointed, the shared mask predictor re-linked  (docs/methods/gta_seg.md#resume)
- VOC: config.yaml; Cityscapes: U2PL's config; CamVid/toy: EMA caps 0.99 (ours)  (docs/methods/gta_seg.md#recipes)
- BN statistics per process on CPU (the code: SyncBN)  (docs/methods/gta_seg.md#batchnorm)

  accelerate launch methods/gta_seg.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: cli, common, datasets
import cli  # noqa: E402

# Values where they differ from the field's conventions (cli.DATASET_DEFAULTS): VOC = the official code's
# (experiments/pascal/183/gta/config.yaml), Cityscapes = U2PL's Cityscapes config with GTA-Seg's caps
# (docs/methods/gta_seg.md#recipes), CamVid/toy = ours.
PAPER_DEFAULTS = {
    "voc": dict(output_stride=8, crop_size=[513, 513], global_batch=12, global_unlabeled_batch=12,  # 3+3 x 4 GPUs
                lr=1e-3, head_lr_mult=10.0, weight_decay=1e-4, epochs=80, ema_decay=0.999, ta_ema_decay=0.999),
    "cityscapes": dict(output_stride=8, crop_size=[769, 769], global_batch=16, global_unlabeled_batch=16,
                       lr=0.01, head_lr_mult=1.0, weight_decay=5e-4, epochs=200, ema_decay=0.999,
                       ta_ema_decay=0.999),  # x1 head: train_gta.py:100
    "camvid": dict(ema_decay=0.99, ta_ema_decay=0.99),  # ours, not the paper's: short CPU schedules (docs)
    "toy": dict(ema_decay=0.99, ta_ema_decay=0.99),     # ours
}


def parse_args(argv=None):
    parser = cli.base_parser(cli.description(__doc__))
    parser.add_argument("--official-code", action="store_true",
                        help="ablation: reproduce the released code's storage sharing (teacher, assistant and student "
                             "share every parameter in the first semi-supervised epoch, then the student's and the "
                             "assistant's mask predictor; docstring); off: the paper's method")
    parser.add_argument("--ema-decay", type=cli.probability, help="cap of the teacher's EMA decay (0.999, "
                                                                  "config.yaml:68)")
    parser.add_argument("--ta-ema-decay", type=cli.probability, help="cap of the assistant->student EMA decay "
                                                                     "(0.999, hard-coded in train_gta.py:418)")
    parser.add_argument("--drop-ratio", type=cli.bounded(float, "[0, 1)"), default=0.2,
                        help="fraction of least confident pixels dropped from L_u (80%% kept, config.yaml:42)")
    parser.add_argument("--cutmix-p", type=cli.probability, default=0.5, help="probability of CutMix per batch "
                                                                             "(train_gta.py:347)")
    parser.add_argument("--scale-rule", choices=["uniform", "u2pl"], default="uniform",
                        help="weak pipeline rescale: uniform = the shared U(0.5, 2.0); u2pl = the code's U[0.5, 1) "
                             "or U[1, 2) with probability 1/2 each (augmentation.py:190-194)")
    parser.add_argument("--iters-per-epoch", type=cli.positive_int,
                        help="iterations per epoch (default: one pass over the unlabeled set); the first epoch is "
                             "supervised only")
    return cli.resolve_args(parser, PAPER_DEFAULTS, "gta_seg", argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below spend seconds loading torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from datasets import build_data, mix, to_device  # noqa: E402

MASK_PREDICTOR = ("fuse.", "classifier.")  # = U2PL's decoder.classifier: never EMA'd from the assistant


def is_mask_predictor(name: str) -> bool:
    return name.startswith(MASK_PREDICTOR)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """np.percentile(values, 100 q) with linear interpolation, on the device (no host copy, no size limit)."""
    position = (values.numel() - 1) * q
    low = int(position)
    high = min(low + 1, values.numel() - 1)
    v_low, v_high = values.kthvalue(low + 1).values, values.kthvalue(high + 1).values
    return v_low + (v_high - v_low) * (position - low)


def gta_unsup_loss(logits, pseudo_label, confidence, valid, drop_ratio: float = 0.2) -> torch.Tensor:
    """L_u (compute_unsupervised_loss_conf_weight, gta/utils/loss_helper.py:69-94): pixels whose teacher confidence
    is at or below the local 20th percentile are dropped (D), the kept ones (K) weighted by (1 + c), and each
    dropped pixel still adds 1 to the normaliser:  L_u = sum_K (1+c) CE / (sum_K (1+c) + |D|)."""
    c = confidence[valid]
    if c.numel() == 0:
        return logits.sum() * 0
    dropped = valid & (confidence <= percentile(c, drop_ratio))
    kept = valid & ~dropped
    ce = F.cross_entropy(logits.float(), pseudo_label.masked_fill(~kept, common.IGNORE_INDEX),
                         ignore_index=common.IGNORE_INDEX, reduction="none")
    weight = (1 + confidence) * kept
    return (weight * ce).sum() / (weight.sum() + dropped.sum())


def gta_cutmix(rng: np.random.Generator, p: float, *tensors):
    """The code's CutMix (train_gta.py:347; gta/dataset/augmentation.py:471-485, 515-534): with probability p for the
    whole batch, each image i gets a box of about half its area (w ~ randint(W/2 + 1, W), h = round(HW/2 / w),
    uniform position) filled from image (i+1) mod B. The same boxes mix every tensor given (image, pseudo-label,
    valid mask). Returns (mixed..., box mask)."""
    b, h, w = tensors[0].shape[0], tensors[0].shape[-2], tensors[0].shape[-1]
    box = torch.zeros(b, h, w, dtype=torch.bool, device=tensors[0].device)
    if rng.uniform() < p:
        for i in range(b):
            bw = int(rng.integers(int(w / 2 + 1), w))
            bh = int(np.round(h * w / 2 / bw))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box[i, y0:y0 + bh, x0:x0 + bw] = True
    return (*[mix(box, t.roll(-1, 0), t) for t in tensors], box)


@torch.no_grad()
def ema_(target, source, decay: float, skip=None, rebind: bool = False) -> None:
    """target <- decay*target + (1-decay)*source on parameters only: no network ever averages BN buffers
    (the code's EMAs, train_gta.py:420-426, 467-472). rebind (--official-code) assigns a new tensor to `.data` like
    the code, which ends any storage sharing of `target` (and only of `target`); otherwise one in-place lerp."""
    src = dict(source.named_parameters())
    pairs = [(p, src[n]) for n, p in target.named_parameters() if skip is None or not skip(n)]
    if rebind:
        for p, s in pairs:
            p.data = torch.lerp(p.data, s.data, 1.0 - decay)
    else:
        torch._foreach_lerp_([p.data for p, _ in pairs], [s.data for _, s in pairs], 1.0 - decay)


def share_storage(target, source, only=None) -> None:
    """The code's `target_param.data = source_param.data` (train_gta.py:327-335): the parameters become views of the
    same memory, so an in-place optimiser step through either network moves both."""
    src = dict(source.named_parameters())
    for n, p in target.named_parameters():
        if only is None or only(n):
            p.data = src[n].data


def train_step(step, batch_l, batch_u, *, student, assistant, teacher, opt_student, opt_assistant, rng, accelerator,
               args):
    """One iteration (the docstring's steps 1-8), the student's lr set first (poly; A keeps its base lr).
    student/assistant may be DDP-wrapped; teacher is a plain frozen module. Returns the detached loss terms."""
    S, A, T = accelerator.unwrap_model(student), accelerator.unwrap_model(assistant), teacher
    t = step - args.iters_per_epoch  # semi-supervised step; the first epoch is supervised only (train_gta.py:301)
    common.poly_lr(opt_student, args.lr, step, args.total_iters)  # the student only: A keeps its base lr
    x_l, y_l = batch_l["image"], batch_l["mask"]
    if t < 0:  # warm-up epoch: L_sup on the student alone (train_gta.py:301-314)
        loss_sup = F.cross_entropy(student(x_l), y_l, ignore_index=common.IGNORE_INDEX)
        accelerator.backward(loss_sup)
        opt_student.step()
        opt_student.zero_grad(set_to_none=True)
        return {"loss_sup": loss_sup.detach()}

    if t == 0:  # the three networks first agree here (parameters and BN buffers: docs/methods/gta_seg.md#start)
        T.load_state_dict(S.state_dict())
        A.load_state_dict(S.state_dict())
    if args.official_code and t < args.iters_per_epoch:  # the code's first semi epoch re-aliases every step
        share_storage(T, S)
        share_storage(A, S)

    # Pseudo-labels from the teacher in eval mode on the weak, un-mixed view (train_gta.py:338-344).
    with torch.no_grad(), accelerator.autocast():
        T.eval()
        pseudo_label = T(batch_u["image"]).float().argmax(1)
    x_mix, pseudo_label, valid, _ = gta_cutmix(rng, args.cutmix_p, batch_u["image"], pseudo_label,
                                               batch_u["valid"])
    x = torch.cat([x_l, x_mix])  # one batch for A, T and S: BN statistics over labeled + unlabeled (:361)
    n_l = x_l.shape[0]

    # Gentle teaching assistant: trained by the pseudo-labels only (train_gta.py:362-406).
    logits_a = assistant(x)[n_l:]
    with torch.no_grad(), accelerator.autocast():
        T.train()  # the code's confidence forward: train-mode BN (also refreshes T's running statistics)
        confidence = T(x).float().softmax(1).amax(1)[n_l:]
    loss_u = gta_unsup_loss(logits_a, pseudo_label, confidence, valid, args.drop_ratio)
    accelerator.backward(loss_u)
    opt_assistant.step()
    opt_assistant.zero_grad(set_to_none=True)

    # Gentle transfer: the assistant's feature extractor into the student, mask predictor excluded (:408-426).
    ema_(S, A, common.ema_decay(t, args.ta_ema_decay), skip=is_mask_predictor, rebind=args.official_code)

    # Student: labeled cross-entropy only (train_gta.py:430-452).
    loss_sup = F.cross_entropy(student(x)[:n_l], y_l, ignore_index=common.IGNORE_INDEX)
    accelerator.backward(loss_sup)
    opt_student.step()
    opt_student.zero_grad(set_to_none=True)

    # Teacher: EMA of the whole student (train_gta.py:454-472).
    ema_(T, S, common.ema_decay(t, args.ema_decay), rebind=args.official_code)
    return {"loss_sup": loss_sup.detach(), "loss_u": loss_u.detach()}


def main(argv=None):
    args = parse_args(argv)
    accelerator, log = common.setup(args)
    mean, std = common.normalization(args.backbone)
    data = build_data(args, accelerator, mean, std, strong=False)  # GTA-Seg has no photometric strong view
    args.iters_per_epoch = args.iters_per_epoch or data.unlabeled_epoch
    args.total_iters = common.total_iterations(args, args.iters_per_epoch)
    total, warmup = args.total_iters, args.iters_per_epoch
    eval_every = args.eval_every or args.iters_per_epoch
    log.info(f"{len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled ({args.split}), {len(data.val_set)} val; "
             f"{total} iterations, the first {warmup} supervised only; "
             f"{'--official-code (shared mask predictor)' if args.official_code else 'paper mode'}; "
             f"rescale rule {args.scale_rule}")

    # --- networks and optimisers (T is a frozen copy, outside prepare; A and S each have their own SGD) -----
    student = common.prepare_network(common.build_model(args.backbone, data.num_classes, args.pretrained,
                                                        args.output_stride, args.decoder_channels), accelerator)
    teacher = common.frozen_copy(student)  # all three are overwritten by the student at t = 0
    assistant = copy.deepcopy(student)
    opt_student = common.sgd(common.param_groups(student, args.lr, args.head_lr_mult), args.lr, args.weight_decay)
    opt_assistant = common.sgd(common.param_groups(assistant, args.lr, args.head_lr_mult), args.lr,
                               args.weight_decay)
    student, assistant, opt_student, opt_assistant = accelerator.prepare(student, assistant, opt_student,
                                                                         opt_assistant)
    state = common.TrainState()
    accelerator.register_for_checkpointing(state, teacher)
    start = cli.maybe_resume(accelerator, args, state, log)
    if args.official_code and start > warmup:  # the code's S/A mask predictor link survives in memory only
        share_storage(accelerator.unwrap_model(student), accelerator.unwrap_model(assistant), is_mask_predictor)

    @torch.no_grad()
    def pseudo_label_overlay(image):  # what L_u uses on this image: the dropped 20% is drawn unlabeled
        mode = teacher.training
        prob = teacher.eval()(image).float().softmax(1)
        teacher.train(mode)
        confidence, label = prob.max(1)
        return label.masked_fill(confidence <= percentile(confidence.flatten(), args.drop_ratio), 255)

    # --- training ----------------------------------------------------------------------------------------
    labeled, unlabeled = data.labeled_stream(start), None  # the unlabeled stream starts after the warm-up
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    student.train()
    assistant.train()
    for step in range(start, total):
        batch_l = to_device(next(labeled), accelerator.device)
        batch_u = None
        if step >= warmup:
            if unlabeled is None:
                unlabeled = data.unlabeled_stream(step)
            batch_u = to_device(next(unlabeled), accelerator.device)
        rng = np.random.default_rng([args.seed, 77, step, accelerator.process_index])  # CutMix draws
        meter.update(**train_step(step, batch_l, batch_u, student=student, assistant=assistant, teacher=teacher,
                                  opt_student=opt_student, opt_assistant=opt_assistant, rng=rng,
                                  accelerator=accelerator, args=args))
        bar.update(1)

        done = step + 1
        evaluate = done % eval_every == 0 or done in (total, args.stop_at)
        if done % args.log_every == 0 or evaluate or done == warmup:
            losses = meter.read(accelerator, done, log)
            lr = opt_student.param_groups[0]["lr"]  # poly, set by train_step
            bar.set_postfix(lr=f"{lr:.2e}", **{k: f"{v:.3f}" for k, v in losses.items()})
            if args.log_with:
                accelerator.log({"train/lr": lr, **{f"train/{k}": v for k, v in losses.items()}}, step=done)
        if evaluate:
            semi = done > warmup  # the student is evaluated in the warm-up epoch, the teacher after (:219-222)
            common.evaluate_and_checkpoint(accelerator, args, state, log, data, model=teacher if semi else student,
                                           step=done, final=done == total,
                                           extra_models={"student": student, "assistant": assistant},
                                           pseudo_label_fn=pseudo_label_overlay if semi else None,
                                           probe_net=teacher if semi else student,  # kept: above the 20% quantile
                                           probe_rule=lambda c: c > percentile(c.flatten(), args.drop_ratio),
                                           extra_record={"evaluated": "teacher" if semi else "student"})
        if done == args.stop_at:
            break
    bar.close()
    log.info(common.final_line(state, total))
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
