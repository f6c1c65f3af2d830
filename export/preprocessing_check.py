"""Preprocessing conformance: does edge_pfm.preprocess, with the bundle's settings, make the tensors the team's own
pipeline made, and does the model decide the same on both? DESIGN calls a mismatch here the classic silent failure:
the model runs, only worse. No torch: ONNX Runtime CPU runs the bundle's model.onnx.

The conformance set is the paired layout plus the team's tensors:

    DIR/white/<sample>.png, DIR/fluorescence/<sample>.png   raw frames, as the cameras give them
    DIR/tensors/<sample>.npz                                what the team's pipeline made of them: arrays named
                                                            white_light and fluorescence (or the model's own input
                                                            names), (C, H, W) or (1, C, H, W) float32

Differences are measured in grey levels (|ours - theirs| x std x 255), so one bound fits any mean/std. The bound
(PREPROCESSING_BOUND): a modality's mean difference at most 2 grey levels (torchvision's antialiased bilinear
resize against our INTER_AREA measured 1.2 on synthetic 1280x720 scenes; a 0.875 crop_pct 13, RGB for BGR 36),
and the model's top-1 agreement on the two not shown below 97 % (the upper end of its 95 % Wilson interval
reaches it). At least MIN_PAIRS pairs. Beyond the bound the check names the spec field that explains the
difference, when one does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_pfm.bundle import MODALITIES, Bundle, write_manifest
from edge_pfm.dataset import PairedDataset
from edge_pfm.errors import InvalidArgument
from edge_pfm.fileio import atomic_directory
from edge_pfm.preprocess import PreprocessSpec, preprocess
from evaluation.stats import wilson
from export.progress import log

TENSORS_DIR = "tensors"
PREPROCESSING_BOUND = {"mean_abs_grey_levels": 2.0, "top1_agreement": 0.97}
MIN_PAIRS = 8


class PreprocessingMismatch(InvalidArgument):
    """The team's tensors and edge_pfm.preprocess differ beyond the bound; the message names the spec field."""


@dataclass
class ConformanceSet:
    root: Path
    dataset: PairedDataset  # the raw frames, read again from disk when needed (never all held in memory)
    tensors: dict[str, np.ndarray]  # modality -> (N, C, H, W) float32, the team's

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.dataset.samples]

    def frames(self, modality: str) -> Iterator[np.ndarray]:
        k = MODALITIES.index(modality)
        for i in range(len(self.dataset)):
            yield self.dataset.load(i)[k]


def conformance_layout(root: str | Path) -> PairedDataset:
    """Check DIR's layout before any work: the paired layout, tensors/, one .npz per pair, >= MIN_PAIRS pairs."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgument(f"--check-preprocessing: {root} does not exist (raw pairs beside your pipeline's "
                              f"tensors; see export/preprocessing_check.py)")
    ds = PairedDataset(root)
    tensor_dir = root / TENSORS_DIR
    if not tensor_dir.is_dir():
        raise InvalidArgument(f"{tensor_dir} does not exist: put your pipeline's tensors beside the raw pairs, one "
                              f"<sample>.npz per pair (see export/preprocessing_check.py)")
    missing = [str(tensor_dir / f"{s.name}.npz") for s in ds.samples if not (tensor_dir / f"{s.name}.npz").is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidArgument(f"every pair in {root} needs its tensors; missing: {', '.join(missing[:5])}{more}")
    if len(ds) < MIN_PAIRS:
        raise InvalidArgument(f"{root} has {len(ds)} pairs; the preprocessing check needs >= {MIN_PAIRS}")
    return ds


def _read_tensors(npz: Path, keys: dict[str, tuple[str, ...]], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    out = {}
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            files = arrays.files
            for m in MODALITIES:
                key = next((k for k in keys[m] if k in files), None)
                if key is None:
                    raise InvalidArgument(f"{npz} has no array named {' or '.join(map(repr, keys[m]))} "
                                          f"(it has {files})")
                t = np.asarray(arrays[key], np.float32)
                t = t[0] if t.ndim == 4 and t.shape[0] == 1 else t
                if t.shape != shapes[m]:
                    raise InvalidArgument(f"{npz}: {key} has shape {t.shape}, the model takes {shapes[m]} (C, H, W)")
                if not np.isfinite(t).all():
                    raise InvalidArgument(f"{npz}: {key} has {int((~np.isfinite(t)).sum())} non-finite values")
                out[m] = t
    except InvalidArgument:
        raise
    except (OSError, ValueError, TypeError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise InvalidArgument(f"{npz} is not a readable .npz of float arrays ({type(exc).__name__}: {exc})") from None
    return out


def load_conformance_set(root: str | Path, bundle: Bundle) -> ConformanceSet:
    ds = conformance_layout(root)
    # the arrays are named by modality, or by the model's own input names (from the spec in the manifest)
    spec_inputs = (bundle.manifest.get("spec") or {}).get("inputs", {})
    keys = {m: tuple(dict.fromkeys((m, spec_inputs.get(m, {}).get("name", m)))) for m in MODALITIES}
    shapes = {m: bundle.preprocessing[m].input_shape for m in MODALITIES}
    tensors: dict[str, list] = {m: [] for m in MODALITIES}
    for s in ds.samples:
        for m, t in _read_tensors(Path(root) / TENSORS_DIR / f"{s.name}.npz", keys, shapes).items():
            tensors[m].append(t)
    return ConformanceSet(Path(root), ds, {m: np.stack(v) for m, v in tensors.items()})


def grey_level_difference(ours: np.ndarray, theirs: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """|ours - theirs| in 0..255 pixel units of `spec`'s normalisation (N, C, H, W)."""
    return np.abs(ours - theirs) * (np.asarray(spec.std, np.float32) * 255.0).reshape(1, -1, 1, 1)


