"""One-GPU DiT training throughput and MFU: bf16 matmul peak, then DeepSpeed ZeRO-2 bf16 train steps.

Made to run once on an H100/H200 inside a few minutes, so every part is bounded and the JSON
(``--out``) is rewritten after each measurement: a run killed by an outer ``timeout`` still leaves
what it measured. Sections:

1. **matmul peak** -- ``torch.matmul`` of two ``N x N`` bf16 matrices (default 8192), timed one by
   one with CUDA events after a warm-up; the median gives this GPU's achievable dense bf16
   TFLOP/s (2 N^3 flops per product), the denominator of MFU.
2. **DeepSpeed steps** -- for each model and batch size, the engine built exactly as
   ``dit.train`` builds it (``init_distributed`` -> one-rank nccl group, ``TrainConfig`` ->
   ``deepspeed_config`` -> ``build_engine`` with the client ``torch.optim.AdamW``), bf16,
   ZeRO stage ``--zero-stage`` (2), the real diffusion loss (``create_diffusion().training_losses``),
   synthetic latents (no data loading). Warm-up steps, then ``--steps`` timed steps.
   Reported: step ms (wall clock over the timed steps, after a synchronize) and the median of the
   per-step CUDA-event times, images/s, achieved TFLOP/s = gflops x 2 x 3 x images/s / 1e3
   (gflops: ``dit.flops.count_gflops``, fvcore's forward count at batch 1 with one multiply-add
   counted as 1, so x2 makes flops, x3 adds the backward), MFU = achieved / measured matmul peak,
   and peak memory (``torch.cuda.max_memory_allocated``, reset before the model is built).
3. optional **plain PyTorch** (``--plain``: fp32 weights, ``torch.autocast`` bf16, fused AdamW)
   and **torch.compile** (``--compile``: the same, model compiled; compile time reported apart).

Two workarounds for bf16 under DeepSpeed, both needed because ``dit.train``'s bf16 path fails as
it stands (checked on CPU with DeepSpeed 0.19.8):

* inputs: ``dit.train`` casts the latents to bf16 before the diffusion loss, but
  ``GaussianDiffusion.q_sample`` keeps fp32 coefficients, so x_t comes out fp32 and the bf16 engine
  rejects it ("Input type (float) and bias type (BFloat16) should be the same"). Here latents and
  noise stay fp32 (the loss is computed in fp32) and only the model input x_t is cast to the
  engine's dtype, through a thin wrapper around the engine.
* buffers: DeepSpeed casts parameters only and keeps buffers fp32 unless the config sets
  ``data_types.buffer_dtype``; DiT's fp32 ``pos_embed`` then promotes the tokens to fp32 and the
  first bf16 linear fails ("mat1 and mat2 must have the same dtype"). Here the engine module's
  floating buffers are cast to the parameter dtype after ``build_engine``.

An out-of-memory error in one configuration is reported as "OOM" and the next one runs.
``--time-budget`` (seconds from start) stops starting new configurations near the end.

    python benchmarks/bench_gpu.py --out bench_gpu.json                   # default set
    python benchmarks/bench_gpu.py --out r.json --plain --compile DiT-B/2:128 --grad-checkpointing both
    python benchmarks/bench_gpu.py --dry-run --out /tmp/dry.json          # CPU, tiny, fp32, 2 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # before deepspeed is imported: no accelerator probing
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODELS = ["DiT-XL/2:32,64", "DiT-B/2:128"]
DRY_MODEL = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "fvcore"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gib(n: float) -> float:
    return n / 2**30


def parse_models(items: list[str], default_batches: str | None = None) -> list[tuple[str, list[int]]]:
    """'DiT-XL/2:32,64' -> ('DiT-XL/2', [32, 64])."""
    out = []
    for item in items:
        name, _, batches = item.partition(":")
        batches = batches or default_batches or "32"
        out.append((name, [int(b) for b in batches.split(",") if b]))
    return out


def analytic_gflops(cfg) -> float:
    """Forward multiply-adds at batch 1 in fvcore's convention (linear/conv/attention matmuls,
    layer norm = 1 per element, element-wise ops free), for the adaLN-Zero block. A cross-check
    of ``count_gflops`` and its stand-in where fvcore is not installed."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    t = cfg.num_tokens
    hidden = int(d * cfg.mlp_ratio)
    total = t * d * c * p * p  # patch embedding
    total += 256 * d + d * d  # timestep MLP
    per_block = 6 * d * d + 2 * t * d  # adaLN modulation, two layer norms
    per_block += t * d * 3 * d + 2 * t * t * d + t * d * d  # qkv, QK^T and AV, proj
    per_block += 2 * t * d * hidden  # MLP
    total += cfg.depth * per_block
    total += 2 * d * d + t * d + t * d * p * p * cfg.out_channels  # final layer
    return total / 1e9


