"""ONNX Runtime CPU vs PyTorch eager, per pair, same thread count, one run.

    python benchmarks/export_speed.py [--variant pfm_t0] [--threads 2] [--runs 30] [--json build/bench/export_speed.json]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import print_table, time_runs, write_json  # noqa: E402
from export.model import create_model  # noqa: E402
from export.onnx_export import onnx_from_torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="pfm_t0")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", default="build/bench/export_speed.json")
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model = create_model(args.variant).eval()
    s = model.cfg.img_size
    buf = io.BytesIO()
    onnx.save_model(onnx_from_torch(model), buf)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    w, f = (rng.standard_normal((1, 3, s, s)).astype(np.float32) for _ in range(2))
    tw, tf = torch.from_numpy(w), torch.from_numpy(f)

    def run_torch():
        with torch.inference_mode():
            model(tw, tf)

    def run_ort():
        sess.run(["logits"], {"white_light": w, "fluorescence": f})

    t = time_runs(run_torch, args.runs)
    o = time_runs(run_ort, args.runs)
    ratio = t["median_ms"] / o["median_ms"]
    print(f"{args.variant} at {s}x{s}, batch 1 (one pair), {args.threads} threads, median of {args.runs} runs")
    print_table(["runtime", "median ms/pair", "p10", "p90", "pairs/s"],
                [["pytorch eager (inference_mode)", t["median_ms"], t["p10_ms"], t["p90_ms"], 1000 / t["median_ms"]],
                 ["onnxruntime CPU", o["median_ms"], o["p10_ms"], o["p90_ms"], 1000 / o["median_ms"]]])
    print(f"onnxruntime is {ratio:.2f}x faster than pytorch eager per pair")
    write_json(args.json, {"variant": args.variant, "threads": args.threads, "torch": t, "onnxruntime": o,
                           "ort_speedup": ratio, "torch_version": torch.__version__, "ort_version": ort.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
