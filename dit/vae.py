"""Codecs between images and the latents a DiT is trained on.

A codec turns images in [-1, 1] (``B, C, H, W``) into *unscaled* latents and back. The
shards store unscaled latents; the model works in *model space* = unscaled x
``scale_factor`` (``LatentStream`` applies the factor, ``decode(z, scaled=True)`` undoes it).

- :class:`IdentityCodec` ("pixels as latents", scale 1.0) keeps the image channels, so the
  1-channel digits give ``(1, S, S)`` latents. For small CPU demos.
- :class:`VAECodec` wraps a diffusers ``AutoencoderKL`` loaded from a hub id
  (``stabilityai/sd-vae-ft-ema``, ``stabilityai/sd-vae-ft-mse``) or a local folder, scale
  0.18215 by default (the VAE config's ``scaling_factor``), with the posterior's mean or a
  seeded sample (``latent_dist``) — both recorded in the manifest.

:func:`load_codec` rebuilds a codec from a manifest's ``encoder`` fields, so evaluation can
decode samples through the codec the latents came from.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping

import torch

from dit.errors import ConfigError

IDENTITY_ID = "identity"
LatentDist = Literal["mean", "sample"]

__all__ = ["IDENTITY_ID", "Codec", "IdentityCodec", "VAECodec", "load_codec"]


class Codec:
    """Common interface; see the module docstring for the latent-space convention."""

    kind: str = "codec"
    encoder_id: str = ""
    scale_factor: float = 1.0
    bounded: bool = False  # model-space values are pixels in [-1, 1] (samplers may clip x0 to it)

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] ``(B, C, H, W)`` → unscaled latents (float32, on CPU)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
        """Latents → images in [-1, 1]. ``scaled=True``: ``latents`` are in model space."""
        raise NotImplementedError

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def manifest_fields(self) -> dict[str, Any]:
        """What the manifest records under ``encoder``; ``load_codec(fields["id"], **fields)`` rebuilds it."""
        raise NotImplementedError


class IdentityCodec(Codec):
    """Pixels as latents: ``encode`` and ``decode`` return the images themselves (scale 1.0)."""

    kind = "identity"
    bounded = True

    def __init__(self) -> None:
        self.encoder_id = IDENTITY_ID
        self.scale_factor = 1.0

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return images.detach().to("cpu", torch.float32).clone()

    def decode(self, latents: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
        if scaled:
            latents = latents / self.scale_factor
        return latents.float().clamp(-1.0, 1.0)

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        return (channels, image_size, image_size)

    def manifest_fields(self) -> dict[str, Any]:
        return {"id": IDENTITY_ID, "kind": self.kind, "scale_factor": 1.0, "latent_dist": "mean"}


class VAECodec(Codec):
    """A diffusers ``AutoencoderKL``; ``latent_dist`` picks the posterior mean or a sample."""

    kind = "vae"

    def __init__(
        self,
        vae: Any,
        encoder_id: str,
        *,
        scale_factor: float | None = None,
        latent_dist: LatentDist = "mean",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if latent_dist not in ("mean", "sample"):
            raise ConfigError(f"latent_dist: {latent_dist!r} is not 'mean' or 'sample'")
        if next(vae.parameters()).dtype != dtype:
            vae = vae.to(dtype=dtype)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.encoder_id = encoder_id
        cfg_scale = getattr(vae.config, "scaling_factor", None) or 0.18215
        self.scale_factor = float(scale_factor if scale_factor is not None else cfg_scale)
        self.latent_dist: LatentDist = latent_dist
        self.device = torch.device(device)
        self.dtype = dtype

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, id_or_path: str, *, subfolder: str | None = None, **kw: Any) -> "VAECodec":
        """Load ``AutoencoderKL`` from a hub id or a local folder (a pipeline folder's
        ``vae/`` subfolder is found automatically)."""
        from diffusers import AutoencoderKL

        path = os.path.expanduser(id_or_path)
        local = os.path.isdir(path)
        if local:
            path = os.path.abspath(path)
            if subfolder is None and not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(
                os.path.join(path, "vae", "config.json")
            ):
                subfolder = "vae"
        elif os.path.sep in id_or_path and (id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") > 1):
            raise ConfigError(
                f"--vae {id_or_path}: no such folder. Fix: give a folder holding an AutoencoderKL "
                "(config.json + diffusion_pytorch_model.safetensors) or a hub id such as stabilityai/sd-vae-ft-ema"
            )
        import importlib.util

        extra = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}  # no nag
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=kw.get("dtype", torch.float32), **extra)
        except (OSError, ValueError, EnvironmentError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"--vae {id_or_path}: cannot load an AutoencoderKL ({first}). Fix: download it once "
                f"(`huggingface-cli download {id_or_path}`) or pass a local folder with config.json and "
                "the weights; use --vae identity for pixel-space demos"
            ) from err
        return cls(vae, path if local else id_or_path, **kw)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, init_seed: int = 0, encoder_id: str = "config:random", **kw: Any) -> "VAECodec":
        """A randomly initialised ``AutoencoderKL(**config)`` (tests; no download). Such a codec
        cannot be rebuilt by id: ``save_pretrained`` it and use the folder for real runs."""
        from diffusers import AutoencoderKL

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            vae = AutoencoderKL(**dict(config))
        return cls(vae, encoder_id, **kw)

    # -- codec interface ---------------------------------------------------------------
    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        f = self.downsample
        if image_size % f:
            raise ConfigError(f"--image-size {image_size}: must be a multiple of the VAE's downsampling factor {f}")
        return (int(self.vae.config.latent_channels), image_size // f, image_size // f)

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype)
        want = int(self.vae.config.in_channels)
        if x.shape[1] != want:
            if x.shape[1] == 1:
                x = x.expand(-1, want, -1, -1)  # grayscale → RGB
            else:
                raise ConfigError(f"images have {x.shape[1]} channels; the VAE {self.encoder_id} expects {want}")
        return x

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(self._to_input(images)).latent_dist
        z = dist.sample(generator=generator) if self.latent_dist == "sample" else dist.mean
        return z.to("cpu", torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
        z = latents.to(self.device, self.dtype)
        if scaled:
            z = z / self.scale_factor
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "id": self.encoder_id,
            "kind": self.kind,
            "scale_factor": self.scale_factor,
            "latent_dist": self.latent_dist,
        }


def load_codec(
    encoder_id: str,
    *,
    kind: str | None = None,
    scale_factor: float | None = None,
    latent_dist: LatentDist = "mean",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **_ignored: Any,
) -> Codec:
    """Build the codec named by ``encoder_id`` ("identity", a hub id or a local folder).

    ``load_codec(manifest.encoder_id, **manifest.encoder)`` (or ``manifest.load_codec()``) rebuilds the codec the
    shards were written with; unknown manifest fields are ignored for forward compatibility.
    """
    if encoder_id == IDENTITY_ID or kind == "identity":
        return IdentityCodec()
    if encoder_id.startswith("config:"):
        raise ConfigError(
            f"encoder {encoder_id!r} was a randomly initialised test VAE and cannot be reloaded. "
            "Fix: save it with vae.save_pretrained(DIR) and prepare with --vae DIR"
        )
    return VAECodec.from_pretrained(encoder_id, scale_factor=scale_factor, latent_dist=latent_dist, device=device, dtype=dtype)
