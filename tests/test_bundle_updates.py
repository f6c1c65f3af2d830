"""Bundle updates on a serving device: the store, `edge-pfm update`, serve's inbox, the switch at a pair boundary,
health, commit and rollback, with signed bundles (throwaway keys) and real processes. Refusals leave serving alone;
SIGKILL at any step leaves `current` on a complete, verified bundle."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, copy_bundle
from test_serve import NotifySocket, Serve, metric

from edge_pfm.store.stage import UnsafeBundleSource, stage
from edge_pfm.store.store import BundleStore

BASE, WEIGHTS, SHAPE, NONFINITE = 100, 101, 102, 104


def _sign(bundle: Path, key: Path) -> None:
    from export.sign import sign_bundle

    sign_bundle(bundle, key, log=lambda *_: None)


@pytest.fixture(scope="module")
def signed(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Signed bundles from the session checkpoint: the base, other weights, another input size and class list, a
    model that fails its reference check, one signed by an untrusted key, a tampered one, and the device config."""
    import dataclasses

    import torch

    from edge_pfm.bundle import write_manifest
    from edge_pfm.roles import ClassRoles
    from export.bundle_export import export_bundle
    from export.checkpoint import load_checkpoint, save_checkpoint
    from export.model import PFM, PFMConfig
    from export.sign import new_key

    d = tmp_path_factory.mktemp("updates")
    private, public = new_key(d / "signer_key")
    stranger, _ = new_key(d / "stranger_key")
    b = {}
    export_bundle(tiny_checkpoint, d / "base", bundle_version=BASE)
    model, meta = load_checkpoint(tiny_checkpoint)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * (p.abs().mean() + 1e-3))
    save_checkpoint(d / "weights.pt", model, meta["variant"], tuple(meta["classes"]), meta["preprocessing"])
    export_bundle(d / "weights.pt", d / "weights", bundle_version=WEIGHTS)
    cfg = PFMConfig(**{**model.cfg.to_dict(), "img_size": 160, "depths": tuple(model.cfg.depths)})
    torch.manual_seed(3)
    shaped = PFM(cfg).eval()
    classes = ("normal", "inflammation", "low_grade", "high_grade")
    save_checkpoint(d / "shape.pt", shaped, meta["variant"], classes,
                    {m: dataclasses.replace(s, size=(160, 160)) for m, s in meta["preprocessing"].items()},
                    roles=ClassRoles("normal", ("low_grade", "high_grade"), ("high_grade",)))
    export_bundle(d / "shape.pt", d / "shape", bundle_version=SHAPE)
    for name in ("base", "weights", "shape"):
        _sign(d / name, private)
        b[name] = d / name
    # the weights' references with the base's model: the signature holds, the device's check refuses it
    bad = copy_bundle(d / "weights", d / "bad_check")
    shutil.copy(d / "base" / "model.onnx", bad / "model.onnx")
    manifest = json.loads((bad / "manifest.json").read_text())
    role = manifest["artifacts"]["model.onnx"]["role"]
    write_manifest(bad, {**manifest, "bundle_version": 103}, {"model.onnx": role})
    _sign(bad, private)
    b["bad_check"] = bad
    nonfinite = copy_bundle(d / "weights", d / "nonfinite")
    manifest = json.loads((nonfinite / "manifest.json").read_text())
    write_manifest(nonfinite, {**manifest, "bundle_version": NONFINITE}, {})
    _sign(nonfinite, private)
    b["nonfinite"] = nonfinite
    b["stranger"] = copy_bundle(d / "shape", d / "stranger")
    _sign(b["stranger"], stranger)
    b["tampered"] = copy_bundle(d / "shape", d / "tampered")
    data = bytearray((b["tampered"] / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b["tampered"] / "model.onnx").write_bytes(bytes(data))
    (d / "trusted").mkdir()
    shutil.copy(public, d / "trusted" / "signer.pub")
    b["trusted"] = d / "trusted"
    return b


def write_device(tmp_path: Path, signed: dict[str, Path], health_pairs: int = 30, keep: int = 3) -> Path:
    cam = "synthetic:fps=15,width=320,height=240"
    cfg = tmp_path / "device.toml"
    cfg.write_text("\n".join([
        "[run]", 'log = "decisions.jsonl"', f'cache_dir = "{tmp_path / "cache"}"', 'backend = "onnxruntime"',
        "[cameras.white_light]", f'source = "{cam}"', "[cameras.fluorescence]", f'source = "{cam}"',
        "[serve]", 'health = "127.0.0.1:0"',
        "[bundles]", 'store = "store"', f"health_pairs = {health_pairs}", f"keep = {keep}",
        "[security]", f'trusted_keys = "{signed["trusted"]}"', 'state_dir = "state"']) + "\n")
    return cfg


def update(cfg: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, str(ROOT / "benchmarks" / "serve_faults.py"), "--kill-at", kill_at, "--"] if kill_at
           else [sys.executable, "-m", "edge_pfm"])
    return subprocess.run([*cmd, "update", *args, "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def wait_until(condition, timeout: float, what: str, serve: Serve | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if serve is not None and serve.proc.poll() is not None:
            raise AssertionError(f"serve exited {serve.proc.returncode} while waiting for {what}:\n{serve.output}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{serve.output[-4000:]}" if serve else ""))


def log_records(path: Path) -> tuple[list[dict], list[int]]:
    """(decisions, the line index of each run header after the first)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    headers = [i for i, r in enumerate(lines) if r.get("type") == "run_header"]
    return [r for r in lines if r.get("type") != "run_header"], headers


def test_updates_switch_without_losing_a_decision_and_refusals_never_stop_serving(signed, tmp_path):
    cfg = write_device(tmp_path, signed, keep=2)
    store = BundleStore(tmp_path / "store")
    r = update(cfg, str(signed["base"]))
    assert r.returncode == 0, r.stderr
    notify = NotifySocket(tmp_path / "notify.sock")
    serve = Serve(cfg, notify, faults=["--nonfinite-version", str(NONFINITE)])
    try:
        notify.wait_for("READY", 90, serve.proc)
        wait_until(lambda: store.pending() is None, 60, "the first version's commit", serve)
        # other weights, through the command, while serving
        r = update(cfg, str(signed["weights"]))
        assert r.returncode == 0, r.stderr
        wait_until(lambda: store.pending() is None and store.link("current").name.startswith(f"{WEIGHTS}-"), 60,
                   "the other weights committed", serve)
        assert store.link("previous").name.startswith(f"{BASE}-")
        # another input size and class list, through the inbox (a tar), while serving
        with tarfile.open(store.inbox / "shape.tar", "w") as tar:
            tar.add(signed["shape"], arcname="shape")
        (store.inbox / "shape.tar.complete").touch()
        wait_until(lambda: store.pending() is None and store.link("current").name.startswith(f"{SHAPE}-"), 90,
                   "the new shape committed", serve)
        assert [v.bundle_version for v in store.list()] == [WEIGHTS, SHAPE]  # keep = 2: the base was removed
        # refusals: serving goes on, current stays, the reason is in the service log and the metrics
        for name in ("stranger", "tampered", "bad_check"):
            shutil.copytree(signed[name], store.inbox / name)
            (store.inbox / f"{name}.complete").touch()
        r = update(cfg, str(signed["base"]))  # older than the committed version 102
        assert r.returncode == 2 and "older than version" in r.stderr, r.stderr
        wait_until(lambda: not list(store.inbox.iterdir()), 90, "the inbox emptied", serve)
        assert store.link("current").name.startswith(f"{SHAPE}-")
        text = serve.get("/metrics")[1]
        assert metric(text, "edge_pfm_bundle_updates_total", result="refused") == 3, text
        assert metric(text, "edge_pfm_bundle_updates_total", result="refused", step="check") == 1
        out = serve.output
        assert "which this device does not trust" in out, out[-3000:]
        assert "REFUSED" in out and out.count("update from the inbox refused") == 3
        reports = [json.loads(p.read_text()) for p in store.failed.glob("*/report.json")]
        assert len(reports) == 4 and all(rep.get("refused") for rep in reports)  # the command's refusal too
        # a model whose outputs turn non-finite after its switch: rolled back to the last good version
        decided = serve.get("/metrics")[1]
        r = update(cfg, str(signed["nonfinite"]))
        assert r.returncode == 0, r.stderr
        wait_until(lambda: store.pending() is None and store.link("current").name.startswith(f"{SHAPE}-"), 90,
                   "the rollback", serve)
        wait_until(lambda: "rolled_back" in serve.get("/metrics")[1], 10, "the rollback in the metrics", serve)
        assert any("rolled_back" in json.loads(p.read_text()) for p in store.failed.glob("*/report.json"))
        time.sleep(2)
        assert metric(serve.get("/metrics")[1], "edge_pfm_pairs_decided_total") > metric(
            decided, "edge_pfm_pairs_decided_total")  # serving never stopped
        assert serve.stop() == 0, serve.output
    finally:
        serve.kill()
        notify.close()
    for line in serve.output.splitlines():  # the load-and-check and check-to-switch times, for the closing note
        if line.startswith("update: running"):
            print(line)
    decisions, headers = log_records(tmp_path / "decisions.jsonl")
    assert [d["n"] for d in decisions] == list(range(1, len(decisions) + 1))  # 0 decisions lost
    lines = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    versions = [h["bundle"].rsplit("/", 1)[-1].split("-")[0] for h in lines if h.get("type") == "run_header"]
    assert versions == [str(v) for v in (BASE, WEIGHTS, SHAPE, NONFINITE, SHAPE)], versions
    gaps = [(lines[i + 1]["t_ns"] - lines[i - 1]["t_ns"]) / 1e6 for i in headers[1:]]
    # the 160-px model with its own classes decided what followed its header: a pair prepared at 128 px reaching it
    # would have raised (an inference error), and the health check would have rolled it back instead of committing
    shape_start = [i for i, h in enumerate(lines) if h.get("type") == "run_header"][versions.index(str(SHAPE))]
    after_shape = [r for r in lines[shape_start + 1:shape_start + 40] if r.get("type") != "run_header"]
    assert {r["raw_class"] for r in after_shape if r.get("raw_class")} <= {"normal", "inflammation", "low_grade",
                                                                          "high_grade"}
    assert any(r.get("raw_class") for r in after_shape)
    print(f"decision gaps at the switches (ms): {[round(g) for g in gaps]}")
    assert max(gaps) < 1000, gaps


def test_sigkill_at_each_step_leaves_current_whole_and_serving_resumes(signed, tmp_path):
    cfg = write_device(tmp_path, signed, health_pairs=20)
    store = BundleStore(tmp_path / "store")
    assert update(cfg, str(signed["base"])).returncode == 0
    base = store.link("current")
    notify = NotifySocket(tmp_path / "notify.sock")
    serve = Serve(cfg, notify)  # the first version is judged and committed: then it is the last good one
    try:
        notify.wait_for("READY", 90, serve.proc)
        wait_until(lambda: store.pending() is None, 60, "the base committed", serve)
        assert serve.stop() == 0
    finally:
        serve.kill()
    for step in ("stage", "check", "install", "switch"):
        r = update(cfg, str(signed["weights"]), kill_at=step)
        assert r.returncode == -signal.SIGKILL, (step, r.returncode, r.stderr[-2000:])
        assert store.link("current") == base, step  # still the complete, verified base
        assert (base / "manifest.json").is_file()
    assert list(store.staging.iterdir())  # a killed update left its staging copy behind...
    # the health step: killed while serve judges the new version; after a restart it is judged again
    assert update(cfg, str(signed["weights"])).returncode == 0
    serve = Serve(cfg, notify, faults=["--kill-at", "commit"])
    try:
        notify.wait_for("READY", 90, serve.proc)
        assert serve.proc.wait(60) == -signal.SIGKILL  # killed as the commit began
    finally:
        serve.kill()
    assert store.pending() is not None and store.link("current").name.startswith(f"{WEIGHTS}-")
    serve = Serve(cfg, notify)
    try:
        notify.wait_for("READY", 90, serve.proc)
        wait_until(lambda: store.pending() is None, 60, "the commit after the restart", serve)
        assert not list(store.staging.iterdir())  # ...which the restart cleaned up
        assert store.link("current").name.startswith(f"{WEIGHTS}-") and store.link("previous") == base
        assert "judging its health again" in serve.output
        assert serve.stop() == 0
    finally:
        serve.kill()
        notify.close()
    info = subprocess.run([sys.executable, "-m", "edge_pfm", "info", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120).stdout
    assert f"{base.name} (version {BASE})  <- previous" in info and "<- current" in info, info
    # and --rollback goes back to previous
    r = update(cfg, "--rollback")
    assert r.returncode == 0 and store.link("current") == base, r.stderr


def test_the_engine_cache_keeps_only_what_kept_bundles_use(tmp_path):
    from edge_pfm.engine.cache import evict_engines

    for stem, sha in (("pfm.fp16.a", "kept"), ("pfm.int8.b", "gone")):
        (tmp_path / f"{stem}.engine").write_bytes(b"engine bytes")
        (tmp_path / f"{stem}.json").write_text(json.dumps({"key": {"onnx_sha256": sha}, "built_from": {"m": sha}}))
    removed = evict_engines(tmp_path, {"kept"})
    assert sorted(p.name for p in removed) == ["pfm.int8.b.engine", "pfm.int8.b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pfm.fp16.a.engine", "pfm.fp16.a.json"]


@pytest.mark.parametrize("member", ["../evil", "/etc/evil", "link", "device"])
def test_a_tar_with_a_path_out_a_link_or_a_device_is_refused(member, tmp_path):
    tar_path = tmp_path / "b.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("bundle/manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        info = tarfile.TarInfo(member if member.startswith(("..", "/")) else f"bundle/{member}")
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif member == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        else:
            info.size = 1
        tar.addfile(info, io.BytesIO(b"x") if info.isfile() else None)
    dest = tmp_path / "staged"
    dest.mkdir()
    with pytest.raises(UnsafeBundleSource):
        stage(tar_path, dest)
    assert not (tmp_path / "evil").exists()
