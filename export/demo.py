"""`make demo`: the main job end to end on a machine with no GPU, cameras or data."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.demo")
    ap.add_argument("--out", default="build/demo")
    ap.add_argument("--pairs", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from export import train

    print(f"== [1/1] train pfm_tiny on {args.pairs} synthetic pairs", flush=True)
    rc = train.main(["--synthetic", str(args.pairs), "--epochs", str(args.epochs), "--out", str(out / "pfm_tiny.pt")])
    print(f"== demo done in {time.perf_counter() - t0:.0f}s; outputs in {out}/")
    return rc


if __name__ == "__main__":
    sys.exit(main())
