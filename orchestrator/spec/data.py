"""The data section: its schema (:class:`DataSpec`) and what it resolves to (:class:`DataInfo`).

The shape comes from the manifest when it exists (and is checked against what the spec
gives), else from ``data.latent`` / ``data.num_classes`` / ``data.image_size`` for a dry run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dit.errors import ConfigError
from orchestrator.spec.base import _Strict
from orchestrator.spec.problems import _Problems


class LatentSpec(_Strict):
    """The latent shape, for dry runs before the manifest exists (read from it otherwise)."""

    # Upper bounds far past any real data, so an absurd shape is refused here rather than by
    # torch when the cells' Gflops are measured.
    channels: int = Field(..., ge=1, le=1024, description="latent channels (4 for the SD VAE, 1-3 for pixels)")
    size: int = Field(..., ge=1, le=4096, description="latent side (32 for 256 px through the SD VAE)")
    vae_factor: int | None = Field(
        None, ge=1, le=4096,
        description="pixels per latent cell (8 for the SD VAE, 1 for pixels); default image_size / size"
    )


class DataSpec(_Strict):
    manifest: str = Field(
        ..., min_length=1,
        description="latent manifest from `ditscale prepare` (path or fsspec URL); relative paths resolve "
        "against the spec file's folder",
    )
    image_size: int | None = Field(None, ge=1, le=65536, description="pixels; read from the manifest when it exists")
    num_classes: int | None = Field(
        None, ge=0, le=1_000_000, description="classes; read from the manifest when it exists"
    )
    latent: LatentSpec | None = Field(None, description="latent shape; read from the manifest when it exists")
    builtin: Literal["digits", "random-latents"] | None = Field(
        None, description="a built-in data set that `ditscale run` prepares into `manifest` when the manifest "
        "does not exist yet: `digits` (scikit-learn's, at image_size, pixels as latents) or `random-latents` "
        "(synthetic, deterministic latents of data.latent's shape and data.num_classes classes; no download)",
    )
    samples: int | None = Field(
        None, ge=1, le=10_000_000, description="random-latents: how many samples to make (default 4096)"
    )

    @model_validator(mode="after")
    def _check_builtin(self) -> "DataSpec":
        if self.samples is not None and self.builtin != "random-latents":
            raise ValueError("data.samples is the size of the `random-latents` built-in; set data.builtin or drop it")
        if self.builtin == "random-latents":
            if self.latent is None or self.num_classes is None:
                raise ValueError("data.builtin random-latents needs data.latent {channels, size} and data.num_classes")
            if self.image_size is not None and self.image_size != self.latent.size:
                raise ValueError(f"data.builtin random-latents: image_size must equal latent.size "
                                 f"({self.latent.size}), as the latents are the 'images' (vae_factor 1)")
        return self


@dataclass(frozen=True)
class DataInfo:
    manifest: str  # resolved path or URL: what TrainConfig.data gets
    exists: bool  # False: dry run only (shape from data.latent)
    image_size: int
    channels: int
    latent_size: int
    vae_factor: int
    num_classes: int


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _resolve_data(d: DataSpec, source: str, base_dir: Path) -> DataInfo:
    problems = _Problems(source)
    url, exists = _locate(d, base_dir)
    if exists:
        image_size, channels, size, num_classes = _shape_from_manifest(d, url, source, problems)
    else:
        image_size, channels, size, num_classes = _shape_from_spec(d, url, problems)
    problems.raise_if_any()
    if image_size % size:
        problems.add("data.image_size", f"{image_size} is not a multiple of the latent size {size}")
        problems.raise_if_any()
    return DataInfo(url, exists, image_size, channels, size, image_size // size, num_classes)


def _locate(d: DataSpec, base_dir: Path) -> tuple[str, bool]:
    """The manifest's resolved path or URL, and whether to read the shape from it."""
    url = d.manifest
    if not _is_remote(url):
        local = os.path.expanduser(url.removeprefix("file://"))
        url = os.path.normpath(os.path.join(base_dir, local))
        return url, os.path.exists(url)
    return url, d.latent is None  # remote: read only when the spec does not give the shape


def _shape_from_manifest(d: DataSpec, url: str, source: str, problems: _Problems) -> tuple[int, int, int, int]:
    """(image_size, channels, latent size, num_classes) from the manifest, checked against the spec."""
    from dit.latents import Manifest

    try:
        m = Manifest.load(url)
    except ConfigError as err:
        raise ConfigError(f"{source}: data.manifest: {err}") from None
    if len(m.latent_shape) != 3 or m.latent_shape[1] != m.latent_shape[2]:
        problems.add("data.manifest", f"latents must be C x S x S, the manifest says {list(m.latent_shape)}")
        problems.raise_if_any()
    channels, size = m.latent_shape[0], m.latent_shape[1]
    found = {
        "data.image_size": (d.image_size, m.image_size),
        "data.num_classes": (d.num_classes, m.num_classes),
        "data.latent.channels": (d.latent and d.latent.channels, channels),
        "data.latent.size": (d.latent and d.latent.size, size),
    }
    for where, (given, actual) in found.items():
        if given is not None and given != actual:
            problems.add(where, f"{given} does not match the manifest's {actual} ({url})")
    image_size, num_classes = m.image_size, m.num_classes
    if d.latent and d.latent.vae_factor and d.latent.vae_factor * size != image_size:
        problems.add("data.latent.vae_factor", f"{d.latent.vae_factor} x latent {size} != image_size {image_size}")
    return image_size, channels, size, num_classes


def _shape_from_spec(d: DataSpec, url: str, problems: _Problems) -> tuple[int, int, int, int]:
    """(image_size, channels, latent size, num_classes) for a dry run: the spec must give them."""
    if d.latent is None or d.num_classes is None:
        missing = [k for k, v in (("data.latent", d.latent), ("data.num_classes", d.num_classes)) if v is None]
        problems.add(
            "data.manifest",
            f"{url} does not exist (yet); run `ditscale prepare ... --out DIR` first, or give "
            f"{' and '.join(missing)} for a dry run",
        )
        problems.raise_if_any()
    channels, size, num_classes = d.latent.channels, d.latent.size, d.num_classes
    factor = d.latent.vae_factor
    if d.image_size is None and factor is None:
        problems.add("data.image_size", "required when the manifest does not exist yet (or data.latent.vae_factor)")
        problems.raise_if_any()
    image_size = d.image_size if d.image_size is not None else factor * size
    if factor is not None and factor * size != image_size:
        problems.add("data.latent.vae_factor", f"{factor} x latent {size} != data.image_size {image_size}")
    return image_size, channels, size, num_classes
