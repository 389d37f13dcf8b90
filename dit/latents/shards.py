"""Reading one shard: fetch its bytes, check its sha256, parse it, report damage.

Local shards are memory-mapped and hashed in the stream's read-ahead thread (both release the
GIL). A shard whose sha256 matches the manifest is decoded by the vectorised parser (fixed
member layout), anything else member by member (:mod:`dit.latents.tarparse`). Damage (an
unreadable or truncated shard, a changed sha256, undecodable samples) is warned about once,
counted and named in the caller's :class:`_Stats`; ``strict`` makes it a
:class:`~dit.latents.manifest.CorruptShardError` naming the shard.

Two things are refused even when not strict. A label outside the manifest's classes
(:class:`~dit.latents.manifest.ShardLabelError`): skipping it would hide a data set that does
not match its manifest, training on it would index past the class embedding. And data that is
gone (:class:`~dit.latents.manifest.NoReadableShardsError`): once every shard of the manifest
has failed to read since the last readable one, a slot would otherwise hand out empty batches
forever. That rule cannot fire while any one shard is readable (a readable shard never joins
the failed set and reading it empties the set), however many others are damaged; with all
shards gone it fires after at most one failed read per shard in a slot's pass order (one pass
when a slot reads every shard; a few passes when the shards are dealt out across slots).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from dit.latents.manifest import CorruptShardError, NoReadableShardsError, ShardLabelError, ShardWarning
from dit.latents.order import _Spec
from dit.latents.tarparse import _EMPTY_SHARD, _generic_samples, _parse_regular, _ShardData
from dit.errors import ConfigError
from dit.files import is_local, local_path, read_bytes

_WARNED: set[str] = set()  # each damage message is warned about once per process
_VERIFIED: set[tuple[str, str, int, int]] = set()  # shards already hashed in this process


@dataclass(frozen=True)
class _ReadSpec(_Spec):
    """A stream's :class:`_Spec` plus what reading checks against: the manifest (for error
    messages) and its class count (labels must lie in ``[0, num_classes)``; None: unchecked)."""

    manifest: str = ""
    num_classes: int | None = None


class _Stats:
    """Damage seen since the last ``take()`` (samples replaced, shards named), and the shards
    that failed to read since the last readable one (never reset by ``take()``)."""

    def __init__(self) -> None:
        self.skipped = 0
        self.bad: set[str] = set()
        self.unreadable: set[int] = set()
        self.last_error = ""

    def take(self) -> tuple[int, tuple[str, ...]]:
        out = (self.skipped, tuple(sorted(self.bad)))
        self.skipped = 0
        self.bad = set()
        return out


def _problem(spec: _Spec, j: int, what: str, stats: _Stats) -> None:
    url = spec.urls[j]
    if spec.strict:
        raise CorruptShardError(
            f"shard {url}: {what}. Fix: rerun `ditscale prepare` with the same arguments (it rewrites "
            "missing shards; delete the damaged one first) or read with strict=False to skip it"
        )
    stats.bad.add(os.path.basename(url))
    stats.last_error = f"{os.path.basename(url)}: {what}"
    msg = f"shard {url}: {what}; skipping the damaged samples (strict=True makes this an error)"
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, ShardWarning, stacklevel=2)


@dataclass
class _Fetched:
    data: Any  # bytes, or an mmap of a local shard
    error: str | None
    sha_ok: bool | None  # None: not checked


def _fetch(spec: _Spec, j: int) -> _Fetched:
    """Read and hash one shard (runs in the prefetch thread: both release the GIL)."""
    url = spec.urls[j]
    try:
        data = read_bytes(url, allow_pipe=spec.allow_pipe, storage_options=dict(spec.storage_options), mmap_ok=True)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - missing/unreadable shard → all its samples skipped
        return _Fetched(b"", f"cannot be read ({type(err).__name__}: {err})", None)
    sha_ok = None
    want = spec.sha256[j]
    if spec.verify and want:
        try:  # a shard hashed once in this process is trusted while its size and mtime stay put
            stamp = os.stat(local_path(url)).st_mtime_ns if is_local(url) else 0
        except OSError:
            stamp = -1
        ident = (url, want, len(data), stamp)
        if ident in _VERIFIED:
            sha_ok = True
        else:
            sha_ok = hashlib.sha256(data).hexdigest() == want
            if sha_ok:
                _VERIFIED.add(ident)
    return _Fetched(data, None, sha_ok)


def _parse_shard(spec: _Spec, j: int, f: _Fetched, stats: _Stats) -> _ShardData:
    """The readable samples of a fetched shard, in order. Damage is reported (warning +
    count), fatal only when strict; labels out of range and data that is gone always are."""
    shard = _parse_samples(spec, j, f, stats)
    _check_labels(spec, j, shard)
    _track_unreadable(spec, j, len(shard.labels) > 0, stats)
    return shard


def _parse_samples(spec: _Spec, j: int, f: _Fetched, stats: _Stats) -> _ShardData:
    if f.error is not None:
        _problem(spec, j, f.error, stats)
        return _EMPTY_SHARD
    if f.sha_ok is False:
        _problem(spec, j, "sha256 does not match the manifest (changed or damaged)", stats)
    expected = spec.counts[j]
    if f.sha_ok:  # bytes are exactly what the writer wrote: try the vectorised path
        fast = _parse_regular(f.data, expected, spec.latent_shape)
        if fast is not None:
            return fast
    return _parse_generic(spec, j, f, stats)


def _check_labels(spec: _Spec, j: int, shard: _ShardData) -> None:
    """Refuse a shard holding a label outside ``[0, num_classes)`` of its manifest."""
    n = getattr(spec, "num_classes", None)
    if n is None or not len(shard.labels):
        return
    out = shard.labels[(shard.labels < 0) | (shard.labels >= n)]
    if len(out):
        raise ShardLabelError(
            f"shard {spec.urls[j]}: label {int(out[0])} is outside the manifest's {n} classes [0, {n}) "
            f"({len(out)} such samples); the shard does not belong to manifest {getattr(spec, 'manifest', '') or '?'}. "
            "Fix: rerun `ditscale prepare` into a fresh folder"
        )


def _track_unreadable(spec: _Spec, j: int, readable: bool, stats: _Stats) -> None:
    """Raise once every shard has failed to read since the last readable one (module docstring)."""
    if readable:
        stats.unreadable.clear()
        return
    stats.unreadable.add(j)
    n = len(spec.urls)
    if len(stats.unreadable) >= n:
        where = getattr(spec, "manifest", "") or "(given as an object)"
        raise NoReadableShardsError(
            f"manifest {where}: all {n} of its {n} shards are unreadable (last: {stats.last_error}); "
            "the data is gone (an unmounted volume? deleted files?), nothing is left to train on. "
            "Fix: restore the shard files, or rerun `ditscale prepare`, then resume"
        )


def _parse_generic(spec: _Spec, j: int, f: _Fetched, stats: _Stats) -> _ShardData:
    """Member-by-member parse, tolerant of truncation, odd layouts and bad samples."""
    # header checksums matter only when the sha256 did not vouch for the bytes
    lats, labels, bad, error = _generic_samples(f.data, not f.sha_ok, spec.latent_shape)
    expected = spec.counts[j]
    if error or bad or len(lats) != expected:
        what = f"{len(lats)} of {expected} samples readable"
        if error:
            what += f" ({error})"
        if bad:
            what += f", {bad} undecodable"
        _problem(spec, j, what, stats)
    if not lats:
        return _EMPTY_SHARD
    return _ShardData(np.stack(lats[:expected]), np.asarray(labels[:expected], dtype=np.int64))
