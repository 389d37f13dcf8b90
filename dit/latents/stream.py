"""Reading: an endless, deterministic, resumable stream of latent batches for every rank.

::

    stream = LatentStream("data/digits16/manifest.json", batch_size=32, seed=0,
                          rank=rank, world_size=world_size)
    for latents, labels in stream:        # FloatTensor[B,C,H,W] x scale_factor, LongTensor[B]
        ...
    ckpt["data"] = stream.state_dict()    # resume: stream.load_state_dict(ckpt["data"])

Order. The stream is infinite (bound one ``iter()`` with ``epoch_length`` batches) and a pure
function of (manifest, seed, batch_size, world_size, num_workers, shuffle_buffer, random_flip).
Every rank has ``max(1, num_workers)`` logical sub-streams; rank batch ``i`` comes from
sub-stream ``i % W`` (DataLoader workers serve them round-robin). In pass ``p`` the shards are
permuted by (seed, p) and dealt to the ``world_size * W`` slots (when there are fewer shards
than slots, every slot reads every shard and keeps the positions ``≡ slot + p`` modulo the slot
count); samples are permuted inside each shard and mixed across shards by a shuffle buffer
simulated on indices, so the position of any batch can be found without reading data: resuming
at batch ``k`` recomputes the pass and skips the shards already consumed. The index arithmetic
lives in :mod:`dit.latents.order`.

Damage. Unreadable or truncated shards and undecodable samples are skipped with a warning and
counted (``stream.skipped``, ``stream.bad_shards``); a shard's sha256 is checked against the
manifest as it is read. To keep batch shapes and positions fixed, a missing sample is replaced
by a readable one from the same shard (or, if the whole shard is lost, from the same batch).
``strict=True`` raises :class:`~dit.latents.manifest.CorruptShardError` naming the shard instead.
Even when not strict, a label outside the manifest's classes raises ``ShardLabelError``, and
data that is gone (every shard unreadable since the last readable one, e.g. an unmounted
volume) raises ``NoReadableShardsError`` naming the manifest instead of yielding nothing forever
(the rule, and why a few damaged shards never trigger it: :mod:`dit.latents.shards`).

Speed. Local shards are memory-mapped and hashed in a read-ahead thread (:mod:`dit.latents.shards`);
a shard whose sha256 matches is decoded with a few vectorised numpy operations (fixed member
layout), anything else member by member. DataLoader workers build each batch in shared memory,
converting float16 to the requested dtype and applying the scale factor in one pass
(``dtype=torch.float16`` halves the traffic to the trainer). ``benchmarks/bench_latents.py``
compares with one file per sample and with WebDataset's own pipeline.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from dit.latents.manifest import CorruptShardError, Manifest
from dit.latents.order import _buffer_order, _locate, _pass_units, _rng, _Spec
from dit.latents.shards import _fetch, _parse_shard, _ReadSpec, _Stats
from dit.errors import ConfigError
from dit.files import check_pipe

_PREFETCH = 2  # shards read (and hashed) ahead in a background thread

_Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # latents float16 (k,C,H,W) unscaled, labels (k,), valid (k,) bool


class _Unit:
    """A loaded unit's rows (in the unit's input order) until all of them are handed out."""

    __slots__ = ("rows", "labels", "remap", "sorted_outs")

    def __init__(self, rows: np.ndarray | None, labels: np.ndarray | None, sorted_outs: np.ndarray) -> None:
        self.rows = rows  # (len, C, H, W) float16; None: the whole shard was lost
        self.labels = labels
        self.remap: np.ndarray | None = None  # after compaction: unit row → compacted row
        self.sorted_outs = sorted_outs


class _PassReader:
    """One pass of one slot from output position ``t0``. Units are loaded once each, in input
    order (shards read ahead in ``pool``); an output position is handed out as soon as the
    unit holding its input is loaded, and a unit is freed once all its rows are out."""

    def __init__(self, spec: _Spec, slot: int, p: int, units: list[tuple[int, np.ndarray]], t0: int, stats: _Stats, pool: Any) -> None:
        self.spec, self.units, self.t0, self.stats, self.pool = spec, units, t0, stats, pool
        self.lens = [len(pos) for _, pos in units]
        n = self.n = sum(self.lens)
        # the shuffle buffer, simulated on indices: output position t takes input out2in[t]
        self.out2in = _buffer_order(n, spec.shuffle_buffer, _rng(spec.seed, 0x5342, slot, p))
        self.in2out = np.empty(n, dtype=np.int64)
        self.in2out[self.out2in] = np.arange(n)
        self.flips = _rng(spec.seed, 0x5346, slot, p).integers(0, 2, n) if spec.random_flip else None
        self.bounds = np.cumsum([0] + self.lens)
        self.unit_of_in = np.repeat(np.arange(len(units)), self.lens)
        self.live: dict[int, _Unit] = {}
        # a resumed pass reads only the units that still hold an output at or after t0
        self.to_read = [u for u in range(len(units)) if self.lens[u] and self.in2out[self.bounds[u] : self.bounds[u + 1]].max() >= t0]
        self.futures: dict[int, Any] = {}
        self.next_submit = 0

    def _prefetch(self) -> None:
        while self.next_submit < len(self.to_read) and len(self.futures) < _PREFETCH:
            u = self.to_read[self.next_submit]
            self.futures[u] = self.pool.submit(_fetch, self.spec, self.units[u][0])
            self.next_submit += 1

    def chunks(self) -> Iterator[_Chunk]:
        t = self.t0
        for u in range(len(self.units)):
            lo, hi = int(self.bounds[u]), int(self.bounds[u + 1])
            if lo == hi:
                continue
            if u in self.futures or (self.next_submit < len(self.to_read) and self.to_read[self.next_submit] == u):
                self._load(u, lo, hi)
            # hand out every output position whose input is now available
            end = t
            while end < self.n and self.out2in[end] < hi:
                end += 1
            if end == t:
                continue
            chunk = self._gather(t, end)
            t = end
            yield chunk
            self._release(t)

    def _load(self, u: int, lo: int, hi: int) -> None:
        """Read unit ``u``'s shard and keep its rows (float16 copies) for the outputs to come."""
        j, positions = self.units[u]
        outs = self.in2out[lo:hi]
        self._prefetch()
        fetched = self.futures.pop(u).result()
        self._prefetch()
        shard = _parse_shard(self.spec, j, fetched, self.stats)
        del fetched
        nvalid = len(shard.labels)
        need = outs >= self.t0
        self.stats.skipped += int(need.sum()) if nvalid == 0 else int((need & (positions >= nvalid)).sum())
        if nvalid == 0:
            self.live[u] = _Unit(None, None, np.sort(outs))
        else:
            # positions past the readable samples are replaced by readable ones of the same shard
            sidx = positions % nvalid if (positions >= nvalid).any() else positions
            vidx = self.flips[outs] if self.flips is not None and shard.latents.shape[1] == 2 else 0
            self.live[u] = _Unit(shard.latents[sidx, vidx], shard.labels[sidx], np.sort(outs))

    def _gather(self, t: int, end: int) -> _Chunk:
        """Output positions ``t .. end-1`` from the live units (``valid`` false: shard lost)."""
        ins = self.out2in[t:end]
        uu = self.unit_of_in[ins]
        rr = ins - self.bounds[uu]
        k = end - t
        lat = np.empty((k, *self.spec.latent_shape), dtype=np.float16)
        lab = np.zeros(k, dtype=np.int64)
        valid = np.ones(k, dtype=bool)
        for v in np.unique(uu).tolist():
            m = uu == v
            unit = self.live[v]
            if unit.rows is None:
                valid[m] = False
                continue
            idx = rr[m] if unit.remap is None else unit.remap[rr[m]]
            lat[m] = unit.rows[idx]
            lab[m] = unit.labels[idx]
        return lat, lab, valid

    def _release(self, t: int) -> None:
        """Free units that are done; compact the ones kept alive by a few buffered stragglers
        (a big shuffle buffer would otherwise keep many whole shards in memory)."""
        for v in list(self.live):
            unit = self.live[v]
            remaining = len(unit.sorted_outs) - int(np.searchsorted(unit.sorted_outs, t))
            if remaining == 0:
                del self.live[v]
            elif unit.rows is not None and remaining * 8 < len(unit.rows) and len(unit.rows) >= 64:
                lo_v = int(self.bounds[v])
                keep = np.nonzero(self.in2out[lo_v : lo_v + self.lens[v]] >= t)[0]
                rows_idx = keep if unit.remap is None else unit.remap[keep]
                remap = np.full(self.lens[v], -1, dtype=np.int64)
                remap[keep] = np.arange(len(keep))
                unit.rows, unit.labels, unit.remap = unit.rows[rows_idx], unit.labels[rows_idx], remap


