"""`import edge_pfm` (and every runtime module) must not drag in heavy dependencies."""
import pkgutil
import subprocess
import sys

import edge_pfm

HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "pycuda", "polygraphy", "export", "calibration")


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
