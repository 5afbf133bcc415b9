"""Evaluate saved weights (OUT/model_best.pt or model_last.pt of any method) with exactly the training
evaluator: same dataset, mode and mIoU code. Works in one process or under `accelerate launch`.

  python scripts/evaluate.py --weights runs/ctt_voc_1-8_s0/model_best.pt [--data-root ...] [--eval-mode sliding]
  python scripts/evaluate.py --weights runs/ctt_camvid_1-30_s0/model_last.pt --split test   # a run's test_miou

--recalibrate-bn K (a diagnostic) first replaces every BatchNorm's running statistics by their average over K
train-mode forwards of labeled training crops (the weak view, no gradient; each process its own), i.e. the statistics
a supervised-only run collects: it shows how much of a score the statistics of the unlabeled views cost.

--probe TAU (a diagnostic) also scores the saved network as a pseudo-labeller, the training runs' probe: on the fixed
sample of unlabeled training images (their ground truth read for this only), in eval mode, the pixels whose confidence
is >= TAU, overall and per class (which classes a loss on those pixels would teach, and how right it is on each).
The saved network is the method's evaluated one: the pseudo-labeller for supervised, the mean teacher and GTA-Seg
(their teachers), not for Dual Teacher and CTT (students) or SegKC (the junior, taught by its senior), whose runs log
their pseudo-labeller's probe during training.
"""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cli import description  # noqa: E402
import common  # noqa: E402
from datasets import build_data  # noqa: E402


def recalibrate_bn(model: torch.nn.Module, stream, batches: int, device) -> None:
    """Running mean / var of every BatchNorm = the plain average over `batches` train-mode forwards (momentum None,
    torch's cumulative average); weights and everything else untouched; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(next(stream)["image"].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--weights", required=True, help="a model_*.pt file written by a method script")
    parser.add_argument("--data-root", help="override the dataset folder stored with the weights")
    parser.add_argument("--split", choices=["val", "test"], default="val",
                        help="which split of the run's dataset to score (test: where the dataset has labeled test "
                             "images, e.g. CamVid's 233)")
    parser.add_argument("--eval-mode", choices=["whole", "sliding"])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--recalibrate-bn", type=int, default=0, metavar="K",
                        help="diagnostic: first recompute BatchNorm statistics from K batches of labeled crops")
    parser.add_argument("--save-confusion", help="write the summed confusion matrix (torch.save) here")
    parser.add_argument("--probe", type=float, metavar="TAU",
                        help="diagnostic: also probe the network's pseudo-labels at confidence >= TAU (in [0, 1])")
    cli = parser.parse_args(argv)
    if cli.probe is not None and not 0.0 <= cli.probe <= 1.0:
        parser.error(f"--probe must be a confidence in [0, 1], got {cli.probe}")
    try:
        saved = common.load_weights(cli.weights)  # tensors and plain values only: no code from the file runs
    except (OSError, ValueError) as error:
        sys.exit(f"--weights {error}")
    args = SimpleNamespace(**saved["args"])
    args.num_workers, args.log_with = cli.num_workers, None
    args.data_root = cli.data_root or args.data_root
    args.eval_mode = cli.eval_mode or args.eval_mode
    from accelerate import Accelerator
    import os
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1)
    mean, std = common.normalization(saved.get("backbone", args.backbone))
    data = build_data(args, accelerator, mean, std, need_unlabeled=False)
    if cli.split == "test" and data.test_loader is None:
        sys.exit(f"--split test: --dataset {args.dataset} at {args.data_root} has no labeled test split")
    loader, images = (data.test_loader, len(data.test_set)) if cli.split == "test" else (data.val_loader,
                                                                                           len(data.val_set))
    model = common.build_model(saved.get("backbone", args.backbone), data.num_classes, "none",
                               args.output_stride, args.decoder_channels)
    model.load_state_dict(saved["model"])
    model.to(accelerator.device)
    if cli.recalibrate_bn > 0:
        recalibrate_bn(model, data.labeled_stream(0), cli.recalibrate_bn, accelerator.device)
    result = common.evaluate(model, loader, accelerator, data.num_classes, args.eval_mode, args.crop_size,
                             data.miou_over_present)
    probe = common.pseudo_label_probe(model, data, accelerator, cli.probe) if cli.probe is not None else None
    if accelerator.is_main_process:
        recalibrated = f", BatchNorm statistics from {cli.recalibrate_bn} labeled batches" if cli.recalibrate_bn else ""
        print(f"mIoU ({args.eval_mode}, {images} {cli.split} images{recalibrated}): {result['miou']:.2f}")
        print("per-class IoU: " + ", ".join(f"{n} {'absent' if v is None else f'{v:.1f}'}"
                                            for n, v in zip(data.class_names, result["iou"])))
        if probe == {}:
            print(f"no probe: {args.dataset} has no sample of unlabeled training images with ground truth")
        if probe:
            print(f"probe ({len(data.probe_set)} unlabeled training images, confidence >= {cli.probe}): "
                  f"{probe['pseudo_share']:.1f}% of the pixels pass, {probe['pseudo_acc']:.1f}% of them right; "
                  f"{probe['pseudo_acc_all']:.1f}% of all pixels right")
            print("per class, % (of all pixels / of its pixels passing / of those right / of all passing; - = none "
                  "passed): " + ", ".join(f"{n} " + " / ".join("-" if v[k] is None else f"{v[k]:.1f}" for k in (
                      "pixels", "share", "acc", "target_share")) for n, v in probe["probe_per_class"].items()))
        if cli.save_confusion:
            torch.save(result["confusion"], cli.save_confusion)


if __name__ == "__main__":
    main()
