"""edge-pfm's training pieces in a team's own loop: the model factory, the dataset on disk and its three sets,
the streamed loader, the loss and the checkpoint writer, without export.train's trainer.

    python examples/own_loop.py --data DATASET --epochs 2 --out ckpt.pt
    python -m export --checkpoint ckpt.pt --out bundle        # the checkpoint is a native one
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: export/ is not pip-installed
from edge_pfm.dataset import PairedDataset
from edge_pfm.roles import ClassRoles
from export.checkpoint import save_checkpoint
from export.data import PairSamples, pair_loader
from export.model import create_model
from export.splits import dataset_splits
from export.train import default_preprocessing, lesion_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    torch.manual_seed(0)
    ds = PairedDataset(a.data)
    sets = dataset_splits(ds, seed=0)  # train / val / test, grouped by patient, every class in each
    specs = default_preprocessing("pfm_tiny")  # what the device's edge_pfm.preprocess will do
    lesion = ClassRoles.default_for(ds.classes).lesion
    train = PairSamples(ds, sets.train, specs, lesion, augment=True)
    val = PairSamples(ds, sets.val, specs, lesion)
    model = create_model("pfm_tiny", num_classes=len(ds.classes), lesion_map=ds.has_masks)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for epoch in range(a.epochs):
        model.train()
        for white, fluo, label, target in pair_loader(train, batch_size=16, shuffle=True, epoch=epoch):
            logits, lesion_logits = model.forward_multitask(white, fluo)
            loss = F.cross_entropy(logits, label)
            if lesion_logits is not None and target.numel():
                loss = loss + lesion_loss(lesion_logits, target)  # unknown masks (NaN) are left out
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            right = sum(int((model(w, f).argmax(1) == y).sum()) for w, f, y, _ in pair_loader(val, 32, shuffle=False))
        print(f"epoch {epoch + 1}: loss {float(loss):.3f}, val accuracy {right / len(val):.3f}")
    save_checkpoint(a.out, model, "pfm_tiny", ds.classes, specs, extra={"data": a.data, "splits": sets.to_dict()})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
