"""PyTorch PFM -> ONNX with a symbolic batch (the torch-free graph checks and writers live in export.onnx_graph)."""
from __future__ import annotations

import io

import torch

from edge_pfm.bundle import MODALITIES
from export.model import PFM
from export.onnx_graph import (
    BATCH_DIM,
    IR_VERSION_FOR_OPSET,
    LESION_MAP,
    OUTPUT_NAME,
    ExportError,
    constants_to_initializers,
    declare_output_shapes,
)


def output_names(model: PFM) -> list[str]:
    return [OUTPUT_NAME, LESION_MAP] if model.cfg.lesion_map else [OUTPUT_NAME]


class DeployedPFM(torch.nn.Module):
    """What the device runs: class logits, and with the head the lesion map as probabilities (sigmoid in the
    graph, so no backend has to know)."""

    def __init__(self, model: PFM):
        super().__init__()
        self.model = model

    def forward(self, white_light: torch.Tensor, fluorescence: torch.Tensor):
        logits, lesion = self.model.forward_multitask(white_light, fluorescence)
        return logits if lesion is None else (logits, lesion.sigmoid())


def onnx_from_torch(model: PFM, opset: int = 17, example_batch: int = 2):
    """-> onnx.ModelProto with inputs white_light/fluorescence, outputs logits (and lesion_map when the model
    has the head), symbolic batch."""
    import onnx

    if opset not in IR_VERSION_FOR_OPSET:
        raise ExportError(f"opset {opset} is not supported; use one of {sorted(IR_VERSION_FOR_OPSET)} "
                          "(>= 17 keeps LayerNormalization one node; TensorRT 10 parses up to 20)")
    if example_batch < 2:
        raise ExportError("export with an example batch >= 2, or the exporter may freeze the batch dimension")
    model = model.eval()
    s = model.cfg.img_size
    args = tuple(torch.randn(example_batch, model.cfg.in_chans[m], s, s) for m in MODALITIES)
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad():
        # the legacy (TorchScript) exporter: keeps batch symbolic with dynamic_axes and folds BN
        names = output_names(model)
        torch.onnx.export(
            DeployedPFM(model), args, buf, dynamo=False, opset_version=opset, input_names=list(MODALITIES),
            output_names=names, do_constant_folding=True,
            dynamic_axes={**{m: {0: BATCH_DIM} for m in MODALITIES}, **{n: {0: BATCH_DIM} for n in names}},
        )
    proto = declare_output_shapes(constants_to_initializers(onnx.load_from_string(buf.getvalue())))
    proto.ir_version = IR_VERSION_FOR_OPSET[opset]
    proto.producer_name = "edge-pfm"
    return proto


