"""The stream's order as pure index arithmetic: which samples a slot reads, and when.

Nothing here reads data. A slot (one logical sub-stream of one rank) reads, in pass ``p``, a
list of units (a shard and the in-shard positions it keeps, :func:`_pass_units`); the units'
samples go through a random-replacement shuffle buffer simulated on indices
(:func:`_buffer_order`). So the pass and position of any batch follow from the settings alone
(:func:`_locate`), which is what makes resuming at batch ``k`` a seek. See
:mod:`dit.latents.stream` for the whole order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dit.errors import ConfigError


@dataclass(frozen=True)
class _Spec:
    """A stream's fixed settings: what to read and how, and everything its order depends on.
    Picklable (DataLoader workers get a copy)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sha256: tuple[str, ...]
    latent_shape: tuple[int, ...]
    batch_size: int
    seed: int
    n_slots: int
    shuffle_buffer: int
    random_flip: bool
    strict: bool
    verify: bool
    allow_pipe: bool
    scale: float = 1.0
    half: bool = False  # hand out float16 (halves the worker → trainer traffic)
    storage_options: tuple[tuple[str, Any], ...] = ()


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def _pass_units(spec: _Spec, slot: int, p: int) -> list[tuple[int, np.ndarray]]:
    """The (shard, in-shard positions) units this slot reads in pass ``p``, in order. The shard
    permutation depends on (seed, p) only, so all slots deal from the same deck."""
    n_shards = len(spec.urls)
    perm = _rng(spec.seed, 0x5348, p).permutation(n_shards)
    units = []
    if n_shards >= spec.n_slots:
        for j in perm[slot :: spec.n_slots].tolist():
            units.append((j, _rng(spec.seed, 0x5350, p, j).permutation(spec.counts[j])))
    else:  # fewer shards than slots: everyone reads every shard, keeps one residue class
        r = (slot + p) % spec.n_slots
        for j in perm.tolist():
            pos = _rng(spec.seed, 0x5350, p, j).permutation(spec.counts[j])
            units.append((j, pos[pos % spec.n_slots == r]))
    return units


def _pass_len(spec: _Spec, slot: int, p: int) -> int:
    """``sum(len(positions) for _, positions in _pass_units(...))`` without the permutations."""
    n_shards = len(spec.urls)
    if n_shards >= spec.n_slots:
        perm = _rng(spec.seed, 0x5348, p).permutation(n_shards)
        return int(sum(spec.counts[j] for j in perm[slot :: spec.n_slots].tolist()))
    r = (slot + p) % spec.n_slots
    return int(sum(max(0, (c - r + spec.n_slots - 1) // spec.n_slots) for c in spec.counts))


def _buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Output order (as input positions) of a random-replacement shuffle buffer of ``size``."""
    if size <= 1 or n <= 1:
        return np.arange(n)
    size = min(size, n)
    picks = rng.integers(0, size, n - size).tolist()
    buf = list(range(size))
    out = []
    append = out.append
    for x, k in zip(range(size, n), picks):
        append(buf[k])
        buf[k] = x
    out.extend(rng.permutation(np.asarray(buf)).tolist())
    return np.asarray(out, dtype=np.int64)


def _locate(spec: _Spec, slot: int, item: int) -> tuple[int, int]:
    """(pass, output position) of the ``item``-th item of a slot's endless sequence."""
    p = 0
    empty_run = 0
    while True:
        n = _pass_len(spec, slot, p)
        if item < n:
            return p, item
        item -= n
        empty_run = empty_run + 1 if n == 0 else 0
        if empty_run > spec.n_slots:
            raise ConfigError("the manifest lists no samples for this rank/worker")
        p += 1
