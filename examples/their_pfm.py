"""A dual-source colposcopy classifier written the way a research team writes one, independent of edge-pfm's
own PFM (export/model.py): plain conv branches with BatchNorm, a transformer encoder over both branches'
tokens, a head with a BatchNorm1d after a Linear (one that cannot fold into a conv), and its own trainer on the
paired dataset layout. It exists to show the --model door:

    python examples/their_pfm.py --data DATASET --epochs 6 --out their.pt          # their training
    python examples/their_pfm.py --data DATASET --conformance 32 --out conformance  # their tensors of 32 pairs
    python -m export --model examples/their_pfm.py:make_model --weights their.pt \\
        --spec examples/their_pfm.spec.json --check-preprocessing conformance --out bundle   # edge-pfm from here

or, exported by their own script (plain torch.onnx.export, legacy or dynamo) with PyTorch's reference outputs:

    python examples/their_pfm.py --export-onnx dynamo --weights their.pt --references 8 --out their.onnx
    python -m export --onnx their.onnx --spec examples/their_pfm.spec.json \\
        --reference-inputs their.inputs.json --reference-outputs their.outputs.json --out bundle
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

IMG = 96  # their input size (examples/their_pfm.spec.json says the same)
MEANS = {"white": (0.485, 0.456, 0.406), "fluo": (0.5, 0.5, 0.5)}
STDS = {"white": (0.229, 0.224, 0.225), "fluo": (0.25, 0.25, 0.25)}


def branch(width: int) -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                         *block(4 * width, 4 * width))


class TheirPFM(nn.Module):
    def __init__(self, num_classes: int = 4, width: int = 16, heads: int = 4):
        super().__init__()
        self.white, self.fluo = branch(width), branch(width)
        dim = 4 * width
        self.fuse = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, num_classes))

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.white(white), self.fluo(fluo)  # (B, C, h, w) each
        tokens = torch.cat([a.flatten(2), b.flatten(2)], 2).transpose(1, 2)  # (B, 2hw, C)
        tokens = self.fuse(tokens)
        n = tokens.shape[1] // 2
        pooled = torch.cat([tokens[:, :n].mean(1), tokens[:, n:].mean(1)], 1)
        return {"logits": self.head(pooled)}


def make_model(num_classes: int = 4, width: int = 16) -> TheirPFM:
    return TheirPFM(num_classes, width)


def their_preprocess(img_bgr, mean, std):
    """Their pipeline: centre crop, resize, RGB, normalise (what the spec declares to edge-pfm)."""
    import cv2
    import numpy as np

    h, w = img_bgr.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    img = cv2.resize(img_bgr[y0:y0 + s, x0:x0 + s], (IMG, IMG), interpolation=cv2.INTER_AREA)
    x = img[..., ::-1].astype(np.float32) / 255.0
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1).copy()


def train(data: str, epochs: int, out: str, seed: int = 0) -> float:
    """Their trainer: 80/20 split, AdamW; -> validation accuracy. Saves {'state_dict': ..., 'epoch': ...}."""
    import numpy as np

    from edge_pfm.dataset import PairedDataset

    torch.manual_seed(seed)
    ds = PairedDataset(data)
    w, f, y = [], [], []
    for i in range(len(ds)):
        wl, fl, label = ds.load(i)
        w.append(their_preprocess(wl, MEANS["white"], STDS["white"]))
        f.append(their_preprocess(fl, MEANS["fluo"], STDS["fluo"]))
        y.append(label)
    w, f, y = torch.from_numpy(np.stack(w)), torch.from_numpy(np.stack(f)), torch.tensor(y)
    perm = torch.randperm(len(y))
    n_val = len(y) // 5
    val, tr = perm[:n_val], perm[n_val:]
    model = make_model(len(ds.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for epoch in range(epochs):
        model.train()
        order = tr[torch.randperm(len(tr))]
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(w[idx], f[idx])["logits"], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(w[val], f[val])["logits"].argmax(1) == y[val]).float().mean())
        print(f"epoch {epoch + 1}/{epochs}  val accuracy {acc:.3f}", file=sys.stderr)
    torch.save({"state_dict": model.state_dict(), "epoch": epochs, "val_accuracy": acc}, out)
    return acc


def write_conformance(data: str, out: str, n: int = 32) -> int:
    """What their pipeline makes of `n` raw pairs, beside the raw pairs (edge-pfm's --check-preprocessing layout:
    white/, fluorescence/, tensors/<sample>.npz). -> pairs written."""
    import shutil
    from pathlib import Path

    import numpy as np

    from edge_pfm.dataset import PairedDataset
    from edge_pfm.fileio import atomic_directory

    ds = PairedDataset(data)
    count = min(n, len(ds))
    target = Path(out)
    if target.exists() and sorted(p.name for p in target.iterdir()) not in ([], ["fluorescence", "tensors", "white"]):
        raise SystemExit(f"{target} holds something other than a conformance set: choose another --out")
    with atomic_directory(target) as root:  # replaces an earlier conformance set whole
        for sub in ("white", "fluorescence", "tensors"):
            (root / sub).mkdir()
        for i in range(count):
            s = ds.samples[i]
            wl, fl, _ = ds.load(i)
            shutil.copyfile(s.white, root / "white" / s.white.name)
            shutil.copyfile(s.fluorescence, root / "fluorescence" / s.fluorescence.name)
            np.savez(root / "tensors" / f"{s.name}.npz", white=their_preprocess(wl, MEANS["white"], STDS["white"]),
                     fluo=their_preprocess(fl, MEANS["fluo"], STDS["fluo"]))
    return count


class LogitsOnly(nn.Module):
    """Their deployment export: the dict output's logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> torch.Tensor:
        return self.model(white, fluo)["logits"]


