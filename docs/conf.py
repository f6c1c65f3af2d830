"""Sphinx configuration of the documentation site: `make docs` builds it into build/site, strict (-W -n): a
warning, a broken link or anchor, or a page outside the table of contents fails the build."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "edge-pfm"
author = "the edge-pfm developers"
extensions = ["myst_parser", "generated_reference"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_ext", "_build", "screenshots/README.md"]
myst_heading_anchors = 3  # `page.md#a-heading` links are checked like page links
html_theme = "furo"
html_title = "edge-pfm"
html_static_path: list[str] = []
html_show_sourcelink = False
