"""The MLflow client every part of ditscale uses, and the one place MLflow's HTTP settings are set.

MLflow reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` from the
environment at every request. ditscale fails fast (no retries inside MLflow, 10 s a request)
because its writers retry with their own backoff (``orchestrator.tracking.retry``), which is
what decides how long an outage may last; the readers (``analysis.runs``, ``analysis.report``)
get the same settings, so a report never hangs on a server that is down. A value already in
the environment (the user's) wins. The settings are written when a client is made, never at
import.
"""

from __future__ import annotations

import os

HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def configure_mlflow_http() -> None:
    """Put ditscale's MLflow HTTP settings in this process's environment (the user's win)."""
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


def client(uri: str):
    """An ``MlflowClient`` for ``uri``, with ditscale's HTTP settings in force."""
    from mlflow.tracking import MlflowClient

    configure_mlflow_http()
    return MlflowClient(tracking_uri=uri)
