import pickle

import pytest
import torch

from export.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from export.model import DEFAULT_CLASSES as CLASSES
from export.model import create_model
from export.train import default_preprocessing


def _save(path, model=None, **kw):
    model = model or create_model("pfm_tiny")
    save_checkpoint(path, model, "pfm_tiny", CLASSES, default_preprocessing("pfm_tiny"), **kw)
    return model


def test_round_trip(tmp_path):
    model = _save(tmp_path / "a.pt").eval()
    loaded, meta = load_checkpoint(tmp_path / "a.pt")
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, x), loaded(x, x))
    assert meta["variant"] == "pfm_tiny" and meta["classes"] == CLASSES
    assert meta["preprocessing"]["white_light"].size == (128, 128)
    assert len(meta["sha256"]) == 64


def test_wrong_keys_are_named(tmp_path):
    _save(tmp_path / "a.pt")
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    ckpt["state_dict"]["bogus.weight"] = torch.zeros(1)
    del ckpt["state_dict"]["head.bias"]
    torch.save(ckpt, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: head\.bias.*unexpected keys: bogus\.weight"):
        load_checkpoint(tmp_path / "b.pt")


def test_shape_mismatch_is_named(tmp_path):
    _save(tmp_path / "a.pt")
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    ckpt["state_dict"]["head.weight"] = torch.zeros(7, 64)
    torch.save(ckpt, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint \(7, 64\)"):
        load_checkpoint(tmp_path / "b.pt")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint"):
        load_checkpoint(p)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "edge-pfm/checkpoint/v1", "x": Evil()}, p, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(p)


def test_bare_state_dict_and_missing_file(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(create_model("pfm_tiny").state_dict(), p)
    with pytest.raises(CheckpointError, match="format tag"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_unknown_variant(tmp_path):
    _save(tmp_path / "a.pt")
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    ckpt["variant"] = "pfm_xxl"
    torch.save(ckpt, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="unknown variant 'pfm_xxl'"):
        load_checkpoint(tmp_path / "b.pt")
