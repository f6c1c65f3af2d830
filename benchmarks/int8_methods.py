"""PTQ (ours) vs mixed-precision PTQ (ours) vs QAT (ours) vs NVIDIA ModelOpt `max` PTQ, on one float checkpoint and
one held-out set.

    python benchmarks/int8_methods.py --checkpoint build/demo/float.pt --out build/int8_methods \
        [--modelopt-python /path/to/modelopt-venv/bin/python] [--json build/int8_methods.json]

Every INT8 model is compared with its own FP32 model (QAT fine-tunes the weights, so its FP32 is the
fine-tuned model) on the same held-out pairs, in one pass. ModelOpt pulls a CUDA build of torch, so it
runs from a separate venv (`pip install "nvidia-modelopt[onnx]"` there), on the same calibration pairs,
preprocessed by edge_pfm; without --modelopt-python its row is left out. Calibration and val pairs are
rendered at --eval-resolution, as `make demo` renders them. PTQ is every scheme layer in INT8 with
percentile ranges; mixed PTQ is calibration's default recipe (range method and float layers chosen on 2000
synthetic val pairs, calibration/mixed.py); QAT's FP32 accuracy is the fine-tuned model's (after), the others'
the trained model's (before).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELOPT_SCRIPT = """
import sys, numpy as np
from modelopt.onnx.quantization import quantize
data = dict(np.load(sys.argv[2]))
quantize(onnx_path=sys.argv[1], quantize_mode="int8", calibration_data=data, calibration_method="max",
         calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=sys.argv[3])
