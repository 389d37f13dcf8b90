"""Train-step throughput on CPU: our DiT vs. the straightforward reference attention.

One train step = diffusion loss forward (``create_diffusion().training_losses(...)["loss"].mean()``),
backward and an AdamW step. Variants, built from identical weights and fed identical data:

* ``ours``       -- ``dit.models.create_model`` as shipped (attention through
                    ``F.scaled_dot_product_attention``).
* ``reference``  -- the same model with every block's ``attn.forward`` replaced by the
                    timm-style explicit version (``q @ k.T * scale``, softmax, ``@ v``); nothing
                    else differs, so the comparison isolates the attention implementation.
* ``ours+ckpt``  -- ours with ``grad_checkpointing=True`` (with ``--grad-checkpointing``).

Variants are timed round-robin (one step of each per round) so that load from other processes
hits all of them alike; the table reports per-variant medians. ``ratio`` is
reference time / variant time, taken per round and then the median (>1: faster than the
reference); pairing by round keeps bursts of outside load from skewing it.

    python benchmarks/bench_train_step.py            # full run
    python benchmarks/bench_train_step.py --quick    # well under a minute
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.diffusion import create_diffusion
from dit.models import Attention, create_model

TINY = {
    "depth": 4,
    "hidden_size": 128,
    "num_heads": 4,
    "patch_size": 2,
    "input_size": 16,
    "in_channels": 4,
    "num_classes": 10,
}

# (label, model spec, overrides, full batch, quick batch or None to skip in --quick)
CONFIGS = [
    ("tiny (d4 h128 p2 16x16)", TINY, {}, 32, 8),
    ("DiT-S/8 32x32x4", "DiT-S/8", {"input_size": 32, "num_classes": 1000}, 32, 8),
    ("DiT-S/2 32x32x4", "DiT-S/2", {"input_size": 32, "num_classes": 1000}, 8, 2),
]


def reference_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """timm-style attention: explicit q @ k^T * scale, softmax, @ v (same qkv/proj weights)."""
    n, t, d = x.shape
    qkv = (
        self.qkv(x)
        .reshape(n, t, 3, self.num_heads, d // self.num_heads)
        .permute(2, 0, 3, 1, 4)
    )
    q, k, v = qkv.unbind(0)
    scale = (d // self.num_heads) ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(n, t, d)
    return self.proj(out)


def to_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose self-attention modules use the explicit-matmul forward."""
    ref = copy.deepcopy(model)
    patched = 0
    for module in ref.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(reference_attention_forward, module)
            patched += 1
    assert patched == model.config.depth, patched
    return ref


def randomize_zero_init(model: torch.nn.Module, seed: int) -> None:
    """adaLN-Zero starts every block as the identity (zero gates, zero output layer), which
    would make the ours-vs-reference equivalence check vacuous. Give those zero-initialised
    layers small random weights so attention actually reaches the output. (Step cost is
    unaffected: autograd does the same work for zero and non-zero values.)"""
    g = torch.Generator().manual_seed(seed)
    layers = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.detach().abs().sum()
    ]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.02)


class Variant:
    def __init__(self, name: str, model: torch.nn.Module, diffusion) -> None:
        self.name = name
        self.model = model.train()
        self.diffusion = diffusion
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        self.times: list[float] = []

    def step(self, x0, t, y, noise) -> float:
        start = time.perf_counter()
        loss = self.diffusion.training_losses(self.model, x0, t, y, noise=noise)[
            "loss"
        ].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def check_equivalence(ours: torch.nn.Module, ref: torch.nn.Module, cfg) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    y = torch.randint(0, max(cfg.num_classes, 1), (2,), generator=g)
    ours.eval(), ref.eval()
    with torch.no_grad():
        diff = (ours(x, t, y) - ref(x, t, y)).abs().max().item()
    ours.train(), ref.train()
    return diff


def bench_config(label, spec, overrides, batch, args) -> list[dict]:
    torch.manual_seed(0)
    base = create_model(spec, **overrides)
    randomize_zero_init(base, seed=0)
    cfg = base.config
    ref = to_reference(base)
    diff = check_equivalence(base, ref, cfg)
    if diff > 1e-4:
        raise SystemExit(
            f"{label}: reference attention differs from ours by {diff:.2e}"
        )

    diffusion = create_diffusion()
    variants = [Variant("ours", base, diffusion), Variant("reference", ref, diffusion)]
    if args.grad_checkpointing:
        ckpt = create_model(cfg, grad_checkpointing=True)
        ckpt.load_state_dict(base.state_dict())
        variants.append(Variant("ours+ckpt", ckpt, diffusion))

    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(
        batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g
    )
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    for _ in range(args.warmup):
        for v in variants:
            v.step(x0, t, y, noise)
    for i in range(args.steps):
        # Round-robin, rotating who goes first so neither variant always follows the other.
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        for v in order:
            v.times.append(v.step(x0, t, y, noise))

    ref_times = variants[1].times
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        # Paired ratio: each round's reference time over this variant's time in the same round,
        # then the median -- robust to bursts of load from other processes.
        ratio = statistics.median(r / o for r, o in zip(ref_times, v.times))
        rows.append(
            {
                "config": label,
                "batch": batch,
                "variant": v.name,
                "ms": med * 1e3,
                "spread": (min(v.times) * 1e3, max(v.times) * 1e3),
                "ips": batch / med,
                "ratio": ratio,
                "diff": diff,
            }
        )
    return rows


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run: fewer steps, smaller batches, DiT-S/2 at batch 2",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch intra-op threads (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per variant (default 10, quick 4)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per variant (default 2)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size for every config (default per config)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time ours with grad_checkpointing=True (default: on, off with --quick)",
    )
    p.add_argument(
        "--only", default=None, help="run only configs whose label contains this text"
    )
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else 2
    if args.grad_checkpointing is None:
        args.grad_checkpointing = not args.quick
    torch.set_num_threads(args.threads)

    load0 = load_average()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"steps {args.steps} (+{args.warmup} warmup) per variant, interleaved round-robin; "
        "step = diffusion loss fwd + bwd + AdamW"
    )
    start = time.perf_counter()
    rows = []
    for label, spec, overrides, full_batch, quick_batch in CONFIGS:
        if args.only and args.only not in label:
            continue
        batch = args.batch or (quick_batch if args.quick else full_batch)
        rows += bench_config(label, spec, overrides, batch, args)

    header = f"{'config':<24} {'batch':>5} {'variant':<10} {'ms/step':>9} {'min..max ms':>17} {'img/s':>8} {'ours/ref':>8}"
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        cfg = r["config"] if r["config"] != last else ""
        last = r["config"]
        spread = f"{r['spread'][0]:.0f}..{r['spread'][1]:.0f}"
        print(
            f"{cfg:<24} {r['batch']:>5} {r['variant']:<10} {r['ms']:>9.1f} {spread:>17} "
            f"{r['ips']:>8.1f} {r['ratio']:>8.2f}"
        )
    diffs = {r["config"]: r["diff"] for r in rows}
    print(
        "max |ours - reference| forward output: "
        + ", ".join(f"{k}: {v:.1e}" for k, v in diffs.items())
    )
    print(
        f"total wall time {time.perf_counter() - start:.1f} s; 1-min load average {load0} at start, "
        f"{load_average()} at end ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
