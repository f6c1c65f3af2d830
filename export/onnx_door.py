"""The ONNX door: a team's own exported ONNX + its model spec -> a verified bundle. No PyTorch.

    python -m export --onnx MODEL.onnx --spec SPEC.json --out BUNDLE [--reference-inputs I.json --reference-outputs O.json]

The graph is adapted so every bundle looks the same to everything downstream: inputs renamed to the modality
names, outputs to logits / lesion_map (a map given as logits gets a Sigmoid), the batch symbol (any name:
dynamo's s0, a team's batch_size) renamed to `batch`, undeclared outputs dropped, Conv -> BatchNormalization
folded, the opset brought into what JetPack 6's TensorRT 10.3 parses, the spec written into metadata_props.
Then the gates every door passes: declared inputs equal the graph's, a symbolic and consistent batch, finite
outputs of the declared shapes, onnx.checker's full check, the TensorRT-RTX build, and parity against the
team's reference outputs when given (polygraphy's --save-inputs / --save-outputs JSON). Without references the
manifest says so: a parity figure is never invented.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

import edge_pfm
from edge_pfm.bundle import MANIFEST, MODALITIES, SCHEMA, new_bundle_version, schema_version_for, write_manifest
from edge_pfm.fileio import atomic_directory, atomic_write_json, sha256_file
from export.artifact_check import check_artifact, summary_line
from export.model_spec import ModelSpec, write_spec_metadata
from export.onnx_graph import (
    BATCH_DIM,
    IR_VERSION_FOR_OPSET,
    LESION_MAP,
    OUTPUT_NAME,
    ExportError,
    check_graph,
    default_opset,
    save_onnx,
)
from export.parity_feeds import TOLERANCE, parity_feeds
from export.progress import log
from export.references import fp32_references

# JetPack 6.1/6.2's TensorRT 10.3 parses opsets 9-20 (onnx-tensorrt docs/operators.md for TensorRT 10.x);
# INT8 Q/DQ with per-channel scales needs >= 13. Outside [MIN, MAX] the graph is converted, or refused.
MIN_OPSET, MAX_OPSET = 13, 20


def convert_opset(proto, path: Path):
    """Bring the default-domain opset into [MIN_OPSET, MAX_OPSET] (onnx.version_converter), or refuse."""
    import onnx

    have = default_opset(proto)
    if MIN_OPSET <= have <= MAX_OPSET:
        return proto
    target = min(max(have, 17), MAX_OPSET)
    try:
        out = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises its own types for ops it cannot move
        raise ExportError(f"{path}: opset {have} is outside what JetPack 6's TensorRT 10.3 parses ({MIN_OPSET}-"
                          f"{MAX_OPSET}) and onnx.version_converter could not convert it to {target} ({exc}); "
                          f"re-export with opset_version={target}") from exc
    log(f"      opset {have} converted to {target} (TensorRT 10.3 parses {MIN_OPSET}-{MAX_OPSET})")
    return out


def _rename(proto, old: str, new: str) -> None:
    g = proto.graph
    for n in g.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for v in [*g.input, *g.output, *g.value_info]:
        if v.name == old:
            v.name = new


def _batch_symbol(value, path: Path, what: str) -> str:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        raise ExportError(f"{path}: {what} {value.name!r} has no shape; export with shapes (torch.onnx does by default)")
    d0 = dims[0]
    if d0.dim_param:
        return d0.dim_param
    raise ExportError(f"{path}: {what} {value.name!r} has a fixed batch of {d0.dim_value}: edge-pfm needs a symbolic "
                      "batch. Export with an example batch >= 2 and dynamic_axes={name: {0: 'batch'}} (or "
                      "dynamic_shapes with torch.export.Dim for dynamo)")


def _rename_batch(proto, symbols: set[str]) -> None:
    g = proto.graph
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in symbols:
                d.dim_param = BATCH_DIM


def fold_batchnorm(proto) -> int:
    """Fold each BatchNormalization that follows a Conv (whose output nothing else reads) into the Conv's weights;
    a BatchNormalization anywhere else stays (TensorRT parses it). -> how many were folded."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    folded, drop = 0, []
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        conv = producer.get(bn.input[0])
        params = bn.input[1:5]
        if (conv is None or conv.op_type != "Conv" or readers.get(bn.input[0], 0) != 1 or bn.input[0] in outputs
                or not all(p in inits for p in params) or conv.input[1] not in inits
                or (len(conv.input) > 2 and conv.input[2] not in inits) or len(bn.output) != 1):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2
             else np.zeros(w.shape[0]))
        scale = gamma / np.sqrt(var + eps)
        w_name, b_name = f"{conv.name or conv.output[0]}.folded_weight", f"{conv.name or conv.output[0]}.folded_bias"
        g.initializer.extend([numpy_helper.from_array((w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32),
                                                      w_name),
                              numpy_helper.from_array(((b - mean) * scale + beta).astype(np.float32), b_name)])
        new_conv = helper.make_node("Conv", [conv.input[0], w_name, b_name], [bn.output[0]], name=conv.name,
                                    domain=conv.domain)
        new_conv.attribute.extend(conv.attribute)
        conv.CopyFrom(new_conv)
        drop.append(bn)
        folded += 1
    for bn in drop:
        g.node.remove(bn)
    return folded


