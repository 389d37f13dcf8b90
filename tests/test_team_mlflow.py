"""The team set-up end to end: one `mlflow server --serve-artifacts` backed by a real PostgreSQL,
a study run through the real `ditscale run` against it, and `ditscale report` reading it back.

PostgreSQL is started by the test itself (``initdb`` + ``pg_ctl`` in a temporary folder, on
127.0.0.1 and a free port). Without PostgreSQL's binaries the test skips, except where
``DITSCALE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``, which installs them) turns that into a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis.schema import (FID, KIND_STUDY, KIND_TRIAL, LOSS, REPORT_ARTIFACT_DIR, SAMPLES_ARTIFACT_DIR, TAG_KIND,
                             TAG_TRIAL)
from conftest import MlflowServer, free_port
from orchestrator.cli import main as cli
from orchestrator.layout import ARTIFACTS_DIR

STUDY = "team"
PG_USER = "ditscale"  # the database superuser initdb makes (trust auth: no password on loopback)


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} does not exist)"


@contextmanager
def shown_on_failure(*logs: tuple[str, Path]):
    """Print the named logs' tails when the block fails, so pytest shows them with the failure."""
    try:
        yield
    except BaseException:
        for what, path in logs:
            print(f"\n===== {what}: {path} =====\n{tail(path)}")
        raise


# ------------------------------------------------------------------------------ PostgreSQL


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin (newest
    first), else wherever PATH finds them."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    for pg_ctl in reversed(found):
        if (Path(pg_ctl).parent / "initdb").is_file():
            return Path(pg_ctl).parent
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    return None


def unavailable(why: str):
    if os.environ.get("DITSCALE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"DITSCALE_REQUIRE_POSTGRES=1 but {why}")
    pytest.skip(why)


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:``port``, its socket and log in ``root``.

    PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the ``postgres`` system
    user (made by Debian's package) and ``root`` belongs to it."""

    def __init__(self, bindir: Path, root: Path, as_user: str | None):
        self.bindir, self.root, self.as_user = bindir, root, as_user
        self.data, self.log, self.port = root / "pg", root / "postgres.log", free_port()
        self.started = False

    @property
    def uri(self) -> str:
        # The driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, not psycopg2.
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/mlflow"

    def run(self, tool: str, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.bindir / tool), *args]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        proc = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n"
                               f"----- {self.log} -----\n{tail(self.log)}")
        return proc.stdout + proc.stderr

    def start(self) -> "Postgres":
        self.run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "--encoding=UTF8", "--locale=C")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self.run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60", "start")
        self.started = True
        with self.connect("postgres") as conn:
            conn.autocommit = True
            conn.cursor().execute("CREATE DATABASE mlflow")
        return self

    def connect(self, dbname: str = "mlflow"):
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname=dbname, connect_timeout=10)
        return _Closing(conn)

    def stop(self) -> None:
        if not self.started:
            return
        try:
            self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        except Exception:
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.started = False


class _Closing:
    """psycopg2's ``with conn`` only ends the transaction; this closes the connection too."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()


@pytest.fixture
def postgres():
    bindir = postgres_bin()
    if bindir is None:
        unavailable("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql)")
    try:
        import psycopg2  # noqa: F401 -- the mlflow server's driver too
    except ImportError:
        unavailable("psycopg2 is not installed (pip install -e '.[test]' brings psycopg2-binary)")
    as_user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no 'postgres' system user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            unavailable("running as root and runuser(1) is missing")
        as_user = "postgres"
    # Not under pytest's tmp_path: that is private to root (0700), which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="ditscale-pg-"))
    if as_user:
        entry = pwd.getpwnam(as_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    pg = Postgres(bindir, root, as_user)
    try:
        pg.start()
        yield pg
    finally:
        try:
            pg.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------ mlflow server


class PostgresMlflowServer(MlflowServer):
    """conftest's MlflowServer (its port, uri and stop), started on a PostgreSQL backend store."""

    def __init__(self, root: Path, backend_uri: str, artifacts: Path):
        super().__init__(root, artifacts=artifacts, serve_artifacts=True)
        self.backend_uri = backend_uri

    def start(self, timeout: float = 300.0) -> "PostgresMlflowServer":
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log = self.root / f"mlflow-server-{self.port}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout  # the first start creates MLflow's tables in PostgreSQL
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        code = self.proc.poll()
        self.stop()
        raise RuntimeError(f"mlflow server on {self.backend_uri} did not become healthy "
                           f"({'exited ' + str(code) if code is not None else f'{timeout:.0f} s'}); its output:\n"
                           f"{tail(self.log)}")


@pytest.fixture
def team_server(tmp_path, postgres):
    (tmp_path / "server").mkdir()
    server = PostgresMlflowServer(tmp_path / "server", postgres.uri, tmp_path / "served")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    import ray

    ray.shutdown()


# ------------------------------------------------------------------------------ the study


