"""Starting or joining Ray, and the process environment ditscale needs: the one place for both.

:func:`ensure_ray` joins the cluster the caller names (``address`` / ``$RAY_ADDRESS``) or
starts a private local Ray bound to 127.0.0.1, never a cluster it happens to find on the
machine. Joining a cluster sends the Ray token this machine holds (token authentication is
Ray 2.60's default), and a refused token is one :class:`ConfigError` naming what to set.
:func:`configure_process_env` sets ``DS_ACCELERATOR`` (DeepSpeed reads it at import);
nothing is written at import and nothing about Ray's networking leaks into the process
environment, so a ``ray start`` that a user or a test runs from this process can still join a
multi-node cluster (joining one with a token sets ``RAY_AUTH_MODE=token``, which such a
``ray start`` needs as well).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from dit.errors import ConfigError

# Ray's switch for "single-node, loopback only" (meant for laptops). It is read once, when
# ray._private.ray_constants is first imported, and inherited by every `ray start` run from a
# process whose environment holds it (which then refuses to join a second node).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ACCELERATOR_ENV = "DS_ACCELERATOR"
LOOPBACK_IP = "127.0.0.1"
# Ray's token authentication: the mode switch, and where a client finds its token (in this
# order: the variable, the file the path variable names, ~/.ray/auth_token).
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# How Ray reports a missing or wrong token (only inside the text of a chained RuntimeError).
_AUTH_FAILURE_MARKS = ("InvalidAuthToken", "AuthenticationError", "Unauthenticated")


def configure_process_env(*, accelerator: str | None = None) -> None:
    """Set DeepSpeed's ``DS_ACCELERATOR`` (``cpu`` or ``cuda``) unless the user did."""
    if accelerator is not None:
        os.environ.setdefault(ACCELERATOR_ENV, accelerator)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray starts: every server it starts listens on 127.0.0.1 only.

    Ray picks the address its GCS, raylet and workers bind from ``ENABLE_RAY_CLUSTER``, a
    constant computed from LOOPBACK_ENV when Ray is first imported; ``_node_ip_address`` alone
    still leaves them on all interfaces (measured: ``::`` and the external IP). So the constant
    is switched off for the start, whether or not Ray was imported before us, and the variable
    is set for the processes the start spawns (they inherit it); both are restored after.
    """
    import ray._private.ray_constants as constants

    saved_env, saved_const = os.environ.get(LOOPBACK_ENV), constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    log_to_driver: bool = False,
    env_vars: Mapping[str, str] | None = None,
    export_accelerator: bool = False,
    logging_level: str | None = None,
) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS``, or start a private local Ray bound to 127.0.0.1.

    Nothing happens when Ray is already up in this process. Returns True when this call
    started a local Ray (its caller may shut it down), False otherwise. Without an address a
    new local Ray is started (``address="local"``): Ray's own default would silently join any
    cluster recorded in /tmp/ray, such as one another process started.

    ``log_to_driver``: print the workers' output here. ``env_vars``: environment of every
    process of the job (``runtime_env``), on a cluster too. ``export_accelerator``: a local
    Ray also gets ``DS_ACCELERATOR`` (the user's, else ``cuda`` when torch sees a GPU, else
    ``cpu``), set here as well. ``logging_level`` goes to a local ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _join(address, log_to_driver, env_vars)
        return False
    job_env = dict(env_vars or {})
    if export_accelerator:
        configure_process_env(accelerator="cuda" if _has_cuda() else "cpu")
        job_env = {ACCELERATOR_ENV: os.environ[ACCELERATOR_ENV], **job_env}
    kwargs: dict = {"address": "local", "num_cpus": num_cpus or os.cpu_count() or 1,
                    "include_dashboard": False, "log_to_driver": log_to_driver,
                    "_node_ip_address": LOOPBACK_IP}
    if job_env:
        kwargs["runtime_env"] = {"env_vars": job_env}
    if logging_level:
        kwargs["logging_level"] = logging_level
    with _loopback_only():
        ray.init(**kwargs)
    return True


def _join(address: str, log_to_driver: bool, env_vars: Mapping[str, str] | None) -> None:
    """``ray.init(address)`` with this machine's token; a refused token is a ConfigError."""
    import ray
    from ray.exceptions import AuthenticationError

    _send_token_if_available()
    extra = {"runtime_env": {"env_vars": dict(env_vars)}} if env_vars else {}
    try:
        ray.init(address=address, log_to_driver=log_to_driver, **extra)
    except (ConnectionError, RuntimeError, AuthenticationError) as err:
        if not _is_auth_failure(err):
            raise
        raise ConfigError(_auth_advice(address)) from None


def _send_token_if_available() -> None:
    """Turn on token mode for this process when a token is at hand and the user set no mode.

    Ray sends its token only in token mode, and turns that on by itself only for
    ``address="auto"``, never for an explicit address: a ``ray start`` cluster (which enables
    tokens whenever ~/.ray/auth_token exists) refuses ``--address HOST:PORT`` without it.
    The mode goes in ``os.environ`` for the whole process, as Ray's own "auto" path does, not
    just around ``ray.init``: the driver keeps opening connections after it joined (to raylets
    for every task lease, new GCS clients), each made in the mode of that moment. Measured:
    with the mode put back after ``ray.init``, the driver's first remote task failed
    (LocalRayletDiedError). Children (a ``ray`` command it runs) inherit it too. A local Ray
    is in token mode anyway, so this changes nothing there.
    """
    if os.environ.get(AUTH_MODE_ENV) is not None or not _has_token():  # the user's mode wins
        return
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")  # re-read the environment: Ray cached the mode ("disabled") at import


def _has_token() -> bool:
    """Whether Ray finds a token here, by its own lookup (the token itself is never read here)."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the variables may have changed since Ray last looked
    try:
        return loader.has_token(ignore_auth_mode=True)
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise ConfigError(f"{TOKEN_PATH_ENV}={os.environ.get(TOKEN_PATH_ENV)}: no such file, or it is empty; "
                          "point it at the file holding the cluster's Ray token, or unset it") from None


def _is_auth_failure(err: BaseException) -> bool:
    """Whether a failed ``ray.init`` was the cluster refusing us (no token, or a wrong one)."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, AuthenticationError) or any(m in str(seen) for m in _AUTH_FAILURE_MARKS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _auth_advice(address: str) -> str:
    """One line: why the cluster refused us and exactly what to set (never the token itself)."""
    fix = (f"put the cluster's token (`ray get-auth-token` on its head node prints it) in ~/.ray/auth_token, "
           f"or set {TOKEN_PATH_ENV}=FILE or {TOKEN_ENV}=TOKEN")
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        return (f"the Ray cluster at {address} requires a token but {AUTH_MODE_ENV}={mode} here: unset "
                f"{AUTH_MODE_ENV} and {fix}")
    if mode is None:  # we found no token to send
        return f"the Ray cluster at {address} requires a token and none was found: {fix}"
    if _has_token():
        return f"the Ray cluster at {address} refused the token in {_token_source()}: {fix}"
    return f"{AUTH_MODE_ENV}=token here but no Ray token was found for the cluster at {address}: {fix}"


def _token_source() -> str:
    """Where Ray took the token from, in its order of lookup (names only, never the value)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return f"${TOKEN_ENV}"
    if os.environ.get(TOKEN_PATH_ENV):
        return f"{os.environ[TOKEN_PATH_ENV]} (${TOKEN_PATH_ENV})"
    return str(Path.home() / ".ray" / "auth_token")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
