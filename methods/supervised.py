"""Supervised-only baseline: the "SupOnly" row of every semi-supervised segmentation table.

DeepLabv3+ trained on the labeled subset only, with the same model, optimiser, schedule and evaluation as the
semi-supervised methods (UniMatch's `LiheYoung/UniMatch@0324f3d supervised.py`):
  loss  L_sup = CE(f(x_l), y_l), ignore 255 (OHEM CE on Cityscapes, configs/cityscapes.yaml)
  SGD momentum 0.9, wd 1e-4, poly(0.9) per iteration, head lr x10 on VOC, x1 on Cityscapes.
An epoch here is one pass over the labeled subset (UniMatch's supervised baseline), so `--epochs 80` on 183
labels is 80 x 183 / 8 iterations; pass `--iters` to match a semi-supervised run's budget exactly.
`--split full` trains on every labeled image of the pool (the upper bound).

Deviations from UniMatch's supervised.py, one line each (the reasons: docs/methods/supervised.md):
- None beyond the shared ones (torchvision-layout ResNet, SyncBN only on CUDA)  (docs/methods/supervised.md#shared)
- The paper's global batch of 8 labeled images; UniMatch doubles it for its baseline  (docs/methods/supervised.md#batch)

  accelerate launch methods/supervised.py --dataset voc --data-root data/VOC2012 --split 1/8
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: cli, common, datasets
import cli  # noqa: E402

# The baseline uses the field's conventions (cli.DATASET_DEFAULTS) unchanged; only its loss differs per
# dataset: OHEM on Cityscapes as in UniMatch's cityscapes.yaml.
PAPER_DEFAULTS = {"cityscapes": {"ohem": True}}


def parse_args(argv=None):
    parser = cli.base_parser(cli.description(__doc__), unlabeled_stream=False)
    parser.add_argument("--ohem", action=argparse.BooleanOptionalAction, help="OHEM cross-entropy")
    return cli.resolve_args(parser, PAPER_DEFAULTS, "supervised", argv)


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below spend seconds loading torch

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from datasets import build_data, to_device  # noqa: E402


def train_step(batch_l, *, model, optimizer, accelerator, args):
    """One iteration: L_sup on the labeled batch, then an SGD step. Returns the detached loss."""
    logits = model(batch_l["image"])
    if args.ohem:
        loss_sup = common.ohem_cross_entropy(logits, batch_l["mask"])
    else:
        loss_sup = F.cross_entropy(logits, batch_l["mask"], ignore_index=common.IGNORE_INDEX)
    accelerator.backward(loss_sup)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss_sup=loss_sup)


def main(argv=None):
    args = parse_args(argv)
    accelerator, log = common.setup(args)
    mean, std = common.normalization(args.backbone)
    data = build_data(args, accelerator, mean, std, need_unlabeled=False)
    total = common.total_iterations(args, data.labeled_epoch)
    eval_every = args.eval_every or data.labeled_epoch
    log.info(f"{len(data.labeled)} labeled images ({args.split}), {len(data.val_set)} val; {total} iterations")

    # --- network and optimiser -------------------------------------------------------------------------
    model = common.prepare_network(common.build_model(args.backbone, data.num_classes, args.pretrained,
                                                      args.output_stride, args.decoder_channels), accelerator)
    optimizer = common.sgd(common.param_groups(model, args.lr, args.head_lr_mult), args.lr, args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)
    start = cli.maybe_resume(accelerator, args, state, log)

    # --- training ----------------------------------------------------------------------------------------
    labeled = data.labeled_stream(start)
    meter, bar = common.LossMeter(), common.progress_bar(accelerator, total, start)
    model.train()
    for step in range(start, total):
        batch_l = to_device(next(labeled), accelerator.device)
        lr = common.poly_lr(optimizer, args.lr, step, total)
        meter.update(**train_step(batch_l, model=model, optimizer=optimizer, accelerator=accelerator, args=args))
        bar.update(1)

        done = step + 1
        evaluate = done % eval_every == 0 or done in (total, args.stop_at)
        if done % args.log_every == 0 or evaluate:
            losses = meter.read(accelerator, done, log)
            bar.set_postfix(loss=f"{losses['loss_sup']:.3f}", lr=f"{lr:.2e}")
            if args.log_with:
                accelerator.log({"train/lr": lr, **{f"train/{k}": v for k, v in losses.items()}}, step=done)
        if evaluate:
            # probe: the baseline's own predictions under the usual 0.95 rule, the yardstick for the methods
            common.evaluate_and_checkpoint(accelerator, args, state, log, data, model=model, step=done,
                                           final=done == total, probe_net=model, probe_rule=0.95)
        if done == args.stop_at:
            break
    bar.close()
    log.info(common.final_line(state, total))
    accelerator.end_training()
    return state


if __name__ == "__main__":
    main()
