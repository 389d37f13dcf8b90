"""What a local Ray started by ditscale exposes on the network, measured on its real sockets.

Each test runs in a fresh interpreter whose environment holds none of the suite's settings:
a library user who imports Ray before ditscale must still get a Ray that listens on
127.0.0.1 only, and must never be joined to a cluster that happens to run on the machine.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Imports Ray first (as a library user might), runs a two-worker trial, and records every
# listening socket of its whole process tree (driver, GCS, raylet, Train workers) while it trains.
TRIAL_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import ray, psutil
    from orchestrator.spec.trial import TrialConfig
    from orchestrator.trial import run_trial

    seen, stop = set(), threading.Event()
    def watch():
        me = psutil.Process()
        while not stop.is_set():
            for p in [me, *me.children(recursive=True)]:
                try:
                    for c in p.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            seen.add((p.name(), p.pid, c.laddr.ip, c.laddr.port))
                except psutil.Error:
                    pass
            time.sleep(0.3)
    threading.Thread(target=watch, daemon=True).start()
    cfg = TrialConfig(name="net", storage=sys.argv[2], workers=2, cpus_per_worker=0.5, max_failures=0,
                      train=dict(model=dict(depth=2, hidden_size=64, num_heads=4, patch_size=2), data=sys.argv[1],
                                 steps=6, global_batch=16, lr=1e-3, log_every=2, checkpoint_every=6))
    out = run_trial(cfg)
    stop.set()
    nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
    print("RESULT " + json.dumps({"status": out.status, "sockets": sorted(seen), "nodes": nodes}))
""")


def clean_env(**extra: str) -> dict[str, str]:
    """Only what a shell would have: none of the suite's RAY_* or DS_* settings."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **extra}


def run_child(args: list[str], env: dict[str, str], timeout: float) -> str:
    """Run a child interpreter; on failure the assertion shows its whole output."""
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_a_two_worker_trial_listens_on_loopback_only(tmp_path, digits8):
    script = tmp_path / "trial.py"
    script.write_text(TRIAL_SCRIPT)
    out = run_child([str(script), digits8, str(tmp_path / "runs")], clean_env(), timeout=400)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["status"] == "finished"
    assert result["nodes"] == ["127.0.0.1"]
    names = {name for name, *_ in result["sockets"]}
    assert {"gcs_server", "raylet"} <= names, result["sockets"]  # the watcher did see Ray's servers
    exposed = [s for s in result["sockets"] if s[2] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    # Known and left open: torch.distributed's rendezvous store (TCPStore, opened by rank 0 of
    # the gloo group at MASTER_ADDR:MASTER_PORT inside a Train worker, whose process title
    # changes with the task it runs) listens on every interface; torch 2.13 has no bind address
    # for it. So at most one such socket, in a Ray worker; everything else must be loopback.
    def worker(name: str) -> bool:  # a Ray worker process (not the GCS, raylet, driver or an agent)
        return name.startswith("ray::") and "Agent" not in name

    in_workers = {(pid, port) for name, pid, _, port in exposed if worker(name)}
    others = [s for s in exposed if not worker(s[0])]
    assert not others and len(in_workers) <= 1, f"listening beyond loopback: {exposed}"


@pytest.mark.slow
def test_a_ray_cluster_running_on_the_machine_is_not_joined_without_an_address(tmp_path):
    """A `ray start --head` on the machine records itself in /tmp/ray; Ray's default would join it."""
    env = clean_env()
    port = str(_free_port())
    # Its own session, so the daemons it leaves behind can be stopped without `ray stop --force`
    # (which would kill every Ray on the machine, the suite's own included).
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started, _ = head.communicate(timeout=180)
    try:
        assert head.returncode == 0, started
        probe = textwrap.dedent("""
            import ray
            from orchestrator.ray_env import ensure_ray
            assert ensure_ray(num_cpus=1) is True
            print("GCS " + ray.get_runtime_context().gcs_address)
        """)
        out = run_child(["-c", probe], env, timeout=120)
        gcs = next(line for line in out.splitlines() if line.startswith("GCS "))[4:]
        assert gcs.startswith("127.0.0.1:") and not gcs.endswith(f":{port}"), gcs
    finally:
        _kill_session(head.pid)


def _kill_session(pgid: int) -> None:
    """SIGKILL every process of process group ``pgid`` and their descendants (Ray workers)."""
    import psutil

    procs = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                procs.update((q.pid, q) for q in [p, *p.children(recursive=True)])
        except (psutil.Error, ProcessLookupError):
            pass
    for p in procs.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs.values()), timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