def model_gflops(name: str | dict, overrides: dict) -> tuple[float, str, float]:
    """(gflops, source, analytic gflops): fvcore via dit.flops when importable."""
    from dit.models import create_model, model_config

    cfg = model_config(name, **overrides)
    analytic = analytic_gflops(cfg)
    try:
        from dit.flops import count_gflops
    except ImportError as err:  # fvcore missing on this machine
        return analytic, f"analytic (dit.flops unavailable: {err})", analytic
    with torch.device("cpu"):
        model = create_model(cfg)
    g = count_gflops(model, cfg.input_size, cfg.in_channels)
    del model
    return g, "dit.flops.count_gflops", analytic


# --------------------------------------------------------------------------------------------
# 1. matmul peak
# --------------------------------------------------------------------------------------------


def matmul_peak(n: int, iters: int, device: torch.device) -> dict[str, Any]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        torch.matmul(a, b, out=c)
        end.record()
    torch.cuda.synchronize(device)
    ms = [s.elapsed_time(e) for s, e in events]
    flops = 2 * n**3
    med = statistics.median(ms)
    del a, b, c
    return {
        "n": n, "iters": iters, "median_ms": med, "min_ms": min(ms),
        "tflops_median": flops / (med * 1e-3) / 1e12, "tflops_best": flops / (min(ms) * 1e-3) / 1e12,
    }


# --------------------------------------------------------------------------------------------
# 2./3. training steps
# --------------------------------------------------------------------------------------------


class Batch:
    """Synthetic latents (fp32, like the latent stream) and per-step timesteps/noise."""

    def __init__(self, batch: int, cfg, device: torch.device, steps: int) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        s = cfg.input_size
        self.x = torch.randn(batch, cfg.in_channels, s, s, device=device, generator=g)
        self.y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device, generator=g)
        # a few distinct (t, noise) pairs, cycled, so steps are not all identical
        self.t = [torch.randint(0, 1000, (batch,), device=device, generator=g) for _ in range(min(steps, 4))]
        self.noise = [torch.randn(self.x.shape, device=device, generator=g) for _ in range(len(self.t))]

    def get(self, i: int):
        k = i % len(self.t)
        return self.x, self.y, self.t[k], self.noise[k]


def _time_steps(step: Callable[[int], torch.Tensor], warmup: int, steps: int, device: torch.device):
    """Run warmup + timed steps; (first step s, wall s/step, median event ms, last loss)."""
    t0 = time.perf_counter()
    loss = step(0)
    _sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        loss = step(i)
    _sync(device)
    cuda = device.type == "cuda"
    events = []
    t0 = time.perf_counter()
    for i in range(steps):
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        loss = step(warmup + i)
        if cuda:
            ev[1].record()
            events.append(ev)
    _sync(device)
    wall = (time.perf_counter() - t0) / steps
    event_ms = statistics.median(s.elapsed_time(e) for s, e in events) if events else wall * 1e3
    return first, wall, event_ms, float(loss.detach().float().item())


