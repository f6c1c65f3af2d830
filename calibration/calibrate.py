"""The calibration library: `calibrate(bundle, plan) -> CalibrationReport`; `python -m calibration` parses
arguments into a CalibrationPlan and prints the report.

One pass over paired calibration data (through edge_pfm's own preprocessing) gives symmetric activation
ranges; from them model.int8.onnx (explicit Q/DQ) and calibration.cache (TensorRT text format); model.fp16.onnx
is the FP16-typed model. Each ONNX passes onnx.checker's full check and a TensorRT-RTX build before it is
written. INT8 and FP16 accuracy are measured against FP32 on ONNX Runtime CPU on held-out labelled pairs, and
the gate refuses an INT8 model that loses agreement or high-grade recall. The bundle is updated atomically.
No PyTorch is imported anywhere on this path.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from calibration.accuracy import (
    ADVICE,
    GATE,
    NOISE_FLOOR,
    agreement_report,
    confusion_png,
    evaluate,
    evaluate_stream,
    gate,
    gate_rule,
    lesion_report,
    markdown,
    noise_floor,
    range_note_lines,
)
from calibration.calib_cache import CalibrationCache, trt_version_int
from calibration.data import PairReader, warn_if_few
from calibration.data_plan import (
    VAL_MAX,
    VAL_SHARE,
    VAL_SYNTHETIC,
    CalibrationError,
    DataPlan,
    pair_digest,
    plan_data,
)
from calibration.mixed import (
    FULL_AGREEMENT,
    MARGIN,
    MIN_INT8_SHARE,
    Recipe,
    ValSet,
    _pairs_for,
    choose_recipe,
    confirming_count,
    judge_fixed,
)
from calibration.qdq import quantize_qdq
from calibration.ranges import METHODS, compute_all_ranges
from edge_pfm.bundle import Bundle, write_manifest
from edge_pfm.errors import ExitCode
from edge_pfm.fileio import atomic_directory, atomic_write_json, atomic_write_text
from edge_pfm.lesion import check_map_classes, map_measurement, map_verdict
from export.artifact_check import build_census, check_artifact, summary_line
from export.fp16 import fp16_model
from export.onnx_graph import save_onnx
from export.progress import log as _log
from export.quant_scheme import DEFAULT_QUANTIZED_OPS, QAT_QUANTIZED_OPS
from export.references import MIN_PAIRS, frames_to_pixels, scene_pixels, write_references
from export.sign import void_signature

FP16_METHOD = ("model.fp16.onnx run on ONNX Runtime CPU (FP16-typed graph, float32 I/O, LayerNormalization in "
               "float32; ORT computes FP16 ops without a CPU kernel in float32 between FP16 tensors)")
RANGES = ("auto", "ptq", "qat")
WEIGHT_ROUNDINGS = ("gptq", "nearest")
ROUNDING_PAIRS = 256  # calibration pairs whose inputs weigh GPTQ's rounding (calibration.weight_rounding)


class GateRefused(CalibrationError):
    """The INT8 model is less accurate than the gate allows; the bundle stays FP32."""

    exit_code = ExitCode.GATE_REFUSED


@dataclass(frozen=True)
class CalibrationPlan:
    """What to calibrate with: the defaults are `python -m calibration`'s."""

    data: str | Path | None = None  # paired dataset for the ranges; None: synthetic pairs
    synthetic: int = 512  # synthetic calibration pairs when data is None
    samples: int = 512  # at most this many calibration pairs
    method: str = "auto"  # auto: chosen on val among METHODS (percentile without a val set)
    eval: str | Path | None = None  # held-out labelled dataset; None: data's test split, or synthetic pairs
    eval_synthetic: int | None = None  # synthetic held-out pairs (None: 2000 when synthetic ones are used)
    val_synthetic: int = VAL_SYNTHETIC  # synthetic val pairs (recipe tuning) with synthetic calibration; 0: none
    val: str | Path | None = None  # a val set of its own (labels not needed: val measures agreement with FP32)
    agreement_data: str | Path | None = None  # the gate's agreement set (labels not needed); eval keeps the rest
    confirm: bool = True  # measure the recipe on pairs the search did not see (calibration.data_plan)
    margin: float = MARGIN  # the val agreement lower bound the recipe must show (calibration.mixed)
    resolution: tuple[int, int] = (1280, 720)  # synthetic camera resolution
    eval_resolution: tuple[int, int] | None = None  # default: resolution
    ranges: str = "auto"  # auto | ptq | qat
    trt_version: str = "10.3"  # the TensorRT the cache targets (JetPack 6.1/6.2)
    keep_float: tuple[str, ...] = ()  # node-name substrings kept float
    weight_rounding: str = "gptq"  # gptq: error-compensating int8 weight levels; nearest: round to nearest
    seed: int = 1
    allow_degraded: bool = False  # write the INT8 model even if the gate refuses it
    map_classes: tuple[str, ...] | None = None  # default: the bundle's, else lsil, hsil

    def __post_init__(self) -> None:
        if self.method not in ("auto", *METHODS):
            raise CalibrationError(f"unknown range method {self.method!r}; choose auto or one of {METHODS}")
        if self.ranges not in RANGES:
            raise CalibrationError(f"unknown ranges {self.ranges!r}; choose one of {RANGES}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise CalibrationError(f"unknown weight rounding {self.weight_rounding!r}; choose one of {WEIGHT_ROUNDINGS}")
        self.trt_version_int  # noqa: B018 - validates the version early

    @property
    def trt_version_int(self) -> int:
        try:
            return trt_version_int(self.trt_version)
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None


@dataclass
class CalibrationReport:
    bundle: Path
    gate_passed: bool
    reasons: list[str]
    report: dict = field(repr=False)  # accuracy.json's content
    markdown: str = field(repr=False)  # accuracy.md's
    rejected_dir: Path | None = None  # where a refused report was kept

    @property
    def refusal(self) -> str:
        return ("INT8 accuracy gate failed: the bundle stays FP32 (unchanged); the refused report is in "
                f"{self.rejected_dir}/\n  - " + "\n  - ".join(self.reasons) + "\n" + _val_advice(self.report)
                + ADVICE)


def _val_advice(report: dict) -> str:
    """When val was too small for the recipe's margin, more val pairs come before any other remedy."""
    recipe = report.get("recipe") or {}
    if not str(recipe.get("target", "")).startswith(FULL_AGREEMENT):
        return ""
    return (f"first: the INT8 recipe was chosen on {(recipe.get('val') or {}).get('samples')} val pairs, too few "
            f"for its margin ({recipe['target']}); give it more: --val DIR (pairs the model never trained on, no "
            f"labels needed: edge-pfm record --mode dataset records them), or with --data, val is {VAL_SHARE:.0%} of "
            f"the pairs (at most {VAL_MAX}) or the rows a `split` column marks val; with --synthetic, "
            "--val-synthetic N\n")


class _Refused(Exception):
    def __init__(self, report: CalibrationReport):
        self.report = report


def _conv_matmul_census(tensorrt_record: dict) -> tuple[int, int] | None:
    """A build check's (Int8, all) conv/matmul engine layers, or None where no engine was built."""
    by_type = tensorrt_record.get("compute_by_datatype") or {}
    if not tensorrt_record.get("checked") or not by_type:
        return None
    return int(by_type.get("Int8", 0)), sum(int(v) for v in by_type.values())


def _engine_census(max_batch: int):
    """-> a function of a Q/DQ model: its (Int8, all) conv/matmul engine layers built by TensorRT-RTX, or None
    (calibration.mixed counts the float budget with it, as the verdict does)."""
    import tempfile

    from export.artifact_check import ArtifactRejected

    def census(model) -> tuple[int, int] | None:
        with tempfile.TemporaryDirectory(prefix="edge-pfm-census-") as tmp:
            path = save_onnx(model, Path(tmp) / "model.int8.onnx")
            try:
                with warnings.catch_warnings():  # "not checked here" is said once, by the artifact's own check
                    warnings.simplefilter("ignore")
                    record = check_artifact(path, max_batch=max_batch)
            except ArtifactRejected:
                return None  # the artifact's own check names the failure
        return _conv_matmul_census(record["tensorrt"])

    return census


def _recipe(fp32: Path, all_ranges: dict, qat: dict | None, val: ValSet | None, plan: CalibrationPlan,
            gate_pairs: int, confirm: ValSet | None = None, max_batch: int = 8, rounding=None) -> Recipe:
    """The range method and float layers (calibration.mixed), or the fixed recipe where nothing is chosen: QAT
    ranges (trained for the whole scheme) or no val set."""
    import onnx

    from calibration.mixed import quantizable_layers
    from export.quant_scheme import QUANTIZABLE_OPS, name_nodes

    method = plan.method if plan.method != "auto" else "percentile"
    if qat is None and val is not None:
        return choose_recipe(fp32, all_ranges, DEFAULT_QUANTIZED_OPS, val,
                             methods=None if plan.method == "auto" else [plan.method], margin=plan.margin, log=_log,
                             gate_pairs=gate_pairs, fixed_float=all_ranges.float_nodes, confirm=confirm,
                             census=_engine_census(max_batch), rounding=rounding, steer_only=confirm is None)
    graph = name_nodes(onnx.load(str(fp32)))
    ops = QAT_QUANTIZED_OPS if qat is not None else DEFAULT_QUANTIZED_OPS
    total = sum(n.op_type in QUANTIZABLE_OPS for n in graph.graph.node)
    why = "QAT ranges: the scheme QAT trained, unchanged" if qat is not None else "no val set: nothing tuned"
    _log(f"[3/6] the INT8 recipe: {why} ({method})")
    quantized = len(quantizable_layers(graph, ops, rounding is not None))
    if qat is not None and val is not None:  # held to the search's target on val and confirmation (judge_fixed)
        qmodel = quantize_qdq(fp32, {**all_ranges[method], **qat}, None, op_types=ops, keep_float=tuple(plan.keep_float),
                              float_nodes=tuple(all_ranges.float_nodes))
        return judge_fixed("qat", method, qmodel, total, quantized, val, why, confirm, plan.margin, gate_pairs,
                           log=_log)
    return Recipe("qat" if qat is not None else "ptq", method, [], None, why, total, quantized)


def _val_sets(data: DataPlan, bundle: Bundle, calib_digests: set[str]
              ) -> tuple[ValSet | None, ValSet | None, set[str]]:
    """(val, confirmation, the digests of every pair that shaped the recipe): FP32's outputs computed once each;
    calibration, val and confirmation pairs checked disjoint by content hash."""
    val_set = confirm_set = None
    tuned = set(calib_digests)  # none of these may be a confirmation or held-out pair
    if data.val is None:
        return None, None, tuned
    _log(f"[3/6] the INT8 recipe, chosen on {data.val.n} val pairs ({data.val.source})"
         + (f", confirmed on {data.confirm.n} more ({data.confirm.source})" if data.confirm else
            f"; {data.confirm_note}"))
    for role, pairs in (("val", data.val), ("confirmation", data.confirm)):
        if pairs is None:
            continue
        vs = ValSet(pairs.chunks, pairs.n, bundle.preprocessing, bundle.input_names, bundle.model_path("fp32"),
                    pairs.source, digest=pair_digest)
        if vs.digests & tuned:
            raise CalibrationError(f"{len(vs.digests & tuned)} {role} pair(s) ({pairs.source}) are also "
                                   "calibration (or val) pairs: the sets must be disjoint (checked by content hash)")
        tuned |= vs.digests
        val_set, confirm_set = (vs, confirm_set) if role == "val" else (val_set, vs)
    return val_set, confirm_set, tuned


def _recipe_verdict(recipe: Recipe, int8_check: dict) -> tuple[dict, list[str]]:
    """The recipe's record with the engine census' Int8 share of conv/matmul layers; -> (record, reasons INT8 must
    not ship: a refused recipe, or too little left in Int8 to be worth it)."""
    record, reasons = recipe.to_dict(), []
    t = int8_check.get("tensorrt", {})
    counted = _conv_matmul_census(t)
    if counted is not None:
        int8, total = counted
        record["engine_conv_matmul"] = {"int8": int8, "layers": total, "share": round(int8 / total, 4),
                                        "census": f"{t.get('flavour')} {t.get('version')}"}
        share, where = int8 / total, f"{int8} of {total} conv/matmul engine layers ({t.get('flavour')} census)"
    else:
        share, where = recipe.onnx_int8_share, (f"{recipe.quantized} of {recipe.layers} conv/matmul ONNX nodes (no "
                                                "engine census: TensorRT-RTX not usable here)")
    record["int8_share"] = {"share": round(share, 4), "counted": where, "minimum": MIN_INT8_SHARE}
    _log(f"      recipe {recipe.kind} ({recipe.method}), {len(recipe.float_layers)} node(s) kept float, {recipe.trials} "
         f"trial model(s) in {recipe.seconds:.0f}s; Int8: {where}")
    if recipe.kind == "refused":
        reasons.append(f"no INT8 recipe meets the val margin: {recipe.reason}")
    if share < MIN_INT8_SHARE - 1e-9:  # said beside a refused recipe too: each alone refuses INT8
        reasons.append(f"only {where} run in Int8 (< {MIN_INT8_SHARE:.0%}): not worth shipping INT8")
    return record, reasons


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


def calibrate(bundle: str | Path | Bundle, plan: CalibrationPlan | None = None) -> CalibrationReport:
    """Calibrate `bundle` in place (atomically) by `plan`. -> the report; a refused gate is a report with
    gate_passed False (the bundle is left exactly as it was, the refused report goes to BUNDLE.int8-rejected/),
    bad input raises an EdgePfmError."""
    plan = plan or CalibrationPlan()
    trt_int = plan.trt_version_int
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    classes = bundle.classes
    protected = bundle.roles.protected(classes)  # the recalls the gate protects: the critical role
    map_classes = None
    if bundle.lesion_map is not None:
        try:
            map_classes = (check_map_classes(plan.map_classes, classes)
                           if plan.map_classes is not None else
                           tuple(bundle.lesion_map.get("shown_for", bundle.roles.lesion)))
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None
    elif plan.map_classes is not None:
        raise CalibrationError(f"--map-classes: {bundle.root} has no lesion-map output (its model was trained "
                               "without lesion masks)")
    fp32 = bundle.model_path("fp32")
    data = plan_data(bundle, plan, lambda gate_pairs: _pairs_for(plan.margin, gate_pairs))
    calib, calib_source = data.calib, data.calib_source
    eval_source, eval_chunks, n_eval, eval_rendered = data.eval_source, data.eval_chunks, data.n_eval, data.eval_rendered
    warn_if_few(len(calib))
    calib_digest_list = [pair_digest(p) for p in calib]  # one streamed pass
    data_hash = hashlib.sha256("".join(calib_digest_list).encode()).hexdigest()
    calib_digests = set(calib_digest_list)

    specs, names = bundle.preprocessing, bundle.input_names
    _log(f"[2/6] activation ranges ({', '.join(METHODS)}: one histogram pass, symmetric) over {len(calib)} pairs on "
         "the FP32 graph")
    all_ranges = compute_all_ranges(fp32, PairReader(calib, specs, names, progress="calibrating"))
    for line in range_note_lines(all_ranges.notes()):
        _log(f"      {line}")
    qat = None
    if plan.ranges == "qat" and not bundle.has("qat_ranges.json"):
        raise CalibrationError(f"--ranges qat: {bundle.root} has no qat_ranges.json; export a checkpoint trained with "
                               "--qat-epochs (python -m export.train ... --qat-epochs 3)")
    if plan.ranges != "ptq" and bundle.has("qat_ranges.json"):
        qat = json.loads((bundle.root / "qat_ranges.json").read_text())["amax"]
        unknown = sorted(set(qat) - set(all_ranges["percentile"]))
        if unknown:
            raise CalibrationError(f"qat_ranges.json names tensors the graph does not have, e.g. {unknown[:3]}; "
                                   "re-export the QAT checkpoint")
    rounding = None
    if qat is None and plan.weight_rounding == "gptq":  # QAT trained its weights on the nearest levels: kept
        from calibration.weight_rounding import WeightRounding

        sample = calib.subset(range(min(len(calib), ROUNDING_PAIRS))) if hasattr(calib, "subset") else \
            calib[:ROUNDING_PAIRS]
        _log(f"      int8 weight levels: GPTQ, from each weight layer's FP32 inputs on {len(sample)} calibration "
             "pairs (--weight-rounding nearest: round to nearest)")
        rounding = WeightRounding.measure(fp32, PairReader(sample, specs, names, progress="weight rounding"),
                                          len(sample))
    val_set, confirm_set, tuned = _val_sets(data, bundle, calib_digests)
    recipe = _recipe(fp32, all_ranges, qat, val_set, plan, data.gate_agreement_pairs, confirm_set,
                     bundle.max_batch, rounding)
    amax = dict(all_ranges[recipe.method])
    ranges_used, quantized_ops = f"ptq ({recipe.method})", DEFAULT_QUANTIZED_OPS
    if qat is not None:
        amax.update(qat)  # the quantized tensors take the ranges QAT trained under
        ranges_used = f"qat ({len(qat)} quantized tensors) + {recipe.method} (the rest, for the cache)"
        quantized_ops = QAT_QUANTIZED_OPS  # what QAT trained on the int8 grid (export.quant_scheme)
        _log(f"      {ranges_used}")
    held_out_of_tuning = tuned

    def never_calibrated(pair) -> None:
        if pair_digest(pair) in held_out_of_tuning:
            raise CalibrationError("a pair appears in both the calibration and the held-out set (or in val and the "
                                   "held-out set); accuracy must be measured on pairs calibration never saw and the "
                                   "recipe was not tuned on (use another --eval)")

    cache = CalibrationCache(trt_int, "EntropyCalibration2", amax)

    try:
        with atomic_directory(bundle.root) as tmp:
            shutil.copytree(bundle.root, tmp, dirs_exist_ok=True)
            void_signature(tmp, "calibration", _log)
            _log("[4/6] INT8 Q/DQ model and TensorRT calibration cache from the same ranges; FP16-typed model")
            written = quantize_qdq(fp32, amax, tmp / "model.int8.onnx", op_types=quantized_ops,
                                   keep_float=tuple(plan.keep_float),
                                   float_nodes=tuple(dict.fromkeys([*recipe.float_layers, *all_ranges.float_nodes])),
                                   rounding=rounding)
            props = {p.key: p.value for p in written.metadata_props}
            weight_rounding = (json.loads(props["edge_pfm.weight_rounding"]) if "edge_pfm.weight_rounding" in props
                               else {"method": "nearest" + (" (QAT trained on it)" if qat is not None else "")})
            save_onnx(fp16_model(fp32), tmp / "model.fp16.onnx")
            atomic_write_text(tmp / "calibration.cache", cache.to_text())
            atomic_write_json(tmp / "calibration.json", {"method": recipe.method, "ranges": ranges_used,
                                                         "symmetric": True, "float_layers": recipe.float_layers,
                                                         "weight_rounding": weight_rounding,
                                                         "range_notes": all_ranges.notes(), "amax": amax})
            build_checks = {}
            for name in ("model.int8.onnx", "model.fp16.onnx"):
                build_checks[name] = check_artifact(tmp / name, max_batch=bundle.max_batch)
                _log(f"      {summary_line(name, build_checks[name])}")

            recipe_record, recipe_reasons = _recipe_verdict(recipe, build_checks["model.int8.onnx"])
            if val_set is not None:
                recipe_record["confirm_source"] = data.confirm.source if data.confirm else None
                recipe_record["confirm_note"] = data.confirm_note
            _log(f"[5/6] accuracy on {n_eval} held-out pairs: FP32 vs INT8 vs FP16, ONNX Runtime CPU")
            lesion: dict = {}
            models = {"fp32": fp32, "int8": tmp / "model.int8.onnx", "fp16": tmp / "model.fp16.onnx"}

            def measured(chunks, source: str, with_floor: bool, **kw):  # -> (logits, labels, noise floor or None)
                # the noise floor: FP32 once more under a grey level of pixel noise, where agreement is decided
                runs = {**models, "fp32_noise": fp32} if with_floor else models
                lg, lb = evaluate_stream(runs, chunks, specs, names, never_calibrated, noise={"fp32_noise": NOISE_FLOOR},
                                         **kw)
                floor = noise_floor(lg, source) if with_floor else None
                lg.pop("fp32_noise", None)
                return lg, lb, floor

            logits, labels, floor = measured(eval_chunks, eval_source, data.agreement is None, lesion=lesion,
                                             spin=not eval_rendered)
            results = evaluate(logits, labels, classes)
            agreement = None
            if data.agreement is not None:
                _log(f"      agreement on {data.agreement.n} pairs ({data.agreement.source}): FP32 vs INT8 vs FP16")
                agreement_logits, _, floor = measured(data.agreement.chunks(), data.agreement.source, True,
                                                      labelled=False, progress="agreement")
                agreement = agreement_report(agreement_logits, data.agreement.source)
            _log(f"      noise floor: FP32 changes {floor['fp32_changed']} of {floor['samples']} decisions under "
                 f"{NOISE_FLOOR:g} grey level of pixel noise; INT8 changes {floor['int8_changed']}")
            decided_on = agreement["samples"] if agreement else len(labels)
            confirm_count = confirming_count(decided_on, plan.margin) if recipe.gate_confirms else None
            if confirm_count is not None:
                recipe_record["gate_confirm_count"] = confirm_count
                _log(f"      the gate's {decided_on} pairs confirm the recipe (no confirmation set): at most "
                     f"{confirm_count} may differ")
            reasons = gate(results, protected, agreement=agreement, floor_report=floor,
                           confirm_count=confirm_count) + recipe_reasons
            report = {
                "eval": {"samples": int(len(labels)), "source": eval_source},
                "calibration": {"method": recipe.method, "ranges": ranges_used, "samples": len(calib),
                                "data_sha256": data_hash, "source": calib_source,
                                "range_notes": all_ranges.notes()},
                "recipe": recipe_record,
                **({"agreement": agreement} if agreement else {}),
                "noise_floor": floor,
                **({"training_data": data.training_note} if data.training_note else {}),
                "builds": {n: build_census(c) for n, c in build_checks.items()},  # a refused report keeps them too
                "fp16_method": FP16_METHOD, "results": results,
                "gate": {"passed": not reasons, "reasons": reasons, "thresholds": GATE, "rule": gate_rule(protected)},
            }
            if lesion.get("maps"):
                report["lesion_map"] = lesion_report(lesion, labels, classes, map_classes, roles=bundle.roles)
            report_md = markdown(report, classes, protected)
            atomic_write_json(tmp / "accuracy.json", report)
            atomic_write_text(tmp / "accuracy.md", report_md)
            confusion_png(results, classes, tmp / "confusion.png")
            if reasons and not plan.allow_degraded:
                rejected = bundle.root.with_name(bundle.root.name + ".int8-rejected")
                shutil.rmtree(rejected, ignore_errors=True)
                rejected.mkdir(parents=True)
                for name in ("accuracy.json", "accuracy.md", "confusion.png", "calibration.json"):
                    shutil.copyfile(tmp / name, rejected / name)
                raise _Refused(CalibrationReport(bundle.root, False, reasons, report, report_md, rejected))
            if reasons:
                warnings.warn("INT8 gate failed but --allow-degraded was given: " + "; ".join(reasons), stacklevel=1)

            _log("[6/6] per-precision references for the device's engine checks, and the manifest")
            ref_pairs = frames_to_pixels(calib, specs, MIN_PAIRS)
            ref_source = f"{len(ref_pairs)} calibration pairs ({calib_source})"
            if len(ref_pairs) < MIN_PAIRS:  # too few of the team's pairs: synthetic scenes make up the rest
                ref_source += f" + {MIN_PAIRS - len(ref_pairs)} synthetic scenes"
                ref_pairs += scene_pixels(specs, MIN_PAIRS - len(ref_pairs))
            ref_entry, ref_roles = write_references(tmp, specs, names, ref_pairs, ("fp32", "fp16", "int8"), ref_source,
                                                    _log)
            manifest = dict(bundle.manifest)
            manifest["references"] = ref_entry
            manifest["calibration"] = {
                "method": recipe.method, "ranges": ranges_used, "symmetric": True, "samples": len(calib),
                "data_sha256": data_hash,
                "source": calib_source, "trt_version": plan.trt_version, "trt_version_int": trt_int,
                "cache_header": f"TRT-{trt_int}-EntropyCalibration2", "tensors": len(amax),
                "quantized_ops": list(quantized_ops), "keep_float": list(plan.keep_float),
                "recipe": {k: v for k, v in recipe_record.items() if k not in ("sensitivity", "methods")},
                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            manifest["accuracy"] = {name: {k: results[name][k] for k in (
                "accuracy", "top1_agreement", "agreement_ci95", "disagreements", "max_abs_prob_diff", "logit_rmse")}
                | {"accuracy_change": results[name]["accuracy_change"]}
                | {f"{c}_recall_change": results[name]["recall_change"][c] for c in protected} for name in results}
            manifest["accuracy"]["gate_passed"] = not reasons
            # the precisions `--precision auto` may pick on the device (edge_pfm.precision_pick)
            manifest["accuracy"]["gates"] = {"int8": not reasons, "fp16": not gate(results, protected, "fp16")}
            manifest["accuracy"]["gate_rule"] = gate_rule(protected)
            manifest["accuracy"]["eval_samples"] = int(len(labels))
            manifest["build_checks"] = {**manifest.get("build_checks", {}), **build_checks}
            if map_classes is not None:
                manifest["outputs"] = [lesion_map_entry(o, map_classes, report.get("lesion_map"), eval_source)
                                       if o["name"] == "lesion_map" else o for o in manifest["outputs"]]
            write_manifest(tmp, manifest, {
                **ref_roles,
                "model.int8.onnx": "int8 explicit Q/DQ onnx", "model.fp16.onnx": "fp16-typed onnx (float32 I/O)", "calibration.cache": "TensorRT calibration cache (implicit INT8, DLA)",
                "calibration.json": "activation ranges", "accuracy.json": "accuracy report", "accuracy.md": "accuracy report",
                "confusion.png": "confusion matrices",
            })
    except _Refused as refused:  # the atomic write was abandoned: the bundle is as it was
        return refused.report
    # an earlier refusal's report no longer describes this bundle
    shutil.rmtree(bundle.root.with_name(bundle.root.name + ".int8-rejected"), ignore_errors=True)
    if map_classes is not None:
        calibrated = Bundle.load(bundle.root)
        for precision in ("fp32", "int8", "fp16"):
            _log(f"      {precision}: {map_verdict(calibrated, precision).describe()}")
    i8 = results["int8"]
    lo, hi = i8["agreement_ci95"]
    _log(f"calibrated {bundle.root}: INT8 agreement {i8['top1_agreement']:.2%} (95 % CI {lo:.2%}-{hi:.2%}, "
         f"n={len(labels)}), FP16 agreement {results['fp16']['top1_agreement']:.2%}; cache header "
         f"TRT-{trt_int}-EntropyCalibration2")
    return CalibrationReport(bundle.root, not reasons, reasons, report, report_md)
