"""Pairs streamed from disk (export.data): an epoch reproduces at any DataLoader worker count, the tensor cache gives
back what decoding gives and survives a torn file, a lesion sample without a mask has an unknown target that the
loss and the scores leave out, and calibration refuses a dataset whose test split changed since training. Real
PNGs, real DataLoader workers, real training and export."""
import csv
import dataclasses

import numpy as np
import pytest
import torch
from dataset_renderer import write_patients

from edge_pfm.dataset import PairedDataset
from edge_pfm.roles import ClassRoles
from export.data import PairSamples
from export.splits import dataset_splits
from export.train import StreamedPairs, default_preprocessing, known_masks, lesion_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_patients(tmp_path_factory.mktemp("streamed") / "data", patients=8, visits=2, seed=5)


def _samples(data, **kw) -> PairSamples:
    ds = PairedDataset(data)
    return PairSamples(ds, range(len(ds)), default_preprocessing("pfm_tiny"), ClassRoles.default_for(ds.classes).lesion,
                       **kw)


def _epoch(samples: PairSamples, workers: int, epoch: int, world: int = 1, rank: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    return list(StreamedPairs(samples, workers).train_batches(4, gen, epoch, seed=3, rank=rank, world=world))


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(p, q))
        for p, q in zip(a, b))


def test_an_epoch_of_augmented_pairs_is_the_same_at_any_worker_count(data):
    samples = _samples(data, augment=True, seed=3)
    inline, two_workers = _epoch(samples, 0, epoch=1), _epoch(samples, 2, epoch=1)
    assert _same(inline, two_workers)
    assert not _same(inline, _epoch(samples, 0, epoch=2))  # another epoch: another order and augmentation
    w = torch.cat([b[0] for b in inline])
    plain = torch.stack([_samples(data)[k][0] for k in range(len(samples))])
    assert w.shape == plain.shape and not torch.equal(w.sort(0).values, plain.sort(0).values)  # it is augmented


def test_the_cache_gives_back_what_decoding_gives_and_replaces_a_torn_file(data, tmp_path):
    cache = tmp_path / "cache"
    plain, cached = _samples(data), _samples(data, cache_dir=cache)
    for k in range(len(plain)):
        for x, y in zip(plain[k], cached[k]):
            assert torch.equal(x, y)
    files = sorted(cache.glob("*.npz"))
    assert len(files) == len(plain)
    files[0].write_bytes(files[0].read_bytes()[:100])  # a crash mid-write elsewhere, or a foreign file
    torn = next(k for k in range(len(cached)) if cached._cache_path(cached.indices[k]) == files[0])
    for x, y in zip(plain[torn], cached[torn]):
        assert torch.equal(x, y)
    assert files[0].stat().st_size > 100  # recomputed and rewritten
    ds = PairedDataset(data)
    specs = {m: dataclasses.replace(s, mean=(0.5, 0.5, 0.5)) for m, s in default_preprocessing("pfm_tiny").items()}
    other = PairSamples(ds, range(len(ds)), specs, cache_dir=cache)
    other[0]
    assert len(list(cache.glob("*.npz"))) == len(plain) + 1  # another spec, another key


def test_a_lesion_sample_without_a_mask_is_unknown_and_left_out_of_the_loss(data, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    ds = PairedDataset(copy)
    lesion = [i for i, s in enumerate(ds.samples) if ds.classes[s.label] in ("lsil", "hsil")]
    (copy / "masks" / f"{ds.samples[lesion[0]].name}.png").unlink()
    samples = _samples(copy)
    targets = torch.stack([samples[k][3] for k in range(len(samples))])
    known = known_masks(targets)
    assert not known[lesion[0]] and known.sum() == len(samples) - 1  # unknown, not empty
    normal = [i for i, s in enumerate(samples.ds.samples) if samples.ds.classes[s.label] == "normal"]
    assert all(float(targets[i].sum()) == 0 for i in normal)  # no lesion class, no mask: an empty map
    assert all(float(targets[i].sum()) > 0 for i in lesion[1:])
    logits = torch.randn(targets.shape, requires_grad=True)
    loss = lesion_loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert float(logits.grad[lesion[0]].abs().sum()) == 0  # the unknown map teaches nothing
    assert torch.allclose(loss, lesion_loss(logits[known], targets[known]))


def test_calibration_refuses_a_dataset_whose_test_split_changed_since_training(tmp_path):
    from calibration.calibrate import CalibrationError, CalibrationPlan, calibrate
    from export.bundle_export import export_bundle
    from export.train import TrainPlan, train_checkpoint

    data = write_patients(tmp_path / "data", patients=24, visits=2, seed=6)
    extra = train_checkpoint(tmp_path / "c.pt", TrainPlan(data=data, variant="pfm_tiny", epochs=1, progress=False,
                                                          workers=0))
    export_bundle(tmp_path / "c.pt", tmp_path / "bundle", parity_random=2, parity_scenes=2)
    ds = PairedDataset(data)
    test_name = ds.samples[dataset_splits(ds, seed=extra["splits"]["seed"]).test[0]].name
    with open(data / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["sample"] != test_name]
    with open(data / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for d in ("white", "fluorescence", "masks"):
        (data / d / f"{test_name}.png").unlink(missing_ok=True)
    before = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    with pytest.raises(CalibrationError, match="test split is not the one the trainer held out"):
        calibrate(tmp_path / "bundle", CalibrationPlan(data=data))
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == before  # nothing written


def test_streamed_evaluation_batches_cover_every_pair_once_in_order(data):
    samples = _samples(data)
    seen = torch.cat([b[2] for b in StreamedPairs(samples, 1).batches(3)])
    assert seen.tolist() == samples.labels.tolist()
    assert np.array_equal(StreamedPairs(samples).labels.numpy(), samples.labels)


def test_loader_workers_start_after_the_caller_ran_opencv_in_parallel(data):
    """A team's loop reads or resizes with OpenCV before its first batch; the forked workers must still start
    (OpenCV's thread pool is not fork-safe: cv2.setNumThreads in such a worker waited forever)."""
    import subprocess
    import sys

    from conftest import ROOT

    code = f"""
import sys, numpy as np, cv2, torch
sys.path.insert(0, {str(ROOT)!r})
from edge_pfm.dataset import PairedDataset
from edge_pfm.roles import ClassRoles
from export.data import PairSamples, pair_loader
from export.train import default_preprocessing
big = np.random.default_rng(0).integers(0, 255, (1440, 2560, 3), dtype=np.uint8)
for _ in range(5):  # the caller's own OpenCV work: a parallel resize starts OpenCV's thread pool
    cv2.resize(big, (640, 360), interpolation=cv2.INTER_AREA)
ds = PairedDataset({str(data)!r})
samples = PairSamples(ds, range(len(ds)), default_preprocessing("pfm_tiny"), ClassRoles.default_for(ds.classes).lesion)
print(sum(len(b[2]) for b in pair_loader(samples, 4, shuffle=True, workers=1)))
"""
    import os
    import signal

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: a hung worker goes with it
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the loader's worker hung after the caller's OpenCV work")
    assert proc.returncode == 0, err[-2000:]
    assert out.split()[-1] == str(len(PairedDataset(data)))
