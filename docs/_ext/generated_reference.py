"""Sphinx extension: the pages' generated parts, never written by hand.

A page asks for them with a marker on its own line:
    <!-- generated: exit-codes -->        the table of edge_pfm.errors.ExitCode
    <!-- generated: cli MODULE -->        the command line of MODULE's build_parser()
Every command's parser is built without running it, and with no torch (export/train_plan.py keeps the trainer's
parser apart from the trainer for that), so the reference builds in a docs-only environment.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
if str(ROOT) not in sys.path:  # export/ and calibration/ run from the checkout, not from an install
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- generated: (?P<what>[\w-]+)(?: (?P<arg>[\w.]+))? -->$", re.M)


def exit_code_table() -> str:
    from edge_pfm.errors import ExitCode

    rows = [f"| {int(code)} | `{code.name}` | {code.meaning} |" for code in ExitCode]
    return "\n".join(["| code | name | meaning |", "|---|---|---|", *rows]) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _option_rows(ap: argparse.ArgumentParser) -> list[str]:
    formatter = ap._get_formatter()  # argparse's own rendering of each option, as --help shows it
    rows = []
    for action in ap._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue  # -h, the subcommands (their own sections) and hidden options
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS
        shown = "required" if action.required else "" if unset else f"`{default}`"
        rows.append(f"| `{_cell(invocation)}` | {shown} | {_cell(help_text)} |")
    return rows


def _subcommands(ap: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, str]]:
    """(parser, its one-line help) of each subcommand, in the order --help lists them."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(parser, helps.get(name, "")) for name, parser in action.choices.items()]
    return []


def cli_reference(module: str, level: int = 2) -> str:
    """The markdown reference of `module.build_parser()`: usage, description and an options table, then each
    subcommand the same way one heading level down."""
    os.environ["COLUMNS"] = "100"  # argparse wraps usage at the terminal's width: the page must not depend on it
    ap = importlib.import_module(module).build_parser()
    return _parser_markdown(ap, level)


def _parser_markdown(ap: argparse.ArgumentParser, level: int, summary: str = "") -> str:
    out = [f"{'#' * level} `{ap.prog}`", ""]
    if summary:
        out += [_cell(summary[:1].upper() + summary[1:]) + ".", ""]
    out += ["```text", ap.format_usage().strip(), "```", ""]
    if ap.description:
        out += ["```text", ap.description.strip(), "```", ""]
    rows = _option_rows(ap)
    if rows:
        out += ["| option | default | what it does |", "|---|---|---|", *rows, ""]
    for sub, summary in _subcommands(ap):
        out += [_parser_markdown(sub, level + 1, summary).rstrip(), ""]
    return "\n".join(out).rstrip() + "\n"


def expand(markdown: str) -> str:
    def replace(m: re.Match) -> str:
        if m["what"] == "exit-codes":
            return exit_code_table()
        if m["what"] == "cli" and m["arg"]:
            return cli_reference(m["arg"])
        raise ValueError(f"unknown generated block {m[0]!r} (known: exit-codes, cli MODULE)")

    return MARKER.sub(replace, markdown)


def _expand_source(app, docname: str, source: list[str]) -> None:
    source[0] = expand(source[0])


def setup(app) -> dict:
    app.connect("source-read", _expand_source)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
