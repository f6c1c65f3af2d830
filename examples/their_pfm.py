"""A dual-source colposcopy classifier written the way a research team writes one, independent of edge-pfm's
own PFM (export/model.py): plain conv branches with BatchNorm, a transformer encoder over both branches'
tokens, a head with a BatchNorm1d after a Linear (one that cannot fold into a conv), and its own trainer on the
paired dataset layout. It exists to show the --model door:

    python examples/their_pfm.py --data DATASET --seed 0 --out their.pt              # their training
    python examples/their_pfm.py --data DATASET --conformance 32 --out conformance  # their tensors of 32 pairs
    python -m export --model examples/their_pfm.py:make_model --weights their.pt \\
        --spec examples/their_pfm.spec.json --check-preprocessing conformance --trained-on DATASET \\
        --out bundle   # edge-pfm from here

Their trainer is what a careful team writes: it honours the dataset's `split` column (trains on train, picks the
checkpoint on val, never reads test), warms the learning rate up and decays it on a cosine, flips pairs at
random, keeps the best-val checkpoint rather than the last epoch, and stops early when val stops improving.

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


VAL_SHARE = 0.2  # without a split column: this share of each class picks the checkpoint
LR, WEIGHT_DECAY, BATCH, WARMUP = 3e-3, 0.05, 32, 3  # AdamW; linear warmup (epochs), then cosine to zero
EPOCHS, PATIENCE = 80, 20  # at most EPOCHS; stop after PATIENCE epochs without a better val checkpoint


def training_sets(ds, seed: int) -> tuple[list[int], list[int], str]:
    """(train indices, val indices, how they were chosen). A `split` column is the team's own split and is used
    as given: train trains, val picks the checkpoint, and test is never read here (it is what the model is
    judged on later, so it must stay unseen). Without one: a seeded split, stratified by class, 80 % train and
    20 % val, and stderr says so: every pair of such a folder has then been seen in training or selection."""
    from edge_pfm.dataset import DatasetError

    if ds.has_splits:
        train = [i for i, s in enumerate(ds.samples) if s.split == "train"]
        val = [i for i, s in enumerate(ds.samples) if s.split == "val"]
        if not train or not val:
            raise DatasetError(f"{ds.root / 'labels.csv'}: its split column has {len(train)} train and {len(val)} "
                             "val rows; training needs both (test rows are never read)")
        return train, val, "labels.csv split column"
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(len(ds.classes)):
        idx = [i for i, s in enumerate(ds.samples) if s.label == c]
        idx = [idx[k] for k in torch.randperm(len(idx), generator=gen).tolist()]
        n_val = max(1, round(len(idx) * VAL_SHARE)) if len(idx) > 1 else 0
        val, train = val + idx[:n_val], train + idx[n_val:]
    source = f"no split column: seeded (seed {seed}) stratified {1 - VAL_SHARE:.0%}/{VAL_SHARE:.0%} train/val split"
    print(f"{ds.root}: {source}; none of its pairs is left unseen (give labels.csv a split column train/val/test "
          "to keep a test set out)", file=sys.stderr)
    return sorted(train), sorted(val), source


def _tensors(ds, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import numpy as np

    w, f, y = [], [], []
    for i in idx:  # only these pairs are read
        wl, fl, label = ds.load(i)
        w.append(their_preprocess(wl, MEANS["white"], STDS["white"]))
        f.append(their_preprocess(fl, MEANS["fluo"], STDS["fluo"]))
        y.append(label)
    return torch.from_numpy(np.stack(w)), torch.from_numpy(np.stack(f)), torch.tensor(y)


def _flip(w: torch.Tensor, f: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random horizontal / vertical flip of both images of a pair: a cervix seen mirrored is the same
    cervix, and the two cameras stay registered."""
    h = torch.rand(len(w), generator=gen) < 0.5
    v = torch.rand(len(w), generator=gen) < 0.5
    w, f = w.clone(), f.clone()
    w[h], f[h] = w[h].flip(3), f[h].flip(3)
    w[v], f[v] = w[v].flip(2), f[v].flip(2)
    return w, f


