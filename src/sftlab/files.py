"""Writing files and directories so that a crash never leaves a half-written one that looks valid."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")  # same directory, so os.replace is a rename
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, so a later rename publishes complete contents."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the complete directory ``tmp`` to ``target``. A previous ``target`` is moved aside first and deleted
    after, so at no moment does ``target`` hold a mix of the two; the parent is fsynced so the rename lasts."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_outputs(outputs, inputs=(), force: bool = False) -> None:
    """Raises SftlabError (one line naming the path) before a command writes ``outputs`` (files, or folders it writes
    into): when one is one of the ``inputs`` (compared resolved, so another spelling or a link is caught; even with
    ``force``), or when one already exists (a folder: holds anything) and ``force`` is False."""
    from sftlab.errors import SftlabError

    given = {Path(p).resolve() for p in inputs}
    for out in map(Path, outputs):
        if out.resolve() in given:
            raise SftlabError(f"{out}: is one of the input files; write the output to another path")
        if force:
            continue
        if out.is_dir():
            if next(out.iterdir(), None) is not None:
                raise SftlabError(f"{out}: the folder is not empty; choose another with -o, or pass --force to write into it")
        elif out.exists() or out.is_symlink():
            raise SftlabError(f"{out}: already exists; write to another path, or pass --force to replace it")
