"""The bundle store's layout and its atomic operations.

    STORE/versions/<version>-<sha8>/   complete, verified bundles, one directory each, never changed once there
    STORE/current  -> versions/...     what serve runs (a relative symlink, switched by rename: atomic)
    STORE/previous -> versions/...     the last good one before it: `update --rollback` and automatic rollback
    STORE/pending.json                 a switch not yet committed: {"candidate", "before"} (health decides)
    STORE/staging/                     updates being copied and checked; emptied on every start (a crash's leftovers)
    STORE/failed/<name>/               refused or rolled-back bundles, each with report.json
    STORE/inbox/                       serve picks up a bundle here once its completion marker is written
    STORE/lock                         flock: one update at a time (the command and serve's inbox)

Every step that changes what runs is one rename on one filesystem, with the directory fsynced: a SIGKILL or power
cut leaves `current` on a complete, verified bundle, the old one or the new one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_pfm.errors import EdgePfmError, RuntimeFailure
from edge_pfm.fileio import _fsync_dir, atomic_write_json

DEFAULT_STORE = Path("/var/lib/edge-pfm/bundles")
COMPLETE_SUFFIX = ".complete"  # inbox: "<name>.complete" beside the bundle directory or tar says it is whole


class StoreError(EdgePfmError):
    """The store cannot be used as asked (no current bundle, nothing to roll back to, a refused update)."""


class StoreBusy(RuntimeFailure):
    """Another update holds the store's lock."""


@dataclass(frozen=True)
class Version:
    name: str  # the directory under versions/
    path: Path
    bundle_version: int | None
    manifest_sha256: str

    def describe(self) -> str:
        v = "unversioned" if self.bundle_version is None else f"version {self.bundle_version}"
        return f"{self.name} ({v})"


