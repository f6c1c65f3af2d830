"""A bundle from outside (a directory, or a .tar of one) copied into the store's staging/, safely and durably.

A tar is extracted member by member and each is checked first: a regular file or a directory only (no symlink, hard
link, device or fifo), and a path that stays inside the staging directory (no absolute path, no '..'). One top-level
folder is allowed and stripped (`tar cf b.tar bundle/`). A directory is copied the same way: regular files only.
Every file and directory is fsynced before the update goes on, so a power cut cannot leave a bundle that verifies
but reads back short.
"""
from __future__ import annotations

import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from edge_pfm.errors import InvalidArgument

CHUNK = 1 << 20


class UnsafeBundleSource(InvalidArgument):
    """A tar or directory that holds something a bundle never holds (a link, a device, a path out)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src, dest: Path, mode: int = 0o644) -> None:
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(dest, mode & 0o755)


def stage_directory(source: Path, dest: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        rel = Path(dirpath).relative_to(source)
        (dest / rel).mkdir(exist_ok=True)
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath) / name)
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise UnsafeBundleSource(f"{Path(dirpath) / name}: not a regular file or folder (a link or a device); "
                                         "a bundle holds plain files only")
        for name in filenames:
            path = Path(dirpath) / name
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a link swapped in after the check is refused too
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UnsafeBundleSource(f"{path}: not a regular file; a bundle holds plain files only")
            with os.fdopen(fd, "rb") as f:
                _copy_file(f, dest / rel / name)
    for dirpath, _, _ in os.walk(dest):
        _fsync(Path(dirpath))


def _member_path(member: tarfile.TarInfo, tar_path: Path, strip: str | None) -> PurePosixPath | None:
    p = PurePosixPath(member.name)
    if p.is_absolute() or ".." in p.parts:
        raise UnsafeBundleSource(f"{tar_path}: member {member.name!r} points outside the bundle")
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or fifo"
        raise UnsafeBundleSource(f"{tar_path}: member {member.name!r} is {kind}; a bundle holds plain files only")
    parts = [x for x in p.parts if x != "."]
    if strip is not None:
        parts = parts[1:]
    return PurePosixPath(*parts) if parts else None


def stage_tar(tar_path: Path, dest: Path) -> None:
    try:
        tar = tarfile.open(tar_path, "r:*")  # noqa: SIM115 (closed by the with below, after the check)
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgument(f"{tar_path}: not a readable tar ({exc})") from exc
    with tar:
        members = tar.getmembers()
        tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts
                and PurePosixPath(m.name).parts[0] != "."}
        # one top-level folder (tar cf b.tar bundle/): strip it; files at the top: take them as they are
        strip = next(iter(tops)) if len(tops) == 1 and not any(
            m.isfile() and len([x for x in PurePosixPath(m.name).parts if x != "."]) == 1 for m in members) else None
        for member in members:
            rel = _member_path(member, tar_path, strip)
            if rel is None:
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            _copy_file(src, target, member.mode)
    for dirpath, _, _ in os.walk(dest):
        _fsync(Path(dirpath))


def stage(source: str | os.PathLike, dest: Path) -> None:
    """Copy `source` (a bundle directory or a .tar of one) into `dest`, an empty staging directory."""
    src = Path(source)
    try:
        if src.is_dir():
            stage_directory(src, dest)
        elif src.is_file():
            stage_tar(src, dest)
        else:
            raise InvalidArgument(f"{src} does not exist: give a bundle directory or a .tar of one")
    except (tarfile.TarError, OSError) as exc:  # a truncated tar, a file where a folder should be, a read error
        raise InvalidArgument(f"{src} cannot be staged: {exc}") from exc
    if not (dest / "manifest.json").is_file():
        raise InvalidArgument(f"{src} holds no manifest.json: not a bundle (a .tar may hold one folder with the "
                              "bundle in it)")
