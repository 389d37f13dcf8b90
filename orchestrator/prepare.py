"""Data preparation's engine: encoding a data set into WebDataset latent shards on Ray.

Encoding fans out over Ray: one encoder actor per GPU when the cluster has GPUs, else one per
CPU, each loading the codec once and writing whole shards (the assignment of inputs to shards
is fixed, so any actor writes the same bytes). With an address (or ``RAY_ADDRESS``) the job
joins that cluster (the inputs and the output folder must then be on storage every node
sees); otherwise a private local Ray instance is started, bound to 127.0.0.1, and shut down
at the end. The command, ``ditscale prepare``, is ``orchestrator.cli.prepare``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dit.errors import ConfigError
from orchestrator.ray_env import ensure_ray


class _ShardEncoder:
    """Ray actor body: loads the codec once, writes whole shards."""

    def __init__(self, job: Any, device: str, threads: int) -> None:
        import torch

        from dit.vae import load_codec

        torch.set_num_threads(max(1, threads))
        if getattr(job.source, "parallel_load", False):
            job.load_threads = max(1, threads)  # image decoding threads
        self.job = job
        self.codec = load_codec(job.encoder["id"], **job.encoder, device=device)

    def write(self, j: int) -> dict[str, Any]:
        return self.job.write_shard(j, self.codec)


def print_progress(done: int, total: int, rec: dict[str, Any], t0: float) -> None:
    """One line per written shard: its samples, skipped inputs and the rate since ``t0``."""
    rate = f"{done / max(time.time() - t0, 1e-9):.2f} shards/s"
    extra = f", {len(rec['skipped'])} inputs skipped" if rec["skipped"] else ""
    print(f"  [{done}/{total}] {rec['name']}: {rec['count']} samples{extra} ({rate})", flush=True)


def encode_on_ray(job: Any, *, address: str | None = None, num_cpus: int | None = None) -> None:
    """Write every pending shard of ``job`` (``dit.latents.begin_prepare``) with Ray encoder actors.

    ``num_cpus``: CPUs of the local Ray instance, or at most that many CPU actors on a cluster.
    """
    started = ensure_ray(address, num_cpus, log_to_driver=True, logging_level="WARNING")
    import ray

    try:
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        if num_cpus and not started:
            cpus = min(cpus, num_cpus)
        if gpus:
            per = max(1, min(8, cpus // gpus))
            n, opts, device, threads = min(gpus, len(job.pending)), {"num_gpus": 1, "num_cpus": per}, "cuda", per
        else:
            n, opts, device, threads = min(cpus, len(job.pending)), {"num_cpus": 1}, "cpu", 1
        print(f"encoding {len(job.pending)} shards with {n} Ray {'GPU' if gpus else 'CPU'} actor(s)", flush=True)
        _run_actors(job, ray.remote(**opts)(_ShardEncoder), n, device, threads)
    finally:
        if started:
            ray.shutdown()


def _run_actors(job: Any, actor_cls: Any, n: int, device: str, threads: int) -> None:
    import ray
    from ray.util import ActorPool

    job_ref = ray.put(job)
    actors = [actor_cls.remote(job_ref, device, threads) for _ in range(n)]
    t0 = time.time()
    try:
        pool = ActorPool(actors)
        for done, rec in enumerate(pool.map_unordered(lambda a, j: a.write.remote(j), list(job.pending)), 1):
            print_progress(done, len(job.pending), rec, t0)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
    finally:
        for a in actors:
            ray.kill(a)


RANDOM_LATENTS_SAMPLES = 4096


def prepare_builtin(name: str, out_dir: Path, image_size: int, *, channels: int = 4, num_classes: int = 10,
                    samples: int | None = None) -> None:
    """Write a built-in data set (values as latents, identity codec) in this process: no Ray.

    ``digits``: scikit-learn's digits at ``image_size`` px. ``random-latents``: ``samples``
    synthetic latents of ``channels`` x ``image_size`` x ``image_size`` in ``num_classes``
    classes (:class:`dit.latents.RandomLatentsSource`). Both get the small CNN that
    ``eval.features: digits-cnn-v1`` uses, trained on them, so in-loop FID needs no download.
    """
    from dit.evaluate.features import digits_feature_nets
    from dit.latents import RandomLatentsSource, begin_prepare, make_digits
    from dit.vae import IdentityCodec

    if name == "random-latents":
        source = RandomLatentsSource(samples or RANDOM_LATENTS_SAMPLES, channels=channels, size=image_size,
                                     num_classes=num_classes)
    else:
        source = make_digits(image_size)
    print(f"preparing the built-in {name} data set at {image_size} px into {out_dir}", flush=True)
    codec = IdentityCodec()
    job = begin_prepare(source, codec, out_dir, feature_nets=digits_feature_nets)
    job.run_local(codec, None)
    job.finish()