def build_fused_engine(cfg, model, micro: int, accum: int, device: torch.device):
    """dit.train.build_engine with ``torch.optim.AdamW(fused=True)`` (model moved to the device
    first: fused AdamW wants its parameters there). Only for ``--fused-adam``."""
    import deepspeed

    from dit.train import deepspeed_config

    model.to(device)
    if cfg.precision == "bf16":
        model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, micro, accum),
                                           dist_init_required=False)
    return engine


def run_deepspeed(name, overrides, batch, args, device, precision) -> dict[str, Any]:
    from dit.diffusion import create_diffusion
    from dit.models import create_model, model_config
    from dit.train import TrainConfig, build_engine

    cfg = TrainConfig(model=name, data="synthetic", steps=1, global_batch=batch, precision=precision,
                      zero_stage=args.zero_stage, grad_checkpointing=overrides["grad_checkpointing"])
    micro, accum = cfg.accumulation(1)
    mcfg = model_config(name, **overrides)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: much faster than on the CPU for XL
        model = create_model(mcfg)
    engine = (build_fused_engine(cfg, model, micro, accum, device) if args.fused_adam
              else build_engine(cfg, model, micro, accum))
    engine.train()
    del model
    dtype = next(engine.module.parameters()).dtype
    # DeepSpeed >= 0.19 casts parameters only and leaves buffers fp32 (unless the config sets
    # data_types.buffer_dtype), so DiT's fp32 pos_embed would promote the tokens back to fp32 and
    # the first bf16 linear fails ("mat1 and mat2 must have the same dtype"). Cast the buffers
    # as the config's buffer_dtype would.
    for buf in engine.module.buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            buf.data = buf.data.to(dtype)
    diffusion = create_diffusion()
    data = Batch(batch, mcfg, device, args.steps)

    def forward(x_t, t, y):  # the model sees its own dtype; the loss stays fp32 (see module doc)
        return engine(x_t.to(dtype), t, y)

    def step(i: int) -> torch.Tensor:
        x, y, t, noise = data.get(i)
        loss = diffusion.training_losses(forward, x, t, y, noise=noise)["loss"].mean()
        engine.backward(loss)
        engine.step()
        return loss

    try:
        first, wall, event_ms, loss = _time_steps(step, args.warmup, args.steps, device)
        return {"first_step_s": first, "wall_s": wall, "event_ms": event_ms, "loss": loss,
                "engine_optimizer": type(engine.optimizer).__name__, "param_dtype": str(dtype)}
    finally:  # locals (engine, closures) go with this frame; the caller then collects garbage
        try:
            engine.destroy()
        except Exception as err:  # noqa: BLE001 - best effort: the numbers are already taken
            print(f"engine.destroy() failed: {err!r}", file=sys.stderr)


def run_plain(name, overrides, batch, args, device, compile_model: bool) -> dict[str, Any]:
    from dit.diffusion import create_diffusion
    from dit.models import create_model, model_config

    mcfg = model_config(name, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = create_model(mcfg)
    model.to(device).train()  # anything built outside the device context (numpy tables) follows
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=cuda)
    net = torch.compile(model) if compile_model else model
    diffusion = create_diffusion()
    data = Batch(batch, mcfg, device, args.steps)
    amp_dtype = torch.bfloat16 if not args.dry_run else torch.float32
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=not args.dry_run)

    def step(i: int) -> torch.Tensor:
        x, y, t, noise = data.get(i)
        with autocast:
            loss = diffusion.training_losses(net, x, t, y, noise=noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    try:
        first, wall, event_ms, loss = _time_steps(step, args.warmup + (2 if compile_model else 0),
                                                  args.steps, device)
        return {"first_step_s": first, "wall_s": wall, "event_ms": event_ms, "loss": loss,
                "engine_optimizer": "AdamW(fused)" if cuda else "AdamW", "param_dtype": "torch.float32"}
    finally:
        if compile_model:
            torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


def _row(r: dict[str, Any]) -> str:
    head = (f"{r['variant']:<12} {r['model']:<9} {'ckpt' if r['grad_checkpointing'] else '':<4} "
            f"{r['batch']:>5} ")
    if r["status"] != "ok":
        return head + f"{r['status']}"
    mfu = f"{r['mfu'] * 100:>5.1f}%" if r.get("mfu") is not None else f"{'-':>6}"
    return head + (f"{r['step_ms']:>8.1f} {r['event_ms']:>8.1f} {r['images_per_s']:>8.0f} "
                   f"{r['tflops']:>7.1f} {mfu} {r['peak_mem_gib']:>7.1f} {r['loss']:>7.3f}"
                   + (f"  compile {r['first_step_s']:.0f} s" if r["variant"] == "compile" else ""))


HEADER = (f"{'variant':<12} {'model':<9} {'gc':<4} {'batch':>5} {'step ms':>8} {'event ms':>8} "
          f"{'img/s':>8} {'TFLOP/s':>7} {'MFU':>6} {'mem GiB':>7} {'loss':>7}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_gpu.json", help="JSON results path (default %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny model, fp32, 2 steps, no matmul peak, on the CPU (or the GPU if there is "
                        "one): checks the whole path cheaply")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"NAME:BATCH[,BATCH...] (default {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--input-size", type=int, default=32, help="latent side (default %(default)s = 256 px)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="DeepSpeed precision (default bf16; fp32 with --dry-run)")
    p.add_argument("--grad-checkpointing", choices=("off", "on", "both"), default="off")
    p.add_argument("--plain", action="store_true", help="also plain PyTorch (autocast bf16, fused AdamW)")
    p.add_argument("--compile", nargs="*", default=None, metavar="NAME:BATCH",
                   help="also plain PyTorch + torch.compile: for every configuration, or only the ones "
                        "listed (e.g. DiT-B/2:128); each compiles anew (~1 min for XL)")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed runs")
    p.add_argument("--fused-adam", action="store_true",
                   help="DeepSpeed runs with AdamW(fused=True) instead of dit.train.build_engine's AdamW")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-iters", type=int, default=20)
    p.add_argument("--time-budget", type=float, default=240.0,
                   help="seconds from start after which no new configuration starts (default %(default)s); "
                        "torch.compile runs need 90 s left")
    args = p.parse_args(argv)
    _quiet()
    start = time.perf_counter()

    if args.dry_run:
        models = [(DRY_MODEL, [4])]
        args.input_size, args.num_classes = 8, 10
        args.warmup = 1 if args.warmup is None else args.warmup
        args.steps = 2 if args.steps is None else args.steps
        precision = args.precision or "fp32"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
            return 2
        models = parse_models(args.models or DEFAULT_MODELS)
        args.warmup = 3 if args.warmup is None else args.warmup
        args.steps = 10 if args.steps is None else args.steps
        precision = args.precision or "bf16"
    gc_modes = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]

    from dit.train import init_distributed

    _rank, world, device = init_distributed()  # a CUDA device when there is one (dry run too)
    import deepspeed

    out = Path(args.out)
    result: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "python": platform.python_version(), "dry_run": args.dry_run, "precision": precision,
            "zero_stage": args.zero_stage, "warmup": args.warmup, "steps": args.steps,
            "world_size": world, "fused_adam": args.fused_adam,
            "tflops_formula": "gflops_fvcore * 2 * 3 * images_per_s / 1e3",
            "deepspeed_workarounds": "model input x_t cast to the engine dtype (loss in fp32); "
                                     "engine.module float buffers cast to the parameter dtype",
        },
        "matmul": None, "gflops": {}, "runs": [],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["meta"].update(total_mem_gib=_gib(props.total_memory), sms=props.multi_processor_count)
    print(f"{result['meta']['device']}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"deepspeed {deepspeed.__version__}, {precision}, ZeRO-{args.zero_stage}, "
          f"{args.warmup} warm-up + {args.steps} timed steps")

    peak = None
    if device.type == "cuda" and not args.dry_run:
        try:
            result["matmul"] = matmul_peak(args.matmul_size, args.matmul_iters, device)
            m = result["matmul"]
            peak = m["tflops_median"]
            print(f"bf16 matmul {m['n']}^3: median {m['median_ms']:.2f} ms -> {peak:.0f} TFLOP/s "
                  f"(best {m['tflops_best']:.0f})")
        except Exception as err:  # noqa: BLE001 - keep going: throughput is still worth having
            result["matmul"] = {"error": repr(err)}
            print(f"matmul peak failed: {err!r}")
        _free(device)
    write_json(out, result)

    plan = []  # (variant, model, batch, grad_ckpt): DeepSpeed first, then plain, then compile
    compile_models = models if args.dry_run or not args.compile else parse_models(args.compile)
    for variant, wanted, which in (("deepspeed", not args.no_deepspeed, models), ("plain", args.plain, models),
                                   ("compile", args.compile is not None, compile_models)):
        if wanted:
            plan += [(variant, name, b, gc_on) for name, batches in which for b in batches for gc_on in gc_modes]

    print(HEADER)
    print("-" * len(HEADER))
    for variant, name, batch, gc_on in plan:
        label = name if isinstance(name, str) else "tiny"
        overrides = {"input_size": args.input_size, "in_channels": 4, "num_classes": args.num_classes,
                     "grad_checkpointing": gc_on}
        key = f"{label}@{args.input_size}"
        row: dict[str, Any] = {"variant": variant if variant != "deepspeed" else f"ds-z{args.zero_stage}",
                               "model": label, "batch": batch, "grad_checkpointing": gc_on,
                               "precision": precision if variant == "deepspeed" else
                               ("autocast-bf16" if not args.dry_run else "fp32")}
        left = args.time_budget - (time.perf_counter() - start)
        if left < (90 if variant == "compile" else 15):
            row["status"] = f"skipped (time budget: {left:.0f} s left)"
            result["runs"].append(row)
            print(_row(row))
            continue
        if key not in result["gflops"]:
            g, source, analytic = model_gflops(name, {k: v for k, v in overrides.items() if k != "grad_checkpointing"})
            result["gflops"][key] = {"gflops": g, "source": source, "analytic": analytic}
        gflops = result["gflops"][key]["gflops"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        err_text = None
        try:
            if variant == "deepspeed":
                r = run_deepspeed(name, overrides, batch, args, device, precision)
            else:
                r = run_plain(name, overrides, batch, args, device, compile_model=variant == "compile")
        except Exception as err:  # noqa: BLE001 - report per configuration, go on with the next
            r = None
            err_text = "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {str(err)[:300]}"
            if not _is_oom(err):
                row["traceback"] = traceback.format_exc()[-3000:]
            del err
        peak_mem = _gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")
        _free(device)
        if r is None:
            row["status"] = err_text
            row["peak_mem_gib"] = peak_mem
        else:
            ips = batch / r["wall_s"]
            tflops = gflops * 2 * 3 * ips / 1e3
            row.update(r, status="ok", step_ms=r["wall_s"] * 1e3, images_per_s=ips, tflops=tflops,
                       mfu=tflops / peak if peak else None, peak_mem_gib=peak_mem, gflops=gflops,
                       loss_finite=math.isfinite(r["loss"]))
            if not math.isfinite(r["loss"]):
                row["status"] = "ok (non-finite loss!)"
        if device.type == "cuda":
            row["mem_left_after_gib"] = _gib(torch.cuda.memory_allocated(device))
        result["runs"].append(row)
        write_json(out, result)
        print(_row(row), flush=True)

    print("step ms: wall clock per timed step; event ms: median CUDA-event time of one step; TFLOP/s = "
          "gflops(fvcore, batch 1) x 2 x 3 x img/s; MFU = TFLOP/s / measured bf16 matmul peak; mem: "
          "peak allocated")
    for key, g in result["gflops"].items():
        print(f"gflops {key}: {g['gflops']:.4g} ({g['source']}; analytic {g['analytic']:.4g})")
    result["meta"]["total_s"] = time.perf_counter() - start
    write_json(out, result)
    print(f"wrote {out} ({result['meta']['total_s']:.0f} s)")
    failed = [r for r in result["runs"] if r["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
