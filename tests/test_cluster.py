"""ditscale against a real `ray start` cluster on this machine (nodes on 127.0.0.1, no mocks).

Every Ray here is started by the test in its own process group, with its own temp dir and
HOME (so ~/.ray/auth_token is the test's own), from an environment a user's shell would have:
none of the suite's RAY_* settings, above all not RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, which
keeps `ray start` single-node. Teardown kills exactly those processes: `ray stop` would kill
every Ray on the machine, another test's or user's included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`

# A driver that joins the cluster through ensure_ray and says what it sees.
JOIN_SCRIPT = textwrap.dedent("""
    import sys, ray
    from dit.errors import ConfigError
    from orchestrator.ray_env import ensure_ray
    try:
        assert ensure_ray(address=sys.argv[1]) is False
    except ConfigError as err:
        print(f"CONFIG_ERROR {err}")
        sys.exit(2)
    print(f"CPUS {ray.cluster_resources()['CPU']}")
    print(f"TASK {ray.get(ray.remote(lambda: 'ran').remote())}")
""")


WAIT_SCRIPT = textwrap.dedent("""
    import sys, time, ray
    address, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ray.init(address=address)
    deadline = time.time() + timeout
    while sum(node["Alive"] for node in ray.nodes()) < n:
        assert time.time() < deadline, f"{n} nodes not alive in {timeout:.0f} s: {ray.nodes()}"
        time.sleep(0.5)
