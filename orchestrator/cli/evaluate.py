"""``ditscale evaluate CHECKPOINT``: FID (and friends) of saved weights, outside a study.

CHECKPOINT is a ditscale checkpoint folder (``ema.pt`` + ``trainer_state.json``: the model
config comes with it), a trial folder (its latest complete ``checkpoint_*``), or a plain
state-dict ``.pt`` file (an official DiT checkpoint or a ``ditscale export``; the model comes
from ``--model`` or the spec's cell). The data, the diffusion and the evaluation settings
come from a study spec's cell (``--spec``, ``--cell``; the cell is found from the checkpoint's
path when it lies in the study's trials/ folder), else from ``--data`` and the defaults;
flags override single settings. One process: on a GPU when there is one.

    ditscale evaluate runs/demo/trials/xs-p4/checkpoint_00000800 --spec studies/demo.yaml
    ditscale evaluate DiT-XL-2-256x256.pt --model DiT-XL/2 --spec studies/dit_paper_256.yaml \\
        --cell XL-2 --num-samples 10000 --cfg-scale 1.5 --json
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from dit.errors import ConfigError

# flag -> EvalConfig field
OVERRIDES = {
    "num_samples": "num_samples", "batch_size": "batch_size", "sampler": "sampler", "steps": "steps",
    "eta": "eta", "cfg_scale": "cfg_scale", "cfg_channels": "cfg_channels", "labels": "labels",
    "features": "features", "feature_weights": "feature_weights", "reference": "reference", "seed": "seed",
    "precision_recall": "precision_recall", "inception_score": "inception_score",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (ema.pt + trainer_state.json), trial folder, or .pt state dict")
    parser.add_argument("--spec", help="study spec: data, diffusion and eval settings of a cell")
    parser.add_argument("--cell", help="the spec's cell (default: from the checkpoint's path, or the only cell)")
    parser.add_argument("--data", help="latent manifest (instead of, or overriding, the spec's data)")
    parser.add_argument("--model", help="model of a .pt state dict, e.g. DiT-XL/2 (default: the cell's)")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"])
    parser.add_argument("--steps", type=int, help="respaced sampling steps")
    parser.add_argument("--eta", type=float)
    parser.add_argument("--cfg-scale", type=float)
    parser.add_argument("--cfg-channels", choices=["all", "first3"])
    parser.add_argument("--labels", choices=["balanced", "uniform"])
    parser.add_argument("--features", help="feature extractor (inception-v3-tf, digits-cnn-v1, module:factory)")
    parser.add_argument("--feature-weights")
    parser.add_argument("--reference", help="reference statistics .npz or a manifest")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--precision-recall", action="store_true", default=None)
    parser.add_argument("--inception-score", action="store_true", default=None)
    parser.add_argument("--grid", metavar="PNG", help="also save a grid of samples there")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _pick_cell(spec: Any, name: str | None, checkpoint: Path) -> Any:
    cells = {c.name: c for c in spec.cells()}
    if name:
        if name not in cells:
            raise ConfigError(f"--cell {name!r}: the spec has no such cell; its cells: {', '.join(cells)}")
        return cells[name]
    parts = checkpoint.resolve().parts
    for i, part in enumerate(parts[:-1]):
        if part == "trials" and parts[i + 1] in cells:
            return cells[parts[i + 1]]
    if len(cells) == 1:
        return next(iter(cells.values()))
    raise ConfigError(f"the spec has {len(cells)} cells; name one with --cell ({', '.join(cells)})")


def load_model(checkpoint: str | Path, manifest: Any, *, cell: Any = None, model: str | None = None,
               learn_sigma: bool | None = None) -> tuple[Any, Any, str, dict[str, Any]]:
    """(the EMA model in eval mode, its diffusion, its name, where it came from) for a checkpoint
    folder, a trial folder (its latest checkpoint) or a state-dict file. The diffusion is the
    cell's (steps, schedule; the paper's without a cell) with the model's learn_sigma."""
    from dit.models import config_name, load_state_dict, model_config
    from dit.train.checkpoint import Checkpoint, build_model, eval_diffusion

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    train = cell.train if cell is not None else None
    if path.is_dir():
        ckpt = Checkpoint.open(path)
        if model:
            raise ConfigError("--model is for .pt state dicts; a checkpoint folder names its own model")
        _check_fits(ckpt.model_config, manifest)
        name = config_name(ckpt.model_config)
        net, diffusion = ckpt.load_for_eval(name, train)
        return net, diffusion, name, {"kind": "checkpoint", "path": str(ckpt.path), "step": ckpt.step}
    if model is None and cell is None:
        raise ConfigError(f"{str(path)!r} is a plain state dict: say which model with --model (e.g. DiT-XL/2)")
    channels, height, _ = manifest.latent_shape
    if model is not None:
        overrides: dict[str, Any] = dict(input_size=height, in_channels=channels, num_classes=manifest.num_classes)
        if learn_sigma is not None:
            overrides["learn_sigma"] = learn_sigma
        mcfg = model_config(model, **overrides)
    else:
        mcfg = cell.model_config()
    sd = load_state_dict(path)
    _check_fits(mcfg, manifest)
    name = model or config_name(mcfg)
    net = build_model(mcfg, sd, str(path), name)
    return net, eval_diffusion(net, train), name, {"kind": "state_dict", "path": str(path)}


