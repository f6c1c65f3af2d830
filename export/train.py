"""The reference trainer for PFM (its command line and plan: export/train_plan.py)."""
from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_pfm.bundle import MODALITIES
from edge_pfm.dataset import SPLITS, DatasetError, PairedDataset
from edge_pfm.errors import EdgePfmError
from edge_pfm.preprocess import PreprocessSpec, preprocess
from export.checkpoint import library_versions, save_checkpoint
from export.distributed import Runtime, distributed_sampler, parallel, runtime
from export.model import DEFAULT_CLASSES, PFM, create_model, variant_classes, variant_config
from export.progress import progress as progress_bar
from export.train_plan import TrainPlan, build_parser


@dataclass
class PairTensors:
    white_light: torch.Tensor  # (N, C, H, W) float32, preprocessed
    fluorescence: torch.Tensor
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    # (N, 1, h, w) float32: the lesion's share of each lesion-map cell (empty for `normal`); None: no masks
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> PairTensors:
        i = torch.as_tensor(idx)
        return PairTensors(self.white_light[i], self.fluorescence[i], self.labels[i], self.classes,
                           None if self.masks is None else self.masks[i])

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def batches(self, batch_size: int) -> Iterator[tuple]:
        """(white, fluorescence, labels, lesion targets or None) in order, unaugmented."""
        for i in range(0, len(self), batch_size):
            yield (self.white_light[i:i + batch_size], self.fluorescence[i:i + batch_size],
                   self.labels[i:i + batch_size], None if self.masks is None else self.masks[i:i + batch_size])

    def train_batches(self, batch_size: int, gen: torch.Generator, epoch: int, seed: int, rank: int = 0,
                      world: int = 1) -> Iterator[tuple]:
        """One epoch, shuffled by `gen` (the same on every rank), with the same flips for both modalities and the
        mask per batch; on several ranks each takes its interleaved share of every global batch."""
        order = torch.randperm(len(self), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if world > 1:
                if len(idx) < world:  # a tail too short to share: every rank skips it alike
                    break
                idx = idx[rank::world]
            w, f, y = self.white_light[idx], self.fluorescence[idx], self.labels[idx]
            m = self.masks[idx] if self.masks is not None else None
            # the same flips for both modalities (and the lesion mask): they image the same tissue
            if torch.rand(1, generator=gen) < 0.5:
                w, f, m = w.flip(3), f.flip(3), None if m is None else m.flip(3)
            if torch.rand(1, generator=gen) < 0.5:
                w, f, m = w.flip(2), f.flip(2), None if m is None else m.flip(2)
            yield w, f, y, m


class StreamedPairs:
    """A split of a dataset on disk, read through DataLoader workers (export.data): the same interface as
    PairTensors for training and evaluation, without holding the pairs in memory. The splits of one run share
    one PairPool (`pool`, serving this split as `split`); without one, this split gets its own."""

    def __init__(self, samples, workers: int | None = None, pool=None, split: str = "data"):
        from export.data import PairPool

        self.samples, self.split = samples, split
        self.pool = pool if pool is not None else PairPool({split: samples}, workers)
        self.classes = samples.ds.classes
        self.labels = torch.from_numpy(samples.labels)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_masks(self) -> bool:
        return self.samples.with_masks

    @staticmethod
    def _batch(b: tuple) -> tuple:
        w, f, y, t = b
        return w, f, y, (t if t.numel() else None)

    def batches(self, batch_size: int) -> Iterator[tuple]:
        for b in self.pool.batches(self.split, range(len(self)), batch_size):
            yield self._batch(b)

    def train_batches(self, batch_size: int, gen: torch.Generator, epoch: int, seed: int, rank: int = 0,
                      world: int = 1) -> Iterator[tuple]:
        """One epoch in a DistributedSampler's order (also on one rank): rank r's k-th batch is its interleaved
        share of the k-th global batch of `batch_size`, so N ranks see what one rank sees."""
        order = list(distributed_sampler(self.samples, seed, epoch, rank, world))
        for b in self.pool.batches(self.split, order, max(1, batch_size // world), epoch, self.samples.augment):
            yield self._batch(b)

    def materialise(self) -> PairTensors:
        """All of it in memory (QAT's fine-tuning indexes tensors)."""
        parts = list(self.batches(64))
        masks = [p[3] for p in parts]
        return PairTensors(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                           torch.cat([p[2] for p in parts]), self.classes,
                           torch.cat(masks) if masks and masks[0] is not None else None)


def default_preprocessing(variant: str, **overrides) -> dict[str, PreprocessSpec]:
    cfg = variant_config(variant, **overrides)
    return {m: PreprocessSpec(size=(cfg.img_size, cfg.img_size), channels=cfg.in_chans[m]) for m in MODALITIES}


def _render_chunk(args: tuple) -> list[tuple]:
    from edge_pfm.synthetic import render_pair
    from evaluation.lesion_metrics import lesion_target

    jobs, size, specs = args
    out = []
    for index, label, seed in jobs:
        s = render_pair(label, seed, size)
        out.append((index, preprocess(s.white_light, specs["white_light"]),
                    preprocess(s.fluorescence, specs["fluorescence"]), lesion_target(s.lesion_truth,
                                                                                     specs["white_light"])))
    return out


def synthetic_tensors(n: int, specs: dict[str, PreprocessSpec], seed: int = 0,
                      size: tuple[int, int] = (320, 240), progress: bool = True,
                      classes: tuple[str, ...] = DEFAULT_CLASSES) -> PairTensors:
    """Render n synthetic pairs balanced over `classes` (scenes the generator renders) and preprocess them
    (all cores)."""
    from concurrent.futures import ProcessPoolExecutor

    from edge_pfm.synthetic import SCENES, keep_freed_memory

    unknown = [c for c in classes if c not in SCENES]
    if unknown:
        raise TrainingError(f"the synthetic generator renders {SCENES}, not {unknown}: train on your data (--data)")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    labels = [i % len(classes) for i in range(n)]
    jobs = [(i, classes[labels[i]], int(seeds[i])) for i in range(n)]
    workers = max(1, min(os.cpu_count() or 1, 8))
    chunks = [(jobs[i::workers * 4], size, specs) for i in range(workers * 4)]
    arrays: list[np.ndarray] = []  # white, fluorescence, lesion target: row i is job i, whatever the pool's order
    with ProcessPoolExecutor(workers, initializer=keep_freed_memory) as pool, \
            progress_bar(total=n, desc=f"rendering synthetic pairs at {size[0]}x{size[1]}", enabled=progress) as bar:
        for part in pool.map(_render_chunk, chunks):
            for index, *row in part:  # filled while the pool renders (a final np.stack took 3 s for 1440 pairs)
                if not arrays:
                    arrays = [np.empty((n, *a.shape), a.dtype) for a in row]
                for array, a in zip(arrays, row):
                    array[index] = a
            bar.update(len(part))
    white, fluo, target = (torch.from_numpy(a) for a in arrays)
    return PairTensors(white, fluo, torch.tensor(labels), tuple(classes), target)


def dataset_tensors(root: str | Path, specs: dict[str, PreprocessSpec], progress: bool = True
                    ) -> tuple[PairTensors, PairedDataset]:
    """A labelled paired dataset, preprocessed and held in memory (the pre-streaming path, kept for comparison),
    with the same lesion-map targets the streamed path gives (export.data.PairSamples). -> (tensors, the index)."""
    from edge_pfm.roles import ClassRoles
    from export.data import PairSamples

    ds = PairedDataset(root)
    if not ds.labelled:
        raise DatasetError(f"{root}: every sample needs a label in labels.csv to train on it")
    samples = PairSamples(ds, range(len(ds)), specs, ClassRoles.default_for(ds.classes).lesion)
    rows = [samples.preprocessed(i) for i in progress_bar(range(len(ds)), desc=f"loading {root}", enabled=progress)]
    masks = torch.from_numpy(np.stack([r[2] for r in rows])) if ds.has_masks else None
    return PairTensors(torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows])),
                       torch.from_numpy(samples.labels), ds.classes, masks), ds


