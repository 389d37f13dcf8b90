"""Files and URLs: the one place that writes a file atomically and reads bytes from a URL.

Every file the project writes that a crash must not leave half-written (manifests, shards'
completion records, checkpoints' small files, study state, outcomes, reports) goes through
:func:`atomic_write_bytes` or one of its wrappers: the bytes go to a temporary file in the same
folder (named ``NAME.tmp-<random>``, so :func:`remove_stale_temps` can sweep what a crash left),
are fsynced, then renamed over the target. A reader sees the old file or the new one, never a
mix. URLs are local paths, ``file://`` URLs, any fsspec URL, or (only when the caller allows it)
``pipe:`` commands, as WebDataset names them.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from dit.errors import ConfigError

TEMP_MARK = ".tmp-"  # temporary files are NAME + TEMP_MARK + 8 hex digits


def temp_path(path: str | os.PathLike[str]) -> str:
    """A fresh temporary name beside ``path`` (same folder, so a rename is atomic)."""
    return f"{os.fspath(path)}{TEMP_MARK}{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (``torch.save``, ``np.savez``, PIL's ``save``)."""
    tmp = temp_path(path)
    try:
        yield tmp
        if os.path.exists(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def remove_stale_temps(folder: str | os.PathLike[str], pattern: str = "*") -> list[str]:
    """Delete temporary files a crashed writer left in ``folder`` (names matching ``pattern``)."""
    found = glob.glob(os.path.join(os.fspath(folder), f"{pattern}{TEMP_MARK}*"))
    for p in found:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    return found


# ---------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------


def is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def resolve(base: str, name: str) -> str:
    """``name`` relative to the folder of ``base`` (a path or URL); absolute names stay."""
    if name.startswith("pipe:") or "://" in name or os.path.isabs(name):
        return name
    if "://" in base:
        return base.rsplit("/", 1)[0] + "/" + name
    if base.startswith("pipe:"):
        return name
    return os.path.join(os.path.dirname(base), name)


def check_pipe(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise ConfigError(
            f"{url[:80]}: 'pipe:' URLs run shell commands and are refused. Fix: pass allow_pipe=True "
            "only for manifests you trust, or use a file/fsspec URL"
        )


def read_bytes(url: str, *, allow_pipe: bool = False, storage_options: Mapping[str, Any] | None = None,
               mmap_ok: bool = False) -> Any:
    """The object's bytes (``bytes``, or a read-only ``mmap`` of a local file when ``mmap_ok``)."""
    check_pipe(url, allow_pipe)
    if url.startswith("pipe:"):
        proc = subprocess.run(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise OSError(f"pipe command exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:200]}")
        return proc.stdout
    if is_local(url):
        with open(local_path(url), "rb") as f:
            if mmap_ok:
                try:
                    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # no copy; page cache pages
                except (ValueError, OSError):  # empty file, or a filesystem without mmap
                    pass
            return f.read()
    import fsspec

    with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
        return f.read()


def as_path(url: str) -> Path:
    return Path(local_path(url))
