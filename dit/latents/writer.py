"""Writing shards: encode a data set once into WebDataset tar shards (``ditscale prepare``).

In one process::

    source = make_digits(16)                        # or ImageFolderSource(root, 256)
    manifest = write_shards(source, IdentityCodec(), "data/digits16")

or planned here and fanned out (the Ray fan-out lives in ``orchestrator/prepare.py``)::

    job = begin_prepare(source, codec, out_dir)      # picklable
    for j in job.pending: job.write_shard(j, codec)  # in any process
    manifest = job.finish()

Inputs are assigned to shards by a seeded permutation (:class:`ShardPlan`, classes mixed), so
reruns write the same shards, byte for byte (tar headers carry no owner and mtime 0). Each
shard is written under a temporary name and renamed (:func:`dit.files.atomic_path`), then a
completion record goes to ``DIR/.prepare/``; a rerun skips finished shards and sweeps the
temporary files a killed writer left (shards, records, manifest, feature files). A label outside
the source's classes is refused, naming the shard and the input. ``DIR/manifest.json`` is
written last, by ``finish()``, which first calls the caller's ``feature_nets`` (for the digits:
the small classifier behind digits FID, see ``dit.evaluate.features``) and records what it
returns under the manifest's ``features``. The member layout is described in
:mod:`dit.latents.manifest`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from dit.latents.manifest import (
    CONFIG_NAME,
    FEATURES_DIR,
    FORMAT_VERSION,
    LATENTS_EXT,
    MANIFEST_NAME,
    SHARD_PATTERN,
    STATE_DIR,
    Manifest,
    ShardInfo,
    _tool_version,
    record_path,
    shard_name,
)
from dit.latents.sources import ImageSource
from dit.errors import ConfigError
from dit.files import atomic_path, atomic_write_json, remove_stale_temps

if TYPE_CHECKING:  # pragma: no cover
    from dit.vae import Codec

DEFAULT_MAX_SHARD_SIZE = 1024
DEFAULT_MIN_SHARDS = 16

FeatureNets = Callable[[ImageSource, str, int], Mapping[str, Any]]  # (source, out_dir, seed) → manifest 'features'


@dataclass(frozen=True)
class ShardPlan:
    """Deterministic assignment of inputs to shards: a seeded permutation cut into runs."""

    num_inputs: int
    shard_size: int
    shuffle_seed: int = 0

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_inputs / self.shard_size))

    @cached_property
    def order(self) -> np.ndarray:
        return np.random.default_rng([self.shuffle_seed, 0x504C414E]).permutation(self.num_inputs)

    def members(self, j: int) -> np.ndarray:
        return self.order[j * self.shard_size : (j + 1) * self.shard_size]

    name = staticmethod(shard_name)


def _default_shard_size(n: int) -> int:
    return max(1, min(DEFAULT_MAX_SHARD_SIZE, math.ceil(n / DEFAULT_MIN_SHARDS)))


def _sample_bytes(latent_shape: Sequence[int], flip: bool) -> int:
    """Bytes one sample takes in a shard (three tar headers, the padded .npy, cls and src.txt)."""
    payload = (2 if flip else 1) * int(np.prod(latent_shape)) * 2 + 128
    return 512 * 3 + 512 * math.ceil(payload / 512) + 2 * 512


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PrepareJob:
    """A planned ``prepare``: picklable, so shards can be written by any process
    (``write_shard(j, codec)``), then ``finish()`` assembles the manifest."""

    out_dir: str
    source: ImageSource
    encoder: dict[str, Any]
    latent_shape: tuple[int, ...]
    plan: ShardPlan
    flip: bool
    encode_seed: int
    encode_batch: int
    config: dict[str, Any]
    config_hash: str
    pending: list[int]
    load_threads: int = 1
    feature_nets: FeatureNets | None = None  # (source, out_dir, seed) → manifest 'features'

    def _record_path(self, j: int) -> str:
        return record_path(self.out_dir, j)

    def is_complete(self, j: int) -> bool:
        try:
            with open(self._record_path(j)) as f:
                rec = json.load(f)
            size = os.path.getsize(os.path.join(self.out_dir, shard_name(j)))
        except (OSError, ValueError):
            return False
        return rec.get("config_hash") == self.config_hash and rec.get("bytes") == size

    # -- one shard -------------------------------------------------------------------------

    def write_shard(self, j: int, codec: "Codec") -> dict[str, Any]:
        """Encode shard ``j`` and write it atomically; returns its completion record."""
        if codec.manifest_fields() != self.encoder:
            raise ConfigError(f"shard {j}: codec {codec.manifest_fields()} differs from the planned encoder {self.encoder}")
        name = shard_name(j)
        skipped: list[dict[str, str]] = []
        with atomic_path(os.path.join(self.out_dir, name)) as tmp:
            with open(tmp, "wb") as f:
                count = self._write_tar(f, j, codec, skipped)
                f.flush()
                os.fsync(f.fileno())
            sha256, size = _file_sha256(tmp), os.path.getsize(tmp)
        rec = {"name": name, "count": count, "sha256": sha256, "bytes": size, "skipped": skipped, "config_hash": self.config_hash}
        atomic_write_json(self._record_path(j), rec, indent=None)
        return rec

    def _write_tar(self, f: BinaryIO, j: int, codec: "Codec", skipped: list[dict[str, str]]) -> int:
        """Encode shard ``j``'s inputs into the tar stream ``f``; returns the samples written.
        Unreadable inputs are appended to ``skipped``."""
        from webdataset import TarWriter

        gen = self._latent_generator(codec, j)
        # no owner, mtime 0: a rerun writes the same bytes
        writer = TarWriter(f, user="", group="", mtime=0, encoder=False)
        count = 0
        with closing(self._loaded_chunks(self.plan.members(j).tolist())) as loaded:
            for results in loaded:
                images, ok = [], []
                for idx, img, err in results:
                    if img is None:
                        skipped.append({"key": self.source.key(idx), "error": err or "unreadable"})
                    else:
                        self._check_label(j, idx)
                        images.append(img)
                        ok.append(idx)
                if not images:
                    continue
                z = self._encode(codec, images, gen)
                for k, idx in enumerate(ok):
                    writer.write(self._sample(idx, z, k, len(ok)))
                    count += 1
        writer.close()
        return count

    def _check_label(self, j: int, idx: int) -> None:
        """Refuse a label outside the source's classes: the manifest's ``num_classes`` sizes the
        model's class embedding, and a label past it is a device-side assert on CUDA."""
        label, n = int(self.source.label(idx)), len(self.source.class_names)
        if not 0 <= label < n:
            raise ConfigError(
                f"shard {shard_name(j)}: input {self.source.key(idx)!r} has label {label}, outside the "
                f"{n} classes [0, {n}) of the {getattr(self.source, 'kind', '?')} source. Fix: give every "
                "input a label in range (or list all class names)"
            )

    def _latent_generator(self, codec: "Codec", j: int) -> torch.Generator | None:
        """Sampled (not mean) latents draw from a generator seeded per shard, so any process
        writing shard ``j`` writes the same bytes."""
        if self.encoder.get("latent_dist") != "sample":
            return None
        device = getattr(codec, "device", torch.device("cpu"))
        return torch.Generator(device=device).manual_seed(int(self.encode_seed) * 1_000_003 + j)

    def _load(self, idx: int) -> tuple[int, np.ndarray | None, str | None]:
        want_shape = (self.source.channels, self.source.image_size, self.source.image_size)
        try:
            img = self.source.load(idx)
            if img.shape != want_shape:
                raise ValueError(f"image shape {img.shape}, expected {want_shape}")
            return idx, img, None
        except Exception as err:  # noqa: BLE001 - any unreadable input is skipped and listed
            return idx, None, f"{type(err).__name__}: {err}"[:300]

    def _loaded_chunks(self, members: list[int]) -> Iterator[list[tuple[int, np.ndarray | None, str | None]]]:
        """``_load`` results, ``encode_batch`` inputs at a time, in member order."""
        chunks = [members[lo : lo + self.encode_batch] for lo in range(0, len(members), self.encode_batch)]
        # image decoding (PIL releases the GIL) runs in threads, one chunk ahead of the encoder
        pool = ThreadPoolExecutor(self.load_threads) if self.load_threads > 1 else None

        def submit(chunk: list[int]) -> list[Any]:
            return [pool.submit(self._load, i) for i in chunk] if pool else chunk

        try:
            ahead = submit(chunks[0]) if chunks else []
            for ci in range(len(chunks)):
                results = [fut.result() for fut in ahead] if pool else [self._load(i) for i in ahead]
                if ci + 1 < len(chunks):
                    ahead = submit(chunks[ci + 1])
                yield results
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, codec: "Codec", images: list[np.ndarray], gen: torch.Generator | None) -> np.ndarray:
        """float16 latents of ``images`` and then (with flips) of their mirror images."""
        x = torch.from_numpy(np.stack(images)).to(getattr(codec, "device", "cpu"), non_blocking=True)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        z = codec.encode(x, generator=gen).numpy().astype(np.float16)
        if tuple(z.shape[1:]) != tuple(self.latent_shape):
            raise RuntimeError(f"codec produced latents {tuple(z.shape[1:])}, planned {self.latent_shape}")
        return z

    def _sample(self, idx: int, z: np.ndarray, k: int, n: int) -> dict[str, Any]:
        """The tar members of input ``idx``, the ``k``-th of ``n`` encoded together."""
        lat = np.stack([z[k], z[n + k]]) if self.flip else z[k : k + 1]
        return {
            "__key__": f"{idx:08d}",
            "cls": str(self.source.label(idx)).encode(),
            LATENTS_EXT: _npy_bytes(lat),
            "src.txt": self.source.key(idx).encode(),
        }

    # -- the whole job ---------------------------------------------------------------------

    def run_local(self, codec: "Codec", progress: Any = None) -> None:
        """Write the pending shards in this process."""
        for done, j in enumerate(list(self.pending), 1):
            rec = self.write_shard(j, codec)
            if progress:
                progress(done, len(self.pending), rec)
        self.pending = [j for j in self.pending if not self.is_complete(j)]

    def finish(self) -> Manifest:
        """Assemble and atomically write ``manifest.json`` from the shard records."""
        recs = []
        missing = []
        for j in range(self.plan.num_shards):
            if not self.is_complete(j):
                missing.append(shard_name(j))
                continue
            with open(self._record_path(j)) as f:
                recs.append(json.load(f))
        if missing:
            raise RuntimeError(f"{self.out_dir}: shards not written yet: {', '.join(missing[:5])} (rerun prepare to resume)")
        skipped = list(self.source.prescan_skipped) + [s for r in recs for s in r["skipped"]]
        total = sum(r["count"] for r in recs)
        if total == 0:
            raise ConfigError(
                f"{self.config['source'].get('root', self.config['source'].get('kind'))}: no readable images "
                f"({len(skipped)} inputs skipped, e.g. {skipped[0]['key'] if skipped else '-'}). Fix: check the files are images PIL can open"
            )
        # Feature networks trained on this data (the digits classifier behind digits FID) come
        # from the caller: the writer knows shards, not evaluation (see dit.evaluate.features).
        features = dict(self.feature_nets(self.source, self.out_dir, self.encode_seed)) if self.feature_nets else {}
        manifest = Manifest(
            num_samples=total,
            shards=[ShardInfo(r["name"], r["count"], r["sha256"], r["bytes"]) for r in recs if r["count"] > 0],
            latent_shape=tuple(self.latent_shape),
            dtype="float16",
            scale_factor=float(self.encoder["scale_factor"]),
            encoder=dict(self.encoder),
            class_names=list(self.source.class_names),
            image_size=int(self.source.image_size),
            flip=self.flip,
            source=self.source.describe(),
            skipped_inputs=sorted(skipped, key=lambda s: s["key"]),
            tool_version=_tool_version(),
            config=self.config,
            config_hash=self.config_hash,
            features=features,
        )
        path = os.path.join(self.out_dir, MANIFEST_NAME)
        try:  # atomic: a failed write leaves neither a half manifest nor its temporary file
            manifest.save(path)
        except OSError as err:
            raise ConfigError(
                f"{path}: cannot write the manifest ({err}). The shards are kept: free space or fix the "
                "folder's permissions, then rerun prepare (it writes only the manifest)"
            ) from err
        manifest.url = path
        return manifest


