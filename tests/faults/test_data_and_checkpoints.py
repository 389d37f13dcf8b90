"""Faults 4 and 6, and checkpoint safety: a damaged shard, vanished data, a full disk, a tampered
checkpoint."""

import resource
import shutil
import signal
import threading
import warnings
from pathlib import Path

import pytest
import torch

from dit.errors import ConfigError
from dit.latents import CorruptShardError, ShardWarning
from dit.latents.manifest import NoReadableShardsError
from dit.train import CheckpointWriteError, TrainConfig, train, verify_checkpoint_files
from dit.train.loop import BAD_SHARDS, SKIPPED_SAMPLES

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}


def recipe(data, **kw):
    base = dict(model=TINY, data=data, steps=8, global_batch=32, lr=1e-3, log_every=4, checkpoint_every=4,
                zero_stage=2, shuffle_buffer=64)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def damaged(digits8, tmp_path):
    """A copy of the digits shards with one shard cut in half."""
    src = Path(digits8).parent
    dst = tmp_path / "damaged"
    shutil.copytree(src, dst)
    victim = sorted(dst.glob("*.tar"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return str(dst / "manifest.json"), victim.name


def test_truncated_shard_is_skipped_counted_and_logged(damaged, tmp_path):
    manifest, _ = damaged
    reports = []
    with pytest.warns(UserWarning):
        result = train(recipe(manifest, steps=40, log_every=20, checkpoint_every=0),
                       lambda m, c: reports.append(m), checkpoint_root=tmp_path / "ck")
    assert result.step == 40
    assert reports[-1][SKIPPED_SAMPLES] > 0
    assert reports[-1][BAD_SHARDS] == 1.0  # the one damaged shard reaches the driver as a metric


def test_vanished_data_ends_the_run_instead_of_spinning(digits8, tmp_path):
    data = tmp_path / "gone"
    shutil.copytree(Path(digits8).parent, data)
    for shard in data.glob("*.tar"):  # an unmounted volume: the manifest is there, the shards not
        shard.unlink()
    outcome = {}

    def run():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ShardWarning)
                train(recipe(str(data / "manifest.json"), checkpoint_every=0), lambda m, c: None,
                      checkpoint_root=tmp_path / "ck")
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True)  # the test cannot hang on a spinning loop
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "train() still running on data whose shards were all deleted"
    err = outcome.get("error")
    assert isinstance(err, NoReadableShardsError), err
    assert str(err).startswith(f"step 1: manifest {data / 'manifest.json'}: all 16 of its 16 shards are unreadable")


def test_strict_mode_fails_naming_the_shard(damaged, tmp_path):
    manifest, shard = damaged
    with pytest.raises(CorruptShardError, match=shard):
        train(recipe(manifest, steps=40, strict_data=True, checkpoint_every=0), lambda m, c: None,
              checkpoint_root=tmp_path / "ck")


def test_disk_full_at_checkpoint_time_is_clear_and_keeps_the_previous_checkpoint(digits8, tmp_path):
    reports = []

    def fill_disk(step, engine):
        if step == 5:  # after the step-4 checkpoint: every further file write over 1 KiB fails
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old[1]))

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with pytest.raises(CheckpointWriteError, match="cannot write the step-8 checkpoint") as err:
            train(recipe(digits8), lambda m, c: reports.append((m, c)), checkpoint_root=tmp_path,
                  step_callbacks=[fill_disk])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert "Earlier checkpoints are untouched" in str(err.value)
    assert not (tmp_path / "checkpoint_00000008").exists()  # no half checkpoint left behind
    previous = reports[0][1]
    verify_checkpoint_files(Path(previous))
    # ... and it still resumes: the run finishes from it once the disk has room again
    tail = []
    result = train(recipe(digits8), lambda m, c: tail.append(m), checkpoint_root=tmp_path / "again",
                   resume_from=previous)
    assert result.step == 8 and [m["step"] for m in tail] == [8]


def test_tampered_deepspeed_shard_is_refused_before_it_can_run_code(digits8, tmp_path):
    result = train(recipe(digits8, steps=4, checkpoint_every=0), lambda m, c: None, checkpoint_root=tmp_path)
    ckpt = Path(result.checkpoint_dir)
    verify_checkpoint_files(ckpt)
    shard = next((ckpt / "deepspeed").glob("zero_pp_rank_0_*.pt"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    state = torch.load(shard, weights_only=False)
    state["evil"] = Evil()
    torch.save(state, shard)
    with pytest.raises(ConfigError, match="not loadable with weights_only=True"):
        train(recipe(digits8, steps=8, checkpoint_every=0), lambda m, c: None, checkpoint_root=tmp_path / "r",
              resume_from=ckpt)
    assert not marker.exists()


def test_fp16_on_cpu_is_a_clear_error(digits8, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        train(recipe(digits8, precision="fp16"), lambda m, c: None, checkpoint_root=tmp_path)
