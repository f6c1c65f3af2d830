"""A dual-source colposcopy classifier written the way a research team writes one, independent of edge-pfm's
own PFM (export/model.py): plain conv branches with BatchNorm, a transformer encoder over both branches'
tokens, a head with a BatchNorm1d after a Linear (one that cannot fold into a conv), and its own trainer on the
paired dataset layout. It exists to show the --model door:

    python examples/their_pfm.py --data DATASET --epochs 6 --out their.pt          # their training
    python examples/their_pfm.py --data DATASET --conformance 32 --out conformance  # their tensors of 32 pairs
    python -m export --model examples/their_pfm.py:make_model --weights their.pt \\
        --spec examples/their_pfm.spec.json --check-preprocessing conformance --out bundle   # edge-pfm from here
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", required=True, help="the weights to write, or with --conformance the folder")
    ap.add_argument("--conformance", type=int, metavar="N",
                    help="instead of training: write N raw pairs and their pipeline's tensors to --out")
    a = ap.parse_args()
    if a.conformance is not None:
        print(f"wrote {write_conformance(a.data, a.out, a.conformance)} pairs and their tensors to {a.out}")
    else:
        print(f"val accuracy {train(a.data, a.epochs, a.out):.3f}; wrote {a.out}")
