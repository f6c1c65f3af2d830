"""PFM checkpoints: a tagged dict, saved atomically, loaded with torch.load(weights_only=True)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from edge_pfm.bundle import MODALITIES
from edge_pfm.errors import EdgePfmError
from edge_pfm.fileio import atomic_write_bytes, sha256_file
from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.roles import ClassRoles
from export.model import PFM, PFMConfig, list_models

FORMAT_TAG = "edge-pfm/checkpoint/v1"


class CheckpointError(EdgePfmError, ValueError):
    """A checkpoint cannot be used; the message names the file and the fix."""


def library_versions(modules: tuple[str, ...] = ("torch", "numpy")) -> dict[str, str]:
    """{module: version} of the libraries a checkpoint or bundle was made with, plus python (as strings: a
    torch.TorchVersion would not load back under weights_only)."""
    import importlib
    import platform

    return {m: str(importlib.import_module(m).__version__) for m in modules} | {"python": platform.python_version()}


def save_checkpoint(path: str | os.PathLike, model: PFM, variant: str, classes: tuple[str, ...],
                    preprocessing: dict[str, PreprocessSpec], extra: dict[str, Any] | None = None,
                    roles: ClassRoles | None = None) -> Path:
    """roles: what each class means (edge_pfm.roles; default: ours, by class name)."""
    ckpt = {
        "format": FORMAT_TAG,
        "variant": variant,
        "config": model.cfg.to_dict(),
        "classes": list(classes),
        "roles": (roles or ClassRoles.default_for(classes)).to_dict(),
        "preprocessing": {m: spec.to_dict() for m, spec in preprocessing.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> tuple[PFM, dict[str, Any]]:
    """-> (model in eval mode, metadata: variant, classes, preprocessing specs, config, sha256)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with "
                              "`python -m export.train --synthetic 1200 --out CKPT` or pass the right path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refused by weights_only, zip corrupt, not a torch file ...
        raise CheckpointError(
            f"{path} is not a loadable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Only plain tensors and containers load (torch.load weights_only=True); re-save it with "
            "export.checkpoint.save_checkpoint"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_TAG:
        tag = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} has format tag {tag!r}, expected {FORMAT_TAG!r}: it was not written by "
                              "edge-pfm's trainer; wrap your state_dict with export.checkpoint.save_checkpoint")
    missing_fields = [k for k in ("variant", "config", "classes", "preprocessing", "state_dict") if k not in ckpt]
    if missing_fields:
        raise CheckpointError(f"{path} lacks fields {missing_fields}; re-save it with save_checkpoint")
    if ckpt["variant"] not in list_models():
        raise CheckpointError(f"{path}: unknown variant {ckpt['variant']!r}; known: {', '.join(list_models())}")
    try:
        cfg = PFMConfig(**{**ckpt["config"], "depths": tuple(ckpt["config"]["depths"])})
        preprocessing = {m: PreprocessSpec.from_dict(ckpt["preprocessing"][m]) for m in MODALITIES}
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid config or preprocessing ({exc})") from exc
    try:  # checkpoints from before roles were recorded get ours, by class name
        roles = (ClassRoles.from_dict(ckpt["roles"], ckpt["classes"], f"{path}: roles") if "roles" in ckpt
                 else ClassRoles.default_for(ckpt["classes"]))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if len(ckpt["classes"]) != cfg.num_classes:
        raise CheckpointError(f"{path}: {len(ckpt['classes'])} class names but num_classes={cfg.num_classes}")
    model = PFM(cfg)
    expected = model.state_dict()
    state = ckpt["state_dict"]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched)}")
        raise CheckpointError(f"{path} does not match variant {ckpt['variant']!r}: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)
    model.eval()
    meta = {
        "variant": ckpt["variant"],
        "classes": tuple(ckpt["classes"]),
        "roles": roles,
        "preprocessing": preprocessing,
        "config": cfg.to_dict(),
        "extra": ckpt.get("extra", {}),
        "sha256": sha256_file(path),
        "path": str(path),
    }
    return model, meta
