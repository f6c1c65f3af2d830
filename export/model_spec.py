"""The model spec: what a team's own model or ONNX must say about itself so edge-pfm can deploy it.

    {"spec": "edge-pfm/model-spec v1",
     "classes": ["normal", "inflammation", "lsil", "hsil"],
     "roles": {"no_lesion": "normal", "lesion": ["lsil", "hsil"], "critical": ["hsil"]},
     "inputs": {"white_light":  {"name": "white", "channels": 3, "size": [224, 224],
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                "fluorescence": {"name": "fluo", "channels": 3, "size": [224, 224],
                                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
     "outputs": {"logits": "logits", "lesion_map": null}}

- `size` is [height, width]; `mean`/`std` apply to RGB (colour_order) pixels scaled to [0, 1]. Optional per input:
  `colour_order` (RGB | BGR | GRAY, default RGB), `resize` (center_crop | stretch, default center_crop),
  `crop_pct` (with center_crop, the central fraction kept, timm's crop_pct, default 1.0) and `interpolation`
  (INTER_AREA | INTER_LINEAR, default INTER_AREA), in edge_pfm.preprocess's terms.
- `outputs.lesion_map`: null, or {"name": ..., "kind": "probabilities" | "logits", "stride": 8}.
- `roles` (optional, default ours by class name, edge_pfm.roles); `model_args` (optional) are passed to a
  `--model` factory; `call` is "positional" (model(white, fluo), the default) or "keyword" (by input name).
- `training` (optional): {"data": "DIR"}, the paired dataset the model was trained on (a relative path is the
  spec file's folder's); the bundle's provenance records it and its split (python -m export's --trained-on, which
  wins over it), so calibration keeps the team's training pairs out of val and the gate.

No torch: the ONNX door reads it too. Every error names the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_pfm.bundle import MODALITIES
from edge_pfm.errors import EdgePfmError
from edge_pfm.fileio import read_json
from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.roles import ClassRoles, RolesError

SPEC_TAG = "edge-pfm/model-spec v1"
SPEC_METADATA_KEY = "edge_pfm.spec"  # the ONNX metadata_props entry: a loose model.onnx still says how to feed it
INPUT_KEYS = {"name", "channels", "size", "mean", "std", "colour_order", "resize", "interpolation", "crop_pct"}
TOP_KEYS = {"spec", "classes", "roles", "inputs", "outputs", "model_args", "call", "family", "training"}
TRAINING_KEYS = {"data"}
MAP_KINDS = ("probabilities", "logits")


class SpecError(EdgePfmError, ValueError):
    """A model spec is missing a key or has a wrong value; the message names the file and the key."""


@dataclass(frozen=True)
class LesionMapOutput:
    name: str
    kind: str  # probabilities | logits
    stride: int


@dataclass(frozen=True)
class ModelSpec:
    classes: tuple[str, ...]
    roles: ClassRoles
    input_names: dict[str, str]  # modality -> the model's input name
    preprocessing: dict[str, PreprocessSpec]
    logits: str
    lesion_map: LesionMapOutput | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    call: str = "positional"
    family: str = "user"
    training_data: str | None = None  # the spec's training.data: where the model was trained
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # as written: goes into the manifest and ONNX

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"spec file {p} does not exist; write one (see export/model_spec.py or docs/bring-your-own.md)")
        spec = cls.from_dict(read_json(p, SpecError), str(p))
        if spec.training_data is not None and not Path(spec.training_data).is_absolute():
            # the spec's folder, not the shell's: the spec means the same wherever the command runs
            return replace(spec, training_data=str(p.parent / spec.training_data))
        return spec

    @classmethod
    def from_dict(cls, d: Any, where: str = "spec") -> ModelSpec:
        def fail(key: str, why: str) -> SpecError:
            return SpecError(f"{where}: {key}: {why}")

        if not isinstance(d, dict):
            raise fail("(top level)", f"expected a JSON object, got {type(d).__name__}")
        for key in ("spec", "classes", "inputs", "outputs"):
            if key not in d:
                raise fail(key, f"missing (a spec needs {', '.join(('spec', 'classes', 'inputs', 'outputs'))})")
        if d["spec"] != SPEC_TAG:
            raise fail("spec", f"{d['spec']!r} is not {SPEC_TAG!r}")
        unknown = sorted(set(d) - TOP_KEYS)
        if unknown:
            raise fail(", ".join(unknown), f"unknown key(s); a spec takes {sorted(TOP_KEYS)}")
        classes = d["classes"]
        if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
                or len(set(classes)) != len(classes)):
            raise fail("classes", f"need a list of >= 2 distinct class names in logit order, got {classes!r}")
        try:
            roles = (ClassRoles.from_dict(d["roles"], classes, "roles") if "roles" in d
                     else ClassRoles.default_for(classes))
        except RolesError as exc:
            raise SpecError(f"{where}: {exc}") from None
        inputs = d["inputs"]
        if not isinstance(inputs, dict) or sorted(inputs) != sorted(MODALITIES):
            raise fail("inputs", f"needs exactly the keys {list(MODALITIES)}, got "
                                 f"{sorted(inputs) if isinstance(inputs, dict) else inputs!r}")
        names, specs = {}, {}
        for m in MODALITIES:
            i = inputs[m]
            if not isinstance(i, dict):
                raise fail(f"inputs.{m}", "must be an object")
            missing = [k for k in ("name", "channels", "size", "mean", "std") if k not in i]
            if missing:
                raise fail(f"inputs.{m}.{missing[0]}", "missing")
            bad = sorted(set(i) - INPUT_KEYS)
            if bad:
                raise fail(f"inputs.{m}.{bad[0]}", f"unknown key; an input takes {sorted(INPUT_KEYS)}")
            if not isinstance(i["name"], str) or not i["name"]:
                raise fail(f"inputs.{m}.name", f"must be the model's input name, got {i['name']!r}")
            names[m] = i["name"]
            try:
                specs[m] = PreprocessSpec(size=tuple(i["size"]), channels=int(i["channels"]),
                                          colour_order=i.get("colour_order", "GRAY" if i["channels"] == 1 else "RGB"),
                                          resize=i.get("resize", "center_crop"),
                                          interpolation=i.get("interpolation", "INTER_AREA"),
                                          crop_pct=i.get("crop_pct", 1.0),
                                          mean=tuple(i["mean"]), std=tuple(i["std"]))
            except (TypeError, ValueError) as exc:
                raise fail(f"inputs.{m}", str(exc)) from None
        if names["white_light"] == names["fluorescence"]:
            raise fail("inputs", f"both modalities name the input {names['white_light']!r}")
        outputs = d["outputs"]
        if not isinstance(outputs, dict) or not isinstance(outputs.get("logits"), str):
            raise fail("outputs.logits", "must name the model's class-logits output")
        lesion = outputs.get("lesion_map")
        lesion_out = None
        if lesion is not None:
            if not isinstance(lesion, dict) or not isinstance(lesion.get("name"), str):
                raise fail("outputs.lesion_map", "null, or {\"name\": ..., \"kind\": \"probabilities\"|\"logits\", "
                                                 "\"stride\": N}")
            if lesion.get("kind") not in MAP_KINDS:
                raise fail("outputs.lesion_map.kind", f"must be one of {MAP_KINDS}, got {lesion.get('kind')!r}")
            if not isinstance(lesion.get("stride"), int) or lesion["stride"] < 1:
                raise fail("outputs.lesion_map.stride", f"must be a positive integer, got {lesion.get('stride')!r}")
            lesion_out = LesionMapOutput(lesion["name"], lesion["kind"], lesion["stride"])
        unknown_out = sorted(set(outputs) - {"logits", "lesion_map"})
        if unknown_out:
            raise fail(f"outputs.{unknown_out[0]}", "unknown output; a spec names logits and lesion_map")
        call = d.get("call", "positional")
        if call not in ("positional", "keyword"):
            raise fail("call", f"must be positional or keyword, got {call!r}")
        model_args = d.get("model_args", {})
        if not isinstance(model_args, dict):
            raise fail("model_args", "must be an object of keyword arguments for the factory")
        training = d.get("training", {})
        if not isinstance(training, dict):
            raise fail("training", "must be an object: {\"data\": \"DIR\"}, the folder the model was trained on")
        bad = sorted(set(training) - TRAINING_KEYS)
        if bad:
            raise fail(f"training.{bad[0]}", f"unknown key; training takes {sorted(TRAINING_KEYS)}")
        data = training.get("data")
        if data is not None and (not isinstance(data, str) or not data):
            raise fail("training.data", f"must be the path of the paired dataset the model was trained on, got {data!r}")
        return cls(tuple(classes), roles, names, specs, outputs["logits"], lesion_out, model_args, call,
                   str(d.get("family", "user")), data, d)


def native_spec(classes: tuple[str, ...], roles: ClassRoles, preprocessing: dict[str, PreprocessSpec],
                lesion_stride: int | None) -> dict[str, Any]:
    """The spec of our own PFM, as a team would write it: a native checkpoint's bundle records one too."""
    raw = {"spec": SPEC_TAG, "family": "PFM", "classes": list(classes), "roles": roles.to_dict(),
           "inputs": {m: {"name": m, **{k: v for k, v in preprocessing[m].to_dict().items() if k in INPUT_KEYS}}
                      for m in MODALITIES},
           "outputs": {"logits": "logits", "lesion_map": None if lesion_stride is None else
                       {"name": "lesion_map", "kind": "probabilities", "stride": lesion_stride}}}
    ModelSpec.from_dict(raw, "native spec")  # it must read back as any team's does
    return raw


def write_spec_metadata(proto: Any, raw: dict[str, Any]) -> None:
    """The spec into an ONNX ModelProto's metadata_props (replacing what was there)."""
    import json

    del proto.metadata_props[:]
    proto.metadata_props.add(key=SPEC_METADATA_KEY, value=json.dumps(raw, sort_keys=True))
