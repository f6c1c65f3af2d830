"""Screenshots of built pages in a headless browser (Debian's chromium), for the docs' acceptance record.

    make docs && .venv/bin/python docs/screenshots/take.py [PAGE.html ...]

Serves build/site on 127.0.0.1 (a free port) and writes docs/screenshots/<page>.png, 1280x900.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "build/site"
PAGES = ["getting-started.html", "reference/cli.html"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # the page list is the output, not each request
        pass


def main(pages: list[str]) -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        print("error: no chromium: apt install chromium", file=sys.stderr)
        return 4
    if not (SITE / "index.html").is_file():
        print(f"error: {SITE} has no site: run make docs first", file=sys.stderr)
        return 2
    handler = functools.partial(QuietHandler, directory=str(SITE))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for page in pages:
            out = Path(__file__).parent / (page.replace("/", "-").removesuffix(".html") + ".png")
            url = f"http://127.0.0.1:{server.server_port}/{page}"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1280,900", f"--screenshot={out}", url], check=True,
                           capture_output=True, timeout=120)
            print(f"wrote {out.relative_to(ROOT)} ({url})")
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or PAGES))
