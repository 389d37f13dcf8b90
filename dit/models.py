"""Diffusion Transformer (Peebles & Xie, 2023) with the four conditioning designs of its ablation.

Parameter names and shapes follow the released DiT checkpoints, so
``create_model("DiT-XL/2").load_state_dict(official_sd)`` works and computes the same function.

Notation: N batch, T tokens, D hidden size, p patch size, C latent channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dit.errors import ConfigError

BLOCKS = ("adaln-zero", "adaln", "cross-attention", "in-context")

# depth, hidden size, heads (the paper's Table 1).
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in SIZES for p in PATCHES)


@dataclass(frozen=True)
class DiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32  # latent side: 256 px through the SD VAE (factor 8)
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    block: str = "adaln-zero"
    grad_checkpointing: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> "DiTConfig":
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                f"({self.num_heads})"
            )
        if self.hidden_size % 4:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by 4 for the 2-D sin-cos "
                "positional embedding"
            )
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"model.input_size ({self.input_size}) must be divisible by model.patch_size "
                f"({self.patch_size})"
            )
        if not self.mlp_ratio > 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(
                f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}"
            )
        if self.block not in BLOCKS:
            raise ConfigError(f"model.block {self.block!r} is unknown; choose one of {list(BLOCKS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_model_name(name: str) -> tuple[str, int]:
    """'DiT-XL/2' -> ('XL', 2)."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if not name.startswith("DiT-") or size not in SIZES or not patch.isdigit():
        raise ConfigError(
            f"unknown model {name!r}; use one of {', '.join(MODEL_NAMES)} "
            "(any patch size works, e.g. DiT-S/16) or a custom config with "
            "depth, hidden_size, num_heads, patch_size"
        )
    return size, int(patch)


def model_config(name_or_config: str | Mapping[str, Any] | DiTConfig, **overrides: Any) -> DiTConfig:
    """Resolve a model name, a dict or a DiTConfig (plus overrides) into a validated config."""
    if isinstance(name_or_config, DiTConfig):
        base: dict[str, Any] = name_or_config.to_dict()
    elif isinstance(name_or_config, str):
        size, patch = parse_model_name(name_or_config)
        depth, hidden, heads = SIZES[size]
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    elif isinstance(name_or_config, Mapping):
        base = dict(name_or_config)
    else:
        raise ConfigError(f"model must be a name like 'DiT-S/2' or a mapping, got {name_or_config!r}")
    base.update(overrides)
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(f"unknown model field(s) {unknown}; allowed: {sorted(known)}")
    missing = [k for k in ("depth", "hidden_size", "num_heads", "patch_size") if k not in base]
    if missing:
        raise ConfigError(f"custom model config is missing {missing}")
    return DiTConfig(**base).validate()


