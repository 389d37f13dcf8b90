"""Parsing a shard's bytes: tar members and ``.npy`` arrays, without pickle, tolerant of damage.

Two parsers read the same shards. :func:`_parse_regular` decodes a shard laid out as
``ditscale prepare`` writes it (every sample the same members of the same sizes, so the samples
sit at a fixed stride) with a few vectorised numpy operations and no per-sample Python; the
reader uses it only when the shard's sha256 matched. :func:`_generic_samples` walks the members
one by one and survives truncation, odd layouts and undecodable samples, keeping whatever is
readable. Both return zero-copy views into the shard's bytes (an ``mmap`` for local shards).
Why not WebDataset's own reader: ``benchmarks/bench_latents.py`` measures it side by side.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from dit.latents.manifest import LATENTS_EXT


class _TarError(Exception):
    pass


_ZERO_BLOCK = bytes(512)


@dataclass
class _ShardData:
    latents: np.ndarray  # (n, V, C, H, W) float16, in shard order (views into the shard's bytes if possible)
    labels: np.ndarray  # (n,) int64


_EMPTY_SHARD = _ShardData(np.zeros((0, 1, 1, 1, 1), np.float16), np.zeros(0, np.int64))


# ---------------------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------------------


def _member_name(data: Any, off: int) -> str:
    """A ustar header's name (with its prefix field, when set)."""
    nul = data.find(b"\0", off, off + 100)
    name = data[off : nul if nul >= 0 else off + 100].decode("utf-8", "replace")
    if data[off + 345] and data[off + 257 : off + 262] == b"ustar":
        nul = data.find(b"\0", off + 345, off + 500)
        name = data[off + 345 : nul if nul >= 0 else off + 500].decode("utf-8", "replace") + "/" + name
    return name


def _member_size(data: Any, off: int, check: bool) -> int:
    """The size field of the header at ``off`` (octal, or GNU base-256); ``ValueError`` if bad."""
    sf = data[off + 124 : off + 136]
    size = int.from_bytes(sf[1:], "big") if sf[0] & 0x80 else int(sf.rstrip(b"\0 ") or b"0", 8)
    if check:
        hdr = data[off : off + 512]
        if int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ValueError("checksum")
    return size


