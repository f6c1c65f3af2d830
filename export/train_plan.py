"""Reference trainer for PFM on a paired dataset or synthetic pairs.

    python -m export.train --synthetic 1200 --variant pfm_tiny --epochs 12 --out build/pfm_tiny.pt
    python -m export.train --data DATASET --variant pfm_t0 --epochs 30 --out ckpt.pt
    python -m export.train --synthetic 1200 --ablation          # fusion vs white-only vs fluorescence-only
    python -m export.train --synthetic 1200 --epochs 20 --qat-epochs 3 --out ckpt.pt   # + quantization-aware
    python -m export.train --qat-from ckpt.pt --synthetic 1200 --qat-epochs 3 --out ckpt.qat.pt
    torchrun --standalone --nproc_per_node=2 -m export.train --data DATASET --out ckpt.pt   # DDP (gloo on CPU)
    python -m export.train --data DATASET --device cuda --amp --out ckpt.pt

Inputs go through edge_pfm.preprocess, the same function the device runs. Training is reproducible: the
same command, machine, thread count and library versions give bitwise-identical weights (seeded
initialisation and data order, rendering order independent of the process pool, deterministic
algorithms, fixed threads). The checkpoint records the seed, thread count and library versions.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from edge_pfm.config import parse_size

# What `python -m export.train` does, apart from the trainer: the plan and the command line import no torch, so
# the docs' CLI reference is generated without it.
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainPlan:
    """What `python -m export.train` does, as a library call (train_checkpoint); the defaults are the CLI's."""

    data: str | Path | None = None  # paired dataset; None: synthetic pairs
    synthetic: int = 1200
    variant: str = "pfm_tiny"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    threads: int = min(os.cpu_count() or 1, 8)
    qat_epochs: int = 0
    qat_lr: float = 1e-4  # small: distillation keeps the float model where it was
    qat_from: str | Path | None = None  # skip float training: fine-tune this checkpoint with QAT
    resolution: tuple[int, int] = (320, 240)  # synthetic frame size before preprocessing
    progress: bool = True
    cache_dir: str | Path | None = None  # --data: preprocessed tensors kept here (keyed by content and spec)
    workers: int | None = None  # --data: DataLoader workers (None: export.data.default_workers)
    device: str = "cpu"  # cpu | cuda | auto (export.distributed)
    amp: bool = False  # CUDA mixed precision


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m export.train`."""
    defaults = TrainPlan()
    ap = argparse.ArgumentParser(prog="python -m export.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="paired dataset directory (edge_pfm.dataset: white/, fluorescence/, optional "
                                    "masks/, classes.txt, labels.csv with optional group and split columns); "
                                    "trains on its train split, picks the epoch on val, reports test")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N synthetic pairs")
    ap.add_argument("--variant", default=defaults.variant, help="pfm_tiny (128 px) or pfm_t0 (224 px)")
    ap.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size, help="the global batch (split across ranks)")
    ap.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    ap.add_argument("--seed", type=int, default=defaults.seed, help="seeds initialisation, data order, augmentation and the split")
    ap.add_argument("--threads", type=int, default=defaults.threads,
                    help="torch threads (default: cores, at most 8); bitwise reproducibility holds for one count")
    ap.add_argument("--qat-epochs", type=int, default=0,
                    help="then fine-tune this many epochs with fake quantization matching the INT8 Q/DQ model "
                         "(use when the INT8 gate refuses the PTQ model; 3 is usually enough)")
    ap.add_argument("--qat-lr", type=float, default=defaults.qat_lr, help="QAT learning rate (small: distillation keeps the model where it was)")
    ap.add_argument("--qat-from", metavar="CKPT", help="skip float training: fine-tune this checkpoint with QAT")
    ap.add_argument("--resolution", type=parse_size, default=defaults.resolution,
                    help="synthetic frame size WIDTHxHEIGHT before preprocessing (default 320x240)")
    ap.add_argument("--cache-dir", metavar="DIR", help="--data: keep preprocessed tensors here, keyed by the files' "
                                                        "content and the preprocessing (augmentation runs after it)")
    ap.add_argument("--workers", type=int, metavar="N",
                    help="--data: DataLoader workers reading from disk (default: cores - 1, at most 4)")
    ap.add_argument("--device", choices=DEVICES, default=defaults.device,
                    help="cpu (default: bitwise reproducible), cuda, or auto (cuda when there is one)")
    ap.add_argument("--amp", action="store_true", help="with --device cuda: float16 mixed precision")
    ap.add_argument("--out", help="checkpoint path to write")
    ap.add_argument("--ablation", action="store_true", help="train fusion and both single-source models; print a table")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    return ap
