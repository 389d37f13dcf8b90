"""Gaussian diffusion: schedules, posterior, losses, respacing, samplers, guidance (CPU, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dit.diffusion import (
    apply_cfg,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)
from dit.errors import ConfigError

C, H, W, K = 4, 8, 8, 10  # latent channels, size, classes


class TinyEps(nn.Module):
    """A stand-in denoiser: conv net conditioned on (t, y), returning 2C (or C) channels."""

    def __init__(self, learn_sigma: bool = True, hidden: int = 16, num_classes: int = K):
        super().__init__()
        self.num_classes = num_classes
        self.t_emb = nn.Embedding(1000, hidden)
        self.y_emb = nn.Embedding(num_classes + 1, hidden)  # + the null class
        self.inp = nn.Conv2d(C, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 2 * C if learn_sigma else C, 3, padding=1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(t.tolist()))
        h = self.inp(x) + (self.t_emb(t) + self.y_emb(y))[:, :, None, None]
        out = 0.1 * self.out(torch.nn.functional.silu(h))
        # eps ~ x_t keeps an untrained stand-in's samples bounded (x_0 ~ 0), like a sane denoiser
        return torch.cat([out[:, :C] + x, out[:, C:]], dim=1)


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, H, W, generator=g), torch.randint(0, K, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# Schedules


def test_linear_schedule_closed_form() -> None:
    d = create_diffusion()
    assert d.num_timesteps == 1000 and d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4, rel=1e-12) and d.betas[-1] == pytest.approx(0.02, rel=1e-12)
    expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(d.alphas_cumprod, expected, rtol=1e-12)
    assert d.alphas_cumprod[-1] == pytest.approx(4.035e-5, rel=1e-3)  # the well-known abar_T of DDPM

    short = create_diffusion(steps=100)  # scale = 10: beta 1e-3 -> 0.2
    assert short.betas[0] == pytest.approx(1e-3) and short.betas[-1] == pytest.approx(0.2)


def test_cosine_schedule_closed_form() -> None:
    d = create_diffusion(schedule="cosine")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    ts = np.arange(0, 990)  # the last few betas hit the 0.999 cap
    np.testing.assert_allclose(d.alphas_cumprod[ts], [f((t + 1) / 1000) / f(0) for t in ts], rtol=1e-9)
    assert d.betas.max() <= 0.999


# ---------------------------------------------------------------------------------------------
# Forward process and posterior


def test_q_sample_statistics() -> None:
    d = create_diffusion()
    n, t_val, x0_val = 20000, 300, 0.7
    x0 = torch.full((n, 1, 1, 1), x0_val, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.long)
    xt = d.q_sample(
        x0, t, torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    abar = d.alphas_cumprod[t_val]
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * x0_val, abs=0.02)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - abar), rel=0.02)
    assert xt.dtype == torch.float64


def test_posterior_matches_numpy_float64() -> None:
    d = create_diffusion()
    rng = np.random.default_rng(0)
    x0, xt = rng.standard_normal((5, C, 2, 2)), rng.standard_normal((5, C, 2, 2))
    t = np.array([0, 1, 10, 500, 999])

    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    b, a, ap = betas[t][:, None, None, None], abar[t][:, None, None, None], abar_prev[t][:, None, None, None]
    mean = b * np.sqrt(ap) / (1 - a) * x0 + (1 - ap) * np.sqrt(1 - b) / (1 - a) * xt
    var = b * (1 - ap) / (1 - a)

    m, v, logv = d.q_posterior_mean_variance(torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(t))
    np.testing.assert_allclose(m.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(v.numpy(), np.broadcast_to(var, v.shape), rtol=1e-9, atol=1e-15)
    # log variance is clipped at t=0 (beta~_0 = 0) to beta~_1
    var1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    assert logv[0].unique().item() == pytest.approx(math.log(var1), rel=1e-12)
    np.testing.assert_allclose(logv[1:].numpy(), np.log(np.broadcast_to(var[1:], logv[1:].shape)), rtol=1e-9)


def test_learned_range_endpoints() -> None:
    d = create_diffusion()
    t = torch.tensor([0, 1, 250, 999])
    xt = torch.randn(4, C, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(xt)
    for v, table in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        out = d.p_mean_variance(torch.cat([eps, torch.full_like(xt, v)], 1), xt, t)
        expected = np.broadcast_to(table[t.numpy()][:, None, None, None], xt.shape)
        np.testing.assert_allclose(out["log_variance"].numpy(), expected, rtol=1e-12)
        np.testing.assert_allclose(out["variance"].numpy(), np.exp(expected), rtol=1e-12)
    # pred_xstart inverts q_sample when eps is the true noise
    x0 = torch.randn_like(xt)
    out = d.p_mean_variance(torch.cat([eps, torch.zeros_like(xt)], 1), d.q_sample(x0, t, eps), t)
    torch.testing.assert_close(out["pred_xstart"], x0)


def test_discretized_likelihood_sums_to_one() -> None:
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 bin centres
    for mean, log_scale in ((0.0, -3.0), (0.3, -1.0), (-0.9, 0.5)):
        lp = discretized_gaussian_log_likelihood(
            x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, log_scale)
        )
        assert (lp <= 0).all()
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_normal_kl() -> None:
    m, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(10, dtype=torch.float64))
    # KL(N(0,1) || N(1, e^2)) = log(e) + (1 + 1) / (2 e^2) - 1/2
    one = torch.ones(1, dtype=torch.float64)
    kl = normal_kl(0 * one, 0 * one, one, 2 * one).item()
    assert kl == pytest.approx(1 + 2 / (2 * math.e**2) - 0.5, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Respacing


def test_space_timesteps_rules() -> None:
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert sorted(space_timesteps(100, "10,5")) == sorted(space_timesteps(100, [10, 5]))
    assert sorted(space_timesteps(1000, 1000)) == list(range(1000))


@pytest.mark.parametrize("spec", ["250", 250, "ddim25", "10,15,20"])
def test_respaced_reproduces_base_alphas_cumprod(spec: str | int) -> None:
    base = create_diffusion()
    d = create_diffusion(timestep_respacing=spec)
    assert d.num_timesteps == len(d.timestep_map)
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12)
    if str(spec) == "250":
        assert list(d.timestep_map) == sorted(space_timesteps(1000, [250]))


def test_model_called_with_original_timesteps() -> None:
    d = create_diffusion(timestep_respacing="ddim10")  # kept steps 0, 100, ..., 900
    model = TinyEps()
    x0, y = batch(3)
    d.training_losses(model, x0, torch.tensor([0, 5, 9]), y)
    assert model.calls == [(0, 500, 900)]


# ---------------------------------------------------------------------------------------------
# Training loss


def test_training_losses_shapes_and_terms() -> None:
    d = create_diffusion()
    x0, y = batch(4)
    t = torch.tensor([0, 1, 500, 999])
    out = d.training_losses(TinyEps(), x0, t, y)
    assert set(out) == {"loss", "mse", "vb"}
    for v in out.values():
        assert v.shape == (4,) and torch.isfinite(v).all()
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])

    plain = create_diffusion(learn_sigma=False).training_losses(TinyEps(learn_sigma=False), x0, t, y)
    assert (plain["vb"] == 0).all()
    torch.testing.assert_close(plain["loss"], plain["mse"])


def test_vb_term_is_kl_or_decoder_nll_and_stops_eps_gradient() -> None:
    d = create_diffusion()
    x0, _ = batch(2)
    t, noise = torch.tensor([0, 700]), torch.randn_like(x0)
    raw = nn.Parameter(0.1 * torch.randn(2, 2 * C, H, W))
    out = d.training_losses(lambda x, t_, y: raw, x0, t, None, noise=noise)

    xt = d.q_sample(x0, t, noise)
    p = d.p_mean_variance(raw.detach(), xt, t)
    q_mean, _, q_logv = d.q_posterior_mean_variance(x0, xt, t)
    kl = normal_kl(q_mean, q_logv, p["mean"], p["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2)
    nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(out["vb"], torch.stack([nll[0], kl[1]]))
    torch.testing.assert_close(out["mse"], ((noise - raw[:, :C]) ** 2).mean(dim=(1, 2, 3)))

    out["vb"].sum().backward()
    assert (raw.grad[:, :C] == 0).all() and raw.grad[:, C:].abs().sum() > 0


def test_adamw_decreases_loss_on_fixed_batch() -> None:
    torch.manual_seed(0)
    d, model = create_diffusion(), TinyEps()
    x0, y = batch(8)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2))
    noise = torch.randn_like(x0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0)
    losses = []
    for _ in range(20):
        loss = d.training_losses(model, x0, t, y, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------------
# Sampling and guidance


def test_ddim_eta0_deterministic_and_ddpm_seeded() -> None:
    d, model = create_diffusion(), TinyEps().eval()
    _, y = batch(2)
    z = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(3))
    a = d.sample(model, z.shape, y, sampler="ddim", steps=10, noise=z)
    b = d.sample(
        model, z.shape, y, sampler="ddim", steps=10, noise=z, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(a, b) and a.shape == z.shape and torch.isfinite(a).all()

    run = lambda seed: d.sample(model, z.shape, y, steps=10, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    eta1 = d.sample(
        model,
        z.shape,
        y,
        sampler="ddim",
        steps=10,
        eta=1.0,
        noise=z,
        generator=torch.Generator().manual_seed(1),
    )
    assert not torch.equal(eta1, a)


def test_sample_cfg1_equals_manual_unguided_loop() -> None:
    d, model = create_diffusion(), TinyEps().eval()
    _, y = batch(3)
    z = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(4))
    got = d.sample(
        model, z.shape, y, steps=8, cfg_scale=1.0, noise=z, generator=torch.Generator().manual_seed(7)
    )

    p, g, x = d.respaced(8), torch.Generator().manual_seed(7), z
    with torch.no_grad():
        for i in reversed(range(8)):
            t = torch.full((3,), i)
            out = p.p_mean_variance(model(x, torch.from_numpy(p.timestep_map)[t], y), x, t)
            x = out["mean"] + (i > 0) * torch.exp(0.5 * out["log_variance"]) * torch.randn(
                x.shape, generator=g
            )
    torch.testing.assert_close(got, x)
    assert all(len(c) == 3 for c in model.calls)  # never doubled


def test_guidance_doubles_batch_and_uses_forward_with_cfg() -> None:
    seen = {}

    class WithCfg(TinyEps):
        def forward_with_cfg(self, x, t, y, cfg_scale):
            seen.update(n=len(x), y=y.clone(), scale=cfg_scale)
            return apply_cfg(self(x, t, y), cfg_scale, C)

    d, model = create_diffusion(), WithCfg().eval()
    _, y = batch(2)
    z = torch.randn(2, C, H, W)
    out = d.sample(model, z.shape, y, sampler="ddim", steps=4, cfg_scale=4.0, noise=z)
    assert out.shape == z.shape and seen["n"] == 4 and seen["scale"] == 4.0
    assert torch.equal(seen["y"], torch.cat([y, torch.full_like(y, K)]))
    # the fallback path (no forward_with_cfg) gives the same result
    plain = TinyEps().eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        d.sample(plain, z.shape, y, sampler="ddim", steps=4, cfg_scale=4.0, noise=z), out
    )


def test_apply_cfg_formula() -> None:
    cond, uncond = torch.randn(2, 2 * C, 2, 2), torch.randn(2, 2 * C, 2, 2)
    out = apply_cfg(torch.cat([cond, uncond]), 3.0, C)
    torch.testing.assert_close(out[:2, :C], uncond[:, :C] + 3.0 * (cond[:, :C] - uncond[:, :C]))
    torch.testing.assert_close(out[:2, C:], cond[:, C:])
    torch.testing.assert_close(apply_cfg(torch.cat([cond, uncond]), 1.0, C)[:2], cond)


def test_guidance_needs_null_class() -> None:
    d = create_diffusion()
    raw = lambda x, t, y: torch.zeros(len(x), 2 * C, H, W)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="null_class"):
        d.sample(raw, (2, C, H, W), y, steps=2, cfg_scale=2.0)
    assert d.sample(raw, (2, C, H, W), y, steps=2, cfg_scale=2.0, null_class=K).shape == (2, C, H, W)


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"schedule": "quadratic"}, "schedule"),
        ({"steps": 0}, "steps"),
        ({"timestep_respacing": "ddim999"}, "timestep_respacing"),
        ({"timestep_respacing": "2000"}, "timestep_respacing"),
        ({"timestep_respacing": "abc"}, "timestep_respacing"),
    ],
)
def test_create_diffusion_bad_args(kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        create_diffusion(**kwargs)


def test_sample_bad_args() -> None:
    d, model = create_diffusion(), TinyEps()
    y = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ConfigError, match="sampler.*ddpm, ddim"):
        d.sample(model, (1, C, H, W), y, sampler="euler")
    with pytest.raises(ConfigError, match="steps"):
        d.sample(model, (1, C, H, W), y, steps=2000)
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------
# With the real DiT, when it is available


def test_with_real_dit_model() -> None:
    models = pytest.importorskip("dit.models")
    if not hasattr(models, "create_model"):
        pytest.skip("dit.models.create_model not written yet")
    torch.manual_seed(0)
    model = models.create_model(
        {
            "depth": 2,
            "hidden_size": 64,
            "num_heads": 4,
            "patch_size": 2,
            "input_size": 8,
            "in_channels": 4,
            "num_classes": 10,
        }
    )
    d = create_diffusion()
    x0, y = batch(2)
    out = d.training_losses(model, x0, torch.tensor([3, 900]), y)
    assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all()
    model.eval()
    s = d.sample(
        model,
        (2, C, H, W),
        y,
        sampler="ddpm",
        steps=5,
        cfg_scale=1.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert s.shape == (2, C, H, W) and torch.isfinite(s).all()


def test_half_precision_batches_keep_float32_coefficients() -> None:
    d = create_diffusion()
    x0 = torch.randn(2, C, 2, 2)
    t, noise = torch.tensor([10, 999]), torch.randn(2, C, 2, 2)
    ref = d.q_sample(x0, t, noise)
    half = d.q_sample(x0.bfloat16(), t, noise.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=0.05, rtol=0.02)
