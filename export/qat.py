"""Quantization-aware fine-tuning that matches the Q/DQ scheme calibration writes.

Fake quantization (straight-through estimator) where the Q/DQ model has them (export.quant_scheme):
- every Conv input but the stems': int8 symmetric per-tensor activations;
- every Conv weight but the stems': int8 symmetric per-output-channel. BatchNorm is frozen, and since
  the folded weight is the raw weight times a per-channel factor, quantizing the raw weight per channel
  is quantizing the folded one;
- each FasterNet block's residual Add and each channel gate's Add: both inputs, per-tensor. Not its output as such
  (the Q/DQ model quantizes inputs only: where the sum feeds a Conv, that Conv's input fake-quantizes it).
Activation ranges (amax) come from a percentile observer over training batches before fine-tuning and
stay fixed, so the fine-tuned weights adapt to exactly the grid the Q/DQ model will use. The ranges are
stored in the checkpoint by module name and call order; export maps them onto the ONNX tensors
(`qat_ranges`), and calibration writes them through the same Q/DQ and cache writers as PTQ ranges.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from export.model import PFM, ChannelAttention, FasterNetBlock
from export.quant_scheme import KEEP_FLOAT_MODULES, PERCENTILE, quantized_conv_nodes, residual_adds

QMAX = 127.0


def fake_quant(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """int8 symmetric round-trip with a straight-through gradient (zero outside the range, as clamping)."""
    scale = torch.as_tensor(amax, dtype=x.dtype) / QMAX
    q = torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale
    return x + (q - x).detach()


class QuantSwitch:
    """Turns fake quantization on and off without removing it: QAT runs the float and the quantized model
    on the same weights, batch by batch."""

    enabled = True


class PerChannelWeightQuant(nn.Module):
    """Parametrization: conv weight -> its per-output-channel int8 symmetric round-trip."""

    def __init__(self, switch: QuantSwitch):
        super().__init__()
        self.switch = switch

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.switch.enabled:
            return w
        amax = w.detach().abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12)
        return fake_quant(w, amax)


def quantized_convs(model: PFM, keep_float: tuple[str, ...] = KEEP_FLOAT_MODULES) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions the Q/DQ model quantizes, in module order (export.quant_scheme: stems stay float)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not any(k in f".{name}." for k in keep_float)]


def _fasternet_sum(block: FasterNetBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, block.mlp(block.pconv(x))


def _channel_gate_sum(block: ChannelAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return block._mlp(x.mean((2, 3), keepdim=True)), block._mlp(x.amax((2, 3), keepdim=True))


# modules whose forward ends in an Add that calibration.qdq.residual_adds quantizes: -> the Add's two inputs,
# and what the module makes of the sum
QUANTIZED_ADDS = {
    FasterNetBlock: (_fasternet_sum, lambda block, x, total: total),
    ChannelAttention: (_channel_gate_sum, lambda block, x, total: x * total.sigmoid()),
}


def add_modules(model: PFM) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m) in QUANTIZED_ADDS]


def _percentile(x: torch.Tensor, q: float = PERCENTILE) -> float:
    flat = x.detach().abs().flatten()
    k = max(1, min(flat.numel(), round(flat.numel() * q / 100.0)))
    return float(flat.kthvalue(k).values)


class _CallCounter:
    """Which call of a module this is within one forward pass (a shared conv runs once per pooled input)."""

    def __init__(self, model: nn.Module):
        self.counts: dict[str, int] = {}
        self.hook = model.register_forward_pre_hook(lambda m, i: self.counts.clear())

    def key(self, name: str) -> str:
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        return f"{name}#{k}"


@torch.no_grad()
def observe_ranges(model: PFM, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """-> {"conv_input": {"conv name#call": amax}, "adds": {module name: {"in0", "in1", "out"}}}: the mean over
    batches of each tensor's PERCENTILE-th |value|."""
    sums: dict[tuple, float] = {}
    counter = _CallCounter(model)
    hooks = [counter.hook]

    def add(key: tuple, t: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + _percentile(t)

    for name, conv in quantized_convs(model):
        hooks.append(conv.register_forward_pre_hook(
            lambda m, inp, name=name: add(("conv_input", counter.key(name)), inp[0])))
    for name, block in add_modules(model):
        def record(m, inp, out, name=name):
            a, b = QUANTIZED_ADDS[type(m)][0](m, inp[0])
            for role, t in (("in0", a), ("in1", b), ("out", a + b)):
                add(("adds", name, role), t)
        hooks.append(block.register_forward_hook(record))
    model.eval()
    count = 0
    try:
        for w, f in batches:
            counter.counts.clear()
            model.forward_multitask(w, f)  # the lesion decoder's convs are quantized too
            count += 1
    finally:
        for h in hooks:
            h.remove()
    if not count:
        raise ValueError("no batches to observe activation ranges on")
    ranges: dict = {"conv_input": {}, "adds": {}, "percentile": PERCENTILE, "batches": count}
    for key, total in sums.items():
        if key[0] == "conv_input":
            ranges["conv_input"][key[1]] = max(total / count, 1e-8)
        else:
            ranges["adds"].setdefault(key[1], {})[key[2]] = max(total / count, 1e-8)
    return ranges


@contextlib.contextmanager
def fake_quantized(model: PFM, ranges: dict) -> Iterator[QuantSwitch]:
    """Inside the block, `model` computes as the Q/DQ model will (while the yielded switch is enabled);
    afterwards it is a plain float model again (the fine-tuned weights stay)."""
    counter = _CallCounter(model)
    switch = QuantSwitch()
    hooks, patched = [counter.hook], []
    convs = quantized_convs(model)

    def quantize_input(m, inp, name):
        key = counter.key(name)
        return (fake_quant(inp[0], ranges["conv_input"][key]),) if switch.enabled else None

    try:
        for name, conv in convs:
            hooks.append(conv.register_forward_pre_hook(lambda m, inp, name=name: quantize_input(m, inp, name)))
            parametrize.register_parametrization(conv, "weight", PerChannelWeightQuant(switch))
        for name, block in add_modules(model):
            r = ranges["adds"][name]
            inputs, then = QUANTIZED_ADDS[type(block)]

            def forward(x, block=block, r=r, inputs=inputs, then=then):
                a, b = inputs(block, x)
                if not switch.enabled:
                    return then(block, x, a + b)
                return then(block, x, fake_quant(a, r["in0"]) + fake_quant(b, r["in1"]))

            block.forward = forward
            patched.append(block)
        yield switch
    finally:
        for h in hooks:
            h.remove()
        for _, conv in convs:
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
        for block in patched:
            del block.forward  # back to the class's forward


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm statistics stay as trained (they fold into the conv at export)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def call_order(model: PFM, example: tuple[torch.Tensor, torch.Tensor]) -> dict[str, list[str]]:
    """Call keys of the quantized convs and names of the quantized-Add modules, in the order one forward pass
    calls them: the order the exporter's trace writes their ONNX nodes in."""
    order: dict[str, list[str]] = {"conv": [], "add": []}
    counter = _CallCounter(model)
    hooks = [counter.hook]
    hooks += [c.register_forward_pre_hook(lambda m, i, n=n: order["conv"].append(counter.key(n)))
              for n, c in quantized_convs(model)]
    hooks += [b.register_forward_hook(lambda m, i, o, n=n: order["add"].append(n)) for n, b in add_modules(model)]
    try:
        with torch.no_grad():
            model.eval().forward_multitask(*example)  # the exported graph holds the lesion decoder too
    finally:
        for h in hooks:
            h.remove()
    return order


def onnx_tensor_ranges(model: PFM, proto, ranges: dict) -> dict[str, float]:
    """Map a checkpoint's QAT ranges onto the exported graph's tensor names: the i-th quantized Conv call is
    the i-th non-stem Conv node, the i-th quantized-Add module the i-th Add calibration quantizes (the trace
    keeps call order, and `a + b` becomes Add(a, b)). Weight shapes are checked, so a mismatch fails loudly
    instead of quantizing the wrong tensor."""
    from onnx import numpy_helper

    cfg = model.cfg
    example = tuple(torch.zeros(1, cfg.in_chans[m], cfg.img_size, cfg.img_size) for m in cfg.modalities)
    order = call_order(model, example)
    modules = dict(model.named_modules())
    inits = {i.name: i for i in proto.graph.initializer}
    conv_nodes = quantized_conv_nodes(proto)
    if len(conv_nodes) != len(order["conv"]):
        raise ValueError(f"{len(conv_nodes)} quantizable Conv nodes in the graph, {len(order['conv'])} calls in the model")
    out: dict[str, float] = {}
    for node, key in zip(conv_nodes, order["conv"]):
        name = key.split("#")[0]
        w = tuple(numpy_helper.to_array(inits[node.input[1]]).shape)
        if w != tuple(modules[name].weight.shape):
            raise ValueError(f"Conv {node.name} has weight {w}, but the call-order match {name} has "
                             f"{tuple(modules[name].weight.shape)}")
        out[node.input[0]] = ranges["conv_input"][key]
    nodes = {n.name: n for n in proto.graph.node}
    add_nodes = [nodes[a] for a in residual_adds(proto)]
    if len(add_nodes) != len(order["add"]):
        raise ValueError(f"{len(add_nodes)} quantized Adds in the graph, {len(order['add'])} in the model")
    for node, name in zip(add_nodes, order["add"]):
        r = ranges["adds"][name]
        out[node.input[0]], out[node.input[1]] = r["in0"], r["in1"]
        out.setdefault(node.output[0], r["out"])  # where the sum feeds a Conv, that Conv's trained input range
    return out


def finetune(model: PFM, train_set, val_set, ranges: dict, epochs: int = 3, batch_size: int = 32, lr: float = 1e-4,
             seed: int = 0, progress: bool = True) -> dict:
    """QAT in place, distilled from the FP32 model as it was (a frozen copy, the teacher): each batch runs the
    same weights quantized and float, and both are pulled towards the teacher's class probabilities (KL) and,
    with a lesion head, its map (squared error of the probabilities). BatchNorm stays frozen and the learning
    rate small, so the float weights stay where the trained model was: the INT8 gate compares INT8 with the
    bundle's FP32 model, which is these same weights. Keeps the epoch with the best validation agreement between
    the quantized and the float model."""
    import copy
    import sys
    import time

    import torch.nn.functional as F

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    best, best_state, best_epoch, history = (-1.0, -1.0), None, {}, []
    t0 = time.perf_counter()

    def distil(student: tuple, target: tuple) -> torch.Tensor:
        loss = F.kl_div(F.log_softmax(student[0], 1), F.log_softmax(target[0], 1), log_target=True,
                        reduction="batchmean")
        if student[1] is not None and target[1] is not None:
            loss = loss + F.mse_loss(student[1].sigmoid(), target[1].sigmoid())
        return loss

    with fake_quantized(model, ranges) as switch:
        for epoch in range(1, epochs + 1):
            model.train()
            freeze_batchnorm(model)
            order = torch.randperm(len(train_set), generator=gen)
            total = 0.0
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                w, f = train_set.white_light[idx], train_set.fluorescence[idx]
                if torch.rand(1, generator=gen) < 0.5:  # the trainer's augmentation
                    w, f = w.flip(3), f.flip(3)
                with torch.no_grad():
                    target = teacher.forward_multitask(w, f)
                switch.enabled = True
                loss = distil(model.forward_multitask(w, f), target)
                switch.enabled = False
                loss = loss + distil(model.forward_multitask(w, f), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            model.eval()
            fl, q = (_predict(model, switch, val_set, quantized) for quantized in (False, True))
            score = (float((q == fl).float().mean()), float((q == val_set.labels).float().mean()))
            history.append({"epoch": epoch, "loss": total / len(order), "val_agreement": score[0],
                            "val_accuracy_quant": score[1], "val_accuracy_float": float((fl == val_set.labels).float().mean())})
            if progress:
                print(f"[qat] epoch {epoch}/{epochs}  distillation loss {total / len(order):.4f}  val agreement "
                      f"{score[0]:.4f}  val acc quant {score[1]:.4f} float {history[-1]['val_accuracy_float']:.4f}  "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
            if score > best:
                best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), history[-1]
        if best_state is not None:
            model.load_state_dict(best_state)
    model.eval()
    return {"history": history, "best": best_epoch, "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def _predict(model: PFM, switch: QuantSwitch, data, quantized: bool, batch_size: int = 64) -> torch.Tensor:
    switch.enabled = quantized
    return torch.cat([model(data.white_light[i:i + batch_size], data.fluorescence[i:i + batch_size]).argmax(1)
                      for i in range(0, len(data), batch_size)])
