"""`import edge_pfm` (and every runtime module) must not drag in heavy dependencies."""
import os
import pkgutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import edge_pfm

HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "pycuda", "polygraphy", "onnxconverter_common",
         "model_signing", "cryptography", "sigstore",
         "export", "calibration")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys; {code}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_edge_pfm_is_lean():
    assert _imported_after("import edge_pfm") == []


def test_every_runtime_module_imports_lean():
    modules = [m.name for m in pkgutil.walk_packages(edge_pfm.__path__, "edge_pfm.") if not m.name.endswith("__main__")]
    assert len(modules) > 5
    code = "import importlib; " + "; ".join(f"importlib.import_module({m!r})" for m in modules)
    assert _imported_after(code) == []


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "edge_pfm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout


@pytest.mark.slow
def test_device_wheel_installs_into_a_bare_venv(tmp_path):
    """The documented Jetson route (docs/device/install.md): `pip wheel --no-deps .` on the build machine, copy, `pip install` on the device."""
    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(root)],
                   check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("edge_pfm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "edge_pfm/__init__.py" in names and "edge_pfm/engine/trt_build.py" in names
    assert not [n for n in names if n.startswith(("export/", "calibration/", "tests/"))]  # device code only
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True)
    # the device brings numpy and OpenCV (JetPack's); here they come from this environment's site-packages
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    probe = "import edge_pfm, sys; print(edge_pfm.__file__); print([m for m in ('torch', 'onnx') if m in sys.modules])"
    out = subprocess.run([str(py), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [str(next(venv.glob("lib/python*/site-packages/edge_pfm/__init__.py"))), "[]"]
    cli = subprocess.run([str(venv / "bin" / "edge-pfm"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert cli.returncode == 0 and "build" in cli.stdout
