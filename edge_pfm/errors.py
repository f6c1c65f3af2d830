"""One error root and one table of exit codes for every edge-pfm command (device and build machine).

Every anticipated failure raises an `EdgePfmError` subclass whose message names the file and the fix; each
command catches the root once (`run_command`) and prints one line. Anything else is a bug and keeps its
traceback (exit 1).

| code | meaning |
|---|---|
| 0 | success |
| 1 | a bug: an unexpected exception, with its traceback |
| 2 | bad input: a file, bundle, dataset, checkpoint, model, config or argument that cannot be used |
| 3 | the INT8 accuracy gate refused the model (the bundle is fine and stays FP32) |
| 4 | a backend or dependency is unavailable here (TensorRT, pycuda, onnxruntime, a GPU) |
| 5 | a runtime failure: an engine build, an inference, a camera, the disk |
| 6 | a camera stayed lost past `[serve] camera_give_up_s` (serve: systemd restarts the service) |
| 130 | interrupted (Ctrl-C) |
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    BUG = 1
    BAD_INPUT = 2
    GATE_REFUSED = 3
    UNAVAILABLE = 4
    RUNTIME_FAILURE = 5
    CAMERA_LOST = 6
    INTERRUPTED = 130

    @property
    def meaning(self) -> str:
        """What this code tells a script; the docs' exit-code table is generated from it."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.BUG: "a bug: an unexpected exception, with its traceback (please report it)",
    ExitCode.BAD_INPUT: "bad input: a file, bundle, dataset, checkpoint, model, config or argument that cannot be used",
    ExitCode.GATE_REFUSED: "the INT8 accuracy gate refused the model (the bundle is fine and stays FP32)",
    ExitCode.UNAVAILABLE: "a backend or dependency is unavailable here (TensorRT, pycuda, onnxruntime, a GPU)",
    ExitCode.RUNTIME_FAILURE: "a runtime failure: an engine build, an inference, a camera, the disk (e.g. a full disk "
                              "under `--log`)",
    ExitCode.CAMERA_LOST: "a camera stayed lost (being reopened, without a frame) past `[serve] camera_give_up_s`: "
                          "under systemd the service is restarted (Restart=on-failure), which also reopens the "
                          "camera stack",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C) outside `edge-pfm run` (which shuts down cleanly and exits 0)",
}


class EdgePfmError(Exception):
    """Root of every anticipated edge-pfm failure; `exit_code` is what a command exits with."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class InvalidArgument(EdgePfmError, ValueError):
    """An option's value cannot be used; the message gives the choices."""


class UnavailableError(EdgePfmError):
    """Something this machine lacks (a backend, a dependency, a GPU); the message says what to install."""

    exit_code = ExitCode.UNAVAILABLE


class RuntimeFailure(EdgePfmError, RuntimeError):
    """Work that started failed (an engine build, an inference, a camera, a write)."""

    exit_code = ExitCode.RUNTIME_FAILURE


def run_command(fn: Callable[[], int | None]) -> int:
    """Run a command's body: an EdgePfmError prints as one line and gives its exit code; a failed write
    (OSError: a full disk, a read-only folder) too; Ctrl-C exits 130."""
    try:
        return int(fn() or 0)
    except EdgePfmError as exc:
        print(f"{'refused' if exc.exit_code == ExitCode.GATE_REFUSED else 'error'}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except OSError as exc:  # the filesystem refused: the message names the file
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.RUNTIME_FAILURE)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
