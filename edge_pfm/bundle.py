"""The bundle: a directory that is the unit of deployment.

    bundle/
      manifest.json        schema, classes, inputs + preprocessing, outputs, artifacts + sha256,
                           provenance, parity / calibration / accuracy facts
      model.onnx           FP32, batch dimension symbolic
      model.int8.onnx      explicit Q/DQ INT8 (after calibration)
      calibration.cache    TensorRT calibration cache text (after calibration)
      report.json/.md      parity (and accuracy) reports
      parity/              polygraphy reference inputs/outputs

`Bundle.load` verifies every artifact's sha256 before anything is deserialised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_pfm.errors import EdgePfmError
from edge_pfm.fileio import atomic_write_json, read_json, sha256_file
from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.roles import ClassRoles, RolesError
from edge_pfm.trust.settings import Trust

SCHEMA = "edge-pfm/bundle"
SCHEMA_VERSION = 1
# v2: an input's preprocessing uses a field v1 readers do not know (crop_pct != 1): written only then, so an older
# runtime refuses the bundle instead of ignoring the field and feeding the model a different crop
SCHEMA_VERSIONS_READ = (1, 2)
MANIFEST = "manifest.json"
MODALITIES = ("white_light", "fluorescence")  # the two inputs, everywhere: defined here only
REQUIRED_FIELDS = ("schema", "schema_version", "model", "inputs", "outputs", "artifacts", "provenance")
# precision -> artifact that holds that model
MODEL_ARTIFACTS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


class BundleError(EdgePfmError, ValueError):
    """A bundle is missing, malformed or tampered with; the message names the file and the fix."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str


def _fix(path: Path) -> str:
    return f"re-export the bundle (python -m export --checkpoint CKPT --out {path})"


