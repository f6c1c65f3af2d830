"""`edge-pfm` command line: info, build, run, bench."""
from __future__ import annotations

import argparse
import sys

from edge_pfm import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    from edge_pfm.info import describe

    print(describe(args.bundle))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from edge_pfm.backends.select import TRT_MISSING, tensorrt_status
    from edge_pfm.bundle import Bundle
    from edge_pfm.engine.plan import BuildRefused

    bundle = Bundle.load(args.bundle)
    ok, why = tensorrt_status()
    if not ok:
        print(f"error: cannot build a TensorRT engine: {why}. {TRT_MISSING}", file=sys.stderr)
        return 3
    from edge_pfm.engine.trt_build import EngineBuildError, ensure_engine

    try:
        path = ensure_engine(bundle, args.precision, args.int8_source, args.dla_core, args.workspace_mib,
                             args.max_batch, args.cache_dir, build=not args.no_build)
    except (BuildRefused, EngineBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="edge-pfm",
        description="Real-time dual-source colposcopy classification (PFM) on Jetson / ONNX Runtime.",
    )
    ap.add_argument("--version", action="version", version=f"edge-pfm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, available backends, GPU/TensorRT, bundle summary")
    p.add_argument("--bundle", help="bundle directory to summarise")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("build", help="build (or find in the cache) the TensorRT engine for this device")
    p.add_argument("--bundle", required=True)
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="int8")
    p.add_argument("--int8-source", choices=("qdq", "cache"), help="INT8 from the Q/DQ model or the calibration cache")
    p.add_argument("--dla-core", type=int, default=-1, help="build for this DLA core (AGX Orin: 0 or 1)")
    p.add_argument("--workspace-mib", type=int, default=1024)
    p.add_argument("--max-batch", type=int, help="largest batch of the optimisation profile (default: the bundle's)")
    p.add_argument("--cache-dir", help="engine cache (default ~/.cache/edge-pfm/engines)")
    p.add_argument("--no-build", action="store_true", help="only look in the cache; fail with the reason if absent")
    p.set_defaults(func=_cmd_build)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    from edge_pfm.backends.base import BackendError
    from edge_pfm.bundle import BundleError

    try:
        return int(args.func(args) or 0)
    except (BundleError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
