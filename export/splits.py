"""Three sets kept apart: `train` trains (and calibrates the INT8 ranges), `val` picks the checkpoint (and is
where an INT8 recipe would be tuned), `test` is only reported, and the INT8 gate decides on it. No torch.

A `split` column in labels.csv is used as given. Without one, a grouped, stratified split makes all three: a
group (the `group` column, a patient or a visit; else each sample alone) never straddles two sets, every class
is in every set, and pairs with the same content (the same two files under two names) are one group. Either
way, no pair's content may be in two sets.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_pfm.dataset import SPLITS, DatasetError, PairedDataset, _listing
from export.progress import progress

FRACTIONS = {"val": 0.15, "test": 0.15}  # the rest trains
MIN_GROUPS_PER_CLASS = 3  # one for each set


@dataclass(frozen=True)
class Splits:
    train: list[int]
    val: list[int]
    test: list[int]
    source: str  # how they were made
    seed: int = 0
    groups: dict[str, int] = field(default_factory=dict)  # groups per set
    digests: dict[str, str] = field(default_factory=dict)  # set -> sha256 over its pairs' content hashes

    def indices(self, name: str) -> list[int]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def to_dict(self) -> dict:
        return {"source": self.source, "seed": self.seed, **{f"{k}_samples": len(self.indices(k)) for k in SPLITS},
                **({f"{k}_groups": v for k, v in self.groups.items()} if self.groups else {}),
                **{f"{k}_sha256": v for k, v in self.digests.items()}}


def _digests(sets: dict[str, list[int]], hashes: list[str]) -> dict[str, str]:
    return {k: hashlib.sha256("".join(sorted(hashes[i] for i in idx)).encode()).hexdigest()
            for k, idx in sets.items()}


def _union_find(n: int):
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    return find, union


def dataset_splits(ds: PairedDataset, seed: int = 0, need: tuple[str, ...] = SPLITS) -> Splits:
    """train / val / test sample indices of a labelled dataset (see the module docstring). `need`: the sets a split
    column must give every class (calibration with its own --eval needs no test split)."""
    if not ds.labelled:
        unlabelled = [s.name for s in ds.samples if s.label is None]
        raise DatasetError(f"{ds.root}: {len(unlabelled)} sample(s) without a label in labels.csv: "
                           f"{_listing(unlabelled)}")
    hashes = [ds.pair_hash(i) for i in progress(range(len(ds)), desc=f"hashing {ds.root}", enabled=len(ds) >= 500)]
    if ds.has_splits:
        where: dict[str, set[str]] = {}
        for s, h in zip(ds.samples, hashes):
            where.setdefault(h, set()).add(s.split)
        twice = [s.name for s, h in zip(ds.samples, hashes) if len(where[h]) > 1]
        if twice:
            raise DatasetError(f"{ds.root}: the same pair content is in two splits (labels.csv split column): "
                               f"{_listing(twice)}; a copy in train makes val and test optimistic")
        if ds.samples[0].group is not None:
            sides: dict[str, set[str]] = {}
            for s in ds.samples:
                sides.setdefault(s.group, set()).add(s.split)
            straddle = sorted(g for g, v in sides.items() if len(v) > 1)
            if straddle:
                raise DatasetError(f"{ds.root}: group(s) in more than one split: {_listing(straddle)}; a patient's "
                                   "images belong to one set")
        sets = {k: [i for i, s in enumerate(ds.samples) if s.split == k] for k in SPLITS}
        for k in need:
            absent = [c for i, c in enumerate(ds.classes) if i not in {ds.samples[j].label for j in sets[k]}]
            if absent:
                raise DatasetError(f"{ds.root / 'labels.csv'}: split {k!r} has no sample of class(es) {absent}; "
                                   f"every class must be in {', '.join(need)}")
        return Splits(sets["train"], sets["val"], sets["test"], source="labels.csv split column", seed=seed,
                      digests=_digests(sets, hashes))
    find, union = _union_find(len(ds))
    first: dict[str, int] = {}
    for i, (s, h) in enumerate(zip(ds.samples, hashes)):
        for key in (f"hash:{h}", f"group:{s.group}" if s.group is not None else None):
            if key is None:
                continue
            if key in first:
                union(first[key], i)
            else:
                first[key] = i
    members: dict[int, list[int]] = {}
    for i in range(len(ds)):
        members.setdefault(find(i), []).append(i)
    labels = [s.label for s in ds.samples]
    by_class: dict[int, list[int]] = {}
    for root, idx in sorted(members.items()):
        dominant = min(Counter(labels[i] for i in idx).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
        by_class.setdefault(dominant, []).append(root)
    rng = np.random.default_rng(seed)
    side: dict[int, str] = {}
    few = []
    for c in range(len(ds.classes)):
        roots = by_class.get(c, [])
        if len(roots) < MIN_GROUPS_PER_CLASS:
            few.append(f"{ds.classes[c]} ({len(roots)})")
            continue
        order = [roots[k] for k in rng.permutation(len(roots))]
        n_val = max(1, round(len(roots) * FRACTIONS["val"]))
        n_test = max(1, round(len(roots) * FRACTIONS["test"]))
        for k, r in enumerate(order):
            side[r] = "val" if k < n_val else "test" if k < n_val + n_test else "train"
    if few:
        unit = "groups" if ds.samples[0].group is not None else "samples"
        raise DatasetError(f"{ds.root}: class(es) with fewer than {MIN_GROUPS_PER_CLASS} {unit}, so not in all of "
                           f"train, val and test: {', '.join(few)}; add data, or give a split column")
    sets: dict[str, list[int]] = {k: [] for k in SPLITS}
    groups = Counter()
    for root, idx in members.items():
        sets[side[root]].extend(idx)
        groups[side[root]] += 1
    for k in SPLITS:
        sets[k].sort()
        missing = [ds.classes[c] for c in range(len(ds.classes)) if c not in {labels[i] for i in sets[k]}]
        if missing:  # a mixed group can take a class's only samples elsewhere
            raise DatasetError(f"{ds.root}: the grouped split left no {missing} in {k}; give a split column")
    unit = "group" if ds.samples[0].group is not None else "sample"
    return Splits(sets["train"], sets["val"], sets["test"],
                  source=f"grouped stratified split by {unit} (val {FRACTIONS['val']:.0%}, test "
                         f"{FRACTIONS['test']:.0%} of each class's {unit}s)", seed=seed, groups=dict(groups),
                  digests=_digests(sets, hashes))


UNKNOWN_SPLIT = "no split column: which of its pairs trained the model is unknown"


def training_record(data: str | Path, classes: tuple[str, ...] | None = None) -> dict:
    """provenance.training for a team's bundle trained on `data` (python -m export --trained-on DIR): the folder
    and, when labels.csv has a split column, that split with each set's content digest, in the shape our own
    checkpoints record (dataset_splits(...).to_dict()), so calibration can tell the team's test pairs from its
    training pairs and never gate on a pair the model trained on. Without a split column the digests would be of
    a split we made up, not theirs: {"splits": None} and a note say that which pairs trained it is unknown.
    Raises DatasetError (exit 2) naming the folder when it is missing or not a readable paired dataset."""
    root = Path(data).resolve()
    try:
        ds = PairedDataset(root, classes)
        if not ds.has_splits:
            return {"data": str(root), "splits": None, "note": UNKNOWN_SPLIT}
        return {"data": str(root), "splits": dataset_splits(ds).to_dict()}
    except DatasetError as exc:
        raise DatasetError(f"--trained-on {data}: {exc} (name the folder your model was trained on, as it was then)"
                           ) from None
    except OSError as exc:  # a pair that cannot be read while hashing
        raise DatasetError(f"--trained-on {data}: cannot read {exc.filename or data} ({exc.strerror or exc}); "
                           "name a folder whose pairs are all readable") from None
