"""Issue-15 faults of a study's driver: identity on resume, one driver per study, torn logs,
trial failures that leave a reason, and cells no node can hold. Real files, processes and Ray."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from dit.errors import ConfigError
from orchestrator.cli import main as cli
from orchestrator.layout import StudyPaths, read_metrics
from orchestrator.lock import study_lock
from orchestrator.spec import load_spec
from orchestrator.study import _check_identity, _create_folder, check_cells_fit, study_status
from orchestrator.trial import MetricLog


def spec_at(folder: Path, storage: Path, name: str = "ident", lr: float = 1e-3, **extra) -> Path:
    """A study spec whose manifest is relative to its own folder (data/), as a checkout has it."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": name,
        "data": {"manifest": "data/manifest.json", "image_size": 8, "num_classes": 10,
                 "latent": {"channels": 1, "size": 8, "vae_factor": 1}},
        "grid": {"size": [{"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2, 4]},
        "recipe": {"steps": 8, "global_batch": 32, "lr": lr, "zero_stage": 0, "checkpoint_every": 4, "log_every": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "storage": str(storage),
        **extra,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def claim(path: Path, resume: bool = False) -> bool:
    spec = load_spec(path)
    paths = StudyPaths(Path(spec.storage) / spec.name)
    existed = _check_identity(paths, spec, resume)
    if not existed:
        _create_folder(paths, spec, path)
    return existed


def test_a_study_resumes_after_its_data_appears_and_its_checkout_moves(tmp_path, digits8):
    storage = tmp_path / "runs"
    first = spec_at(tmp_path / "checkout", storage)
    assert claim(first) is False  # created while the data did not exist yet (a dry-run shape)
    shutil.copytree(Path(digits8).parent, tmp_path / "checkout" / "data")
    assert claim(first, resume=True) is True  # the data now exists: derived state, same study
    shutil.move(tmp_path / "checkout", tmp_path / "moved")
    assert claim(tmp_path / "moved" / "study.yaml", resume=True) is True  # another absolute path
    changed = spec_at(tmp_path / "moved", storage, lr=3e-3)
    with pytest.raises(ConfigError, match=r"recipe\.lr changed"):
        claim(changed, resume=True)


def test_a_study_folder_from_before_identities_is_read_from_its_spec_copy(tmp_path):
    storage = tmp_path / "runs"
    path = spec_at(tmp_path / "c", storage)
    claim(path)
    state = storage / "ident" / "study.json"
    old = json.loads(state.read_text())
    state.write_text(json.dumps({"name": "ident", "spec_sha256": "0" * 64, "spec_file": old["spec_file"]}))
    assert claim(path, resume=True) is True
    with pytest.raises(ConfigError, match=r"recipe\.lr changed"):
        claim(spec_at(tmp_path / "c", storage, lr=5e-3), resume=True)
    state.write_text("{garbage")
    with pytest.raises(ConfigError, match="not a study record"):
        claim(path, resume=True)


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from orchestrator.lock import study_lock
    with study_lock(Path(sys.argv[1]), "held"):
        print("HELD", flush=True)
        time.sleep(300)
""")


def test_a_second_driver_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    lock = tmp_path / "study" / "driver.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(ConfigError, match=rf"pid {holder.pid} on host"):
            with study_lock(lock, "held"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with study_lock(lock, "held"):  # the dead driver's lock is free again, and names us now
        import os

        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_torn_metric_log_is_cut_back_and_every_reader_survives_it(tmp_path, digits8, capsys):
    path = spec_at(tmp_path / "c", tmp_path / "runs", name="torn")
    shutil.copytree(Path(digits8).parent, tmp_path / "c" / "data")
    claim(path)
    cell = load_spec(path).cells()[0].name
    log = tmp_path / "runs" / "torn" / "trials" / cell / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"step": 2, "train/loss": 0.5}\n{"step": 4, "train/loss": 0.4}\n{"step": 6, "train/lo')
    assert [r["step"] for r in read_metrics(log)] == [2, 4]
    assert cli(["status", str(path)]) == 0  # status reads the torn log
    out = capsys.readouterr().out
    assert "started" in out
    assert " 0.000 " not in out and "Mflops" in out  # a tiny model's cost in readable units
    resumed = MetricLog(log)  # what a restarted trial controller does
    assert resumed.last_step == 4
    assert resumed.add({"step": 6, "train/loss": 0.3})
    assert [r["step"] for r in read_metrics(log)] == [2, 4, 6]
    assert log.read_text().count("\n") == 3  # the torn bytes are gone, not glued to the new row
    assert study_status(path)[0]["step"] in (0, 6)


def test_a_cell_no_node_can_hold_is_refused_before_anything_starts(tmp_path, digits8, capsys):
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    spec = load_spec(spec_at(tmp_path / "c", tmp_path / "runs", name="big",
                             resources={"workers": 2, "cpus_per_worker": 2, "max_concurrent_trials": 1}))
    check_cells_fit(spec.cells(), nodes)  # one worker per node: fits
    spec = load_spec(spec_at(tmp_path / "c", tmp_path / "runs", name="big",
                             resources={"workers": 1, "cpus_per_worker": 3, "max_concurrent_trials": 1}))
    with pytest.raises(ConfigError, match="do not fit the cluster"):
        check_cells_fit(spec.cells(), nodes)  # 4 CPUs in all, but no node has 3


@pytest.mark.slow
def test_a_too_big_cell_on_the_live_ray_exits_2_and_writes_nothing(tmp_path, digits8, capsys):
    path = spec_at(tmp_path / "c", tmp_path / "runs", name="huge",
                   resources={"workers": 1, "cpus_per_worker": 64, "max_concurrent_trials": 1})
    shutil.copytree(Path(digits8).parent, tmp_path / "c" / "data")
    assert cli(["run", str(path), "--no-report"]) == 2
    assert "do not fit the cluster" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "huge" / "study.json").exists()


@pytest.mark.slow
def test_a_trial_that_fails_outside_training_leaves_an_outcome_with_its_reason(tmp_path, digits8, capsys):
    path = spec_at(tmp_path / "c", tmp_path / "runs", name="broken")
    shutil.copytree(Path(digits8).parent, tmp_path / "c" / "data")
    cells = [c.name for c in load_spec(path).cells()]
    # A broken trial folder: its MLflow run id cannot be recorded, before training starts.
    (tmp_path / "runs" / "broken" / "trials" / cells[0] / "mlflow_run_id").mkdir(parents=True)
    assert cli(["run", str(path), "--no-report"]) == 1
    outcome = json.loads((tmp_path / "runs" / "broken" / "trials" / cells[0] / "outcome.json").read_text())
    assert outcome["status"] == "error" and "IsADirectoryError" in outcome["reason"]
    assert "IsADirectoryError" in capsys.readouterr().out
    other = json.loads((tmp_path / "runs" / "broken" / "trials" / cells[1] / "outcome.json").read_text())
    assert other["status"] == "finished"


@pytest.mark.parametrize("record", ["", "\x00\xff garbled", "0" * 32])
def test_an_empty_garbled_or_unknown_run_id_record_is_recovered(tmp_path, record):
    from orchestrator.tracking import StudyTracker

    tracker = StudyTracker(f"sqlite:///{tmp_path}/mlflow.db", "ids", None, tmp_path / "art")
    id_file = tmp_path / "trial" / "mlflow_run_id"
    first = tracker.trial_run("cell", {"lr": 1}, {}, id_file)
    id_file.write_bytes(record.encode("latin-1"))
    again = tracker.trial_run("cell", {"lr": 1}, {}, id_file)
    assert again == first  # found again by its tags, not duplicated
    assert id_file.read_text() == first
    assert len(tracker.trial_runs()) == 1


@pytest.mark.slow
def test_a_trial_whose_shards_all_vanished_ends_at_once_naming_its_manifest(tmp_path, digits8):
    from orchestrator.spec.trial import TrialConfig
    from orchestrator.trial import run_trial

    data = tmp_path / "data"
    shutil.copytree(Path(digits8).parent, data)
    for shard in data.glob("*.tar"):
        shard.unlink()  # the volume was unmounted after the data was prepared
    cfg = TrialConfig(name="gone", storage=str(tmp_path / "runs"), workers=1, cpus_per_worker=1, max_failures=2,
                      train=dict(model=dict(depth=2, hidden_size=64, num_heads=4, patch_size=4),
                                 data=str(data / "manifest.json"), steps=8, global_batch=16, log_every=2))
    outcome = run_trial(cfg)
    assert outcome.status == "error"  # `resume` retries it once the data is back
    assert str(data / "manifest.json") in outcome.reason and "unreadable" in outcome.reason
