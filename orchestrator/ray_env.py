"""Starting or joining Ray, and the process environment Ray needs: the one place for both.

:func:`configure_process_env` writes the environment variables ditscale relies on, and is the
only code in ``orchestrator`` that writes ``os.environ`` for Ray. Ray reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported, so the call must come before the
first ``import ray``: the ``ditscale`` command makes it first thing in ``main()``, and
:func:`ensure_ray` makes it again before it imports Ray, for code that uses the library
without the command (``run_study``, ``run_trial`` and ``ditscale prepare``'s engine all start
Ray through :func:`ensure_ray`). Nothing is written at import.
"""

from __future__ import annotations

import os
from typing import Mapping

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ACCELERATOR_ENV = "DS_ACCELERATOR"


def configure_process_env(*, accelerator: str | None = None) -> None:
    """Set what this process (and the local Ray it may start, which inherits it) needs.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: without it a local Ray binds the machine's
    external interface; with it any Ray that ditscale starts itself stays on 127.0.0.1 (a
    cluster is joined by address instead). ``accelerator``: DeepSpeed's ``DS_ACCELERATOR``
    (``cpu`` or ``cuda``). Values already in the environment (the user's) win.
    """
    os.environ.setdefault(LOOPBACK_ENV, "0")
    if accelerator is not None:
        os.environ.setdefault(ACCELERATOR_ENV, accelerator)


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    log_to_driver: bool = False,
    env_vars: Mapping[str, str] | None = None,
    export_accelerator: bool = False,
    node_ip_address: str | None = None,
    logging_level: str | None = None,
) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS``, or start a private local Ray bound to 127.0.0.1.

    Nothing happens when Ray is already up in this process. Returns True when this call
    started a local Ray (its caller may shut it down), False otherwise.

    ``log_to_driver``: print the workers' output here. ``env_vars``: environment of every
    process of the job (``runtime_env``), on a cluster too. ``export_accelerator``: a local
    Ray also gets ``DS_ACCELERATOR`` (the user's, else ``cuda`` when torch sees a GPU, else
    ``cpu``), set here as well. ``node_ip_address`` and ``logging_level`` go to a local
    ``ray.init`` as ``_node_ip_address`` and ``logging_level``.
    """
    configure_process_env()
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
    kwargs: dict = {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False,
                    "log_to_driver": log_to_driver}
    if job_env:
        kwargs["runtime_env"] = {"env_vars": job_env}
    if node_ip_address:
        kwargs["_node_ip_address"] = node_ip_address
    if logging_level:
        kwargs["logging_level"] = logging_level
    ray.init(**kwargs)
    return True


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