class BundleStore:
    def __init__(self, root: str | os.PathLike = DEFAULT_STORE, keep: int = 3, max_bytes: int | None = None):
        self.root = Path(root)
        self.keep, self.max_bytes = keep, max_bytes
        self.versions, self.staging, self.failed, self.inbox = (self.root / d for d in
                                                                ("versions", "staging", "failed", "inbox"))
        self.pending_file = self.root / "pending.json"

    # -- layout ---------------------------------------------------------------------------------------
    def ensure(self) -> BundleStore:
        for d in (self.root, self.versions, self.staging, self.failed, self.inbox):
            d.mkdir(parents=True, exist_ok=True)
        return self

    @contextlib.contextmanager
    def locked(self, wait: bool = False) -> Iterator[None]:
        """The store's one lock (flock: released by the kernel when a holder dies, so a crash never leaves it)."""
        self.ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StoreBusy(f"{self.root}: another update is in progress (its lock is held); try again when "
                                    "it has finished") from None
                raise
            yield
        finally:
            os.close(fd)

    def link(self, name: str) -> Path | None:
        """The version directory `current` or `previous` points at (None: no such link)."""
        p = self.root / name
        if not p.is_symlink():
            return None
        return (self.root / os.readlink(p)).resolve()

    def set_link(self, name: str, target: Path | None) -> None:
        """Point `name` at `target` (a directory under versions/) atomically: a new link renamed over the old."""
        p = self.root / name
        if target is None:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        else:
            tmp = self.root / f".{name}.{uuid.uuid4().hex[:8]}"
            os.symlink(os.path.relpath(target, self.root), tmp)
            os.replace(tmp, p)
        _fsync_dir(self.root)

    def version(self, path: Path) -> Version:
        from edge_pfm.fileio import sha256_file

        manifest = json.loads((path / "manifest.json").read_text())
        return Version(path.name, path, manifest.get("bundle_version"), sha256_file(path / "manifest.json"))

    def list(self) -> list[Version]:
        if not self.versions.is_dir():
            return []
        return [self.version(p) for p in sorted(self.versions.iterdir()) if (p / "manifest.json").is_file()]

    # -- the steps ------------------------------------------------------------------------------------
    def new_staging(self) -> Path:
        self.ensure()
        d = self.staging / uuid.uuid4().hex
        d.mkdir()
        return d

    def install(self, staged: Path, bundle_version: int | None, manifest_sha256: str) -> Path:
        """Move a staged, verified and checked bundle into versions/ (a rename) -> its directory."""
        name = f"{bundle_version or 0}-{manifest_sha256[:8]}"
        final = self.versions / name
        if final.exists():  # the same bundle again: the fresh, verified copy replaces whatever is there (a prune
            self._discard(final)  # cut short by a crash may have left it partial)
        os.replace(staged, final)
        _fsync_dir(self.versions)
        return final

    def _discard(self, path: Path) -> None:
        """Remove a version: renamed into staging/ first (atomic; staging/ is emptied on start), then deleted, so a
        crash midway never leaves a partial version under versions/."""
        self.staging.mkdir(parents=True, exist_ok=True)
        trash = self.staging / f"discard-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        _fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def set_pending(self, candidate: Path, before: Path | None) -> None:
        atomic_write_json(self.pending_file, {"candidate": candidate.name, "before": before.name if before else None})

    def pending(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.pending_file.read_text())
        except FileNotFoundError:
            return None

    def clear_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pending_file.unlink()
        _fsync_dir(self.root)

    def set_aside(self, path: Path, report: dict[str, Any]) -> Path:
        """A refused or rolled-back bundle, kept in failed/ with why (never run again from there)."""
        self.ensure()
        dest = self.failed / f"{path.name}-{uuid.uuid4().hex[:6]}"
        if path.exists():
            os.replace(path, dest)
        else:
            dest.mkdir()
        atomic_write_json(dest / "report.json", report)
        _fsync_dir(self.failed)
        return dest

    def recover(self) -> list[str]:
        """On start: remove what an interrupted update left in staging/ and stray link temporaries. -> what."""
        done = []
        if self.staging.is_dir():
            for d in self.staging.iterdir():
                shutil.rmtree(d, ignore_errors=True)
                done.append(f"removed the interrupted update {d.name} from staging/")
        for tmp in self.root.glob(".current.*"):
            tmp.unlink()
        for tmp in self.root.glob(".previous.*"):
            tmp.unlink()
        return done

    def prune(self) -> list[str]:
        """Keep `current`, `previous`, a pending candidate and any version newer than `current` (installed, not yet
        switched to), then the newest others up to `keep` versions; then drop the oldest others while over
        `max_bytes`. -> the names removed."""
        current = self.link("current")
        protected = {p for p in (current, self.link("previous")) if p is not None}
        pend = self.pending()
        if pend:
            protected |= {(self.versions / n).resolve() for n in (pend["candidate"], pend["before"]) if n}
        newest = self.version(current).bundle_version or 0 if current is not None else 0
        protected |= {v.path.resolve() for v in self.list() if (v.bundle_version or 0) > newest}
        others = sorted((v for v in self.list() if v.path.resolve() not in protected),
                        key=lambda v: (v.bundle_version or 0, v.name), reverse=True)  # newest first
        room = max(0, self.keep - (len(self.list()) - len(others)))
        victims = others[room:]
        survivors = others[:room]
        while self.max_bytes is not None and survivors and \
                self.size() - sum(_size(v.path) for v in victims) > self.max_bytes:
            victims.append(survivors.pop())  # the oldest of those kept
        for v in victims:
            self._discard(v.path)
        return [v.name for v in victims]

    def describe(self) -> str:
        """The store as `edge-pfm info` shows it: each version, which is current, previous, pending; what failed."""
        lines = [f"bundle store {self.root}:"]
        if not self.root.is_dir():
            return lines[0] + " (none yet: edge-pfm update BUNDLE installs the first version)"
        current, previous, pend = self.link("current"), self.link("previous"), self.pending()
        for v in self.list():
            tags = [t for t, on in (("current", v.path.resolve() == current), ("previous", v.path.resolve() == previous),
                                    ("pending health", pend is not None and pend["candidate"] == v.name)) if on]
            lines.append(f"  {v.describe()}{'  <- ' + ', '.join(tags) if tags else ''}")
        failed = sorted(self.failed.glob("*/report.json")) if self.failed.is_dir() else []
        for report in failed[-5:]:
            r = json.loads(report.read_text())
            lines.append(f"  failed {report.parent.name}: {r.get('refused') or r.get('rolled_back')}")
        lines.append(f"  {len(self.list())} versions kept (at most {self.keep}), {self.size() / (1 << 20):.1f} MB")
        return "\n".join(lines)

    def size(self) -> int:
        return _size(self.versions)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# [bundles] in device.toml: key -> (types, what it is)
BUNDLES_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "store": ((str,), "the store's directory"), "keep": ((int,), "how many versions to keep (>= 2)"),
    "max_mb": ((int, float), "the store's disk cap in MB"),
    "health_pairs": ((int,), "pairs decided without error before an update is committed"),
}
DEFAULT_HEALTH_PAIRS = 300  # 10-20 s of a running colposcope


def store_settings(cfg: dict[str, Any], path: Path | None = None) -> tuple[BundleStore, int]:
    """[bundles] -> (the store, health_pairs); keys checked against BUNDLES_KEYS (ConfigError names the key)."""
    from edge_pfm.config import ConfigError, checked_section, relative_to_config

    section = checked_section(cfg, "bundles", BUNDLES_KEYS, path)
    if section.get("keep", 2) < 2:
        raise ConfigError(f"{path or ''}: [bundles] keep must be {BUNDLES_KEYS['keep'][1]}, got {section['keep']!r}")
    root = section.get("store")
    root = relative_to_config(path, root) if root and path else Path(root or DEFAULT_STORE)
    max_mb = section.get("max_mb")
    store = BundleStore(root, section.get("keep", 3), None if max_mb is None else int(max_mb * (1 << 20)))
    return store, section.get("health_pairs", DEFAULT_HEALTH_PAIRS)
