"""python -m calibration --bundle BUNDLE [--data DIR | --synthetic N] [--method percentile|entropy|minmax]
       [--samples 512] [--eval DIR | --eval-synthetic N] [--trt-version 10.3] [--allow-degraded]

One pass over paired calibration data (through edge_pfm's own preprocessing) gives symmetric
activation ranges; from them: model.int8.onnx (explicit Q/DQ) and calibration.cache (TensorRT
text format). model.fp16.onnx is the FP16-typed model strongly typed TensorRT builds for FP16. Each
ONNX passes onnx.checker's full check and a TensorRT-RTX build before it is written (exit 2 with the
parser's node and message otherwise). INT8 and FP16 accuracy are measured against FP32 by running
them on ONNX Runtime CPU, on a held-out labelled set,
and a gate refuses an INT8 model that loses agreement or high-grade recall (exit 3; the bundle stays
FP32 and the refused report goes to BUNDLE.int8-rejected/). The bundle is updated atomically: on any
failure it is left exactly as it was (exit 2 for bad input).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shutil
import sys
import warnings

import numpy as np

from calibration.accuracy import (
    ADVICE,
    GATE,
    confusion_png,
    evaluate,
    evaluate_stream,
    gate,
    gate_rule,
    lesion_report,
    markdown,
)
from calibration.data import PairReader, dataset_pairs, synthetic_pair_chunks, synthetic_pairs, warn_if_few
from calibration.fp16 import fp16_model
from calibration.qdq import quantize_qdq
from calibration.ranges import METHODS, compute_ranges
from edge_pfm.bundle import Bundle, BundleError, write_manifest
from edge_pfm.calib_cache import CalibrationCache, trt_version_int
from edge_pfm.dataset import DatasetError
from edge_pfm.fileio import atomic_directory, atomic_write_json, atomic_write_text
from edge_pfm.lesion import check_map_classes, default_map_classes, map_measurement, parse_map_classes
from export.artifact_check import check_artifact, summary_line
from export.onnx_export import ExportError, save_onnx

FP16_METHOD = ("model.fp16.onnx run on ONNX Runtime CPU (FP16-typed graph, float32 I/O, LayerNormalization in "
               "float32; ORT computes FP16 ops without a CPU kernel in float32 between FP16 tensors)")


class CalibrationError(RuntimeError):
    pass


class GateRefused(CalibrationError):
    """The INT8 model is less accurate than the gate allows; the bundle stays FP32."""


EXIT_GATE_REFUSED = 3  # distinct from bad input (2): the bundle is fine, INT8 was refused


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pair_digest(pair) -> str:
    h = hashlib.sha256()
    h.update(pair[0].tobytes())
    h.update(pair[1].tobytes())
    return h.hexdigest()


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def lesion_map_entry(entry: dict, map_classes: tuple[str, ...], report: dict | None, eval_source: str) -> dict:
    """The manifest's lesion_map output after calibration: the classes that show it, and the held-out
    measurement of each precision's map where the held-out pairs had masks (else the earlier measurements stay;
    the runtime shows no map at a precision without one)."""
    entry = {**entry, "shown_for": list(map_classes)}
    if report and "scores" in report:
        entry["measurements"] = {
            name: map_measurement(sc["lesion_classes"], f"calibration held-out ({eval_source})", report["threshold"])
            for name, sc in report["scores"].items()}
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="paired dataset directory (edge_pfm.dataset layout) for calibration")
    src.add_argument("--synthetic", type=int, metavar="N", help="calibrate on N synthetic pairs")
    ap.add_argument("--method", choices=METHODS, default="percentile",
                    help="activation range method (default percentile: 99.999th |x|, best INT8 agreement on PFM)")
    ap.add_argument("--samples", type=int, default=512, help="at most this many calibration pairs")
    ev = ap.add_mutually_exclusive_group()
    ev.add_argument("--eval", help="held-out labelled dataset directory for the accuracy report")
    ev.add_argument("--eval-synthetic", type=int, default=2000, metavar="N",
                    help="held-out synthetic pairs (default 2000: enough for the gate's intervals to be narrow)")
    ap.add_argument("--eval-resolution", type=_size, default=None,
                    help="synthetic held-out camera resolution WxH (default: --resolution)")
    ap.add_argument("--ranges", choices=("auto", "ptq", "qat"), default="auto",
                    help="auto: the bundle's qat_ranges.json where quantized (QAT checkpoint), else PTQ ranges")
    ap.add_argument("--trt-version", default="10.3", help="TensorRT the cache targets (JetPack 6.1/6.2: 10.3)")
    ap.add_argument("--resolution", type=_size, default=(1280, 720), help="synthetic camera resolution WxH")
    ap.add_argument("--keep-float", nargs="*", default=["/stem/"],
                    help="node-name substrings kept in float (default: each branch's stem conv)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--allow-degraded", action="store_true", help="write the INT8 model even if the gate fails")
    ap.add_argument("--map-classes", metavar="A,B",
                    help="the classes whose decisions show the lesion map (default: the bundle's, else lsil,hsil); the "
                         "held-out map figures are measured over them")
    args = ap.parse_args(argv)
    try:
        trt_int = trt_version_int(args.trt_version)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        return run(args, trt_int)
    except GateRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_GATE_REFUSED
    except (BundleError, DatasetError, CalibrationError, ExportError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, trt_int: int) -> int:
    bundle = Bundle.load(args.bundle)
    classes = bundle.classes
    map_classes = None
    if bundle.lesion_map is not None:
        try:
            map_classes = (check_map_classes(parse_map_classes(args.map_classes), classes)
                           if args.map_classes is not None else
                           tuple(bundle.lesion_map.get("shown_for", default_map_classes(classes))))
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None
    elif args.map_classes is not None:
        raise CalibrationError(f"--map-classes: {bundle.root} has no lesion-map output (its model was trained "
                               "without lesion masks)")
    fp32 = bundle.model_path("fp32")
    _log(f"[1/5] calibration data ({'synthetic' if args.synthetic else args.data})")
    if args.synthetic:
        calib = synthetic_pairs(min(args.synthetic, args.samples), args.seed, args.resolution)
        calib_source = f"synthetic:{len(calib)}:seed={args.seed}:{args.resolution[0]}x{args.resolution[1]}"
    else:
        calib, _ = dataset_pairs(args.data, classes)
        if len(calib) > args.samples:
            idx = np.random.default_rng(args.seed).choice(len(calib), args.samples, replace=False)
            calib = [calib[i] for i in sorted(idx)]
        calib_source = str(args.data)
    warn_if_few(len(calib))
    data_hash = hashlib.sha256("".join(pair_digest(p) for p in calib).encode()).hexdigest()

    if args.eval:
        held, _ = dataset_pairs(args.eval, classes)
        if any(p[2] is None for p in held):
            raise CalibrationError(f"the held-out set {args.eval} needs a label for every pair (labels.csv)")
        eval_source, eval_chunks, n_eval = str(args.eval), [held], len(held)
    else:
        size = args.eval_resolution or args.resolution
        eval_source = f"synthetic:{args.eval_synthetic}:seed={args.seed + 10_000}:{size[0]}x{size[1]}"
        eval_chunks, n_eval = synthetic_pair_chunks(args.eval_synthetic, args.seed + 10_000, size), args.eval_synthetic
    calib_digests = {pair_digest(p) for p in calib}

    def never_calibrated(pair) -> None:
        if pair_digest(pair) in calib_digests:
            raise CalibrationError("a pair appears in both the calibration and the held-out set; accuracy must be "
                                   "measured on pairs calibration never saw (use another --eval)")

    specs, names = bundle.preprocessing, bundle.input_names
    _log(f"[2/5] activation ranges ({args.method}, symmetric) over {len(calib)} pairs on the FP32 graph")
    amax = compute_ranges(fp32, PairReader(calib, specs, names, progress="calibrating"), args.method)
    ranges_used = "ptq"
    if args.ranges == "qat" and not bundle.has("qat_ranges.json"):
        raise CalibrationError(f"--ranges qat: {bundle.root} has no qat_ranges.json; export a checkpoint trained with "
                               "--qat-epochs (python -m export.train ... --qat-epochs 3)")
    if args.ranges != "ptq" and bundle.has("qat_ranges.json"):
        qat = json.loads((bundle.root / "qat_ranges.json").read_text())["amax"]
        unknown = sorted(set(qat) - set(amax))
        if unknown:
            raise CalibrationError(f"qat_ranges.json names tensors the graph does not have, e.g. {unknown[:3]}; "
                                   "re-export the QAT checkpoint")
        amax.update(qat)  # the quantized tensors take the ranges QAT trained under
        ranges_used = f"qat ({len(qat)} quantized tensors) + {args.method} (the rest, for the cache)"
        _log(f"      {ranges_used}")
    cache = CalibrationCache(trt_int, "EntropyCalibration2", amax)

    with atomic_directory(bundle.root) as tmp:
        shutil.copytree(bundle.root, tmp, dirs_exist_ok=True)
        _log("[3/5] INT8 Q/DQ model and TensorRT calibration cache from the same ranges; FP16-typed model")
        quantize_qdq(fp32, amax, tmp / "model.int8.onnx", keep_float=tuple(args.keep_float))
        save_onnx(fp16_model(fp32), tmp / "model.fp16.onnx")
        atomic_write_text(tmp / "calibration.cache", cache.to_text())
        atomic_write_json(tmp / "calibration.json", {"method": args.method, "ranges": ranges_used, "symmetric": True,
                                                     "amax": amax})
        build_checks = {}
        for name in ("model.int8.onnx", "model.fp16.onnx"):
            build_checks[name] = check_artifact(tmp / name, max_batch=bundle.max_batch)
            _log(f"      {summary_line(name, build_checks[name])}")

        _log(f"[4/5] accuracy on {n_eval} held-out pairs: FP32 vs INT8 vs FP16, ONNX Runtime CPU")
        lesion: dict = {}
        logits, labels = evaluate_stream({"fp32": fp32, "int8": tmp / "model.int8.onnx",
                                          "fp16": tmp / "model.fp16.onnx"}, eval_chunks, specs, names, never_calibrated,
                                         lesion=lesion)
        results = evaluate(logits, labels, classes)
        reasons = gate(results, classes)
        report = {
            "eval": {"samples": int(len(labels)), "source": eval_source},
            "calibration": {"method": args.method, "ranges": ranges_used, "samples": len(calib),
                            "data_sha256": data_hash, "source": calib_source},
            "fp16_method": FP16_METHOD, "results": results,
            "gate": {"passed": not reasons, "reasons": reasons, "thresholds": GATE, "rule": gate_rule(classes)},
        }
        if lesion.get("maps"):
            report["lesion_map"] = lesion_report(lesion, labels, classes, map_classes)
        atomic_write_json(tmp / "accuracy.json", report)
        atomic_write_text(tmp / "accuracy.md", markdown(report, classes))
        confusion_png(results, classes, tmp / "confusion.png")
        print(markdown(report, classes))
        if reasons and not args.allow_degraded:
            rejected = bundle.root.with_name(bundle.root.name + ".int8-rejected")
            shutil.rmtree(rejected, ignore_errors=True)
            rejected.mkdir(parents=True)
            for name in ("accuracy.json", "accuracy.md", "confusion.png", "calibration.json"):
                shutil.copyfile(tmp / name, rejected / name)
            raise GateRefused("INT8 accuracy gate failed: the bundle stays FP32 (unchanged); the refused report is in "
                              f"{rejected}/\n  - " + "\n  - ".join(reasons) + "\n" + ADVICE)
        if reasons:
            warnings.warn("INT8 gate failed but --allow-degraded was given: " + "; ".join(reasons), stacklevel=1)

        _log("[5/5] updating the manifest")
        manifest = dict(bundle.manifest)
        manifest["calibration"] = {
            "method": args.method, "ranges": ranges_used, "symmetric": True, "samples": len(calib),
            "data_sha256": data_hash,
            "source": calib_source, "trt_version": args.trt_version, "trt_version_int": trt_int,
            "cache_header": f"TRT-{trt_int}-EntropyCalibration2", "tensors": len(amax),
            "keep_float": list(args.keep_float),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["accuracy"] = {name: {k: results[name][k] for k in (
            "accuracy", "top1_agreement", "agreement_ci95", "disagreements", "max_abs_prob_diff", "logit_rmse")}
            | {"accuracy_change": results[name]["accuracy_change"],
               f"{classes[-1]}_recall_change": results[name]["recall_change"][classes[-1]]} for name in results}
        manifest["accuracy"]["gate_passed"] = not reasons
        manifest["accuracy"]["gate_rule"] = gate_rule(classes)
        manifest["accuracy"]["eval_samples"] = int(len(labels))
        manifest["build_checks"] = {**manifest.get("build_checks", {}), **build_checks}
        if map_classes is not None:
            manifest["outputs"] = [lesion_map_entry(o, map_classes, report.get("lesion_map"), eval_source)
                                   if o["name"] == "lesion_map" else o for o in manifest["outputs"]]
        write_manifest(tmp, manifest, {
            "model.int8.onnx": "int8 explicit Q/DQ onnx", "model.fp16.onnx": "fp16-typed onnx (float32 I/O)", "calibration.cache": "TensorRT calibration cache (implicit INT8, DLA)",
            "calibration.json": "activation ranges", "accuracy.json": "accuracy report", "accuracy.md": "accuracy report",
            "confusion.png": "confusion matrices",
        })
    # an earlier refusal's report no longer describes this bundle
    shutil.rmtree(bundle.root.with_name(bundle.root.name + ".int8-rejected"), ignore_errors=True)
    if map_classes is not None:
        from edge_pfm.lesion import map_verdict

        calibrated = Bundle.load(bundle.root)
        for precision in ("fp32", "int8", "fp16"):
            _log(f"      {precision}: {map_verdict(calibrated, precision).describe()}")
    i8 = results["int8"]
    lo, hi = i8["agreement_ci95"]
    _log(f"calibrated {bundle.root}: INT8 agreement {i8['top1_agreement']:.2%} (95 % CI {lo:.2%}-{hi:.2%}, "
         f"n={len(labels)}), FP16 agreement {results['fp16']['top1_agreement']:.2%}; cache header "
         f"TRT-{trt_int}-EntropyCalibration2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
