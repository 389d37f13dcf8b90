"""One trial on a real local Ray: TorchTrainer workers, gloo, DeepSpeed ZeRO, checkpoints in storage."""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from faults.injectors import KillAt, PoisonAt, RecordSteps, StepFileSink
from orchestrator.spec.trial import TrialConfig, load_trial_config
from orchestrator.trial import run_trial

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}


def trial(data, storage, name, workers=2, **train):
    recipe = dict(model=TINY, data=data, steps=16, global_batch=32, lr=1e-3, log_every=2,
                  checkpoint_every=6, zero_stage=2, shuffle_buffer=200)
    return TrialConfig(name=name, storage=str(storage), workers=workers, cpus_per_worker=0.5,
                       max_failures=2, train={**recipe, **train})


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    yield tmp_path_factory.mktemp("runs")
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def zero2_run(digits8, storage):
    return run_trial(trial(digits8, storage, "zero2"))


def losses(outcome):
    return [r["train/loss"] for r in outcome.metrics]


@pytest.mark.slow
def test_two_workers_zero2_trains_and_merges_every_rank_shard(zero2_run):
    assert zero2_run.status == "finished", zero2_run.reason
    assert [r["step"] for r in zero2_run.metrics] == list(range(2, 17, 2))
    assert losses(zero2_run)[-1] < 0.8 * losses(zero2_run)[0]
    shards = sorted(os.listdir(os.path.join(zero2_run.checkpoint, "deepspeed")))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert os.path.basename(zero2_run.checkpoint) == "checkpoint_00000016"


@pytest.mark.slow
def test_every_process_of_the_job_gets_the_short_report_poll_interval(zero2_run):
    """Ray Train's controller takes one report per poll (2 s apart by default); ensure_ray gives
    every process of the job, controllers included, the short interval."""
    import ray

    from orchestrator.trial import HEALTH_CHECK_ENV, REPORT_POLL_S

    @ray.remote(num_cpus=0)
    def env():
        return os.environ.get(HEALTH_CHECK_ENV)

    assert ray.get(env.remote()) == REPORT_POLL_S


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages_follow_zero2(digits8, storage, zero2_run, stage):
    outcome = run_trial(trial(digits8, storage, f"zero{stage}", steps=8, checkpoint_every=0, zero_stage=stage))
    assert outcome.status == "finished", outcome.reason
    # ZeRO 1/2/3 partition the same fp32 optimisation differently: same numbers
    assert losses(outcome) == pytest.approx(losses(zero2_run)[:4], rel=1e-4)


@pytest.mark.slow
def test_one_worker_follows_two_workers_at_the_same_global_batch(digits8, storage, zero2_run):
    # Different samples per micro-batch (the data is split by rank), the same recipe:
    # the curves must agree closely, not bitwise.
    one = run_trial(trial(digits8, storage, "one-worker", workers=1, micro_batch=16))
    assert one.status == "finished", one.reason
    for a, b in zip(losses(one), losses(zero2_run)):
        assert a == pytest.approx(b, rel=0.15)
    assert losses(one)[-1] < 0.8 * losses(one)[0]


@pytest.mark.slow
def test_sigkilled_worker_restarts_from_checkpoint_and_logs_each_step_once(digits8, storage, tmp_path, zero2_run):
    marker, done, seen = tmp_path / "killed", tmp_path / "steps", tmp_path / "sink"
    outcome = run_trial(trial(digits8, storage, "killed"), sinks=[StepFileSink(seen)],
                        step_callbacks=[KillAt(9, marker, rank=1), RecordSteps(done)])
    assert marker.exists(), "the fault was never injected"
    assert outcome.status == "finished", outcome.reason
    assert [r["step"] for r in outcome.metrics] == list(range(2, 17, 2))  # each step exactly once
    # Rank 0 ran 1..8 or 9 (rank 1 died after 9), then the group restarted from the step-6 checkpoint.
    ran = [int(s) for s in done.read_text().split()]
    restart = next(i for i in range(1, len(ran)) if ran[i] <= ran[i - 1])
    assert ran[:restart] == list(range(1, restart + 1)) and restart in (8, 9), ran
    assert ran[restart:] == list(range(7, 17)), ran
    assert [int(s) for s in seen.read_text().split()] == list(range(2, 17, 2))  # a sink sees no replay
    assert losses(outcome) == pytest.approx(losses(zero2_run), rel=1e-6)


@pytest.mark.slow
def test_nan_fails_the_trial_at_once_with_its_reason(digits8, storage):
    outcome = run_trial(trial(digits8, storage, "nan"), step_callbacks=[PoisonAt(3)])
    assert outcome.status == "failed"
    assert outcome.reason.startswith("non-finite loss (nan) at step 4")
    assert outcome.checkpoint is None  # it died before its first checkpoint at step 6


@pytest.mark.slow
def test_rerun_of_a_finished_trial_resumes_instead_of_retraining(digits8, storage, zero2_run):
    again = run_trial(trial(digits8, storage, "zero2"))
    assert again.status == "finished"
    assert [r["step"] for r in again.metrics] == list(range(2, 17, 2))  # nothing logged twice


def test_bad_trial_config_is_refused_before_ray_starts(tmp_path, digits8):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"name": "bad", "workers": 4, "train": {
        "model": "DiT-S/8", "data": digits8, "steps": 10, "global_batch": 30, "zero_stage": 4}}))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(spec)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.zero_stage" in proc.stderr and "less than or equal to 3" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
    spec.write_text(yaml.safe_dump({"name": "bad", "workers": 4, "train": {
        "model": "DiT-S/8", "data": digits8, "steps": 10, "global_batch": 30}}))
    with pytest.raises(ValueError, match=r"global_batch \(30\) must be divisible by workers \(4\)"):
        load_trial_config(spec)
    with pytest.raises(ValueError, match="cannot read trial config"):
        load_trial_config(tmp_path / "missing.yaml")
    spec.write_text("name: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_trial_config(spec)


def test_missing_manifest_is_refused_before_ray_starts(tmp_path):
    cfg = trial(str(tmp_path / "nope" / "manifest.json"), tmp_path, "x")
    with pytest.raises(ValueError, match="manifest"):
        run_trial(cfg)
