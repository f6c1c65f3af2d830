"""A zoo of dual-input colposcopy classifiers that are not PFM, written the way research teams write them, each
carrying a construct that breaks naive INT8 calibration (issue 39, item 2). They exist to be pushed through
edge-pfm as a team would: trained here on a paired dataset on disk, exported through both doors (`--model` and
the team's own plain `torch.onnx.export` + `--onnx`), then calibrated in a process where torch cannot be imported.

| model      | what it is                                         | the construct calibration meets                       |
|------------|----------------------------------------------------|-------------------------------------------------------|
| attnpool   | BN/ReLU conv stems, attention pooling over the     | a softmax over 256 tokens that is exactly uniform     |
|            | 256 fused tokens (zero-initialised query and keys) | after training: q = 0 and W_k = 0 is a saddle AdamW   |
|            |                                                    | never leaves (an untrained head), so every value is   |
|            |                                                    | 1/256: a constant tensor feeding a MatMul             |
| tokenformer| MobileNet-style depthwise branches with Hardswish, | nn.MultiheadAttention over ONE token per modality     |
|            | one token per modality, a TransformerEncoderLayer  | (its softmax is exactly 1.0, a constant tensor), and  |
|            | over the two                                       | attention between two tokens                          |
| convnext   | a conv stem, then ConvNeXt blocks: depthwise 7x7,  | LayerNorm / GroupNorm, GELU, ConvNeXt's layer scale   |
|            | channels-last LayerNorm, inverted MLP, layer       | initialised at 1e-6 (tensors of ~1e-6 magnitudes)     |
|            | scale; GroupNorm before each downsampling          |                                                       |
| resnet_a   | CIFAR-style ResNet with option-A shortcuts (the    | all-zero channels in every widening shortcut; a       |
|            | skip zero-pads channels), SiLU, an ablated branch  | branch multiplied by a 0 buffer: a constant-zero      |
|            |                                                    | tensor                                                |
| frozenpool | attnpool with its attention head frozen at small   | a softmax over 256 tokens within ~1e-8 of 1/256, not  |
|            | pretrained weights (std 3e-4)                      | constant: the issue's "Too many bins" crash           |
| gatedmix   | EfficientNet-lite branches (SiLU, squeeze-excite), | a closed auxiliary gate, exp(-69) ~ 1e-30, so a       |
|            | a softmax gate over the two modalities             | tensor of ~1e-30 values is added back; a softmax over |
|            |                                                    | two modality tokens                                   |

Every model: `forward(white, fluo) -> logits (B, num_classes)`, a factory `make_<name>(num_classes=4)`, inputs
3 x 64 x 64 per modality (the spec from `spec_for(name)`), widths 8-32: small enough to train on a CPU in a
minute or two.

    python examples/zoo.py data --out D --pairs 600 --seed 3          # synthetic pairs, train/val/test column
    python examples/zoo.py train --model convnext --data D --out convnext.pt
    python examples/zoo.py spec --model convnext --out convnext.spec.json
    python examples/zoo.py export-onnx --model convnext --weights convnext.pt --out convnext.onnx
    python -m export --model examples/zoo.py:make_convnext --weights convnext.pt --spec convnext.spec.json --out B

EXPECTED is each model's forecast verdict, written before any of them was calibrated; benchmarks/zoo.py and
tests/test_zoo.py compare against it and report a difference as a finding, never by editing the forecast.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

IMG = 64  # every zoo model's input size, per modality (spec_for says the same)
MEANS = {"white_light": [0.485, 0.456, 0.406], "fluorescence": [0.5, 0.5, 0.5]}
STDS = {"white_light": [0.229, 0.224, 0.225], "fluorescence": [0.25, 0.25, 0.25]}
CLASSES = ["normal", "inflammation", "lsil", "hsil"]

# Forecast verdicts, each written before the first calibration of that model, for the range pass of f6aa800 (before
# it, at 6a26741, frozenpool's near-uniform softmax ends in the traceback, exit 1; attnpool's exactly constant
# one does not). "int8": INT8 ships (exit 0); "refused": the gate refuses (exit 3). Never edited after a result:
# a difference is a finding (benchmarks/zoo.py prints each one).
EXPECTED: dict[str, tuple[str, str]] = {
    "attnpool": ("int8", "conv stems quantize like any CNN; the constant 1/256 softmax quantizes exactly "
                         "(127 x scale), so the MatMul it feeds loses nothing"),
    "tokenformer": ("refused", "depthwise convs behind Hardswish with per-tensor activation scales are the classic "
                               "PTQ loss (MobileNet), and a float budget of 20 % cannot keep all of them float"),
    "convnext": ("int8", "LayerNorm/GroupNorm/GELU stay float; the convs and MLP MatMuls read normalised or GELU "
                         "activations with tame ranges; the 1e-6 layer scale is a float Mul after them"),
    "resnet_a": ("int8", "zero channels and the zero branch do not widen any per-tensor range; a plain "
                         "BN-folded ResNet is the easy case for PTQ"),
    "gatedmix": ("int8", "the ~1e-30 tensor is added to a normal-range one, so the Add's range is unchanged; "
                         "squeeze-excite gates are float Sigmoids"),
    # added after attnpool's full-size calibration was seen (97.70 % held-out agreement, refused), before any
    # calibration of this one: its backbone and pooling are attnpool's
    "frozenpool": ("refused", "attnpool's backbone and pooling, which lost 2.3 % agreement in INT8 at full size; the "
                              "near-uniform softmax itself should quantize to within one step of 1/256"),
}


# ----------------------------------------------------------------------------------------------------- attnpool
def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttnPool(nn.Module):
    """Two BN/ReLU stems to 16 x 16, the two maps concatenated per position (256 tokens), then multi-head
    attention pooling with a learned query. The query and the key projection are zero-initialised, a common
    "start as mean pooling" init: at q = 0, W_k = 0 every gradient of both is zero (dL/dq = sum_j dL/ds_j k_j with
    k_j all equal and sum_j dL/ds_j = 0; dL/dW_k is proportional to q), so training never moves them and the
    softmax over 256 tokens stays exactly 1/256: the untrained head of the issue, after training."""

    def __init__(self, num_classes: int = 4, width: int = 16, heads: int = 2):
        super().__init__()
        self.white = nn.Sequential(conv_bn_relu(3, width, 2), conv_bn_relu(width, 2 * width, 2),
                                   conv_bn_relu(2 * width, 2 * width, 1))
        self.fluo = nn.Sequential(conv_bn_relu(3, width, 2), conv_bn_relu(width, 2 * width, 2),
                                  conv_bn_relu(2 * width, 2 * width, 1))
        dim = 4 * width
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        nn.init.zeros_(self.key.weight)
        nn.init.zeros_(self.key.bias)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.white(white), self.fluo(fluo)], 1)  # (B, 4w, 16, 16)
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, 256, 4w)
        b, n, _ = tokens.shape
        k = self.key(tokens).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, h, n, d)
        v = self.value(tokens).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(self.query.unsqueeze(1), k.transpose(2, 3)) / math.sqrt(self.head_dim)  # (B, h, 1, n)
        attn = scores.softmax(-1)
        pooled = torch.matmul(attn, v).reshape(b, -1)  # (B, 4w)
        return self.head(pooled)


def make_attnpool(num_classes: int = 4) -> AttnPool:
    return AttnPool(num_classes)



class FrozenPool(AttnPool):
    """AttnPool whose attention head was ported from the team's pretrained video model and frozen (fine-tuning it
    on a few hundred pairs overfit): its query and key projection are small (std 3e-4) and do not train. On these
    features the head barely tells tokens apart: the softmax over 256 tokens is near-uniform, within ~1e-8 of
    1/256 but not constant, the issue's crash ("Too many bins for data range"), kept by a trained model."""

    def __init__(self, num_classes: int = 4, width: int = 16, heads: int = 2, prior_std: float = 3e-4):
        super().__init__(num_classes, width, heads)
        gen = torch.Generator().manual_seed(1234)  # the pretrained head: fixed whatever the training seed
        with torch.no_grad():
            self.query.copy_(prior_std * torch.randn(self.query.shape, generator=gen))
            self.key.weight.copy_(prior_std * torch.randn(self.key.weight.shape, generator=gen))
        self.query.requires_grad_(False)
        self.key.requires_grad_(False)


