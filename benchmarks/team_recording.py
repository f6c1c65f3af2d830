"""A team with a few hundred labelled pairs gets INT8 from the device's own unlabelled recordings (issue 39).

Their trainer (examples/their_pfm.py) on the docs' 400 labelled pairs (docs/bring-your-own.md) with a split column, the --model door with
--trained-on, then two recordings made the way a device makes them: `edge-pfm record --mode dataset` on two
replayed cameras (image folders of pairs nobody labelled, another seed of the same scene generator), one for the
recipe's val (--val), one where the gate measures agreement (--agreement-data). Calibration then runs in a process
where `import torch` fails:

    python -m calibration --bundle B --data DATA --val REC_VAL --eval HELDOUT --agreement-data REC_AGREE

The labelled held-out set (400 pairs) decides accuracy and recall; the recording decides agreement.

    python benchmarks/team_recording.py [--model their_pfm | zoo:NAME] [--seeds 0 1] [--pairs 400]
        [--val-pairs 2000] [--agreement-pairs 3000] [--work build/team_recording] [--json build/bench/team_recording.json]

--pairs: their labelled pairs with the split column (the docs' 400: 280 train); the labelled held-out set stays 400.

--model zoo:NAME takes a model of examples/zoo.py (its own trainer and spec) instead of the docs' example.

Every command runs in a fresh process with the product's defaults; one table and a JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import print_table, write_json  # noqa: E402
from benchmarks.their_model import EXAMPLE, PAIRS, SIZE, SPEC, SPLIT, run  # noqa: E402

CAMERA_SEED = {"val": 5, "agreement": 6}  # the replayed cameras' scenes: neither the training nor held-out seeds
ZOO = EXAMPLE.parent / "zoo.py"


def model_door(model: str, weights: Path, logs: Path) -> tuple[str, Path]:
    """-> (the --model door's FILE:FACTORY, the spec) of their_pfm or zoo:NAME."""
    if model == "their_pfm":
        return f"{EXAMPLE}:make_model", SPEC
    name = model.split(":", 1)[1]
    spec = weights.with_suffix(".spec.json")
    run([ZOO, "spec", "--model", name, "--out", spec], logs / "spec.log")
    return f"{ZOO}:make_{name}", spec


def train(model: str, data: Path, seed: int, weights: Path, logs: Path) -> float:
    """Their trainer on `data` (its split column) -> seconds."""
    cmd = ([EXAMPLE, "--data", data] if model == "their_pfm" else
           [ZOO, "train", "--model", model.split(":", 1)[1], "--data", data])
    return run([*cmd, "--seed", seed, "--out", weights], logs / "train.log")[1]


def record(bundle: Path, cameras: Path, n: int, out: Path, log: Path) -> tuple[int, float]:
    """`edge-pfm record --mode dataset` of n pairs from two replayed image folders -> (pairs kept, seconds). A busy
    machine makes the recorder skip pairs (`writer_busy`) while the folders play on; then the recording is resumed
    from folders of new scenes (another seed), as a device records on through another session."""
    from edge_pfm.synthetic import write_dataset

    seconds = 0.0
    for attempt in range(4):
        shutil.rmtree(cameras, ignore_errors=True)
        kept = sum(1 for _ in (out / "white").iterdir()) if (out / "white").is_dir() else 0
        if kept >= n:
            break
        write_dataset(cameras, (n - kept) * 11 // 10, seed=CAMERA_SEED[out.name] + 100 * attempt, size=SIZE)
        _, took = run(["-m", "edge_pfm", "record", "--bundle", bundle, "--out", out, "--mode", "dataset", "--pairs", n,
                       "--white", cameras / "white", "--fluo", cameras / "fluorescence"], log.with_suffix(f".{attempt}.log"))
        seconds += took
    return sum(1 for _ in (out / "white").iterdir()), seconds


def one_seed(work: Path, seed: int, val_pairs: int, agreement_pairs: int, model: str = "their_pfm",
             pairs: int = PAIRS) -> dict:
    from edge_pfm.synthetic import write_dataset

    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data, heldout, weights, bundle = work / "data", work / "heldout", work / "their.pt", work / "bundle"
    seconds: dict[str, float] = {}
    if not weights.exists():  # --resume keeps a finished training
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(heldout, ignore_errors=True)
        write_dataset(data, pairs, seed=3, size=SIZE, split=SPLIT)
        write_dataset(heldout, PAIRS, seed=4, size=SIZE)
        seconds["their training"] = train(model, data, seed, weights, logs)
    factory, spec = model_door(model, weights, logs)
    for stale in (bundle, bundle.with_name(bundle.name + ".int8-rejected"), work / "val", work / "agreement",
                  work / "cameras_val", work / "cameras_agreement"):
        shutil.rmtree(stale, ignore_errors=True)
    _, seconds["export --model"] = run(["-m", "export", "--model", factory, "--weights", weights,
                                        "--spec", spec, "--trained-on", data, "--out", bundle], logs / "export.log")
    recordings = {}
    for role, n in (("val", val_pairs), ("agreement", agreement_pairs)):
        kept, seconds[f"edge-pfm record ({role})"] = record(bundle, work / f"cameras_{role}", n, work / role,
                                                             logs / f"record_{role}.log")
        recordings[role] = kept
    rc, seconds["calibration (torch blocked)"] = run(
        ["-m", "calibration", "--bundle", bundle, "--data", data, "--val", work / "val", "--eval", heldout,
         "--agreement-data", work / "agreement"], logs / "calibration.log", ok=(0, 3), block_torch=True)
    where = bundle if rc == 0 else bundle.with_name(bundle.name + ".int8-rejected")
    report = json.loads((where / "accuracy.json").read_text())
    res, recipe, agree = report["results"], report["recipe"], report["agreement"]
    return {"model": model, "seed": seed, "calibration_exit": rc, "shipped": "INT8" if rc == 0 else "FP32 (refused)",
            "recorded": recordings, "fp32_accuracy": res["fp32"]["accuracy"], "held_out": res["fp32"]["samples"],
            "int8_accuracy": res["int8"]["accuracy"],
            "held_out_int8_agreement": {k: res["int8"][k] for k in ("top1_agreement", "agreement_ci95",
                                                                      "disagreements")},
            "recording_int8_agreement": agree["int8"], "recording_source": agree["source"],
            "recipe": {k: recipe.get(k) for k in ("kind", "method", "float_layers", "val", "confirm", "int8_share")},
            "gate": report["gate"], "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="their_pfm", help="their_pfm (the docs' example) or zoo:NAME")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="their trainer's seeds")
    ap.add_argument("--pairs", type=int, default=PAIRS,
                    help="their labelled pairs with a split column (70/15/15 %% train/val/test; the docs' 400); the "
                         "labelled held-out set stays 400 pairs")
    ap.add_argument("--val-pairs", type=int, default=2000)
    ap.add_argument("--agreement-pairs", type=int, default=3000)
    ap.add_argument("--work", default="build/team_recording", help="emptied first (unless --resume)")
    ap.add_argument("--resume", action="store_true", help="keep the trained weights of an earlier run; redo the rest")
    ap.add_argument("--json", default="build/bench/team_recording.json")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        row = one_seed(work / f"seed{seed}", seed, args.val_pairs, args.agreement_pairs, args.model,
                       args.pairs)
        row["seconds"]["total"] = time.perf_counter() - t0
        rows.append(row)
        print(f"seed {seed}: {row['shipped']}", flush=True)
    table = []
    for r in rows:
        h, a = r["held_out_int8_agreement"], r["recording_int8_agreement"]
        table.append([r["seed"], f"{r['fp32_accuracy']:.2%} (n={r['held_out']})", f"{r['int8_accuracy']:.2%}",
                      "{:.2%} [{:.2%}, {:.2%}], {} differ".format(h["top1_agreement"], *h["agreement_ci95"],
                                                                  h["disagreements"]),
                      "{:.2%} [{:.2%}, {:.2%}], {} of {} differ".format(a["top1_agreement"], *a["agreement_ci95"],
                                                                        a["disagreements"], a["samples"]),
                      f"{r['recipe']['kind']} ({r['recipe']['method']}), {len(r['recipe']['float_layers'])} float",
                      f"{r['recipe']['int8_share']['share']:.0%}", r["shipped"],
                      round(r["seconds"]["total"])])
        if r["gate"]["reasons"]:
            print(f"seed {r['seed']} refused: " + "; ".join(r["gate"]["reasons"]))
    print_table(["seed", "FP32 held-out accuracy", "INT8 accuracy", "held-out INT8 agreement [95 % CI]",
                 "recorded INT8 agreement [95 % CI]", "recipe", "Int8 share", "ships", "s"], table)
    write_json(args.json, {"rows": rows})
    return 0 if all(r["calibration_exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
