import math

import pytest
import torch
import torch.nn.functional as F

from dit.errors import ConfigError
from dit.models import BLOCKS, MODEL_NAMES, SIZES, create_model, load_state_dict, model_config

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2, "input_size": 8, "in_channels": 4, "num_classes": 10}


def tiny(**kw):
    torch.manual_seed(0)
    return create_model({**TINY, **kw})


def inputs(n=3, size=8, channels=4, classes=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, t, y


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_output_shape_every_block_and_patch(block, patch):
    model = tiny(block=block, patch_size=patch).eval()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)  # learned sigma doubles the channels
    assert torch.isfinite(out).all()
    no_sigma = tiny(block=block, patch_size=patch, learn_sigma=False).eval()
    assert no_sigma(x, t, y).shape == (3, 4, 8, 8)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_named_configs_match_the_paper(name):
    cfg = model_config(name)
    size, patch = name[4:].split("/")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == SIZES[size]
    assert cfg.patch_size == int(patch) and cfg.mlp_ratio == 4.0 and cfg.block == "adaln-zero"
    assert cfg.num_tokens == (32 // int(patch)) ** 2


def test_named_model_forward_shape():
    model = create_model("DiT-S/8", input_size=16, num_classes=10).eval()
    x, t, y = inputs(2, 16)
    assert model(x, t, y).shape == (2, 8, 16, 16)


def test_adaln_zero_blocks_are_identity_and_output_zero_at_init():
    model = tiny().eval()
    tokens = torch.randn(3, 16, 64)
    c = torch.randn(3, 64)
    for blk in model.blocks:
        assert torch.equal(blk(tokens, c), tokens)
    x, t, y = inputs()
    assert torch.count_nonzero(model(x, t, y)) == 0


def test_other_designs_are_not_identity_at_init():
    for block in ("adaln", "cross-attention", "in-context"):
        model = tiny(block=block).eval()
        x, t, y = inputs()
        assert model(x, t, y).abs().sum() > 0, block


def test_conditioning_changes_output_after_training_step():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = inputs()
    target = torch.randn(3, 8, 8, 8)
    for _ in range(3):  # the zero-initialised layers must learn their way out of zero
        opt.zero_grad()
        (model(x, t, y) - target).pow(2).mean().backward()
        opt.step()
    model.eval()
    a = model(x, t, y)
    b = model(x, t, (y + 1) % 10)
    assert not torch.allclose(a, b)


def test_patchify_unpatchify_round_trip():
    model = tiny(patch_size=2, learn_sigma=False)
    x = torch.randn(2, 4, 8, 8)
    p = model.patch_size
    # patch tokens in the layout the final layer emits: (N, T, p*p*C) with (p, q, c) order
    tokens = x.reshape(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), x)


