"""Training on several ranks with PyTorch's own engine: torchrun on CPU (gloo), a DistributedSampler's shards, a
2-rank loss curve against a 1-rank one at the same global batch, and rank 0's checkpoint exported. Real processes,
real collectives, real files."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from export.distributed import distributed_sampler, runtime

LOSS_TOLERANCE = 0.05  # relative, per epoch: BatchNorm sees each rank's half of the global batch


@pytest.mark.parametrize("n", [96, 97])
def test_rank_shards_are_disjoint_apart_from_padding_and_cover_the_data(n):
    shards = [list(distributed_sampler(range(n), seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    overlap = set(shards[0]) & set(shards[1])
    assert len(overlap) == (2 - n % 2) % 2  # only the sampler's padding repeats an index
    one = list(distributed_sampler(range(n), seed=3, epoch=1))
    # rank r's share of each global batch of 16 is what one rank's batch of 16 holds, interleaved
    for k in range(0, n - n % 16, 16):
        assert sorted(shards[0][k // 2:k // 2 + 8] + shards[1][k // 2:k // 2 + 8]) == sorted(one[k:k + 16])
    assert list(distributed_sampler(range(n), seed=3, epoch=2)) != one  # set_epoch reshuffles


def test_cuda_asked_for_without_one_is_refused_with_the_fix():
    from edge_pfm.errors import UnavailableError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UnavailableError, match="--device cpu"):
        runtime("cuda")


def test_torchrun_two_ranks_match_one_and_rank_0_writes_a_checkpoint_that_exports(tmp_path):
    from edge_pfm.synthetic import write_dataset
    from export.checkpoint import load_checkpoint

    data = write_dataset(tmp_path / "data", 64, seed=5, size=(320, 240))
    args = ["-m", "export.train", "--data", str(data), "--epochs", "2", "--batch-size", "16", "--threads", "1",
            "--quiet"]
    run = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 600}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.pt")], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", *args, "--out", str(tmp_path / "two.pt")],
                         **run)
    assert two.returncode == 0, two.stderr[-3000:]
    _, m1 = load_checkpoint(tmp_path / "one.pt")
    _, m2 = load_checkpoint(tmp_path / "two.pt")
    assert m2["extra"]["runtime"]["world_size"] == 2 and m2["extra"]["runtime"]["deterministic"] is True
    c1, c2 = m1["extra"]["loss_curve"], m2["extra"]["loss_curve"]
    assert len(c1) == len(c2) == 2
    assert all(abs(a - b) <= LOSS_TOLERANCE * a for a, b in zip(c1, c2)), (c1, c2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one.pt", "two.pt"]  # one writer, no leftovers
    ex = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(tmp_path / "two.pt"), "--out",
                         str(tmp_path / "bundle")], **run)
    assert ex.returncode == 0, ex.stderr[-3000:]


def test_the_pieces_serve_a_teams_own_loop(tmp_path):
    """examples/own_loop.py: model factory, dataset, splits, loader, loss and checkpoint writer in a plain loop;
    its checkpoint exports like the trainer's."""
    from dataset_renderer import write_patients

    data = write_patients(tmp_path / "data", patients=12, visits=2, seed=6)
    run = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 600}
    r = subprocess.run([sys.executable, "examples/own_loop.py", "--data", str(data), "--epochs", "1", "--out",
                        str(tmp_path / "own.pt")], **run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val accuracy" in r.stdout
    ex = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(tmp_path / "own.pt"), "--out",
                         str(tmp_path / "bundle")], **run)
    assert ex.returncode == 0, ex.stderr[-3000:]
    import json

    outputs = [o["name"] for o in json.loads((tmp_path / "bundle" / "manifest.json").read_text())["outputs"]]
    assert outputs == ["logits", "lesion_map"]  # trained on its masks
