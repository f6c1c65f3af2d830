"""The README's runnable blocks (marked `<!-- runnable -->`) run, in order, exactly as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def runnable_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- runnable -->\s*```bash\n(.*?)```", text, re.S)


def test_readme_has_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci/run").read_text()


@pytest.mark.slow
def test_readme_quickstart_runs_literally(tmp_path):
    blocks = runnable_blocks()
    assert len(blocks) >= 3
    bindir = Path(sys.executable).parent  # the README says .venv/bin/: the interpreter running these tests
    for block in blocks:
        script = block.replace(".venv/bin/", f"{bindir}/")
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"README block failed:\n{block}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    bundle = ROOT / "build/quickstart/bundle"
    # INT8 was either accepted, or refused by the gate with its report kept beside the bundle
    assert (bundle / "model.int8.onnx").is_file() or (ROOT / "build/quickstart/bundle.int8-rejected/accuracy.md").is_file()
    assert (ROOT / "build/quickstart/decisions.jsonl").stat().st_size > 0
    import json  # bring your own model: the example team model through --model
    byo = json.loads((ROOT / "build/byo/bundle/manifest.json").read_text())
    assert byo["model"]["source"] == "user-model" and byo["parity"]["passed"] is True
    # ... and their own plain export through --onnx, parity-checked against their PyTorch references
    onnx_door = json.loads((ROOT / "build/byo/bundle_onnx/manifest.json").read_text())
    assert onnx_door["parity"]["passed"] is True and "their.outputs.json" in onnx_door["parity"]["reference"]