def _ours(frames: Iterable[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    return np.stack([preprocess(f, spec) for f in frames])


def _candidates(spec: PreprocessSpec) -> list[tuple[str, object, PreprocessSpec]]:
    """Single-field changes a team is likely to have made differently: (field, value, spec)."""
    out = []

    def add(name: str, value: object) -> None:
        with contextlib.suppress(ValueError):  # a combination PreprocessSpec refuses is no candidate
            out.append((name, value, dataclasses.replace(spec, **{name: value})))

    if spec.channels == 3:
        add("colour_order", "BGR" if spec.colour_order == "RGB" else "RGB")
    add("interpolation", "INTER_LINEAR" if spec.interpolation == "INTER_AREA" else "INTER_AREA")
    if spec.resize == "center_crop":
        add("resize", "stretch")
        if spec.crop_pct != 1.0:  # stretch takes no crop_pct: both fields change together
            with contextlib.suppress(ValueError):
                out.append(("resize", "stretch", dataclasses.replace(spec, resize="stretch", crop_pct=1.0)))
        for pct in (0.875, 0.9, 0.95, 1.0):
            if pct != spec.crop_pct:
                add("crop_pct", pct)
    else:
        add("resize", "center_crop")
    return out


def _fit_normalisation(frames: Iterable[np.ndarray], theirs: np.ndarray, spec: PreprocessSpec) -> tuple[list, list]:
    """The mean/std that best turn our [0, 1] pixels into their tensors, per channel (least squares)."""
    unit = dataclasses.replace(spec, mean=(0.0,) * spec.channels, std=(1.0,) * spec.channels)
    pixels = _ours(frames, unit)  # pixel / 255
    mean, std = [], []
    for c in range(spec.channels):
        x, y = pixels[:, c].ravel(), theirs[:, c].ravel()
        slope, intercept = np.polyfit(x, y, 1)
        s = 1.0 / slope if abs(slope) > 1e-6 else float("inf")
        mean.append(round(float(-intercept * s), 3))
        std.append(round(float(s), 3))
    return mean, std


def _advice(modality: str, frames: Callable[[], Iterable[np.ndarray]], theirs: np.ndarray, spec: PreprocessSpec,
            now: float, has_spec: bool) -> str | None:
    """The one spec field whose change brings the difference within the bound, said as an instruction. A native
    checkpoint's spec is not the user's to edit: its preprocessing is what it was trained with, so the team's pipeline
    is what changes."""
    def say(change: str, d: float) -> str:
        if has_spec:
            return f"set {change} in the spec: the mean difference falls from {now:.2f} to {d:.2f} grey levels"
        return (f"your pipeline matches edge_pfm.preprocess with {change} ({d:.2f} grey levels, not {now:.2f}), but "
                "this checkpoint was trained and is deployed with the manifest's preprocessing: make your pipeline "
                "match it, or retrain with yours")

    best = None
    for name, value, cand in _candidates(spec):
        d = float(grey_level_difference(_ours(frames(), cand), theirs, cand).mean())
        if best is None or d < best[0]:
            best = (d, name, value, cand)
    bound = PREPROCESSING_BOUND["mean_abs_grey_levels"]
    if best and best[0] <= bound:
        return say(f"inputs.{modality}.{best[1]} to {best[2]!r}", best[0])
    mean, std = _fit_normalisation(frames(), theirs, spec)
    fitted = dataclasses.replace(spec, mean=tuple(mean), std=tuple(std)) if min(std) > 0 else None
    if fitted is not None:
        d = float(grey_level_difference(_ours(frames(), fitted), theirs, fitted).mean())
        if d <= bound:
            return say(f"inputs.{modality}.mean to {mean} and inputs.{modality}.std to {std}", d)
    return None


@dataclass
class PreprocessingCheck:
    root: Path
    pairs: int
    modalities: dict[str, dict]  # modality -> {"mean_abs_grey_levels", "p99_grey_levels", "max_grey_levels"}
    top1_agreement: float
    agreement_ci95: tuple[float, float]
    disagreements: int
    problems: list[str]
    advice: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"source": str(self.root), "pairs": self.pairs, "modalities": self.modalities,
                "top1_agreement": self.top1_agreement, "agreement_ci95": list(self.agreement_ci95),
                "disagreements": self.disagreements, "bound": PREPROCESSING_BOUND, "passed": self.passed,
                "problems": self.problems, "advice": self.advice}

    def describe(self) -> str:
        diffs = "; ".join(f"{m}: mean {d['mean_abs_grey_levels']:.2f}, p99 {d['p99_grey_levels']:.2f}, max "
                          f"{d['max_grey_levels']:.2f} grey levels" for m, d in self.modalities.items())
        lo, hi = self.agreement_ci95
        return (f"preprocessing check on {self.pairs} pairs ({self.root}): {diffs}; model top-1 agreement on ours vs "
                f"yours {self.top1_agreement:.2%} [{lo:.2%}, {hi:.2%}] ({self.disagreements} differ)")


def check_preprocessing(bundle: str | Path | Bundle, conformance_dir: str | Path) -> PreprocessingCheck:
    """Measure edge_pfm.preprocess against the team's tensors and the model on both. -> the check (see .passed)."""
    import onnxruntime as ort

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    cs = load_conformance_set(conformance_dir, bundle)
    specs = bundle.preprocessing
    ours = {m: _ours(cs.frames(m), specs[m]) for m in MODALITIES}
    # a team's door (user-model, user-onnx) can change its spec; a native checkpoint's spec is what it trained with
    has_spec = str(bundle.manifest["model"].get("source", "")).startswith("user-")
    modalities, problems, advice = {}, [], []
    bound = PREPROCESSING_BOUND
    for m in MODALITIES:
        d = grey_level_difference(ours[m], cs.tensors[m], specs[m])
        stats = {"mean_abs_grey_levels": round(float(d.mean()), 3),
                 "p99_grey_levels": round(float(np.percentile(d, 99)), 3), "max_grey_levels": round(float(d.max()), 3)}
        modalities[m] = stats
        if stats["mean_abs_grey_levels"] > bound["mean_abs_grey_levels"]:
            problems.append(f"{m}: edge_pfm.preprocess differs from your tensors by {stats['mean_abs_grey_levels']:.2f}"
                            f" grey levels on average (bound {bound['mean_abs_grey_levels']})")
            tip = _advice(m, lambda m=m: cs.frames(m), cs.tensors[m], specs[m], stats["mean_abs_grey_levels"],
                          has_spec)
            advice.append(tip or f"no single field of inputs.{m} explains it: compare your pipeline's colour order, "
                                 "crop, resize and mean/std with the spec's (export/model_spec.py)")
    sess = ort.InferenceSession(str(bundle.model_path("fp32")), providers=["CPUExecutionProvider"])
    names, cs_n = bundle.input_names, len(cs.names)

    def top1(feed: dict[str, np.ndarray]) -> np.ndarray:
        out = [sess.run(["logits"], {names[m]: feed[m][i:i + 16] for m in MODALITIES})[0] for i in range(0, cs_n, 16)]
        return np.concatenate(out).argmax(1)

    a, b = top1(ours), top1(cs.tensors)
    agree = int((a == b).sum())
    rate = agree / cs_n
    lo, hi = wilson(agree, cs_n)
    if hi < bound["top1_agreement"] - 1e-9:  # shown below the bound, not one flip in a small set
        problems.append(f"the model's top-1 on edge_pfm.preprocess and on your tensors agrees on {agree} of {cs_n} "
                        f"pairs ({rate:.2%}, 95 % interval {lo:.2%}-{hi:.2%}: below {bound['top1_agreement']:.0%})")
    return PreprocessingCheck(cs.root, cs_n, modalities, rate, (lo, hi), cs_n - agree, problems, advice)


def require_conformance(bundle: str | Path | Bundle, conformance_dir: str | Path) -> PreprocessingCheck:
    """check_preprocessing, raising PreprocessingMismatch (exit 2) beyond the bound."""
    check = check_preprocessing(bundle, conformance_dir)
    if not check.passed:
        raise PreprocessingMismatch(
            f"{check.describe()}\n  - " + "\n  - ".join(check.problems)
            + "\nwhat to change:\n  - " + "\n  - ".join(check.advice or ["see the differences above"])
            + "\nNothing was written.")
    return check


def export_checked(out: str | Path, conformance_dir: str | Path,
                   build: Callable[[Path], object]) -> PreprocessingCheck:
    """Run a door (`build(path)` writes a bundle at path), then the conformance check on what it wrote; the bundle
    reaches `out`, with the check in its manifest, only if the check passes."""
    conformance_layout(conformance_dir)  # a mistyped folder fails now, not after the export's work
    with atomic_directory(out) as staging:
        inner = staging / ".door"
        build(inner)
        log(f"[check] preprocessing conformance against {conformance_dir}")
        check = require_conformance(inner, conformance_dir)
        log(f"      {check.describe()}: within the bound")
        manifest = dict(Bundle.load(inner).manifest)
        manifest["preprocessing_check"] = check.to_dict()
        write_manifest(inner, manifest, {})
        for entry in inner.iterdir():
            os.replace(entry, staging / entry.name)
        inner.rmdir()
    log(f"wrote bundle {out}, its preprocessing checked against {conformance_dir}")
    return check
