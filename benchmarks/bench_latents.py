"""Streaming latents from WebDataset shards vs one .npy file per sample (fast-DiT's layout).

    python benchmarks/bench_latents.py [--quick] [--samples N] [--batch-size 256] [--workers 2] [--shuffle-buffer 1000]

Both layouts hold the same data: per sample a float16 (2, 4, 32, 32) array (the latent of
the image and of its flip, as `ditscale prepare` stores them) and a class label; fast-DiT's
layout keeps them as features/{i}.npy + labels/{i}.npy. Both are read with the same
DataLoader settings (batch size, worker processes, random flip), one full pass each:
`LatentStream` (shards dealt to workers, shuffle buffer) vs a map-style Dataset with
`DataLoader(shuffle=True)` (fast-DiT's CustomDataset). "cold" evicts the files from the page
cache first (posix_fadvise DONTNEED), i.e. the first epoch on a fresh node or after eviction.

Second table: the same shards read by WebDataset's own pipeline (the library that writes them),
``WebDataset(urls, nodesplitter=split_by_node, shardshuffle=N, detshuffle=True) .shuffle(buffer)
.decode() .to_tuple("latents.npy", "cls")``, a random flip view as float32, ``.batched(B)``,
against `LatentStream` with the same batch size, shuffle buffer and DataLoader workers (0 and
--workers). Shards are split over workers by both. "resume at k": seconds until batch k of the
pass is in hand; WebDataset has no position to seek to, so it reads and discards k batches,
`LatentStream(start_batch=k)` computes where batch k starts and reads from there. webdataset
1.0.2: the default nodesplitter raises when RANK/WORLD_SIZE say more than one process, and
shardshuffle must be set explicitly (None warns, True means 100).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dit.latents import ImageSource, LatentStream, write_shards  # noqa: E402
from dit.vae import IdentityCodec  # noqa: E402

SHAPE = (4, 32, 32)


class RandomLatents(ImageSource):
    """Deterministic pseudo-latents; with the identity codec they are stored as they are."""

    kind = "random-latents"

    def __init__(self, n: int) -> None:
        self.n = n
        self.class_names = [str(c) for c in range(1000)]
        self.image_size = SHAPE[-1]
        self.channels = SHAPE[0]

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> np.ndarray:
        return np.random.default_rng(i).standard_normal(SHAPE, dtype=np.float32)

    def label(self, i: int) -> int:
        return i % 1000


class FileDataset(torch.utils.data.Dataset):
    """fast-DiT's CustomDataset: one features .npy and one labels .npy per sample."""

    def __init__(self, root: str) -> None:
        self.feat = os.path.join(root, "features")
        self.lab = os.path.join(root, "labels")
        self.files = sorted(os.listdir(self.feat))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        x = np.load(os.path.join(self.feat, self.files[i]))
        y = np.load(os.path.join(self.lab, self.files[i]))
        # random flip and float32 in the worker, as LatentStream does
        return torch.from_numpy(x[np.random.randint(2)].astype(np.float32)), torch.from_numpy(y)


def write_files(src: RandomLatents, root: str) -> None:
    os.makedirs(os.path.join(root, "features"))
    os.makedirs(os.path.join(root, "labels"))
    for i in range(len(src)):
        x = src.load(i)
        lat = np.stack([x, x[..., ::-1]]).astype(np.float16)
        np.save(os.path.join(root, "features", f"{i}.npy"), lat)
        np.save(os.path.join(root, "labels", f"{i}.npy"), np.array([src.label(i)], dtype=np.int64))


