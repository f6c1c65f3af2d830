"""`edge-pfm` command line: info, build, run, bench."""
from __future__ import annotations

import argparse
import sys

from edge_pfm import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    from edge_pfm.info import describe

    print(describe(args.bundle))
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
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
