"""Starting or joining Ray, and the process environment ditscale needs: the one place for both.

:func:`ensure_ray` joins the cluster the caller names (``address`` / ``$RAY_ADDRESS``) or
starts a private local Ray bound to 127.0.0.1, never a cluster it happens to find on the
machine. :func:`configure_process_env` sets ``DS_ACCELERATOR`` (DeepSpeed reads it at import);
nothing is written at import and nothing about Ray's networking leaks into the process
environment, so a ``ray start`` that a user or a test runs from this process can still join a
multi-node cluster.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Mapping

# Ray's switch for "single-node, loopback only" (meant for laptops). It is read once, when
# ray._private.ray_constants is first imported, and inherited by every `ray start` run from a
# process whose environment holds it (which then refuses to join a second node).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ACCELERATOR_ENV = "DS_ACCELERATOR"
LOOPBACK_IP = "127.0.0.1"


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
        extra = {"runtime_env": {"env_vars": dict(env_vars)}} if env_vars else {}
        ray.init(address=address, log_to_driver=log_to_driver, **extra)
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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
