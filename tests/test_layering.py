"""The package arrows, read from the source's imports: calibration -> export -> edge_pfm, the shared leaf
(evaluation) under both build packages, the demo on top; and calibration runs where torch cannot import."""
import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, copy_bundle

PACKAGES = ("edge_pfm", "export", "calibration", "evaluation", "demo")
# what each package may import from the others (the device runtime imports none of them)
ALLOWED = {
    "edge_pfm": set(),
    "evaluation": {"edge_pfm"},
    "export": {"edge_pfm", "evaluation"},
    "calibration": {"edge_pfm", "evaluation", "export"},
    "demo": {"edge_pfm", "evaluation", "export", "calibration"},
}
HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "pycuda", "polygraphy", "onnxconverter_common")


def imports(path: Path) -> set[str]:
    """Every module an ast Import/ImportFrom in the file names (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def module_imports() -> dict[str, set[str]]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): imports(p)
            for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def test_inside_the_device_package_the_rooms_point_down():
    """sources know nothing of the runtime; the simulated cameras and faults (test doubles) are reached only from
    the bench, the selftest, the `synthetic` URI and each other, never from a clinical path."""
    mods = module_imports()
    wrong = [f"{m} imports {d}" for m, deps in mods.items() if m.startswith("edge_pfm.sources") for d in deps
             if d.startswith(("edge_pfm.runtime", "edge_pfm.classifier", "edge_pfm.backends", "edge_pfm.decision"))]
    doubles_users = {"edge_pfm.bench", "edge_pfm.selftest", "edge_pfm.cli", "edge_pfm.sources.factory"}
    wrong += [f"{m} imports {d}" for m, deps in mods.items() for d in deps
              if d.startswith("edge_pfm.sources.simulated") and not m.startswith("edge_pfm.sources.simulated")
              and m.startswith("edge_pfm") and m not in doubles_users]
    assert not wrong, wrong


def test_the_arrows_point_one_way():
    wrong = [f"{mod} imports {dep}" for mod, deps in module_imports().items() for dep in deps
             if (top := dep.split(".")[0]) in PACKAGES and top != mod.split(".")[0]
             and top not in ALLOWED[mod.split(".")[0]]]
    assert not wrong, wrong


def test_the_leaf_and_the_device_import_nothing_heavy():
    """evaluation is numpy only; edge_pfm imports no torch or onnx tooling (onnxruntime and TensorRT only in
    their backends and the engine builder, lazily)."""
    lazy_ok = {"edge_pfm.backends.onnxruntime_backend": {"onnxruntime"}, "edge_pfm.engine.trt_build": {"tensorrt"},
               "edge_pfm.backends.tensorrt_backend": {"tensorrt", "pycuda"}, "edge_pfm.backends.select": {"pycuda"}}
    wrong = []
    for mod, deps in module_imports().items():
        if mod.split(".")[0] not in ("edge_pfm", "evaluation"):
            continue
        heavy = {d.split(".")[0] for d in deps} & set(HEAVY)
        if heavy - lazy_ok.get(mod, set()):
            wrong.append(f"{mod} imports {sorted(heavy)}")
    assert not wrong, wrong


def test_what_calibration_takes_from_export_imports_no_torch():
    mods = module_imports()
    seen, todo = set(), [d for m, deps in mods.items() if m.startswith("calibration") for d in deps
                         if d.startswith("export")]
    while todo:  # every export module calibration reaches, transitively
        m = todo.pop()
        if m in seen or m not in mods:
            continue
        seen.add(m)
        todo += [d for d in mods[m] if d.startswith("export")]
    with_torch = sorted(m for m in seen if any(d.split(".")[0] == "torch" for d in mods[m]))
    assert seen and not with_torch, with_torch


def _calibrate(bundle: Path, block_torch: bool) -> subprocess.CompletedProcess:
    # 600 val pairs (and 600 rendered for confirmation): the margin is a real one at >= 545, and cheap
    args = ["--bundle", str(bundle), "--synthetic", "32", "--val-synthetic", "600", "--eval-synthetic", "64",
            "--resolution", "320x240", "--allow-degraded"]
    block = "sys.modules['torch'] = None; " if block_torch else ""  # `import torch` now raises ImportError
    code = (f"import runpy, sys; {block}sys.argv = ['calibration', *{args!r}]; "
            "runpy.run_module('calibration', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_calibration_runs_where_torch_cannot_be_imported(tiny_bundle, tmp_path):
    """A build step without PyTorch: the same artifacts and the same report as with it."""
    with_torch, without = copy_bundle(tiny_bundle, tmp_path / "a"), copy_bundle(tiny_bundle, tmp_path / "b")
    ok = _calibrate(with_torch, block_torch=False)
    blocked = _calibrate(without, block_torch=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    for name in ("model.int8.onnx", "model.fp16.onnx", "calibration.cache", "calibration.json"):
        assert (with_torch / name).read_bytes() == (without / name).read_bytes(), name
    a, b = (json.loads((d / "accuracy.json").read_text()) for d in (with_torch, without))
    assert a == b