# ---------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------


def _clean_output(out_dir: str) -> None:
    for p in glob.glob(os.path.join(out_dir, "shard-*.tar*")):
        os.remove(p)
    shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        os.remove(os.path.join(out_dir, MANIFEST_NAME))


def _check_options(out: str, source: ImageSource, shard_size: int | None, shard_bytes: int | None, encode_batch: int) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: is a file. Fix: pass a folder (it is created if missing)")
    if len(source) == 0:
        raise ConfigError(f"{source.describe()}: no inputs")
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be >= 1")
    if shard_bytes is not None and shard_bytes < 1:
        raise ConfigError(f"--shard-bytes {shard_bytes}: must be >= 1")
    if encode_batch < 1:
        raise ConfigError(f"--encode-batch {encode_batch}: must be >= 1")


def _prepare_config(source: ImageSource, encoder: dict[str, Any], latent_shape: tuple[int, ...], flip: bool, plan: ShardPlan,
                    shuffle_seed: int, encode_seed: int) -> dict[str, Any]:
    """The settings that fix the shards' bytes (their hash is the shard set's fingerprint)."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source.describe(),
        "image_size": int(source.image_size),
        "encoder": encoder,
        "latent_shape": list(latent_shape),
        "flip": bool(flip),
        "shard_size": plan.shard_size,
        "shuffle_seed": int(shuffle_seed),
        "encode_seed": int(encode_seed),
    }


def _refuse_other_settings(out: str, config: dict[str, Any], chash: str) -> None:
    """Raise if ``out`` holds a manifest or a planned config made with other settings: mixing
    shards of two configurations would silently corrupt the data set."""
    for existing_path in (os.path.join(out, MANIFEST_NAME), os.path.join(out, STATE_DIR, CONFIG_NAME)):
        try:
            with open(existing_path) as f:
                existing = json.load(f)
        except FileNotFoundError:
            continue
        except ValueError:
            raise ConfigError(f"{existing_path}: unreadable. Fix: pass --overwrite to rebuild {out}") from None
        old = existing.get("config", existing) if existing_path.endswith(MANIFEST_NAME) else existing
        if _config_hash(old) != chash:
            a, b = _flatten(old), _flatten(config)
            diffs = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise ConfigError(
                f"--out {out}: holds shards made with other settings ({'; '.join(diffs[:4]) or 'unknown'}). "
                "Fix: choose another --out folder, or pass --overwrite to replace them"
            )


def _remove_stale_temps(out: str) -> None:
    """Sweep what a killed writer left (shards, records, config, manifest, feature files, all
    ``NAME.tmp-XXXXXXXX``): nothing else removes them, and a copy or upload of the folder
    would carry them along."""
    remove_stale_temps(out, SHARD_PATTERN)
    remove_stale_temps(out, MANIFEST_NAME)
    remove_stale_temps(os.path.join(out, STATE_DIR))
    if os.path.isdir(os.path.join(out, FEATURES_DIR)):
        remove_stale_temps(os.path.join(out, FEATURES_DIR))


def _load_threads(source: ImageSource, load_threads: int | None) -> int:
    if load_threads is None:
        return min(8, os.cpu_count() or 1) if getattr(source, "parallel_load", False) else 1
    return max(1, int(load_threads))


def begin_prepare(
    source: ImageSource,
    codec: "Codec",
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int | None = None,
    shard_bytes: int | None = None,
    flip: bool = True,
    shuffle_seed: int = 0,
    encode_seed: int = 0,
    encode_batch: int = 32,
    overwrite: bool = False,
    load_threads: int | None = None,
    feature_nets: FeatureNets | None = None,
) -> PrepareJob:
    """Check the output folder, plan the shards, and list the ones still to write.

    A folder holding shards or a manifest made with different settings (encoder, image size,
    inputs, shard size, …) is refused unless ``overwrite`` (which deletes them).
    ``feature_nets(source, out_dir, seed)``: called by ``finish()``; its records go under the
    manifest's ``features`` (``dit.evaluate.features.digits_feature_nets`` trains the digits FID classifier)."""
    out = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    _check_options(out, source, shard_size, shard_bytes, encode_batch)
    latent_shape = tuple(int(x) for x in codec.latent_shape(source.channels, source.image_size))
    if shard_size is None:
        shard_size = max(1, shard_bytes // _sample_bytes(latent_shape, flip)) if shard_bytes else _default_shard_size(len(source))
    plan = ShardPlan(len(source), int(shard_size), int(shuffle_seed))
    encoder = codec.manifest_fields()
    config = _prepare_config(source, encoder, latent_shape, flip, plan, shuffle_seed, encode_seed)
    chash = _config_hash(config)
    if overwrite:
        _clean_output(out)
    else:
        _refuse_other_settings(out, config, chash)
    state = os.path.join(out, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    _remove_stale_temps(out)
    atomic_write_json(os.path.join(state, CONFIG_NAME), config, indent=1)
    job = PrepareJob(out, source, encoder, latent_shape, plan, bool(flip), int(encode_seed), int(encode_batch), config, chash, [],
                     _load_threads(source, load_threads), feature_nets)
    job.pending = [j for j in range(plan.num_shards) if not job.is_complete(j)]
    return job


def write_shards(source: ImageSource, codec: "Codec", out_dir: str | os.PathLike[str], *, progress: Any = None, **options: Any) -> Manifest:
    """Encode ``source`` with ``codec`` into shards under ``out_dir`` in this process (resuming
    an interrupted run) and return the manifest. Options: see :func:`begin_prepare`."""
    job = begin_prepare(source, codec, out_dir, **options)
    job.run_local(codec, progress)
    return job.finish()