def write_spec(tmp_path: Path, manifest: str) -> Path:
    spec = {
        "name": STUDY,
        "data": {"manifest": manifest},
        "grid": {"size": [{"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2, 4]},
        "recipe": {"steps": 8, "global_batch": 32, "lr": 1e-3, "zero_stage": 0, "checkpoint_every": 4,
                   "log_every": 2, "shuffle_buffer": 128, "ema_decay": 0.9},
        "eval": {"enabled": True, "every": 4, "num_samples": 64, "batch_size": 32, "sampler": "ddim",
                 "steps": 5, "features": "digits-cnn-v1"},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_failures": 1},
        "storage": str(tmp_path / "runs"),
    }
    path = tmp_path / f"{STUDY}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def check_runs(c: MlflowClient, exp) -> tuple[object, dict[str, object]]:
    """The parent and both child runs FINISHED on the server, every step and FID logged once."""
    runs = c.search_runs([exp.experiment_id])
    trials = {r.data.tags[TAG_TRIAL]: r for r in runs if r.data.tags.get(TAG_KIND) == KIND_TRIAL}
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == KIND_STUDY]
    assert sorted(trials) == ["DiT-tiny-2", "DiT-tiny-4"] and len(parents) == 1, runs
    assert parents[0].info.status == "FINISHED"
    for run in trials.values():
        assert run.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(run.info.run_id, LOSS)] == [2, 4, 6, 8]
        assert [m.step for m in c.get_metric_history(run.info.run_id, FID)] == [4, 8]
    return parents[0], trials


def check_artifacts_on_the_server(server, exp, parent, trials, study_dir: Path) -> None:
    """The server's artifact store holds every sample grid and the report; the driver's study
    folder holds no MLflow artifact store (nor tracking store) of its own."""
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    served = files_under(server.artifacts)
    for name, run in trials.items():
        base = f"{exp.experiment_id}/{run.info.run_id}/artifacts/{SAMPLES_ARTIFACT_DIR}/"
        grids = sorted(p for p in served if p.startswith(base) and p.endswith(".png"))
        assert [Path(p).name for p in grids] == ["samples_step00000004.png", "samples_step00000008.png"], served
        local = study_dir / "trials" / name / "samples" / "samples_step00000008.png"
        assert (server.artifacts / grids[-1]).read_bytes() == local.read_bytes()
    report = f"{exp.experiment_id}/{parent.info.run_id}/artifacts/{REPORT_ARTIFACT_DIR}/report.html"
    assert report in served, served
    assert (study_dir / "report" / "report.html").is_file()
    assert not (study_dir / ARTIFACTS_DIR).exists(), files_under(study_dir / ARTIFACTS_DIR)
    assert not list(study_dir.rglob("mlflow.db"))


def check_report_read_back(server, parent, out: Path) -> None:
    """A teammate's process (`ditscale report`, another process) reads the study through the server."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "report", STUDY, "--tracking-uri", server.uri,
         "--out", str(out), "--n-boot", "200"],
        cwd=out.parent, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    shown = f"ditscale report exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, shown
    assert (out / "report.html").is_file() and f"logged to MLflow run {parent.info.run_id}" in proc.stdout, shown
    html = (out / "report.html").read_text()
    assert "DiT-tiny-2" in html and "DiT-tiny-4" in html


def check_rows_in_postgres(postgres: Postgres, trials) -> None:
    """The runs, their metrics and tags are rows in PostgreSQL's tables, where the server keeps them."""
    ids = [r.info.run_id for r in trials.values()]
    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT r.status, count(*) FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id"
                    " WHERE e.name = %s GROUP BY r.status", (STUDY,))
        assert dict(cur.fetchall()) == {"FINISHED": 3}  # the study's parent run and its two cells
        cur.execute("SELECT count(*) FROM metrics WHERE key = %s AND run_uuid = ANY(%s)", (LOSS, ids))
        assert cur.fetchone()[0] == 8
        cur.execute("SELECT count(*) FROM tags WHERE key = %s AND run_uuid = ANY(%s)", (TAG_TRIAL, ids))
        assert cur.fetchone()[0] == 2


@pytest.mark.slow
def test_a_study_on_a_postgres_backed_mlflow_server_keeps_runs_in_postgres_and_artifacts_on_the_server(
        tmp_path, digits8, postgres, team_server):
    with shown_on_failure(("mlflow server log", team_server.log), ("PostgreSQL log", postgres.log)):
        spec = write_spec(tmp_path, digits8)
        # The real command, report included (no --no-report): trials, grids and report all go to the server.
        assert cli(["run", str(spec), "--tracking-uri", team_server.uri]) == 0
        c = MlflowClient(team_server.uri)
        exp = c.get_experiment_by_name(STUDY)
        parent, trials = check_runs(c, exp)
        check_artifacts_on_the_server(team_server, exp, parent, trials, tmp_path / "runs" / STUDY)
        check_report_read_back(team_server, parent, tmp_path / "teammate")
        check_rows_in_postgres(postgres, trials)
