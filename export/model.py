"""PFM (PConvFusionModel): dual-source white-light + fluorescence classifier.

Reconstructed from the preprint's abstract (Research Square, doi:10.21203/rs.3.rs-6642645/v1):
per source a PConv (FasterNet, Chen et al. CVPR 2023) feature extractor, channel + spatial
attention (CBAM, Woo et al. ECCV 2018), concatenation of the two enhanced maps, multi-head
self-attention, classifier. Widths and depths are ours (see shared/research/model_and_style.md).

Export-aware by construction:
- PConv is split + concat (in-place slice assignment exports as ScatterND);
- attention pools with mean/amax (ReduceMean/ReduceMax, no size-dependent kernels);
- self-attention is explicit (nn.MultiheadAttention's inference fast path does not export);
- LayerNorm exports as one LayerNormalization node at opset >= 17.

    model = create_model("pfm_tiny", num_classes=4)
    logits = model(white_light, fluorescence)   # (B, C_w, H, W), (B, C_f, H, W) -> (B, num_classes)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_pfm.bundle import MODALITIES

__all__ = ["PFM", "PFMConfig", "create_model", "list_models", "register_model", "count_flops"]

_ACTS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": lambda: nn.ReLU(inplace=True)}


@dataclass(frozen=True)
class PFMConfig:
    width: int = 40
    depths: tuple[int, ...] = (1, 2, 8, 2)
    n_div: int = 4
    mlp_ratio: float = 2.0
    attn_reduction: int = 16
    fusion_dim: int = 256
    num_heads: int = 8
    block_mlp_ratio: float = 2.0
    num_classes: int = 4
    img_size: int = 224
    in_chans: dict[str, int] = field(default_factory=lambda: {"white_light": 3, "fluorescence": 3})
    single_source: str | None = None  # None (fusion) | "white_light" | "fluorescence" (ablations)
    act: str = "gelu"
    # a second output, lesion_map: per-pixel lesion probability at stride 8 (16x16 at 128 px). False in
    # checkpoints from before it existed (their config lacks the key), so they load and export as they were
    lesion_map: bool = False
    decoder_width: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        stride = 4 * 2 ** (len(self.depths) - 1)
        if self.img_size % stride:
            raise ValueError(f"img_size {self.img_size} must be a multiple of the total stride {stride}")
        if self.single_source not in (None, *MODALITIES):
            raise ValueError(f"single_source must be None or one of {MODALITIES}, got {self.single_source!r}")
        if self.lesion_map and len(self.depths) < 3:
            raise ValueError("the lesion map needs >= 3 stages (it reads stride-8 features and upsamples stride 32)")
        if self.fusion_dim % self.num_heads:
            raise ValueError(f"fusion_dim {self.fusion_dim} is not divisible by num_heads {self.num_heads}")
        if self.act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {self.act!r}")
        if set(self.in_chans) != set(MODALITIES) or any(c not in (1, 3) for c in self.in_chans.values()):
            raise ValueError(f"in_chans must map {MODALITIES} to 1 or 3, got {self.in_chans}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depths"] = list(self.depths)
        return d

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.single_source,) if self.single_source else MODALITIES


def _conv_bn(cin: int, cout: int, k: int, s: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, padding=(k - s + 1) // 2 if s == 1 else 0, bias=False),
                         nn.BatchNorm2d(cout))


class PartialConv3(nn.Module):
    """3x3 conv on the first dim/n_div channels, the rest untouched (split + concat)."""

    def __init__(self, dim: int, n_div: int):
        super().__init__()
        self.dim_conv = dim // n_div
        self.dim_untouched = dim - self.dim_conv
        self.conv = nn.Conv2d(self.dim_conv, self.dim_conv, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return torch.cat((self.conv(x1), x2), dim=1)


class FasterNetBlock(nn.Module):
    """x + Conv1x1(2d->d)(act(BN(Conv1x1(d->2d)(PConv(x)))))"""

    def __init__(self, dim: int, n_div: int, mlp_ratio: float, act: str):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.pconv = PartialConv3(dim, n_div)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), _ACTS[act](),
                                 nn.Conv2d(hidden, dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.pconv(x))


class ChannelAttention(nn.Module):
    """CBAM channel gate, timm form: shared 1x1-conv MLP over mean- and max-pooled descriptors."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = max(4, dim // reduction)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._mlp(x.mean((2, 3), keepdim=True)) + self._mlp(x.amax((2, 3), keepdim=True))
        return x * gate.sigmoid()


