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
Ours (R), reading Figure 2: both levels both ways, weights 1, in every iteration  (docs/methods/segkc.md#reading).
Networks (ours: the paper's are not known): senior/junior ResNet-101/50 on VOC and Cityscapes, EfficientNet-Lite2/0
on CamVid and toy; --backbone aliases --junior-backbone, the deployed network  (docs/methods/segkc.md#networks).

Choices and deviations, one line each (the reasons, with their sources: docs/methods/segkc.md):
 1. CPS as CPS+CutMix, hard pseudo-labels; l_cps 1 VOC, 5 Cityscapes, CamVid/toy 1 (ours)  (docs/methods/segkc.md#cps)
 2. Left different from CPS: (a) UniMatch's box, (b) wd on all parameters, (c) choice 3  (docs/methods/segkc.md#not-cps)
 3. The CutMix partner of image i is image i-1 of the batch, not a second loader  (docs/methods/segkc.md#partner)
 4. (R) Feature KC on the decoder feature via 1x1 conv + BN adapters, 2 - 2 cos  (docs/methods/segkc.md#feature-kc)
 5. (R) Prediction KC: KL at temperature T times T^2, on the mixed image  (docs/methods/segkc.md#prediction-kc)
 6. (R) Unconditional mutual consultation; --selective: where the consulted is surer  (docs/methods/segkc.md#selective)
 7. Optimisation: CPS+CutMix's launch scripts; CamVid/toy: the shared defaults (ours)  (docs/methods/segkc.md#optimiser)
 8. Batches are normalised for the junior; the senior maps them to its own statistics  (docs/methods/segkc.md#input)
 9. Evaluation: the junior; the senior is logged as miou_senior, never deployed  (docs/methods/segkc.md#evaluation)
Cost per iteration: 2 forwards without gradient (S, J on u), 4 forward+backward (S, J on x and on u').
  python methods/segkc.py --dataset camvid              (offline)
  accelerate launch methods/segkc.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: cli, common, datasets
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


def iteration_losses(x, y, u, valid, box, *, senior, junior, adapter_s, adapter_j, args):
    """Every loss term of one iteration (the docstring's equations; targets are detached inside each loss).
    adapter_X is None when its direction's weight is 0. Returns (terms, info); total = sum_k weight_k * terms[k]."""
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


def train_step(batch_l, batch_u, *, senior, junior, adapter_s, adapter_j, optimizer, accelerator, args):
    """One iteration: a CutMix box per image (choice 2a), every loss term, one SGD step on both networks and the
    adapters. Returns the loss terms (with --selective also the shares where each network consults)."""
    u, valid = batch_u["image"], batch_u["valid"]
    box = cutmix_box_mask(u.shape[0], u.shape[2], u.shape[3], p=1.0, device=u.device)  # choice 2a
    terms, info = iteration_losses(batch_l["image"], batch_l["mask"], u, valid, box, senior=senior, junior=junior,
                                   adapter_s=adapter_s, adapter_j=adapter_j, args=args)
    loss = total_loss(terms, args)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss, **{f"loss_{k}": v for k, v in terms.items()}, **info)


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
    start = cli.maybe_resume(accelerator, args, state, log)
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
        batch_l = to_device(next(labeled), accelerator.device)
        batch_u = to_device(next(unlabeled), accelerator.device)
        lr = common.poly_lr(optimizer, args.lr, step, total)
        meter.update(**train_step(batch_l, batch_u, senior=senior, junior=junior, adapter_s=adapter_s,
                                  adapter_j=adapter_j, optimizer=optimizer, accelerator=accelerator, args=args))
        bar.update(1)

        done = step + 1
        evaluate = done % eval_every == 0 or done in (total, args.stop_at)
        if done % args.log_every == 0 or evaluate:
            losses = meter.read(accelerator, done, log)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", cps=f"{losses['loss_cps']:.3f}", lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({"train/lr": lr, **{f"train/{k}": v for k, v in losses.items()}}, step=done)
        if evaluate:
            # probe: the senior's pseudo-labels (what the junior learns from) as it makes them, in train mode on
            # batches of the unlabeled batch size; CPS keeps every pixel (threshold 0)
            common.evaluate_and_checkpoint(accelerator, args, state, log, data, model=junior, step=done,
                                           final=done == total,
                                           extra_models={"senior": senior_eval}, pseudo_label_fn=senior_pseudo_label,
                                           probe_net=senior_eval, probe_rule=0.0, probe_batch=args.unlabeled_batch_size)
        if done == args.stop_at:
            break
    bar.close()
    log.info(common.final_line(state, total, "mIoU (junior)"))
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
