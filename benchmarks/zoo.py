"""The model zoo (examples/zoo.py) through edge-pfm as teams meet it, at full size (issue 39, item 2): for each
architecture, its trainer on a paired dataset on disk with a train/val split column, then both doors on the same
weights

- `--model`: `python -m export --model examples/zoo.py:make_<name> --weights W --spec SPEC --trained-on D`;
- `--onnx`: the team's own plain torch.onnx.export (legacy, opset 17, dynamic batch), then
  `python -m export --onnx M.onnx --spec SPEC --trained-on D` in a process where `import torch` fails;

and `python -m calibration --bundle B --data D --eval H` on each bundle, also with torch blocked. Each calibration
must end in exit 0 (INT8 shipped) or 3 (a refusal report); anything else is a bug, named in the table and in the
exit status. The table puts each model's forecast (examples/zoo.py's EXPECTED, written before any run) beside
what happened, with the recipe, the Int8 share, the held-out agreement and its 95 % interval, and the time.

    python benchmarks/zoo.py [--work build/zoo] [--json build/bench/zoo.json] [--pairs 4000] [--heldout 2000]
        [--epochs 60] [--models attnpool convnext ...] [--keep-weights]

Every command runs in a fresh process, as a user runs it, with the product's defaults. `--keep-weights` keeps each
model's trained weights from the last run in --work with the same --json (the data is regenerated from the same seeds and must match
byte for byte; the trainer is single-threaded and seeded, so training again gives the same weights) and reruns
everything after training: the way to measure a calibration change without an hour of training.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import print_table, python_argv, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "examples/zoo.py"
VERDICTS = {0: "int8", 3: "refused"}  # calibration's exit codes for a finished run; anything else is a failure


def run(argv: list, log: Path, block_torch: bool = False) -> tuple[int, float, str]:
    """Run a command (a module's CLI when argv[0] is '-m'), its output to `log`. With block_torch, in a process
    where `import torch` raises ImportError (sys.modules['torch'] = None, then runpy), as on a machine without
    PyTorch. -> (exit code, seconds, output)."""
    argv = python_argv(argv, block_torch)
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    out = r.stdout + r.stderr
    log.write_text(f"$ {' '.join(argv)}\n{out}")
    return r.returncode, time.perf_counter() - t0, out


def must(result: tuple[int, float, str], what: str, log: Path) -> float:
    """Training and exports must succeed: they are the team's side and the doors' own checks."""
    rc, seconds, out = result
    if rc != 0:
        raise SystemExit(f"!! {what}: exit {rc}\n{out[-3000:]}\n(log: {log})")
    return seconds


def calibration_row(bundle: Path, rc: int, out: str) -> dict:
    """What one calibration wrote: the report of the shipped INT8 (exit 0) or of the refusal (exit 3)."""
    row: dict = {"exit": rc, "verdict": VERDICTS.get(rc, f"FAILED (exit {rc})"), "traceback": "Traceback" in out}
    where = bundle if rc == 0 else bundle.with_name(bundle.name + ".int8-rejected")
    if rc not in VERDICTS or not (where / "accuracy.json").is_file():
        row["tail"] = out[-3000:]
        return row
    report = json.loads((where / "accuracy.json").read_text())
    recipe, int8 = report["recipe"], report["results"]["int8"]
    notes = json.loads((where / "calibration.json").read_text()).get("range_notes", {}) \
        if (where / "calibration.json").is_file() else {}
    row.update(recipe={k: recipe.get(k) for k in ("kind", "method", "float_layers")},
               int8_share=(recipe.get("int8_share") or {}).get("share"),
               int8_share_counted=(recipe.get("int8_share") or {}).get("counted"),
               held_out=report["eval"]["samples"], fp32_accuracy=report["results"]["fp32"]["accuracy"],
               int8_agreement=int8["top1_agreement"], agreement_ci95=int8["agreement_ci95"],
               disagreements=int8["disagreements"], gate=report["gate"],
               range_fallbacks=notes.get("fallbacks", {}), noise_floor=report.get("noise_floor"))
    return row


def _digest(folder: Path) -> str:
    """sha256 over a dataset folder's files, names and bytes, in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _kept_weights(work: Path, last: Path, models: list[str]) -> dict:
    """What --keep-weights reuses from the last run in `work`, whose table is `last` (the same --json):
    {"data": digest, name: {weights, log, seconds}}."""
    if not last.exists() or not (work / "data").is_dir():
        raise SystemExit(f"!! --keep-weights: no finished run in {work} with its table {last}; run without it")
    record = json.loads(last.read_text())["models"]
    kept: dict = {"data": _digest(work / "data")}
    for name in models:
        weights, log = work / name / f"{name}.pt", work / "logs" / f"{name}.train.log"
        if name in record and weights.exists() and log.exists():
            kept[name] = {"weights": weights.read_bytes(), "log": log.read_text(),
                          "seconds": record[name]["train_seconds"]}
    return kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="build/zoo", help="emptied first (but for --keep-weights)")
    ap.add_argument("--json", default="build/bench/zoo.json")
    ap.add_argument("--pairs", type=int, default=4000,
                    help="labelled pairs with a split column (70/15/15 %% train/val/test); at 1000 (700 "
                         "train) five of the six stopped at 66-93 %% val accuracy")
    ap.add_argument("--heldout", type=int, default=2000, help="held-out labelled pairs (the gate's)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--models", nargs="*", default=None, help="a subset of the zoo (default: all)")
    ap.add_argument("--keep-weights", action="store_true",
                    help="reuse each model's weights and training log from the last run in --work (module docstring)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples"))
    import zoo  # the forecasts and the data writer; no torch work happens in this process

    models = args.models or list(zoo.EXPECTED)
    work = (ROOT / args.work).resolve()
    kept = _kept_weights(work, ROOT / args.json, models) if args.keep_weights else {}
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    data, heldout = work / "data", work / "heldout"
    t0 = time.perf_counter()
    zoo.write_data(data, args.pairs, seed=3)
    zoo.write_data(heldout, args.heldout, seed=4, split=False)
    if kept and _digest(data) != kept["data"]:
        raise SystemExit(f"!! --keep-weights: the regenerated {data} differs from the one the kept weights were "
                         "trained on (another --pairs?); run without --keep-weights")
    with open(data / "labels.csv", newline="") as f:
        split = dict(Counter(row["split"] for row in csv.DictReader(f)))
    seconds: dict[str, float] = {"datasets": time.perf_counter() - t0}
    print(f"data: {args.pairs} pairs ({split}), held-out {args.heldout}", file=sys.stderr)
    results: dict[str, dict] = {}
    for name in models:
        d = work / name
        d.mkdir()
        weights, spec, onnx = d / f"{name}.pt", d / f"{name}.spec.json", d / f"{name}.onnx"
        r: dict = {"expected": zoo.EXPECTED[name][0], "why": zoo.EXPECTED[name][1], "doors": {}}
        if name in kept:  # trained by the last run on the same data: its weights, log and time
            weights.write_bytes(kept[name]["weights"])
            (logs / f"{name}.train.log").write_text(kept[name]["log"])
            r["train_seconds"], r["weights_kept"] = kept[name]["seconds"], True
        else:
            r["train_seconds"] = must(run([ZOO, "train", "--model", name, "--data", data, "--out", weights,
                                           "--epochs", args.epochs], logs / f"{name}.train.log"),
                                      f"{name}: training", logs / f"{name}.train.log")
        r["training"] = (logs / f"{name}.train.log").read_text().strip().splitlines()[-1]
        zoo.write_spec(name, spec)
        log = logs / f"{name}.export_model.log"
        t_model = must(run(["-m", "export", "--model", f"{ZOO}:make_{name}", "--weights", weights, "--spec", spec,
                            "--trained-on", data, "--out", d / "model"], log), f"{name}: export --model", log)
        log = logs / f"{name}.their_export.log"
        t_theirs = must(run([ZOO, "export-onnx", "--model", name, "--weights", weights, "--out", onnx], log),
                        f"{name}: their torch.onnx.export", log)
        log = logs / f"{name}.export_onnx.log"
        t_onnx = must(run(["-m", "export", "--onnx", onnx, "--spec", spec, "--trained-on", data, "--out",
                           d / "onnx"], log, block_torch=True), f"{name}: export --onnx", log)
        for door, export_s in (("model", t_model), ("onnx", t_onnx + t_theirs)):
            log = logs / f"{name}.calibration_{door}.log"
            rc, calib_s, out = run(["-m", "calibration", "--bundle", d / door, "--data", data, "--eval", heldout],
                                   log, block_torch=True)
            r["doors"][door] = {**calibration_row(d / door, rc, out), "export_seconds": export_s,
                                "calibration_seconds": calib_s}
            print(f"{name} --{door}: {r['doors'][door]['verdict']} (exit {rc}, {calib_s:.0f}s)", file=sys.stderr)
        results[name] = r

    rows = []
    for name, r in results.items():
        for door, c in r["doors"].items():
            recipe = c.get("recipe") or {}
            floats = recipe.get("float_layers")
            rows.append([name, f"--{door}", r["expected"], c["verdict"], c["exit"],
                         f"{recipe.get('kind')} ({recipe.get('method')})" if recipe else "-",
                         ", ".join(floats) if floats else ("none" if floats is not None else "-"),
                         f"{c['int8_share']:.0%}" if c.get("int8_share") is not None else "-",
                         "{:.2%} [{:.2%}, {:.2%}] ({} of {} differ)".format(
                             c["int8_agreement"], *c["agreement_ci95"], c["disagreements"], c["held_out"])
                         if "int8_agreement" in c else "-",
                         f"{c['fp32_accuracy']:.1%}" if "fp32_accuracy" in c else "-",
                         len(c.get("range_fallbacks", {})),
                         f"{c['noise_floor']['fp32_changed']} of {c['noise_floor']['samples']}"
                         if c.get("noise_floor") else "-",
                         f"{r['train_seconds'] + c['export_seconds'] + c['calibration_seconds']:.0f}"])
    print_table(["model", "door", "expected", "actual", "exit", "INT8 recipe (method)", "nodes kept float",
                 "Int8 share", "held-out INT8 agreement [95 % CI]", "FP32 acc", "range fallbacks",
                 "FP32 changed by 1 grey level of noise", "s (train+export+calib)"], rows)
    print()
    print_table(["model", "trainer (best val)", "expected", "why"],
                [[n, r["training"].split(": ", 1)[-1].split("; wrote")[0], r["expected"], r["why"]]
                 for n, r in results.items()])
    calibrations = [c for r in results.values() for c in r["doors"].values()]
    shipped = sorted({n for n, r in results.items() if any(c["exit"] == 0 for c in r["doors"].values())})
    failed = [f"{n} --{door}" for n, r in results.items() for door, c in r["doors"].items()
              if c["exit"] not in VERDICTS or c["traceback"]]
    differ = [f"{n} --{door}: expected {r['expected']}, got {c['verdict']}" for n, r in results.items()
              for door, c in r["doors"].items() if c["verdict"] != r["expected"]]
    print(f"\nmodels shipping INT8 (any door): {len(shipped)} of {len(results)} {shipped}; calibrations ending in a "
          f"failure: {len(failed)} of {len(calibrations)} {failed}")
    for line in differ:
        print(f"forecast missed: {line}")
    write_json(args.json, {"pairs": args.pairs, "weights_kept": sorted(n for n in kept if n != "data"),
                           "split": split, "heldout": args.heldout, "epochs": args.epochs, "models": results, "shipped": shipped, "failed": failed, "forecast_missed": differ,
                           "seconds": seconds})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