def _check_fits(mcfg: Any, manifest: Any) -> None:
    channels, height, width = manifest.latent_shape
    if (mcfg.in_channels, mcfg.input_size, mcfg.input_size) != (channels, height, width) \
            or mcfg.num_classes != manifest.num_classes:
        raise ConfigError(
            f"the model takes {mcfg.in_channels}x{mcfg.input_size}x{mcfg.input_size} latents and "
            f"{mcfg.num_classes} classes; the data has {channels}x{height}x{width} and {manifest.num_classes}"
        )


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from pydantic import ValidationError

    from dit.evaluate import EvalConfig, Evaluator, eval_tags
    from dit.latents import Manifest
    from orchestrator.spec.trial import format_validation_error

    cell = None
    if args.spec:
        from orchestrator.spec import load_spec

        cell = _pick_cell(load_spec(args.spec, for_run=True), args.cell, Path(args.checkpoint))
    elif args.cell:
        raise ConfigError("--cell needs --spec")
    if not args.data and cell is None:
        raise ConfigError("say where the data is: --spec STUDY.yaml (and --cell) or --data MANIFEST")
    manifest = Manifest.load(args.data or cell.train.data)
    base = cell.train.eval.model_dump() if cell is not None else {}
    given = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag, None) is not None}
    try:
        cfg = EvalConfig.model_validate({**base, **given, "enabled": True})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "evaluation settings")) from None
    learn_sigma = cell.train.learn_sigma if cell is not None else None
    model, diffusion, name, source = load_model(args.checkpoint, manifest, cell=cell, model=args.model,
                                                learn_sigma=learn_sigma)
    random_flip = cell.train.random_flip if cell is not None else False
    if cfg.steps > diffusion.num_timesteps:
        raise ConfigError(f"--steps {cfg.steps} exceeds the diffusion's {diffusion.num_timesteps} steps")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    evaluator = Evaluator(cfg, manifest=manifest, diffusion=diffusion, device=device, random_flip=random_flip)
    metrics = evaluator.run(model, grid_path=args.grid)
    return {
        "checkpoint": source, "model": name, "cell": cell.name if cell is not None else None,
        "data": manifest.url, "device": str(device), "settings": eval_tags(cfg, manifest.image_size),
        "metrics": metrics, **({"grid": str(args.grid)} if args.grid else {}),
    }


def main(args: argparse.Namespace) -> int:
    out = evaluate_checkpoint(args)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    src = out["checkpoint"]
    step = f" (step {src['step']})" if src.get("step") is not None else ""
    print(f"{out['model']}{step} from {src['path']}" + (f", cell {out['cell']}" if out["cell"] else ""))
    s = out["settings"]
    print(f"{s['eval.num_samples']} samples, {s['eval.sampler']} {s['eval.steps']} steps, cfg {s['eval.cfg_scale']}, "
          f"features {s['eval.features']}, reference {s['eval.reference']}")
    for key, value in out["metrics"].items():
        label = re.sub(r"^eval/", "", key)
        print(f"  {label:<18} {value:.4f}" if isinstance(value, float) and math.isfinite(value) else f"  {label:<18} {value}")
    if "grid" in out:
        print(f"sample grid: {out['grid']}")
    return 0
