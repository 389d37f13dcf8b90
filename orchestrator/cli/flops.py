"""``ditscale flops``: the Gflops / params table for named or custom models, or a study spec.

``ditscale flops DiT-S/2 DiT-XL/2`` measures models; ``ditscale flops studies/X.yaml`` is a
study's dry run: every cell with its tokens, Gflops, params, training compute
(Gflops x global_batch x steps x 3, the paper's) and estimated GPU-hours, and the total.
"""

from __future__ import annotations

import argparse
import json
import os

from dit.models import MODEL_NAMES

SPEC_SUFFIXES = (".yaml", ".yml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL|SPEC",
        help=f"model names (default: the paper's 12: {MODEL_NAMES[0]} ... {MODEL_NAMES[-1]}), "
        "or one study spec (.yaml) for a dry run of its grid",
    )
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 256)")
    parser.add_argument(
        "--vae-factor", type=int, default=None, help="pixels per latent cell (8 for the SD VAE, 1 for pixels)"
    )
    parser.add_argument("--in-channels", type=int, default=None, help="latent channels (default 4)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default 1000)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def is_spec_argument(arg: str) -> bool:
    return arg.lower().endswith(SPEC_SUFFIXES) or os.path.isfile(arg)


def main(args: argparse.Namespace) -> int:
    from dit.errors import ConfigError

    specs = [m for m in args.models if is_spec_argument(m)]
    if specs:
        if len(args.models) != 1:
            raise ConfigError("give either one study spec or model names, not both")
        given = [f"--{k.replace('_', '-')}" for k in ("image_size", "vae_factor", "in_channels", "num_classes")
                 if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: not used with a study spec (the spec's data section sets them)")
        return _spec_main(specs[0], args.json)
    return _models_main(args)


def _models_main(args: argparse.Namespace) -> int:
    from dit.errors import ConfigError
    from dit.flops import measure

    image_size = 256 if args.image_size is None else args.image_size
    vae_factor = 8 if args.vae_factor is None else args.vae_factor
    if image_size < 1 or vae_factor < 1 or image_size % vae_factor:
        raise ConfigError(
            f"--image-size ({image_size}) must be a positive multiple of --vae-factor ({vae_factor})"
        )
    reports = [
        measure(
            name,
            image_size=image_size,
            vae_factor=vae_factor,
            in_channels=4 if args.in_channels is None else args.in_channels,
            num_classes=1000 if args.num_classes is None else args.num_classes,
        )
        for name in (args.models or MODEL_NAMES)
    ]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
        return 0
    print(f"{'model':<12} {'image':>6} {'tokens':>7} {'Gflops':>10} {'params':>14}")
    for r in reports:
        print(f"{r.model:<12} {r.image_size:>6} {r.tokens:>7} {r.gflops:>10.2f} {r.params:>14,}")
    return 0


def sci(x: float) -> str:
    """1.23e19 (no '+', no leading zeros in the exponent)."""
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _gflops(g: float) -> str:
    return f"{g:.2f}" if g >= 0.1 else f"{g:.3g}"


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def _spec_main(path: str, as_json: bool) -> int:
    from dit.flops import FLOPS_PER_MAC
    from orchestrator.spec import load_spec

    spec = load_spec(path, for_run=False)  # a dry run: no user code (eval.features 'module:factory') is imported
    cells = spec.cells()
    if as_json:
        print(json.dumps(spec.resolved(), indent=2))
        return 0
    d = spec.data_info
    print(
        f"study {spec.name}: {len(cells)} cells; data {d.manifest} ({d.image_size} px, latent "
        f"{d.channels}x{d.latent_size}x{d.latent_size}, {d.num_classes} classes"
        f"{'' if d.exists else '; not prepared yet'})"
    )
    rows = []
    for c in cells:
        model = c.model if isinstance(c.model, str) else f"{c.size} d{c.model['depth']}/h{c.model['hidden_size']}/n{c.model['num_heads']}"
        rows.append([
            c.name, model, str(c.patch_size), c.block, str(c.tokens), _gflops(c.gflops),
            f"{c.params / 1e6:.2f}M", sci(c.compute_gflops * 1e9), _hours(c.gpu_hours),
            f"{c.workers} {'gpu' if c.use_gpu else 'cpu'}",
        ])
    total_compute = sum(c.compute_gflops for c in cells)
    total_hours = sum(c.gpu_hours for c in cells)
    header = ["cell", "model", "patch", "block", "tokens", "Gflops", "params", "train flops", "GPU-h", "workers"]
    footer = ["total", "", "", "", "", "", "", sci(total_compute * 1e9), _hours(total_hours), ""]
    widths = [max(len(r[i]) for r in [header, *rows, footer]) for i in range(len(header))]
    left = {0, 1, 3}

    def line(r: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()

    print(line(header))
    for r in rows:
        print(line(r))
    print(line(footer))
    print(
        "Gflops: forward pass, batch 1, 1 multiply-add = 1 flop (fvcore, the paper's convention). "
        "train flops = Gflops x global_batch x steps x 3.\n"
        f"GPU-h: train flops x {FLOPS_PER_MAC} at {spec.cost.gpu_hour_tflops:g} sustained TFLOP/s per GPU "
        "(cost.gpu_hour_tflops), perfect scaling over workers."
    )
    return 0
