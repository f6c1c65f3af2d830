"""Shared fixtures: real models, real files. Expensive artifacts are built once per session."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# engines, check records and precision picks go to a cache of this session's own (children inherit it), never the
# user's ~/.cache: before anything imports edge_pfm, which reads it once
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="edge-pfm-test-cache-")
# likewise the device's state (the engine cache's secret, the rollback floor): a device config of this session's own,
# trusting no key, is what every command finds (edge_pfm.config.find_config) unless a test gives --config
_DEVICE = Path(tempfile.mkdtemp(prefix="edge-pfm-test-device-"))
(_DEVICE / "device.toml").write_text(f'[security]\ntrusted_keys = "{_DEVICE / "trusted_keys"}"\n'
                                     f'state_dir = "{_DEVICE / "state"}"\n')
os.environ["EDGE_PFM_CONFIG"] = str(_DEVICE / "device.toml")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A pfm_tiny trained briefly on synthetic pairs (480 x 6 epochs: 0.5-0.65 val accuracy, far from chance)."""
    from export.train import TrainPlan, train_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "pfm_tiny.pt"
    train_checkpoint(out, TrainPlan(synthetic=480, epochs=6, resolution=(256, 192), progress=False))
    assert out.is_file()
    return out


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """A bundle exported from the session checkpoint through the real export path."""
    from export.bundle_export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_checkpoint, out)
    return out


def import_example(name: str):
    """examples/<name>.py imported as a module (examples/ is a folder of scripts, not a package)."""
    import importlib

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def calibrated_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The session bundle, calibrated through the real CLI (small data: fast, gate not enforced). 256 held-out
    pairs (128 with a lesion of lsil/hsil) measure its lesion map above the floors, so the runtime shows it."""
    from calibration.calibrate import CalibrationPlan, calibrate

    b = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("calibrated") / "b")
    calibrate(b, CalibrationPlan(synthetic=64, eval_synthetic=256, val_synthetic=0, resolution=(320, 240),
                                 allow_degraded=True))
    return b