def prune(proto) -> None:
    """Remove nodes and initializers no graph output depends on (after undeclared outputs are dropped)."""
    g = proto.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)


def adapt_graph(proto, spec: ModelSpec, path: Path):
    """The team's graph -> the bundle's: names, batch, outputs, opset, BatchNorm, metadata. Raises ExportError."""
    from onnx import helper

    g = proto.graph
    init_names = {i.name for i in g.initializer}
    graph_inputs = [i for i in g.input if i.name not in init_names]
    have = [i.name for i in graph_inputs]
    declared = [spec.input_names[m] for m in MODALITIES]
    missing = [f"inputs.{m}.name {spec.input_names[m]!r}" for m in MODALITIES if spec.input_names[m] not in have]
    if missing:
        raise ExportError(f"{path}: the spec's {', '.join(missing)} is not an input of the graph, which takes {have}. "
                          + ("A model that ignores one input exports without it (pytorch#64480): make forward use "
                             "both images, or fix the spec's input names" if len(have) < 2 else
                             "Fix the spec's input names"))
    extra = [n for n in have if n not in declared]
    if extra:
        raise ExportError(f"{path}: the graph takes inputs {extra} that the spec does not declare; a bundle feeds "
                          "exactly white_light and fluorescence")
    outputs = {o.name: o for o in g.output}
    wanted = {spec.logits: OUTPUT_NAME, **({spec.lesion_map.name: LESION_MAP} if spec.lesion_map else {})}
    for name, role in wanted.items():
        if name not in outputs:
            key = "outputs.logits" if role == OUTPUT_NAME else "outputs.lesion_map.name"
            raise ExportError(f"{path}: the spec's {key} {name!r} is not an output of the graph, which gives "
                              f"{list(outputs)}")
    dropped = [n for n in outputs if n not in wanted]
    if dropped:
        del g.output[:]
        g.output.extend([outputs[spec.logits]] + ([outputs[spec.lesion_map.name]] if spec.lesion_map else []))
        prune(proto)
        log(f"      outputs {dropped} are not declared in the spec: dropped")
    symbols = {_batch_symbol(v, path, "input") for v in graph_inputs}
    symbols |= {_batch_symbol(v, path, "output") for v in g.output}
    _rename_batch(proto, symbols)
    for m in MODALITIES:
        _rename(proto, spec.input_names[m], m)
    _rename(proto, spec.logits, OUTPUT_NAME)
    if spec.lesion_map:
        if spec.lesion_map.kind == "logits":  # the bundle's map is probabilities, like every other bundle's
            _rename(proto, spec.lesion_map.name, "lesion_map_logits")
            for o in g.output:
                if o.name == "lesion_map_logits":
                    o.name = LESION_MAP
            g.node.append(helper.make_node("Sigmoid", ["lesion_map_logits"], [LESION_MAP], name="edge_pfm/lesion_sigmoid"))
        else:
            _rename(proto, spec.lesion_map.name, LESION_MAP)
    proto = convert_opset(proto, path)
    folded = fold_batchnorm(proto)
    if folded:
        log(f"      folded {folded} BatchNormalization node(s) into the Conv before them")
    from export.onnx_graph import constants_to_initializers, declare_output_shapes, topological_sort

    # weights as initializers (quantizers skip a Conv whose weight is computed), declared static output shapes
    proto = declare_output_shapes(topological_sort(constants_to_initializers(proto)))
    n_classes = proto.graph.output[0].type.tensor_type.shape.dim
    if len(n_classes) != 2 or n_classes[1].dim_value != len(spec.classes):
        got = [d.dim_value or d.dim_param for d in n_classes]
        raise ExportError(f"{path}: the logits output has shape {got}, but the spec names {len(spec.classes)} classes "
                          f"{list(spec.classes)}: fix the spec's classes or the model's head")
    write_spec_metadata(proto, spec.raw)
    proto.ir_version = IR_VERSION_FOR_OPSET.get(default_opset(proto), proto.ir_version)
    proto.producer_name = proto.producer_name or "unknown"
    return proto


