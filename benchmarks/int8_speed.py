"""INT8 Q/DQ vs FP32 on ONNX Runtime CPU, per pair, in one run.

    python benchmarks/int8_speed.py [--variant pfm_t0] [--bundle BUNDLE] [--json build/bench/int8_speed.json]

With --bundle, times that bundle's model.onnx and model.int8.onnx (a trained, calibrated model).
Without, builds an untrained `--variant` (weights do not change the speed), calibrates it on 64
synthetic pairs and times it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchmarks._common import print_table, time_runs, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="pfm_t0")
    ap.add_argument("--bundle")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", default="build/bench/int8_speed.json")
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    from calibration.data import PairReader, synthetic_pairs
    from calibration.qdq import quantize_qdq
    from calibration.ranges import compute_ranges

    tmp = Path(tempfile.mkdtemp())
    if args.bundle:
        from edge_pfm.bundle import Bundle

        b = Bundle.load(args.bundle)
        fp32, int8, specs, names, label = b.model_path("fp32"), b.model_path("int8"), b.preprocessing, b.input_names, \
            f"bundle {args.bundle} ({b.manifest['model']['variant']})"
    else:
        import torch

        from export.model import create_model
        from export.onnx_export import onnx_from_torch
        from export.train import default_preprocessing

        torch.manual_seed(0)
        fp32, int8 = tmp / "model.onnx", tmp / "model.int8.onnx"
        onnx.save_model(onnx_from_torch(create_model(args.variant).eval()), str(fp32))
        specs, names = default_preprocessing(args.variant), {"white_light": "white_light", "fluorescence": "fluorescence"}
        reader = PairReader(synthetic_pairs(64, 1, (640, 360)), specs, names)
        quantize_qdq(fp32, compute_ranges(fp32, reader, "percentile"), int8)
        label = f"{args.variant} (untrained weights, calibrated on 64 synthetic pairs)"
    feed = PairReader(synthetic_pairs(1, 7, (640, 360)), specs, names).get_next()
    rows, res = [], {}
    for name, path in (("fp32", fp32), ("int8 q/dq", int8)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        res[name] = time_runs(lambda s=sess: s.run(None, feed), args.runs)
        rows.append([name, res[name]["median_ms"], res[name]["p10_ms"], res[name]["p90_ms"], 1000 / res[name]["median_ms"]])
    speedup = res["fp32"]["median_ms"] / res["int8 q/dq"]["median_ms"]
    print(f"{label}; batch 1, {args.threads} threads, median of {args.runs} runs, onnxruntime {ort.__version__}")
    print_table(["model", "median ms/pair", "p10", "p90", "pairs/s"], rows)
    print(f"int8 q/dq is {speedup:.2f}x the speed of fp32 on ONNX Runtime CPU")
    write_json(args.json, {"model": label, "threads": args.threads, "fp32": res["fp32"], "int8": res["int8 q/dq"],
                           "int8_speedup": speedup, "cpu_flags_vnni": "avx512_vnni" in Path("/proc/cpuinfo").read_text()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
