"""What verifying a signed bundle adds at load: `Bundle.load` + reading the model's bytes for the backend, unsigned
(no trusted key: the manifest's sha256s checked) against signed (a trusted key: the signature and every file
checked), for a bundle as it is and for the same bundle grown to about 100 MB by a 100 MB artifact.

    python benchmarks/verify_load.py [--bundle build/demo/bundle] [--runs 7] [--json build/verify_load.json]

Each load runs in a fresh process (the cost a `run` or `serve` start pays, the first import of `cryptography`
included), one at a time; the table gives the median and the spread of the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import print_table, write_json  # noqa: E402

PROBE = """
import json, sys, time
t0 = time.perf_counter()
from edge_pfm.bundle import Bundle
from edge_pfm.trust import Trust
t1 = time.perf_counter()
b = Bundle.load(sys.argv[1], trust=Trust(trusted_keys=__import__('pathlib').Path(sys.argv[2]),
                                         state_dir=__import__('pathlib').Path(sys.argv[3]), state_dir_configured=True))
model = b.read_artifact("model.onnx")
t2 = time.perf_counter()
print(json.dumps({"load_ms": (t2 - t1) * 1000, "import_ms": (t1 - t0) * 1000, "verified": b.signature.verified}))
"""


def prepare(src: Path, work: Path, pad_mb: int) -> tuple[Path, Path]:
    """A signed copy of `src` (with `pad_mb` MB of extra artifact when > 0) and the directory trusting its key."""
    from edge_pfm.bundle import Bundle, write_manifest
    from export.sign import new_key, sign_bundle

    b = work / f"bundle_{pad_mb}mb"
    shutil.copytree(src, b)
    manifest = Bundle.load(b).manifest
    roles = {}
    if pad_mb:
        (b / "padding.bin").write_bytes(os.urandom(pad_mb * 1024 * 1024))
        roles["padding.bin"] = "benchmark padding"
    write_manifest(b, {**manifest, "bundle_version": manifest.get("bundle_version") or 1}, roles)
    keys = work / "keys"
    if not keys.exists():
        new_key(keys)
        (work / "trusted").mkdir()
        shutil.copy(keys / "signing_key.pub", work / "trusted" / "signer.pub")
    sign_bundle(b, keys / "signing_key.pem", log=lambda m: None)
    return b, work / "trusted"


def time_loads(bundle: Path, trusted: Path, state: Path, runs: int) -> list[dict]:
    out = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", PROBE, str(bundle), str(trusted), str(state)], cwd=ROOT,
                           capture_output=True, text=True, check=True)
        out.append(json.loads(r.stdout))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="build/demo/bundle")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--pad-mb", type=int, default=100)
    ap.add_argument("--json", default="build/verify_load.json")
    args = ap.parse_args()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for pad in (0, args.pad_mb):
            bundle, trusted = prepare(Path(args.bundle), work, pad)
            size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
            unsigned = time_loads(bundle, work / "no_keys", work / "state", args.runs)
            signed = time_loads(bundle, trusted, work / "state", args.runs)
            assert all(s["verified"] for s in signed) and not any(u["verified"] for u in unsigned)
            u = statistics.median(x["load_ms"] for x in unsigned)
            s = statistics.median(x["load_ms"] for x in signed)
            results[f"{size_mb:.1f}MB"] = {"unsigned_ms": [x["load_ms"] for x in unsigned],
                                          "signed_ms": [x["load_ms"] for x in signed]}
            rows.append([f"{size_mb:.1f} MB ({len(list(bundle.rglob('*')))} files)", f"{u:.1f}",
                         f"{min(x['load_ms'] for x in unsigned):.1f}-{max(x['load_ms'] for x in unsigned):.1f}",
                         f"{s:.1f}", f"{min(x['load_ms'] for x in signed):.1f}-{max(x['load_ms'] for x in signed):.1f}",
                         f"{s - u:+.1f}"])
    print_table(["bundle", "unsigned ms", "range", "signed ms", "range", "verification adds ms"], rows)
    write_json(args.json, {"runs": args.runs, "results": results, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
