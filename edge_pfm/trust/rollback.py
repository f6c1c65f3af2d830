"""The rollback floor: the lowest bundle_version this device still runs, kept in the device's state directory.

A signed bundle whose version is below the floor is refused, so that an older signed bundle (one with a known
fault) cannot be put back. The floor rises to a verified bundle's version when that bundle first runs
(edge_pfm.runtime.Runner); it never falls. The file is written atomically and read on every load.
"""
from __future__ import annotations

import json
from pathlib import Path

from edge_pfm.fileio import atomic_write_json
from edge_pfm.trust.signature import SignatureError

FLOOR_FILE = "bundle_version_floor.json"


def read_floor(state_dir: Path) -> int:
    """The floor in `state_dir` (0 when none was written yet); a damaged file is refused, never read as 0."""
    path = Path(state_dir) / FLOOR_FILE
    try:
        floor = json.loads(path.read_text())["floor"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path}: the rollback floor is unreadable ({exc}); restore it, or remove it to accept "
                             "any signed version again") from exc
    if isinstance(floor, bool) or not isinstance(floor, int):
        raise SignatureError(f"{path}: the rollback floor {floor!r} is not an integer")
    return floor


def check_floor(version: int | None, state_dir: Path, bundle: Path) -> None:
    """Raise SignatureError when a signed bundle's version is below the floor (or it has none)."""
    floor = read_floor(state_dir)
    if version is None:
        raise SignatureError(f"{bundle / 'manifest.json'}: a signed bundle needs a bundle_version; re-export it "
                             "(python -m export --bundle-version N ...) and sign it again")
    if version < floor:
        raise SignatureError(f"{bundle}: bundle version {version} is older than version {floor}, which this device "
                             f"has already run (rollback floor in {Path(state_dir) / FLOOR_FILE}); install a bundle "
                             f"of version >= {floor}")


def raise_floor(version: int, state_dir: Path) -> bool:
    """Raise the floor to `version` if it is higher; -> whether it rose."""
    if version <= read_floor(state_dir):
        return False
    atomic_write_json(Path(state_dir) / FLOOR_FILE, {"floor": version})
    return True