def split(data: PairTensors, val_fraction: float = 0.2, seed: int = 0) -> tuple[PairTensors, PairTensors]:
    """Stratified split: each class contributes val_fraction of its samples to validation."""
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.extend(idx[: max(1, round(len(idx) * val_fraction))])
    val_mask = np.zeros(len(labels), bool)
    val_mask[val] = True
    return data.subset(np.flatnonzero(~val_mask)), data.subset(np.flatnonzero(val_mask))


@torch.inference_mode()
def predict(model: PFM, data: PairTensors | StreamedPairs, batch_size: int = 64, progress: str | None = None
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """-> (logits (N, classes), lesion-map probabilities (N, 1, h, w) or None without the head, the lesion
    targets (N, 1, h, w) or None without masks). Runs on the model's device; `progress`: a bar's label."""
    model.eval()
    device = next(model.parameters()).device
    logits, maps, targets = [], [], []
    bar = progress_bar(total=len(data), desc=progress or "", enabled=bool(progress), leave=False)
    for w, f, _, m in data.batches(batch_size):
        bar.update(len(w))
        out, lesion_logits = model.forward_multitask(w.to(device), f.to(device))
        logits.append(out.float().cpu())
        if lesion_logits is not None:
            maps.append(lesion_logits.float().sigmoid().cpu())
        if m is not None:
            targets.append(m)
    bar.close()
    return (torch.cat(logits).numpy(), torch.cat(maps).numpy() if maps else None,
            torch.cat(targets).numpy() if targets else None)


def evaluate(model: PFM, data: PairTensors | StreamedPairs, progress: str | None = None) -> dict:
    """Accuracy and recall; with the lesion head and masks, the map's Dice and pointing over the map classes
    (the lesion role, edge_pfm.roles) with their intervals, as `lesion_classes`."""
    from evaluation.lesion_metrics import lesion_scores

    logits, maps, targets = predict(model, data, progress=progress)
    pred = logits.argmax(1)
    y = data.labels.numpy()
    recall = {c: float((pred[y == i] == i).mean()) if (y == i).any() else float("nan")
              for i, c in enumerate(data.classes)}
    out = {"accuracy": float((pred == y).mean()), "recall": recall}
    known = None if targets is None else known_masks(torch.from_numpy(targets)).numpy()
    if maps is not None and known is not None and known.any():  # a lesion without an outline cannot be scored
        scores = lesion_scores(maps[known], targets[known], y[known], data.classes)
        out["lesion_dice"] = scores["lesion_classes"]["dice"]
        out["lesion_pointing"] = scores["lesion_classes"]["pointing"]
        out["lesion_classes"] = scores["lesion_classes"]
    return out


def known_masks(target: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the samples whose lesion target is known (an unknown one is NaN)."""
    return ~torch.isnan(target).flatten(1).any(1)


def lesion_loss(lesion_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE per cell + soft Dice over the batch's known masks (empty `normal` masks only push probabilities
    down; a lesion sample without a mask adds nothing)."""
    known = known_masks(target)
    if not bool(known.all()):
        if not bool(known.any()):
            return lesion_logits.sum() * 0.0
        lesion_logits, target = lesion_logits[known], target[known]
    bce = F.binary_cross_entropy_with_logits(lesion_logits, target)
    p = lesion_logits.sigmoid()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def train(model: PFM, train_set: PairTensors | StreamedPairs, val_set: PairTensors | StreamedPairs, epochs: int = 12,
          batch_size: int = 32, lr: float = 3e-3, seed: int = 0, progress: bool = True, label: str = "",
          lesion_weight: float = 1.0, rt: Runtime | None = None) -> dict:
    """Train in place on `rt` (default: this CPU, one rank); keeps the weights of the best validation epoch, which
    rank 0 measures. `batch_size` is the global batch: each of N ranks takes 1/N of it. -> history dict."""
    rt = rt or Runtime(torch.device("cpu"))
    if batch_size % rt.world:
        raise TrainingError(f"--batch-size {batch_size} does not split over {rt.world} ranks: use a multiple of "
                            f"{rt.world}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # channels-last: oneDNN's convolutions run about 25 % faster on a CPU (and so do cuDNN's under AMP)
    model.to(rt.device, memory_format=torch.channels_last)
    step = parallel(model, rt)
    scaler = torch.amp.GradScaler("cuda") if rt.amp else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(train_set) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    best = {"accuracy": -1.0}
    best_state = None
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        total, seen = 0.0, 0
        # a live bar per epoch on a terminal; in a log, a line every 15 s of a long epoch, then its summary line
        bar = progress_bar(train_set.train_batches(batch_size, gen, epoch, seed, rt.rank, rt.world),
                           total=(len(train_set) + batch_size - 1) // batch_size, desc=f"{label}epoch {epoch}/{epochs}",
                           unit="batches", leave=False, enabled=progress and rt.main)
        for w, f, y, m in bar:
            w, f = (x.to(rt.device, non_blocking=True, memory_format=torch.channels_last) for x in (w, f))
            y = y.to(rt.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=rt.amp):
                logits, lesion_logits = step(w, f)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
            if lesion_logits is not None and m is not None:  # multi-task: the lesion map learns beside the class
                loss = loss + lesion_weight * lesion_loss(lesion_logits.float(), m.to(rt.device))
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            total += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total / seen:.3f}", refresh=False)
        total, seen = rt.all_sum(total, seen)  # the global batch's mean loss, on every rank
        if not rt.main:  # rank 0 measures and keeps the best epoch; the others wait for it
            history.append({"epoch": epoch, "loss": total / seen})
            rt.barrier()
            continue
        metrics = evaluate(model, val_set, progress=f"{label}validating" if progress else None)
        rt.barrier()
        history.append({"epoch": epoch, "loss": total / seen, **metrics, "elapsed_s": time.perf_counter() - t0})
        if progress:
            lesion_txt = (f"  val_dice {metrics['lesion_dice']:.3f}  pointing {metrics['lesion_pointing']:.3f}"
                          if "lesion_dice" in metrics else "")
            print(f"{label}epoch {epoch:3d}/{epochs}  loss {total / seen:.4f}  val_acc {metrics['accuracy']:.4f}"
                  f"{lesion_txt}  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        if metrics["accuracy"] > best["accuracy"]:
            best = {**metrics, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
    model.to(memory_format=torch.contiguous_format)  # the checkpoint's tensors in the usual layout
    if best_state is not None and epochs:
        model.load_state_dict(best_state)
    model.eval()
    return {"best": best, "history": history, "train_s": time.perf_counter() - t0}


def ablation(train_set: PairTensors, val_set: PairTensors, variant: str, epochs: int, seed: int = 0,
             progress: bool = True) -> dict:
    """Fusion vs white-light-only vs fluorescence-only on the same split."""
    rows = {}
    for name, source in (("fusion", None), ("white_light only", "white_light"),
                         ("fluorescence only", "fluorescence")):
        model = create_model(variant, num_classes=len(train_set.classes), single_source=source)
        result = train(model, train_set, val_set, epochs=epochs, seed=seed, progress=progress, label=f"[{name}] ")
        rows[name] = result["best"]
    return rows


def format_ablation(rows: dict, classes: tuple[str, ...]) -> str:
    head = "| model | accuracy | " + " | ".join(f"recall {c}" for c in classes) + " |"
    lines = [head, "|" + "---|" * (2 + len(classes))]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | " + " | ".join(f"{r['recall'][c]:.3f}" for c in classes) + " |")
    return "\n".join(lines)


def make_reproducible(seed: int, threads: int, cuda: bool = False) -> None:
    """Seeded RNGs, deterministic algorithms, a fixed thread count: the same command gives the same weights
    (on CPU; CUDA kernels without a deterministic version warn instead of failing, and the run is not bitwise
    reproducible: export.distributed)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    torch.set_num_threads(threads)


def quantization_aware(model: PFM, train_set: PairTensors, val_set: PairTensors, epochs: int, lr: float,
                       seed: int, progress: bool) -> dict:
    """Fine-tune `model` in place under fake quantization (export.qat), distilled from itself -> the facts the
    checkpoint keeps. A fine-tuned model whose float val accuracy falls below the original's 95 % interval is
    discarded: the original weights come back, and the checkpoint has no QAT ranges (calibration then uses PTQ)."""
    from evaluation.stats import wilson
    from export.qat import finetune, observe_ranges

    original = copy.deepcopy(model.state_dict())
    float_before = evaluate(model, val_set)
    n = min(len(train_set), 256)
    ranges = observe_ranges(model, ((train_set.white_light[i:i + 32], train_set.fluorescence[i:i + 32])
                                    for i in range(0, n, 32)))
    result = finetune(model, train_set, val_set, ranges, epochs, lr=lr, seed=seed + 1, progress=progress)
    float_after = evaluate(model, val_set)
    best = result["best"]
    low, high = wilson(round(float_before["accuracy"] * len(val_set)), len(val_set))
    kept = float_after["accuracy"] >= low - 1e-9
    facts = {"epochs": epochs, "lr": lr, "seconds": result["seconds"], "kept": kept,
             "val_accuracy_float_before": float_before["accuracy"], "val_accuracy_float_before_ci95": [low, high],
             "val_accuracy_fake_quant": best["val_accuracy_quant"], "val_agreement": best["val_agreement"],
             "val_accuracy_float_after": float_after["accuracy"]}
    verdict = "kept" if kept else f"DISCARDED (below the original's 95 % interval {low:.4f}-{high:.4f})"
    if progress:
        print(f"[qat] val accuracy: float before {float_before['accuracy']:.4f}, after {float_after['accuracy']:.4f}; "
              f"quantized {best['val_accuracy_quant']:.4f}, agreement {best['val_agreement']:.4f}: {verdict}",
              file=sys.stderr)
    if kept:
        facts["ranges"] = ranges
    else:  # never ship a fine-tuned model that scores lower than the one the user trained
        model.load_state_dict(original)
        facts["discarded"] = (f"float val accuracy {float_after['accuracy']:.4f} after QAT is below the original's "
                              f"95 % interval {low:.4f}-{high:.4f}: the original weights are kept, without QAT ranges")
    return facts


def lesion_map_measurement(metrics: dict, source: str, quiet: bool = False) -> dict | None:
    """The final weights' lesion map, from `evaluate` on held-out pairs (never trained on) -> the measurement the
    bundle carries (edge_pfm.lesion.map_measurement), or None without masks. Says whether the runtime will show it."""
    from edge_pfm.lesion import judge_map, map_measurement

    scores = metrics.get("lesion_classes")
    if scores is None:
        return None
    m = map_measurement(scores, source)
    if not quiet:  # the verdict a bundle exported from this checkpoint gets, until calibration re-measures it
        print(judge_map({"shown_for": m["classes"], "measurements": {"fp32": m}}, tuple(m["classes"]), "fp32").describe(),
              file=sys.stderr)
    return m


def test_report(metrics: dict, samples: int) -> dict:
    """Accuracy (with its 95 % Wilson interval) and recall, from `evaluate` on the test split's `samples` pairs."""
    from evaluation.stats import wilson

    k = round(metrics["accuracy"] * samples)
    return {"samples": samples, "accuracy": metrics["accuracy"], "accuracy_ci95": list(wilson(k, samples)),
            "recall": metrics["recall"]}


class TrainingError(EdgePfmError, ValueError):
    """A training request cannot run (a variant, an option); the message says what to change."""


def load_sets(plan: TrainPlan, specs: dict[str, PreprocessSpec], classes: tuple[str, ...] = DEFAULT_CLASSES,
              split_seed: int | None = None) -> tuple[PairTensors, PairTensors, PairTensors | None, dict]:
    """(train, val, test or None, how they were made). A dataset (its classes.txt names the classes) gives three
    sets (export.splits: its split column, else grouped and stratified); synthetic pairs of `classes` give train
    and val, since a synthetic held-out set is rendered afresh by calibration."""
    if plan.data is None:
        data = synthetic_tensors(plan.synthetic, specs, plan.seed, plan.resolution, plan.progress, classes)
        train_set, val_set = split(data, seed=plan.seed)
        return train_set, val_set, None, {"source": "stratified 80/20 of the synthetic pairs"}
    from edge_pfm.roles import ClassRoles
    from export.data import PairPool, PairSamples
    from export.splits import dataset_splits

    ds = PairedDataset(plan.data)
    sets = dataset_splits(ds, seed=plan.seed if split_seed is None else split_seed)
    lesion = ClassRoles.default_for(ds.classes).lesion
    samples = {k: PairSamples(ds, sets.indices(k), specs, lesion, augment=k == "train", seed=plan.seed,
                              cache_dir=plan.cache_dir) for k in SPLITS}
    pool = PairPool(samples, plan.workers)  # one set of workers for the three sets
    train_set, val_set, test_set = (StreamedPairs(samples[k], pool=pool, split=k) for k in SPLITS)
    if plan.progress and os.environ.get("RANK", "0") == "0":
        print(f"{plan.data}: {sets.source}; train {len(train_set)}, val {len(val_set)}, test {len(test_set)} pairs, "
              f"read from disk{f' through the cache {plan.cache_dir}' if plan.cache_dir else ''}", file=sys.stderr)
    return train_set, val_set, test_set, sets.to_dict()


def train_checkpoint(out: str | Path, plan: TrainPlan | None = None) -> dict:
    """Train (or QAT fine-tune) by `plan` and write the checkpoint to `out` atomically. -> the facts it keeps
    (checkpoint "extra": accuracy, seed, threads, versions, lesion-map measurement, ...)."""
    plan = plan or TrainPlan()
    if plan.qat_from and plan.qat_epochs < 1:
        raise TrainingError("qat_from needs qat_epochs >= 1 (--qat-epochs N)")
    rt = runtime(plan.device, plan.amp)
    try:
        return _train_checkpoint(out, plan, rt)
    finally:
        rt.close()


def _train_checkpoint(out: str | Path, plan: TrainPlan, rt: Runtime) -> dict:
    if rt.world > 1 and plan.qat_epochs:
        raise TrainingError("QAT fine-tuning runs on one process: drop torchrun for --qat-epochs / --qat-from")
    make_reproducible(plan.seed, plan.threads, rt.device.type == "cuda")
    say = plan.progress and rt.main
    variant = plan.variant
    if plan.qat_from:
        from export.checkpoint import load_checkpoint

        model, meta = load_checkpoint(plan.qat_from)
        variant, specs, classes = meta["variant"], meta["preprocessing"], meta["classes"]
    else:
        try:
            specs = default_preprocessing(variant)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        classes = variant_classes(variant)
    # fine-tuning keeps the float run's split: its test pairs stay unseen
    split_seed = meta["extra"].get("splits", {}).get("seed") if plan.qat_from else None
    train_set, val_set, test_set, splits = load_sets(plan, specs, classes, split_seed)
    if plan.qat_from and meta["extra"].get("splits", {}).get("test_sha256") not in (None, splits.get("test_sha256")):
        raise TrainingError(f"{plan.data}'s test split is not the one {plan.qat_from} held out (the data changed): "
                            "fine-tuning on it would train on the float model's test pairs")
    data_classes = train_set.classes
    extra = {"seed": plan.seed, "threads": plan.threads, "versions": library_versions(),
             "train_samples": len(train_set), "val_samples": len(val_set), "splits": splits,
             "data": str(Path(plan.data).resolve()) if plan.data is not None else
             f"synthetic:{plan.synthetic}:seed={plan.seed}",
             **({"runtime": rt.to_dict()} if rt.to_dict() != Runtime(torch.device("cpu")).to_dict() else {})}
    if plan.qat_from:
        extra.update({k: meta["extra"][k] for k in ("val_accuracy", "val_recall", "epoch") if k in meta["extra"]})
        extra["qat_from"] = meta["sha256"]
        seconds = 0.0
    else:
        # a lesion head learns only from masks: without them it would ship its initial weights
        head = variant_config(variant).lesion_map and train_set.has_masks
        if not head and variant_config(variant).lesion_map and rt.main:
            print(f"no lesion masks in {plan.data or 'the data'}: training without the lesion-map head "
                  "(the bundle will have no lesion_map output)", file=sys.stderr)
        torch.manual_seed(plan.seed)  # initialisation
        model = create_model(variant, num_classes=len(data_classes), lesion_map=head)
        result = train(model, train_set, val_set, plan.epochs, plan.batch_size, plan.lr, plan.seed, say, rt=rt)
        model.cpu()
        if not rt.main:  # rank 0 reports and writes the checkpoint
            rt.barrier()
            return {"rank": rt.rank, "history": result["history"]}
        best = result["best"]
        extra.update({"val_accuracy": best["accuracy"], "val_recall": best["recall"], "epoch": best["epoch"],
                      "loss_curve": [round(h["loss"], 6) for h in result["history"]]})
        seconds = result["train_s"]
    if plan.qat_epochs:  # QAT's fine-tuning indexes tensors: a streamed split is loaded for it
        extra["qat"] = quantization_aware(model, *(s.materialise() if isinstance(s, StreamedPairs) else s
                                                   for s in (train_set, val_set)),
                                          plan.qat_epochs, plan.qat_lr, plan.seed, plan.progress)
        if extra["qat"]["kept"]:
            extra["val_accuracy"] = extra["qat"]["val_accuracy_float_after"]
    held_metrics = None
    if test_set is not None:  # reported, never selected on
        held_metrics = evaluate(model, test_set, progress="testing" if plan.progress else None)
        extra["test"] = t = test_report(held_metrics, len(test_set))
        if plan.progress:
            print(f"test accuracy {t['accuracy']:.4f} [{t['accuracy_ci95'][0]:.4f}, {t['accuracy_ci95'][1]:.4f}] on "
                  f"{t['samples']} pairs (never trained or selected on)", file=sys.stderr)
    if model.cfg.lesion_map:
        if held_metrics is not None:
            source = f"trainer test split ({len(test_set)} pairs, never trained or selected on)"
        else:
            held_metrics = evaluate(model, val_set)
            source = f"trainer validation split ({len(val_set)} pairs, not trained on)"
        extra["lesion_map"] = lesion_map_measurement(held_metrics, source, not plan.progress)
    save_checkpoint(out, model, variant, data_classes, specs, extra=extra)
    rt.barrier()  # the checkpoint is whole before any rank exits
    print(f"val accuracy {extra['val_accuracy']:.4f}{' after QAT' if plan.qat_epochs else ''}; trained in "
          f"{seconds + extra.get('qat', {}).get('seconds', 0):.0f}s; wrote {out}")
    return extra


def main(argv: list[str] | None = None) -> int:
    from edge_pfm.errors import run_command

    defaults = TrainPlan()
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.ablation and not args.out:
        ap.error("--out is required (unless --ablation)")
    plan = TrainPlan(data=args.data, synthetic=args.synthetic or defaults.synthetic, variant=args.variant,
                     epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                     qat_epochs=args.qat_epochs, qat_lr=args.qat_lr, qat_from=args.qat_from,
                     resolution=args.resolution, progress=not args.quiet, cache_dir=args.cache_dir,
                     workers=args.workers, device=args.device, amp=args.amp)

    def command() -> None:
        if not args.ablation:
            train_checkpoint(args.out, plan)
            return
        make_reproducible(plan.seed, plan.threads)
        try:
            specs = default_preprocessing(plan.variant)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        train_set, val_set, _, _ = load_sets(plan, specs, variant_classes(plan.variant))
        print(format_ablation(ablation(train_set, val_set, plan.variant, plan.epochs, plan.seed, plan.progress),
                              train_set.classes))

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
