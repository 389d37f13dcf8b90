"""Evaluation: Fréchet distance, mergeable statistics, seeded sampling, the digits extractor,
Inception's missing-weights error, FID inside the training loop (and exact resume with it),
sample grids (and their MLflow artifacts), ``ditscale evaluate``."""

import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

from dit.diffusion import create_diffusion
from dit.errors import ConfigError
from dit.evaluate import (
    EvalConfig,
    Evaluator,
    Reference,
    class_labels,
    eval_tags,
    evaluate,
    generate,
    rank_chunks,
    reference_statistics,
)
from dit.evaluate.features import (
    DIGITS,
    INCEPTION_FILE,
    ModuleExtractor,
    load_extractor,
)
from dit.evaluate.fid import ClassStats, FeatureStats, frechet_distance, precision_recall, save_statistics
from dit.evaluate.sampling import _mix, _sampling_model
from dit.latents import Manifest, make_digits
from dit.models import create_model

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def sqrtm_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def tiny_dit(seed=0, channels=1, size=8):
    """A tiny DiT whose output depends on x, t and y (adaLN-Zero would start at exactly 0)."""
    torch.manual_seed(seed)
    model = create_model({"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}, input_size=size,
                         in_channels=channels, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def small_cfg(**kw):
    base = dict(enabled=True, num_samples=24, batch_size=8, sampler="ddim", steps=5, features=DIGITS)
    return EvalConfig(**{**base, **kw})


def toy_extractor():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.Tanh())
    return ModuleExtractor(net, name="toy", dim=6, input_size=8, channels=1)


# ------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_matches_closed_forms_and_numpy():
    rng = np.random.default_rng(0)
    # Commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    res = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert res.fid == pytest.approx(expect, rel=1e-10) and res.imag == pytest.approx(0.0, abs=1e-8) and res.eps == 0
    # 1-d Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]).fid == pytest.approx(4.0 + 1.0)
    # General covariances against a direct computation: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2).
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8, 2.0)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    r1 = sqrtm_psd(s1)
    direct = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm_psd(r1 @ s2 @ r1))
    assert frechet_distance(m1, s1, m2, s2).fid == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(m1, s1, m1, s1).fid == pytest.approx(0.0, abs=1e-8)
    # Near-singular (rank 2 of 6): still finite.
    low = rng.normal(size=(6, 2))
    res = frechet_distance(np.zeros(6), low @ low.T, np.zeros(6), np.eye(6))
    assert math.isfinite(res.fid) and res.fid > 0
    with pytest.raises(ConfigError, match="different shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_statistics_merge_across_simulated_ranks_equals_one_process():
    rng = np.random.default_rng(1)
    feats = torch.from_numpy(rng.normal(size=(301, 7)) * 3 + 1).float()
    one = FeatureStats(7)
    one.update(feats)
    ranks = [FeatureStats(7), FeatureStats(7)]
    for i, chunk in enumerate(torch.split(feats, 40)):  # chunks dealt round-robin, as the sampler does
        ranks[i % 2].update(chunk)
    merged = ranks[0].merge(ranks[1])
    assert merged.count == one.count == 301
    np.testing.assert_allclose(merged.mean(), one.mean(), rtol=1e-12)
    np.testing.assert_allclose(merged.cov(), one.cov(), rtol=1e-10, atol=1e-12)
    f64 = feats.double().numpy()
    np.testing.assert_allclose(one.mean(), f64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.cov(), np.cov(f64, rowvar=False), rtol=1e-9, atol=1e-12)


def test_precision_recall_and_inception_score_limits():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 4))
    p, r = precision_recall(real, real.copy(), k=3)
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    p, r = precision_recall(real, 0.2 * rng.normal(size=(200, 4)), k=3)  # mode collapse: precise, low recall
    assert p > 0.9 and r < 0.5
    cs = ClassStats(5)
    cs.update(torch.eye(5).repeat(4, 1) * 50)  # confident and spread over 5 classes: IS = 5
    assert cs.inception_score() == pytest.approx(5.0, rel=1e-6)
    cs = ClassStats(5)
    cs.update(torch.zeros(10, 5))  # uniform predictions: IS = 1
    assert cs.inception_score() == pytest.approx(1.0)


