"""The distributed layer: Ray scheduling, MLflow tracking and the ``ditscale`` command."""

import os

# Ray reads this when it is imported: without it a local Ray binds the machine's external
# interface. Any Ray that ditscale starts itself stays on 127.0.0.1 (a cluster is joined by
# address instead). Set here because orchestrator is the only package that imports Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