def _pass_chunks(spec: _Spec, slot: int, p: int, t0: int, stats: _Stats, pool: Any) -> Iterator[_Chunk]:
    """Pass ``p`` of a slot from output position ``t0``, as consecutive chunks
    ``(latents float16 (k,C,H,W) unscaled, labels (k,), valid (k,) bool)`` in output order."""
    units = _pass_units(spec, slot, p)
    if sum(len(pos) for _, pos in units) <= t0:
        return
    yield from _PassReader(spec, slot, p, units, t0, stats, pool).chunks()


def _slot_chunks(spec: _Spec, slot: int, p: int, t: int, stats: _Stats, pool: Any) -> Iterator[_Chunk]:
    """A slot's endless sequence from pass ``p``, position ``t``: pass after pass."""
    empty_run = 0
    while True:
        got = False
        for c in _pass_chunks(spec, slot, p, t, stats, pool):
            got = True
            yield c
        empty_run = 0 if got else empty_run + 1
        if empty_run > spec.n_slots + 1:
            raise ConfigError("the manifest lists no samples for this rank/worker")
        p, t = p + 1, 0


def _rebatch(chunks: Iterator[_Chunk], B: int) -> Iterator[_Chunk]:
    """Chunks of any size regrouped into batches of exactly ``B`` (pulled only as needed)."""
    held: list[_Chunk] = []
    have = 0
    while True:
        while have < B:
            c = next(chunks)
            held.append(c)
            have += len(c[1])
        if len(held) == 1 and have == B:
            yield held[0]
            held, have = [], 0
            continue
        lat_all = np.concatenate([c[0] for c in held]) if len(held) > 1 else held[0][0]
        lab_all = np.concatenate([c[1] for c in held]) if len(held) > 1 else held[0][1]
        val_all = np.concatenate([c[2] for c in held]) if len(held) > 1 else held[0][2]
        held = [(lat_all[B:], lab_all[B:], val_all[B:])] if have > B else []
        have -= B
        yield lat_all[:B], lab_all[:B], val_all[:B]


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it is born in shared memory (as
    torch's default_collate does) so handing it to the trainer copies nothing."""
    if shared:
        try:
            numel = int(np.prod(shape))
            storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
            return torch.empty(0, dtype=dtype).new(storage).view(shape)
        except Exception:  # pragma: no cover - private API moved; fall back to a copy on send
            pass
    return torch.empty(shape, dtype=dtype)


def _batch_tensors(spec: _Spec, lat: np.ndarray, lab: np.ndarray, valid: np.ndarray, in_worker: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A full batch (at least one valid row) as scaled latents and labels."""
    B = spec.batch_size
    n_ok = int(valid.sum())
    if n_ok < B:  # a lost shard: refill from this batch's readable samples
        src = np.nonzero(valid)[0]
        dst = np.nonzero(~valid)[0]
        fill = src[np.arange(len(dst)) % n_ok]
        lat = lat.copy()
        lab = lab.copy()
        lat[dst], lab[dst] = lat[fill], lab[fill]
    out = _new_tensor((B, *spec.latent_shape), torch.float16 if spec.half else torch.float32, in_worker)
    if spec.half and spec.scale == 1.0:
        out.numpy()[...] = lat
    else:  # one pass: float16 → float32, times the scale (rounded to float16 if asked)
        np.multiply(lat, np.float32(spec.scale), out=out.numpy(), dtype=np.float32)
    labels = _new_tensor((B,), torch.long, in_worker)
    labels.numpy()[...] = lab
    return out, labels


def _slot_batches(spec: _Spec, slot: int, first: int, count: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, tuple[str, ...]]]:
    """Batches ``first, first+1, …`` (``count`` of them, or endless) of one slot's sequence as
    scaled float32, each with the skip count and damaged-shard names since the previous one."""
    stats = _Stats()
    p, t = _locate(spec, slot, first * spec.batch_size)
    pool = ThreadPoolExecutor(1, thread_name_prefix="latent-prefetch")
    in_worker = torch.utils.data.get_worker_info() is not None
    try:
        batches = _rebatch(_slot_chunks(spec, slot, p, t, stats, pool), spec.batch_size)
        done = 0
        empty = torch.empty(0)
        while count is None or done < count:
            lat, lab, valid = next(batches)
            skipped, bad = stats.take()
            if not valid.any():
                yield empty, empty.long(), skipped, bad  # position advances; nothing to train on
            else:
                yield (*_batch_tensors(spec, lat, lab, valid, in_worker), skipped, bad)
            done += 1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class _WorkerDataset(torch.utils.data.IterableDataset):
    """One rank's batches, served round-robin by ``W`` DataLoader workers."""

    def __init__(self, spec: _Spec, rank: int, workers: int, start: int, stop: int | None) -> None:
        super().__init__()
        self.spec, self.rank, self.workers, self.start, self.stop = spec, rank, workers, start, stop

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        j = info.id if info is not None else 0
        W = self.workers
        if info is not None and info.num_workers != W:
            raise RuntimeError(f"LatentStream planned {W} workers, DataLoader has {info.num_workers}")
        first_global = self.start + j  # DataLoader asks worker j for batches start+j, start+j+W, …
        logical = first_global % W
        count = None if self.stop is None else len(range(first_global, self.stop, W))
        return _slot_batches(self.spec, self.rank * W + logical, first_global // W, count)


def _open_manifest(manifest: "str | os.PathLike[str] | Manifest", allow_pipe: bool, storage_options: Mapping[str, Any] | None) -> Manifest:
    """The manifest, its shard URLs checked (``pipe:`` only with ``allow_pipe``), float16, not empty."""
    if isinstance(manifest, Manifest):
        m = manifest
        for u in manifest.shard_urls():
            check_pipe(u, allow_pipe)
    else:
        m = Manifest.load(manifest, allow_pipe=allow_pipe, storage_options=storage_options)
    if m.dtype != "float16":
        raise ConfigError(f"manifest {m.url}: dtype {m.dtype!r} is not supported (float16)")
    if not m.shards or m.num_samples <= 0:
        raise ConfigError(f"manifest {m.url}: lists no samples. Fix: rerun `ditscale prepare`")
    return m


def _check_settings(rank: int, world_size: int, batch_size: int, num_workers: int, epoch_length: int | None) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"num_workers {num_workers}: must be >= 0")
    if epoch_length is not None and epoch_length < 1:
        raise ConfigError(f"epoch_length {epoch_length}: must be >= 1 or None")


def _unwrapped(source: Any) -> Iterator[Any]:
    """``source``'s items; a shard error re-raised by a DataLoader gets back its own message (the
    DataLoader prefixes the worker's traceback, which would bury the shard's name)."""
    try:
        yield from source
    except CorruptShardError as err:
        text, mark = str(err), f"{type(err).__name__}: "
        if text.startswith("Caught ") and mark in text:
            raise type(err)(text.rsplit(mark, 1)[1].strip()) from None
        raise


class LatentStream:
    """Endless, deterministic, resumable ``(latents, labels)`` batches from a manifest.

    ``latents`` is ``FloatTensor[B, C, H, W]`` already multiplied by the manifest's scale
    factor; ``labels`` is ``LongTensor[B]``. ``rank``/``world_size`` (default 0 and 1: one
    process reads everything) say which share of the order this process reads; the caller
    passes them (``dit.train`` from its process group); the stream never reads the environment.
    ``num_workers`` DataLoader worker processes are started by the stream itself. ``epoch_length``
    bounds one ``iter()`` (in batches of this rank); the next ``iter()`` continues where the last
    stopped. ``position`` counts the batches handed out; ``state_dict()`` saves it (and the
    settings that define the order), ``start_batch``/``load_state_dict``/``skip`` resume exactly.
    ``skipped`` counts damaged samples replaced so far, ``bad_shards`` names damaged shards.
    ``dtype`` is the latents' dtype (float32 default; float16 is produced in the workers).
    """

    def __init__(
        self,
        manifest: "str | os.PathLike[str] | Manifest",
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        random_flip: bool = True,
        num_workers: int = 0,
        start_batch: int = 0,
        epoch_length: int | None = None,
        strict: bool = False,
        verify: bool = True,
        allow_pipe: bool = False,
        dtype: torch.dtype = torch.float32,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.manifest = _open_manifest(manifest, allow_pipe, storage_options)
        self.rank = int(rank)
        self.world_size = int(world_size)
        _check_settings(self.rank, self.world_size, batch_size, num_workers, epoch_length)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.random_flip = bool(random_flip)
        self.num_workers = int(num_workers)
        self.epoch_length = epoch_length
        self.dtype = dtype
        self.position = int(start_batch)
        self.skipped = 0
        self.bad_shards: set[str] = set()
        self._spec = self._make_spec(strict, verify, allow_pipe, storage_options)

    def _make_spec(self, strict: bool, verify: bool, allow_pipe: bool, storage_options: Mapping[str, Any] | None) -> _Spec:
        m = self.manifest
        return _ReadSpec(
            urls=tuple(m.shard_urls()),
            counts=tuple(s.count for s in m.shards),
            sha256=tuple(s.sha256 for s in m.shards),
            latent_shape=tuple(m.latent_shape),
            batch_size=self.batch_size,
            seed=self.seed,
            n_slots=self.world_size * max(1, self.num_workers),
            shuffle_buffer=self.shuffle_buffer,
            random_flip=self.random_flip and m.flip,
            strict=bool(strict),
            verify=bool(verify),
            allow_pipe=bool(allow_pipe),
            scale=float(m.scale_factor),
            half=self.dtype == torch.float16,
            storage_options=tuple(sorted((storage_options or {}).items())),
            manifest=m.url or "",
            num_classes=m.num_classes,
        )

    @property
    def scale_factor(self) -> float:
        return self.manifest.scale_factor

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("LatentStream is endless; set epoch_length to give it a length")
        return self.epoch_length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self.position
        stop = None if self.epoch_length is None else start + self.epoch_length
        W = max(1, self.num_workers)
        if self.num_workers == 0:
            source: Any = _slot_batches(self._spec, self.rank, start, None if stop is None else stop - start)
        else:
            source = torch.utils.data.DataLoader(
                _WorkerDataset(self._spec, self.rank, W, start, stop), batch_size=None, num_workers=W
            )
        for lat, lab, skipped, bad in _unwrapped(source):
            self.position += 1
            self.skipped += int(skipped)
            self.bad_shards.update(bad)
            if lat.numel() == 0:
                continue
            yield (lat if lat.dtype == self.dtype else lat.to(self.dtype)), lab

    def skip(self, n_batches: int) -> None:
        """Advance the position without reading (cheap)."""
        self.position += int(n_batches)

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shuffle_buffer": self.shuffle_buffer,
            "random_flip": self.random_flip,
            "num_samples": self.manifest.num_samples,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in ("seed", "batch_size", "world_size", "num_workers", "shuffle_buffer", "random_flip", "num_samples"):
            if k in state and state[k] != getattr(self, k, None if k != "num_samples" else self.manifest.num_samples):
                mine = self.manifest.num_samples if k == "num_samples" else getattr(self, k)
                raise ConfigError(
                    f"data-stream state: {k}={state[k]!r} was saved, this stream has {mine!r}; resuming would not "
                    "reproduce the data order. Fix: build the stream with the saved settings"
                )
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))

    def stats(self) -> dict[str, Any]:
        return {"position": self.position, "skipped": self.skipped, "bad_shards": sorted(self.bad_shards)}
