"""`edge-pfm` with the backend's faults and a pair checker, for tests and benchmarks that need a separate process
(serve under a notify socket):

    python benchmarks/serve_faults.py [--load-delay-s S] [--hang-after-s S] [--mark FILE] [--pair-check FILE] \
        [--kill-at STEP] [--nonfinite-version V] -- serve --config C

--load-delay-s: the engine takes S seconds more to load (a slow TensorRT build, simulated: the process cannot be
interrupted inside it either, as a native build cannot). --hang-after-s: S seconds after the first inference every
call blocks forever (sources.simulated.faults.HangingBackend); --mark gets time.monotonic() of that moment
(CLOCK_MONOTONIC: the caller compares it with its own clock). --pair-check: every inferred pair's pixel stamps are
checked (benchmarks/soak.py's PairChecker) and the counts written to FILE as JSON when the command returns.
--kill-at: SIGKILL this process as an update step starts (edge_pfm.store.update.STEPS, or "commit"): a power cut
mid-update. --nonfinite-version: every classifier built for a bundle of that bundle_version returns NaN/Inf on every
third call (sources.simulated.faults.NonFiniteBackend): a model whose outputs turn non-finite after a switch.
The camera faults need no wrapper: they are synthetic source options (sources.simulated.cameras.FAULT_KEYS).
Tests and benchmarks only: the device package never reaches this file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-delay-s", type=float, default=0.0)
    ap.add_argument("--hang-after-s", type=float)
    ap.add_argument("--mark")
    ap.add_argument("--pair-check")
    ap.add_argument("--kill-at")
    ap.add_argument("--nonfinite-version", type=int)
    split = argv.index("--")
    args = ap.parse_args(argv[:split])
    from edge_pfm import cli
    from edge_pfm.runtime.runner import Runner
    from edge_pfm.sources.simulated.faults import HangingBackend

    load = Runner._load
    checkers = []

    def faulty_load(self: Runner) -> None:
        time.sleep(args.load_delay_s)
        load(self)
        if args.hang_after_s is not None:
            mark = (lambda: Path(args.mark).write_text(repr(time.monotonic()))) if args.mark else None
            self.classifier.backend = HangingBackend(self.classifier.backend, args.hang_after_s, mark)
        if args.pair_check:
            sys.path.insert(0, str(Path(__file__).parent))
            from soak import PairChecker

            checkers.append(PairChecker(int((self.cfg.tolerance_ms or 1000 / 60) * 1e6)))
            self.observers.append(checkers[-1])

    Runner._load = faulty_load
    if args.kill_at:
        import os
        import signal

        from edge_pfm.store import update

        update.step_hook = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == args.kill_at else None
    if args.nonfinite_version is not None:
        from edge_pfm.classifier import Classifier
        from edge_pfm.sources.simulated.faults import NonFiniteBackend

        init = Classifier.__init__

        def nonfinite_init(self, bundle, *a, **k):
            init(self, bundle, *a, **k)
            if self.bundle.manifest.get("bundle_version") == args.nonfinite_version:
                self.backend = NonFiniteBackend(self.backend, every=3)

        Classifier.__init__ = nonfinite_init
    rc = cli.main(argv[split + 1:])
    if args.pair_check and checkers:
        c = checkers[0]
        Path(args.pair_check).write_text(json.dumps(
            {"checked": c.checked, "swapped": c.swapped, "reused": c.reused, "seq_reused": c.seq_reused,
             "skewed": c.skewed, "unstamped": c.unstamped}) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
