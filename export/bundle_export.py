"""Checkpoint -> verified ONNX bundle (model.onnx + manifest.json + parity report), atomically."""
from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

import edge_pfm
from edge_pfm.bundle import MANIFEST, MODALITIES, SCHEMA, SCHEMA_VERSION, new_bundle_version, write_manifest
from edge_pfm.fileio import atomic_directory, atomic_write_json, atomic_write_text
from edge_pfm.lesion import check_map_classes, judge_map
from export.artifact_check import check_artifact, summary_line
from export.checkpoint import library_versions, load_checkpoint
from export.model_spec import native_spec, write_spec_metadata
from export.onnx_export import onnx_from_torch
from export.onnx_graph import BATCH_DIM, LESION_MAP, OUTPUT_NAME, ExportError, check_graph, save_onnx
from export.parity import report_markdown, run_parity
from export.parity_feeds import parity_feeds
from export.references import fp32_references


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lesion_map_output(img_size: int, shown_for: tuple[str, ...], measurement: dict | None, stride: int = 8) -> dict:
    """The manifest's description of the lesion map: what it means, its grid, how it lands on a camera frame,
    the classes whose decisions show it, and the held-out measurement (by precision) that lets the runtime show
    it (edge_pfm.lesion.map_verdict)."""
    cells = img_size // stride
    return {"name": LESION_MAP, "shape": [BATCH_DIM, 1, cells, cells], "dtype": "float32",
            "shown_for": list(shown_for), "measurements": {"fp32": measurement} if measurement else {},
            "meaning": "per-cell probability that the tissue is lesion (sigmoid applied in the graph); a coarse map "
                       "for where to look or biopsy, not a diagnosis on its own",
            "resolution": [cells, cells], "stride": stride, "threshold": 0.5, "source_modality": "white_light",
            "frame_mapping": "the map covers the model input, i.e. the white-light frame after preprocessing: with "
                             "resize=center_crop, the crop box PreprocessSpec.field_of_view(frame_h, frame_w) -> (y0, y1, "
                             "x0, x1) (edge_pfm.preprocess); cell (i, j) spans input pixels [i*stride, (i+1)*stride) x "
                             "[j*stride, (j+1)*stride). Resize the map onto the crop box (edge_pfm.lesion.to_frame); "
                             "outside it nothing was seen. With resize=stretch the box is the whole frame."}