def make_frozenpool(num_classes: int = 4) -> FrozenPool:
    return FrozenPool(num_classes)

# -------------------------------------------------------------------------------------------------- tokenformer
def conv_bn_hs(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.Hardswish())


def mobile_branch(width: int) -> nn.Sequential:
    """MobileNet-style: a stem conv, then depthwise-separable pairs (depthwise 3x3, pointwise 1x1), Hardswish."""
    return nn.Sequential(conv_bn_hs(3, width, 3, 2),
                         conv_bn_hs(width, width, 3, 2, groups=width), conv_bn_hs(width, 2 * width, 1, 1),
                         conv_bn_hs(2 * width, 2 * width, 3, 2, groups=2 * width),
                         conv_bn_hs(2 * width, 4 * width, 1, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


class TokenFormer(nn.Module):
    """Each modality pooled to one token; each token refined by self-attention over itself (the team reused its
    video model's temporal attention with one frame: a softmax over one key is exactly 1.0 whatever the input);
    then a pre-norm TransformerEncoderLayer over the two modality tokens."""

    def __init__(self, num_classes: int = 4, width: int = 16, heads: int = 2):
        super().__init__()
        dim = 4 * width
        self.white, self.fluo = mobile_branch(width), mobile_branch(width)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mix = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, activation="gelu",
                                              batch_first=True, norm_first=True)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> torch.Tensor:
        tokens = []
        for branch, x in ((self.white, white), (self.fluo, fluo)):
            t = branch(x).unsqueeze(1)  # (B, 1, dim): one token
            tokens.append(t + self.self_attn(t, t, t, need_weights=False)[0])
        mixed = self.mix(torch.cat(tokens, 1))  # (B, 2, dim)
        return self.head(mixed.flatten(1))


def make_tokenformer(num_classes: int = 4) -> TokenFormer:
    return TokenFormer(num_classes)


# ----------------------------------------------------------------------------------------------------- convnext
class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm written the usual way: permute to channels-last and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """depthwise 7x7 -> channels-last LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale (1e-6) -> residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def convnext_branch(width: int) -> nn.Sequential:
    # a convolutional stem (Xiao et al., "Early convolutions help transformers see better"): ConvNeXt's 4x4
    # patchify stem did not learn at this size (val at chance after 30 epochs on 480 pairs)
    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.GELU(), nn.Conv2d(width, width, 3, 2, 1),
                         LayerNorm2d(width, eps=1e-6),  # 16 x 16
                         ConvNeXtBlock(width),
                         nn.GroupNorm(4, width), nn.Conv2d(width, 2 * width, 2, stride=2),  # downsample: 8 x 8
                         ConvNeXtBlock(2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(2 * width, eps=1e-6))


class ConvNeXtDual(nn.Module):
    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.white, self.fluo = convnext_branch(width), convnext_branch(width)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.white(white), self.fluo(fluo)], 1))


def make_convnext(num_classes: int = 4) -> ConvNeXtDual:
    return ConvNeXtDual(num_classes)


# ----------------------------------------------------------------------------------------------------- resnet_a
class BasicBlockA(nn.Module):
    """He et al.'s CIFAR ResNet block with the option-A shortcut: a stride-2 subsample and zero-padded channels,
    so the skip's widened half is all zeros."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            skip = nn.functional.pad(skip, (0, 0, 0, 0, 0, self.pad))  # option A: zero channels
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + skip)