def _tar_members(data: bytes, check: bool = True) -> Iterator[tuple[str, int, int]]:
    """Yield ``(name, offset, size)`` for the regular files of an in-memory tar; raise
    ``_TarError`` on a bad header or truncation (after yielding what was intact). Header
    checksums are skipped when ``check`` is false (the shard's sha256 already matched)."""
    n = len(data)
    off = 0
    longname: str | None = None  # set by a GNU long-name or pax header for the next member
    while True:
        if off + 512 > n:
            if off == n:
                return  # ends on a member boundary without the end marker: accepted
            raise _TarError(f"truncated header at byte {off}")
        if data[off] == 0 and data[off : off + 512] == _ZERO_BLOCK:
            return
        try:
            size = _member_size(data, off, check)
        except ValueError:
            raise _TarError(f"bad header at byte {off}") from None
        start = off + 512
        end = start + size
        if end > n:
            raise _TarError(f"truncated member at byte {off}")
        typ = data[off + 156]
        if typ in (48, 0, 55):  # '0', NUL, '7': regular file
            if longname is not None:
                name, longname = longname, None
            else:
                name = _member_name(data, off)
            yield name, start, size
        elif typ == 76:  # 'L': GNU long name
            longname = data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")
        elif typ == 120:  # 'x': pax header
            for rec in data[start:end].split(b"\n"):
                if b" path=" in rec:
                    longname = rec.split(b" path=", 1)[1].decode("utf-8", "replace")
        else:
            longname = None
        off = start + ((size + 511) // 512) * 512


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def _npy_view(data: bytes, start: int, size: int) -> np.ndarray:
    """Zero-copy view of an ``.npy`` member; header parses are cached (all samples share one)."""
    if data[start : start + 6] != b"\x93NUMPY":
        raise ValueError("not an .npy (bad magic)")
    if data[start + 6] == 1:
        hl, hs = int.from_bytes(data[start + 8 : start + 10], "little"), 10
    else:
        hl, hs = int.from_bytes(data[start + 8 : start + 12], "little"), 12
    header = data[start + hs : start + hs + hl]
    info = _NPY_HEADERS.get(header)
    if info is None:
        d = ast.literal_eval(header.decode("latin1"))  # a literal, never pickle
        if not isinstance(d, dict) or d.get("fortran_order"):
            raise ValueError("unsupported .npy header")
        dtype = np.dtype(d["descr"])
        if dtype.hasobject:
            raise ValueError("object arrays are refused")
        shape = tuple(int(x) for x in d["shape"])
        info = (dtype, shape, int(np.prod(shape)))
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = info
    dtype, shape, count = info
    if hs + hl + count * dtype.itemsize > size:
        raise ValueError(".npy payload truncated")
    return np.frombuffer(data, dtype, count, offset=start + hs + hl).reshape(shape)


def _latents_ok(arr: np.ndarray, shape: tuple[int, ...]) -> bool:
    return arr.dtype == np.float16 and arr.ndim == 4 and arr.shape[1:] == shape and arr.shape[0] in (1, 2)


# ---------------------------------------------------------------------------------------
# Member by member (any layout, any damage)
# ---------------------------------------------------------------------------------------


def _grouped_members(data: Any, check: bool, errors: list[str]) -> Iterator[tuple[tuple[int, int] | None, tuple[int, int] | None]]:
    """``(latents, cls)`` member spans, ``(offset, size)`` or None, per sample key in tar order.
    A tar error ends the walk (noted in ``errors``) after the sample it interrupted."""
    key: str | None = None
    lat = cls = None
    try:
        for name, start, size in _tar_members(data, check=check):
            k, ext = _split_name(name)
            if k != key:
                if key is not None:
                    yield lat, cls
                key, lat, cls = k, None, None
            if ext == LATENTS_EXT:
                lat = (start, size)
            elif ext == "cls":
                cls = (start, size)
    except _TarError as err:
        errors.append(str(err))
    if key is not None:
        yield lat, cls


def _sample_arrays(data: Any, lat: tuple[int, int] | None, cls: tuple[int, int] | None, shape: tuple[int, ...],
                   flips: int | None) -> tuple[np.ndarray, int]:
    """One sample's latents view and label; ``ValueError`` (or a parse error) if undecodable.
    ``flips``: the V of the shard's first sample (one shard, one layout)."""
    if lat is None or cls is None:
        raise ValueError("missing latents.npy or cls")
    arr = _npy_view(data, lat[0], lat[1])
    if not _latents_ok(arr, shape):
        raise ValueError(f"latents {arr.dtype}{arr.shape}, expected float16 (V,{shape})")
    if flips is not None and arr.shape[0] != flips:
        raise ValueError("mixed flip layouts in one shard")
    return arr, int(data[cls[0] : cls[0] + cls[1]])


def _generic_samples(data: Any, check: bool, shape: tuple[int, ...]) -> tuple[list[np.ndarray], list[int], int, str | None]:
    """Every decodable sample of a shard in order: ``(latents views, labels, undecodable
    count, tar error or None)``. ``check``: verify tar header checksums."""
    lats: list[np.ndarray] = []
    labels: list[int] = []
    bad = 0
    errors: list[str] = []
    for lat, cls in _grouped_members(data, check, errors):
        try:
            arr, label = _sample_arrays(data, lat, cls, shape, lats[0].shape[0] if lats else None)
        except (ValueError, SyntaxError, KeyError, TypeError):
            bad += 1
            continue
        lats.append(arr)
        labels.append(label)
    return lats, labels, bad, (errors[0] if errors else None)


# ---------------------------------------------------------------------------------------
# Vectorised (the layout the writer produces)
# ---------------------------------------------------------------------------------------


def _octal_fields(block: np.ndarray) -> np.ndarray:
    """Vectorised parse of NUL/space-terminated octal ASCII fields, one per row."""
    digits = block.astype(np.int64) - 48
    ok = (digits >= 0) & (digits < 8)
    ok = np.cumprod(ok, axis=1).astype(bool)  # stop at the first non-digit
    n = ok.sum(axis=1)
    place = np.where(ok, n[:, None] - 1 - np.arange(block.shape[1])[None, :], 0)
    return (np.where(ok, digits, 0) << (3 * np.maximum(place, 0))).sum(axis=1)


def _rows(buf: np.ndarray, offset: int, n: int, width: int, stride: int) -> np.ndarray:
    """``n`` rows of ``width`` bytes starting at ``offset``, ``stride`` apart (a view)."""
    return np.lib.stride_tricks.as_strided(buf[offset:], shape=(n, width), strides=(stride, 1), writeable=False)


def _first_sample(data: Any) -> tuple[str, list[tuple[str, int, int]], int | None] | None:
    """The first sample's key, its members ``(ext, offset, size)`` and the offset of the next
    sample's first member (None: no next sample); None if it lacks latents or cls."""
    try:
        first: list[tuple[str, int, int]] = []
        key0 = None
        for name, start, size in _tar_members(data, check=False):
            k, ext = _split_name(name)
            if key0 is None:
                key0 = k
            if k != key0:
                nxt = start
                break
            first.append((ext, start, size))
        else:
            nxt = None
    except _TarError:
        return None
    exts = [e for e, _, _ in first]
    if LATENTS_EXT not in exts or "cls" not in exts or len(set(exts)) != len(exts) or key0 is None:
        return None
    return key0, first, nxt


def _sample_stride(first: list[tuple[str, int, int]], nxt: int | None, n: int, total: int) -> int | None:
    """Bytes from one sample's first header to the next's, if ``n`` samples at that stride fit
    in ``total`` bytes (None: they do not, so the layout is not the regular one)."""
    base = first[0][1] - 512
    stride = (nxt - 512 - base) if nxt is not None else None
    if n == 1 or stride is None:
        if n != 1 or stride is not None:
            return None
        stride = total  # a single sample: any stride works
    if base + (n - 1) * stride + (first[-1][1] - base) + first[-1][2] > total:
        return None  # truncated
    return stride


def _strided_headers(buf: np.ndarray, first: list[tuple[str, int, int]], key0: str, n: int,
                     stride: int) -> dict[str, tuple[np.ndarray, int, int]] | None:
    """Per member: every sample's 512-byte header (a view), the first offset and size; None if
    the headers differ other than in the key, or two neighbours share a key."""
    klen = len(key0.encode())
    keys = None
    out: dict[str, tuple[np.ndarray, int, int]] = {}
    for ext, start, size in first:
        h = _rows(buf, start - 512, n, 512, stride)
        tmpl = h[0]
        # same member name after the key, same type; key identical across the sample's members
        if not (h[:, klen:100] == tmpl[klen:100]).all() or not (h[:, 156] == tmpl[156]).all():
            return None
        if keys is None:
            keys = h[:, :klen]
        elif not (h[:, :klen] == keys).all():
            return None
        out[ext] = (h, start, size)
    if n > 1 and (keys[1:] == keys[:-1]).all(axis=1).any():
        return None  # two neighbours with one key would be one sample
    return out


def _strided_latents(data: Any, buf: np.ndarray, member: tuple[np.ndarray, int, int], n: int, stride: int,
                     shape: tuple[int, ...]) -> np.ndarray | None:
    """Identical size and ``.npy`` header for every sample → one strided float16 view."""
    h, start, size = member
    if not (h[:, 124:136] == h[0, 124:136]).all():
        return None
    try:
        arr0 = _npy_view(data, start, size)
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None
    if not _latents_ok(arr0, shape):
        return None
    hdr_len = size - arr0.nbytes
    payload = _rows(buf, start, n, size, stride)
    if not (payload[:, :hdr_len] == payload[0, :hdr_len]).all():
        return None
    lat_bytes = _rows(buf, start + hdr_len, n, arr0.nbytes, stride)
    return lat_bytes.view(np.float16).reshape((n, *arr0.shape))


def _strided_labels(buf: np.ndarray, member: tuple[np.ndarray, int, int], n: int, stride: int) -> np.ndarray | None:
    """Labels: decimal text of at most 19 digits inside one 512-byte block."""
    h, start, _ = member
    sizes = _octal_fields(h[:, 124:136])
    if (sizes < 1).any() or (sizes > 19).any():
        return None
    text = _rows(buf, start, n, 19, stride).astype(np.int64) - 48
    cols = np.arange(19)[None, :]
    inside = cols < sizes[:, None]
    if ((text < 0) | (text > 9))[inside].any():
        return None
    power = np.where(inside, sizes[:, None] - 1 - cols, 0)
    return (np.where(inside, text, 0) * (10 ** np.maximum(power, 0))).sum(axis=1)


def _parse_regular(data: bytes, expected: int, shape: tuple[int, ...]) -> _ShardData | None:
    """Vectorised parse of a shard laid out like ``ditscale prepare`` writes it (every sample the
    same members of the same sizes, so a fixed stride). ``None`` if the layout is anything else."""
    found = _first_sample(data)
    if found is None:
        return None
    key0, first, nxt = found
    n = expected
    stride = _sample_stride(first, nxt, n, len(data))
    if stride is None:
        return None
    buf = np.frombuffer(data, np.uint8)
    members = _strided_headers(buf, first, key0, n, stride)
    if members is None:
        return None
    latents = _strided_latents(data, buf, members[LATENTS_EXT], n, stride, shape)
    if latents is None:
        return None
    labels = _strided_labels(buf, members["cls"], n, stride)
    if labels is None:
        return None
    return _ShardData(latents, labels.astype(np.int64))