def export_bundle(checkpoint: str | Path, out: str | Path, opset: int = 17, max_batch: int = 8,
                  parity_random: int = 32, parity_scenes: int = 32, map_classes: tuple[str, ...] | None = None,
                  bundle_version: int | None = None) -> dict:
    """Write a bundle to `out`; nothing is left at `out` unless every check passed. -> manifest.
    map_classes: the classes whose decisions show the lesion map (default: those the trainer measured it on).
    bundle_version: the manifest's bundle_version (edge_pfm.bundle.new_bundle_version: default the export time)."""
    _log(f"[1/4] loading checkpoint {checkpoint}")
    model, meta = load_checkpoint(checkpoint)
    specs = meta["preprocessing"]
    lesion_output = None
    if model.cfg.lesion_map:
        measured = meta["extra"].get("lesion_map")
        shown_for = tuple(map_classes if map_classes is not None else
                          measured["classes"] if measured else meta["roles"].lesion)
        try:
            check_map_classes(shown_for, meta["classes"])
        except ValueError as exc:
            raise ExportError(f"{checkpoint}: {exc}") from None
        lesion_output = lesion_map_output(model.cfg.img_size, shown_for, measured)
        verdict = judge_map(lesion_output, meta["roles"].lesion, "fp32")
        _log(f"      {verdict.describe()}")
    elif map_classes:
        raise ExportError(f"{checkpoint} has no lesion-map head (trained without lesion masks): drop --map-classes")
    with atomic_directory(out) as tmp:
        _log(f"[2/4] exporting ONNX (opset {opset}, symbolic batch)")
        proto = onnx_from_torch(model, opset=opset, example_batch=2)
        spec = native_spec(meta["classes"], meta["roles"], specs, lesion_output["stride"] if lesion_output else None)
        write_spec_metadata(proto, spec)
        graph = check_graph(proto)
        onnx_path = save_onnx(proto, tmp / "model.onnx")
        _log(f"      {graph['nodes']} nodes; census {graph['op_census']}")
        _log("      TensorRT check: onnx.checker full check, then TensorRT-RTX parses and builds it")
        build_check = check_artifact(onnx_path, "fp32", max_batch)
        _log(f"      {summary_line('model.onnx', build_check)}")
        _log(f"[3/4] parity PyTorch vs ONNX Runtime CPU on {parity_random + parity_scenes} pairs (polygraphy)")
        feeds = parity_feeds(specs, parity_random, parity_scenes)
        parity = run_parity(model, onnx_path, feeds, reference_dir=tmp / "parity")
        qat = meta["extra"].get("qat")
        # QAT ranges by ONNX tensor name, for calibration's Q/DQ and cache writers (none: a losing QAT was discarded)
        if qat and "ranges" in qat:
            from export.qat import onnx_tensor_ranges

            amax = onnx_tensor_ranges(model, proto, qat["ranges"])
            atomic_write_json(tmp / "qat_ranges.json", {"source": "quantization-aware fine-tuning (export.qat)",
                                                        "percentile": qat["ranges"]["percentile"], "amax": amax})
            _log(f"      QAT ranges for {len(amax)} tensors -> qat_ranges.json")
        _log(f"      max |dlogit| {parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.2%}"
             + (f", lesion map max |dp| {parity['lesion_map_max_abs_diff']:.2e}" if "lesion_map_max_abs_diff" in parity
                else ""))
        report = {"checkpoint_sha256": meta["sha256"], "graph": graph, "parity": parity,
                  "build_check": build_check}
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", report_markdown(report))
        if not parity["passed"]:
            raise ExportError(
                f"parity gate failed: max |dlogit| {parity['max_abs_diff']:.3e} (<= {parity['tolerance']['max_abs_diff']:g}) "
                f"and top-1 agreement {parity['top1_agreement']:.2%} (100%) required; the ONNX graph does not "
                "compute what the checkpoint computes. Nothing was written."
            )
        _log("[4/4] writing manifest")
        n_cls = len(meta["classes"])
        manifest = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "bundle_version": new_bundle_version(bundle_version),
            "model": {"family": "PFM", "variant": meta["variant"], "classes": list(meta["classes"]),
                      "roles": meta["roles"].to_dict(), "config": meta["config"]},
            "inputs": [
                {"name": m, "modality": m, "shape": [BATCH_DIM, *specs[m].input_shape], "dtype": "float32",
                 "preprocessing": specs[m].to_dict()}
                for m in MODALITIES
            ],
            "outputs": [{"name": OUTPUT_NAME, "shape": [BATCH_DIM, n_cls], "dtype": "float32",
                         "meaning": "unnormalised class scores; softmax gives probabilities; index i is classes[i]"},
                        *([lesion_output] if lesion_output else [])],
            "batch": {"min": 1, "opt": 1, "max": int(max_batch)},
            "artifacts": {},
            "spec": spec,
            "provenance": {
                "checkpoint_sha256": meta["sha256"], "checkpoint": Path(meta["path"]).name,
                "exporter": f"edge-pfm {edge_pfm.__version__} (torch.onnx legacy exporter)",
                "opset": graph["opset"], "ir_version": graph["ir_version"], "versions": library_versions(("edge_pfm", "torch", "onnx", "onnxruntime", "numpy")),
                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "training": {**meta["extra"], "qat": {k: v for k, v in qat.items() if k != "ranges"}} if qat
                else meta["extra"],
            },
            "parity": {k: parity[k] for k in ("pairs", "max_abs_diff", "top1_agreement", "lesion_map_max_abs_diff",
                                              "passed") if k in parity},
            "build_checks": {"model.onnx": build_check},
        }
        ref_entry, ref_roles = fp32_references(tmp, specs, {m: m for m in MODALITIES}, _log)
        manifest["references"] = ref_entry
        manifest = write_manifest(tmp, manifest, {
            **ref_roles,
            "model.onnx": "fp32 onnx", "report.json": "export report", "report.md": "export report",
            "parity/inputs.json": "polygraphy reference inputs", "parity/outputs.json": "polygraphy reference outputs",
            **({"qat_ranges.json": "activation ranges from quantization-aware fine-tuning"}
               if qat and "ranges" in qat else {}),
        })
    _log(f"wrote bundle {out} ({MANIFEST}, model.onnx, report.md)")
    return manifest
