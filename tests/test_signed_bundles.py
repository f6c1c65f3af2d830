"""Signed bundles, end to end through the real commands: `python -m export.sign` (OpenSSF model-signing, key mode,
a throwaway P-256 key made per run) on the build machine; `edge-pfm verify` and `edge-pfm run` on the device, with
the public key trusted in device.toml's [security]. Signing and verifying run with sockets blocked (key mode is
offline). Each tampering is refused with exit 2 and its reason; the untampered bundle runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, copy_bundle

from edge_pfm.bundle import Bundle, write_manifest
from edge_pfm.errors import ExitCode
from edge_pfm.trust import Trust
from edge_pfm.trust.signature import SIGNATURE_FILE

# a process where every socket operation raises: signing and verifying must not touch the network
OFFLINE = ("import socket\n"
           "def _blocked(*a, **k):\n"
           "    raise OSError('network access blocked in this test')\n"
           "socket.socket.connect = socket.socket.connect_ex = socket.socket.sendto = _blocked\n"
           "socket.create_connection = socket.getaddrinfo = _blocked\n")


def offline(module: str, *args: str, block: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` with sockets blocked (and `block`: modules made unimportable)."""
    blocked = "".join(f"sys.modules[{m!r}] = None\n" for m in block.split()) if block else ""
    code = (f"import runpy, sys\n{OFFLINE}{blocked}sys.argv = [{module!r}, *{list(args)!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two throwaway key pairs (the signer's and another's) and a device config that trusts the signer only."""
    d = tmp_path_factory.mktemp("keys")
    for who in ("signer", "stranger"):
        r = offline("export.sign", "--new-key", str(d / who))
        assert r.returncode == 0, r.stderr
    trusted = d / "trusted"
    trusted.mkdir()
    shutil.copy(d / "signer/signing_key.pub", trusted / "signer.pub")
    config = d / "device.toml"
    config.write_text(f'[security]\ntrusted_keys = "{trusted}"\nstate_dir = "{d / "state"}"\n')
    return {"private": d / "signer/signing_key.pem", "stranger": d / "stranger/signing_key.pem",
            "trusted": trusted, "config": config, "state": d / "state"}


def signed_copy(src: Path, dst: Path, key: Path, version: int) -> Path:
    b = copy_bundle(src, dst)
    write_manifest(b, {**Bundle.load(b).manifest, "bundle_version": version}, {})
    r = offline("export.sign", "--bundle", str(b), "--key", str(key))
    assert r.returncode == 0 and f"bundle version {version}" in r.stdout, r.stderr
    return b


@pytest.fixture(scope="module")
def signed(calibrated_bundle, keys, tmp_path_factory) -> Path:
    return signed_copy(calibrated_bundle, tmp_path_factory.mktemp("signed") / "b", keys["private"], 20261206)


def verify(bundle: Path, config: Path, **kw) -> subprocess.CompletedProcess:
    return offline("edge_pfm", "verify", "--bundle", str(bundle), "--config", str(config), **kw)


def test_the_private_key_is_owner_only_and_the_signed_bundle_verifies(signed, keys):
    assert keys["private"].stat().st_mode & 0o777 == 0o600
    r = verify(signed, keys["config"])
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "bundle version 20261206" in r.stdout
    assert not any(p.name.endswith(".pem") for p in signed.rglob("*"))  # no private key travels with a bundle


def test_the_untampered_signed_bundle_runs_and_its_log_says_who_signed_it(signed, keys, tmp_path):
    log = tmp_path / "decisions.jsonl"
    r = offline("edge_pfm", "run", "--bundle", str(signed), "--config", str(keys["config"]), "--backend",
                "onnxruntime", "--white", "synthetic", "--fluo", "synthetic", "--seconds", "2", "--log", str(log))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "signed by key" in r.stderr and ": verified" in r.stderr
    header = json.loads(log.read_text().splitlines()[0])
    assert header["signature"]["verified"] is True and header["signature"]["bundle_version"] == 20261206
    assert len(header["signature"]["key_id"]) == 64


def _flip_model_byte(b: Path) -> None:
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "model.onnx").write_bytes(bytes(data))


def _rewrite_manifest(b: Path) -> None:
    """What an attacker who can write the directory does: change the model, recompute every sha256."""
    _flip_model_byte(b)
    write_manifest(b, json.loads((b / "manifest.json").read_text()), {"model.onnx": "fp32 onnx"})


def _add_file(b: Path) -> None:
    (b / "extra.onnx").write_bytes(b"planted")


def _delete_file(b: Path) -> None:
    (b / "report.md").unlink()


def _symlink(b: Path) -> None:
    (b / "report.md").unlink()
    (b / "report.md").symlink_to(ROOT / "README.md")