def evict(root: str) -> bool:
    """Drop the files under root from the page cache; False if the OS does not support it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()  # dirty pages cannot be dropped
    for dirpath, _, files in os.walk(root):
        for fn in files:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def cached_fraction(root: str, limit: int = 200) -> float | None:
    """Share of a sample of the files' pages resident in the page cache (mincore); None if unknown."""
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        paths = paths[:: max(1, len(paths) // limit)][:limit]
        tot = res = 0
        for p in paths:
            size = os.path.getsize(p)
            if not size:
                continue
            with open(p, "rb") as f:
                mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n)()
            anchor = ctypes.c_char.from_buffer(mm)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
            del anchor
            mm.close()
            if rc != 0:
                return None
            tot += n
            res += sum(v & 1 for v in vec)
        return res / tot if tot else None
    except Exception:
        return None


def _timed(batches) -> tuple[float, float]:
    """(seconds to the first batch, samples/s after it)."""
    t0 = time.perf_counter()
    first = None
    seen = 0
    for x, _ in batches:
        if first is None:
            first = time.perf_counter()
        else:
            seen += len(x)
    return first - t0, seen / (time.perf_counter() - first)


def time_shards(manifest: str, n: int, batch: int, workers: int) -> tuple[float, float]:
    return _timed(LatentStream(manifest, batch, seed=0, num_workers=workers, epoch_length=n // batch, world_size=1, rank=0))


def time_files(root: str, n: int, batch: int, workers: int) -> tuple[float, float]:
    return _timed(torch.utils.data.DataLoader(FileDataset(root), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True))


def _random_view(x: np.ndarray) -> np.ndarray:
    """The latent of the image or of its flip, as float32 (what LatentStream hands out)."""
    return x[np.random.randint(2)].astype(np.float32)


def wds_loader(urls: list[str], batch: int, workers: int, buffer: int, seed: int = 0):
    import webdataset as wds

    ds = (
        wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=len(urls), detshuffle=True, seed=seed, empty_check=False)
        .shuffle(buffer, seed=seed)
        .decode()
        .to_tuple("latents.npy", "cls")
        .map_tuple(_random_view, None)
        .batched(batch, partial=False)
    )
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def _until(batches, k: int) -> float:
    """Seconds until batch ``k`` (0-based) of ``batches`` is in hand."""
    t0 = time.perf_counter()
    it = iter(batches)
    for _ in range(k + 1):
        next(it)
    dt = time.perf_counter() - t0
    del it  # stops the DataLoader workers
    return dt


def compare_webdataset(manifest, n_batches: int, batch: int, workers: int, buffer: int, repeats: int) -> list[tuple]:
    """Rows (reader, workers, samples/s, 1st batch s, resume-at-k s, k) on warm shards, each
    reader reading the first ``n_batches`` batches of a pass, resuming at ``k = n_batches // 2``."""
    from dit.latents import Manifest

    urls = Manifest.load(manifest).shard_urls()
    k = max(1, n_batches // 2)

    def wds_batches(w: int, count: int):
        return itertools.islice(wds_loader(urls, batch, w, buffer), count)

    def stream_batches(w: int, count: int, start: int = 0):
        return LatentStream(manifest, batch, seed=0, shuffle_buffer=buffer, num_workers=w, start_batch=start, epoch_length=count)

    rows = []
    for w in sorted({0, workers}):
        for name in ("webdataset pipeline", "LatentStream"):
            make = wds_batches if name == "webdataset pipeline" else stream_batches
            _timed(make(w, 2))  # start-up paths warm (imports, page cache of the first shards)
            best, resume = (0.0, 0.0), float("inf")
            for _ in range(repeats):
                first, rate = _timed(make(w, n_batches))
                best = max(best, (rate, first))
                if name == "LatentStream":  # seeks: the stream starts at batch k
                    resume = min(resume, _until(stream_batches(w, 1, start=k), 0))
                else:  # no position to seek to: read and discard k batches
                    resume = min(resume, _until(wds_batches(w, k + 1), k))
            rows.append((name, w, best[0], best[1], resume, k))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8,192 samples, one repeat, 12 batches against WebDataset (< 1 min)")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir on the working disk)")
    ap.add_argument("--shuffle-buffer", type=int, default=1000, help="sample shuffle buffer of both readers (table 2)")
    ap.add_argument("--no-webdataset", action="store_true", help="skip the WebDataset pipeline comparison")
    args = ap.parse_args()
    n = args.samples or (8192 if args.quick else 32768)
    repeats = args.repeats or (1 if args.quick else 3)
    base = tempfile.mkdtemp(prefix="bench_latents_", dir=args.dir or os.getcwd())
    try:
        src = RandomLatents(n)
        t = time.perf_counter()
        m = write_shards(src, IdentityCodec(), os.path.join(base, "shards"), shard_size=1024)
        w_sh = n / (time.perf_counter() - t)
        t = time.perf_counter()
        write_files(src, os.path.join(base, "files"))
        w_fi = n / (time.perf_counter() - t)
        print(f"{n} samples of float16 (2,{','.join(map(str, SHAPE))}), batch {args.batch_size}, {args.workers} DataLoader workers, "
              f"best of {repeats}; disk: {base}")
        print(f"write: shards {w_sh:,.0f} samples/s ({len(m.shards)} shards), files {w_fi:,.0f} samples/s\n")
        rows = []
        for cache in ("warm", "cold"):
            res = {}
            for name, fn, root in (("shards (LatentStream)", time_shards, m.url), ("one .npy per sample", time_files, os.path.join(base, "files"))):
                best, startup, resident = 0.0, 0.0, None
                for _ in range(repeats):
                    d = os.path.join(base, "shards" if fn is time_shards else "files")
                    if cache == "cold":
                        evict(d)
                    else:
                        fn(root, min(n, 8 * args.batch_size), args.batch_size, args.workers)  # warm the cache
                    resident = cached_fraction(d)
                    first, rate = fn(root, n, args.batch_size, args.workers)
                    if rate > best:
                        best, startup = rate, first
                res[name] = (best, startup, resident)
            base_rate = res["one .npy per sample"][0]
            for name, (rate, startup, resident) in res.items():
                rc = "?" if resident is None else f"{100 * resident:.0f}%"
                rows.append((cache, name, rate, rate / base_rate, startup, rc))
        print(f"{'cache':<6} {'layout':<24} {'samples/s':>10} {'vs files':>9} {'1st batch':>10} {'resident':>9}")
        for cache, name, rate, ratio, startup, rc in rows:
            print(f"{cache:<6} {name:<24} {rate:>10,.0f} {ratio:>8.1f}x {startup:>9.2f}s {rc:>9}")
        print("samples/s: steady rate after the first batch; '1st batch': start-up (worker start, first shard + shuffle buffer)")
        if not args.no_webdataset:
            n_batches = min(n // args.batch_size, 12) if args.quick else n // args.batch_size
            wrows = compare_webdataset(m.url, n_batches, args.batch_size, args.workers, args.shuffle_buffer, repeats)
            print(f"\nsame shards, warm cache, batch {args.batch_size}, shuffle buffer {args.shuffle_buffer}, "
                  f"first {n_batches} batches of a pass; resume: time until batch k={wrows[0][5]} is in hand")
            print(f"{'reader':<20} {'workers':>7} {'samples/s':>10} {'vs wds':>7} {'1st batch':>10} {'resume at k':>12}")
            ref = {w: rate for name, w, rate, *_ in wrows if name == "webdataset pipeline"}
            for name, w, rate, first, resume, _ in wrows:
                print(f"{name:<20} {w:>7} {rate:>10,.0f} {rate / ref[w]:>6.1f}x {first:>9.2f}s {resume:>11.2f}s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
