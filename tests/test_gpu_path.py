"""The GPU path, checked on the CPU: the smoke study, the synthetic data set, the GPU check's dry run,
and the device logic of the collectives (what NCCL would need)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator.cli import main as cli
from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "gpu_smoke.yaml"


def test_the_smoke_study_is_the_papers_b2_and_xl2_at_batch_256_on_gpus():
    spec = load_spec(SMOKE)
    cells = {c.name: c for c in spec.cells()}
    assert sorted(cells) == ["DiT-B-2", "DiT-XL-2"]
    assert cells["DiT-B-2"].gflops == pytest.approx(23.01, abs=0.01)  # the paper's Table 4
    assert cells["DiT-XL-2"].gflops == pytest.approx(118.64, abs=0.01)
    for c in cells.values():
        assert (c.train.global_batch, c.train.precision, c.use_gpu, c.gpus_per_worker) == (256, "bf16", True, 1)
        assert c.train.eval.enabled and c.train.checkpoint_every and c.train.eval.features == "digits-cnn-v1"


def test_random_latents_are_deterministic_bounded_and_carry_their_class():
    from dit.latents import RandomLatentsSource

    a, b = RandomLatentsSource(64, channels=4, size=8, num_classes=4), RandomLatentsSource(64, channels=4, size=8, num_classes=4)
    assert all(np.array_equal(a.load(i), b.load(i)) for i in (0, 5, 63))
    x = np.stack([a.load(i) for i in range(64)])
    assert x.shape == (64, 4, 8, 8) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    labels = np.array([a.label(i) for i in range(64)])
    means = np.stack([x[labels == c].mean(0) for c in range(4)])
    nearest = [int(np.argmin(((means - xi) ** 2).sum(axis=(1, 2, 3)))) for xi in x]
    assert (np.array(nearest) == labels).mean() == 1.0  # every sample nearest its own class mean
    assert not np.array_equal(RandomLatentsSource(64, channels=4, size=8, seed=1).load(0), a.load(0))


@pytest.mark.parametrize("backend, device, expected", [
    ("nccl", torch.device("cpu"), "cuda"),  # NCCL refuses CPU tensors: they go to the GPU
    ("nccl", torch.device("cuda", 0), "cuda"),
    ("gloo", torch.device("cpu"), "cpu"),
])
def test_collectives_put_tensors_where_the_backend_needs_them(backend, device, expected):
    from dit.dist import collective_device

    assert collective_device(backend, device, cuda_index=0).type == expected


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_every_check(tmp_path):
    # Not the suite's process-group variables: an earlier in-process train() left MASTER_PORT
    # (and RANK, WORLD_SIZE) in os.environ, and its gloo store still listens on that port.
    group = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {**{k: v for k, v in os.environ.items() if k not in group}, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [c["name"] for c in result["checks"]]
    for part in ("trains 6 steps", "in-loop FID", "resume continues the loss", "export loads strictly", "speed measured"):
        assert any(part in n for n in names), (part, names)
    assert all(c["ok"] for c in result["checks"])
    resume = next(c for c in result["checks"] if "resume" in c["name"])
    assert resume["bitwise"] and resume["max_rel_diff"] == 0.0  # on the CPU a resume is exact
    assert "img/s" in proc.stdout and "MFU" in proc.stdout


@pytest.mark.slow
def test_the_smoke_study_runs_on_the_cpu_in_a_reduced_form(tmp_path):
    raw = yaml.safe_load(SMOKE.read_text())
    raw["data"].update(manifest=str(tmp_path / "data" / "manifest.json"), samples=256, image_size=8,
                       latent={"channels": 4, "size": 8, "vae_factor": 1})
    raw["grid"]["size"] = [{"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}]
    raw["recipe"].update(steps=6, global_batch=16, checkpoint_every=3, log_every=2, shuffle_buffer=64)
    raw["eval"].update(num_samples=32, batch_size=16, steps=4)
    raw["resources"] = {"workers": 1, "cpus_per_worker": 1, "use_gpu": False, "max_failures": 0}
    raw["storage"] = str(tmp_path / "runs")
    spec = tmp_path / "smoke.yaml"
    spec.write_text(yaml.safe_dump(raw))
    assert cli(["run", str(spec), "--no-report"]) == 0  # prepares the random latents, then trains
    trial = tmp_path / "runs" / "gpu-smoke" / "trials" / "DiT-tiny-2"
    assert json.loads((trial / "outcome.json").read_text())["status"] == "finished"
    rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and np.isfinite(rows[-1]["eval/fid"])
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["num_samples"] == 256 and "digits-cnn-v1" in manifest["features"]
