"""A team's own model through edge-pfm, end to end, as a team meets it: the "Bring your own model" commands of docs/bring-your-own.md
(their trainer on a paired dataset on disk whose labels.csv has a split column, the --model door with the
preprocessing check and --trained-on, calibration on --data/--eval, edge-pfm info), then what the issue's
acceptance asks beyond them:

- the same weights exported by their own script (plain torch.onnx.export, legacy and dynamo, with PyTorch's
  reference outputs in polygraphy JSON) through the --onnx door and calibrated, both in processes where
  `import torch` fails;
- decisions from `edge-pfm run` on two replayed videos (FFV1, one per camera) of held-out pairs, each pair held for
  --hold frames at 30 fps, scored against the pairs' labels and against the same bundle classifying the PNGs.

    python benchmarks/their_model.py [--work build/their_model] [--json build/bench/their_model.json]
        [--pairs 400] [--heldout 400] [--seed 0] [--video-pairs 40] [--hold 30]

--pairs/--heldout default to the docs' 400 and 400; more of both shows what a better-trained model of theirs
meets (the INT8 gate needs about 1,700 held-out pairs to show 99 % agreement with a few flips).

Every command runs in a fresh process, as a user runs it, with the product's defaults; one table and a JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import print_table, python_argv, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE, SPEC = ROOT / "examples/their_pfm.py", ROOT / "examples/their_pfm.spec.json"
PAIRS, SIZE, SPLIT, CONFORMANCE = 400, (320, 240), (0.7, 0.15, 0.15), 32  # the docs' commands
FPS = 30


def run(argv: list, log: Path, ok: tuple[int, ...] = (0,), block_torch: bool = False) -> tuple[int, float]:
    """Run a command (a module's CLI when argv[0] starts with '-m'), its output to `log`; -> (exit code, seconds)."""
    argv = [str(a) for a in argv]
    argv = python_argv(argv, block_torch) if block_torch or argv[0] == "-m" or argv[0].endswith(".py") else argv
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}")
    if r.returncode not in ok:
        raise SystemExit(f"!! exit {r.returncode}: {' '.join(argv)}\n{(r.stdout + r.stderr)[-3000:]}\n(log: {log})")
    return r.returncode, time.perf_counter() - t0


def census(check: dict | None) -> str:
    t = (check or {}).get("tensorrt", {})
    if not t.get("checked"):
        return f"not built ({t.get('reason', 'no build check')})"
    conv = t["compute_by_datatype"]
    if not conv:
        return f"{t['layers']} layers {t['by_datatype']}; no conv/matmul census"
    lead = max(conv, key=conv.get)
    return (f"{t['layers']} layers {t['by_datatype']}; conv/matmul {lead} {conv[lead]} of {sum(conv.values())} "
            f"({t['flavour']} {t['version']})")


def door(bundle: Path, calib_rc: int) -> dict:
    """What the export and calibration wrote for one bundle."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    where = bundle if calib_rc == 0 else bundle.with_name(bundle.name + ".int8-rejected")
    report = json.loads((where / "accuracy.json").read_text())
    res, gate = report["results"], report["gate"]
    return {"parity": manifest["parity"], "preprocessing_check": manifest.get("preprocessing_check"),
            "builds": {"model.onnx": manifest["build_checks"]["model.onnx"], **report["builds"]},
            "recipe": {k: report["recipe"].get(k) for k in ("kind", "method", "float_layers", "engine_conv_matmul",
                                                            "int8_share")},
            "held_out": report["eval"]["samples"], "fp32_accuracy": res["fp32"]["accuracy"],
            "int8": {k: res["int8"][k] for k in ("accuracy", "top1_agreement", "agreement_ci95", "disagreements")},
            "fp16_agreement": res["fp16"]["top1_agreement"], "gate": gate, "int8_shipped": calib_rc == 0,
            "calibration_exit": calib_rc}


def held_out_pairs(heldout: Path, n: int) -> list[tuple]:
    """The first n held-out pairs, read once: (white BGR, fluorescence BGR, class name)."""
    from edge_pfm.dataset import PairedDataset

    ds = PairedDataset(heldout)
    return [(w, f, ds.classes[y]) for w, f, y in map(ds.load, range(min(n, len(ds))))]


def write_videos(pairs: list[tuple], hold: int, out: Path) -> None:
    """white.avi and fluo.avi (FFV1, lossless) of the pairs, each for `hold` frames."""
    import cv2

    h, w = pairs[0][0].shape[:2]
    for k, name in ((0, "white.avi"), (1, "fluo.avi")):
        vw = cv2.VideoWriter(str(out / name), cv2.VideoWriter_fourcc(*"FFV1"), FPS, (w, h))
        if not vw.isOpened():
            raise SystemExit("OpenCV's FFV1 writer is unavailable")
        for pair in pairs:
            for _ in range(hold):
                vw.write(pair[k])
        vw.release()


def offline_classes(bundle: Path, pairs: list[tuple]) -> list[str]:
    """The bundle's class for each pair as read from its PNGs, through the Python API."""
    from edge_pfm.classifier import Classifier

    with Classifier(bundle) as clf:
        return [clf.classify(w, f).label for w, f, _ in pairs]


