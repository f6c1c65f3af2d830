"""The model door: a team's own dual-input nn.Module + weights + spec -> a verified bundle.

    python -m export --model FILE.py:FACTORY --weights W.pt --spec SPEC.json --out BUNDLE
    python -m export --model package.module:FACTORY --weights W.pt --spec SPEC.json --out BUNDLE

This imports and runs the team's code (the factory is called with the spec's model_args). The weights load
with torch.load(weights_only=True) and strict=True: a state_dict, or a dict holding one (state_dict, model,
state_dict_ema, model_ema, in that order), with DDP's `module.` and torch.compile's `_orig_mod.` prefixes
stripped. An adapter gives the graph the bundle's names whatever the model returns (a tensor, a tuple or a
dict); the export runs with PyTorch's fused attention fast path off (pytorch#94434). The exported graph then
passes the ONNX door's gates, with parity against the module itself on the parity set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge_pfm.bundle import MODALITIES
from edge_pfm.fileio import sha256_file
from export.model_spec import LesionMapOutput, ModelSpec
from export.onnx_graph import LESION_MAP, OUTPUT_NAME, ExportError
from export.parity_feeds import parity_feeds
from export.progress import log

WEIGHT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
PREFIXES = ("module.", "_orig_mod.")


def load_factory(ref: str) -> Callable[..., torch.nn.Module]:
    """'path/to/file.py:make_model' or 'package.module:make_model' -> the callable (imports the team's code)."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name:
        raise ExportError(f"--model {ref!r}: expected FILE.py:FACTORY or package.module:FACTORY")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ExportError(f"--model: {path} does not exist")
            mod_name = "edge_pfm_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ExportError:
        raise
    except Exception as exc:  # the team's module failed to import: say where
        raise ExportError(f"--model {ref!r}: importing {target} failed ({type(exc).__name__}: {exc})") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ExportError(f"--model {ref!r}: {target} has no callable {name!r}")
    return factory


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """-> (state_dict with DDP / torch.compile prefixes stripped, where in the file it was found)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--weights {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused by weights_only, corrupt, not a torch file
        raise ExportError(f"--weights {path} is not loadable with torch.load(weights_only=True) "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); save the state_dict "
                          "(torch.save(model.state_dict(), W))") from exc
    where = "the file itself"
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WEIGHT_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise ExportError(f"--weights {path}: a dict without a state_dict under any of {WEIGHT_KEYS}")
        obj, where = obj[key], f"key {key!r}"
    if not isinstance(obj, dict):
        raise ExportError(f"--weights {path}: expected a state_dict, got {type(obj).__name__}")

    def strip(k: str) -> str:
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        return k

    return {strip(k): v for k, v in obj.items()}, where


def build_model(factory: Callable[..., torch.nn.Module], spec: ModelSpec, weights: str | Path) -> torch.nn.Module:
    try:
        model = factory(**spec.model_args)
    except Exception as exc:  # the team's constructor
        raise ExportError(f"the factory failed with the spec's model_args {spec.model_args} "
                          f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"the factory returned {type(model).__name__}, not a torch.nn.Module")
    state, where = load_weights(weights)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: weights {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = ([f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else [])
        parts += [f"unexpected keys: {', '.join(unexpected[:8])}"] if unexpected else []
        parts += [f"shape mismatches: {'; '.join(mismatched[:8])}"] if mismatched else []
        raise ExportError(f"--weights {weights} ({where}) does not fit the model the factory built: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)
    return model.eval()


class SpecAdapter(torch.nn.Module):
    """(white_light, fluorescence) -> logits[, lesion-map probabilities], whatever the team's forward returns."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, white_light: torch.Tensor, fluorescence: torch.Tensor):
        s = self.spec
        if s.call == "keyword":
            out = self.model(**{s.input_names["white_light"]: white_light, s.input_names["fluorescence"]: fluorescence})
        else:
            out = self.model(white_light, fluorescence)
        if isinstance(out, dict):
            logits, lesion = out[s.logits], (out[s.lesion_map.name] if s.lesion_map else None)
        elif isinstance(out, tuple | list):
            logits, lesion = out[0], (out[1] if s.lesion_map else None)
        else:
            logits, lesion = out, None
        if s.lesion_map is None:
            return logits
        return logits, (lesion.sigmoid() if s.lesion_map.kind == "logits" else lesion)


def bundle_from_model(model_ref: str, weights: str | Path, spec: ModelSpec | str | Path, out: str | Path,
                      max_batch: int = 8, opset: int = 17, parity_pairs: int = 64,
                      trained_on: str | Path | None = None, bundle_version: int | None = None) -> dict:
    """Export a team's module through the ONNX door, with parity against the module itself. -> manifest.
    trained_on: as bundle_from_onnx's, read first (a wrong folder fails before the export)."""
    from export.onnx_door import bundle_from_onnx, training_provenance

    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.load(spec)
    training = training_provenance(spec, trained_on)
    log(f"[0/4] building the model: {model_ref} (runs your code) with {weights}")
    model = build_model(load_factory(model_ref), spec, weights)
    adapter = SpecAdapter(model, spec).eval()
    names = [OUTPUT_NAME] + ([LESION_MAP] if spec.lesion_map else [])
    example = tuple(torch.randn(2, *spec.preprocessing[m].input_shape) for m in MODALITIES)
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:  # the fused fast path exports an op ONNX lacks (aten::_transformer_encoder_layer_fwd, pytorch#94434)
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            torch.onnx.export(adapter, example, buf, dynamo=False, opset_version=opset, input_names=list(MODALITIES),
                              output_names=names, do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"} for n in [*MODALITIES, *names]})
    except ExportError:
        raise
    except Exception as exc:  # torch.onnx's own errors name the op
        raise ExportError(f"torch.onnx.export failed on {model_ref} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]})") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    # the graph now has the bundle's names: the ONNX door checks it with a spec that says so
    onnx_spec = dataclasses.replace(
        spec, input_names={m: m for m in MODALITIES}, logits=OUTPUT_NAME,
        lesion_map=LesionMapOutput(LESION_MAP, "probabilities", spec.lesion_map.stride) if spec.lesion_map else None)
    feeds = parity_feeds(spec.preprocessing, parity_pairs // 2, parity_pairs - parity_pairs // 2)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR

        onnx_path = Path(tmp) / "exported.onnx"
        onnx_path.write_bytes(buf.getvalue())
        iterations = []
        for f in feeds:
            got = adapter(*(torch.from_numpy(np.ascontiguousarray(f[m])) for m in MODALITIES))
            got = got if isinstance(got, tuple) else (got,)
            iterations.append({n: t.numpy() for n, t in zip(names, got)})
        save_json(feeds, str(Path(tmp) / "inputs.json"))
        results = RunResults()
        results.append(("pytorch (your module, CPU, eval)", iterations))
        results.save(str(Path(tmp) / "outputs.json"))
        return bundle_from_onnx(onnx_path, onnx_spec, out, max_batch, Path(tmp) / "inputs.json",
                                Path(tmp) / "outputs.json",
                                provenance={"source": "user-model", "model": model_ref,
                                            "source_onnx": "exported by edge-pfm from the module (torch.onnx, legacy)",
                                            "weights": Path(weights).name, "weights_sha256": sha256_file(weights),
                                            "training": training},
                                bundle_version=bundle_version)