def train(data: str, epochs: int = EPOCHS, out: str = "their.pt", seed: int = 0, threads: int | None = None, patience: int = PATIENCE,
          augment: bool = True) -> float:
    """Their trainer: the dataset's own train/val split (training_sets), AdamW with a linear warmup and a cosine
    decay, random flips, the checkpoint of the best val accuracy (ties: lower val loss) rather than the last
    epoch, and early stopping after `patience` epochs without a better one; -> that checkpoint's val accuracy.
    Saves {'state_dict', 'epoch', 'val_accuracy', 'training'}: 'training' says what it trained on (the folder,
    the split, the pair counts, the seed), so the export can be told the same (python -m export --trained-on)."""
    import math
    from pathlib import Path

    from edge_pfm.dataset import DatasetError, PairedDataset

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ds = PairedDataset(data)
    if not ds.labelled:
        raise DatasetError(f"{ds.root / 'labels.csv'}: every pair needs a label to train on; "
                           f"{sum(x.label is None for x in ds.samples)} have none")
    tr_idx, val_idx, source = training_sets(ds, seed)
    w, f, y = _tensors(ds, tr_idx)
    wv, fv, yv = _tensors(ds, val_idx)
    model = make_model(len(ds.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = math.ceil(len(y) / BATCH)
    total, warm = epochs * steps, min(WARMUP, max(epochs - 1, 0)) * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / warm if k < warm else
                                              0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(seed)
    best = {"accuracy": -1.0, "loss": math.inf, "epoch": 0, "state": None}
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            if len(idx) < 2:  # BatchNorm1d needs two
                continue
            bw, bf = _flip(w[idx], f[idx], gen) if augment else (w[idx], f[idx])
            loss = nn.functional.cross_entropy(model(bw, bf)["logits"], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            logits = model(wv, fv)["logits"]
        acc = float((logits.argmax(1) == yv).float().mean())
        val_loss = float(nn.functional.cross_entropy(logits, yv))
        better = acc > best["accuracy"] or (acc == best["accuracy"] and val_loss < best["loss"])
        if better:
            best = {"accuracy": acc, "loss": val_loss, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        print(f"epoch {epoch}/{epochs}  lr {sched.get_last_lr()[0]:.2e}  val accuracy {acc:.3f}  loss {val_loss:.3f}"
              + ("  (best)" if better else ""), file=sys.stderr)
        if epoch - best["epoch"] >= patience:
            print(f"early stop: no better val accuracy in {patience} epochs", file=sys.stderr)
            break
    counts = {k: len(v) for k, v in (("train", tr_idx), ("val", val_idx))}
    if ds.has_splits:
        counts["test_unread"] = sum(s.split == "test" for s in ds.samples)
    training = {"data": str(Path(data).resolve()), "split": source, "samples": counts, "seed": seed,
                "threads": torch.get_num_threads(), "epochs_run": epoch, "max_epochs": epochs, "patience": patience,
                "augment": augment, "val_loss": best["loss"]}
    torch.save({"state_dict": best["state"], "epoch": best["epoch"], "val_accuracy": best["accuracy"],
                "training": training}, out)
    print(f"best val accuracy {best['accuracy']:.3f} at epoch {best['epoch']} of {epoch} "
          f"({len(val_idx)} val pairs, {len(tr_idx)} train pairs; {source})", file=sys.stderr)
    return best["accuracy"]


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="the paired dataset (training, --conformance); with a split column (train/val/"
                                   "test) training uses train and val only and never reads test")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="at most this many (early stopping)")
    ap.add_argument("--patience", type=int, default=PATIENCE,
                    help="stop after this many epochs without a better val checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="initialisation, batch order, flips (and the split when the "
                                                        "data has no split column)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-augment", action="store_true", help="train without the random flips")
    ap.add_argument("--out", required=True,
                    help="the weights to write; with --conformance the folder; with --export-onnx the .onnx")
    ap.add_argument("--conformance", type=int, metavar="N",
                    help="instead of training: write N raw pairs and their pipeline's tensors to --out")
    ap.add_argument("--export-onnx", choices=("legacy", "dynamo"),
                    help="instead of training: export --weights with plain torch.onnx.export to --out")
    ap.add_argument("--weights", help="with --export-onnx: the weights their trainer wrote")
    ap.add_argument("--references", type=int, default=0, metavar="N",
                    help="with --export-onnx: also N batches of PyTorch reference outputs (polygraphy JSON)")
    a = ap.parse_args(argv)
    if a.export_onnx and not a.weights:
        ap.error("--export-onnx needs --weights")
    if not a.export_onnx and not a.data:
        ap.error("--data is required to train or to write a conformance set")
    if a.epochs < 1 or a.patience < 1 or (a.threads is not None and a.threads < 1):
        ap.error("--epochs, --patience and --threads must be >= 1")
    from edge_pfm.errors import run_command  # a bad dataset: one line naming the file, exit 2

    def command() -> None:
        if a.export_onnx:
            print("wrote " + ", ".join(export_onnx(a.weights, a.out, a.export_onnx == "dynamo", a.references)))
        elif a.conformance is not None:
            print(f"wrote {write_conformance(a.data, a.out, a.conformance)} pairs and their tensors to {a.out}")
        else:
            acc = train(a.data, a.epochs, a.out, a.seed, a.threads, a.patience, not a.no_augment)
            print(f"val accuracy {acc:.3f} (best epoch); wrote {a.out}")

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
