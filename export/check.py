"""python -m export.check --bundle BUNDLE [--record] [--json OUT]

Checks every ONNX artifact of an existing bundle (yours, or one from an older edge-pfm) the way export
and calibration check what they write: onnx.checker's full check, then TensorRT-RTX parses and builds
it through edge_pfm's engine-build code and reports how many engine layers run in Int8, Half and
Float. Exit 0 if every artifact passes, 2 if one is rejected (the message names the node). With
--record the results go into the bundle's manifest (atomically; artifacts are not touched).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def check_bundle(root: str | Path, log=lambda m: None) -> dict[str, dict]:
    """-> {artifact name: check record} for every ONNX model in the bundle; raises ArtifactRejected."""
    from edge_pfm.bundle import Bundle
    from export.artifact_check import ARTIFACT_PRECISION, check_artifact

    bundle = Bundle.load(root)  # hashes first: nothing tampered with is parsed
    return {name: check_artifact(bundle.root / name, ARTIFACT_PRECISION[name], bundle.max_batch, log)
            for name in ARTIFACT_PRECISION if bundle.has(name)}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m export.check` (the docs' CLI reference is generated from it)."""
    ap = argparse.ArgumentParser(prog="python -m export.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="the bundle directory to check")
    ap.add_argument("--record", action="store_true", help="write the results into the bundle's manifest.json")
    ap.add_argument("--json", help="also write the results to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edge_pfm.bundle import Bundle, write_manifest
    from edge_pfm.errors import run_command
    from edge_pfm.fileio import atomic_write_json
    from export.artifact_check import summary_line

    def command() -> None:
        records = check_bundle(args.bundle)
        for name, record in records.items():
            print(summary_line(name, record))
        if args.json:
            atomic_write_json(args.json, records)
        if args.record:
            from export.sign import void_signature

            bundle = Bundle.load(args.bundle)
            void_signature(bundle.root, "export.check --record")
            write_manifest(bundle.root, {**bundle.manifest, "build_checks": records}, {})
            print(f"recorded in {Path(args.bundle) / 'manifest.json'}")

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
