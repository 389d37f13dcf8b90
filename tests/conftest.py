import os

# DeepSpeed probes for an accelerator at import; on CPU machines say so up front.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Any Ray that the tests start binds to loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
