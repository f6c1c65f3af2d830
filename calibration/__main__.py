"""python -m calibration --bundle BUNDLE [--data DIR | --synthetic N] [--method auto|percentile|entropy|minmax]
       [--samples 512] [--val DIR | --val-synthetic N] [--eval DIR | --eval-synthetic N] [--agreement-data DIR]
       [--weight-rounding gptq|nearest] [--trt-version 10.3] [--allow-degraded]

One pass over paired calibration data (through edge_pfm's own preprocessing) gives symmetric
activation ranges by each method; the INT8 recipe is chosen on val pairs (calibration/mixed.py): the range
method, and, when full INT8 misses the margin (val agreement lower bound >= 99.3 % and a >= 97 % predicted
chance that the gate's held-out set passes: at most 4 of 2000 val pairs differing against 2000 held-out
pairs), the most sensitive layers kept float, as long as >= 80 % of the conv/matmul layers stay Int8. The recipe
the search stops at is confirmed on pairs it never saw (rendered afresh with --synthetic, else half of a large
val set) before the gate. Val needs no labels: it measures agreement with FP32. The int8 weights take GPTQ's
error-compensating levels on the calibration pairs' inputs (calibration/weight_rounding.py; PTQ only: a QAT model
keeps the levels it trained on). From the recipe: model.int8.onnx (explicit
Q/DQ) and calibration.cache (TensorRT text format). model.fp16.onnx is the FP16-typed model strongly typed
TensorRT builds for FP16. Each ONNX passes onnx.checker's full check and a TensorRT-RTX build before it is
written (exit 2 with the parser's node and message otherwise). INT8 and FP16 accuracy are measured against FP32
by running them on ONNX Runtime CPU, on a held-out labelled set that nothing was tuned on, and a gate refuses an
INT8 model that loses agreement or high-grade recall (exit 3; the bundle stays FP32 and the refused report goes
to BUNDLE.int8-rejected/).

Disjoint sets, checked by content hash (calibration/data_plan.py): a labelled --data is split (export/splits.py:
its split column, else grouped and stratified; the trainer's own when the model was trained on it): train
calibrates, val tunes the recipe, test gates (with --eval, the --eval set gates and the split still keeps val off
the training pairs). --val DIR is a val set of its own. An unsplit --data with --eval (or unlabelled) keeps 20 %
of its pairs back as val (at least 100 pairs in all, at most 1000 val); --synthetic renders its own val pairs (at
the held-out pairs' resolution when those are synthetic too). --agreement-data DIR (unlabelled, e.g. a device
recording: edge-pfm record --mode dataset) is where the gate measures INT8 agreement; the labelled held-out set
then decides recall and accuracy. A team's model whose bundle does not record its training data is said to be so
on stderr and in accuracy.md. Pairs are read from
disk in chunks. The bundle is updated atomically: on any failure it is left exactly as it was (exit 2 for bad
input). No PyTorch needed.

The library under it: calibration.calibrate.calibrate(bundle, CalibrationPlan(...)) -> CalibrationReport.
"""
from __future__ import annotations

import argparse
import sys

from calibration.calibrate import RANGES, WEIGHT_ROUNDINGS, CalibrationPlan, GateRefused, calibrate
from calibration.ranges import METHODS
from edge_pfm.config import parse_size
from edge_pfm.errors import run_command
from edge_pfm.lesion import parse_map_classes
from export.quant_scheme import PERCENTILE


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev off: a prefix must never turn one option into another (--val N was read as --val-synthetic N)
    ap = argparse.ArgumentParser(prog="python -m calibration", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="the bundle to calibrate (rewritten atomically)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="paired dataset directory (edge_pfm.dataset layout) for calibration")
    src.add_argument("--synthetic", type=int, metavar="N", help="calibrate on N synthetic pairs")
    ap.add_argument("--method", choices=("auto", *METHODS), default="auto",
                    help=f"activation range method (default auto: the best INT8 agreement on the val pairs among "
                         f"{', '.join(METHODS)}; percentile is the {PERCENTILE}th |x|)")
    val = ap.add_mutually_exclusive_group()
    val.add_argument("--val", metavar="DIR",
                     help="the val set that chooses the INT8 recipe (range method, layers kept float): pairs the "
                          "model never trained on; labels are not needed (val measures agreement with FP32)")
    val.add_argument("--val-synthetic", type=int, default=CalibrationPlan.val_synthetic, metavar="N",
                     help="with --synthetic: N synthetic val pairs that choose the recipe (range method, layers kept "
                          "float); never the held-out pairs")
    ap.add_argument("--samples", type=int, default=512, help="at most this many calibration pairs")
    ev = ap.add_mutually_exclusive_group()
    ev.add_argument("--eval", help="held-out labelled dataset directory for the accuracy report")
    ev.add_argument("--eval-synthetic", type=int, default=None, metavar="N",
                    help="held-out synthetic pairs (default 2000 when no --eval is given and --data has no labels: "
                         "enough for the gate's intervals to be narrow; a labelled --data is split instead, "
                         "its test split gating)")
    ap.add_argument("--agreement-data", metavar="DIR",
                    help="unlabelled pairs (e.g. a device recording: edge-pfm record --mode dataset) on which the gate "
                         "measures INT8 agreement with FP32; the held-out labelled set then decides recall and "
                         "accuracy only. Thousands of pairs show 99 %% where a few hundred labelled ones cannot")
    ap.add_argument("--eval-resolution", type=parse_size, default=None,
                    help="synthetic held-out camera resolution WxH (default: --resolution)")
    ap.add_argument("--ranges", choices=RANGES, default="auto",
                    help="auto: the bundle's qat_ranges.json where quantized (QAT checkpoint), else PTQ ranges")
    ap.add_argument("--trt-version", default="10.3", help="TensorRT the cache targets (JetPack 6.1/6.2: 10.3)")
    ap.add_argument("--resolution", type=parse_size, default=(1280, 720), help="synthetic camera resolution WxH")
    ap.add_argument("--keep-float", nargs="*", default=[],
                    help="node-name substrings kept in float (each input's first layer is float too with "
                         "--weight-rounding nearest)")
    ap.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default="gptq",
                    help="gptq: int8 weight levels chosen to cancel each other's output error on the calibration "
                         "pairs (same scales); nearest: each weight rounded alone")
    ap.add_argument("--seed", type=int, default=1, help="seed of the synthetic pairs and the sampling")
    ap.add_argument("--allow-degraded", action="store_true", help="write the INT8 model even if the gate fails")
    ap.add_argument("--map-classes", metavar="A,B",
                    help="the classes whose decisions show the lesion map (default: the bundle's, else lsil,hsil); the "
                         "held-out map figures are measured over them")
    return ap


def plan_from_args(args: argparse.Namespace) -> CalibrationPlan:
    return CalibrationPlan(
        data=args.data, synthetic=args.synthetic or CalibrationPlan.synthetic, samples=args.samples, method=args.method, eval=args.eval,
        eval_synthetic=args.eval_synthetic, val_synthetic=args.val_synthetic, val=args.val,
        agreement_data=args.agreement_data, resolution=args.resolution, eval_resolution=args.eval_resolution,
        ranges=args.ranges, trt_version=args.trt_version, keep_float=tuple(args.keep_float), seed=args.seed,
        allow_degraded=args.allow_degraded, weight_rounding=args.weight_rounding,
        map_classes=None if args.map_classes is None else parse_map_classes(args.map_classes))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        result = calibrate(args.bundle, plan_from_args(args))
        print(result.markdown)
        if not result.gate_passed and not args.allow_degraded:
            raise GateRefused(result.refusal)
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
