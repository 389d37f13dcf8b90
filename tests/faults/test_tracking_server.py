"""A shared tracking server: artifacts reach the server, secrets reach no file, reports survive a
failed write. Real `mlflow server --serve-artifacts` on 127.0.0.1, real files, no mocks."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis.report import build_report, log_report
from analysis.runs import load_study
from analysis.schema import CELLS_ARTIFACT, FID, REPORT_ARTIFACT_DIR, RESOLVED_SPEC_ARTIFACT, SAMPLES_ARTIFACT_DIR
from dit.evaluate.grids import sample_grid_path
from orchestrator.spec import load_spec
from orchestrator.tracking import SampleGridSink, StudyTracker

SECRET = "s3cr3t-Pa55w0rd"


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def write_png(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path.read_bytes()


def write_spec(path: Path, uri: str) -> Path:
    """A dry-run spec (the shape given, no manifest needed) naming ``uri`` as its tracking store."""
    spec = {"name": path.stem, "tracking": {"uri": uri},
            "data": {"manifest": "m.json", "image_size": 8, "num_classes": 10,
                     "latent": {"channels": 1, "size": 8, "vae_factor": 1}},
            "grid": {"size": [{"name": "t", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2]},
            "recipe": {"steps": 4}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def log_a_study(uri: str, spec_path: Path, study_dir: Path) -> tuple[StudyTracker, str, Path]:
    """What a study does with MLflow, from the driver and a trial's controller: the study's files
    on the parent run, a trial run, its sample grid through SampleGridSink, both runs ended."""
    spec = load_spec(spec_path)
    tracker = StudyTracker(uri, spec.name, None, study_dir / "artifacts")
    tracker.log_study_files(spec_path, spec.resolved(), [{"cell": "DiT-t/2"}])
    run_id = tracker.trial_run("DiT-t/2", {"model": "DiT-t/2"}, {}, study_dir / "trials" / "c" / "mlflow_run_id")
    samples = study_dir / "trials" / "c" / "samples"
    png = sample_grid_path(samples, 10)
    write_png(png)
    grids = SampleGridSink(uri, run_id, samples)
    grids.add({"step": 10, FID: 12.5})
    assert grids.sent == {png.name}
    tracker.finish_trial(run_id, "finished")
    tracker.finish_study("FINISHED")
    return tracker, run_id, png


@pytest.mark.slow
def test_artifacts_from_driver_and_controller_reach_the_server_not_the_study_folder(tmp_path, capsys,
                                                                                     mlflow_artifact_server):
    server = mlflow_artifact_server
    study_dir = tmp_path / "study"
    spec_path = write_spec(tmp_path / "input" / "shared.yaml", server.uri)
    tracker, run_id, png = log_a_study(server.uri, spec_path, study_dir)
    data = load_study("shared", server.uri)
    report = build_report(data, study_dir / "report", n_boot=0, n_boot_saturating=0)
    log_report(report, data)

    served = files_under(server.artifacts)
    parent = f"{tracker.experiment_id}/{tracker.parent_id}/artifacts"
    trial = f"{tracker.experiment_id}/{run_id}/artifacts"
    assert {f"{parent}/spec/shared.yaml", f"{parent}/{RESOLVED_SPEC_ARTIFACT}", f"{parent}/{CELLS_ARTIFACT}",
            f"{parent}/{REPORT_ARTIFACT_DIR}/report.html", f"{trial}/{SAMPLES_ARTIFACT_DIR}/{png.name}"} <= served
    # The driver's study folder holds only what ditscale writes there itself, no MLflow artifact.
    assert not (study_dir / "artifacts").exists()
    assert files_under(study_dir) == {"trials/c/mlflow_run_id", f"trials/c/samples/{png.name}"} | {
        f"report/{f}" for f in files_under(study_dir / "report")}
    # A teammate's client gets them back through the server.
    c = MlflowClient(server.uri)
    grid = c.download_artifacts(run_id, f"{SAMPLES_ARTIFACT_DIR}/{png.name}", str(tmp_path))
    assert Path(grid).read_bytes() == png.read_bytes()
    html = c.download_artifacts(tracker.parent_id, f"{REPORT_ARTIFACT_DIR}/report.html", str(tmp_path))
    assert Path(html).read_text() == report.path.read_text()
    # An experiment made before this (its artifacts in one machine's folder) is pointed out.
    c.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    capsys.readouterr()
    StudyTracker(server.uri, "old", None, tmp_path / "study" / "artifacts")
    assert "outside the tracking server" in capsys.readouterr().err


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_reaches_no_file_no_artifact_and_no_output(tmp_path, capfd,
                                                                                  mlflow_artifact_server):
    from orchestrator.cli.study import _print_outcome
    from orchestrator.study import StudyOutcome

    server = mlflow_artifact_server
    uri = f"http://ditscale:{SECRET}@127.0.0.1:{server.port}"  # a plain server ignores the user info
    study_dir = tmp_path / "study"
    spec_path = write_spec(tmp_path / "input" / "secret.yaml", uri)
    tracker, _, _ = log_a_study(uri, spec_path, study_dir)
    data = load_study("secret", uri)
    report = build_report(data, study_dir / "report", n_boot=0, n_boot_saturating=0)
    log_report(report, data)
    _print_outcome(StudyOutcome("secret", study_dir, uri, tracker.parent_id, {}))

    assert "ditscale:***@127.0.0.1" in report.path.read_text()  # still says which server
    leaks = [p for folder in (study_dir, server.artifacts, server.root) for p in folder.rglob("*")
             if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert len(files_under(server.artifacts)) >= 5  # the files checked were written
    out = capfd.readouterr()
    assert SECRET not in out.out + out.err
    assert "MLflow: http://ditscale:***@127.0.0.1" in out.out


CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    from pathlib import Path
    from analysis.report import build_report
    from analysis.runs import load_published

    out = Path(sys.argv[1])
    data = load_published(None)  # the DiT paper's table: real fits and plots, no MLflow
    first = build_report(data, out, n_boot=20, n_boot_saturating=20)
    others = max(p.stat().st_size for p in out.rglob("*") if p.is_file() and p != first.path)
    size = first.path.stat().st_size
    assert others < size, (others, size)  # the limit below stops the report alone
    Path(sys.argv[2]).write_bytes(first.path.read_bytes())
    # A full disk, for real: the kernel refuses to grow any file past the limit (EFBIG).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = (others + size) // 2
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        build_report(data, out, n_boot=20, n_boot_saturating=20)
    except OSError as err:
        print("write failed:", err)
        sys.exit(3)
    sys.exit(0)
""")


@pytest.mark.slow
def test_a_report_write_that_fails_part_way_leaves_the_previous_report_whole(tmp_path):
    out = tmp_path / "report"
    before = tmp_path / "before.html"
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), str(before)], capture_output=True, text=True,
                           timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == 3, child.stdout + child.stderr  # the second write did fail
    assert (out / "report.html").read_bytes() == before.read_bytes()
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []  # no temp file left behind
