"""The checkpoint folder: the one module that knows its layout.

A trial stages checkpoints as ``<root>/checkpoint_<step:08d>/`` (:func:`checkpoint_name`), each
holding::

    deepspeed/            every rank's DeepSpeed shard (DS_TAG), what resuming loads
    ema.pt                EMA_FILE: the EMA weights + buffers, a plain state dict (official DiT layout)
    trainer_state.json    CHECKPOINT_STATE: step, images_seen, seed, stream position, model config, gflops

``trainer_state.json`` is written last, so a folder is complete exactly when it exists
(:func:`is_complete`). Training writes and resumes them (:func:`save_checkpoint`,
:func:`load_checkpoint`); ``ditscale export`` copies the EMA out (:func:`export_checkpoint`);
evaluation opens one (:meth:`Checkpoint.open`) and loads its EMA model and diffusion
(:meth:`Checkpoint.load_for_eval`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dit.errors import ConfigError
from dit.files import atomic_path, atomic_write_json
from dit.models import DiT, DiTConfig, create_model, load_state_dict, model_config
from dit.train.config import TrainConfig, make_diffusion
from dit.train.ema import EMA

__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_STATE",
    "DS_TAG",
    "EMA_FILE",
    "Checkpoint",
    "CheckpointWriteError",
    "checkpoint_name",
    "eval_diffusion",
    "export_checkpoint",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "staging_dir",
    "verify_checkpoint_files",
]

CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_STATE = "trainer_state.json"
EMA_FILE = "ema.pt"
DS_TAG = "deepspeed"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable storage); earlier ones are intact."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step``."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def staging_dir(staging: Path | None, step: int) -> Path:
    """A fresh folder for the step-``step`` checkpoint under ``staging`` (a new temporary root when None)."""
    root = staging or Path(tempfile.mkdtemp(prefix="ditscale-ckpt-"))
    path = root / checkpoint_name(step)
    if path.exists():  # a leftover from a crashed attempt at the same step
        shutil.rmtree(path)
    return path


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` is a complete checkpoint (its trainer state, written last, exists)."""
    return (Path(directory) / CHECKPOINT_STATE).is_file()


def latest_checkpoint(folder: str | Path) -> Path:
    """The latest complete checkpoint in a trial folder; ConfigError when there is none."""
    folder = Path(folder)
    found = sorted(p for p in folder.glob(CHECKPOINT_PREFIX + "*") if is_complete(p))
    if not found:
        raise ConfigError(
            f"{str(folder)!r} is not a ditscale checkpoint (no {CHECKPOINT_STATE} + {EMA_FILE}) and holds no "
            f"complete {CHECKPOINT_PREFIX}* folder"
        )
    return found[-1]


# --------------------------------------------------------------------------------------------
# Training: save and resume
# --------------------------------------------------------------------------------------------


def save_checkpoint(engine, ema: EMA, directory: Path, state: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 adds the EMA and the trainer state.

    Files are written under a temporary name and the directory is complete only once
    ``trainer_state.json`` exists (written last), so a half-written checkpoint is never read.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"ditscale_step": state["step"]})
        if rank == 0:
            with atomic_path(directory / EMA_FILE) as tmp:
                torch.save(ema.state_dict(), tmp)
            atomic_write_json(directory / CHECKPOINT_STATE, state, indent=2)
    except (OSError, RuntimeError) as err:  # disk full, unwritable, quota: torch wraps some as RuntimeError
        shutil.rmtree(directory, ignore_errors=True)  # never leave a half checkpoint behind
        raise CheckpointWriteError(
            f"cannot write the step-{state['step']} checkpoint to {directory}: {err}. Earlier "
            "checkpoints are untouched; free space or fix the storage path, then resume"
        ) from err
    dist.barrier()


def _deepspeed_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its checkpoint shards pickle, besides tensors and plain types."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, every link followed, lies inside the resolved ``root``."""
    try:
        path.resolve(strict=True).relative_to(root)
    except (OSError, RuntimeError, ValueError):  # dangling link, link loop, or outside
        return False
    return True


def _refuse_outside_links(directory: Path) -> None:
    """Refuse a checkpoint any of whose files or folders resolve outside it.

    A link to elsewhere would make us verify (and DeepSpeed load) files the checkpoint does not
    own, which a later writer can swap; the walk does not follow links, each is checked."""
    root = directory.resolve(strict=True)
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            entry = Path(parent) / name
            if not _inside(entry, root):
                raise ConfigError(
                    f"checkpoint file {str(entry)!r} resolves to {os.path.realpath(entry)!r}, outside the "
                    f"checkpoint folder {str(root)!r}; refusing to resume from it. Fix: copy the real files in"
                )


def _deepspeed_files(directory: Path) -> list[Path]:
    """Every file DeepSpeed's ``load_checkpoint(directory, tag=DS_TAG)`` may ``torch.load``.

    DeepSpeed 0.19 opens, inside the tag folder only, ``mp_rank_XX_model_states.pt`` (or
    ``zero_pp_rank_N_mp_rank_XX_model_states.pt``), ``[bf16_]zero_pp_rank_N_mp_rank_XX_optim_states.pt``
    (old name: ``...XXoptim_states.pt``), ``expp_rank_*``/``*expert_*`` MoE files, and through
    ``zero_to_fp32`` any ``*model_states.pt``/``*optim_states.pt``: all of them end in ``.pt``.
    We take every ``*.pt`` there (a superset, names of future versions included)."""
    tag = directory / DS_TAG
    if not tag.is_dir():
        return []
    return sorted(p for p in tag.rglob("*.pt") if p.is_file())


