"""The on-disk layout of a prepared data folder, and its ``manifest.json``.

A folder written by ``ditscale prepare`` holds::

    DIR/manifest.json              written last: the shard list, encoder, classes, …
    DIR/shard-NNNNNN.tar           WebDataset tar shards (NNNNNN: the shard index, 6 digits)
    DIR/.prepare/config.json       the settings the shards were planned with
    DIR/.prepare/shard-NNNNNN.json a shard's completion record (count, sha256, bytes, skipped)
    DIR/features/…                 feature networks trained on the data (e.g. the digits
                                   classifier behind digits FID), listed under ``features``

Each shard holds, per sample ``KEY`` (the input's index, 8 digits): ``KEY.latents.npy``
(float16, ``(V, C, H, W)``: V=2 holds the latent of the image and of its horizontal flip, V=1
without flips), ``KEY.cls`` (class index as text) and ``KEY.src.txt`` (the source key, e.g.
``n01440764/img.JPEG``). Latents are stored *unscaled*; ``Manifest.scale_factor`` is applied
by the reader. Shard URLs in the manifest are relative to the manifest unless they have a
scheme or are absolute, so a folder can be moved or copied to object storage as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from dit.errors import ConfigError
from dit.files import atomic_write_text, check_pipe, is_local, local_path, read_bytes, resolve

if TYPE_CHECKING:  # pragma: no cover
    from dit.vae import Codec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
STATE_DIR = ".prepare"  # completion records and the planned config live here
CONFIG_NAME = "config.json"  # inside STATE_DIR
LATENTS_EXT = "latents.npy"
SHARD_PATTERN = "shard-*"  # glob matching every shard (and its temporary files)
FEATURES_DIR = "features"  # feature networks trained on the data (see the layout above)


def shard_name(j: int) -> str:
    """The file name of shard ``j``."""
    return f"shard-{j:06d}.tar"


def record_path(out_dir: str, j: int) -> str:
    """Where shard ``j``'s completion record lives."""
    return os.path.join(out_dir, STATE_DIR, shard_name(j).replace(".tar", ".json"))


class CorruptShardError(ConfigError):
    """A shard is missing, truncated, undecodable or fails its sha256 (``strict=True``)."""


class NoReadableShardsError(CorruptShardError):
    """Non-strict reading found every shard of the manifest unreadable since the last readable
    one: the data is gone (an unmounted volume, deleted files), not damaged here and there."""


class ShardLabelError(CorruptShardError):
    """A shard holds a class label outside ``[0, num_classes)`` of its manifest (it would index
    past the model's class embedding: a device-side assert on CUDA). Refused even when not strict."""


class ShardWarning(UserWarning):
    """A damaged shard or sample was skipped (non-strict reading)."""


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"ditscale {version('ditscale')}"
    except Exception:  # pragma: no cover - not installed
        return "ditscale (unknown version)"


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
        return [resolve(self.url or "", s.url) for s in self.shards]

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
        if is_local(url) and os.path.isdir(local_path(url)):
            url = os.path.join(local_path(url), MANIFEST_NAME)
        try:
            raw = read_bytes(url, allow_pipe=allow_pipe, storage_options=storage_options)
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
            check_pipe(resolve(url, s.url), allow_pipe)
        return m

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(os.fspath(path), json.dumps(self.to_json(), indent=1) + "\n")
