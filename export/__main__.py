"""python -m export --checkpoint CKPT --out BUNDLE_DIR [--opset 17] [--max-batch N] [--map-classes lsil,hsil]
python -m export --onnx MODEL.onnx --spec SPEC.json --out BUNDLE_DIR [--reference-inputs I.json --reference-outputs O.json]
python -m export --model FILE.py:FACTORY --weights W.pt --spec SPEC.json --out BUNDLE_DIR
  any door: [--check-preprocessing DIR]  (your pipeline's tensors against edge_pfm.preprocess)
  --onnx, --model: [--trained-on DIR]  (the paired dataset your model was trained on: its split is recorded)

Exports a PFM checkpoint to a verified ONNX bundle: model.onnx (symbolic batch), manifest.json,
parity report (PyTorch vs ONNX Runtime CPU). Nothing is written unless every check passes.
A lesion map is exported only from a checkpoint trained on masks; the runtime shows it only for the map
classes and only with a held-out measurement above the floors (edge_pfm.lesion.MAP_FLOORS).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m export` (no torch imported: the docs' CLI reference is generated from it)."""
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    door = ap.add_mutually_exclusive_group(required=True)
    door.add_argument("--checkpoint", help="checkpoint written by python -m export.train (our PFM)")
    door.add_argument("--onnx", metavar="MODEL.onnx", help="an ONNX your own exporter wrote (needs --spec; no PyTorch)")
    door.add_argument("--model", metavar="FILE.py:FACTORY",
                      help="your own nn.Module: FILE.py:FACTORY or package.module:FACTORY, called with the spec's "
                           "model_args (THIS IMPORTS AND RUNS YOUR CODE); needs --weights and --spec")
    ap.add_argument("--weights", metavar="W.pt", help="with --model: a state_dict (or a dict holding one), loaded "
                                                      "with weights_only=True, strict")
    ap.add_argument("--spec", metavar="SPEC.json", help="the model spec (export/model_spec.py, "
                                                        "docs/bring-your-own.md): classes, roles, inputs, outputs")
    ap.add_argument("--reference-inputs", metavar="I.json", help="with --onnx: polygraphy --save-inputs JSON")
    ap.add_argument("--reference-outputs", metavar="O.json",
                    help="with --onnx: your framework's outputs on those inputs (polygraphy --save-outputs JSON); "
                         "parity is checked against them. Without them the manifest says there is no reference")
    ap.add_argument("--check-preprocessing", metavar="DIR",
                    help="raw pairs (white/, fluorescence/) beside the tensors your own pipeline made of them "
                         "(tensors/<sample>.npz), >= 8 pairs: edge_pfm.preprocess must make the same (mean difference "
                         "<= 2 grey levels, model top-1 agreement not shown below 97 %%), else exit 2 naming the "
                         "spec field to change")
    ap.add_argument("--trained-on", metavar="DIR",
                    help="with --onnx or --model: the paired dataset your model was trained on (wins over the spec's "
                         "training.data). Recorded in the bundle's provenance with its split column's per-split "
                         "digests, so calibration never takes a training pair for val or the gate; without a "
                         "split column the bundle says which pairs trained it is unknown")
    ap.add_argument("--out", required=True, help="bundle directory to create (replaced atomically)")
    ap.add_argument("--bundle-version", type=int, metavar="N",
                    help="the manifest's bundle_version, a positive integer under the signature that a device's "
                         "rollback floor compares (default: the export's UTC time as YYYYMMDDHHMMSS, so a later "
                         "export is a higher version)")
    ap.add_argument("--opset", type=int, default=17, help="--checkpoint: the opset to export")
    ap.add_argument("--max-batch", type=int, default=8, help="largest batch the device engine profile covers")
    ap.add_argument("--parity-pairs", type=int, default=64, help="pairs in the parity set (half random, half scenes)")
    ap.add_argument("--map-classes", metavar="A,B",
                    help="the classes whose decisions show the lesion map (default: those the trainer measured it on, "
                         "lsil,hsil for our classes); '' for none")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from edge_pfm.errors import run_command
    from edge_pfm.lesion import parse_map_classes

    if args.max_batch < 1:
        ap.error("--max-batch must be >= 1")
    if args.bundle_version is not None and args.bundle_version < 1:
        ap.error("--bundle-version must be a positive integer")
    if (args.onnx or args.model) and not args.spec:
        ap.error("--onnx and --model need --spec SPEC.json: the runtime must not guess classes or preprocessing")
    if args.model and not args.weights:
        ap.error("--model needs --weights W.pt")
    if args.checkpoint and (args.spec or args.reference_inputs or args.reference_outputs or args.weights
                            or args.trained_on):
        ap.error("--spec, --weights, --trained-on and --reference-* go with --onnx or --model; a checkpoint carries "
                 "its own spec and records its own training data")
    if args.model and (args.reference_inputs or args.reference_outputs):
        ap.error("--reference-* go with --onnx; with --model, parity is checked against your module itself")
    half = max(1, args.parity_pairs // 2)
    map_classes = None if args.map_classes is None else parse_map_classes(args.map_classes)

    def build(out: str) -> None:
        if args.onnx:
            from export.onnx_door import bundle_from_onnx  # no torch on this door

            bundle_from_onnx(args.onnx, args.spec, out, args.max_batch, args.reference_inputs,
                             args.reference_outputs, trained_on=args.trained_on, bundle_version=args.bundle_version)
            return
        if args.model:
            from export.model_door import bundle_from_model

            bundle_from_model(args.model, args.weights, args.spec, out, args.max_batch, args.opset,
                              args.parity_pairs, trained_on=args.trained_on, bundle_version=args.bundle_version)
            return
        from export.bundle_export import export_bundle

        export_bundle(args.checkpoint, out, args.opset, args.max_batch, half, args.parity_pairs - half,
                      map_classes=map_classes, bundle_version=args.bundle_version)

    def command() -> None:
        if args.check_preprocessing:
            from export.preprocessing_check import export_checked

            export_checked(args.out, args.check_preprocessing, build)
        else:
            build(args.out)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
