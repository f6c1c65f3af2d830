"""The systemd unit for `edge-pfm serve`: the template shipped as package data (edge-pfm.service), with this
installation's command and config filled in.

    print(render_unit())                                   # this environment's edge-pfm, /etc/edge-pfm/device.toml
    render_unit("/opt/edge-pfm/venv/bin/edge-pfm", "/etc/edge-pfm/clinic.toml")

Paths must be absolute and plain: a unit file gives whitespace, quotes and backslashes meanings of their own, so
those are refused; '%' (a specifier) and '$' (a variable) are escaped as '%%' and '$$', which systemd reads back as
the character itself.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from importlib import resources
from pathlib import Path

from edge_pfm.errors import InvalidArgument

TEMPLATE = "edge-pfm.service"
DEFAULT_CONFIG = "/etc/edge-pfm/device.toml"
SCRIPT = "edge-pfm"
PLACEHOLDERS = ("@EXEC@", "@CONFIG@")

# whitespace splits words, quotes and backslashes are unquoting syntax (systemd.syntax(7)), control characters and
# DEL have no business in a path
_REFUSED = re.compile(r"[\s\"'\\\x00-\x1f\x7f]")


def template_text() -> str:
    """The unit template as shipped, placeholders and all."""
    return resources.files("edge_pfm.service").joinpath(TEMPLATE).read_text(encoding="utf-8")


def default_command() -> list[str]:
    """The command that starts edge-pfm in this environment: the `edge-pfm` script beside this interpreter (the
    console script of the same environment, even when that environment's bin/ is not on $PATH, as under sudo), else
    the one on $PATH, else this interpreter with `-m edge_pfm`. Symlinks are kept: a venv's python is a symlink,
    and resolving it would leave the venv."""
    beside = Path(sys.executable).parent / SCRIPT
    if sys.executable and os.access(beside, os.X_OK) and beside.is_file():
        return [os.path.abspath(beside)]
    found = shutil.which(SCRIPT)
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "edge_pfm"]


def unit_path_word(path: str, what: str) -> str:
    """`path` as one word of a unit file's command line: absolute, plain, '%' and '$' escaped; else InvalidArgument."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise InvalidArgument(f"the service unit's {what} must be an absolute path, got {text!r}")
    bad = _REFUSED.search(text)
    if bad:
        raise InvalidArgument(f"the service unit's {what} {text!r} contains {bad.group()!r}: a unit file would split "
                              "or unquote it; use a path without whitespace, quotes or backslashes")
    return text.replace("%", "%%").replace("$", "$$")


def render_unit(executable: str | None = None, config: str = DEFAULT_CONFIG) -> str:
    """The edge-pfm.service unit: ExecStart=<executable> serve --config <config>. `executable` is the absolute path
    of an `edge-pfm` script; by default this environment's (default_command())."""
    words = [executable] if executable is not None else default_command()
    command = " ".join([unit_path_word(words[0], "executable"), *words[1:]])  # the rest is "-m edge_pfm" or none
    text = template_text()
    missing = [p for p in PLACEHOLDERS if text.count(p) != 1]
    if missing:  # the shipped template is broken: a bug, not bad input
        raise RuntimeError(f"the unit template {TEMPLATE} must hold each of {missing} exactly once")
    return text.replace("@EXEC@", command).replace("@CONFIG@", unit_path_word(config, "config"))