def _smoke(onnx_path: Path, spec: ModelSpec) -> tuple[dict, list[dict[str, np.ndarray]]]:
    """ORT CPU on scene feeds: finite outputs of the declared shapes, and batch consistency (each row of a batch
    equals that pair run alone: catches a batch frozen by the exporter or rows mixed by a reshape)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = parity_feeds(spec.preprocessing, n_random=4, n_scenes=8, batch=4)
    outs = [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f))) for f in feeds]
    for f, o in zip(feeds, outs):
        for name, x in o.items():
            if not np.all(np.isfinite(x)):
                raise ExportError(f"{onnx_path}: output {name} is not finite on the parity inputs")
            if x.shape[0] != f[MODALITIES[0]].shape[0]:
                raise ExportError(f"{onnx_path}: output {name} has batch {x.shape[0]} for an input batch of "
                                  f"{f[MODALITIES[0]].shape[0]}: the batch is not consistent")
    batch = feeds[1]
    worst = 0.0
    together = sess.run(None, batch)
    for r in range(batch[MODALITIES[0]].shape[0]):
        alone = sess.run(None, {m: batch[m][r:r + 1] for m in MODALITIES})
        worst = max(worst, *(float(np.abs(a[0] - b[r]).max()) for a, b in zip(alone, together)))
    if worst > TOLERANCE["max_abs_diff"]:
        raise ExportError(f"{onnx_path}: a pair's outputs differ by {worst:.2e} between batch 1 and batch "
                          f"{batch[MODALITIES[0]].shape[0]}: the graph mixes or freezes the batch; re-export with a "
                          "symbolic batch")
    return {"batch_consistency_max_abs_diff": worst, "feeds": len(feeds)}, feeds


def _reference_parity(onnx_path: Path, spec: ModelSpec, inputs_json: Path, outputs_json: Path) -> dict:
    """The team's own reference outputs (polygraphy --save-inputs / --save-outputs) against ORT on our graph."""
    import onnxruntime as ort
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR

    try:
        feeds = load_json(str(inputs_json))
        results = RunResults.load(str(outputs_json))
    except Exception as exc:  # polygraphy raises its own types for a file that is not its JSON
        raise ExportError(f"{inputs_json} / {outputs_json}: not polygraphy --save-inputs / --save-outputs JSON "
                          f"({exc})") from exc
    ref_iters = results[0][1]
    if len(ref_iters) != len(feeds):
        raise ExportError(f"{outputs_json} holds {len(ref_iters)} iterations for {len(feeds)} inputs in {inputs_json}")
    by_name = {spec.input_names[m]: m for m in MODALITIES}
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    worst, agree, n = 0.0, 0, 0
    for feed, ref in zip(feeds, ref_iters):
        unknown = sorted(set(feed) - set(by_name))
        if unknown:
            raise ExportError(f"{inputs_json}: inputs {unknown} are not the spec's input names {sorted(by_name)}")
        got = dict(zip(names, sess.run(None, {by_name[k]: np.asarray(v, np.float32) for k, v in feed.items()})))
        want = np.asarray(ref[spec.logits])
        worst = max(worst, float(np.abs(got[OUTPUT_NAME] - want).max()))
        agree += int((got[OUTPUT_NAME].argmax(1) == want.argmax(1)).sum())
        n += len(want)
    report = {"reference": f"the team's reference outputs ({outputs_json.name})", "pairs": n, "max_abs_diff": worst,
              "top1_agreement": agree / n if n else float("nan"), "tolerance": TOLERANCE}
    report["passed"] = bool(worst <= TOLERANCE["max_abs_diff"] and agree == n)
    return report


