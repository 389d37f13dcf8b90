"""The per-worker loop in one process (DeepSpeed on a one-rank gloo group), no Ray."""

import math

import pytest
import torch
from pydantic import ValidationError

from dit.errors import ConfigError
from dit.models import create_model, load_state_dict
from dit.train import NonFiniteLoss, TrainConfig, export_checkpoint, train
from dit.train.loop import BAD_SHARDS, SKIPPED_SAMPLES

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}


def recipe(data, **kw):
    base = dict(model=TINY, data=data, steps=12, global_batch=32, lr=1e-3, log_every=2,
                checkpoint_every=6, zero_stage=2, shuffle_buffer=200)
    return TrainConfig(**{**base, **kw})


def run(cfg, tmp_path, **kw):
    reports = []
    result = train(cfg, lambda m, c: reports.append((m, c)), checkpoint_root=tmp_path, **kw)
    return result, reports


def test_loss_falls_and_metrics_are_complete(digits8, tmp_path):
    result, reports = run(recipe(digits8, steps=24, checkpoint_every=0, log_every=4), tmp_path)
    losses = [m["train/loss"] for m, _ in reports]
    assert [m["step"] for m, _ in reports] == [4, 8, 12, 16, 20, 24]
    assert losses[-1] < 0.8 * losses[0]
    last = reports[-1][0]
    for key in ("train/grad_norm", "train/images_per_s", "train/tflops_per_s", "train/compute_gflops",
                SKIPPED_SAMPLES, BAD_SHARDS, "sys/peak_memory_gb"):
        assert key in last and math.isfinite(last[key]), key
    assert last[SKIPPED_SAMPLES] == last[BAD_SHARDS] == 0.0  # healthy data: nothing damaged
    gflops = last["train/compute_gflops"] / (3 * 24 * 32)
    assert gflops == pytest.approx(last["train/tflops_per_s"] * 1e3 / (6 * last["train/images_per_s"]))
    assert reports[-1][1] is not None and result.step == 24  # the final step always checkpoints


def test_resume_repeats_the_uninterrupted_run(digits8, tmp_path):
    cfg = recipe(digits8)
    _, full = run(cfg, tmp_path / "a")
    ckpt6 = next(c for m, c in full if m["step"] == 6)
    # Interrupted: the same run restarted from its step-6 checkpoint.
    _, tail = run(cfg, tmp_path / "b", resume_from=ckpt6)
    assert [m["step"] for m, _ in tail] == [8, 10, 12]
    for (a, _), (b, _) in zip(full[-3:], tail):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-7)
        assert a["train/compute_gflops"] == b["train/compute_gflops"]
    ema_full = torch.load(full[-1][1] + "/ema.pt", weights_only=True)
    ema_tail = torch.load(tail[-1][1] + "/ema.pt", weights_only=True)
    for k in ema_full:
        assert torch.allclose(ema_full[k], ema_tail[k], atol=1e-6), k


def test_zero3_matches_zero2_and_ema_is_gathered(digits8, tmp_path):
    _, z2 = run(recipe(digits8, steps=4, checkpoint_every=0, ema_decay=0.5), tmp_path / "z2")
    _, z3 = run(recipe(digits8, steps=4, checkpoint_every=0, ema_decay=0.5, zero_stage=3), tmp_path / "z3")
    assert [m["train/loss"] for m, _ in z2] == pytest.approx([m["train/loss"] for m, _ in z3], rel=1e-5)
    e2 = torch.load(z2[-1][1] + "/ema.pt", weights_only=True)
    e3 = torch.load(z3[-1][1] + "/ema.pt", weights_only=True)
    assert e2.keys() == e3.keys()
    assert all(e3[k].numel() > 0 and torch.allclose(e2[k], e3[k], atol=1e-5) for k in e2)


def test_export_loads_strictly_into_the_model(digits8, tmp_path):
    _, reports = run(recipe(digits8, steps=2, checkpoint_every=0), tmp_path)
    out = export_checkpoint(reports[-1][1], tmp_path / "export" / "tiny.pt")
    model = create_model(TINY, input_size=8, in_channels=1, num_classes=10)
    model.load_state_dict(load_state_dict(out), strict=True)
    with pytest.raises(ConfigError, match="not a ditscale checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "x.pt")


def test_nan_stops_at_once_with_the_step(digits8, tmp_path):
    def poison(step, engine):
        if step == 3:
            with torch.no_grad():
                next(engine.module.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match="at step 4"):
        run(recipe(digits8), tmp_path, step_callbacks=[poison])


def test_bad_recipes_name_the_field(digits8):
    with pytest.raises(ValidationError, match="zero_stage"):
        recipe(digits8, zero_stage=4)
    with pytest.raises(ValidationError, match="precision"):
        recipe(digits8, precision="fp8")
    with pytest.raises(ValidationError, match="unknown model"):
        recipe(digits8, model="DiT-M/2")
    with pytest.raises(ConfigError, match=r"global_batch \(30\) must be divisible by workers \(4\)"):
        recipe(digits8, global_batch=30).accumulation(4)
    assert recipe(digits8, global_batch=32, micro_batch=4).accumulation(2) == (4, 4)


def test_bf16_trains_through_deepspeed(digits8, tmp_path):
    # DeepSpeed casts the weights to bf16 but neither the fp32 x_t from the diffusion nor the
    # positional buffer; the model must run in its weights' dtype.
    result, reports = run(recipe(digits8, steps=4, checkpoint_every=0, log_every=2, precision="bf16"), tmp_path)
    assert result.step == 4 and all(math.isfinite(m["train/loss"]) for m, _ in reports)


def test_the_diffusion_target_stays_fp32_under_bf16_weights():
    """The latents and noise reach q_sample in fp32 (a bf16 target would be quantised); only the
    model's own input is cast, by the model."""
    from dit.diffusion import create_diffusion
    from dit.models import create_model
    from dit.train.loop import micro_batch_losses

    model = create_model({"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}, input_size=8,
                         in_channels=1, num_classes=10).to(torch.bfloat16)
    seen = []

    def recording(x_t, t, y):  # what the diffusion hands the model
        seen.append(x_t)
        return model(x_t, t, y)

    diffusion = create_diffusion()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # fp32 latents from the stream
    losses = micro_batch_losses(diffusion, recording, x, torch.arange(4), torch.Generator().manual_seed(0),
                                torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)  # the same draws, all in fp32
    t = torch.randint(0, diffusion.num_timesteps, (4,), generator=gen)
    noise = torch.randn(x.shape, dtype=torch.float32, generator=gen)
    assert torch.equal(seen[0], diffusion.q_sample(x, t, noise))  # exact: nothing was rounded to bf16
    assert all(v.dtype == torch.float32 for v in losses.values())
    losses["loss"].mean().backward()
    assert next(model.parameters()).grad is not None
