"""Write a bundle's per-precision references (edge_pfm.references): scene pairs, each precision's ONNX Runtime CPU
outputs on them, and the tolerance an engine of that precision is held to on the device. No torch.

The tolerance is measured, not guessed. An engine may differ from ONNX Runtime's run of the same model only by how
it computes, never by what: TensorRT's FP32 runs convolutions in TF32 (FP16's 10-bit mantissa) on Ampere and Orin,
its FP16 rounds and accumulates its own way, and its INT8 rounds requantization its own way and runs the layers left
float in FP16. So each precision's basis is measured here, on the reference pairs themselves:
- `rounding`: the FP16-typed model against FP32 (what FP16-level rounding does to this model; export converts a
  copy to measure it, calibration ships it as model.fp16.onnx);
- `kernel_spread`: the same model on ONNX Runtime with its graph optimisations off against on (for INT8: float
  kernels on dequantized values against fused integer ones, i.e. what other kernels for the same model do).
Each figure (top-1 disagreements, logit RMSE, the largest probability difference, the map IoU's loss) may be
TOLERANCE_FACTOR times what rounding and the kernel spread show together, with floors (two disagreements at least:
a near-tie pair flips under any rounding). A fault that moves the model well past its own FP16 rounding and kernel
noise is refused; one smaller than that cannot be told from a correct engine by any reference check.
"""
from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from edge_pfm.bundle import MODALITIES, MODEL_ARTIFACTS
from edge_pfm.fileio import atomic_write_bytes
from edge_pfm.preprocess import PreprocessSpec, model_pixels
from edge_pfm.references import INPUTS_ARTIFACT, MIN_PAIRS, Figures, Tolerance, compare, outputs_artifact, run_pairs

TOLERANCE_FACTOR = 3.0
# floors: a model whose FP16 rounding happens to be tiny still gets room for accumulation order and fused kernels
FLOORS = {"max_logit_rmse": 1e-3, "max_prob_diff": 2e-3, "disagreements": 2, "map_iou_loss": 0.01}
SCENE_SIZE = (320, 240)  # synthetic reference scenes (export): small and fast, larger than every registered input


