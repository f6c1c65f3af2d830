import pytest
import torch
from torch import nn

from export.model import PFM, count_flops, create_model, list_models


@pytest.mark.parametrize("variant", ["pfm_t0", "pfm_tiny"])
@pytest.mark.parametrize("batch", [1, 4])
def test_forward_shapes(variant, batch):
    model = create_model(variant).eval()
    s = model.cfg.img_size
    x = torch.randn(batch, 3, s, s)
    with torch.inference_mode():
        logits = model(x, x.flip(3))
    assert logits.shape == (batch, 4)
    assert torch.isfinite(logits).all()


def test_registry_and_unknown_variant():
    assert {"pfm_t0", "pfm_tiny"} <= set(list_models())
    with pytest.raises(ValueError, match="known variants: pfm_t0, pfm_tiny"):
        create_model("pfm_huge")


def test_pfm_t0_flops_and_params():
    model = create_model("pfm_t0")
    flops = count_flops(model)  # 2 x MACs
    params = sum(p.numel() for p in model.parameters())
    assert 1.2e9 <= flops <= 1.6e9, flops
    assert 4e6 < params < 7e6, params


def test_export_friendly_module_tree():
    """No nn.MultiheadAttention (its fast path does not export) and no in-place slice
    assignment (index_put / copy_ into a slice exports as ScatterND)."""
    model = create_model("pfm_tiny").eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    x = torch.randn(2, 3, 128, 128)
    traced = torch.jit.trace(model, (x, x))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert not {"aten::index_put_", "aten::index_put", "aten::copy_", "aten::slice_scatter"} & kinds, kinds
    assert "aten::split_with_sizes" in kinds or "aten::split" in kinds  # PConv is split + concat


def test_single_source_ablation_ignores_other_input():
    model = create_model("pfm_tiny", single_source="white_light").eval()
    assert list(model.branches) == ["white_light"]
    w = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        a = model(w, torch.zeros(1, 3, 128, 128))
        b = model(w, torch.randn(1, 3, 128, 128))
    torch.testing.assert_close(a, b)


def test_monochrome_fluorescence_and_custom_classes():
    model = create_model("pfm_tiny", num_classes=3, in_chans={"white_light": 3, "fluorescence": 1},
                         img_size=96).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 96, 96), torch.randn(2, 1, 96, 96))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("bad", [dict(img_size=100), dict(single_source="infrared"), dict(num_heads=5)])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValueError):
        create_model("pfm_tiny", **bad)


def test_timm_style_interface():
    model: PFM = create_model("pfm_tiny").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        feats = model.forward_features(x, x)
        assert feats.shape == (1, model.num_tokens, model.cfg.fusion_dim)
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.cfg.fusion_dim)
    model.reset_classifier(2)
    with torch.inference_mode():
        assert model(x, x).shape == (1, 2)
