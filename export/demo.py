"""`make demo`: the main job end to end on a machine with no GPU, cameras or data.

train pfm_tiny on synthetic pairs -> export the bundle (parity gate) -> calibrate (INT8 Q/DQ +
TensorRT cache + accuracy gate) -> stream two synthetic cameras through the runtime.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _step(n: int, total: int, text: str) -> None:
    print(f"\n== [{n}/{total}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.demo")
    ap.add_argument("--out", default="build/demo")
    ap.add_argument("--pairs", type=int, default=1200, help="synthetic training pairs")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the cameras stream")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = out / "pfm_tiny.pt", out / "bundle"
    t0 = time.perf_counter()
    from calibration.__main__ import main as calibrate
    from export import train
    from export.__main__ import main as export

    total = 3
    _step(1, total, f"train pfm_tiny on {args.pairs} synthetic pairs ({args.epochs} epochs)")
    if train.main(["--synthetic", str(args.pairs), "--epochs", str(args.epochs), "--out", str(ckpt)]):
        return 1
    _step(2, total, "export the ONNX bundle (parity gate: PyTorch vs ONNX Runtime CPU)")
    if export(["--checkpoint", str(ckpt), "--out", str(bundle)]):
        return 1
    _step(3, total, "calibrate: INT8 Q/DQ + TensorRT calibration cache + accuracy gate")
    if calibrate(["--bundle", str(bundle), "--synthetic", "512", "--eval-synthetic", "400"]):
        return 1
    print(f"\n== demo done in {time.perf_counter() - t0:.0f}s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
