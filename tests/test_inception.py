"""The Inception-v3 FID path end to end, with randomly initialised weights.

pytorch-fid builds its network from torchvision, and no torchvision imports beside the CPU
torch wheel the main venv uses (see ../shared/STACK.md). So these tests skip there, and
``.ci/run`` runs them a second time in ``.venv-fid`` (torch 2.14.1 + torchvision 0.29.1 +
pytorch-fid): ``.venv-fid/bin/python -m pytest -q -m inception``.

The weights are pytorch-fid's own FID Inception architecture with random parameters, saved
to a temporary file and read back through ``load_extractor`` — the same code that loads
``pt_inception-2015-12-05-6726825d.pth`` for a user. Only the file's digest check is patched
(random weights cannot have the published digest).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dit.evaluate.features as features
from dit.errors import ConfigError
from dit.evaluate import EvalConfig, Evaluator, eval_tags
from dit.evaluate.features import INCEPTION, INCEPTION_FILE, load_extractor
from dit.evaluate.fid import frechet_distance
from dit.latents import LatentStream, Manifest

pytestmark = pytest.mark.inception


def _pytorch_fid():
    try:
        import pytorch_fid.inception as module
        from pytorch_fid.fid_score import calculate_frechet_distance
    except Exception as err:  # ImportError, or torchvision failing to load beside this torch
        pytest.skip(f"pytorch-fid/torchvision do not import here ({type(err).__name__}); .ci/run runs these "
                    "tests in .venv-fid")
    return module, calculate_frechet_distance


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """pytorch-fid's FID Inception (with its 1008-way fc) at random init, saved as a weights file."""
    module, _ = _pytorch_fid()
    built = []
    make = module._inception_v3

    def keep(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    # fid_inception_v3 builds the torchvision network, swaps in the FID blocks, then fetches the
    # published weights; hand it its own random parameters instead of downloading.
    torch.manual_seed(0)
    module._inception_v3 = keep
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda url, **kw: built[-1].state_dict()
    try:
        net = module.fid_inception_v3()
    finally:
        module._inception_v3, module.load_state_dict_from_url = make, original
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def trusted_digest(monkeypatch):
    """Random weights cannot carry the published digest; everything else is the real loader."""
    real = features._file_sha256
    monkeypatch.setattr(features, "_file_sha256", lambda p: "6726825d" + real(p)[8:])


@pytest.fixture
def no_download(monkeypatch):
    module, _ = _pytorch_fid()

    def refuse(url, *a, **kw):
        raise AssertionError(f"the loader tried to download {url}")

    monkeypatch.setattr(module, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_weights_file_loads_through_the_real_loader(random_inception, trusted_digest, no_download, monkeypatch):
    module, _ = _pytorch_fid()
    ext = load_extractor(INCEPTION, weights=str(random_inception))
    saved = torch.load(random_inception, map_location="cpu", weights_only=True)
    # Every parameter of the feature network came from our file, and fc gives 1008 logits.
    inner = dict(ext.net.named_parameters())
    assert torch.equal(inner["blocks.0.0.conv.weight"], saved["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(inner["blocks.3.2.branch_pool.conv.weight"], saved["Mixed_7c.branch_pool.conv.weight"])
    assert ext.num_classes == 1008 and torch.equal(ext.fc.weight, saved["fc.weight"])

    # Our extractor = pytorch-fid's InceptionV3 used directly on the same 3-channel images in [-1, 1]
    # (its own bilinear resize to 299, no renormalisation); grey images are repeated to 3 channels.
    grey = torch.rand(3, 1, 16, 16) * 2 - 1
    feats, logits = ext.features_and_logits(grey, logits=True)
    monkeypatch.setattr(module, "load_state_dict_from_url", lambda url, **kw: saved)
    ref_net = module.InceptionV3([3], resize_input=True, normalize_input=False)
    with torch.no_grad():
        expected = ref_net.eval()(grey.repeat(1, 3, 1, 1))[0].flatten(1)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(feats).all() and feats.std() > 0


def test_a_wrong_file_is_refused_before_the_network_is_built(random_inception, tmp_path, no_download):
    # No digest patch: random weights are not the published FID weights.
    with pytest.raises(ConfigError, match="is not the FID Inception weights"):
        load_extractor(INCEPTION, weights=str(random_inception))
    with pytest.raises(ConfigError, match="Inception FID weights missing"):
        load_extractor(INCEPTION, weights=str(tmp_path / "absent.pth"))


def test_inception_fid_end_to_end(random_inception, trusted_digest, no_download, digits8):
    """Digits 'latents' -> Inception reference statistics; a tiny DiT sampled and scored on them.

    Our Fréchet distance matches pytorch-fid's on the same features, and real images score far
    closer to real images than noise does, even through a random network."""
    from dit.diffusion import create_diffusion
    from dit.models import create_model

    _, calculate_frechet_distance = _pytorch_fid()
    manifest = Manifest.load(digits8)
    cfg = EvalConfig(enabled=True, num_samples=16, batch_size=8, sampler="ddim", steps=4, features=INCEPTION,
                     feature_weights=str(random_inception), reference_samples=48, inception_score=True)
    torch.manual_seed(0)
    model = create_model({"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}, input_size=8,
                         in_channels=1, num_classes=10).eval()
    # The evaluator loads the extractor from cfg.feature_weights and builds the reference itself.
    ev = Evaluator(cfg, manifest=manifest, diffusion=create_diffusion()).setup()
    ext, ref = ev.extractor, ev.reference
    assert ext.name == INCEPTION and ext.num_classes == 1008
    assert ref.count == 48 and ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048)
    out = ev.run(model)
    assert math.isfinite(out["eval/fid"]) and out["eval/fid"] > 0
    assert 1.0 <= out["eval/inception_score"] <= 1008.0
    tags = eval_tags(cfg, image_size=8)
    assert tags["eval.features"] == INCEPTION and "299" in tags["eval.resize"]

    # The same statistics through pytorch-fid's own Fréchet distance (scipy sqrtm with its eps fallback).
    real, _ = next(iter(LatentStream(manifest, 96, seed=0, shuffle_buffer=0, random_flip=False)))
    a = ext.features_and_logits(real[:48])[0].double().numpy()
    b = ext.features_and_logits(real[48:])[0].double().numpy()
    noise = ext.features_and_logits(torch.rand(48, 1, 8, 8) * 2 - 1)[0].double().numpy()
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (a, b, noise)]
    ours = frechet_distance(*stats[0], *stats[1]).fid
    theirs = calculate_frechet_distance(*stats[0], *stats[1])
    assert ours == pytest.approx(theirs, rel=1e-6)
    real_vs_noise = frechet_distance(*stats[0], *stats[2]).fid
    assert real_vs_noise > 3 * ours

