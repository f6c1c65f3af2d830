"""The README as a landing page, the documentation site (docs/, Sphinx) built strict, and the pages' runnable
blocks run as written.

A block marked `<!-- runnable -->` runs in the order of the site's contents (the toctrees of docs/index.md),
page by page: the build machine's quickstart (train, export, calibrate, check into build/quickstart/), then
bring your own model (build/byo/), then the device's synthetic run on the quickstart bundle, then serve on it
(build/serve-try/, until 60 decisions, then SIGTERM: about 10 s more). They share those
folders, so they run in one test, in that order: about 5 minutes of the suite on a 2-core machine (307 s for
this file on a fresh clone, 2026-12-06).
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = re.compile(r"<!-- runnable -->\s*```bash\n(.*?)```", re.S)


def pages_in_contents_order() -> list[Path]:
    """The pages as the site's contents list them: each toctree of docs/index.md, in order."""
    index = (DOCS / "index.md").read_text()
    names = []
    for tree in re.findall(r"```\{toctree\}\n(.*?)```", index, re.S):
        names += [ln.strip() for ln in tree.splitlines() if ln.strip() and not ln.strip().startswith(":")]
    return [DOCS / f"{name}.md" for name in names]


def test_every_page_is_in_the_contents_and_every_listed_page_exists():
    listed = pages_in_contents_order()
    assert all(p.is_file() for p in listed), [p for p in listed if not p.is_file()]
    on_disk = {p for p in DOCS.rglob("*.md") if "_ext" not in p.parts} - {DOCS / "index.md"}
    assert on_disk == set(listed)


def test_the_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in ci and "make docs" in ci
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and [link for link in links if not (ROOT / link).exists()] == []


def test_every_option_of_every_command_says_what_it_does():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from generated_reference import cli_reference
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    for module in ("edge_pfm.cli", "export.__main__", "export.train_plan", "export.check", "export.sign",
                   "calibration.__main__"):
        rows = [ln for ln in cli_reference(module).splitlines() if ln.startswith("| `")]
        assert rows and [r for r in rows if r.rstrip().endswith("|  |")] == [], module


def test_the_site_builds_strict_without_torch(tmp_path):
    """What `make docs` and CI run (-W: any warning fails; -n: every reference must resolve), in a process where
    `import torch` fails: the command-line reference is generated from each command's parser, which must not
    need torch. Then the generated pages hold what the code says."""
    code = ("import sys; sys.modules['torch'] = None; from sphinx.cmd.build import main; "
            f"sys.exit(main(['-W', '--keep-going', '-n', '-q', '-b', 'html', {str(DOCS)!r}, {str(tmp_path)!r}]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    from edge_pfm.errors import ExitCode

    exit_codes = (tmp_path / "reference/exit-codes.html").read_text()
    for code in ExitCode:
        assert f"<td><p>{int(code)}</p></td>" in exit_codes and code.name in exit_codes, code
    cli = (tmp_path / "reference/cli.html").read_text()
    for command in ("edge-pfm run", "edge-pfm selftest", "python -m export", "python -m export.train",
                    "python -m export.check", "python -m export.sign", "python -m calibration", "edge-pfm verify"):
        assert f"usage: {command} [-h]" in cli, command
    assert "--agreement-data" in cli and "--check-preprocessing" in cli and "--qat-from" in cli


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The strictness is real: a page linking to a missing page fails the build and names both."""
    site_src = tmp_path / "docs"
    subprocess.run(["cp", "-r", str(DOCS), str(site_src)], check=True)
    (site_src / "troubleshooting.md").write_text((site_src / "troubleshooting.md").read_text()
                                                 + "\nSee [the missing page](no-such-page.md).\n")
    run = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
                          str(site_src), str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode != 0 and "no-such-page.md" in run.stderr and "troubleshooting.md" in run.stderr


@pytest.mark.slow
def test_the_pages_runnable_blocks_run_literally_in_contents_order():
    blocks = [(page, block) for page in pages_in_contents_order() for block in RUNNABLE.findall(page.read_text())]
    assert [p.name for p, _ in blocks] == ["build-machine.md", "bring-your-own.md", "bring-your-own.md", "run.md",
                                          "serve.md"]
    bindir = Path(sys.executable).parent  # the pages say .venv/bin/: the interpreter running these tests
    for page, block in blocks:
        script = block.replace(".venv/bin/", f"{bindir}/")
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"{page} block failed:\n{block}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    bundle = ROOT / "build/quickstart/bundle"
    # INT8 was either accepted, or refused by the gate with its report kept beside the bundle
    assert (bundle / "model.int8.onnx").is_file() or (ROOT / "build/quickstart/bundle.int8-rejected/accuracy.md").is_file()
    assert (ROOT / "build/quickstart/decisions.jsonl").stat().st_size > 0
    served = (ROOT / "build/serve-try/decisions.jsonl").read_text().splitlines()
    assert len(served) > 60  # the header and at least 60 decisions, closed whole by the SIGTERM
    assert all(line.endswith("}") for line in served)
    import json  # bring your own model: the example team model through --model

    byo = json.loads((ROOT / "build/byo/bundle/manifest.json").read_text())
    assert byo["model"]["source"] == "user-model" and byo["parity"]["passed"] is True
    # ... and their own plain export through --onnx, parity-checked against their PyTorch references
    onnx_door = json.loads((ROOT / "build/byo/bundle_onnx/manifest.json").read_text())
    assert onnx_door["parity"]["passed"] is True and "their.outputs.json" in onnx_door["parity"]["reference"]
