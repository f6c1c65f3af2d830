"""The six-model matrix: `python -m demo` for each training seed and thread count (another seed or thread count
trains another model, as another machine does), one fresh process each, one at a time, and what each shipped.

    python benchmarks/int8_matrix.py [--seeds 0 1 2] [--threads 1 2] [--out build/int8_matrix] \
        [--json build/int8_matrix.json]

Per model: the recipe calibration chose (ptq, mixed, qat, refused), the nodes kept float, the val lower bound the
recipe showed, its confirmation on pairs the search never saw, the held-out agreement with its 95 % interval, the
agreement of the shipped INT8 on a FRESH synthetic set of 2000 pairs that neither the search nor the gate saw (its
seed drawn per run and printed; the same generator and resolution as the demo's held-out set; a model that ships
FP32 counts as a miss: the issue-39 criterion is a Wilson lower bound >= 99 % in at least 5 of the 6), the protected class's recall change, the share of
conv/matmul engine layers in Int8 (TensorRT-RTX census), whether INT8 shipped, the checkpoint's sha256 and the
demo's wall time. Run it on a quiet machine: the times are the demo's, with nothing else running.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import print_table, write_json  # noqa: E402
from edge_pfm.bundle import Bundle  # noqa: E402

FRESH_PAIRS, FRESH_RESOLUTION = 2000, (640, 360)  # the demo's held-out set's size and camera resolution


def fresh_agreement(bundle: Path, seed: int, n: int = FRESH_PAIRS) -> dict:
    """The shipped INT8's top-1 agreement with FP32 on n synthetic pairs rendered with `seed` (no label needed)."""
    from calibration.accuracy import agreement_report, evaluate_stream
    from calibration.data import synthetic_pair_chunks

    b = Bundle.load(bundle)
    logits, _ = evaluate_stream({"fp32": b.model_path("fp32"), "int8": b.model_path("int8")},
                                synthetic_pair_chunks(n, seed, FRESH_RESOLUTION, classes=b.classes),
                                b.preprocessing, b.input_names, spin=False, progress=None)
    a = agreement_report(logits, f"synthetic:{n}:seed={seed}")["int8"]
    return {"seed": seed, **a, "wilson_lower_ge_99": a["agreement_ci95"][0] >= 0.99}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_row(out: Path, seconds: float, log: str) -> dict:
    """What one demo run in `out` shipped, from its bundle's reports."""
    bundle = out / "bundle"
    shipped = (bundle / "accuracy.json").exists()
    report_dir = bundle if shipped else bundle.with_name(bundle.name + ".int8-rejected")
    report = json.loads((report_dir / "accuracy.json").read_text())
    b = Bundle.load(bundle)
    protected = b.roles.protected(b.classes)[0]
    i8, recipe = report["results"]["int8"], report["recipe"]
    change = i8["recall_change"][protected]
    kind = recipe["kind"]
    qat_ckpt = out / "pfm_tiny.qat.pt"
    if "quantization-aware fine-tuning" in log:  # PTQ was refused first
        if "discarded" in log.split("[qat] val accuracy", 1)[-1].splitlines()[0]:
            kind = f"{kind} (QAT discarded: the trained model, FP32)"
        else:
            kind = "qat (PTQ refused)" if shipped else "refused (PTQ, then QAT)"
    return {
        "recipe": kind, "method": recipe.get("method"), "float_nodes": recipe.get("float_layers", []),
        "val_lower_bound": (recipe.get("val") or {}).get("agreement_ci95", [None])[0],
        "confirm": recipe.get("confirm"), "confirmations": recipe.get("confirmations", []),
        "test_agreement": i8["top1_agreement"], "test_agreement_ci95": i8["agreement_ci95"],
        "test_samples": i8["samples"], "protected_class": protected, "recall_change": change["delta"],
        "recall_change_ci95": change["ci95"], "recall_lost_gained": [change["lost"], change["gained"]],
        "engine_int8_share": (recipe.get("engine_conv_matmul") or {}).get("share"),
        "shipped": "INT8" if shipped else "FP32", "gate_reasons": report["gate"]["reasons"],
        "checkpoint_sha256": _sha256(out / "pfm_tiny.pt"),  # the trained model
        "qat_checkpoint_sha256": _sha256(qat_ckpt) if qat_ckpt.exists() else None,
        "int8_onnx_sha256": b.manifest["artifacts"].get("model.int8.onnx", {}).get("sha256"),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="build/int8_matrix")
    ap.add_argument("--json", default="build/int8_matrix.json")
    ap.add_argument("--fresh-seed", type=int, default=None, help="the fresh set's seed (default: drawn per run)")
    args = ap.parse_args(argv)
    import secrets

    fresh_seed = args.fresh_seed if args.fresh_seed is not None else secrets.randbelow(2**31 - 1)
    print(f"fresh set: {FRESH_PAIRS} synthetic pairs at {FRESH_RESOLUTION[0]}x{FRESH_RESOLUTION[1]}, seed {fresh_seed} "
          "(drawn for this run)", flush=True)
    rows = {}
    for seed in args.seeds:
        for threads in args.threads:
            out = Path(args.out) / f"seed{seed}_threads{threads}"
            cmd = [sys.executable, "-m", "demo", "--out", str(out), "--seed", str(seed), "--threads", str(threads)]
            print(f"== {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            seconds = time.perf_counter() - t0
            (out / "demo.log").parent.mkdir(parents=True, exist_ok=True)
            (out / "demo.log").write_text(r.stdout + r.stderr)
            if r.returncode:
                print(f"!! the demo failed (exit {r.returncode}); its log: {out / 'demo.log'}", file=sys.stderr)
                rows[f"seed {seed}, threads {threads}"] = {"error": r.returncode, "seconds": seconds}
                continue
            row = rows[f"seed {seed}, threads {threads}"] = model_row(out, seconds, r.stdout + r.stderr)
            row["fresh"] = fresh_agreement(out / "bundle", fresh_seed) if row["shipped"] == "INT8" else None
            print(f"   {row['shipped']} ({row['recipe']}), held-out agreement {row['test_agreement']:.2%}, fresh "
                  + (f"{row['fresh']['top1_agreement']:.2%}" if row["fresh"] else "- (FP32 shipped: a miss)")
                  + f", {seconds:.0f}s", flush=True)
    table = []
    for name, r in rows.items():
        if "error" in r:
            table.append([name, f"FAILED (exit {r['error']})", "", "", "", "", "", "", "", "", f"{r['seconds']:.0f}"])
            continue
        lo, hi = r["test_agreement_ci95"]
        clo, chi = r["recall_change_ci95"]
        c, f = r["confirm"], r["fresh"]
        table.append([name, f"{r['recipe']} ({r['method']})", len(r["float_nodes"]),
                      f"{r['val_lower_bound']:.2%}" if r["val_lower_bound"] is not None else "-",
                      f"{c['disagreements']} of {c['samples']}" if c else "-",
                      f"{r['test_agreement']:.2%} [{lo:.2%}, {hi:.2%}]",
                      "miss (FP32)" if f is None else "{:.2%} [{:.2%}, {:.2%}] {}".format(
                          f["top1_agreement"], *f["agreement_ci95"], "ok" if f["wilson_lower_ge_99"] else "MISS"),
                      f"{r['recall_change']:+.2%} [{clo:+.2%}, {chi:+.2%}]",
                      f"{r['engine_int8_share']:.0%}" if r["engine_int8_share"] is not None else "-",
                      r["shipped"], f"{r['seconds']:.0f}"])
    print_table(["model", "recipe", "float nodes", "val lower bound", "confirmation differ", "held-out agreement [95 % CI]",
                 f"fresh agreement (seed {fresh_seed}) [95 % CI]",
                 "hsil recall change [95 % CI]", "Int8 share", "shipped", "seconds"], table)
    held = sum(bool(r.get("fresh") and r["fresh"]["wilson_lower_ge_99"]) for r in rows.values())
    print(f"fresh set: {held} of {len(rows)} models hold a Wilson lower bound >= 99 % (FP32 shipped counts as a miss)")
    write_json(args.json, {"rows": rows, "fresh_seed": fresh_seed, "fresh_held": held})
    return 0 if all("error" not in r and r["shipped"] == "INT8" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