@pytest.mark.parametrize("tamper, says", [
    (_flip_model_byte, "model.onnx: changed after signing"),
    (_rewrite_manifest, "manifest.json: changed after signing"),
    (_add_file, "extra.onnx: a file the signature does not cover"),
    (_delete_file, "report.md: signed but missing"),
    (_symlink, "report.md is a symlink"),
])
def test_tampering_is_refused_with_its_reason(signed, keys, tmp_path, tamper, says):
    b = copy_bundle(signed, tmp_path / "b")
    tamper(b)
    r = verify(b, keys["config"])
    assert r.returncode == ExitCode.BAD_INPUT and says in error_line(r), r.stderr[-2000:]
    # model-signing itself (the build machine's library) agrees that the tampered bundle does not verify
    import model_signing

    with pytest.raises(ValueError):
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["trusted"] / "signer.pub") \
            .verify(b, b / SIGNATURE_FILE)


def test_model_signing_verifies_what_export_sign_wrote(signed, keys):
    import model_signing

    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["trusted"] / "signer.pub") \
        .verify(signed, signed / SIGNATURE_FILE)


def test_a_bundle_signed_by_an_untrusted_key_is_refused(calibrated_bundle, keys, tmp_path):
    b = signed_copy(calibrated_bundle, tmp_path / "b", keys["stranger"], 20261206)
    r = verify(b, keys["config"])
    assert r.returncode == ExitCode.BAD_INPUT and "which this device does not trust" in error_line(r)


def test_an_unsigned_bundle_is_refused_once_a_key_is_trusted_and_runs_unverified_without(calibrated_bundle, keys,
                                                                                          tmp_path):
    r = verify(calibrated_bundle, keys["config"])
    assert r.returncode == ExitCode.BAD_INPUT and "is unsigned" in error_line(r)
    no_keys = tmp_path / "device.toml"
    no_keys.write_text(f'[security]\ntrusted_keys = "{tmp_path / "none"}"\nstate_dir = "{tmp_path / "state"}"\n')
    r = offline("edge_pfm", "info", "--bundle", str(calibrated_bundle), "--config", str(no_keys))
    assert r.returncode == 0 and "unsigned" in r.stdout and "not verified" in r.stdout, r.stdout + r.stderr


def test_an_older_signed_bundle_after_a_newer_one_is_refused(calibrated_bundle, keys, tmp_path):
    state = tmp_path / "state"  # this test's own floor
    config = tmp_path / "device.toml"
    config.write_text(f'[security]\ntrusted_keys = "{keys["trusted"]}"\nstate_dir = "{state}"\n')
    old = signed_copy(calibrated_bundle, tmp_path / "v5", keys["private"], 5)
    new = signed_copy(calibrated_bundle, tmp_path / "v7", keys["private"], 7)
    assert verify(old, config).returncode == 0  # nothing has run yet: the floor is 0
    r = offline("edge_pfm", "run", "--bundle", str(new), "--config", str(config), "--backend", "onnxruntime",
                "--white", "synthetic", "--fluo", "synthetic", "--seconds", "1")
    assert r.returncode == 0 and "rollback floor raised to bundle version 7" in r.stderr, r.stderr[-2000:]
    r = verify(old, config)
    assert r.returncode == ExitCode.BAD_INPUT and "bundle version 5 is older than version 7" in error_line(r)
    assert verify(new, config).returncode == 0


def test_a_configured_key_without_the_verifying_library_fails_closed(signed, keys):
    r = verify(signed, keys["config"], block="cryptography")
    assert r.returncode == ExitCode.BAD_INPUT
    assert "cannot be verified here" in error_line(r) and "pip install cryptography" in error_line(r)


def test_the_backend_loads_the_verified_bytes_not_a_file_changed_after_loading(signed, keys, tmp_path):
    """What runs is what was verified: a model.onnx swapped between the verification and the backend's load is
    refused, not run."""
    from edge_pfm.classifier import Classifier

    b = copy_bundle(signed, tmp_path / "b")
    trust = Trust.from_config({"security": {"trusted_keys": str(keys["trusted"]),
                                            "state_dir": str(tmp_path / "state")}})
    bundle = Bundle.load(b, trust=trust)
    assert bundle.signature.verified
    _flip_model_byte(b)
    with pytest.raises(Exception, match="changed after the bundle was loaded"):
        Classifier(bundle, backend="onnxruntime", cache_dir=tmp_path / "cache")


def test_calibration_voids_the_signature_and_says_so(signed, tmp_path):
    b = copy_bundle(signed, tmp_path / "b")
    r = subprocess.run([sys.executable, "-m", "calibration", "--bundle", str(b), "--synthetic", "32", "--val-synthetic",
                        "0", "--eval-synthetic", "64", "--resolution", "320x240", "--allow-degraded"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "calibration rewrites the bundle, which voids its signature" in r.stdout + r.stderr
    assert not (b / SIGNATURE_FILE).exists()


def test_new_key_refuses_a_bundle_or_a_tracked_folder(signed, tmp_path):
    r = offline("export.sign", "--new-key", str(signed / "keys"))
    assert r.returncode == ExitCode.BAD_INPUT and "inside the bundle" in error_line(r)
    r = offline("export.sign", "--new-key", str(ROOT / "edge_pfm" / "keys"))
    assert r.returncode == ExitCode.BAD_INPUT and "never be committed" in error_line(r)
    assert not (ROOT / "edge_pfm" / "keys").exists()