class SpatialAttention(nn.Module):
    """CBAM spatial gate: channel mean and max -> 7x7 conv + BN -> sigmoid."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = _conv_bn(2, 1, kernel_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), dim=1)
        return x * self.conv(pooled).sigmoid()


class PConvBranch(nn.Module):
    """One source's feature extractor: FasterNet trunk + channel then spatial attention."""

    def __init__(self, in_chans: int, cfg: PFMConfig):
        super().__init__()
        self.stem = _conv_bn(in_chans, cfg.width, 4, 4)
        stages: list[nn.Module] = []
        dim = cfg.width
        for i, depth in enumerate(cfg.depths):
            if i > 0:
                stages.append(_conv_bn(dim, dim * 2, 2, 2))
                dim *= 2
            stages.extend(FasterNetBlock(dim, cfg.n_div, cfg.mlp_ratio, cfg.act) for _ in range(depth))
        self.stages = nn.Sequential(*stages)
        self.channel_attn = ChannelAttention(dim, cfg.attn_reduction)
        self.spatial_attn = SpatialAttention()
        self.out_dim = dim

        # the stride-8 features (end of the second stage) feed the lesion decoder's skip connection
        self.skip_index = cfg.depths[0] + cfg.depths[1] + 1 if len(cfg.depths) > 1 else cfg.depths[0]
        self.skip_dim = cfg.width * 2 if len(cfg.depths) > 1 else cfg.width

    def forward_with_skip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        skip = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i + 1 == self.skip_index:
                skip = x
        return self.spatial_attn(self.channel_attn(x)), skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_skip(x)[0]