def config_name(cfg: DiTConfig) -> str:
    """'DiT-XL/2' when the config is a named size, else a descriptive custom name."""
    for size, dims in SIZES.items():
        if dims == (cfg.depth, cfg.hidden_size, cfg.num_heads):
            return f"DiT-{size}/{cfg.patch_size}"
    return f"DiT-d{cfg.depth}h{cfg.hidden_size}n{cfg.num_heads}/{cfg.patch_size}"


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D position table (grid_size**2, dim): half the channels encode each axis.

    The first half encodes the column (w) index and the second the row (h) index, the
    order the released checkpoints were trained with.
    """
    coords = np.arange(grid_size, dtype=np.float32)
    w, h = np.meshgrid(coords, coords)  # 'xy' indexing: w varies along a row
    return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)


class PatchEmbed(nn.Module):
    """Patchify: a p x p conv with stride p turns (N, C, H, W) into (N, T, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency features of t, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.frequencies(t, self.frequency_size)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class, for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y: torch.Tensor, train: bool, force_drop: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or force_drop is not None:
            drop = (
                force_drop.bool()
                if force_drop is not None
                else torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            )
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# --------------------------------------------------------------------------------------------
# Transformer pieces
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention through torch's fused scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Image tokens attend to the conditioning sequence [t, y] (the cross-attention design)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).view(n, t, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm: x * (1 + scale) + shift, per sample, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """One transformer block; ``block`` picks how t and y enter it.

    adaln-zero: gamma, beta and a residual gate alpha regressed from c = t_emb + y_emb,
                the regression zero-initialised so the block starts as the identity.
    adaln:      gamma and beta only (no gate), default init.
    cross-attention: an extra cross-attention layer to the sequence [t_emb, y_emb].
    in-context: plain ViT block; t and y arrive as two extra tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, block: str):
        super().__init__()
        self.block = block
        adaptive = block in ("adaln-zero", "adaln")
        # Adaptive designs get their scale/shift from the condition, so the norms carry none.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if adaptive:
            chunks = 6 if block == "adaln-zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))
        if block == "cross-attention":
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.block == "adaln-zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
            return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        if self.block == "adaln":
            shift1, scale1, shift2, scale2 = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift1, scale1))
            return x + self.mlp(modulate(self.norm2(x), shift2, scale2))
        x = x + self.attn(self.norm1(x))
        if self.block == "cross-attention":
            x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Norm (adaptive for the adaLN designs) and a linear map from tokens to p*p*C_out values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        cfg = config.validate()
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.num_classes = cfg.num_classes  # also the null-class id used for guidance
        self.learn_sigma = cfg.learn_sigma
        d = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        # torch.tensor (not from_numpy) honours a `with torch.device(...)` context.
        pos = torch.tensor(sincos_2d(d, cfg.input_size // cfg.patch_size), dtype=torch.float32)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.block) for _ in range(cfg.depth)
        )
        adaptive = cfg.block in ("adaln-zero", "adaln")
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels, adaptive)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier)
        # The patch conv is initialised like a linear layer on flattened patches.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.block == "adaln-zero":
            # Zero modulation => gates are 0 => every block is the identity at init,
            # and a zero output layer makes the initial prediction exactly 0.
            for blk in self.blocks:
                nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (eps, variance logits) for latents x (N, C, H, W), timesteps t (N,), labels y (N,)."""
        # Run in the weights' dtype whatever the caller passes: under DeepSpeed bf16/fp16 the
        # weights are cast but inputs (x_t from the diffusion, in fp32) and buffers are not.
        dtype = self.x_embedder.proj.weight.dtype
        tokens = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, self.training, force_drop)
        cond, n_image = self._condition(t_emb, y_emb), tokens.shape[1]
        if self.config.block == "in-context":
            tokens = torch.cat([tokens, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1)
        for blk in self.blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, cond, use_reentrant=False)
            else:
                tokens = blk(tokens, cond)
        tokens = tokens[:, :n_image]  # in-context: drop the two condition tokens
        out = self.final_layer(tokens, cond)
        return self.unpatchify(out)

    def _condition(self, t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor | None:
        if self.config.block == "cross-attention":
            return torch.stack([t_emb, y_emb], dim=1)  # a length-2 context sequence
        if self.config.block == "in-context":
            return None
        return t_emb + y_emb

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_channels: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance on a doubled batch [conditional; unconditional].

        The first half of x/t/y is conditional, the second half carries the null class.
        eps = eps_uncond + s * (eps_cond - eps_uncond), on all latent channels by default.
        ``guide_channels=3`` reproduces the reference code, which guided only the first three
        of four channels (the FID-50K numbers in the paper were made that way).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        k = self.in_channels if guide_channels is None else guide_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def create_model(name_or_config: str | Mapping[str, Any] | DiTConfig, **overrides: Any) -> DiT:
    """Build a DiT from a name ('DiT-XL/2'), a custom mapping or a DiTConfig, plus overrides.

    >>> create_model("DiT-S/8", input_size=16, num_classes=10)
    """
    return DiT(model_config(name_or_config, **overrides))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an official DiT file or a ditscale export / training checkpoint.

    Accepts a bare state dict or a dict holding "ema" (preferred) or "model". Loaded with
    ``weights_only=True`` so a checkpoint file can never run code.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-torch files
        raise ConfigError(f"checkpoint {str(path)!r} could not be loaded safely: {err}") from err
    for key in ("ema", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}
