"""Latent shards: encode a data set once into WebDataset tar shards, stream them to every worker.

Writing (``ditscale prepare``; the Ray fan-out lives in ``orchestrator/prepare.py``)::

    source = make_digits(16)                        # or ImageFolderSource(root, 256)
    manifest = write_shards(source, IdentityCodec(), "data/digits16")

Each shard ``shard-NNNNNN.tar`` holds, per sample ``KEY`` (the input's index, 8 digits):
``KEY.latents.npy`` (float16, ``(V, C, H, W)``: V=2 holds the latent of the image and of its
horizontal flip, V=1 without flips), ``KEY.cls`` (class index as text) and ``KEY.src.txt``
(the source key, e.g. ``n01440764/img.JPEG``). Latents are stored *unscaled*. Inputs are
assigned to shards by a seeded permutation (classes mixed), so reruns write the same shards;
each shard is written under a temporary name and renamed, with a completion record in
``DIR/.prepare/``; a rerun skips finished shards. ``DIR/manifest.json`` is written last.
For the digits, ``finish()`` first trains the small classifier behind digits FID
(``DIR/features/digits_classifier.pt``, seeded, kept on reruns; see ``dit.features``) and
records it under the manifest's ``features``.

Reading::

    stream = LatentStream("data/digits16/manifest.json", batch_size=32, seed=0)
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
at batch ``k`` recomputes the pass and skips the shards already consumed.

Damage. Unreadable or truncated shards and undecodable samples are skipped with a warning and
counted (``stream.skipped``, ``stream.bad_shards``); a shard's sha256 is checked against the
manifest as it is read. To keep batch shapes and positions fixed, a missing sample is replaced
by a readable one from the same shard (or, if the whole shard is lost, from the same batch).
``strict=True`` raises :class:`CorruptShardError` naming the shard instead.

Speed. Local shards are memory-mapped and hashed in a read-ahead thread; a shard whose sha256
matches is decoded with a few vectorised numpy operations (fixed member layout), anything else
member by member. DataLoader workers build each batch in shared memory, converting float16 to
the requested dtype and applying the scale factor in one pass (``dtype=torch.float16`` halves
the traffic to the trainer). ``benchmarks/bench_latents.py`` compares with one file per sample.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import math
import mmap
import os
import shutil
import subprocess
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from dit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from dit.vae import Codec

__all__ = [
    "MANIFEST_NAME",
    "CorruptShardError",
    "ShardWarning",
    "center_crop_arr",
    "ImageSource",
    "ArraySource",
    "DigitsSource",
    "ImageFolderSource",
    "make_digits",
    "ShardInfo",
    "Manifest",
    "ShardPlan",
    "PrepareJob",
    "begin_prepare",
    "write_shards",
    "LatentStream",
]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
STATE_DIR = ".prepare"
LATENTS_EXT = "latents.npy"
DEFAULT_MAX_SHARD_SIZE = 1024
DEFAULT_MIN_SHARDS = 16


class CorruptShardError(ConfigError):
    """A shard is missing, truncated, undecodable or fails its sha256 (``strict=True``)."""


class ShardWarning(UserWarning):
    """A damaged shard or sample was skipped (non-strict reading)."""


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"ditscale {version('ditscale')}"
    except Exception:  # pragma: no cover - not installed
        return "ditscale (unknown version)"


# ---------------------------------------------------------------------------------------
# Preprocessing (ADM centre crop)
# ---------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Any, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side >= 2*size, BICUBIC-resize the
    short side to ``size``, then crop the centre. Returns ``(size, size[, C])`` uint8."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _to_chw_unit(arr: np.ndarray) -> np.ndarray:
    """uint8 ``HW`` or ``HWC`` → float32 ``CHW`` in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


class ImageSource:
    """A finite, indexable set of labelled images. ``load(i)`` returns ``(C, S, S)`` float32 in
    [-1, 1] or raises for a bad input (the writer skips, counts and lists it)."""

    kind = "source"
    parallel_load = False  # True: load() mostly waits on I/O or GIL-free decoding, so threads help
    class_names: list[str]
    image_size: int
    channels: int

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"{self.kind}/{i}"

    def describe(self) -> dict[str, Any]:
        """Fields that identify the input (part of the shard set's fingerprint)."""
        return {"kind": self.kind, "num_inputs": len(self), "channels": self.channels}

    @property
    def prescan_skipped(self) -> list[dict[str, str]]:
        """Inputs rejected before encoding (e.g. files outside any class folder)."""
        return []


class ArraySource(ImageSource):
    """Images already in memory: ``(N, C, S, S)`` float in [-1, 1] (tests, benchmarks)."""

    kind = "arrays"

    def __init__(self, images: np.ndarray, labels: Sequence[int], class_names: Sequence[str] | None = None, *, name: str = "arrays") -> None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ConfigError(f"ArraySource: images must be (N, C, S, S), got {images.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise ConfigError(f"ArraySource: {len(images)} images but {len(self.labels)} labels")
        n_cls = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
        self.image_size = int(images.shape[-1])
        self.channels = int(images.shape[1])
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def key(self, i: int) -> str:
        return f"{self.name}/{i}"

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.images.tobytes())
        digest.update(self.labels.tobytes())
        return {**super().describe(), "name": self.name, "sha256": digest.hexdigest()}