def training_provenance(spec: ModelSpec, trained_on: str | Path | None) -> dict:
    """provenance.training: what the command line (--trained-on, which wins) or the spec (training.data) says the
    model was trained on, with its split (export.splits.training_record); {} when neither says. Read before
    anything is exported: a wrong folder fails in seconds, not after the build."""
    from export.splits import training_record

    data = trained_on if trained_on is not None else spec.training_data
    if data is None:
        return {}
    record = training_record(data, spec.classes)
    record["declared_by"] = "--trained-on" if trained_on is not None else "the spec's training.data"
    split = record["splits"]
    log(f"      trained on {record['data']}: " + (f"{split['source']}, train {split['train_samples']}, val "
                                                  f"{split['val_samples']}, test {split['test_samples']} pairs"
                                                  if split else record["note"]))
    return record


def bundle_from_onnx(onnx_path: str | Path, spec: ModelSpec | str | Path, out: str | Path, max_batch: int = 8,
                     reference_inputs: str | Path | None = None, reference_outputs: str | Path | None = None,
                     provenance: dict | None = None, trained_on: str | Path | None = None,
                     bundle_version: int | None = None) -> dict:
    """Write a bundle to `out` from a team's ONNX; nothing is left at `out` unless every check passed. -> manifest.
    provenance: what the bundle came from, when not a bare ONNX (the model door's module and weights).
    trained_on: the paired dataset the model was trained on (else the spec's training.data), recorded with its
    split in provenance.training (training_provenance)."""
    import onnx

    onnx_path = Path(onnx_path)
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.load(spec)
    provenance = dict(provenance or {})
    if "training" not in provenance:  # the model door has read it already
        provenance["training"] = training_provenance(spec, trained_on)
    if (reference_inputs is None) != (reference_outputs is None):
        raise ExportError("give both --reference-inputs and --reference-outputs, or neither")
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path} does not exist; pass the ONNX your exporter wrote")
    log(f"[1/4] loading {onnx_path}")
    try:
        proto = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{onnx_path} is not a loadable ONNX model ({type(exc).__name__}: {exc})") from exc
    source_sha = sha256_file(onnx_path)
    with atomic_directory(out) as tmp:
        log("[2/4] adapting the graph (names, batch, outputs, opset, BatchNorm) and checking it")
        proto = adapt_graph(proto, spec, onnx_path)
        graph = check_graph(proto)
        model_path = save_onnx(proto, tmp / "model.onnx")
        log(f"      {graph['nodes']} nodes; census {graph['op_census']}")
        build_check = check_artifact(model_path, "fp32", max_batch)
        log(f"      {summary_line('model.onnx', build_check)}")
        log("[3/4] ONNX Runtime CPU: finite outputs, batch consistency" + (", parity against your reference outputs"
                                                                         if reference_outputs else ""))
        smoke, feeds = _smoke(model_path, spec)
        if reference_outputs:
            parity = _reference_parity(model_path, spec, Path(reference_inputs), Path(reference_outputs))
            if not parity["passed"]:
                raise ExportError(f"parity against {reference_outputs} failed: max |dlogit| {parity['max_abs_diff']:.3e}"
                                  f" (<= {TOLERANCE['max_abs_diff']:g}), top-1 agreement {parity['top1_agreement']:.2%}"
                                  " (100 %) required; this ONNX does not compute what your reference did. Nothing "
                                  "was written.")
        else:
            parity = {"reference": None, "passed": None,
                      "note": "no reference outputs were given (--reference-inputs/--reference-outputs): parity with "
                              "the team's framework was not checked"}
        _write_device_reference(model_path, feeds, tmp / "parity")
        atomic_write_json(tmp / "report.json", {"source_onnx_sha256": source_sha, "graph": graph, "parity": parity,
                                                "smoke": smoke, "build_check": build_check})
        log("[4/4] writing manifest")
        lesion = []
        if spec.lesion_map:
            shape = [d.dim_value or d.dim_param for d in proto.graph.output[1].type.tensor_type.shape.dim]
            lesion = [{"name": LESION_MAP, "shape": shape, "dtype": "float32", "stride": spec.lesion_map.stride,
                       "threshold": 0.5, "source_modality": "white_light", "shown_for": list(spec.roles.lesion),
                       "measurements": {},
                       "meaning": "per-cell lesion probability (the team's map head); shown only once measured"}]
        manifest = {
            "schema": SCHEMA, "schema_version": schema_version_for(spec.preprocessing),
            "bundle_version": new_bundle_version(bundle_version),
            "model": {"family": spec.family, "source": provenance.get("source", "user-onnx"),
                      "classes": list(spec.classes),
                      "roles": spec.roles.to_dict()},
            "inputs": [{"name": m, "modality": m, "shape": [BATCH_DIM, *spec.preprocessing[m].input_shape],
                        "dtype": "float32", "preprocessing": spec.preprocessing[m].to_dict(),
                        "source_name": spec.input_names[m]} for m in MODALITIES],
            "outputs": [{"name": OUTPUT_NAME, "shape": [BATCH_DIM, len(spec.classes)], "dtype": "float32",
                         "meaning": "unnormalised class scores; softmax gives probabilities; index i is classes[i]",
                         "source_name": spec.logits}, *lesion],
            "batch": {"min": 1, "opt": 1, "max": int(max_batch)},
            "artifacts": {},
            "spec": spec.raw,
            "provenance": {
                "source": "user-onnx", "source_onnx": onnx_path.name, "source_onnx_sha256": source_sha,
                "source_producer": f"{proto.producer_name} {proto.producer_version}".strip(),
                "exporter": f"edge-pfm {edge_pfm.__version__} (ONNX door)", "opset": graph["opset"],
                "ir_version": graph["ir_version"],
                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                # {} when nobody said: then synthetic calibration data is not assumed to fit, nor any split
                "training": {},
                **provenance,
            },
            "parity": {k: parity[k] for k in ("reference", "pairs", "max_abs_diff", "top1_agreement", "passed", "note")
                       if k in parity},
            "build_checks": {"model.onnx": build_check},
        }
        manifest["references"], ref_roles = fp32_references(tmp, spec.preprocessing, {m: m for m in MODALITIES}, log)
        write_manifest(tmp, manifest, {
            **ref_roles,
            "model.onnx": "fp32 onnx", "report.json": "export report",
            "parity/inputs.json": "polygraphy reference inputs", "parity/outputs.json": "onnxruntime CPU reference "
                                                                                       "outputs (device parity)"})
    log(f"wrote bundle {out} ({MANIFEST}, model.onnx)")
    return manifest


def _write_device_reference(model_path: Path, feeds: list, out_dir: Path, n: int = 2) -> None:
    """Reference I/O for checking an engine on the device against ONNX Runtime CPU (not a parity claim)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = OnnxrtRunner(SessionFromOnnx(str(model_path), providers=["CPUExecutionProvider"]),
                          name="onnxruntime-cpu")
    results = Comparator.run([runner], data_loader=feeds[:n])
    save_json(feeds[:n], str(out_dir / "inputs.json"))
    results.save(str(out_dir / "outputs.json"))
