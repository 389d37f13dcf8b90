import os

# DeepSpeed probes for an accelerator at import; on CPU machines say so up front.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402

# Any Ray the tests start binds to loopback through orchestrator.ray_env.ensure_ray itself:
# nothing here sets Ray's environment (tests/test_network.py checks the sockets without it).


@pytest.fixture(scope="session")
def digits8(tmp_path_factory):
    """The built-in digits data set as 8x8 pixel 'latents': 1,797 samples in 16 shards."""
    from dit.evaluate.features import digits_feature_nets
    from dit.latents import make_digits, write_shards
    from dit.vae import IdentityCodec

    out = tmp_path_factory.mktemp("digits8")
    write_shards(make_digits(8), IdentityCodec(), out, feature_nets=digits_feature_nets)
    return str(out / "manifest.json")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; stop/start keep its data."""

    def __init__(self, root, port=None, artifacts=None, serve_artifacts=False):
        self.root, self.port, self.proc = root, port or free_port(), None
        # Where the server keeps the artifacts it proxies (mlflow-artifacts:/ URIs).
        self.artifacts = artifacts or root / "artifacts"
        self.serve_artifacts = serve_artifacts

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "MlflowServer":
        import subprocess
        import sys
        import time
        import urllib.request

        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
               "--artifacts-destination", str(self.artifacts)]
        if self.serve_artifacts:
            cmd.append("--serve-artifacts")
        self.log = self.root / f"mlflow-server-{self.port}.log"
        with open(self.log, "ab") as log:  # shown when the server does not come up
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=1)
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not become healthy in {timeout:.0f} s; its output:\n"
                           f"{self.log.read_text(errors='replace')[-6000:]}")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_artifact_server(tmp_path):
    """A real `mlflow server --serve-artifacts`, its artifacts in ``tmp_path/served`` (``.artifacts``)
    apart from anything a client writes on its side."""
    server = MlflowServer(tmp_path / "server", artifacts=tmp_path / "served", serve_artifacts=True)
    server.root.mkdir()
    server.start()
    yield server
    server.stop()
