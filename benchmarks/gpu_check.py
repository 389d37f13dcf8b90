"""The GPU check: the real trainer (``dit.train.train``) end to end on one GPU, and its speed.

Made for a few minutes of a GPU machine that has torch but not Ray or MLflow: it runs ``dit/``
alone (DeepSpeed, fvcore and pydantic are all it needs besides torch), under the one-process
NCCL group that ``dit.train`` makes itself. Every check is recorded (passed or not, with its
figures) and the JSON in ``--out`` is rewritten after each one, so a run cut off by an outer
timeout still leaves what it measured. Exit code 1 if any check failed.

1. **data**: synthetic 4x32x32 latents (``dit.latents.RandomLatentsSource``, the shape of 256 px
   images through the SD VAE) written as shards, with the small CNN that ``digits-cnn-v1`` FID uses.
2. **end to end**, for DiT-B/2 and DiT-XL/2 at batch 256 (the smoke study's cells): bf16 ZeRO-2
   training for ``--steps`` steps with a checkpoint half way and an in-loop FID at the end; a resume
   from the half-way checkpoint that must continue the loss (bitwise is reported, and bf16
   tolerance is the check); an export whose state dict loads strictly into a fresh model.
3. **speed**: the real trainer's images/s and MFU for XL/2 at 256 and 32 and B/2 at 256, timed
   by a step callback (after a CUDA synchronize) over the steps after the warm-up, beside the
   synthetic DeepSpeed step of ``bench_gpu.py``. MFU = fvcore Gflops x 2 (flops per multiply-add)
   x 3 (forward + backward) x images/s over the *sustained* bf16 matmul peak measured here (8192^3
   products back to back for 2 s); the H200's spec figure (989 TFLOP/s dense bf16) is printed beside.

``--dry-run`` runs the same code on the CPU (gloo, tiny models, a few steps): what the tests run.

    python benchmarks/gpu_check.py --out $OUT                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
os.environ.setdefault("DS_ACCELERATOR", "cuda" if "--dry-run" not in sys.argv else "cpu")

import torch  # noqa: E402

SPEC_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, the vendors' figures
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}


class Checks:
    """Every check's outcome and figures, written to ``path`` after each one."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.result = path, {"meta": meta, "checks": [], "sections": {}}

    def record(self, name: str, ok: bool, **figures: Any) -> bool:
        self.result["checks"].append({"name": name, "ok": bool(ok), **figures})
        print(f"  [{'ok' if ok else 'FAILED'}] {name} {json.dumps(figures, default=str)[:300]}", flush=True)
        self.write()
        return ok

    def section(self, name: str, value: Any) -> None:
        self.result["sections"][name] = value
        self.write()

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one part; an exception becomes a failed check, and the next part still runs."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - a GPU minute is too dear to lose the rest
            self.record(name, False, error=f"{type(err).__name__}: {err}"[:2000], trace=traceback.format_exc()[-4000:])
            return None

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.result["checks"])

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str))
        tmp.replace(self.path)


# --------------------------------------------------------------------------------------------
# Setup: the plan, the data, the peak
# --------------------------------------------------------------------------------------------


def plan(dry: bool, steps: int | None) -> SimpleNamespace:
    """What to run: the real sizes on a GPU, tiny ones for a dry run on the CPU."""
    if dry:
        return SimpleNamespace(size=8, samples=256, e2e=[("tiny/2", TINY, 8)], speed=[("tiny/2", TINY, 8)],
                               steps=steps or 6, warmup=2, timed=3, fid_samples=32, fid_batch=16, fid_steps=4)
    return SimpleNamespace(size=32, samples=4096, e2e=[("DiT-B/2", "DiT-B/2", 256), ("DiT-XL/2", "DiT-XL/2", 256)],
                           speed=[("DiT-XL/2", "DiT-XL/2", 256), ("DiT-XL/2", "DiT-XL/2", 32), ("DiT-B/2", "DiT-B/2", 256)],
                           steps=steps or 200, warmup=5, timed=20, fid_samples=2000, fid_batch=250, fid_steps=25)


def make_data(out: Path, p: SimpleNamespace) -> str:
    from dit.evaluate.features import digits_feature_nets
    from dit.latents import RandomLatentsSource, write_shards
    from dit.vae import IdentityCodec

    source = RandomLatentsSource(p.samples, channels=4, size=p.size, num_classes=10)
    write_shards(source, IdentityCodec(), out / "data", feature_nets=digits_feature_nets, shard_size=1024)
    return str(out / "data" / "manifest.json")


def sustained_peak(device: torch.device, n: int = 8192, seconds: float = 2.0) -> dict[str, Any]:
    """Dense bf16 TFLOP/s over ``seconds`` of back-to-back n^3 products (one sync at each end):
    what the GPU sustains, not the best of a 14 ms burst."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(5):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(device)
        count += 10
    elapsed = time.perf_counter() - t0
    return {"n": n, "products": count, "seconds": elapsed, "tflops": 2 * n**3 * count / elapsed / 1e12}


def trainer_model(cfg: Any):
    """The DiTConfig ``dit.train`` builds for ``cfg`` (the data's shape and classes filled in)."""
    from dit.latents import Manifest
    from dit.train.config import resolve_model

    return resolve_model(cfg, Manifest.load(cfg.data))


def recipe(model: Any, data: str, batch: int, steps: int, **kw: Any):
    from dit.train import TrainConfig

    base = dict(model=model, data=data, steps=steps, global_batch=batch, lr=1e-4, precision="bf16",
                zero_stage=2, ema_decay=0.9999, log_every=1, random_flip=False, shuffle_buffer=512, seed=0)
    return TrainConfig(**{**base, **kw})


class Recorder:
    """``dit.train``'s report: keeps every step's metrics and a copy of each checkpoint."""

    def __init__(self, keep: Path) -> None:
        self.keep, self.rows, self.checkpoints = keep, [], {}

    def __call__(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.rows.append(dict(metrics))
        if checkpoint_dir:  # the caller owns it afterwards (dit.train's contract)
            dst = self.keep / Path(checkpoint_dir).name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.move(checkpoint_dir, dst)
            self.checkpoints[int(metrics["step"])] = dst

    def losses(self) -> dict[int, float]:
        return {int(r["step"]): r["train/loss"] for r in self.rows}


# --------------------------------------------------------------------------------------------
# 2. End to end
# --------------------------------------------------------------------------------------------


def end_to_end(checks: Checks, label: str, model: Any, batch: int, data: str, p: SimpleNamespace, out: Path) -> dict:
    from dit.evaluate import EvalConfig
    from dit.models import create_model, load_state_dict
    from dit.train import export_checkpoint, train

    tag = label.replace("/", "-")
    mid = p.steps // 2
    ev = EvalConfig(enabled=True, at_end=True, num_samples=p.fid_samples, batch_size=p.fid_batch,
                    sampler="ddim", steps=p.fid_steps, features="digits-cnn-v1")
    cfg = recipe(model, data, batch, p.steps, checkpoint_every=mid, eval=ev)
    full = Recorder(out / "checkpoints" / tag / "full")
    t0 = time.perf_counter()
    result = train(cfg, full, checkpoint_root=out / "staging")
    seconds = time.perf_counter() - t0
    losses = full.losses()
    checks.record(f"{label} trains {p.steps} steps", result.step == p.steps and all(map(math.isfinite, losses.values())),
                  seconds=round(seconds, 1), first_loss=losses.get(1), last_loss=losses.get(p.steps),
                  peak_memory_gb=full.rows[-1].get("sys/peak_memory_gb"))
    fid = full.rows[-1].get("eval/fid")
    checks.record(f"{label} in-loop FID", fid is not None and math.isfinite(fid), fid=fid,
                  eval_seconds=full.rows[-1].get("eval/seconds"))

    resumed = Recorder(out / "checkpoints" / tag / "resumed")
    train(cfg.model_copy(update={"eval": EvalConfig()}), resumed, resume_from=full.checkpoints[mid],
          checkpoint_root=out / "staging")
    again = resumed.losses()
    steps = sorted(s for s in losses if s > mid)
    diffs = [abs(again.get(s, math.nan) - losses[s]) / max(abs(losses[s]), 1e-12) for s in steps]
    worst = max(diffs) if diffs else math.nan
    checks.record(f"{label} resume continues the loss", sorted(again) == steps and worst <= 1e-2,
                  bitwise=all(d == 0 for d in diffs), max_rel_diff=worst, resumed_from=mid)

    exported = export_checkpoint(full.checkpoints[p.steps], out / f"{tag}-ema.pt")
    fresh = create_model(trainer_model(cfg))
    fresh.load_state_dict(load_state_dict(exported), strict=True)
    checks.record(f"{label} export loads strictly", True, file=str(exported), bytes=exported.stat().st_size)
    shutil.rmtree(out / "checkpoints" / tag, ignore_errors=True)  # GBs for XL: keep the disk free
    return {"seconds": seconds, "losses": losses, "fid": fid}


# --------------------------------------------------------------------------------------------
# 3. Speed
# --------------------------------------------------------------------------------------------


def trainer_speed(label: str, model: Any, batch: int, data: str, p: SimpleNamespace, out: Path,
                  gflops: float, peak: float) -> dict[str, Any]:
    """The real trainer's sustained images/s and MFU, from per-step timestamps."""
    from dit.train import train

    stamps: list[float] = []

    def stamp(step: int, engine: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    cfg = recipe(model, data, batch, p.warmup + p.timed, log_every=p.warmup + p.timed)
    train(cfg, lambda m, c: shutil.rmtree(c, ignore_errors=True) if c else None, gflops=gflops,
          step_callbacks=[stamp], checkpoint_root=out / "staging")
    seconds = stamps[-1] - stamps[p.warmup - 1]
    images_per_s = batch * p.timed / seconds
    tflops = gflops * 2 * 3 * images_per_s / 1e3
    return {"model": label, "batch": batch, "step_ms": 1e3 * seconds / p.timed, "images_per_s": images_per_s,
            "tflops": tflops, "mfu": tflops / peak if peak else None}


def synthetic_speed(model: Any, batch: int, p: SimpleNamespace, device: torch.device, gflops: float,
                    peak: float) -> dict[str, Any]:
    """bench_gpu.py's synthetic DeepSpeed step (no data, no EMA, no metrics) at the same shape."""
    import bench_gpu

    args = SimpleNamespace(zero_stage=2, fused_adam=False, warmup=p.warmup, steps=p.timed)
    r = bench_gpu.run_deepspeed(model, {"grad_checkpointing": False, "input_size": p.size, "in_channels": 4,
                                        "num_classes": 10}, batch, args, device, "bf16")
    bench_gpu._free(device)
    images_per_s = batch / r["wall_s"]
    tflops = gflops * 2 * 3 * images_per_s / 1e3
    return {"step_ms": 1e3 * r["wall_s"], "images_per_s": images_per_s, "tflops": tflops,
            "mfu": tflops / peak if peak else None}


def speed(checks: Checks, data: str, p: SimpleNamespace, out: Path, device: torch.device, peak: float) -> list[dict]:
    from dit.flops import measure

    rows = []
    for label, model, batch in p.speed:
        mcfg = trainer_model(recipe(model, data, batch, 1))
        gflops = measure(mcfg, input_size=mcfg.input_size).gflops  # fvcore, batch 1
        row = checks.run(f"{label} b{batch} real trainer", lambda: trainer_speed(label, model, batch, data, p, out,
                                                                                 gflops, peak))
        if row is None:
            continue
        row["gflops"] = gflops
        row["synthetic"] = checks.run(f"{label} b{batch} synthetic step",
                                      lambda: synthetic_speed(model, batch, p, device, gflops, peak))
        rows.append(row)
        checks.record(f"{label} b{batch} speed measured", row["images_per_s"] > 0, **{k: v for k, v in row.items()
                                                                                     if k != "synthetic"})
        checks.section("speed", rows)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# The table and main
# --------------------------------------------------------------------------------------------


def table(rows: list[dict], peak: dict[str, Any], spec: float | None) -> str:
    lines = [f"bf16 matmul peak: {peak.get('tflops', float('nan')):.0f} TFLOP/s sustained "
             f"({peak.get('seconds', 0):.1f} s of {peak.get('n', 0)}^3)"
             + (f"; spec {spec:.0f} TFLOP/s" if spec else ""),
             f"{'model':<10} {'batch':>5} {'Gflops':>7} {'img/s':>8} {'ms/step':>8} {'TFLOP/s':>8} {'MFU':>6}"
             f" {'MFU(spec)':>9} | {'synthetic img/s':>15} {'MFU':>6}"]
    for r in rows:
        syn = r.get("synthetic") or {}
        mfu_spec = r["tflops"] / spec if spec else float("nan")
        lines.append(f"{r['model']:<10} {r['batch']:>5} {r['gflops']:>7.2f} {r['images_per_s']:>8.1f} "
                     f"{r['step_ms']:>8.1f} {r['tflops']:>8.1f} {_pct(r['mfu']):>6} {_pct(mfu_spec):>9} | "
                     f"{syn.get('images_per_s', float('nan')):>15.1f} {_pct(syn.get('mfu')):>6}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (gpu_check.json, the data, exports)")
    ap.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU, tiny models")
    ap.add_argument("--steps", type=int, default=None, help="end-to-end steps (default 200; dry run 6)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("e2e", "speed"), help="parts to leave out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if not args.dry_run and device.type != "cuda":
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = next((v for k, v in SPEC_TFLOPS.items() if k in name), None)
    p = plan(args.dry_run, args.steps)
    checks = Checks(out / "gpu_check.json", {"device": name, "torch": torch.__version__, "dry_run": args.dry_run,
                                              "spec_bf16_tflops": spec, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    t0 = time.perf_counter()
    data = make_data(out, p)
    checks.record("data written", bool(data), manifest=data, seconds=round(time.perf_counter() - t0, 1))
    peak = sustained_peak(device) if device.type == "cuda" else {"tflops": float("nan")}
    checks.section("matmul_peak", peak)
    if "e2e" not in args.skip:
        for label, model, batch in p.e2e:
            checks.run(f"{label} end to end", lambda: end_to_end(checks, label, model, batch, data, p, out))
    rows = speed(checks, data, p, out, device, peak["tflops"]) if "speed" not in args.skip else []
    shutil.rmtree(out / "staging", ignore_errors=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    print(table(rows, peak, spec))
    print(f"{sum(c['ok'] for c in checks.result['checks'])}/{len(checks.result['checks'])} checks passed "
          f"in {time.perf_counter() - t0:.0f} s; {checks.path}")
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