def export_onnx(weights: str, out: str, dynamo: bool, references: int = 0, seed: int = 0) -> list[str]:
    """Their own deployment export, no edge-pfm: plain torch.onnx.export (dynamo, or the legacy exporter at opset
    17) with a dynamic batch. With references > 0, also that many batches of 2 random inputs and PyTorch's logits
    for them, in polygraphy's --save-inputs / --save-outputs format, beside `out`. -> the files written."""
    from pathlib import Path

    model = make_model(4, 16)
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    wrapped = LogitsOnly(model).eval()
    x = (torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, IMG, IMG))
    names = {"input_names": ["white", "fluo"], "output_names": ["logits"]}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # what they did after pytorch#94434's export error
    try:
        with torch.no_grad():
            if dynamo:
                n = torch.export.Dim("n", min=1, max=64)
                torch.onnx.export(wrapped, x, out, dynamo=True, dynamic_shapes=({0: n}, {0: n}), **names)
            else:
                torch.onnx.export(wrapped, x, out, dynamo=False, opset_version=17,
                                  dynamic_axes={k: {0: "N"} for k in ("white", "fluo", "logits")}, **names)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    written = [out] + ([out + ".data"] if Path(out + ".data").exists() else [])
    if references:
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json

        gen = torch.Generator().manual_seed(seed)
        feeds, outputs = [], []
        with torch.no_grad():
            for _ in range(references):
                w, f = (torch.randn(2, 3, IMG, IMG, generator=gen) for _ in range(2))
                feeds.append({"white": w.numpy(), "fluo": f.numpy()})
                outputs.append({"logits": wrapped(w, f).numpy()})
        stem = str(Path(out).with_suffix(""))
        save_json(feeds, stem + ".inputs.json")
        results = RunResults()
        results.append(("pytorch", outputs))
        results.save(stem + ".outputs.json")
        written += [stem + ".inputs.json", stem + ".outputs.json"]
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="the paired dataset (training, --conformance)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", required=True,
                    help="the weights to write; with --conformance the folder; with --export-onnx the .onnx")
    ap.add_argument("--conformance", type=int, metavar="N",
                    help="instead of training: write N raw pairs and their pipeline's tensors to --out")
    ap.add_argument("--export-onnx", choices=("legacy", "dynamo"),
                    help="instead of training: export --weights with plain torch.onnx.export to --out")
    ap.add_argument("--weights", help="with --export-onnx: the weights their trainer wrote")
    ap.add_argument("--references", type=int, default=0, metavar="N",
                    help="with --export-onnx: also N batches of PyTorch reference outputs (polygraphy JSON)")
    a = ap.parse_args()
    if a.export_onnx:
        if not a.weights:
            ap.error("--export-onnx needs --weights")
        print("wrote " + ", ".join(export_onnx(a.weights, a.out, a.export_onnx == "dynamo", a.references)))
    elif not a.data:
        ap.error("--data is required to train or to write a conformance set")
    elif a.conformance is not None:
        print(f"wrote {write_conformance(a.data, a.out, a.conformance)} pairs and their tensors to {a.out}")
    else:
        print(f"val accuracy {train(a.data, a.epochs, a.out):.3f}; wrote {a.out}")
