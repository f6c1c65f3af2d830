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


def _train(out, *extra):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "export.train", "--synthetic", "96", "--epochs", "2", "--resolution", "128x96",
           "--threads", "2", "--quiet", "--out", str(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    return torch.load(out, map_location="cpu", weights_only=True)


def test_training_is_bitwise_reproducible(tmp_path):
    """Two runs of the same command (separate processes, as a user runs them) give identical weights."""
    a, b = _train(tmp_path / "a.pt"), _train(tmp_path / "b.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["extra"]["seed"] == 0 and a["extra"]["threads"] == 2 and a["extra"]["versions"]["torch"]
    c = _train(tmp_path / "c.pt", "--seed", "1")  # and the seed matters
    assert not all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])


def test_qat_fake_quantization_matches_the_int8_grid_and_comes_off():
    from export.model import FasterNetBlock, create_model
    from export.qat import add_modules, fake_quant, fake_quantized, observe_ranges, quantized_convs

    torch.manual_seed(0)
    model = create_model("pfm_tiny", num_classes=4).eval()
    x = (torch.rand(4, 3, 128, 128), torch.rand(4, 3, 128, 128))
    ranges = observe_ranges(model, iter([x]))
    names = [n for n, _ in quantized_convs(model)]
    assert names and not any(".stem." in n for n in names)
    assert {k.split("#")[0] for k in ranges["conv_input"]} == set(names)
    v = torch.linspace(-2, 2, 101)
    q = fake_quant(v, 1.0)
    assert torch.allclose(q * 127, torch.round(q * 127)) and q.max() == 1.0  # on the int8 grid, clipped at amax
    ref = model(*x)
    with fake_quantized(model, ranges):
        conv = dict(model.named_modules())[names[0]]
        w = conv.weight  # parametrized: per-output-channel symmetric int8
        scale = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 127
        assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-4)
        name, block = next((n, m) for n, m in add_modules(model) if isinstance(m, FasterNetBlock))
        sums = []
        handle = block.register_forward_hook(lambda m, i, o: sums.append(o))
        quantized = model(*x)
        handle.remove()
        # a residual Add's inputs are on their int8 grids, its sum is not rounded again (inputs only, as the Q/DQ
        # model quantizes: export.quant_scheme); it was, on the grid of its own output range
        step = ranges["adds"][name]["out"] / 127
        assert not torch.allclose(sums[0] / step, torch.round(sums[0] / step), atol=1e-3)
    assert not torch.equal(quantized, ref)
    assert torch.equal(model(*x), ref)  # back to the float model exactly