"""


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    rc = fn(*args, **kwargs)
    return rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a float checkpoint (trained without --qat-epochs)")
    ap.add_argument("--out", default="build/int8_methods")
    ap.add_argument("--synthetic", type=int, default=1200, help="QAT fine-tuning pairs (the trainer's recipe)")
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--calib-pairs", type=int, default=512)
    ap.add_argument("--eval-pairs", type=int, default=2000)
    ap.add_argument("--eval-resolution", default="640x360")
    ap.add_argument("--modelopt-python", help="python of a venv with nvidia-modelopt[onnx]")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from calibration.__main__ import main as calibrate
    from calibration.accuracy import evaluate, evaluate_stream, gate
    from calibration.data import pair_feed, synthetic_pair_chunks, synthetic_pairs
    from calibration.qdq import quantize_qdq
    from edge_pfm.bundle import Bundle
    from edge_pfm.config import parse_size
    from export import train
    from export.__main__ import main as export

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w, h = parse_size(args.eval_resolution)
    # calibration, val and calibrate's own held-out pairs at one resolution, as the demo calibrates (synthetic
    # val is rendered at the held-out resolution: a small --eval-resolution would choose the recipe on small pairs)
    def calib_args(gate_pairs: int = 16) -> list[str]:
        # the recipe's margin is sized for the gate's held-out pairs: the mixed run gets the demo's gate
        # (eval_pairs), the others 16 (artifacts only: the comparison evaluates below, on one shared set)
        return ["--synthetic", str(args.calib_pairs), "--resolution", f"{w}x{h}", "--eval-synthetic",
                str(gate_pairs), "--eval-resolution", f"{w}x{h}", "--allow-degraded"]

    rows, models = {}, {}

    ptq = out / "ptq"
    assert export(["--checkpoint", args.checkpoint, "--out", str(ptq)]) == 0
    mixed = out / "mixed"
    shutil.rmtree(mixed, ignore_errors=True)
    shutil.copytree(ptq, mixed)
    rc, seconds = _timed(calibrate, ["--bundle", str(ptq), "--ranges", "ptq", "--method", "percentile",
                                     "--val-synthetic", "0", *calib_args()])
    assert rc == 0
    rows["PTQ (ours: percentile, stems float)"] = {"seconds": seconds, "fp32": "ptq", "int8": "ptq_int8"}
    models.update({"ptq": ptq / "model.onnx", "ptq_int8": ptq / "model.int8.onnx"})
    rc, seconds = _timed(calibrate, ["--bundle", str(mixed), "--ranges", "ptq", *calib_args(args.eval_pairs)])
    assert rc == 0
    recipe = json.loads((mixed / "accuracy.json").read_text())["recipe"]
    rows[f"mixed PTQ (ours: {recipe['kind']}, {recipe['method']}, {len(recipe['float_layers'])} nodes float)"] = {
        "seconds": seconds, "fp32": "ptq", "int8": "mixed_int8", "recipe": recipe}
    models["mixed_int8"] = mixed / "model.int8.onnx"
    # the same ranges and placement with int32 biases: the Q/DQ this project wrote before TensorRT checked it
    amax = json.loads((ptq / "calibration.json").read_text())["amax"]
    _, seconds = _timed(quantize_qdq, ptq / "model.onnx", amax, out / "ptq_int32_bias.onnx", int32_biases=True)
    rows["PTQ, int32 biases (before: TensorRT refuses it)"] = {"seconds": seconds, "fp32": "ptq", "int8": "ptq_i32"}
    models["ptq_i32"] = out / "ptq_int32_bias.onnx"

    qat, qat_ckpt = out / "qat", out / "qat.pt"
    facts, train_s = _timed(train.train_checkpoint, qat_ckpt, train.TrainPlan(
        qat_from=args.checkpoint, synthetic=args.synthetic, qat_epochs=args.qat_epochs, progress=False))
    assert export(["--checkpoint", str(qat_ckpt), "--out", str(qat)]) == 0
    rc, seconds = _timed(calibrate, ["--bundle", str(qat), "--val-synthetic", "0", *calib_args()])
    assert rc == 0
    verdict = "kept" if facts["qat"]["kept"] else "discarded: the trained weights, PTQ ranges"
    rows[f"QAT (ours: {args.qat_epochs} epochs distilled, {verdict})"] = {
        "seconds": train_s + seconds, "fp32": "qat", "int8": "qat_int8", "qat": facts["qat"]}
    models.update({"qat": qat / "model.onnx", "qat_int8": qat / "model.int8.onnx"})

    if args.modelopt_python:
        bundle = Bundle.load(ptq)
        feeds = [pair_feed(p, bundle.preprocessing, bundle.input_names)
                 for p in synthetic_pairs(args.calib_pairs, 1, (w, h))]  # calibration's own pairs (seed 1)
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "calib.npz"
            np.savez(npz, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
            # ModelOpt rewrites the ONNX it is given (shape inference, in place): hand it a copy, not the bundle's
            fp32_copy = Path(tmp) / "model.onnx"
            shutil.copyfile(ptq / "model.onnx", fp32_copy)
            t0 = time.perf_counter()
            r = subprocess.run([args.modelopt_python, "-c", MODELOPT_SCRIPT, str(fp32_copy), str(npz),
                                str(out / "modelopt.int8.onnx")], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
        rows["ModelOpt 0.47 ONNX PTQ, max"] = {"seconds": time.perf_counter() - t0, "fp32": "ptq", "int8": "modelopt"}
        models["modelopt"] = out / "modelopt.int8.onnx"

    bundle = Bundle.load(ptq)
    print(f"evaluating {len(models)} models on {args.eval_pairs} held-out pairs at {w}x{h}", file=sys.stderr)
    logits, labels = evaluate_stream(models, synthetic_pair_chunks(args.eval_pairs, 10_001, (w, h)),
                                     bundle.preprocessing, bundle.input_names, spin=False)
    table = ["| method | FP32 accuracy | INT8 accuracy | agreement [95 % CI] | hsil recall change [95 % CI] | "
             "gate | seconds |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        res = evaluate({"fp32": logits[row["fp32"]], "int8": logits[row["int8"]]}, labels, bundle.classes)
        i8, hs = res["int8"], res["int8"]["recall_change"][bundle.roles.protected(bundle.classes)[0]]
        row.update({"fp32_accuracy": res["fp32"]["accuracy"], "int8_accuracy": i8["accuracy"],
                    "agreement": i8["top1_agreement"], "agreement_ci95": i8["agreement_ci95"],
                    "hsil_recall_change": hs["delta"], "hsil_recall_ci95": hs["ci95"],
                    "gate_reasons": gate(res, bundle.roles.protected(bundle.classes)), "eval_pairs": len(labels)})
        lo, hi = i8["agreement_ci95"]
        table.append(f"| {name} | {res['fp32']['accuracy']:.2%} | {i8['accuracy']:.2%} | {i8['top1_agreement']:.2%} "
                     f"[{lo:.2%}, {hi:.2%}] | {hs['delta']:+.2%} [{hs['ci95'][0]:+.2%}, {hs['ci95'][1]:+.2%}] | "
                     f"{'pass' if not row['gate_reasons'] else 'REFUSED'} | {row['seconds']:.0f} |")
    print("\n".join(table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