class LesionDecoder(nn.Module):
    """FCN-style head: the fused, attended features (stride 32) upsampled to stride 8 and joined with each
    branch's stride-8 features -> one lesion logit per cell."""

    def __init__(self, fusion_dim: int, skip_dim: int, width: int, act: str, scale: int):
        super().__init__()
        self.scale = float(scale)  # a Python constant: the ONNX Resize gets static scales, every shape stays static
        self.reduce = nn.Sequential(*_conv_bn(fusion_dim, width, 1, 1), _ACTS[act]())
        self.skip = nn.Sequential(*_conv_bn(skip_dim, width, 1, 1), _ACTS[act]())
        self.mix = nn.Sequential(*_conv_bn(width, width, 3, 1), _ACTS[act]())
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, fused: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = F.interpolate(self.reduce(fused), scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.out(self.mix(x + self.skip(torch.cat(skips, dim=1))))


class SelfAttention(nn.Module):
    """Explicit multi-head self-attention: qkv linear, softmax(q k^T * scale) v, projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), _ACTS[act](), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PFM(nn.Module):
    """PConvFusionModel. forward(white_light, fluorescence) -> logits; forward_multitask also gives the lesion
    map's logits when the config has the head (cfg.lesion_map).

    With cfg.single_source set only that branch exists and the other input is ignored, so
    ablations keep the same call signature.
    """

    def __init__(self, cfg: PFMConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.branches = nn.ModuleDict({m: PConvBranch(cfg.in_chans[m], cfg) for m in cfg.modalities})
        branch_dim = next(iter(self.branches.values())).out_dim
        self.fuse = nn.Sequential(*_conv_bn(branch_dim * len(cfg.modalities), cfg.fusion_dim, 1, 1),
                                  _ACTS[cfg.act]())
        grid = cfg.img_size // (4 * 2 ** (len(cfg.depths) - 1))
        self.num_tokens = grid * grid
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.fusion_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.block = TransformerBlock(cfg.fusion_dim, cfg.num_heads, cfg.block_mlp_ratio, cfg.act)
        self.norm = nn.LayerNorm(cfg.fusion_dim)
        self.head = nn.Linear(cfg.fusion_dim, cfg.num_classes)
        self.grid = grid
        branch = next(iter(self.branches.values()))
        self.lesion_decoder = (LesionDecoder(cfg.fusion_dim, branch.skip_dim * len(cfg.modalities), cfg.decoder_width,
                                             cfg.act, (cfg.img_size // 8) // grid) if cfg.lesion_map else None)

    def _features_and_skips(self, white_light: torch.Tensor, fluorescence: torch.Tensor):
        inputs = {"white_light": white_light, "fluorescence": fluorescence}
        outs = [self.branches[m].forward_with_skip(inputs[m]) for m in self.cfg.modalities]
        maps = [o[0] for o in outs]
        x = self.fuse(torch.cat(maps, dim=1) if len(maps) > 1 else maps[0])
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, tokens, D)
        return self.block(x), [o[1] for o in outs]

    def forward_features(self, white_light: torch.Tensor, fluorescence: torch.Tensor) -> torch.Tensor:
        return self._features_and_skips(white_light, fluorescence)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward_multitask(self, white_light: torch.Tensor,
                          fluorescence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (class logits, lesion-map logits (B, 1, H/8, W/8) or None without the head). Goes through
        __call__, so module hooks (QAT's observers) see it like any forward pass."""
        return self(white_light, fluorescence, with_lesion=True)

    def forward(self, white_light: torch.Tensor, fluorescence: torch.Tensor, with_lesion: bool = False):
        tokens, skips = self._features_and_skips(white_light, fluorescence)
        logits = self.forward_head(tokens)
        if not with_lesion:
            return logits
        if self.lesion_decoder is None:
            return logits, None
        # a constant target shape (batch -1): the exported Reshape needs no Shape op and every dim stays static
        fused = tokens.transpose(1, 2).reshape(-1, self.cfg.fusion_dim, self.grid, self.grid)
        return logits, self.lesion_decoder(fused, skips)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.cfg = replace(self.cfg, num_classes=num_classes)
        self.head = nn.Linear(self.cfg.fusion_dim, num_classes)


_REGISTRY: dict[str, dict[str, Any]] = {}
_DATA_CONFIG: dict[str, dict[str, Any]] = {}
# the classes our variants are trained for, in logit order (a team's own model brings its own in its spec)
DEFAULT_CLASSES: tuple[str, ...] = ("normal", "inflammation", "lsil", "hsil")


def register_model(name: str, classes: tuple[str, ...] = DEFAULT_CLASSES, **variant_args: Any) -> None:
    """Register a variant: its PFMConfig fields, and its data config (the class names it is trained for)."""
    _REGISTRY[name] = variant_args
    _DATA_CONFIG[name] = {"classes": tuple(classes)}


def variant_classes(variant: str) -> tuple[str, ...]:
    if variant not in _DATA_CONFIG:
        raise ValueError(f"unknown PFM variant {variant!r}; known variants: {', '.join(list_models())}")
    return _DATA_CONFIG[variant]["classes"]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def variant_config(variant: str, num_classes: int = 4, **overrides: Any) -> PFMConfig:
    if variant not in _REGISTRY:
        raise ValueError(f"unknown PFM variant {variant!r}; known variants: {', '.join(list_models())}")
    args = {**_REGISTRY[variant], "num_classes": num_classes, **overrides}
    return PFMConfig(**args)


def create_model(variant: str, num_classes: int = 4, **overrides: Any) -> PFM:
    """Build a registered variant; overrides are PFMConfig fields (img_size, in_chans, single_source, ...)."""
    return PFM(variant_config(variant, num_classes, **overrides))


# ~1.4 GFLOPs (2 x MACs) for two 224x224 inputs, 5.2 M parameters; lesion map 28x28
register_model("pfm_t0", width=40, depths=(1, 2, 8, 2), fusion_dim=256, num_heads=8, img_size=224, lesion_map=True,
               decoder_width=64)
# trains on a 2-core CPU in minutes; 128x128 inputs, 4x4 tokens; lesion map 16x16
register_model("pfm_tiny", width=16, depths=(1, 1, 2, 1), fusion_dim=64, num_heads=4, img_size=128,
               attn_reduction=4, lesion_map=True, decoder_width=32)


def count_flops(model: PFM, batch: int = 1) -> int:
    """FLOPs of one forward pass, counted as 2 x multiply-accumulates (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    s = model.cfg.img_size
    args = [torch.zeros(batch, model.cfg.in_chans[m], s, s) for m in MODALITIES]
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    model.train(was_training)
    return int(counter.get_total_flops())