""")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """What a user's shell would have, with ``home`` as HOME."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT),
            "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """A child process; its output goes into every assertion message about it."""
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    proc.shown = f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


class RayCluster:
    """Nodes started with `ray start` on 127.0.0.1, one CPU each, under one short private root.

    The root is short because Ray's unix sockets live under it (paths over 107 bytes fail).
    """

    def __init__(self, env: dict[str, str], token: str = "") -> None:
        self.env, self.token, self.port = env, token, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.groups: list[int] = []  # one process group per `ray start`

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def node_dir(self, i: int) -> Path:
        return self.root / f"n{i}"

    def start_head(self) -> None:
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false"])

    def add_node(self, **env: str) -> None:
        """A second node; in a token cluster it needs RAY_AUTH_MODE=token (Ray's non-head
        `ray start` does not turn token mode on from ~/.ray/auth_token as the head does)."""
        self._start([f"--address={self.address}"], **env)

    def _start(self, args: list[str], **env: str) -> None:
        node = self.node_dir(len(self.groups))
        cmd = [str(BIN / "ray"), "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
               f"--temp-dir={node}", "--disable-usage-stats"]
        # Its own session: the daemons it leaves behind keep this process group.
        proc = subprocess.Popen(cmd, env={**self.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        self.groups.append(proc.pid)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out}"

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        """Until ``n`` nodes are alive, asked by a client that sets RAY_AUTH_MODE=token itself
        (Ray's documented way), so this wait does not lean on ditscale's token handling."""
        proc = run([sys.executable, "-c", WAIT_SCRIPT, self.address, str(n), str(timeout)],
                   {**self.env, "RAY_AUTH_MODE": "token"}, timeout=timeout + 120)
        assert proc.returncode == 0, proc.shown

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: its groups' members and all their descendants
        (Ray workers retitle themselves, so they are found by parentage, not by name)."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in self.groups:
                    found.update((p.pid, p) for p in [proc, *proc.children(recursive=True)])
            except (psutil.Error, ProcessLookupError):
                pass
        return [p for p in found.values() if _alive(p)]

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(proc: psutil.Process) -> bool:
    """Running, not a killed process waiting for init to reap it."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def write_spec(tmp_path: Path, manifest: str) -> Path:
    """Two tiny cells (patch 2 and 4), one worker of one CPU each: one cell per node."""
    spec = {
        "name": "duo",
        "data": {"manifest": manifest},
        "grid": {"size": [{"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2, 4]},
        "recipe": {"steps": 8, "global_batch": 32, "lr": 1e-3, "zero_stage": 0, "checkpoint_every": 4,
                   "log_every": 2, "shuffle_buffer": 128, "ema_decay": 0.9},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "storage": str(tmp_path / "runs"),
    }
    path = tmp_path / "duo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def cluster(home):
    """A one-node token cluster (head only); tests add nodes. Stopped whatever happens."""
    env = clean_env(home)
    made = run([str(BIN / "ray"), "get-auth-token", "--generate"], env, timeout=120)
    assert made.returncode == 0, made.shown
    # `ray start --head` turns token auth on only when a token exists: make it first.
    c = RayCluster(env, token=(home / ".ray" / "auth_token").read_text().strip())
    try:
        c.start_head()
        yield c
    finally:
        c.stop()
        assert c.processes() == [], "a Ray process of the test's cluster outlived its teardown"


def assert_secret_kept(proc: subprocess.CompletedProcess, token: str) -> None:
    assert token not in proc.stdout + proc.stderr, "the Ray token was printed"


@pytest.mark.slow
def test_a_token_cluster_is_joined_without_ray_auth_mode(cluster, home, tmp_path):
    """`ray start` turns token auth on when ~/.ray/auth_token exists; the driver sends it unasked."""
    env = clean_env(home)
    assert "RAY_AUTH_MODE" not in env
    joined = run([sys.executable, "-c", JOIN_SCRIPT, cluster.address], env)
    assert joined.returncode == 0, joined.shown
    assert "CPUS 1.0" in joined.stdout and "TASK ran" in joined.stdout, joined.shown
    assert_secret_kept(joined, cluster.token)

    # The token kept elsewhere, named by RAY_AUTH_TOKEN_PATH (this HOME has none).
    elsewhere = tmp_path / "token"
    shutil.copy(home / ".ray" / "auth_token", elsewhere)
    other_home = tmp_path / "other-home"
    other_home.mkdir()
    joined = run([sys.executable, "-c", JOIN_SCRIPT, cluster.address],
                 clean_env(other_home, RAY_AUTH_TOKEN_PATH=str(elsewhere)))
    assert joined.returncode == 0 and "TASK ran" in joined.stdout, joined.shown


@pytest.mark.slow
def test_a_wrong_ray_token_is_one_line_saying_what_to_set(cluster, home, tmp_path, digits8):
    """`ditscale run --address` with a token the cluster refuses: exit 2, one line, no token."""
    spec = write_spec(tmp_path, digits8)
    wrong = "0" * len(cluster.token)
    # Fewer GCS connection retries than Ray's 20 (one a second): the same failure, sooner.
    env = clean_env(home, RAY_AUTH_TOKEN=wrong, RAY_gcs_server_port_wait_time_s="3")
    proc = run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--address", cluster.address,
                "--no-report"], env)
    assert proc.returncode == 2, proc.shown
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ditscale run: error: the Ray cluster at 127.0.0.1:"), proc.shown
    assert "refused the token in $RAY_AUTH_TOKEN" in last and "RAY_AUTH_TOKEN_PATH=FILE" in last, proc.shown
    assert "Traceback" not in proc.stderr, proc.shown
    assert wrong not in proc.stdout + proc.stderr
    assert_secret_kept(proc, cluster.token)

    # No token at all (an empty HOME): the line says none was found.
    bare = tmp_path / "bare-home"
    bare.mkdir()
    proc = run([sys.executable, "-c", JOIN_SCRIPT, cluster.address],
               clean_env(bare, RAY_gcs_server_port_wait_time_s="3"))
    assert proc.returncode == 2, proc.shown
    assert "CONFIG_ERROR the Ray cluster at" in proc.stdout and "none was found" in proc.stdout, proc.shown



def train_workers_per_node(cluster: RayCluster, nodes: int) -> list[int]:
    """How many Ray Train workers each node ran, from that node's own log folder (every node
    keeps the logs of the workers its raylet started; a worker's log names its actor class)."""
    counts = []
    for n in range(nodes):
        logs = cluster.node_dir(n) / "session_latest" / "logs"
        counts.append(sum(":actor_name:RayTrainWorker" in f.read_text(errors="replace")
                          for f in logs.glob("worker-*.out")))
    return counts


def assert_study_folder_complete(study: Path, cells: list[str]) -> None:
    """Everything a study keeps is in its folder on the shared storage."""
    from mlflow.tracking import MlflowClient

    assert {"study.json", "spec.yaml", "mlflow.db"} <= {p.name for p in study.iterdir()}
    for cell in cells:
        trial = study / "trials" / cell
        assert json.loads((trial / "outcome.json").read_text())["status"] == "finished", cell
        rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows][-1] == 8, rows
        assert (trial / "checkpoint_00000008" / "trainer_state.json").is_file(), sorted(trial.iterdir())
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("duo").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * (len(cells) + 1)  # + the study's run


@pytest.mark.slow
def test_a_study_runs_on_a_two_node_cluster(cluster, home, tmp_path, digits8):
    """`ditscale run --address` joins a two-node token cluster (the driver with no RAY_AUTH_MODE)
    and its two one-CPU cells run at once, one on each one-CPU node."""
    cluster.add_node(RAY_AUTH_MODE="token")
    cluster.wait_for_nodes(2)
    spec = write_spec(tmp_path, digits8)
    proc = run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--address", cluster.address,
                "--no-report"], clean_env(home), timeout=900)
    assert proc.returncode == 0, proc.shown
    assert "Connected to Ray cluster" in proc.stderr, proc.shown
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr, proc.shown  # it joined
    assert train_workers_per_node(cluster, 2) == [1, 1], proc.shown
    assert_study_folder_complete(tmp_path / "runs" / "duo", ["DiT-tiny-2", "DiT-tiny-4"])
    assert_secret_kept(proc, cluster.token)