def resnet_branch(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
                         BasicBlockA(width, width, 1), BasicBlockA(width, 2 * width, 2),
                         BasicBlockA(2 * width, 2 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ResNetA(nn.Module):
    """Two option-A ResNet branches and a third, ablated one: the team's fluorescence-contrast branch (the ratio
    image's texture) was switched off by a 0 in a buffer so that old checkpoints still load; it still runs, and its
    output is a constant-zero tensor."""

    def __init__(self, num_classes: int = 4, width: int = 16, use_contrast: bool = False):
        super().__init__()
        self.white, self.fluo = resnet_branch(width), resnet_branch(width)
        self.contrast = nn.Sequential(nn.Conv2d(3, width, 3, 4, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(width, 4 * width))
        self.register_buffer("contrast_on", torch.tensor(float(use_contrast)))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([self.white(white), self.fluo(fluo)], 1)
        feats = feats + self.contrast_on * self.contrast(fluo - white)
        return self.head(feats)


def make_resnet_a(num_classes: int = 4) -> ResNetA:
    return ResNetA(num_classes)


# ----------------------------------------------------------------------------------------------------- gatedmix
class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, reduced: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(dim, reduced, 1), nn.Conv2d(reduced, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet's inverted bottleneck: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1 (SiLU)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU(),
                                   nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                   nn.SiLU(), SqueezeExcite(mid, max(4, cin // 4)),
                                   nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


def efficient_branch(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
                         MBConv(width, 2 * width, 2, expand=2), MBConv(2 * width, 2 * width, 1, expand=2),
                         MBConv(2 * width, 2 * width, 2, expand=2),
                         nn.Conv2d(2 * width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


class GatedMix(nn.Module):
    """Two EfficientNet-lite branches weighted by a softmax over the two modalities (a gate from both features),
    plus an auxiliary cross-modal branch behind a gate the team initialised closed, parameterised in log space as
    CLIP's logit_scale is (exp(-69) ~ 1e-30: "let the model open it when it helps"). Its gradient is ~1e-30, whose
    square underflows in AdamW's second moment, so it never opens: a tensor of ~1e-30 values is added back to the
    fused features. (A sigmoid gate at -69 would not do: ONNX Runtime's Sigmoid gives exactly 0 there, PyTorch
    1e-30, so the exported graph would hold a zero tensor instead.)"""

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        dim = 4 * width
        self.white, self.fluo = efficient_branch(width), efficient_branch(width)
        self.gate = nn.Linear(2 * dim, 2)
        self.aux = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU())
        self.aux_log_gate = nn.Parameter(torch.tensor(-69.0))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_classes))

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> torch.Tensor:
        a, b = self.white(white), self.fluo(fluo)
        both = torch.cat([a, b], 1)
        w = self.gate(both).softmax(-1)  # (B, 2): attention over the two modality tokens
        fused = w[:, :1] * a + w[:, 1:] * b
        fused = fused + self.aux_log_gate.exp() * self.aux(both)
        return self.head(fused)


def make_gatedmix(num_classes: int = 4) -> GatedMix:
    return GatedMix(num_classes)


FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "attnpool": make_attnpool, "tokenformer": make_tokenformer, "convnext": make_convnext,
    "resnet_a": make_resnet_a, "gatedmix": make_gatedmix, "frozenpool": make_frozenpool}
assert sorted(FACTORIES) == sorted(EXPECTED)


# ------------------------------------------------------------------------------------------------------- specs
def spec_for(name: str) -> dict:
    """The edge-pfm model spec of a zoo model (export/model_spec.py's format): 64 x 64 RGB inputs."""
    if name not in FACTORIES:
        raise SystemExit(f"unknown zoo model {name!r}; the zoo has {sorted(FACTORIES)}")
    inputs = {m: {"name": n, "channels": 3, "size": [IMG, IMG], "mean": MEANS[m], "std": STDS[m]}
              for m, n in (("white_light", "white"), ("fluorescence", "fluo"))}
    return {"spec": "edge-pfm/model-spec v1", "family": f"zoo-{name}", "classes": CLASSES,
            "roles": {"no_lesion": "normal", "lesion": ["lsil", "hsil"], "critical": ["hsil"]},
            "model_args": {"num_classes": len(CLASSES)}, "inputs": inputs,
            "outputs": {"logits": "logits", "lesion_map": None}}


def write_spec(name: str, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec_for(name), indent=1) + "\n")
    return out


# -------------------------------------------------------------------------------------------------------- data
def write_split_column(root: str | Path, val_fraction: float = 0.15, test_fraction: float = 0.15,
                       seed: int = 0) -> dict[str, int]:
    """Add a split column (train/val/test, stratified by label, deterministic in seed) to a dataset's labels.csv,
    as a team records its split once rather than re-drawing it per run. Every class gets at least one val and one
    test pair (edge-pfm's calibration reads a split column as train/val/test and refuses a class missing from
    one). -> pairs per split."""
    import random

    path = Path(root) / "labels.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    rng = random.Random(seed)
    for group in by_label.values():
        rng.shuffle(group)
        n_val, n_test = (max(1, round(x * len(group))) for x in (val_fraction, test_fraction))
        if n_val + n_test >= len(group):
            raise SystemExit(f"{len(group)} pairs of class {group[0]['label']!r} cannot fill train, val and test")
        for i, r in enumerate(group):
            r["split"] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sample", "label", "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}


def write_data(out: str | Path, pairs: int, seed: int, size: tuple[int, int] = (320, 240),
               split: bool = True) -> Path:
    """Synthetic pairs (edge_pfm.synthetic) in the paired layout; with split, a 70/15/15 train/val/test split
    column (write_dataset writes none)."""
    from edge_pfm.synthetic import write_dataset

    root = write_dataset(out, pairs, seed=seed, size=size)
    if split:
        write_split_column(root, seed=seed)
    return root


def load_tensors(data: str | Path, spec: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every pair of a dataset, preprocessed exactly as the device will (edge_pfm.preprocess with the spec's
    settings: the team declared their pipeline in the spec, so training on it avoids a conformance gap).
    -> {split: (white, fluo, labels)}; a dataset without a split column is all "train"."""
    import numpy as np

    from edge_pfm.dataset import PairedDataset
    from edge_pfm.preprocess import PreprocessSpec, preprocess

    pre = {m: PreprocessSpec(size=tuple(i["size"]), channels=i["channels"], mean=tuple(i["mean"]),
                             std=tuple(i["std"])) for m, i in spec["inputs"].items()}
    ds = PairedDataset(data, classes=tuple(spec["classes"]))
    if not ds.labelled:
        raise SystemExit(f"{data}: training needs labels for every pair")
    out: dict[str, list] = {}
    for i, s in enumerate(ds.samples):
        wl, fl, label = ds.load(i)
        w, f, y = out.setdefault(s.split or "train", ([], [], []))
        w.append(preprocess(wl, pre["white_light"]))
        f.append(preprocess(fl, pre["fluorescence"]))
        y.append(label)
    return {k: (torch.from_numpy(np.stack(w)), torch.from_numpy(np.stack(f)), torch.tensor(y))
            for k, (w, f, y) in out.items()}


# ----------------------------------------------------------------------------------------------------- trainer
def train(name: str, data: str | Path, out: str | Path, epochs: int = 40, seed: int = 0, lr: float = 3e-3,
          batch: int = 32, patience: int = 12, weight_decay: float = 0.05, threads: int | None = 1,
          log: bool = True) -> dict:
    """A careful team's trainer: trains on split == train, picks the checkpoint on split == val (best val accuracy,
    ties to the lower val loss), AdamW with a linear warmup then cosine decay per step, early stopping after
    `patience` epochs without a better val, random horizontal flips applied to both frames alike. Saves
    {'state_dict', 'epoch', 'val_accuracy', 'val_loss', 'model'} with torch.save. -> the best epoch's figures.
    `threads` (default 1): these models are small enough that intra-op threads on a shared 2-core machine cost
    more in contention than they give (measured 5-10x slower per step with the default thread count there)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    splits = load_tensors(data, spec_for(name))
    if "val" not in splits or "train" not in splits:
        raise SystemExit(f"{data}: needs a split column with train and val rows (write_split_column adds one); "
                         "a val drawn from the training pairs would choose the checkpoint on what it trained on")
    (w, f, y), (vw, vf, vy) = splits["train"], splits["val"]
    model = FACTORIES[name](len(CLASSES))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # norms, biases, gates, layer scales
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay,
                                                                             "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(y) / batch)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total))))
    best: dict = {"val_accuracy": -1.0, "val_loss": math.inf, "epoch": 0}
    best_state = None
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            if len(idx) < 2:  # BatchNorm needs two
                continue
            bw, bf = w[idx], f[idx]
            flip = torch.rand(len(idx)) < 0.5
            bw[flip], bf[flip] = bw[flip].flip(-1), bf[flip].flip(-1)
            loss = nn.functional.cross_entropy(model(bw, bf), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            logits = model(vw, vf)
            acc = float((logits.argmax(1) == vy).float().mean())
            vloss = float(nn.functional.cross_entropy(logits, vy))
        better = acc > best["val_accuracy"] or (acc == best["val_accuracy"] and vloss < best["val_loss"])
        if better:
            best = {"val_accuracy": acc, "val_loss": vloss, "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if log:
            print(f"{name} epoch {epoch}/{epochs}  val accuracy {acc:.3f}  loss {vloss:.3f}"
                  + ("  *" if better else ""), file=sys.stderr)
        if epoch - best["epoch"] >= patience:
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": best_state, "model": name, **best, "train_pairs": len(y), "val_pairs": len(vy)}, out)
    return {**best, "train_pairs": len(y), "val_pairs": len(vy), "epochs_run": epoch}


# -------------------------------------------------------------------------------------------- their own export
def load_model(name: str, weights: str | Path) -> nn.Module:
    model = FACTORIES[name](len(CLASSES))
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    return model.eval()


def export_onnx(name: str, weights: str | Path, out: str | Path) -> Path:
    """The team's own deployment export, no edge-pfm: the legacy torch.onnx.export at opset 17 with a dynamic
    batch, the fused attention fast path off first (pytorch#94434: eval-mode MultiheadAttention otherwise exports
    an op ONNX has none of)."""
    model = load_model(name, weights)
    x = (torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, IMG, IMG))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(model, x, str(out), dynamo=False, opset_version=17, input_names=["white", "fluo"],
                              output_names=["logits"], dynamic_axes={k: {0: "N"} for k in ("white", "fluo",
                                                                                            "logits")})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write synthetic pairs with a train/val/test split column")
    d.add_argument("--out", required=True)
    d.add_argument("--pairs", type=int, required=True)
    d.add_argument("--seed", type=int, required=True)
    d.add_argument("--no-split", action="store_true", help="no split column (a held-out set)")
    t = sub.add_parser("train", help="train a zoo model on a dataset with a split column")
    t.add_argument("--model", choices=sorted(FACTORIES), required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("spec", help="write a zoo model's spec JSON")
    s.add_argument("--model", choices=sorted(FACTORIES), required=True)
    s.add_argument("--out", required=True)
    e = sub.add_parser("export-onnx", help="their own plain torch.onnx.export (legacy, opset 17, dynamic batch)")
    e.add_argument("--model", choices=sorted(FACTORIES), required=True)
    e.add_argument("--weights", required=True)
    e.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.command == "data":
        print(f"wrote {write_data(a.out, a.pairs, a.seed, split=not a.no_split)}")
    elif a.command == "train":
        r = train(a.model, a.data, a.out, a.epochs, a.seed)
        print(f"{a.model}: best val accuracy {r['val_accuracy']:.3f} at epoch {r['epoch']} "
              f"({r['train_pairs']} train / {r['val_pairs']} val pairs); wrote {a.out}")
    elif a.command == "spec":
        print(f"wrote {write_spec(a.model, a.out)}")
    else:
        print(f"wrote {export_onnx(a.model, a.weights, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