class Bundle:
    """A verified bundle directory. Cheap to load: json + sha256, no ONNX parsing."""

    def __init__(self, root: Path, manifest: dict[str, Any], trust: Trust | None = None):
        self.root = root
        self.manifest = manifest
        # the device's trust settings this bundle was loaded under: its keys, and the state directory whose secret
        # seals the engine cache's records (edge_pfm.trust.device_secret)
        self.trust = trust or Trust()
        self.signature = None  # edge_pfm.trust.signature.Verdict, set by load()
        m = manifest
        self.classes: tuple[str, ...] = tuple(m["model"]["classes"])
        self.inputs = [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in m["inputs"]]
        self.outputs = [TensorSpec(o["name"], tuple(o["shape"]), o["dtype"]) for o in m["outputs"]]
        # the lesion map's manifest entry (meaning, stride, threshold, frame mapping), or None without the head
        self.lesion_map = next((o for o in m["outputs"] if o["name"] == "lesion_map"), None)
        self.preprocessing = {i["modality"]: PreprocessSpec.from_dict(i["preprocessing"]) for i in m["inputs"]}
        self.input_names = {i["modality"]: i["name"] for i in m["inputs"]}
        # bundles from before roles were recorded get ours, by class name
        self.roles = (ClassRoles.from_dict(m["model"]["roles"], self.classes, "manifest model.roles")
                      if "roles" in m["model"] else ClassRoles.default_for(self.classes))

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True, trust: Trust | None = None,
             hold_floor: bool = True) -> Bundle:
        """`trust`: the keys and state directory to hold the bundle to (default: Trust.default(), the device's
        config as every command finds it). With a trusted key, the bundle must be signed by it, unchanged, and not
        older than the device's rollback floor (edge_pfm.trust); the manifest parsed is the one that was verified.
        `verify=False` skips the artifacts' hashes of an unsigned bundle (tools that repair one; never the device).
        `hold_floor=False`: the signature is verified but the floor is not held; only for the bundle store's own
        versions, which were held to the floor when installed (edge_pfm.store: a rollback to `previous`)."""
        from edge_pfm.trust.signature import unverified

        root = Path(path)
        trust = trust or Trust.default()
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"bundle {root} is not a directory; {_fix(root)}")
        if not mpath.is_file():
            raise BundleError(f"{mpath} is missing: {root} is not a bundle; {_fix(root)}")
        if trust.required:
            manifest, verdict = cls._verified_manifest(root, trust, hold_floor)
        else:
            manifest = read_json(mpath, BundleError, _fix(root))
            cls._validated(manifest, mpath, root)
            if verify:
                cls.verify_artifacts(root, manifest)
            verdict = unverified(root, trust.trusted_keys, manifest.get("bundle_version"))
        try:
            bundle = cls(root, manifest, trust)
        except RolesError as exc:
            raise BundleError(f"{mpath}: {exc}; {_fix(root)}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{mpath}: malformed entry ({type(exc).__name__}: {exc}); {_fix(root)}") from exc
        bundle.signature = verdict
        return bundle

    @classmethod
    def _verified_manifest(cls, root: Path, trust: Trust, hold_floor: bool = True) -> tuple[dict[str, Any], Any]:
        """The signed manifest, its artifacts' hashes matched to the signed digests, and the rollback floor held."""
        import json

        from edge_pfm.trust.rollback import check_floor
        from edge_pfm.trust.signature import verify_bundle

        mpath = root / MANIFEST
        verdict, manifest_bytes = verify_bundle(root, trust.key_files())
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc}); {_fix(root)}") from exc
        cls._validated(manifest, mpath, root)
        for name, a in manifest["artifacts"].items():  # the files were hashed against the signature just now
            if verdict.digests.get(name) != a["sha256"]:
                raise BundleError(f"{root / name}: the manifest's sha256 is not the signed file's; {_fix(root)}")
        if hold_floor:
            check_floor(manifest.get("bundle_version"), trust.writable_state_dir(), root)
        return manifest, verdict

    @classmethod
    def _validated(cls, manifest: Any, mpath: Path, root: Path) -> None:
        try:
            cls.validate_manifest(manifest, mpath)
        except BundleError:
            raise
        except (TypeError, AttributeError, KeyError, ValueError) as exc:  # a structure nobody anticipated
            raise BundleError(f"{mpath} is malformed ({type(exc).__name__}: {exc}); {_fix(root)}") from exc

    @staticmethod
    def validate_manifest(m: Any, mpath: Path) -> None:
        if not isinstance(m, dict):
            raise BundleError(f"{mpath}: expected a JSON object, got {type(m).__name__}")
        missing = [k for k in REQUIRED_FIELDS if k not in m]
        if missing:
            raise BundleError(f"{mpath} lacks required fields {missing}; {_fix(mpath.parent)}")
        if m["schema"] != SCHEMA:
            raise BundleError(f"{mpath}: schema {m['schema']!r} is not {SCHEMA!r}; this is not an edge-pfm bundle")
        if m["schema_version"] not in SCHEMA_VERSIONS_READ:
            raise BundleError(
                f"{mpath}: schema_version {m['schema_version']!r} is not supported (this edge-pfm reads "
                f"{list(SCHEMA_VERSIONS_READ)}); re-export the bundle with a matching edge-pfm, or upgrade edge-pfm"
            )
        model, inputs, outputs, artifacts = m["model"], m["inputs"], m["outputs"], m["artifacts"]
        problems = []
        if not isinstance(model, dict) or not isinstance(model.get("classes"), list) or not model["classes"]:
            problems.append("model.classes must be a non-empty list")
        elif not all(isinstance(c, str) for c in model["classes"]):
            problems.append("model.classes must be strings")
        if not isinstance(inputs, list) or sorted(i.get("modality", "") for i in inputs if isinstance(i, dict)) != sorted(
            MODALITIES
        ):
            problems.append(f"inputs must list one entry per modality {MODALITIES}")
        else:
            for i in inputs:
                if not all(k in i for k in ("name", "shape", "dtype", "preprocessing")):
                    problems.append(f"input {i.get('name')!r} needs name, shape, dtype, preprocessing")
                    continue
                try:
                    PreprocessSpec.from_dict(i["preprocessing"])
                except (TypeError, ValueError) as exc:
                    problems.append(f"input {i.get('name')!r}: {exc}")
        if (not isinstance(outputs, list) or not 1 <= len(outputs) <= 2 or not all(isinstance(o, dict) for o in outputs)
                or outputs[0].get("name") != "logits"
                or (len(outputs) == 2 and outputs[1].get("name") != "lesion_map")):
            problems.append("outputs must be [logits] or [logits, lesion_map]")
        elif isinstance(model, dict) and isinstance(model.get("classes"), list):
            shape = outputs[0].get("shape", [])
            if not isinstance(shape, list) or len(shape) != 2 or shape[1] != len(model["classes"]):
                problems.append(
                    f"output shape {shape} does not match {len(model['classes'])} classes "
                    "(expected [batch, num_classes])"
                )
            if len(outputs) == 2:
                lshape = outputs[1].get("shape", [])
                if not isinstance(lshape, list) or len(lshape) != 4 or lshape[1] != 1 or outputs[1].get("stride") is None:
                    problems.append(f"lesion_map needs shape [batch, 1, h, w] and a stride, got {lshape}")
        if not isinstance(artifacts, dict) or MODEL_ARTIFACTS["fp32"] not in artifacts:
            problems.append(f"artifacts must include {MODEL_ARTIFACTS['fp32']}")
        else:
            for name, a in artifacts.items():
                if not isinstance(a, dict) or not isinstance(a.get("sha256"), str) or len(a["sha256"]) != 64:
                    problems.append(f"artifact {name!r} needs a sha256")
                if not isinstance(name, str) or "/" in name.replace("parity/", "") or ".." in name:
                    problems.append(f"artifact name {name!r} must be a plain file name in the bundle")
        version = m.get("bundle_version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            problems.append(f"bundle_version must be a positive integer, got {version!r}")
        if problems:
            raise BundleError(f"{mpath} is invalid: " + "; ".join(problems))

    @staticmethod
    def verify_artifacts(root: Path, manifest: dict[str, Any]) -> None:
        for name, a in manifest["artifacts"].items():
            f = root / name
            if not f.is_file():
                raise BundleError(f"{f} is listed in {MANIFEST} but missing; copy the whole bundle or {_fix(root)}")
            digest = sha256_file(f)
            if digest != a["sha256"]:
                raise BundleError(
                    f"{f}: sha256 mismatch (manifest {a['sha256'][:12]}..., file {digest[:12]}...): the file was "
                    f"modified or corrupted after export; restore it from the original bundle or {_fix(root)}"
                )

    # ---- accessors -----------------------------------------------------------------------------
    def model_path(self, precision: str = "fp32") -> Path:
        name = MODEL_ARTIFACTS.get(precision)
        if name is None:
            raise BundleError(f"unknown precision {precision!r}; bundles hold {sorted(MODEL_ARTIFACTS)}")
        if name not in self.manifest["artifacts"]:
            raise BundleError(
                f"{self.root} has no {precision} model ({name}); run calibration first: "
                f"python -m calibration --bundle {self.root} --synthetic 512"
            )
        return self.root / name

    def read_artifact(self, name: str) -> bytes:
        """An artifact's bytes, checked against the manifest's sha256 (signed, on a device with trusted keys): what
        a backend loads is what was verified, even if the file changed after the bundle was loaded."""
        import hashlib

        data = (self.root / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256(name):
            raise BundleError(f"{self.root / name} changed after the bundle was loaded (sha256 no longer matches the "
                              f"{'signed ' if self.signature.verified else ''}manifest); restore the bundle")
        return data

    def has(self, artifact: str) -> bool:
        return artifact in self.manifest["artifacts"]

    def sha256(self, artifact: str = "model.onnx") -> str:
        return self.manifest["artifacts"][artifact]["sha256"]

    @property
    def max_batch(self) -> int:
        return int(self.manifest.get("batch", {}).get("max", 1))

    def summary(self) -> str:
        m = self.manifest
        lines = [f"bundle {self.root}  (schema v{m['schema_version']})",
                 f"  model    {m['model'].get('variant') or m['model'].get('family', '?')}  classes {', '.join(self.classes)}"]
        for i in m["inputs"]:
            p = i["preprocessing"]
            crop = f" crop_pct={p['crop_pct']}" if p.get("crop_pct", 1.0) != 1.0 else ""
            lines.append(f"  input    {i['name']} {i['shape']} {i['dtype']}  {p['colour_order']} {p['resize']}{crop} "
                         f"{p.get('interpolation', 'INTER_AREA')} mean={p['mean']} std={p['std']}")
        for name, a in m["artifacts"].items():
            lines.append(f"  artifact {name:22s} {a['sha256'][:16]}  {a.get('bytes', '?')} bytes")
        if "parity" in m:
            p = m["parity"]
            lines.append(f"  parity   max|dlogit| {p.get('max_abs_diff')}  top-1 {p.get('top1_agreement')}"
                         if "max_abs_diff" in p else f"  parity   not checked: {p.get('note', 'no reference')}")
        check = m.get("preprocessing_check")
        if check:
            diffs = ", ".join(f"{k} {v['mean_abs_grey_levels']:.2f}" for k, v in check["modalities"].items())
            lines.append(f"  preproc  checked against the team's tensors on {check['pairs']} pairs: mean difference "
                         f"{diffs} grey levels, model top-1 agreement {check['top1_agreement']:.2%}")
        elif m["model"].get("source", "").startswith("user-"):
            lines.append("  preproc  not checked against the team's pipeline (python -m export ... --check-preprocessing DIR)")
        if "calibration" in m:
            c = m["calibration"]
            ops = "/".join(c.get("quantized_ops", ["Conv"]))
            lines.append(f"  int8     {ops} quantized, {c.get('method')} ranges on {c.get('samples')} samples, "
                         f"TensorRT {c.get('trt_version')}")
        return "\n".join(lines)


def new_bundle_version(given: int | None = None) -> int:
    """A bundle's `bundle_version`, the integer a device's rollback floor compares (edge_pfm.trust.rollback):
    `given`, else the export's UTC time as YYYYMMDDHHMMSS, so that a later export is a higher version."""
    if given is None:
        import time

        return int(time.strftime("%Y%m%d%H%M%S", time.gmtime()))
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise BundleError(f"a bundle version is a positive integer, got {given!r}")
    return given


def schema_version_for(preprocessing: dict[str, PreprocessSpec]) -> int:
    """The oldest schema that can say how to feed these inputs (see SCHEMA_VERSIONS_READ)."""
    return 2 if any(p.crop_pct != 1.0 for p in preprocessing.values()) else SCHEMA_VERSION


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any], artifact_roles: dict[str, str]) -> dict:
    """Hash the named artifacts into manifest['artifacts'] and write manifest.json atomically."""
    root = Path(root)
    artifacts = dict(manifest.get("artifacts", {}))
    for name, role in artifact_roles.items():
        f = root / name
        artifacts[name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size, "role": role}
    manifest = {**manifest, "artifacts": artifacts}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest
