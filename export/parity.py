"""Parity of PyTorch vs ONNX Runtime CPU, through polygraphy's Comparator.

Also writes reference inputs/outputs in polygraphy's JSON format so that anyone can re-check a
bundle with one line:

    polygraphy run BUNDLE/model.onnx --onnxrt --load-inputs BUNDLE/parity/inputs.json \
        --load-outputs BUNDLE/parity/outputs.json --atol 1e-4 --rtol 1e-4
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from edge_pfm.bundle import MODALITIES
from export.model import PFM
from export.onnx_export import DeployedPFM
from export.onnx_graph import LESION_MAP, OUTPUT_NAME
from export.parity_feeds import TOLERANCE


def _torch_runner_class():
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchCpuRunner(BaseRunner):
        """polygraphy runner for a two-input torch module on the CPU (PytRunner assumes CUDA)."""

        def __init__(self, model: PFM, name: str = "pytorch"):
            super().__init__(name=name, prefix="pytorch-cpu")
            self._model = model

        def activate_impl(self):
            self._model.eval()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            s = self._model.cfg.img_size
            for m in MODALITIES:
                meta.add(m, np.float32, (-1, self._model.cfg.in_chans[m], s, s))
            return meta

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = DeployedPFM(self._model)(*(torch.from_numpy(np.ascontiguousarray(feed_dict[m]))
                                                 for m in MODALITIES))
            self.inference_time = time.perf_counter() - t0
            if isinstance(out, tuple):
                return OrderedDict([(OUTPUT_NAME, out[0].numpy()), (LESION_MAP, out[1].numpy())])
            return OrderedDict([(OUTPUT_NAME, out.numpy())])

        def deactivate_impl(self):
            pass

    return TorchCpuRunner


def run_parity(model: PFM, onnx_path: str | Path, feeds: list[dict[str, np.ndarray]],
               reference_dir: str | Path | None = None, reference_feeds: int = 2) -> dict:
    """Compare PyTorch vs ORT CPU on every feed. Returns the report dict (passed: bool)."""
    from polygraphy import comparator as pgc
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    torch_runner = _torch_runner_class()(model)
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name="onnxruntime-cpu")
    results = pgc.Comparator.run([torch_runner, ort_runner], data_loader=feeds)
    tol = TOLERANCE["max_abs_diff"]
    # CompareFunc.simple became SimpleCompareFunc in polygraphy 0.53; accept both
    simple = getattr(pgc, "SimpleCompareFunc", None) or pgc.CompareFunc.simple
    accuracy = pgc.Comparator.compare_accuracy(results, compare_func=simple(atol=tol, rtol=tol))
    ref = np.concatenate([it[OUTPUT_NAME] for it in results[0][1]])
    got = np.concatenate([it[OUTPUT_NAME] for it in results[1][1]])
    diff = np.abs(ref - got)
    top1 = float((ref.argmax(1) == got.argmax(1)).mean())
    report = {
        "pairs": int(len(ref)),
        "feeds": len(feeds),
        "batch_sizes": sorted({int(f[MODALITIES[0]].shape[0]) for f in feeds}),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": top1,
        "polygraphy_compare_passed": bool(accuracy),
        "tolerance": TOLERANCE,
        "runners": ["pytorch (CPU, eval)", "onnxruntime CPUExecutionProvider"],
    }
    passed = report["max_abs_diff"] <= tol and top1 >= TOLERANCE["top1_agreement"] and accuracy
    if LESION_MAP in results[0][1][0]:
        map_diff = max(float(np.abs(a[LESION_MAP] - b[LESION_MAP]).max()) for a, b in zip(results[0][1], results[1][1]))
        report["lesion_map_max_abs_diff"] = map_diff
        passed = passed and map_diff <= TOLERANCE["lesion_map_max_abs_diff"]
    report["passed"] = bool(passed)
    if reference_dir is not None:
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json

        reference_dir = Path(reference_dir)
        reference_dir.mkdir(parents=True, exist_ok=True)
        save_json(feeds[:reference_feeds], str(reference_dir / "inputs.json"))
        ref_results = RunResults()
        ref_results.append((results[0][0], results[0][1][:reference_feeds]))
        ref_results.save(str(reference_dir / "outputs.json"))
    return report


def report_markdown(report: dict) -> str:
    from export.artifact_check import summary_line

    p = report["parity"]
    lines = [
        "# Export report",
        "",
        f"- checkpoint sha256 `{report['checkpoint_sha256']}`",
        f"- opset {report['graph']['opset']}, IR {report['graph']['ir_version']}, {report['graph']['nodes']} nodes",
        "",
        "## Parity: PyTorch vs ONNX Runtime CPU (polygraphy Comparator)",
        "",
        "| pairs | batch sizes | max abs dlogit | mean abs dlogit | top-1 agreement | gate |",
        "|---|---|---|---|---|---|",
        f"| {p['pairs']} | {p['batch_sizes']} | {p['max_abs_diff']:.2e} | {p['mean_abs_diff']:.2e} | "
        f"{p['top1_agreement']:.2%} | {'PASS' if p['passed'] else 'FAIL'} (<= {p['tolerance']['max_abs_diff']:g}, 100%) |",
        "",
        "## TensorRT build check",
        "",
        summary_line("model.onnx", report["build_check"]) if "build_check" in report else "not run",
        "",
        "## Op census",
        "",
        "| op | count |",
        "|---|---|",
        *[f"| {op} | {n} |" for op, n in report["graph"]["op_census"].items()],
        "",
        "Re-check on any machine:",
        "",
        "```",
        "polygraphy run model.onnx --onnxrt --load-inputs parity/inputs.json --load-outputs parity/outputs.json "
        "--atol 1e-4 --rtol 1e-4",
        "```",
    ]
    return "\n".join(lines) + "\n"

