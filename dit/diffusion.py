"""Gaussian diffusion for DiT: schedules, the hybrid loss, DDPM/DDIM samplers, guidance.

Numerically this follows the formulas of the DiT / improved-diffusion reference (Ho et al. 2020,
"DDPM"; Nichol & Dhariwal 2021, "IDDPM"; Song et al. 2021, "DDIM"), written afresh:

    forward process   q(x_t | x_0)      = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    posterior         q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I)
                      c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)
                      c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
                      beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    model             eps_theta(x_t, t) and v in [-1, 1] (learned range, IDDPM eq. 15):
                      log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t,  frac = (v + 1) / 2
    loss              L_hybrid = ||eps - eps_theta||^2 + L_vb  (L_vb sees eps_theta detached)

Schedule arrays live in float64 (numpy, as in the reference) and are gathered per timestep into
the batch dtype. A process can be *respaced* to a subset of the original timesteps; the model is
then always called with the original timestep indices (``timestep_map``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dit.errors import ConfigError

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")

__all__ = [
    "GaussianDiffusion",
    "apply_cfg",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_betas",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]


# --------------------------------------------------------------------------------------------
# Noise schedules


def linear_betas(num_steps: int) -> np.ndarray:
    """DDPM's beta 1e-4 -> 0.02, stretched so that any step count adds about the same noise."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM's cosine schedule: abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), s = t / T.

    beta_t = 1 - abar((t+1)/T) / abar(t/T), capped at 0.999 to avoid a singularity at t = T.
    (A Python loop with math.cos on purpose: it runs once and matches the reference bit for bit.)
    """

    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.array(betas, dtype=np.float64)


def get_betas(schedule: str, num_steps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_steps)
    if schedule == "cosine":
        return cosine_betas(num_steps)
    raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Which original timesteps a respaced process keeps (the reference rule).

    ``"ddimN"``: the integer stride i for which range(0, T, i) has exactly N entries.
    ``"a,b,c"`` / ``[a, b, c]`` / ``a``: split T into equal sections and take a, b, c evenly
    spaced steps (rounded fractional stride) from each; "250" of 1000 is one section.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                want = int(spec[len("ddim") :])
            except ValueError:
                raise ConfigError(
                    f"timestep_respacing {section_counts!r}: expected 'ddimN' with an integer N"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ConfigError(
                f"timestep_respacing {section_counts!r}: no integer stride gives exactly {want} of "
                f"{num_timesteps} steps"
            )
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ConfigError(
                f"timestep_respacing must be an int, 'N', 'N1,N2,...' or 'ddimN'; got {section_counts!r}"
            ) from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ConfigError(
                f"timestep_respacing {section_counts!r}: cannot take {count} steps from a section of "
                f"{size} (of {num_timesteps} total); each count must be in 1..{size}"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(k * stride) for k in range(count)]
        start += size
    return set(kept)


# --------------------------------------------------------------------------------------------
# Gaussian helpers (all element-wise, in the dtype of their inputs)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dim but the batch."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), element-wise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Phi(x) that the reference uses (kept for identical numbers)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 levels (bins of width 2/255), in nats.

    The outermost bins reach to -inf / +inf so the 256 probabilities sum to one.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def apply_cfg(model_output: Tensor, cfg_scale: float, eps_channels: int) -> Tensor:
    """Guide a doubled-batch output [cond; uncond]: eps = eps_u + s (eps_c - eps_u).

    Extra channels (learned variance) come from the conditional half. Returns a doubled batch
    again, like a model's ``forward_with_cfg``.
    """
    cond, uncond = model_output.chunk(2, dim=0)
    eps_c, eps_u = cond[:, :eps_channels], uncond[:, :eps_channels]
    guided = torch.cat([eps_u + cfg_scale * (eps_c - eps_u), cond[:, eps_channels:]], dim=1)
    return torch.cat([guided, guided], dim=0)


# --------------------------------------------------------------------------------------------
# The process


class GaussianDiffusion:
    """A (possibly respaced) diffusion process with epsilon prediction.

    ``betas`` are this process's betas; ``timestep_map[t]`` is the original timestep that step t
    stands for (identity unless respaced) and ``base_betas`` the original process's betas, from
    which ``respaced`` builds shorter processes.
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        learn_sigma: bool = True,
        timestep_map: Sequence[int] | None = None,
        base_betas: np.ndarray | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ConfigError("betas must be a non-empty 1-d array with values in (0, 1]")
        T = len(betas)
        self.num_timesteps = T
        self.learn_sigma = learn_sigma
        self.betas = betas
        self.timestep_map = np.arange(T) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        self.base_betas = betas if base_betas is None else np.asarray(base_betas, dtype=np.float64)

        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)

        # q(x_t | x_0) and its inversions x_0 <-> eps
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # beta~_0 = 0, so its log is clipped to beta~_1 (a one-step process has no beta~_1: use beta).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if T > 1 else betas)
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)

        # Fixed "large" variance (beta_t, with beta~_1 at t=0) for models without learned sigma.
        self.fixed_large_variance = np.append(pv[1], betas[1:]) if T > 1 else betas.copy()
        self.log_fixed_large_variance = np.log(self.fixed_large_variance)
        self.log_betas = np.log(betas)

        self._tables_by_device: dict[torch.device, dict[str, Tensor]] = {}
        self._respaced: dict[str, GaussianDiffusion] = {}

    # ---- gathering float64 tables into the batch -------------------------------------------

    _TABLES = (
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "fixed_large_variance",
        "log_fixed_large_variance",
        "log_betas",
    )

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        # One upload per device; MPS has no float64, so the tables go there as float32.
        if device not in self._tables_by_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            tables = {k: torch.as_tensor(getattr(self, k), dtype=dtype, device=device) for k in self._TABLES}
            tables["timestep_map"] = torch.as_tensor(self.timestep_map, dtype=torch.long, device=device)
            self._tables_by_device[device] = tables
        return self._tables_by_device[device]

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """table[t] in like's dtype (at least float32), shaped (N, 1, ...) to broadcast over like.

        float32 batches get exactly the reference's float32 coefficients; half-precision batches
        still get float32 ones (bf16 would round e.g. 1/sqrt(abar_T) ~ 157 to 3 digits).
        """
        dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
        values = self._tables(t.device)[name][t].to(dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original timestep indices the model was trained on (t -> timestep_map[t])."""
        return self._tables(t.device)["timestep_map"][t]

    # ---- forward process and posterior ------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x0
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ---- reverse process ---------------------------------------------------------------------

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from the raw model output: (eps, v) if learn_sigma else eps."""
        C = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"learn_sigma: model output needs {2 * C} channels, got {model_output.shape[1]}"
                )
            eps, v = model_output.split(C, dim=1)
            # Learned range (IDDPM eq. 15): interpolate between the two natural bounds in log space.
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if model_output.shape[1] != C:
                raise ValueError(f"model output needs {C} channels, got {model_output.shape[1]}")
            eps = model_output
            variance = self._extract("fixed_large_variance", t, x_t).expand_as(x_t)
            log_variance = self._extract("log_fixed_large_variance", t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample_step(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, noise: Tensor, *, clip_denoised: bool = False
    ) -> Tensor:
        """Ancestral step x_{t-1} = mean + sigma z; no noise at t = 0 (the output is x_0)."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_step(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        noise: Tensor,
        *,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> Tensor:
        """DDIM (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        # eps from the (possibly clipped) x_0, so the step stays consistent with it
        eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x_t)
        abar_prev = self._extract("alphas_cumprod_prev", t, x_t)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * sigma * noise

    # ---- training ------------------------------------------------------------------------------

    def vb_bits(
        self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool = False
    ) -> Tensor:
        """Per-sample variational bound term in bits: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model: Callable[..., Tensor], x0: Tensor, t: Tensor, y: Any, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Hybrid loss per sample: {"loss": mse + vb, "mse": ..., "vb": ...}, each of shape (N,).

        vb is not multiplied by T/1000 (the reference only does that for RESCALED_MSE; DiT uses MSE).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        # A bf16/fp16 model's output is widened so the targets and losses are computed in (at
        # least) the inputs' precision, never quantised to the model's.
        model_output = model(x_t, self.model_timesteps(t), y).to(torch.promote_types(x0.dtype, torch.float32))
        C = x0.shape[1]
        if self.learn_sigma:
            if model_output.shape != (x0.shape[0], 2 * C, *x0.shape[2:]):
                raise ValueError(
                    f"learn_sigma: expected model output {(x0.shape[0], 2 * C, *x0.shape[2:])}, got {tuple(model_output.shape)}"
                )
            eps, v = model_output.split(C, dim=1)
            # Stop-grad on eps: the bound trains only the variance; the mean is left to the MSE (IDDPM §3.1).
            vb = self.vb_bits(torch.cat([eps.detach(), v], dim=1), x0, x_t, t)
            mse = mean_flat((noise - eps) ** 2)
        else:
            mse = mean_flat((noise - model_output) ** 2)
            vb = torch.zeros_like(mse)  # fixed variance: nothing for the bound to train
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ---- respacing ------------------------------------------------------------------------------

    def respaced(
        self, spec: str | int | Sequence[int], *, argument: str = "timestep_respacing"
    ) -> GaussianDiffusion:
        """This process's original (un-respaced) process restricted to fewer steps; cached by spec.

        New betas come from consecutive kept alphas_cumprod: beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}},
        so the respaced abar equals the original abar at the kept steps.
        """
        key = spec if isinstance(spec, str) else ",".join(str(int(s)) for s in np.atleast_1d(spec))
        if key not in self._respaced:
            T = len(self.base_betas)
            if isinstance(spec, int) and not 1 <= spec <= T:
                raise ConfigError(f"{argument} must be in 1..{T} (the process has {T} steps); got {spec}")
            try:
                kept = np.array(sorted(space_timesteps(T, spec)), dtype=np.int64)
            except ConfigError as e:
                raise ConfigError(str(e).replace("timestep_respacing", argument, 1)) from None
            base_acp = np.cumprod(1.0 - self.base_betas)
            kept_acp = base_acp[kept]
            new_betas = 1.0 - kept_acp / np.append(1.0, kept_acp[:-1])
            self._respaced[key] = GaussianDiffusion(
                new_betas, learn_sigma=self.learn_sigma, timestep_map=kept, base_betas=self.base_betas
            )
        return self._respaced[key]

    # ---- sampling -------------------------------------------------------------------------------

    def _denoiser(
        self, model: Any, y: Any, cfg_scale: float, null_class: int | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """f(x, t_model) -> model output for x, with classifier-free guidance when cfg_scale != 1."""
        if cfg_scale == 1.0:
            return lambda x, t: model(x, t, y)
        if not isinstance(y, Tensor):
            raise ConfigError("cfg_scale != 1 needs class labels y as a tensor")
        inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers keep attributes on .module
        if null_class is None:
            null_class = getattr(inner, "num_classes", None)
        if null_class is None:
            raise ConfigError(
                "null_class: the model has no num_classes attribute; pass null_class=<id> for guidance"
            )
        y_in = torch.cat([y, torch.full_like(y, int(null_class))])
        forward_with_cfg = getattr(inner, "forward_with_cfg", None)

        def guided(x: Tensor, t: Tensor) -> Tensor:
            x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
            if forward_with_cfg is not None:
                out = forward_with_cfg(x_in, t_in, y_in, cfg_scale)
            else:
                out = apply_cfg(model(x_in, t_in, y_in), cfg_scale, eps_channels=x.shape[1])
            return out[: len(x)]

        return guided

    @torch.no_grad()
    def sample(
        self,
        model: Any,
        shape: Sequence[int],
        y: Any,
        *,
        sampler: str = "ddpm",
        steps: int | str | None = 250,
        cfg_scale: float = 1.0,
        eta: float = 0.0,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
        null_class: int | None = None,
    ) -> Tensor:
        """Draw x_0 samples of ``shape``.

        ``steps`` respaces the original process (an int, or a respacing string such as "ddim50");
        None samples with this process as is. ``noise`` is x_T (drawn from ``generator`` if None);
        per-step noise also comes from ``generator``. Guidance uses ``model.forward_with_cfg`` when
        the model has it; the null class is ``null_class`` or else ``model.num_classes``.
        """
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        process = self if steps is None else self.respaced(steps, argument="steps")
        shape = tuple(int(s) for s in shape)
        if isinstance(y, Tensor) and y.shape[0] != shape[0]:
            raise ConfigError(f"y has {y.shape[0]} labels but shape asks for {shape[0]} samples")
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ConfigError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            x = noise
        else:
            device = _infer_device(model, y, generator)
            x = torch.randn(shape, generator=generator, device=device)

        denoise = self._denoiser(model, y, cfg_scale, null_class)
        indices = range(process.num_timesteps - 1, -1, -1)
        if progress:
            try:
                from tqdm.auto import tqdm

                indices = tqdm(indices, desc=f"{sampler} {process.num_timesteps} steps")
            except ImportError:  # tqdm is optional; sampling works without a bar
                pass
        for i in indices:
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            out = denoise(x, process.model_timesteps(t))
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if sampler == "ddpm":
                x = process.p_sample_step(out, x, t, z, clip_denoised=clip_denoised)
            else:
                x = process.ddim_step(out, x, t, z, eta=eta, clip_denoised=clip_denoised)
        return x


def _infer_device(model: Any, y: Any, generator: torch.Generator | None) -> torch.device:
    """Where x_T goes when not given: the labels' device, else the model's, else the generator's."""
    if isinstance(y, Tensor):
        return y.device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return generator.device if generator is not None else torch.device("cpu")


def create_diffusion(
    steps: int = 1000,
    schedule: str = "linear",
    learn_sigma: bool = True,
    timestep_respacing: str | int | None = None,
) -> GaussianDiffusion:
    """The DiT diffusion: ``steps``-step ``schedule`` betas, optionally respaced (e.g. "250", "ddim50").

    Like the reference, the process is always built through respacing (all steps when
    ``timestep_respacing`` is None), so its betas are 1 - abar_t / abar_{t-1}.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer; got {steps!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    base = GaussianDiffusion(get_betas(schedule, steps), learn_sigma=learn_sigma)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = steps
    return base.respaced(timestep_respacing)