class DigitsSource(ImageSource):
    """scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10 classes, no
    download), upscaled with the same ADM preprocessing as any image → ``(1, S, S)``."""

    kind = "digits"

    def __init__(self, image_size: int = 16) -> None:
        if image_size < 2:
            raise ConfigError(f"--image-size {image_size}: must be at least 2")
        from sklearn.datasets import load_digits

        d = load_digits()
        # 0..16 intensities → 0..255 uint8, white digit on black like MNIST
        self.raw = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
        self.targets = d.target.astype(np.int64)
        self.class_names = [str(c) for c in range(10)]
        self.image_size = int(image_size)
        self.channels = 1

    def __len__(self) -> int:
        return len(self.raw)

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        return _to_chw_unit(center_crop_arr(Image.fromarray(self.raw[i], mode="L"), self.image_size))

    def label(self, i: int) -> int:
        return int(self.targets[i])

    def key(self, i: int) -> str:
        return f"digits/{i:04d}"


def make_digits(image_size: int = 16) -> DigitsSource:
    """The built-in demo data set: sklearn digits at ``image_size`` px, 1 channel."""
    return DigitsSource(image_size)


class ImageFolderSource(ImageSource):
    """ImageNet layout: ``ROOT/<class>/<image>`` (nested folders allowed); class index =
    sorted class-folder order. Files that PIL cannot read are skipped at encode time."""

    kind = "folder"
    parallel_load = True

    def __init__(self, root: str | os.PathLike[str], image_size: int = 256) -> None:
        root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.exists(root):
            raise ConfigError(f"image folder {root}: does not exist. Fix: pass the folder that holds one subfolder per class")
        if not os.path.isdir(root):
            raise ConfigError(f"image folder {root}: is a file, not a folder. Fix: pass the folder that holds one subfolder per class")
        if image_size < 2:
            raise ConfigError(f"--image-size {image_size}: must be at least 2")
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
        classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        self._prescan: list[dict[str, str]] = [
            {"key": e, "error": "not inside a class subfolder"} for e in entries if e not in classes
        ]
        if not classes:
            what = "is empty" if not entries else "has no class subfolders"
            raise ConfigError(
                f"image folder {root}: {what}. Fix: use the ImageNet layout, one subfolder per class "
                f"({root}/<class_name>/<image files>); class indices follow the sorted folder names"
            )
        files: list[str] = []
        labels: list[int] = []
        for idx, cls in enumerate(classes):
            base = os.path.join(root, cls)
            for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if fn.startswith("."):
                        continue
                    files.append(os.path.relpath(os.path.join(dirpath, fn), root))
                    labels.append(idx)
        if not files:
            raise ConfigError(
                f"image folder {root}: the class subfolders ({', '.join(classes[:5])}{', …' if len(classes) > 5 else ''}) "
                "hold no files. Fix: put the images inside ROOT/<class_name>/"
            )
        self.root = root
        self.files = files
        self.labels = labels
        self.class_names = classes
        self.image_size = int(image_size)
        self.channels = 3

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(os.path.join(self.root, self.files[i])) as img:
            img.load()
            rgb = img.convert("RGB")
        return _to_chw_unit(center_crop_arr(rgb, self.image_size))

    def label(self, i: int) -> int:
        return self.labels[i]

    def key(self, i: int) -> str:
        return self.files[i].replace(os.sep, "/")

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(f"{f}\t{c}" for f, c in zip(self.files, self.labels)).encode())
        return {**super().describe(), "root": self.root, "files_sha256": digest.hexdigest()}

    @property
    def prescan_skipped(self) -> list[dict[str, str]]:
        return list(self._prescan)


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    url: str  # relative to the manifest unless it has a scheme or is absolute
    count: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """``DIR/manifest.json``: everything a reader or an evaluator needs to know."""

    num_samples: int
    shards: list[ShardInfo]
    latent_shape: tuple[int, ...]
    dtype: str
    scale_factor: float
    encoder: dict[str, Any]
    class_names: list[str]
    image_size: int
    flip: bool
    source: dict[str, Any] = field(default_factory=dict)
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)
    tool_version: str = ""
    format_version: int = FORMAT_VERSION
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    # feature networks trained for this data set at prepare time (e.g. the digits classifier
    # for digits FID): name -> {"path" (relative to the manifest), "sha256", ...}
    features: dict[str, Any] = field(default_factory=dict)
    url: str | None = field(default=None, compare=False)  # where it was loaded from (not saved)

    @property
    def encoder_id(self) -> str:
        return str(self.encoder.get("id", ""))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped_inputs(self) -> int:
        return len(self.skipped_inputs)

    def shard_urls(self) -> list[str]:
        """Shard URLs resolved against the manifest's own location."""
        return [_resolve(self.url or "", s.url) for s in self.shards]

    def load_codec(self, **kw: Any) -> "Codec":
        """The codec these latents came from (``device=``, ``dtype=`` pass through)."""
        from dit.vae import load_codec

        return load_codec(self.encoder_id, **{**self.encoder, **kw})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("url")
        d["latent_shape"] = list(self.latent_shape)
        d["num_classes"] = self.num_classes
        d["num_skipped_inputs"] = self.num_skipped_inputs
        return {"format": "ditscale-latents", **d}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], url: str | None = None) -> "Manifest":
        where = url or "manifest"
        if d.get("format") != "ditscale-latents":
            raise ConfigError(f"{where}: not a ditscale latent manifest (field 'format' missing). Fix: point at DIR/manifest.json written by `ditscale prepare`")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ConfigError(f"{where}: format_version {d['format_version']} is newer than this ditscale reads ({FORMAT_VERSION}). Fix: upgrade ditscale")
        try:
            shards = [ShardInfo(str(s["url"]), int(s["count"]), str(s["sha256"]), int(s["bytes"])) for s in d["shards"]]
            return cls(
                num_samples=int(d["num_samples"]),
                shards=shards,
                latent_shape=tuple(int(x) for x in d["latent_shape"]),
                dtype=str(d["dtype"]),
                scale_factor=float(d["scale_factor"]),
                encoder=dict(d["encoder"]),
                class_names=[str(c) for c in d["class_names"]],
                image_size=int(d["image_size"]),
                flip=bool(d["flip"]),
                source=dict(d.get("source", {})),
                skipped_inputs=list(d.get("skipped_inputs", [])),
                tool_version=str(d.get("tool_version", "")),
                format_version=int(d.get("format_version", FORMAT_VERSION)),
                config=dict(d.get("config", {})),
                config_hash=str(d.get("config_hash", "")),
                features=dict(d.get("features", {})),
                url=url,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: malformed manifest ({type(err).__name__}: {err}). Fix: rerun `ditscale prepare` into that folder") from err

    @classmethod
    def load(cls, url: str | os.PathLike[str], *, allow_pipe: bool = False, storage_options: Mapping[str, Any] | None = None) -> "Manifest":
        """Load from a local path (a folder means ``folder/manifest.json``), ``file://`` or any
        fsspec URL (``s3://…``). ``pipe:`` URLs run shell commands and need ``allow_pipe``."""
        url = os.fspath(url)
        if _is_local(url) and os.path.isdir(_local_path(url)):
            url = os.path.join(_local_path(url), MANIFEST_NAME)
        try:
            raw = _read_bytes(url, allow_pipe=allow_pipe, storage_options=storage_options)
        except FileNotFoundError as err:
            raise ConfigError(f"manifest {url}: not found. Fix: run `ditscale prepare … --out DIR` first and pass DIR/{MANIFEST_NAME}") from err
        except OSError as err:
            raise ConfigError(f"manifest {url}: cannot be read ({err})") from err
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"manifest {url}: not valid JSON ({err}). Fix: rerun `ditscale prepare`, which rewrites it") from err
        if not isinstance(d, dict):
            raise ConfigError(f"manifest {url}: not a JSON object")
        m = cls.from_json(d, url)
        for s in m.shards:  # refuse early, before any worker starts
            _check_pipe(_resolve(url, s.url), allow_pipe)
        return m

    def save(self, path: str | os.PathLike[str]) -> None:
        _atomic_write(os.fspath(path), (json.dumps(self.to_json(), indent=1) + "\n").encode())


