"""Which pairs do what in a calibration: `plan_data(bundle, plan) -> DataPlan`. No torch.

Five roles, kept apart (checked by content hash where two could meet):
- **calib**: the activation ranges (at most `samples` pairs);
- **val**: chooses the INT8 recipe (calibration.mixed). It needs no labels: it measures agreement with FP32.
  `--val DIR`; else a labelled --data's val split (its `split` column, or the split our trainer recorded);
  else 20 % of --data held back (at most 1000); with --synthetic, rendered pairs;
- **confirm**: pairs the recipe search never saw. The search stops at the first recipe whose val agreement meets
  the margin, so that val figure is biased upward (seen: 5 of 2000 val pairs differed, 12 of 2000 on a fresh
  set). The chosen recipe is measured on confirm before the gate; it must meet the same target there. Rendered
  afresh with --synthetic; else the odd pairs of a val set large enough to halve (>= twice what the margin needs
  at full agreement), and otherwise none, which the report says;
- **held-out** (the gate): --eval DIR, else the labelled --data's test split, else synthetic pairs;
- **agreement** (optional, `--agreement-data DIR`): the gate's agreement criterion is measured there, on as
  many unlabelled pairs as a device recording gives (`edge-pfm record --mode dataset`); the labelled held-out
  set then decides recall and accuracy only.

A team's model whose training data its bundle does not record (`"training": {}`) may have trained on --data:
then its val and held-out pairs could be training pairs and every agreement figure optimistic. That is said on
stderr and in accuracy.md, with what to do (a split column, `--trained-on` at export, or `--val DIR`).
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibration.data import Pair, dataset_pairs, synthetic_pair_chunks, synthetic_pairs
from edge_pfm.bundle import Bundle
from edge_pfm.dataset import PairedDataset
from edge_pfm.errors import EdgePfmError
from export.progress import log as _log

if TYPE_CHECKING:
    from calibration.calibrate import CalibrationPlan

EVAL_SYNTHETIC = 2000  # synthetic held-out pairs by default: the gate's 99 % needs >= ~380, a narrow interval 2000
# synthetic val pairs: the margin needs >= 545 at full agreement, and at 2000 (with 2000 held-out pairs) allows 4
# disagreements; rendered like the synthetic held-out pairs (at their resolution): val must predict the gate
VAL_SYNTHETIC = 2000
VAL_SHARE, VAL_MAX, VAL_MIN_DATA = 0.2, 1000, 100  # val held back from a --data without a split column
CONFIRM_SEED, VAL_SEED, EVAL_SEED = 30_000, 20_000, 10_000  # offsets from --seed: each synthetic set its own

Chunks = Callable[[], Iterable[list[Pair]]]  # the same pairs, in chunks, each call


class CalibrationError(EdgePfmError, RuntimeError):
    """Calibration cannot run on this bundle or data; the message says why and what to change."""


def pair_digest(pair) -> str:
    h = hashlib.sha256()
    h.update(pair[0].tobytes())
    h.update(pair[1].tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PairSet:
    """A set of pairs read in chunks, the same ones each call, with where they came from."""

    chunks: Chunks
    n: int
    source: str


@dataclass
class DataPlan:
    calib: Sequence[Pair]
    calib_source: str
    eval_source: str
    eval_chunks: Iterable[list[Pair]]
    n_eval: int
    eval_rendered: bool  # synthetic held-out pairs, rendered by other processes meanwhile
    splits: object | None = None  # export.splits.Splits where the dataset's split is used
    val: PairSet | None = None
    confirm: PairSet | None = None
    confirm_note: str = ""  # why there is no confirmation set
    agreement: PairSet | None = None
    training_note: str = ""  # what is unknown of the model's training data, and what to do

    @property
    def gate_agreement_pairs(self) -> int:
        """The pairs the gate's agreement criterion decides on (what the recipe's margin must predict)."""
        return self.agreement.n if self.agreement is not None else self.n_eval


def require_synthetic_training(bundle: Bundle, what: str) -> None:
    """Synthetic scenes calibrate and measure only a model trained on them (the provenance says so); a model
    trained on real images, or one whose training nobody recorded (a team's ONNX), needs its own data."""
    trained_on = str(bundle.manifest.get("provenance", {}).get("training", {}).get("data", ""))
    if not trained_on.startswith("synthetic:"):
        raise CalibrationError(
            f"{what} uses synthetic scenes, but {bundle.root} was trained on "
            f"{trained_on or 'data its manifest does not record'}: synthetic ranges and accuracy would say nothing "
            "about it. Calibrate on pairs from your cameras (--data DIR) and evaluate on a labelled held-out set "
            "(--eval DIR)")


def _trained_on(bundle: Bundle, data: str | Path) -> tuple[dict, bool]:
    """(the bundle's training record, whether it names `data` as its training set)."""
    training = bundle.manifest.get("provenance", {}).get("training", {}) or {}
    trained_on = str(training.get("data", ""))
    same = bool(trained_on) and not trained_on.startswith("synthetic:") and (
        Path(trained_on).resolve() == Path(data).resolve())
    return training, same


def _recorded_split(bundle: Bundle, data: str | Path) -> bool:
    """The bundle was trained on `data` and records which of its pairs it held out."""
    training, same = _trained_on(bundle, data)
    return same and "test_sha256" in (training.get("splits") or {})


def training_splits(bundle: Bundle, plan: CalibrationPlan):
    """The dataset's train/val/test (export.splits). When the bundle was trained on this dataset (the same path,
    or the same split digests), the split the trainer made, with its seed, checked by the test set's content
    digest: the gate must not see a training pair."""
    from export.splits import dataset_splits

    ds = PairedDataset(plan.data, bundle.classes)
    training, same_path = _trained_on(bundle, plan.data)
    recorded = training.get("splits") or {}
    if same_path and "test_sha256" not in recorded:
        raise CalibrationError(f"{bundle.root} was trained on {plan.data}, but its bundle does not record which "
                               "pairs it held out (no split column then, or a checkpoint older than train/val/test "
                               "splits): give a held-out set the model never saw (--eval DIR) and a val set it "
                               "never trained on (--val DIR), or a `split` column in labels.csv before training")
    need = ("train", "val") if plan.eval is not None else ("train", "val", "test")  # --eval gates: no test needed
    splits = dataset_splits(ds, seed=int(recorded.get("seed", plan.seed)), need=need)
    same_data = same_path or any(recorded.get(f"{k}_sha256") == splits.digests[k] for k in ("train", "val", "test"))
    if same_data and recorded.get("test_sha256") != splits.digests["test"]:
        raise CalibrationError(f"{plan.data} is the dataset {bundle.root} was trained on, but its test split is not "
                               "the one the trainer held out (the files or labels.csv changed since): the gate could "
                               "see training pairs. Give a held-out set the model never saw (--eval DIR)")
    whose = " (the trainer's split)" if same_data else ""
    _log(f"      {plan.data}: {splits.source}; train {len(splits.train)}, val {len(splits.val)}, test "
         f"{len(splits.test)} pairs{whose}")
    return splits


def _training_note(bundle: Bundle, plan: CalibrationPlan, splits) -> str:
    """What is unknown of the training data, where it matters: val or held-out pairs drawn from --data."""
    if plan.data is None or splits is not None:
        return ""
    training, same = _trained_on(bundle, plan.data)
    if training.get("data") and not same:
        return ""  # trained on another dataset, which the bundle names
    if plan.val is not None and plan.eval is not None:
        return ""  # nothing is drawn from --data but the ranges
    what = ("was trained on " + str(plan.data) if same else
            "does not record its training data (a team's model exported without --trained-on)")
    return (f"{bundle.root} {what}: val pairs drawn from {plan.data} may be pairs it trained on, and then the INT8 "
            "recipe's agreement is optimistic. Give labels.csv a `split` column (train/val/test) and train on its "
            "train split (export with --trained-on DIR to record it), or give a val set it never saw (--val DIR; "
            "labels are not needed)")


def _subset_pairs(pairs, indices: list[int], source: str) -> PairSet:
    sub = pairs.subset(indices)
    return PairSet(sub.chunks, len(sub), source)


def _confirm_split(val: PairSet, val_pairs, need: int | None) -> tuple[PairSet, PairSet | None, str]:
    """A dataset val set large enough to halve gives its odd pairs to confirmation."""
    if need is None or val.n < 2 * need:
        return val, None, (f"no confirmation set: {val.n} val pairs cannot be halved into two that each can show "
                           f"the margin ({need or 'more'} needed each); the gate's held-out set alone checks the "
                           "recipe. With --synthetic it is rendered; else give a larger --val")
    even, odd = list(range(0, val.n, 2)), list(range(1, val.n, 2))
    return (_subset_pairs(val_pairs, even, f"{val.source}, even pairs"),
            _subset_pairs(val_pairs, odd, f"{val.source}, odd pairs: confirmation"), "")


def plan_data(bundle: Bundle, plan: CalibrationPlan, margin_pairs: Callable[[int], int | None] = lambda g: None
              ) -> DataPlan:
    """Which pairs calibrate, choose the recipe, confirm it, gate it (module docstring). `margin_pairs(g)`: the
    fewest val pairs that can meet the margin against a gate on g pairs (calibration.mixed._pairs_for)."""
    classes, lesion_classes = bundle.classes, tuple(bundle.roles.lesion)
    labelled = plan.data is not None and PairedDataset(plan.data, classes).labelled
    splits = None
    if labelled and plan.eval is None and plan.eval_synthetic is None:
        splits = training_splits(bundle, plan)  # one labelled dataset: train calibrates, val tunes, test gates
    elif labelled and plan.eval is not None and (
            PairedDataset(plan.data, classes).has_splits or _recorded_split(bundle, plan.data)):
        splits = training_splits(bundle, plan)  # its split still keeps val off the training pairs
    if plan.data is None or (plan.eval is None and splits is None):
        require_synthetic_training(bundle, "calibration (--synthetic)" if plan.data is None else
                                   "the held-out set (--eval-synthetic)")
    note = _training_note(bundle, plan, splits)
    if note:
        warnings.warn(note, stacklevel=2)
    _log(f"[1/6] calibration data ({plan.data or 'synthetic'}{', its train split' if splits else ''})")

    val = val_pairs = None
    if plan.data is None:
        calib = synthetic_pairs(min(plan.synthetic, plan.samples), plan.seed, plan.resolution, classes)
        calib_source = f"synthetic:{len(calib)}:seed={plan.seed}:{plan.resolution[0]}x{plan.resolution[1]}"
        held_from_data = None
    else:
        everything, _ = dataset_pairs(plan.data, classes, lesion_classes)
        held_from_data = everything.subset(splits.test) if splits and plan.eval is None else None
        if splits:
            calib = everything.subset(splits.train)
            if plan.val is None:
                val_pairs = everything.subset(splits.val)
                val = PairSet(val_pairs.chunks, len(val_pairs), f"{plan.data} (val split)")
        elif plan.val is None and len(everything) >= VAL_MIN_DATA:  # ranges from the rest; val tunes the recipe
            rng = np.random.default_rng(plan.seed)
            n_val = min(VAL_MAX, round(VAL_SHARE * len(everything)))
            picked = set(rng.choice(len(everything), n_val, replace=False).tolist())
            val_pairs = everything.subset(sorted(picked))
            val = PairSet(val_pairs.chunks, n_val, f"{plan.data} ({n_val} pairs held back from calibration, "
                                                   f"seed {plan.seed})")
            calib = everything.subset([i for i in range(len(everything)) if i not in picked])
        else:
            calib = everything
        if len(calib) > plan.samples:
            idx = np.random.default_rng(plan.seed).choice(len(calib), plan.samples, replace=False)
            calib = calib.subset(sorted(idx))
        calib_source = str(plan.data) + (" (train split)" if splits else "")
    if plan.val is not None:
        val_pairs, _ = dataset_pairs(plan.val, classes, lesion_classes)  # unlabelled is fine
        val = PairSet(val_pairs.chunks, len(val_pairs), f"{plan.val} (--val)")

    if splits is not None and held_from_data is not None:
        eval_source, eval_chunks, n_eval = f"{plan.data} (test split)", held_from_data.chunks(), len(held_from_data)
        eval_rendered, eval_size = False, None
    elif plan.eval is not None:
        held, held_ds = dataset_pairs(plan.eval, classes, lesion_classes)
        if not held_ds.labelled:
            raise CalibrationError(f"the held-out set {plan.eval} needs a label for every pair (labels.csv): it "
                                   "measures accuracy and recall; agreement alone needs no labels (--agreement-data)")
        eval_source, eval_chunks, n_eval = str(plan.eval), held.chunks(), len(held)
        eval_rendered, eval_size = False, None
    else:
        eval_size = plan.eval_resolution or plan.resolution
        n_eval = EVAL_SYNTHETIC if plan.eval_synthetic is None else plan.eval_synthetic
        eval_source = f"synthetic:{n_eval}:seed={plan.seed + EVAL_SEED}:{eval_size[0]}x{eval_size[1]}"
        eval_chunks = synthetic_pair_chunks(n_eval, plan.seed + EVAL_SEED, eval_size, classes=classes)
        eval_rendered = True

    agreement = None
    if plan.agreement_data is not None:
        agree_pairs, _ = dataset_pairs(plan.agreement_data, classes, lesion_classes)
        agreement = PairSet(agree_pairs.chunks, len(agree_pairs), f"{plan.agreement_data} (--agreement-data)")
    gate_pairs = agreement.n if agreement is not None else n_eval

    confirm, confirm_note = None, ""
    if plan.data is None and plan.val is None and plan.val_synthetic:
        # at the held-out pairs' resolution when they are synthetic: val predicts the gate (measured: val at
        # 1280x720 met the margin with 4 of 2000 differing, the gate's 640x360 pairs then had 13)
        size = plan.resolution if plan.eval is not None else (plan.eval_resolution or plan.resolution)
        n, (w, h) = plan.val_synthetic, size

        def rendered(offset: int, what: str) -> PairSet:
            seed = plan.seed + offset
            return PairSet(partial(synthetic_pair_chunks, n, seed, size, classes=classes), n,
                           f"synthetic:{n}:seed={seed}:{w}x{h}{what}")

        val = rendered(VAL_SEED, "")
        if plan.confirm:
            confirm = rendered(CONFIRM_SEED, " (confirmation: rendered afresh)")
    elif val is not None and plan.confirm:
        val, confirm, confirm_note = _confirm_split(val, val_pairs, margin_pairs(gate_pairs))
    elif val is not None:
        confirm_note = "no confirmation set (confirmation turned off)"
    return DataPlan(calib, calib_source, eval_source, eval_chunks, n_eval, eval_rendered, splits, val, confirm,
                    confirm_note, agreement, note)