def scene_pixels(specs: dict[str, PreprocessSpec], n: int = MIN_PAIRS, seed: int = 4242
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` synthetic scene pairs as model pixels (export: before a team's own images are known)."""
    from edge_pfm.synthetic import SCENES, render_pair

    rng = np.random.default_rng(seed)
    size = (max(SCENE_SIZE[0], *(s.size[1] for s in specs.values())), max(SCENE_SIZE[1], *(s.size[0] for s in specs.values())))
    out = []
    for i in range(n):
        s = render_pair(SCENES[i % len(SCENES)], int(rng.integers(2**31)), size)
        out.append((model_pixels(s.white_light, specs["white_light"])[0],
                    model_pixels(s.fluorescence, specs["fluorescence"])[0]))
    return out


def frames_to_pixels(pairs: Iterable, specs: dict[str, PreprocessSpec], n: int = MIN_PAIRS
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `n` camera-frame pairs (white BGR, fluorescence BGR, ...) as model pixels."""
    out = []
    for pair in pairs:
        out.append((model_pixels(pair[0], specs["white_light"])[0], model_pixels(pair[1], specs["fluorescence"])[0]))
        if len(out) == n:
            break
    return out


def _session(model: Path | bytes, optimised: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimised:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_model(model: Path | bytes, pixels: dict[str, np.ndarray], specs: dict[str, PreprocessSpec],
              names: dict[str, str], optimised: bool = True) -> dict[str, np.ndarray]:
    """ONNX Runtime CPU outputs of every reference pair, at batch 1 (as the runtime runs it)."""
    sess = _session(model, optimised)
    outs = [o.name for o in sess.get_outputs()]
    return run_pairs(lambda w, f: dict(zip(outs, sess.run(outs, {names["white_light"]: w, names["fluorescence"]: f}))),
                     pixels, specs)


def tolerance_for(rounding: Figures, kernels: Figures) -> Tolerance:
    """The tolerance from the basis (module docstring)."""
    k = TOLERANCE_FACTOR
    max_dp = min(1.0, max(FLOORS["max_prob_diff"], k * (rounding.max_prob_diff + kernels.max_prob_diff)))
    allowed = max(FLOORS["disagreements"], math.ceil(k * (rounding.disagreements + kernels.disagreements)))
    iou = None
    if rounding.map_iou is not None:
        loss = (1 - rounding.map_iou) + (1 - (kernels.map_iou if kernels.map_iou is not None else 1.0))
        iou = round(max(0.0, 1 - max(FLOORS["map_iou_loss"], k * loss)), 4)
    return Tolerance(min_top1_agreement=round(1 - allowed / rounding.pairs, 6), max_prob_diff=round(max_dp, 6),
                     max_logit_rmse=round(max(FLOORS["max_logit_rmse"], k * (rounding.logit_rmse + kernels.logit_rmse)),
                                          6),
                     min_map_iou=iou)


def write_references(root: Path, specs: dict[str, PreprocessSpec], names: dict[str, str],
                     pixel_pairs: list[tuple[np.ndarray, np.ndarray]], precisions: Iterable[str], source: str,
                     log: Callable[[str], None] = lambda m: None) -> tuple[dict, dict[str, str]]:
    """Write reference.inputs.npz and reference.<precision>.npz for the models in `root` (a bundle being written,
    whose inputs `specs` and `names` describe). -> (the manifest's `references` entry, artifact roles for
    write_manifest)."""
    pixels = {m: np.stack([p[k] for p in pixel_pairs]) for k, m in enumerate(MODALITIES)}
    n = len(pixel_pairs)
    _save_npz(root / INPUTS_ARTIFACT, pixels)
    roles = {INPUTS_ARTIFACT: f"reference inputs: {n} pairs of uint8 model pixels ({source})"}
    outputs = {p: run_model(root / MODEL_ARTIFACTS[p], pixels, specs, names) for p in precisions}
    if "fp16" in outputs:
        rounding, basis = compare(outputs["fp32"], outputs["fp16"]), "model.fp16.onnx against model.onnx"
    else:  # export: a copy converted to FP16 only to measure what FP16-level rounding does to this model
        from export.fp16 import fp16_model

        half = fp16_model(root / MODEL_ARTIFACTS["fp32"]).SerializeToString()
        rounding = compare(outputs["fp32"], run_model(half, pixels, specs, names))
        basis = "model.onnx converted to FP16 (not shipped) against model.onnx"
    entry: dict = {"pairs": n, "source": source, "inputs": INPUTS_ARTIFACT, "factor": TOLERANCE_FACTOR,
                   "rounding_basis": basis, "rounding": rounding.to_dict(), "precisions": {}}
    for p, out in outputs.items():
        kernels = compare(out, run_model(root / MODEL_ARTIFACTS[p], pixels, specs, names, optimised=False))
        tol = tolerance_for(rounding, kernels)
        _save_npz(root / outputs_artifact(p), out)
        roles[outputs_artifact(p)] = f"{p} reference outputs (ONNX Runtime CPU)"
        entry["precisions"][p] = {"outputs": outputs_artifact(p), "model": MODEL_ARTIFACTS[p], "kernel_spread": kernels.to_dict(),
                                  "tolerance": tol.to_dict()}
        log(f"      reference {p}: {n} pairs; kernel spread {kernels.describe()}; tolerance top-1 >= "
            f"{tol.min_top1_agreement:.2%}, max |dp| {tol.max_prob_diff:.4f}, logit RMSE {tol.max_logit_rmse:.4f}"
            + (f", map IoU >= {tol.min_map_iou:.3f}" if tol.min_map_iou is not None else ""))
    return entry, roles


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed's format (np.load reads it), byte for byte the same for the same arrays: numpy stamps
    each member with the current time, which would give every export a new sha256."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, member.getvalue())
    atomic_write_bytes(path, buf.getvalue())


def fp32_references(root: Path, specs: dict[str, PreprocessSpec], names: dict[str, str],
                    log: Callable[[str], None] = lambda m: None) -> tuple[dict, dict[str, str]]:
    """Export's references: model.onnx on MIN_PAIRS synthetic scenes (calibration replaces them with the team's
    calibration pairs and adds FP16 and INT8)."""
    return write_references(root, specs, names, scene_pixels(specs), ("fp32",),
                            f"synthetic scenes (seed 4242, {MIN_PAIRS} pairs)", log)