def verify_checkpoint_files(directory: Path) -> None:
    """Refuse a checkpoint whose pickles hold anything but tensors, plain data and the allowlist,
    or any of whose files or folders resolve outside it (symlinks).

    DeepSpeed's own loader calls ``torch.load(weights_only=False)``; reading every file it may
    open once with ``weights_only=True`` first means a tampered shard is rejected before it
    can run code. The walk checks links first: a link out would let the verified bytes differ
    from the ones DeepSpeed loads, and ``rglob`` does not descend into linked folders at all.
    """
    directory = Path(directory)
    _refuse_outside_links(directory)
    allowed = _deepspeed_safe_globals()
    for path in [*_deepspeed_files(directory), directory / EMA_FILE]:
        if not path.is_file():
            continue  # a missing file fails DeepSpeed's own load, or ours, with its name
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path.resolve(), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(
                f"checkpoint file {str(path)!r} is not loadable with weights_only=True "
                f"({str(err).splitlines()[-1][:300]}); refusing to resume from it"
            ) from None


def load_checkpoint(engine, ema: EMA, directory: Path) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, schedule) and the EMA; returns the trainer state."""
    state_file = directory / CHECKPOINT_STATE
    if not state_file.is_file():
        raise ConfigError(f"checkpoint {str(directory)!r} is incomplete: no {CHECKPOINT_STATE}")
    verify_checkpoint_files(directory)
    load_path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG)
    if load_path is None:
        raise ConfigError(f"checkpoint {str(directory)!r} has no DeepSpeed state under {DS_TAG}/")
    ema.load_state_dict(torch.load(directory / EMA_FILE, map_location="cpu", weights_only=True))
    return json.loads(state_file.read_text())


def export_checkpoint(directory: str | Path, out: str | Path) -> Path:
    """A training checkpoint -> a plain state dict of the EMA weights (official DiT layout)."""
    src = Path(directory) / EMA_FILE
    if not src.is_file():
        raise ConfigError(f"{str(directory)!r} is not a ditscale checkpoint (no {EMA_FILE})")
    sd = torch.load(src, map_location="cpu", weights_only=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(sd, tmp)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation: the EMA model and its diffusion
# --------------------------------------------------------------------------------------------


def load_weights(model: torch.nn.Module, sd: dict[str, Any], what: str, model_name: str) -> None:
    """``model.load_state_dict(sd, strict=True)``, a mismatch told as a ConfigError about ``what``."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()][1:4]
        raise ConfigError(
            f"{what}: the weights do not fit model {model_name} ({'; '.join(lines)[:600]}); "
            "check --model and the data (latent size, channels, classes)"
        ) from None


def build_model(mcfg: DiTConfig, sd: dict[str, Any], what: str, model_name: str) -> DiT:
    """A model of ``mcfg`` holding the weights ``sd``, in eval mode without gradients. It is built
    under ``fork_rng``: loading weights never moves the global RNG."""
    with torch.random.fork_rng():
        net = create_model(mcfg)
    load_weights(net, sd, what, model_name)
    return net.eval().requires_grad_(False)


def eval_diffusion(model: Any, train: TrainConfig | None = None):
    """The diffusion ``model`` was trained with: ``train``'s steps and schedule (the paper's 1000
    linear steps without one), the model's own ``learn_sigma``."""
    return make_diffusion(train, learn_sigma=model.learn_sigma)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder, opened for its EMA model (see the module docstring)."""

    path: Path
    state: dict[str, Any]
    model_config: DiTConfig

    @property
    def step(self) -> int | None:
        return self.state.get("step")

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """``path``: a checkpoint folder, or a trial folder (its latest complete checkpoint)."""
        path = Path(path).expanduser()
        if not is_complete(path):
            path = latest_checkpoint(path)
        if not (path / EMA_FILE).is_file():
            raise ConfigError(f"{str(path)!r} is not a ditscale checkpoint (no {EMA_FILE})")
        try:
            state = json.loads((path / CHECKPOINT_STATE).read_text())
            mcfg = model_config(state["model"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{str(path)!r}: unreadable {CHECKPOINT_STATE} ({err})") from None
        return cls(path, state, mcfg)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights, read with ``weights_only=True``."""
        return load_state_dict(self.path / EMA_FILE)

    def load_model(self, name: str) -> DiT:
        """The EMA model (CPU, eval mode, no gradients); ``name`` is how errors call it."""
        return build_model(self.model_config, self.ema_state_dict(), str(self.path), name)

    def load_for_eval(self, name: str, train: TrainConfig | None = None) -> tuple[DiT, Any]:
        """(the EMA model, its training diffusion) for evaluation; ``train``: the recipe it was
        trained with, for the diffusion's steps and schedule (default the paper's)."""
        model = self.load_model(name)
        return model, eval_diffusion(model, train)