def test_positional_table_layout_matches_the_release():
    # first quarter of the channels: sin(column * w_k); third quarter: sin(row * w_k)
    model = tiny(input_size=8, patch_size=2)
    pos = model.pos_embed[0]
    gs, d = 4, 64
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    for i in range(gs * gs):
        row, col = divmod(i, gs)
        assert torch.allclose(pos[i, : d // 4].double(), torch.sin(col * omega), atol=1e-6)
        assert torch.allclose(pos[i, d // 2 : 3 * d // 4].double(), torch.sin(row * omega), atol=1e-6)
    assert not model.pos_embed.requires_grad and "pos_embed" in model.state_dict()


def official_layout(depth, d, p, c_in, classes, tokens):
    """Parameter names and shapes of the released DiT checkpoints (adaLN-Zero, learned sigma)."""
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, c_in, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (p * p * 2 * c_in, d),
        "final_layer.linear.bias": (p * p * 2 * c_in,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        }
    return shapes


def test_state_dict_has_the_official_layout_for_xl2():
    with torch.device("meta"):
        model = create_model("DiT-XL/2", input_size=32, num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_layout(28, 1152, 2, 4, 1000, 256)


def reference_forward(sd, x, t, y, depth, heads, p):
    """The paper's equations written out with explicit attention, from a state dict alone."""
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])
    n, c_in, hgt, _ = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t[:, None].float() * freqs
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    d = h.shape[-1]
    norm = lambda z: F.layer_norm(z, (d,), eps=1e-6)
    for i in range(depth):
        b = f"blocks.{i}."
        m = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        z = norm(h) * (1 + m[1][:, None]) + m[0][:, None]
        q, k, v = lin(z, b + "attn.qkv").reshape(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(-1) @ v
        h = h + m[2][:, None] * lin(att.transpose(1, 2).reshape(n, -1, d), b + "attn.proj")
        z = norm(h) * (1 + m[4][:, None]) + m[3][:, None]
        h = h + m[5][:, None] * lin(F.gelu(lin(z, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(norm(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    g = hgt // p
    out = out.reshape(n, g, g, p, p, 2 * c_in).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, 2 * c_in, hgt, hgt)


def test_load_official_layout_state_dict_computes_the_papers_function(tmp_path):
    # A checkpoint in the release layout with every weight random (no zero layers), saved the
    # way the release files are (a bare state dict), loaded strictly, and checked against the
    # equations above.
    torch.manual_seed(3)
    sd = {k: torch.randn(s) * 0.05 for k, s in official_layout(2, 64, 2, 4, 10, 16).items()}
    sd["pos_embed"] = create_model(TINY).pos_embed.clone()
    torch.save(sd, tmp_path / "DiT-tiny.pt")
    model = create_model(TINY)
    model.load_state_dict(load_state_dict(tmp_path / "DiT-tiny.pt"), strict=True)
    model.eval()
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), reference_forward(sd, x, t, y, 2, 4, 2), atol=1e-5)


def test_loader_takes_training_checkpoints_and_refuses_pickles(tmp_path):
    model = tiny()
    sd = model.state_dict()
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "step": 5}, tmp_path / "ckpt.pt")
    loaded = load_state_dict(tmp_path / "ckpt.pt")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)  # EMA preferred
    torch.save({"model": sd}, tmp_path / "model_only.pt")
    assert load_state_dict(tmp_path / "model_only.pt").keys() == sd.keys()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"ema": sd, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="could not be loaded safely"):
        load_state_dict(tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt")


@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("channels", [None, 3])
def test_guided_forward(scale, channels):
    model = tiny()
    for p in model.parameters():  # leave the zero init so guidance has something to act on
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x, t, y = inputs(2)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    out = model.forward_with_cfg(xx, tt, yy, scale, guide_channels=channels)
    plain = model(xx, tt, yy)
    cond, uncond = plain.chunk(2)
    k = 4 if channels is None else channels
    expected_eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    assert torch.allclose(out[:2, :k], expected_eps, atol=1e-5)
    assert torch.allclose(out[:2, k:], cond[:, k:], atol=1e-6)
    if scale == 1.0:
        assert torch.allclose(out[:2], cond, atol=1e-5)


def test_label_dropout_uses_the_null_class():
    model = tiny(class_dropout_prob=0.5)
    y = torch.zeros(4000, dtype=torch.long)
    emb = model.y_embedder(y, train=True)
    null = model.y_embedder.embedding_table.weight[10]
    dropped = (emb == null).all(dim=1).float().mean().item()
    assert 0.45 < dropped < 0.55
    assert torch.equal(model.y_embedder(y[:5], train=False), model.y_embedder.embedding_table.weight[[0] * 5])


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, y = inputs()
    grads = []
    for flag in (False, True):
        model = tiny(block="adaln", grad_checkpointing=flag, class_dropout_prob=0.0)
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("DiT-Q/2", "unknown model"),
        ("ViT-S/2", "unknown model"),
        ({**TINY, "hidden_size": 66, "num_heads": 4}, "divisible by model.num_heads"),
        ({**TINY, "input_size": 9}, "divisible by model.patch_size"),
        ({**TINY, "block": "film"}, "model.block"),
        ({**TINY, "depth": 0}, "model.depth"),
        ({**TINY, "width": 3}, "unknown model field"),
        ({"depth": 2}, "missing"),
    ],
)
def test_bad_configs_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        create_model(bad)


def test_building_under_a_device_context_puts_every_tensor_there():
    with torch.device("meta"):
        model = create_model(TINY)
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
