import torch

from export.checkpoint import load_checkpoint
from export.train import default_preprocessing, format_ablation, split, synthetic_tensors


def test_trainer_writes_a_loadable_checkpoint(tiny_checkpoint):
    model, meta = load_checkpoint(tiny_checkpoint)
    assert meta["extra"]["val_accuracy"] > 0.35  # 6 epochs on 480 pairs: clearly better than chance (0.25)
    assert meta["extra"]["train_samples"] + meta["extra"]["val_samples"] == 480
    assert not model.training


def test_split_is_stratified_and_disjoint():
    data = synthetic_tensors(40, default_preprocessing("pfm_tiny"), seed=1, size=(64, 48), progress=False)
    tr, va = split(data, 0.25, seed=0)
    assert len(tr) + len(va) == 40
    assert torch.bincount(va.labels).tolist() == [2, 2, 2, 2] or torch.bincount(va.labels).tolist() == [3, 3, 3, 3]
    # disjoint: no validation pair is also a training pair
    assert not any(torch.equal(v, t) for v in va.white_light[:3] for t in tr.white_light)


def test_ablation_table_format():
    rows = {"fusion": {"accuracy": 0.9, "recall": {"a": 1.0, "b": 0.8}},
            "white_light only": {"accuracy": 0.7, "recall": {"a": 0.9, "b": 0.5}}}
    table = format_ablation(rows, ("a", "b"))
    assert "| fusion | 0.900 | 1.000 | 0.800 |" in table
