"""`edge-pfm` with the backend's faults, for tests that need a separate process (serve under a notify socket):

    python tests/serve_faults.py [--load-delay-s S] [--hang-after-s S] [--mark FILE] -- serve --config C

--load-delay-s: the engine takes S seconds more to load (a slow TensorRT build, simulated: the process cannot be
interrupted inside it either, as a native build cannot); --hang-after-s: S seconds after the first inference every
call blocks forever (sources.simulated.faults.HangingBackend), and --mark gets time.monotonic() of that moment
(CLOCK_MONOTONIC: the test compares it with its own clock). The camera faults need no wrapper: they are synthetic
source options. Test-only: the device package never reaches this file.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-delay-s", type=float, default=0.0)
    ap.add_argument("--hang-after-s", type=float)
    ap.add_argument("--mark")
    split = argv.index("--")
    args = ap.parse_args(argv[:split])
    from edge_pfm import cli
    from edge_pfm.runtime.runner import Runner
    from edge_pfm.sources.simulated.faults import HangingBackend

    load = Runner._load

    def faulty_load(self: Runner) -> None:
        time.sleep(args.load_delay_s)
        load(self)
        if args.hang_after_s is not None:
            mark = (lambda: Path(args.mark).write_text(repr(time.monotonic()))) if args.mark else None
            self.classifier.backend = HangingBackend(self.classifier.backend, args.hang_after_s, mark)

    Runner._load = faulty_load
    return cli.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
