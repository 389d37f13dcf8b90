"""The MLflow client every part of ditscale uses, and the one place MLflow's HTTP settings are set.

MLflow reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` from the
environment at every request. ditscale fails fast (no retries inside MLflow, 10 s a request)
because its writers retry with their own backoff (``orchestrator.tracking.retry``), which is
what decides how long an outage may last; the readers (``analysis.runs``, ``analysis.report``)
get the same settings, so a report never hangs on a server that is down. A value already in
the environment (the user's) wins. The settings are written when a client is made, never at
import.

Also here: :func:`is_server` (a tracking server, which has an artifact store of its own, or a
store opened directly), :func:`redact_uri` (every URI ditscale prints or stores goes through it,
so a password in ``http://user:secret@host`` never reaches a file, a log or an artifact) and
:func:`mlflow_env` (what a trial on another node needs to reach the same server).
"""

from __future__ import annotations

import os
import re
from typing import Any

# The artifact progress bar is off: a report downloads one sample grid per cell, and a bar per
# file buries the report's own output (and fills non-TTY logs).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def configure_mlflow_http() -> None:
    """Put ditscale's MLflow HTTP settings in this process's environment (the user's win)."""
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


def client(uri: str):
    """An ``MlflowClient`` for ``uri``, with ditscale's HTTP settings in force."""
    from mlflow.tracking import MlflowClient

    configure_mlflow_http()
    if redact_uri(uri) != uri:
        # MLflow prints "View run at: <tracking URI>/#/..." when a run ends, password included.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------------------------------
# Which kind of store a URI names
# ------------------------------------------------------------------------------------------

# Stores the client opens itself (no server in between): a folder, a sqlite file, a SQL database.
_DIRECT_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql"}


def is_server(uri: str) -> bool:
    """True when ``uri`` names a tracking server (http, https, databricks, ...) rather than a
    store this process opens itself; only a server has an artifact store of its own."""
    if uri.lower() in ("databricks", "databricks-uc"):  # MLflow's names for the default profile
        return True
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", uri)  # two letters at least: a drive letter is a path
    return bool(m) and m[1].split("+", 1)[0].lower() not in _DIRECT_SCHEMES


# ------------------------------------------------------------------------------------------
# Secrets: never printed, never stored
# ------------------------------------------------------------------------------------------

REDACTED = "***"
# A URL anywhere in a text: scheme, netloc (may hold user:password@), then path?query#fragment.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^/?#\s'\"<>]*)(?P<rest>[^\s'\"<>]*)")
# Query parameters whose value is a credential: tokens, API keys, presigned-URL signatures.
_SECRET_PARAM = re.compile(r"token|secret|passw|pwd|key|sig|credential|auth", re.IGNORECASE)


def redact_uri(uri: str) -> str:
    """``uri`` (or any text holding URIs) with each password and credential-like query value
    replaced by ``***``; the user name, host and path stay so the store is still recognisable."""
    return _URL.sub(_redact_match, uri)


def redact_json(value: Any) -> Any:
    """A copy of a JSON-like value with :func:`redact_uri` applied to every string in it."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {k: redact_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_json(v) for v in value]
    return value


def _redact_match(m: re.Match) -> str:
    netloc, rest = m["netloc"], m["rest"]
    userinfo, at, host = netloc.rpartition("@")  # rpartition: a password may hold an unescaped '@'
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    path, q, tail = rest.partition("?")
    if q:
        query, hash_, fragment = tail.partition("#")
        rest = path + q + "&".join(_redact_param(p) for p in query.split("&")) + hash_ + fragment
    return m["scheme"] + netloc + rest


def _redact_param(param: str) -> str:
    name, eq, value = param.partition("=")
    return f"{name}={REDACTED}" if eq and value and _SECRET_PARAM.search(name) else param


# ------------------------------------------------------------------------------------------
# What a process on another node needs to reach the same store
# ------------------------------------------------------------------------------------------

# Forwarded by name, each for a reason:
FORWARDED_ENV = (
    # The default store of any MLflow call that names none (ditscale's own calls always name it).
    "MLFLOW_TRACKING_URI",
    # Basic auth (`mlflow server --app-name basic-auth`), a bearer token (a proxy in front of the
    # server), or a request-auth plugin by name: without them every request is refused (401).
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_AUTH",
    # TLS: a self-signed or private-CA server, and mutual TLS. Paths must exist on every node
    # (the README asks for the same environment everywhere).
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    # The user's HTTP settings win over ditscale's on every node, as on the driver.
    *HTTP_SETTINGS,
    # An experiment whose artifact root is an s3:// bucket the client writes directly (a server
    # without --serve-artifacts): the endpoint (MinIO, Ceph) and its options.
    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS", "MLFLOW_S3_UPLOAD_EXTRA_ARGS",
    # The same for gs:// and wasbs:// artifact roots, and databricks:// tracking URIs.
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCESS_KEY",
    "DATABRICKS_HOST", "DATABRICKS_TOKEN",
)
# boto3's credentials, region, profile and endpoint for s3:// artifact roots.
FORWARDED_PREFIXES = ("AWS_",)
# Deliberately not forwarded: MLFLOW_RUN_ID, MLFLOW_EXPERIMENT_ID and MLFLOW_EXPERIMENT_NAME name
# the driver's run and experiment; a trial that inherited them would send any default-run logging
# into the study's run instead of its own.


def mlflow_env(tracking_uri: str | None = None) -> dict[str, str]:
    """The variables of this process's environment that a process on another node needs to reach
    the same tracking server and artifact store (for a Ray job's ``runtime_env`` ``env_vars``).

    ``tracking_uri`` (the study's) replaces MLFLOW_TRACKING_URI, so a remote default store is the
    study's even when the environment names another one."""
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env