# ------------------------------------------------------------------------------ sampling


def test_balanced_labels_are_exact_and_uniform_labels_are_seeded():
    y = class_labels(1000, 10, "balanced", seed=3)
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    assert y[:20].tolist() != (torch.arange(20) % 10).tolist()  # shuffled, not in class order
    counts = torch.bincount(class_labels(1003, 10, "balanced"), minlength=10)
    assert counts.max() - counts.min() == 1 and counts.sum() == 1003
    u = class_labels(1000, 10, "uniform", seed=3)
    assert torch.equal(u, class_labels(1000, 10, "uniform", seed=3)) and not torch.equal(u, class_labels(1000, 10, "uniform", seed=4))
    assert torch.bincount(u, minlength=10).tolist() != [100] * 10
    assert rank_chunks(50, 16, 1, 2) == [(1, 16, 32), (3, 48, 50)]


def test_same_seed_same_samples_whatever_the_worker_count():
    model, d = tiny_dit(), create_diffusion()
    cfg = small_cfg()

    def run(c, rank=0, world=1):
        return {lo: z for lo, _, z, _ in generate(model, d, c, latent_shape=(1, 8, 8), num_classes=10, rank=rank, world_size=world)}

    a, b = run(cfg), run(cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    two = {**run(cfg, 0, 2), **run(cfg, 1, 2)}  # each rank's share, together: the same set
    assert two.keys() == a.keys() and all(torch.equal(a[k], two[k]) for k in a)
    other = run(small_cfg(seed=1))
    assert not torch.equal(torch.cat(list(a.values())), torch.cat(list(other.values())))
    ddpm = run(small_cfg(sampler="ddpm"))
    assert torch.cat(list(ddpm.values())).shape == (24, 1, 8, 8)


def test_guidance_scale_one_equals_unguided_sampling():
    model, d = tiny_dit(), create_diffusion()
    cfg = small_cfg(num_samples=8)
    y = class_labels(8, 10, "balanced", 0)

    def ours(c):
        return next(generate(model, d, c, latent_shape=(1, 8, 8), num_classes=10))[2]

    g = torch.Generator().manual_seed(_mix(0, 0))  # chunk 0's generator
    plain = d.sample(model, (8, 1, 8, 8), y, sampler="ddim", steps="ddim5", generator=g)
    assert torch.equal(ours(cfg), plain)
    assert torch.equal(ours(small_cfg(num_samples=8, cfg_channels="first3")), plain)
    guided = ours(small_cfg(num_samples=8, cfg_scale=1.5))
    assert not torch.allclose(guided, plain)
    # The reference quirk: guidance on the first three latent channels only.
    m4 = tiny_dit(channels=4)
    x, t, yy = torch.randn(4, 4, 8, 8), torch.tensor([5, 5, 9, 9]), torch.tensor([1, 2, 10, 10])
    quirk = _sampling_model(m4, small_cfg(cfg_scale=1.5, cfg_channels="first3"))
    torch.testing.assert_close(quirk.forward_with_cfg(x, t, yy, 1.5), m4.forward_with_cfg(x, t, yy, 1.5, guide_channels=3))
    assert _sampling_model(m4, small_cfg(cfg_scale=1.5)) is m4


def test_x0_is_clipped_on_pixels_by_default_and_never_on_vae_latents():
    """A model that predicts eps = -3 everywhere drives x0 far outside [-1, 1]; on pixels (the
    identity codec) the sampler clips each step's x0, on VAE latents it leaves them alone."""
    from dit.vae import IdentityCodec, VAECodec

    class Wild(torch.nn.Module):
        num_classes, learn_sigma = 10, False

        def forward(self, x, t, y):
            return torch.full_like(x, -3.0)

    class Raw(IdentityCodec):  # pixels, decoded without the final clamp, to see the sampler's output
        def decode(self, latents, *, scaled=False):
            return latents

    class Unbounded(Raw):
        bounded = VAECodec.bounded

    d = create_diffusion(learn_sigma=False)

    def sample(codec, **kw):
        return next(generate(Wild(), d, small_cfg(num_samples=4, **kw), latent_shape=(1, 8, 8), num_classes=10,
                             codec=codec))[2]

    assert IdentityCodec.bounded and not VAECodec.bounded
    on_pixels, on_latents = sample(Raw()), sample(Unbounded())
    assert on_pixels.abs().max() <= 1.0 and on_latents.abs().max() > 10
    assert sample(Raw(), clip_denoised=False).abs().max() > 10
    assert sample(Unbounded(), clip_denoised=True).abs().max() <= 1.0
    assert eval_tags(small_cfg())["eval.clip_denoised"] == "auto"
    assert eval_tags(small_cfg(clip_denoised=False))["eval.clip_denoised"] == "false"


# ------------------------------------------------------------------------------ extractors


def test_digits_extractor_separates_real_from_noise(digits8):
    m = Manifest.load(digits8)
    rec = m.features[DIGITS]
    assert rec["path"] == "features/digits_classifier.pt" and rec["heldout_accuracy"] > 0.9 and rec["dim"] == 64
    ext = load_extractor(DIGITS, manifest=m)
    assert (ext.name, ext.dim, ext.input_size) == (DIGITS, 64, 8)
    src = make_digits(8)
    held = ext.heldout_indices
    train_idx = sorted(set(range(len(src))) - set(held))

    def stats(images):
        s = FeatureStats(ext.dim)
        s.update(ext.features(images))
        return s

    def load(idx):
        return torch.from_numpy(np.stack([src.load(i) for i in idx]))

    real_a, real_b = stats(load(train_idx)), stats(load(held))
    noise = stats(torch.rand(len(held), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    blank = stats(torch.full((len(held), 1, 8, 8), -1.0) + 0.01 * torch.randn(len(held), 1, 8, 8))
    rr = frechet_distance(real_a.mean(), real_a.cov(), real_b.mean(), real_b.cov()).fid
    rn = frechet_distance(real_a.mean(), real_a.cov(), noise.mean(), noise.cov()).fid
    rb = frechet_distance(real_a.mean(), real_a.cov(), blank.mean(), blank.cov()).fid
    assert rr < 0.1 * rn and rr < 0.1 * rb, (rr, rn, rb)


def test_missing_inception_weights_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        load_extractor("inception-v3-tf")
    msg = str(err.value)
    for needle in (INCEPTION_FILE, str(tmp_path / "torch" / "hub" / "checkpoints"), "~/.cache/torch/hub/checkpoints/",
                   "github.com/mseitzer/pytorch-fid/releases", "pip install 'ditscale[fid]'", "eval.feature_weights"):
        assert needle in msg, needle
    with pytest.raises(ConfigError, match=f"eval.feature_weights points at '{tmp_path}/nope.pth'"):
        load_extractor("inception", weights=str(tmp_path / "nope.pth"))


def test_inception_wiring_through_a_stand_in_pytorch_fid(tmp_path, monkeypatch):
    """No torchvision here: a stand-in pytorch_fid module checks how we call it (weights come from
    our file through its load_state_dict_from_url, [-1, 1] input, pool3 + fc logits)."""
    import dit.evaluate.features as features

    calls = {}
    fake = types.ModuleType("pytorch_fid.inception")

    def never(url, *a, **kw):
        raise AssertionError("would download")

    class InceptionV3(torch.nn.Module):
        def __init__(self, blocks, resize_input=True, normalize_input=True):
            super().__init__()
            calls.update(blocks=blocks, resize=resize_input, normalize=normalize_input)
            state = fake.load_state_dict_from_url("https://example/" + INCEPTION_FILE)
            self.proj = torch.nn.Linear(3, 2048)
            self.proj.weight.data.copy_(state["proj"])

        def forward(self, x):
            calls["shape"] = tuple(x.shape)
            return [self.proj(x.mean((2, 3)))[:, :, None, None]]

    fake.InceptionV3, fake.load_state_dict_from_url = InceptionV3, never
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", fake)
    weights = tmp_path / INCEPTION_FILE
    torch.save({"proj": torch.randn(2048, 3), "fc.weight": torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)}, weights)
    with pytest.raises(ConfigError, match="not the FID Inception weights"):
        load_extractor("inception-v3-tf", weights=str(weights))
    monkeypatch.setattr(features, "_file_sha256", lambda p: "6726825d" + "0" * 56)
    ext = load_extractor("inception-v3-tf", weights=str(weights))
    feats, logits = ext.features_and_logits(torch.rand(2, 1, 8, 8) * 2 - 1, logits=True)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and ext.num_classes == 1008
    assert calls == {"blocks": [3], "resize": True, "normalize": False, "shape": (2, 3, 8, 8)}
    assert fake.load_state_dict_from_url is never  # restored


# ------------------------------------------------------------------------------ references


def test_reference_statistics_are_cached_and_npz_references_checked(digits8, tmp_path):
    m = Manifest.load(digits8)
    ext = toy_extractor()
    cfg = small_cfg(features="toy", batch_size=256)
    ref = reference_statistics(cfg, manifest=m, extractor=ext)
    assert ref.count == 1797 and ref.mu.shape == (6,) and ref.sigma.shape == (6, 6)
    assert os.path.dirname(ref.source) == os.path.join(os.path.dirname(digits8), "features")
    again = reference_statistics(cfg, manifest=m, extractor=ext)
    assert again.source == ref.source and np.array_equal(again.sigma, ref.sigma)
    capped = reference_statistics(small_cfg(features="toy", reference_samples=500), manifest=m, extractor=ext)
    assert capped.count == 500 and capped.source != ref.source
    # An ADM-style .npz works as the reference; a wrong dimension is refused.
    path = save_statistics(tmp_path / "ref.npz", ref.mu, ref.sigma)
    loaded = reference_statistics(small_cfg(reference=str(path)), manifest=m, extractor=ext)
    assert np.array_equal(loaded.mu, ref.mu)
    bad = save_statistics(tmp_path / "bad.npz", np.zeros(3), np.eye(3))
    with pytest.raises(ConfigError, match="3-d statistics.*6-d features"):
        reference_statistics(small_cfg(reference=str(bad)), manifest=m, extractor=ext)


def test_evaluate_leaves_the_global_rng_alone_and_reports_precision_recall(digits8):
    m = Manifest.load(digits8)
    cfg = small_cfg(num_samples=40, precision_recall=True, pr_samples=30, inception_score=True)
    model = tiny_dit()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = evaluate(model, cfg, m)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(out) >= {"eval/fid", "eval/fid_sqrtm_imag", "eval/precision", "eval/recall", "eval/inception_score",
                        "eval/seconds"}
    assert math.isfinite(out["eval/fid"]) and 0 <= out["eval/precision"] <= 1 and 1 <= out["eval/inception_score"] <= 10
    assert evaluate(tiny_dit(), cfg, m)["eval/fid"] == out["eval/fid"]


def _two_rank_worker(rank, port, out_dir, digits8):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = Manifest.load(digits8)
        ev = Evaluator(small_cfg(num_samples=40, precision_recall=True, pr_samples=30, inception_score=True),
                       manifest=m, diffusion=create_diffusion())
        out = ev.run(tiny_dit())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_one_process_result(digits8, tmp_path):
    from conftest import free_port

    single = evaluate(tiny_dit(), small_cfg(num_samples=40, precision_recall=True, pr_samples=30, inception_score=True),
                      Manifest.load(digits8))
    torch.multiprocessing.start_processes(_two_rank_worker, args=(free_port(), str(tmp_path), digits8), nprocs=2,
                                          start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("eval/fid", "eval/precision", "eval/recall", "eval/inception_score"):
        assert r0[key] == r1[key]  # rank 0's metrics, broadcast
        assert r0[key] == pytest.approx(single[key], rel=1e-6), key  # float32 sampling in other processes


# ------------------------------------------------------------------------------ in the loop


def recipe(data, **kw):
    from dit.train import TrainConfig

    base = dict(model=TINY, data=data, steps=12, global_batch=32, lr=1e-3, log_every=2, checkpoint_every=6,
                zero_stage=2, shuffle_buffer=200)
    return TrainConfig(**{**base, **kw})


def run(cfg, root, **kw):
    from dit.train import train

    reports = []
    train(cfg, lambda m, c: reports.append((m, c)), checkpoint_root=root, **kw)
    return reports


def test_train_logs_fid_at_eval_steps_and_training_improves_it(digits8, tmp_path):
    ev = dict(enabled=True, interval=100, num_samples=256, batch_size=128, sampler="ddpm", steps=25, features=DIGITS)
    cfg = recipe(digits8, steps=200, lr=2e-3, ema_decay=0.95, log_every=1000, checkpoint_every=0, zero_stage=0, eval=ev)
    assert cfg.eval.every == 100
    torch.manual_seed(0)
    untrained = evaluate(create_model(TINY, input_size=8, in_channels=1, num_classes=10), cfg.eval, digits8,
                         random_flip=True)["eval/fid"]
    reports = run(cfg, tmp_path)
    assert [int(m["step"]) for m, _ in reports] == [100, 200]  # eval steps report even off the log schedule
    for m, _ in reports:  # training and eval metrics in one report
        assert "train/loss" in m and math.isfinite(m["eval/fid"]) and m["eval/seconds"] > 0
    final = reports[-1][0]["eval/fid"]
    assert final < 0.85 * untrained, (untrained, [m["eval/fid"] for m, _ in reports])
    tags = eval_tags(cfg.eval, 8)
    assert {k: tags[k] for k in ("eval.features", "eval.num_samples", "eval.sampler", "eval.steps", "eval.cfg_scale")} == {
        "eval.features": DIGITS, "eval.num_samples": "256", "eval.sampler": "ddpm", "eval.steps": "25", "eval.cfg_scale": "1"}
    assert "8x8" in tags["eval.resize"] and eval_tags(EvalConfig()) == {}


def test_resume_with_eval_repeats_the_run_and_eval_does_not_change_training(digits8, tmp_path):
    ev = dict(enabled=True, every=4, num_samples=32, batch_size=16, sampler="ddim", steps=5, features=DIGITS)
    cfg = recipe(digits8, eval=ev)
    full = run(cfg, tmp_path / "a")
    assert [int(m["step"]) for m, _ in full if "eval/fid" in m] == [4, 8, 12]
    ckpt6 = next(c for m, c in full if m["step"] == 6)
    tail = run(cfg, tmp_path / "b", resume_from=ckpt6)
    assert [m["step"] for m, _ in tail] == [8, 10, 12]
    for (a, _), (b, _) in zip(full[-3:], tail):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-7)
        assert ("eval/fid" in a) == ("eval/fid" in b)
        if "eval/fid" in a:
            assert a["eval/fid"] == pytest.approx(b["eval/fid"], rel=1e-6)
    off = run(recipe(digits8), tmp_path / "c")  # the same recipe without evaluation
    assert [m["train/loss"] for m, _ in off] == [m["train/loss"] for m, _ in full]


def test_bad_eval_settings(digits8, tmp_path):
    with pytest.raises(ValueError, match=r"eval.steps \(2000\) cannot exceed diffusion_steps"):
        recipe(digits8, eval=dict(enabled=True, steps=2000))
    cfg = recipe(digits8, steps=1, eval=dict(enabled=True, features="no-such-net"))
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        run(cfg, tmp_path)
    model = create_model(TINY, input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.0)
    with pytest.raises(ConfigError, match="null class"):
        evaluate(model, small_cfg(cfg_scale=1.5), digits8, extractor=toy_extractor(),
                 reference=Reference(np.zeros(6), np.eye(6), 1, "x"))


# ------------------------------------------------------------------------------ study specs


def test_spec_eval_reaches_every_cell_and_its_tags(digits8, tmp_path):
    import shutil

    from orchestrator.spec import parse_spec
    from orchestrator.study import cell_tags

    raw = {"name": "ev", "data": {"manifest": digits8},
           "grid": {"size": [{"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2, 4]},
           "recipe": {"steps": 8},
           "eval": {"enabled": True, "interval": 4, "num_samples": 64, "sampler": "ddim", "steps": 10,
                    "cfg_scale": 1.5, "features": DIGITS, "reference": "refs/in.npz"}}
    (tmp_path / "refs").mkdir()
    save_statistics(tmp_path / "refs" / "in.npz", np.zeros(64), np.eye(64))
    spec = parse_spec(raw, source="ev.yaml", base_dir=tmp_path)
    for cell in spec.cells():
        ev = cell.train.eval
        assert ev.enabled and ev.every == 4 and ev.reference == str(tmp_path / "refs" / "in.npz")
        tags = cell_tags(cell)
        assert (tags["eval.features"], tags["eval.num_samples"], tags["eval.sampler"], tags["eval.steps"],
                tags["eval.cfg_scale"]) == (DIGITS, "64", "ddim", "10", "1.5")
    assert spec.resolved()["cells"][0]["train"]["eval"]["every"] == 4
    # The data lacks the extractor's weights: the spec does not load.
    bare = tmp_path / "bare"
    shutil.copytree(os.path.dirname(digits8), bare)
    m = Manifest.load(bare / "manifest.json")
    m.features = {}
    m.save(bare / "manifest.json")
    with pytest.raises(ConfigError, match=r"ev.yaml: eval.features: .*rerun `ditscale prepare digits"):
        parse_spec({**raw, "data": {"manifest": str(bare / "manifest.json")}}, source="ev.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"ev.yaml: eval.reference: .*nope.npz does not exist"):
        parse_spec({**raw, "eval": {**raw["eval"], "reference": "nope.npz"}}, source="ev.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"ev.yaml: eval.labels"):
        parse_spec({**raw, "eval": {**raw["eval"], "labels": "random"}}, source="ev.yaml", base_dir=tmp_path)
    off = parse_spec({**raw, "eval": {"enabled": False}}, source="ev.yaml", base_dir=tmp_path)
    assert cell_tags(off.cells()[0]) == {}


# ------------------------------------------------------------------------------ merged statistics: FID


def test_fid_of_features_split_over_two_ranks_equals_one_process():
    rng = np.random.default_rng(5)
    d = 64
    fake = torch.from_numpy(rng.normal(size=(700, d)) @ rng.normal(size=(d, d)) / 8 + 0.3)
    real = rng.normal(size=(900, d))
    ref_mu, ref_sigma = real.mean(0), np.cov(real, rowvar=False)
    one = FeatureStats(d)
    one.update(fake)
    ranks = [FeatureStats(d), FeatureStats(d)]
    for i, chunk in enumerate(torch.split(fake, 64)):  # the sampler's round-robin chunks
        ranks[i % 2].update(chunk)
    merged = ranks[0].merge(ranks[1])
    fid_one = frechet_distance(one.mean(), one.cov(), ref_mu, ref_sigma).fid
    fid_two = frechet_distance(merged.mean(), merged.cov(), ref_mu, ref_sigma).fid
    assert fid_one > 1.0 and fid_two == pytest.approx(fid_one, rel=1e-6)
    f64 = fake.numpy()
    assert frechet_distance(f64.mean(0), np.cov(f64, rowvar=False), ref_mu, ref_sigma).fid == pytest.approx(fid_one, rel=1e-6)


# ------------------------------------------------------------------------------ sample grids


def test_sample_grid_is_class_balanced_and_upscaled(tmp_path):
    from PIL import Image

    from dit.evaluate.grids import _GridPool, grid_layout, save_sample_grid

    assert grid_layout(10) == (10, 6) and grid_layout(1000) == (8, 1) and grid_layout(2) == (2, 8)
    pool = _GridPool(10)
    labels = class_labels(200, 10, seed=0)
    images = (labels.float() / 4.5 - 1.0)[:, None, None, None].expand(-1, 1, 8, 8)  # grey level = class
    for lo in range(0, 200, 32):
        pool.add(images[lo : lo + 32], labels[lo : lo + 32])
    assert pool.full and pool.count == 60
    rows = pool.cells()
    assert len(rows) == 10 and all(len(r) == 6 and all(c is not None and c[0, 0, 0] == c.max() for c in r) for r in rows)
    assert [float(r[0][0, 0, 0]) for r in rows] == pytest.approx([c / 4.5 - 1 for c in range(10)])
    path = save_sample_grid(rows, tmp_path / "g.png")
    im = Image.open(path)
    assert im.size == (6 * 66 + 2, 10 * 66 + 2) and im.mode == "RGB"  # 8 px digits shown at 64 px
    a = np.asarray(im)
    assert a[2, 2, 0] == 0 and a[2 + 9 * 66, 2, 0] == 255  # class 0 black, class 9 white
    many = _GridPool(1000)
    many.add(torch.zeros(100, 3, 32, 32), torch.arange(100) % 70)
    assert many.full and many.count == 64 and len(many.cells()) == 8
    assert Image.open(save_sample_grid(many.cells(), tmp_path / "m.png")).size == (8 * 66 + 2, 8 * 66 + 2)


def test_train_saves_a_grid_per_evaluation_and_the_sink_logs_them(digits8, tmp_path):
    from mlflow.tracking import MlflowClient

    from dit.train import train
    from orchestrator.tracking import SampleGridSink

    ev = dict(enabled=True, every=2, num_samples=32, batch_size=16, sampler="ddim", steps=3, features=DIGITS)
    reports = []
    train(recipe(digits8, steps=4, checkpoint_every=0, eval=ev), lambda m, c: reports.append(m),
          checkpoint_root=tmp_path / "ck", sample_dir=tmp_path / "samples")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["samples_step00000002.png", "samples_step00000004.png"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("grids", artifact_location=(tmp_path / "art").as_uri())
    run_id = c.create_run(exp).info.run_id
    sink = SampleGridSink(uri, run_id, tmp_path / "samples")
    sink.add(reports[0])  # as the controller does, step by step
    assert [a.path for a in c.list_artifacts(run_id, "samples")] == ["samples/samples_step00000002.png"]
    assert sink.sweep() == 0
    assert [a.path for a in c.list_artifacts(run_id, "samples")] == [
        "samples/samples_step00000002.png", "samples/samples_step00000004.png"]


# ------------------------------------------------------------------------------ ditscale evaluate


def test_evaluate_cli_scores_a_trained_checkpoint_and_refuses_bad_input(digits8, tmp_path, capsys):
    import json

    import yaml

    from dit.train.checkpoint import export_checkpoint
    from orchestrator.cli import main as cli
    from orchestrator.spec import load_spec

    reports = run(recipe(digits8, steps=2, checkpoint_every=0), tmp_path / "ck")
    ckpt = reports[-1][1]
    spec = {"name": "ev", "data": {"manifest": digits8},
            "grid": {"size": [{"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2, 4]},
            "recipe": {"steps": 2, "global_batch": 32},
            "eval": {"enabled": True, "num_samples": 32, "batch_size": 16, "sampler": "ddim", "steps": 4,
                     "features": DIGITS}}
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(spec))
    p2 = {c.patch_size: c.name for c in load_spec(tmp_path / "ev.yaml").cells()}[2]
    base = [str(tmp_path / "ev.yaml"), "--cell", p2, "--num-samples", "24"]

    assert cli(["evaluate", ckpt, "--spec", *base, "--json", "--grid", str(tmp_path / "g.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"]["step"] == 2 and out["settings"]["eval.num_samples"] == "24"
    assert math.isfinite(out["metrics"]["eval/fid"]) and (tmp_path / "g.png").is_file()
    # The same weights as a plain state dict, model from the cell or named: the same FID.
    pt = export_checkpoint(ckpt, tmp_path / "tiny.pt")
    assert cli(["evaluate", str(pt), "--spec", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["eval/fid"] == out["metrics"]["eval/fid"]
    assert cli(["evaluate", str(tmp_path / "ck"), "--data", digits8, "--num-samples", "24", "--batch-size", "16",
                "--sampler", "ddim", "--steps", "4", "--features", DIGITS]) == 0  # a folder of checkpoints
    text = capsys.readouterr().out
    assert "(step 2)" in text and "fid" in text

    def refused(*argv, match):
        assert cli(["evaluate", *argv]) == 2
        assert re.search(match, capsys.readouterr().err), match

    refused(str(tmp_path / "nope"), "--spec", *base, match="does not exist")
    refused(str(pt), "--data", digits8, match="say which model with --model")
    refused(str(pt), "--spec", *base, "--model", "DiT-S/2", match="do not fit model DiT-S/2")
    refused(ckpt, "--spec", str(tmp_path / "ev.yaml"), match="name one with --cell")
    refused(ckpt, match="--spec STUDY.yaml")
    refused(ckpt, "--spec", *base, "--num-samples", "1", match="num_samples")
    refused(str(tmp_path), "--spec", *base, match="not a ditscale checkpoint")


# ------------------------------------------------------------------------------ a trial's grids in MLflow


@pytest.mark.slow
def test_trial_with_eval_logs_sample_grids_to_its_mlflow_run(digits8, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import SampleGridSink
    from orchestrator.tracking import MLflowSink, StudyTracker
    from orchestrator.spec.trial import TrialConfig
    from orchestrator.trial import run_trial

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "grids", None, tmp_path / "mlartifacts")
    run_id = tracker.trial_run("t", {}, {}, None)
    ev = dict(enabled=True, every=2, num_samples=32, batch_size=16, sampler="ddim", steps=3, features=DIGITS)
    cfg = TrialConfig(name="t", storage=str(tmp_path / "trials"), workers=1, cpus_per_worker=0.5, max_failures=0,
                      train=dict(model=TINY, data=digits8, steps=4, global_batch=16, log_every=2, zero_stage=0,
                                 shuffle_buffer=64, eval=ev))
    grids = SampleGridSink(uri, run_id, tmp_path / "trials" / "t" / "samples")
    try:
        outcome = run_trial(cfg, sinks=[MLflowSink(uri, run_id), grids])
    finally:
        ray.shutdown()
    assert outcome.status == "finished"
    assert grids.sweep() == 0
    names = [a.path for a in MlflowClient(uri).list_artifacts(run_id, "samples")]
    assert names == ["samples/samples_step00000002.png", "samples/samples_step00000004.png"]


def test_public_names_users_script_against_still_import():
    import dit.diffusion
    import dit.evaluate
    import dit.latents
    import dit.models
    import dit.train
    from dit.evaluate.evaluator import evaluate

    assert dit.evaluate.evaluate is evaluate and dit.evaluate.EvalConfig is EvalConfig
    assert callable(dit.models.create_model) and callable(dit.diffusion.create_diffusion)
    assert callable(dit.train.train) and dit.latents.LatentStream.__module__ == "dit.latents.stream"