# ---------------------------------------------------------------------------------------
# URL helpers
# ---------------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _resolve(base: str, name: str) -> str:
    if name.startswith("pipe:") or "://" in name or os.path.isabs(name):
        return name
    if "://" in base:
        return base.rsplit("/", 1)[0] + "/" + name
    if base.startswith("pipe:"):
        return name
    return os.path.join(os.path.dirname(base), name)


def _check_pipe(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise ConfigError(
            f"{url[:80]}: 'pipe:' URLs run shell commands and are refused. Fix: pass allow_pipe=True "
            "only for manifests you trust, or use a file/fsspec URL"
        )


def _read_bytes(url: str, *, allow_pipe: bool = False, storage_options: Mapping[str, Any] | None = None, mmap_ok: bool = False) -> Any:
    """The object's bytes (``bytes``, or a read-only ``mmap`` of a local file when ``mmap_ok``)."""
    _check_pipe(url, allow_pipe)
    if url.startswith("pipe:"):
        proc = subprocess.run(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise OSError(f"pipe command exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:200]}")
        return proc.stdout
    if _is_local(url):
        with open(_local_path(url), "rb") as f:
            if mmap_ok:
                try:
                    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # no copy; page cache pages
                except (ValueError, OSError):  # empty file, or a filesystem without mmap
                    pass
            return f.read()
    import fsspec

    with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
        return f.read()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


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

    @staticmethod
    def name(j: int) -> str:
        return f"shard-{j:06d}.tar"


def _default_shard_size(n: int) -> int:
    return max(1, min(DEFAULT_MAX_SHARD_SIZE, math.ceil(n / DEFAULT_MIN_SHARDS)))


def _sample_bytes(latent_shape: Sequence[int], flip: bool) -> int:
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
    train_features: bool = True  # digits: train the FID feature classifier in finish()

    def _record_path(self, j: int) -> str:
        return os.path.join(self.out_dir, STATE_DIR, ShardPlan.name(j).replace(".tar", ".json"))

    def is_complete(self, j: int) -> bool:
        try:
            with open(self._record_path(j)) as f:
                rec = json.load(f)
            size = os.path.getsize(os.path.join(self.out_dir, ShardPlan.name(j)))
        except (OSError, ValueError):
            return False
        return rec.get("config_hash") == self.config_hash and rec.get("bytes") == size

    def write_shard(self, j: int, codec: "Codec") -> dict[str, Any]:
        """Encode shard ``j`` and write it atomically; returns its completion record."""
        from webdataset import TarWriter

        if codec.manifest_fields() != self.encoder:
            raise ConfigError(f"shard {j}: codec {codec.manifest_fields()} differs from the planned encoder {self.encoder}")
        name = ShardPlan.name(j)
        final = os.path.join(self.out_dir, name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        skipped: list[dict[str, str]] = []
        count = 0
        gen = None
        if self.encoder.get("latent_dist") == "sample":
            device = getattr(codec, "device", torch.device("cpu"))
            gen = torch.Generator(device=device).manual_seed(int(self.encode_seed) * 1_000_003 + j)
        members = self.plan.members(j).tolist()
        chunks = [members[lo : lo + self.encode_batch] for lo in range(0, len(members), self.encode_batch)]
        want_shape = (self.source.channels, self.source.image_size, self.source.image_size)

        def load(idx: int) -> tuple[int, np.ndarray | None, str | None]:
            try:
                img = self.source.load(idx)
                if img.shape != want_shape:
                    raise ValueError(f"image shape {img.shape}, expected {want_shape}")
                return idx, img, None
            except Exception as err:  # noqa: BLE001 - any unreadable input is skipped and listed
                return idx, None, f"{type(err).__name__}: {err}"[:300]

        # image decoding (PIL releases the GIL) runs in threads, one chunk ahead of the encoder
        pool = ThreadPoolExecutor(self.load_threads) if self.load_threads > 1 else None

        def submit(chunk: list[int]) -> list[Any]:
            return [pool.submit(load, i) for i in chunk] if pool else chunk

        try:
            ahead = submit(chunks[0]) if chunks else []
            with open(tmp, "wb") as f:
                writer = TarWriter(f, user="", group="", mtime=0, encoder=False)
                for ci in range(len(chunks)):
                    results = [fut.result() for fut in ahead] if pool else [load(i) for i in ahead]
                    if ci + 1 < len(chunks):
                        ahead = submit(chunks[ci + 1])
                    images, ok = [], []
                    for idx, img, err in results:
                        if img is None:
                            skipped.append({"key": self.source.key(idx), "error": err or "unreadable"})
                        else:
                            images.append(img)
                            ok.append(idx)
                    if not images:
                        continue
                    x = torch.from_numpy(np.stack(images)).to(getattr(codec, "device", "cpu"), non_blocking=True)
                    if self.flip:
                        x = torch.cat([x, x.flip(-1)])
                    z = codec.encode(x, generator=gen).numpy().astype(np.float16)
                    if tuple(z.shape[1:]) != tuple(self.latent_shape):
                        raise RuntimeError(f"codec produced latents {tuple(z.shape[1:])}, planned {self.latent_shape}")
                    n = len(ok)
                    for k, idx in enumerate(ok):
                        lat = np.stack([z[k], z[n + k]]) if self.flip else z[k : k + 1]
                        writer.write(
                            {
                                "__key__": f"{idx:08d}",
                                "cls": str(self.source.label(idx)).encode(),
                                LATENTS_EXT: _npy_bytes(lat),
                                "src.txt": self.source.key(idx).encode(),
                            }
                        )
                        count += 1
                writer.close()
                f.flush()
                os.fsync(f.fileno())
            digest = hashlib.sha256()
            with open(tmp, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            size = os.path.getsize(tmp)
            os.replace(tmp, final)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            if os.path.exists(tmp):
                os.remove(tmp)
        rec = {"name": name, "count": count, "sha256": digest.hexdigest(), "bytes": size, "skipped": skipped, "config_hash": self.config_hash}
        _atomic_write(self._record_path(j), json.dumps(rec).encode())
        return rec

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
                missing.append(ShardPlan.name(j))
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
        features = self._feature_nets() if self.train_features else {}
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
        manifest.save(path)
        manifest.url = path
        return manifest


    def _feature_nets(self) -> dict[str, Any]:
        """Digits: the ``digits-cnn-v1`` classifier for FID (seeded, ~1-2 s on a CPU), kept
        when a rerun finds one trained with the same settings."""
        if getattr(self.source, "kind", None) != "digits":
            return {}
        from dit.features import DIGITS, DIGITS_FILE, digits_classifier_config, digits_classifier_record, train_digits_classifier

        path = os.path.join(self.out_dir, DIGITS_FILE)
        rec = digits_classifier_record(path, digits_classifier_config(self.source, seed=self.encode_seed))
        if rec is None:
            rec = train_digits_classifier(self.source, path, seed=self.encode_seed)
        keep = ("sha256", "dim", "input_size", "heldout_accuracy", "seed")
        return {DIGITS: {"path": DIGITS_FILE, **{k: rec[k] for k in keep}}}


def _clean_output(out_dir: str) -> None:
    for p in glob.glob(os.path.join(out_dir, "shard-*.tar*")):
        os.remove(p)
    shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        os.remove(os.path.join(out_dir, MANIFEST_NAME))


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
    train_features: bool = True,
) -> PrepareJob:
    """Check the output folder, plan the shards, and list the ones still to write.

    A folder holding shards or a manifest made with different settings (encoder, image size,
    inputs, shard size, …) is refused unless ``overwrite`` (which deletes them).
    ``train_features``: for the digits, ``finish()`` also trains the small classifier whose
    features give digits FID (``features/digits_classifier.pt``, recorded in the manifest)."""
    out = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
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
    latent_shape = tuple(int(x) for x in codec.latent_shape(source.channels, source.image_size))
    if shard_size is None:
        shard_size = max(1, shard_bytes // _sample_bytes(latent_shape, flip)) if shard_bytes else _default_shard_size(len(source))
    plan = ShardPlan(len(source), int(shard_size), int(shuffle_seed))
    encoder = codec.manifest_fields()
    config = {
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
    chash = _config_hash(config)
    state = os.path.join(out, STATE_DIR)
    if overwrite:
        _clean_output(out)
    else:
        for existing_path in (os.path.join(out, MANIFEST_NAME), os.path.join(state, "config.json")):
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
    os.makedirs(state, exist_ok=True)
    for stale in glob.glob(os.path.join(out, "shard-*.tmp-*")) + glob.glob(os.path.join(state, "*.tmp-*")):
        os.remove(stale)
    _atomic_write(os.path.join(state, "config.json"), json.dumps(config, indent=1).encode())
    if load_threads is None:
        threads = min(8, os.cpu_count() or 1) if getattr(source, "parallel_load", False) else 1
    else:
        threads = max(1, int(load_threads))
    job = PrepareJob(out, source, encoder, latent_shape, plan, bool(flip), int(encode_seed), int(encode_batch), config, chash, [], threads,
                     bool(train_features))
    job.pending = [j for j in range(plan.num_shards) if not job.is_complete(j)]
    return job


def write_shards(source: ImageSource, codec: "Codec", out_dir: str | os.PathLike[str], *, progress: Any = None, **options: Any) -> Manifest:
    """Encode ``source`` with ``codec`` into shards under ``out_dir`` in this process (resuming
    an interrupted run) and return the manifest. Options: see :func:`begin_prepare`."""
    job = begin_prepare(source, codec, out_dir, **options)
    job.run_local(codec, progress)
    return job.finish()


# ---------------------------------------------------------------------------------------
# Reading: tar + npy parsing (tolerant of truncation, no pickle)
# ---------------------------------------------------------------------------------------


class _TarError(Exception):
    pass


_ZERO_BLOCK = bytes(512)


def _tar_members(data: bytes, check: bool = True) -> Iterator[tuple[str, int, int]]:
    """Yield ``(name, offset, size)`` for the regular files of an in-memory tar; raise
    ``_TarError`` on a bad header or truncation (after yielding what was intact). Header
    checksums are skipped when ``check`` is false (the shard's sha256 already matched)."""
    n = len(data)
    off = 0
    longname: str | None = None
    while True:
        if off + 512 > n:
            if off == n:
                return  # ends on a member boundary without the end marker: accepted
            raise _TarError(f"truncated header at byte {off}")
        if data[off] == 0 and data[off : off + 512] == _ZERO_BLOCK:
            return
        try:
            sf = data[off + 124 : off + 136]
            size = int.from_bytes(sf[1:], "big") if sf[0] & 0x80 else int(sf.rstrip(b"\0 ") or b"0", 8)
            if check:
                hdr = data[off : off + 512]
                if int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                    raise ValueError("checksum")
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
                nul = data.find(b"\0", off, off + 100)
                name = data[off : nul if nul >= 0 else off + 100].decode("utf-8", "replace")
                if data[off + 345] and data[off + 257 : off + 262] == b"ustar":
                    nul = data.find(b"\0", off + 345, off + 500)
                    name = data[off + 345 : nul if nul >= 0 else off + 500].decode("utf-8", "replace") + "/" + name
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
        d = ast.literal_eval(header.decode("latin1"))
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


# ---------------------------------------------------------------------------------------
# Reading: the deterministic stream
# ---------------------------------------------------------------------------------------

_WARNED: set[str] = set()
_VERIFIED: set[tuple[str, str, int, int]] = set()  # shards already hashed in this process
_PREFETCH = 2  # shards read (and hashed) ahead in a background thread


@dataclass(frozen=True)
class _Spec:
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


class _Stats:
    def __init__(self) -> None:
        self.skipped = 0
        self.bad: set[str] = set()

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
        data = _read_bytes(url, allow_pipe=spec.allow_pipe, storage_options=dict(spec.storage_options), mmap_ok=True)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - missing/unreadable shard → all its samples skipped
        return _Fetched(b"", f"cannot be read ({type(err).__name__}: {err})", None)
    sha_ok = None
    want = spec.sha256[j]
    if spec.verify and want:
        try:  # a shard hashed once in this process is trusted while its size and mtime stay put
            stamp = os.stat(_local_path(url)).st_mtime_ns if _is_local(url) else 0
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


@dataclass
class _ShardData:
    latents: np.ndarray  # (n, V, C, H, W) float16, in shard order (views into the shard's bytes if possible)
    labels: np.ndarray  # (n,) int64


_EMPTY_SHARD = _ShardData(np.zeros((0, 1, 1, 1, 1), np.float16), np.zeros(0, np.int64))


def _parse_shard(spec: _Spec, j: int, f: _Fetched, stats: _Stats) -> _ShardData:
    """The readable samples of a fetched shard, in order. Damage is reported (warning +
    count), fatal only when strict."""
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


def _parse_generic(spec: _Spec, j: int, f: _Fetched, stats: _Stats) -> _ShardData:
    """Member-by-member parse, tolerant of truncation, odd layouts and bad samples."""
    data = f.data
    lats: list[np.ndarray] = []
    labels: list[int] = []
    bad = 0
    shape = spec.latent_shape
    key: str | None = None
    lat = cls = None

    def close() -> None:
        nonlocal bad
        if key is None:
            return
        try:
            if lat is None or cls is None:
                raise ValueError("missing latents.npy or cls")
            arr = _npy_view(data, lat[0], lat[1])
            if arr.dtype != np.float16 or arr.ndim != 4 or arr.shape[1:] != shape or arr.shape[0] not in (1, 2):
                raise ValueError(f"latents {arr.dtype}{arr.shape}, expected float16 (V,{shape})")
            if lats and arr.shape[0] != lats[0].shape[0]:
                raise ValueError("mixed flip layouts in one shard")
            label = int(data[cls[0] : cls[0] + cls[1]])
            lats.append(arr)
            labels.append(label)
        except (ValueError, SyntaxError, KeyError, TypeError):
            bad += 1

    error = None
    try:
        for name, start, size in _tar_members(data, check=not f.sha_ok):
            k, ext = _split_name(name)
            if k != key:
                close()
                key, lat, cls = k, None, None
            if ext == LATENTS_EXT:
                lat = (start, size)
            elif ext == "cls":
                cls = (start, size)
    except _TarError as err:
        error = str(err)
    close()
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


def _octal_fields(block: np.ndarray) -> np.ndarray:
    """Vectorised parse of NUL/space-terminated octal ASCII fields, one per row."""
    digits = block.astype(np.int64) - 48
    ok = (digits >= 0) & (digits < 8)
    ok = np.cumprod(ok, axis=1).astype(bool)  # stop at the first non-digit
    n = ok.sum(axis=1)
    place = np.where(ok, n[:, None] - 1 - np.arange(block.shape[1])[None, :], 0)
    return (np.where(ok, digits, 0) << (3 * np.maximum(place, 0))).sum(axis=1)


def _parse_regular(data: bytes, expected: int, shape: tuple[int, ...]) -> _ShardData | None:
    """Vectorised parse of a shard laid out like ``ditscale prepare`` writes it (every sample the
    same members of the same sizes, so a fixed stride). ``None`` if the layout is anything else."""
    try:
        it = _tar_members(data, check=False)
        first: list[tuple[str, int, int]] = []
        key0 = None
        for name, start, size in it:
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
    base = first[0][1] - 512
    stride = (nxt - 512 - base) if nxt is not None else None
    if expected == 1 or stride is None:
        if expected != 1 or stride is not None:
            return None
        stride = len(data)  # a single sample: any stride works
    n = expected
    buf = np.frombuffer(data, np.uint8)
    if base + (n - 1) * stride + (first[-1][1] - base) + first[-1][2] > len(data):
        return None  # truncated
    klen = len(key0.encode())

    def headers(member_start: int) -> np.ndarray:
        return np.lib.stride_tricks.as_strided(buf[member_start - 512 :], shape=(n, 512), strides=(stride, 1), writeable=False)

    keys = None
    out: dict[str, tuple[np.ndarray, int, int]] = {}
    for ext, start, size in first:
        h = headers(start)
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
    # latents: identical size and .npy header for every sample → one strided float16 view
    h, start, size = out[LATENTS_EXT]
    if not (h[:, 124:136] == h[0, 124:136]).all():
        return None
    try:
        arr0 = _npy_view(data, start, size)
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None
    if arr0.dtype != np.float16 or arr0.ndim != 4 or arr0.shape[1:] != shape or arr0.shape[0] not in (1, 2):
        return None
    hdr_len = size - arr0.nbytes
    payload = np.lib.stride_tricks.as_strided(buf[start:], shape=(n, size), strides=(stride, 1), writeable=False)
    if not (payload[:, :hdr_len] == payload[0, :hdr_len]).all():
        return None
    lat_bytes = np.lib.stride_tricks.as_strided(buf[start + hdr_len :], shape=(n, arr0.nbytes), strides=(stride, 1), writeable=False)
    latents = lat_bytes.view(np.float16).reshape((n, *arr0.shape))
    # labels: decimal text of at most 19 digits inside one 512-byte block
    h, start, _ = out["cls"]
    sizes = _octal_fields(h[:, 124:136])
    if (sizes < 1).any() or (sizes > 19).any():
        return None
    text = np.lib.stride_tricks.as_strided(buf[start:], shape=(n, 19), strides=(stride, 1), writeable=False).astype(np.int64) - 48
    cols = np.arange(19)[None, :]
    inside = cols < sizes[:, None]
    if ((text < 0) | (text > 9))[inside].any():
        return None
    power = np.where(inside, sizes[:, None] - 1 - cols, 0)
    labels = (np.where(inside, text, 0) * (10 ** np.maximum(power, 0))).sum(axis=1)
    return _ShardData(latents, labels.astype(np.int64))


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


class _Unit:
    """A loaded unit's rows (in the unit's input order) until all of them are handed out."""

    __slots__ = ("rows", "labels", "remap", "sorted_outs")

    def __init__(self, rows: np.ndarray | None, labels: np.ndarray | None, sorted_outs: np.ndarray) -> None:
        self.rows = rows  # (len, C, H, W) float16; None: the whole shard was lost
        self.labels = labels
        self.remap: np.ndarray | None = None  # after compaction: unit row → compacted row
        self.sorted_outs = sorted_outs


def _pass_chunks(spec: _Spec, slot: int, p: int, t0: int, stats: _Stats, pool: Any) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pass ``p`` of a slot from output position ``t0``, as consecutive chunks
    ``(latents float16 (k,C,H,W) unscaled, labels (k,), valid (k,) bool)`` in output order."""
    units = _pass_units(spec, slot, p)
    lens = [len(pos) for _, pos in units]
    n = sum(lens)
    if n <= t0:
        return
    out2in = _buffer_order(n, spec.shuffle_buffer, _rng(spec.seed, 0x5342, slot, p))
    in2out = np.empty(n, dtype=np.int64)
    in2out[out2in] = np.arange(n)
    flips = _rng(spec.seed, 0x5346, slot, p).integers(0, 2, n) if spec.random_flip else None
    bounds = np.cumsum([0] + lens)
    unit_of_in = np.repeat(np.arange(len(units)), lens)
    live: dict[int, _Unit] = {}
    to_read = [u for u in range(len(units)) if lens[u] and in2out[bounds[u] : bounds[u + 1]].max() >= t0]
    futures: dict[int, Any] = {}
    next_submit = 0

    def prefetch() -> None:
        nonlocal next_submit
        while next_submit < len(to_read) and len(futures) < _PREFETCH:
            u = to_read[next_submit]
            futures[u] = pool.submit(_fetch, spec, units[u][0])
            next_submit += 1

    t = t0
    for u, (j, positions) in enumerate(units):
        lo, hi = int(bounds[u]), int(bounds[u + 1])
        if lo == hi:
            continue
        outs = in2out[lo:hi]
        if u in futures or (next_submit < len(to_read) and to_read[next_submit] == u):
            prefetch()
            fetched = futures.pop(u).result()
            prefetch()
            shard = _parse_shard(spec, j, fetched, stats)
            del fetched
            nvalid = len(shard.labels)
            need = outs >= t0
            stats.skipped += int(need.sum()) if nvalid == 0 else int((need & (positions >= nvalid)).sum())
            if nvalid == 0:
                live[u] = _Unit(None, None, np.sort(outs))
            else:
                sidx = positions % nvalid if (positions >= nvalid).any() else positions
                vidx = flips[outs] if flips is not None and shard.latents.shape[1] == 2 else 0
                live[u] = _Unit(shard.latents[sidx, vidx], shard.labels[sidx], np.sort(outs))  # float16 copies
            del shard
        # hand out every output position whose input is now available
        end = t
        while end < n and out2in[end] < hi:
            end += 1
        if end == t:
            continue
        ins = out2in[t:end]
        uu = unit_of_in[ins]
        rr = ins - bounds[uu]
        k = end - t
        lat = np.empty((k, *spec.latent_shape), dtype=np.float16)
        lab = np.zeros(k, dtype=np.int64)
        valid = np.ones(k, dtype=bool)
        for v in np.unique(uu).tolist():
            m = uu == v
            unit = live[v]
            if unit.rows is None:
                valid[m] = False
                continue
            idx = rr[m] if unit.remap is None else unit.remap[rr[m]]
            lat[m] = unit.rows[idx]
            lab[m] = unit.labels[idx]
        t = end
        yield lat, lab, valid
        # free units that are done; compact the ones kept alive by a few buffered stragglers
        for v in list(live):
            unit = live[v]
            remaining = len(unit.sorted_outs) - int(np.searchsorted(unit.sorted_outs, t))
            if remaining == 0:
                del live[v]
            elif unit.rows is not None and remaining * 8 < len(unit.rows) and len(unit.rows) >= 64:
                lo_v = int(bounds[v])
                keep = np.nonzero(in2out[lo_v : lo_v + lens[v]] >= t)[0]
                rows_idx = keep if unit.remap is None else unit.remap[keep]
                remap = np.full(lens[v], -1, dtype=np.int64)
                remap[keep] = np.arange(len(keep))
                unit.rows, unit.labels, unit.remap = unit.rows[rows_idx], unit.labels[rows_idx], remap


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


def _slot_batches(spec: _Spec, slot: int, first: int, count: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, tuple[str, ...]]]:
    """Batches ``first, first+1, …`` (``count`` of them, or endless) of one slot's sequence as
    scaled float32, each with the skip count and damaged-shard names since the previous one."""
    stats = _Stats()
    B = spec.batch_size
    p, t = _locate(spec, slot, first * B)
    pool = ThreadPoolExecutor(1, thread_name_prefix="latent-prefetch")

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        nonlocal p, t
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

    in_worker = torch.utils.data.get_worker_info() is not None
    try:
        source = chunks()
        held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        have = 0
        done = 0
        empty = torch.empty(0)
        while count is None or done < count:
            while have < B:
                c = next(source)
                held.append(c)
                have += len(c[1])
            if len(held) == 1 and have == B:
                lat, lab, valid = held[0]
                held, have = [], 0
            else:
                lat_all = np.concatenate([c[0] for c in held]) if len(held) > 1 else held[0][0]
                lab_all = np.concatenate([c[1] for c in held]) if len(held) > 1 else held[0][1]
                val_all = np.concatenate([c[2] for c in held]) if len(held) > 1 else held[0][2]
                lat, lab, valid = lat_all[:B], lab_all[:B], val_all[:B]
                held = [(lat_all[B:], lab_all[B:], val_all[B:])] if have > B else []
                have -= B
            skipped, bad = stats.take()
            n_ok = int(valid.sum())
            if n_ok == 0:
                yield empty, empty.long(), skipped, bad  # position advances; nothing to train on
            else:
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
                yield out, labels, skipped, bad
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


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        raise ConfigError(f"environment {name}={v!r}: not an integer") from None


class LatentStream:
    """Endless, deterministic, resumable ``(latents, labels)`` batches from a manifest.

    ``latents`` is ``FloatTensor[B, C, H, W]`` already multiplied by the manifest's scale
    factor; ``labels`` is ``LongTensor[B]``. ``rank``/``world_size`` default to the env
    ``RANK``/``WORLD_SIZE`` (set by Ray Train / torchrun). ``num_workers`` DataLoader worker
    processes are started by the stream itself. ``epoch_length`` bounds one ``iter()`` (in
    batches of this rank); the next ``iter()`` continues where the last stopped.
    ``position`` counts the batches handed out; ``state_dict()`` saves it (and the settings
    that define the order), ``start_batch``/``load_state_dict``/``skip`` resume exactly.
    ``skipped`` counts damaged samples replaced so far, ``bad_shards`` names damaged shards.
    ``dtype`` is the latents' dtype (float32 default; float16 is produced in the workers).
    """

    def __init__(
        self,
        manifest: "str | os.PathLike[str] | Manifest",
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
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
        if isinstance(manifest, Manifest):
            self.manifest = manifest
            for u in manifest.shard_urls():
                _check_pipe(u, allow_pipe)
        else:
            self.manifest = Manifest.load(manifest, allow_pipe=allow_pipe, storage_options=storage_options)
        m = self.manifest
        if m.dtype != "float16":
            raise ConfigError(f"manifest {m.url}: dtype {m.dtype!r} is not supported (float16)")
        if not m.shards or m.num_samples <= 0:
            raise ConfigError(f"manifest {m.url}: lists no samples. Fix: rerun `ditscale prepare`")
        self.rank = _env_int("RANK", 0) if rank is None else int(rank)
        self.world_size = _env_int("WORLD_SIZE", 1) if world_size is None else int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} / world_size {self.world_size}: need 0 <= rank < world_size")
        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size}: must be >= 1")
        if num_workers < 0:
            raise ConfigError(f"num_workers {num_workers}: must be >= 0")
        if epoch_length is not None and epoch_length < 1:
            raise ConfigError(f"epoch_length {epoch_length}: must be >= 1 or None")
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
        workers = max(1, self.num_workers)
        self._spec = _Spec(
            urls=tuple(m.shard_urls()),
            counts=tuple(s.count for s in m.shards),
            sha256=tuple(s.sha256 for s in m.shards),
            latent_shape=tuple(m.latent_shape),
            batch_size=self.batch_size,
            seed=self.seed,
            n_slots=self.world_size * workers,
            shuffle_buffer=self.shuffle_buffer,
            random_flip=self.random_flip and m.flip,
            strict=bool(strict),
            verify=bool(verify),
            allow_pipe=bool(allow_pipe),
            scale=float(m.scale_factor),
            half=dtype == torch.float16,
            storage_options=tuple(sorted((storage_options or {}).items())),
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
        for lat, lab, skipped, bad in source:
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