def score_replay(log: Path, truth: list[str], offline: list[str], hold: int) -> dict:
    """Decisions of the replay against each held-out pair's label (`truth`) and the bundle's offline class."""
    from evaluation.stats import wilson

    records = [r for r in map(json.loads, log.read_text().splitlines()) if "state" in r]  # not the run header
    pairs = [r for r in records if "file_index_white" in r]
    same = [r for r in pairs if r["file_index_white"] // hold == r["file_index_fluo"] // hold]
    classified = [r for r in same if r["raw_class"] is not None]
    as_offline = sum(r["raw_class"] == offline[r["file_index_white"] // hold] for r in classified)
    right = sum(r["raw_class"] == truth[r["file_index_white"] // hold] for r in classified)
    last: dict[int, dict] = {}
    for r in same:
        last[r["file_index_white"] // hold] = r
    shown_right = sum(r["shown_class"] == truth[k] for k, r in last.items())
    states: dict[str, int] = {}
    for r in records:
        states[r["state"]] = states.get(r["state"], 0) + 1
    return {"records": len(records), "pair_decisions": len(pairs), "same_held_out_pair": len(same),
            "classified": len(classified), "raw_class_as_offline": as_offline,
            "raw_class_correct": right, "raw_class_accuracy_ci95": list(wilson(right, len(classified))),
            "pairs_seen": len(last), "shown_class_correct_at_pair_end": shown_right,
            "shown_ci95": list(wilson(shown_right, len(last))), "states": states,
            "backend": pairs[0]["backend"] if pairs else None, "engine": pairs[0]["engine"] if pairs else None,
            "offline_accuracy": sum(o == t for o, t in zip(offline, truth)) / len(truth)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="build/their_model", help="emptied first")
    ap.add_argument("--json", default="build/bench/their_model.json")
    ap.add_argument("--pairs", type=int, default=PAIRS, help="their training pairs (the docs' 400)")
    ap.add_argument("--heldout", type=int, default=PAIRS, help="held-out pairs (the docs' 400)")
    ap.add_argument("--seed", type=int, default=0, help="their trainer's --seed (the docs' 0)")
    ap.add_argument("--video-pairs", type=int, default=40)
    ap.add_argument("--hold", type=int, default=30, help="frames each held-out pair stays in the videos")
    args = ap.parse_args(argv)
    import torch

    from edge_pfm.synthetic import write_dataset

    work = (ROOT / args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    data, heldout, weights = work / "data", work / "heldout", work / "their.pt"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    write_dataset(data, args.pairs, seed=3, size=SIZE, split=SPLIT)
    write_dataset(heldout, args.heldout, seed=4, size=SIZE)
    seconds["datasets"] = time.perf_counter() - t0
    _, seconds["their_training"] = run([EXAMPLE, "--data", data, "--seed", args.seed, "--out", weights],
                                       logs / "train.log")
    run([EXAMPLE, "--data", heldout, "--conformance", CONFORMANCE, "--out", work / "conformance"],
        logs / "conformance.log")
    check = ["--spec", SPEC, "--check-preprocessing", work / "conformance", "--trained-on", data]
    bundles, doors = work / "bundles", {}
    _, seconds["export --model"] = run(["-m", "export", "--model", f"{EXAMPLE}:make_model", "--weights", weights,
                                        *check, "--out", bundles / "model"], logs / "export_model.log")
    for kind in ("legacy", "dynamo"):
        onnx_dir = work / f"onnx_{kind}"
        onnx_dir.mkdir()
        run([EXAMPLE, "--export-onnx", kind, "--weights", weights, "--references", 8, "--out",
             onnx_dir / "their.onnx"], logs / f"their_export_{kind}.log")
        _, seconds[f"export --onnx ({kind})"] = run(
            ["-m", "export", "--onnx", onnx_dir / "their.onnx", *check, "--reference-inputs",
             onnx_dir / "their.inputs.json", "--reference-outputs", onnx_dir / "their.outputs.json", "--out",
             bundles / kind], logs / f"export_onnx_{kind}.log", block_torch=True)
    for name in ("model", "legacy", "dynamo"):
        rc, seconds[f"calibration ({name})"] = run(
            ["-m", "calibration", "--bundle", bundles / name, "--data", data, "--eval", heldout],
            logs / f"calibration_{name}.log", ok=(0, 3), block_torch=name != "model")
        doors[name] = door(bundles / name, rc)
    run(["-m", "edge_pfm", "info", "--bundle", bundles / "model"], logs / "info.log")

    videos = work / "videos"
    videos.mkdir()
    pairs = held_out_pairs(heldout, args.video_pairs)
    write_videos(pairs, args.hold, videos)
    truth = [label for _, _, label in pairs]
    decisions = work / "decisions.jsonl"
    _, seconds["edge-pfm run (replay)"] = run(
        ["-m", "edge_pfm", "run", "--bundle", bundles / "model", "--white", videos / "white.avi", "--fluo",
         videos / "fluo.avi", "--log", decisions, "--summary-json", work / "run_summary.json"], logs / "run.log")
    offline = offline_classes(bundles / "model", pairs)
    replay = score_replay(decisions, truth, offline, args.hold)

    from evaluation.stats import wilson

    ckpt = torch.load(weights, weights_only=True)
    val, trained = ckpt["val_accuracy"], ckpt["training"]
    rows = [["their trainer's val accuracy (best epoch; the split column's val)",
             f"{val:.1%} (n={trained['samples']['val']}, epoch {ckpt['epoch']} of {trained['epochs_run']}, seed "
             f"{args.seed})", "", ""]]
    for figure, pick in (
            ("parity: max |dlogit| (pairs, reference)", lambda d: f"{d['parity']['max_abs_diff']:.1e} "
             f"({d['parity']['pairs']}, {d['parity']['reference']})"),
            ("preprocessing check: mean grey-level diff white / fluo, agreement",
             lambda d: "{:.2f} / {:.2f}, {:.0%}".format(*(d["preprocessing_check"]["modalities"][m]
                                                         ["mean_abs_grey_levels"] for m in ("white_light",
                                                                                            "fluorescence")),
                                                        d["preprocessing_check"]["top1_agreement"])),
            ("FP32 held-out accuracy [95 % CI]", lambda d: "{:.2%} [{:.2%}, {:.2%}] (n={})".format(
                d["fp32_accuracy"], *wilson(round(d["fp32_accuracy"] * d["held_out"]), d["held_out"]),
                d["held_out"])),
            ("TensorRT-RTX model.onnx", lambda d: census(d["builds"]["model.onnx"])),
            ("TensorRT-RTX model.fp16.onnx", lambda d: census(d["builds"].get("model.fp16.onnx"))),
            ("TensorRT-RTX model.int8.onnx", lambda d: census(d["builds"].get("model.int8.onnx"))),
            ("INT8 recipe", lambda d: f"{d['recipe']['kind']} ({d['recipe']['method']}), "
             f"{len(d['recipe']['float_layers'])} node(s) float"),
            ("INT8 agreement with FP32 [95 % CI], differ", lambda d: "{:.2%} [{:.2%}, {:.2%}], {}".format(
                d["int8"]["top1_agreement"], *d["int8"]["agreement_ci95"], d["int8"]["disagreements"])),
            ("FP16 agreement with FP32", lambda d: f"{d['fp16_agreement']:.2%}"),
            ("INT8 gate", lambda d: "passed: INT8 shipped" if d["gate"]["passed"] else
             "refused (exit 3): " + "; ".join(d["gate"]["reasons"]))):
        rows.append([figure, *(pick(doors[n]) for n in ("model", "legacy", "dynamo"))])
    print_table(["figure", "--model", "--onnx (legacy export)", "--onnx (dynamo export)"], rows)
    print()
    print_table(["edge-pfm run on two replayed videos (--model bundle)", "measured"], [
        ["videos", f"{len(pairs)} held-out pairs x {args.hold} frames, {FPS} fps, FFV1, {SIZE[0]}x{SIZE[1]}"],
        ["backend, engine", f"{replay['backend']}, {replay['engine']}"],
        ["decision records (states)", f"{replay['records']} {replay['states']}"],
        ["pair decisions, both frames of one held-out pair", f"{replay['same_held_out_pair']} of "
                                                            f"{replay['pair_decisions']}"],
        ["raw class = the bundle's class for that PNG pair", f"{replay['raw_class_as_offline']} of "
                                                             f"{replay['classified']}"],
        ["raw class = the pair's label", "{} of {} [{:.1%}, {:.1%}] (decisions of one pair are not "
                                         "independent)".format(replay["raw_class_correct"], replay["classified"],
                                                               *replay["raw_class_accuracy_ci95"])],
        ["shown class = label at each pair's last decision", "{} of {} [{:.1%}, {:.1%}]".format(
            replay["shown_class_correct_at_pair_end"], replay["pairs_seen"], *replay["shown_ci95"])],
        ["the same pairs classified offline (Classifier on the PNGs)", f"{replay['offline_accuracy']:.1%}"]])
    print()
    print_table(["step", "seconds"], [[k, round(v, 1)] for k, v in seconds.items()])
    write_json(args.json, {"pairs": args.pairs, "heldout": args.heldout, "seed": args.seed, "their_val_accuracy": val,
                           "their_training": trained, "their_best_epoch": ckpt["epoch"],
                           "trained_on": json.loads((bundles / "model/manifest.json").read_text())["provenance"]
                           ["training"], "doors": doors, "replay": replay, "seconds": seconds,
                           "video": {"pairs": len(pairs), "hold_frames": args.hold, "fps": FPS}})
    good = all(d["parity"]["passed"] for d in doors.values()) and replay["raw_class_as_offline"] == replay["classified"]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
