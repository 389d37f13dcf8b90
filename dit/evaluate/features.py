"""Feature extractors for FID: one small interface, Inception-v3 for real studies, a digits CNN
for the CPU demo, and any ``nn.Module`` for tests.

An extractor has a ``name`` (what runs are tagged with: FIDs only compare within one), a
feature ``dim``, the ``input_size`` it resizes images to, a ``resize`` description (also a
run tag) and ``features(images)``: images in [-1, 1], ``(N, C, H, W)`` -> ``(N, dim)``.
Extractors with class logits (``num_classes > 0``) also give the Inception Score.

- ``inception-v3-tf``: pool3 (2048-d) of the TF 2015-12-05 Inception graph's weights
  (``pt_inception-2015-12-05-6726825d.pth``, the file pytorch-fid and torch-fidelity use),
  through pytorch-fid's ``InceptionV3`` (imported lazily; it needs torchvision). Images are
  resized as pytorch-fid does: bilinear to 299x299 (``F.interpolate``, ``align_corners=False``,
  no antialiasing); grayscale is repeated to RGB. The weights come from ``eval.feature_weights``
  or the torch hub cache (``~/.cache/torch/hub/checkpoints/``); nothing is downloaded.
- ``digits-cnn-v1``: a tiny CNN trained at ``ditscale prepare digits`` time (seeded, about a
  second on a CPU, 80/20 split) and saved as ``features/digits_classifier.pt`` next to the
  manifest; its penultimate layer (64-d, before the ReLU) gives a meaningful Fréchet distance
  on 8-32 px digits. Images are resized (bilinear, antialiased) to ``min(image_size, 16)``.
- ``ModuleExtractor(module, name=..., dim=...)``: any module (tests, custom networks);
  ``eval.features: "package.module:factory"`` builds one in every worker.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit.errors import ConfigError
from dit.files import atomic_path, read_bytes, resolve

__all__ = [
    "DIGITS",
    "INCEPTION",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "DigitsCNN",
    "FeatureExtractor",
    "ModuleExtractor",
    "InceptionExtractor",
    "canonical_name",
    "check_extractor",
    "describe_resize",
    "inception_weights_path",
    "load_digits_extractor",
    "load_extractor",
    "register_extractor",
    "resize_images",
    "train_digits_classifier",
]

DIGITS = "digits-cnn-v1"
INCEPTION = "inception-v3-tf"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_RESIZE = "pytorch-fid: bilinear to 299x299 (F.interpolate, align_corners=False, no antialias)"
DIGITS_FILE = "features/digits_classifier.pt"
DIGITS_MAX_INPUT = 16
_ALIASES = {"digits": DIGITS, "digits-cnn": DIGITS, "inception": INCEPTION, "inception-v3": INCEPTION,
            "inception-v3-fid": INCEPTION}
_REGISTRY: dict[str, Callable[..., "FeatureExtractor"]] = {}


def canonical_name(name: str) -> str:
    return _ALIASES.get(name, name)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


def resize_images(images: torch.Tensor, size: int | None, *, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize to ``size`` x ``size`` (antialiased when shrinking); None keeps the size."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = antialias and (images.shape[-1] > size or images.shape[-2] > size)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def match_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Grayscale -> RGB by repetition, RGB -> grayscale by the channel mean."""
    c = images.shape[1]
    if channels is None or c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        return images.mean(1, keepdim=True)
    raise ConfigError(f"images have {c} channels, the feature extractor takes {channels}")


class FeatureExtractor:
    """Base class; subclasses implement :meth:`features_and_logits`."""

    name: str = "features"
    dim: int = 0
    input_size: int | None = None
    channels: int | None = None
    num_classes: int = 0  # > 0: class logits are available (Inception Score)
    resize: str = "none"
    fingerprint: str = ""  # identifies the weights (part of reference-statistics cache keys)

    def features_and_logits(self, images: torch.Tensor, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def to(self, device: torch.device | str) -> "FeatureExtractor":
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "input_size": self.input_size, "resize": self.resize,
                "fingerprint": self.fingerprint}


class ModuleExtractor(FeatureExtractor):
    """Features from any module: ``module(resized images)`` flattened to ``(N, dim)``.

    ``logits``: an optional module mapping features to class logits (``num_classes`` of them).
    """

    def __init__(self, module: nn.Module, *, name: str, dim: int, input_size: int | None = None,
                 channels: int | None = None, logits: nn.Module | None = None, num_classes: int = 0,
                 resize: str | None = None, fingerprint: str | None = None) -> None:
        self.module = module.eval().requires_grad_(False)
        self.logits_module = logits.eval().requires_grad_(False) if logits is not None else None
        self.name, self.dim, self.input_size, self.channels = name, int(dim), input_size, channels
        self.num_classes = int(num_classes) if logits is not None else 0
        self.resize = resize or (f"bilinear, antialiased, to {input_size}x{input_size}" if input_size else "none")
        self.fingerprint = fingerprint or _state_fingerprint(module)

    def to(self, device: torch.device | str) -> "ModuleExtractor":
        self.module.to(device)
        if self.logits_module is not None:
            self.logits_module.to(device)
        return self

    def _device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = match_channels(images.to(self._device(), torch.float32), self.channels)
        x = resize_images(x, self.input_size)
        feats = self.module(x).reshape(x.shape[0], -1)
        if feats.shape[1] != self.dim:
            raise ConfigError(f"feature extractor {self.name!r} gave {feats.shape[1]}-d features, declared {self.dim}")
        out = self.logits_module(feats) if logits and self.logits_module is not None else None
        return feats, out


def _state_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Inception-v3 (pytorch-fid)
# --------------------------------------------------------------------------------------------


def inception_weights_path(weights: str | os.PathLike[str] | None = None) -> Path:
    """The explicit path, else the torch hub cache (``$TORCH_HOME/hub/checkpoints``)."""
    if weights:
        return Path(weights).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _inception_help() -> str:
    return (
        f"It is {INCEPTION_FILE} (the TF 2015-12-05 Inception graph ported to PyTorch), published with the "
        f"pytorch-fid GitHub release: {INCEPTION_URL}. Put it in ~/.cache/torch/hub/checkpoints/ "
        "(the torch hub cache, $TORCH_HOME/hub/checkpoints/) or give its path as eval.feature_weights. "
        "The network code comes from the optional extra: pip install 'ditscale[fid]' (pytorch-fid, "
        "which needs a torchvision that imports beside your torch)"
    )


def _import_pytorch_fid() -> Any:
    try:
        return importlib.import_module("pytorch_fid.inception")
    except Exception as err:  # ImportError, or torchvision failing to load its operators
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(
            f"eval.features {INCEPTION!r} needs pytorch-fid and torchvision, which cannot be imported "
            f"({type(err).__name__}: {first}). Install the extra: pip install 'ditscale[fid]'. With the "
            "CPU wheel torch 2.13.0+cpu no torchvision imports: use torch 2.14.1 + torchvision 0.29.1, "
            f"or eval.features: {DIGITS} for the digits demo"
        ) from None


def _check_inception(weights: str | os.PathLike[str] | None) -> Path:
    path = inception_weights_path(weights)
    if not path.is_file():
        where = "eval.feature_weights points at" if weights else "the torch hub cache has no"
        raise ConfigError(f"Inception FID weights missing: {where} {str(path)!r}. {_inception_help()}")
    _import_pytorch_fid()
    return path


class InceptionExtractor(FeatureExtractor):
    """pytorch-fid's ``InceptionV3`` (pool3, 2048-d) with the FID weights from a local file."""

    name, dim, input_size, channels, num_classes = INCEPTION, 2048, 299, 3, 1008
    resize = INCEPTION_RESIZE

    def __init__(self, weights: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu") -> None:
        path = _check_inception(weights)
        digest = _file_sha256(path)
        if not digest.startswith(INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]):
            raise ConfigError(
                f"{str(path)!r} is not the FID Inception weights (sha256 {digest[:8]}..., expected "
                f"6726825d...). {_inception_help()}"
            )
        module = _import_pytorch_fid()
        loaded: dict[str, Any] = {}

        def load_local(url: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            loaded["state"] = torch.load(path, map_location="cpu", weights_only=True)
            return loaded["state"]

        # pytorch-fid fetches its weights through load_state_dict_from_url (which would download);
        # hand it the local file instead.
        original = module.load_state_dict_from_url
        module.load_state_dict_from_url = load_local
        try:
            net = module.InceptionV3([3], resize_input=True, normalize_input=False)
        finally:
            module.load_state_dict_from_url = original
        self.net = net.eval().requires_grad_(False).to(device)
        state = loaded.get("state", {})
        self.fc = None
        if "fc.weight" in state:  # the 1008-way classifier of the TF graph: logits for the Inception Score
            self.fc = nn.Linear(2048, state["fc.weight"].shape[0]).requires_grad_(False)
            self.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
            self.fc.to(device)
        self.num_classes = 0 if self.fc is None else self.fc.out_features
        self.fingerprint = digest[:16]

    def to(self, device: torch.device | str) -> "InceptionExtractor":
        self.net.to(device)
        if self.fc is not None:
            self.fc.to(device)
        return self

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = next(self.net.parameters()).device
        x = match_channels(images.to(device, torch.float32), 3)  # in [-1, 1]: normalize_input=False
        feats = self.net(x)[0].reshape(x.shape[0], -1)
        out = self.fc(feats) if logits and self.fc is not None else None
        return feats, out


# --------------------------------------------------------------------------------------------
# The digits CNN
# --------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions (stride 1, 2, 2), a 2x2 average pool, a 64-d feature layer, 10 logits."""

    def __init__(self, channels: int = 1, width: int = 16, dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.arch = {"channels": channels, "width": width, "dim": dim, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(16 * width, dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))  # penultimate layer, before its ReLU (closer to Gaussian)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Features(nn.Module):
    def __init__(self, net: DigitsCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def digits_input_size(image_size: int) -> int:
    return min(int(image_size), DIGITS_MAX_INPUT)


def digits_classifier_config(source: Any, *, seed: int = 0, epochs: int = 20, batch_size: int = 64,
                             holdout: float = 0.2) -> dict[str, Any]:
    """Everything that determines the trained classifier (stored in its file, compared on reruns)."""
    return {"name": DIGITS, "format_version": 1, "seed": int(seed), "epochs": int(epochs),
            "batch_size": int(batch_size), "holdout": float(holdout), "image_size": int(source.image_size),
            "input_size": digits_input_size(source.image_size), "source": source.describe()}


def train_digits_classifier(
    source: Any,
    out_path: str | os.PathLike[str],
    *,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    holdout: float = 0.2,
) -> dict[str, Any]:
    """Train :class:`DigitsCNN` on a digits source (``load(i)``/``label(i)``), deterministically.

    Images are resized exactly as the extractor will resize them. The file also records the
    held-out indices and accuracy. Returns the record for the manifest's ``features`` field.
    Leaves the global RNG untouched.
    """
    out_path = Path(out_path)
    n = len(source)
    config = digits_classifier_config(source, seed=seed, epochs=epochs, batch_size=batch_size, holdout=holdout)
    input_size = config["input_size"]
    t0 = time.perf_counter()
    images = torch.from_numpy(np.stack([source.load(i) for i in range(n)])).float()
    labels = torch.tensor([source.label(i) for i in range(n)], dtype=torch.long)
    x_all = resize_images(images, input_size)
    perm = np.random.default_rng([int(seed), 0xD161]).permutation(n)
    n_hold = int(round(holdout * n))
    held, train_idx = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    num_classes = int(labels.max().item()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsCNN(channels=images.shape[1], num_classes=num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        xt, yt = x_all[train_idx], labels[train_idx]
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(xt), generator=g)
            for lo in range(0, len(xt), batch_size):
                b = order[lo : lo + batch_size]
                loss = F.cross_entropy(net(xt[b]), yt[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(x_all[held]).argmax(1) == labels[held]).float().mean().item() if n_hold else float("nan")
    blob = {"format": "ditscale-features", "config": config, "arch": net.arch,
            "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
            "heldout_indices": held.tolist(), "heldout_accuracy": acc}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.save(blob, tmp)
    return {"path": None, "sha256": _file_sha256(out_path), "dim": net.arch["dim"], "input_size": input_size,
            "heldout_accuracy": round(acc, 4), "seed": int(seed), "config": config,
            "train_seconds": time.perf_counter() - t0}


def digits_classifier_record(path: str | os.PathLike[str], config: dict[str, Any]) -> dict[str, Any] | None:
    """The record of an existing classifier file trained with ``config``; None if absent or different."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file is retrained
        return None
    if not isinstance(blob, dict) or blob.get("config") != config:
        return None
    return {"path": None, "sha256": _file_sha256(path), "dim": blob["arch"]["dim"],
            "input_size": config["input_size"], "heldout_accuracy": round(float(blob["heldout_accuracy"]), 4),
            "seed": config["seed"], "config": config}


def load_digits_extractor(path_or_bytes: str | os.PathLike[str] | bytes, device: torch.device | str = "cpu") -> ModuleExtractor:
    """The ``digits-cnn-v1`` extractor from a classifier file."""
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "ditscale-features" or blob.get("config", {}).get("name") != DIGITS:
        raise ConfigError(f"{path_or_bytes if not isinstance(path_or_bytes, bytes) else 'classifier'}: not a {DIGITS} classifier file")
    net = DigitsCNN(**blob["arch"])
    net.load_state_dict(blob["state_dict"])
    size = int(blob["config"]["input_size"])
    ext = ModuleExtractor(_Features(net), name=DIGITS, dim=net.arch["dim"], input_size=size,
                          channels=net.arch["channels"], logits=net.head, num_classes=net.arch["num_classes"],
                          resize=f"bilinear, antialiased, to {size}x{size} (F.interpolate)",
                          fingerprint=hashlib.sha256(raw).hexdigest()[:16])
    ext.heldout_indices = list(blob.get("heldout_indices", []))  # type: ignore[attr-defined]
    ext.heldout_accuracy = float(blob.get("heldout_accuracy", float("nan")))  # type: ignore[attr-defined]
    return ext.to(device)


def _digits_location(manifest: Any, weights: str | os.PathLike[str] | None) -> str:
    if weights:
        return os.fspath(Path(weights).expanduser())
    rec = (getattr(manifest, "features", None) or {}).get(DIGITS) if manifest is not None else None
    where = getattr(manifest, "url", None) or "the data manifest"
    if not rec:
        raise ConfigError(
            f"eval.features {DIGITS!r}: {where} records no digits classifier. Fix: rerun "
            "`ditscale prepare digits --out DIR --image-size N` (it trains features/digits_classifier.pt "
            "next to the manifest; finished shards are kept), or set eval.feature_weights"
        )
    return resolve(manifest.url or "", rec["path"])


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def register_extractor(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make ``eval.features: name`` build ``factory(manifest=..., weights=..., device=...)`` (in-process)."""
    _REGISTRY[name] = factory


def _import_factory(name: str) -> Callable[..., FeatureExtractor]:
    mod, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"eval.features {name!r}: cannot import {attr!r} from {mod!r} ({err})") from None


def check_extractor(name: str, *, manifest: Any = None, weights: str | os.PathLike[str] | None = None) -> None:
    """A cheap availability check (files, imports) that builds no network; ConfigError if missing."""
    name = canonical_name(name)
    if name == INCEPTION:
        _check_inception(weights)
    elif name == DIGITS:
        loc = _digits_location(manifest, weights)
        if "://" not in loc and not os.path.isfile(loc):
            raise ConfigError(
                f"eval.features {DIGITS!r}: classifier file {loc!r} is missing. Fix: rerun "
                "`ditscale prepare digits --out DIR` to train it again"
            )
    elif name in _REGISTRY:
        return
    elif ":" in name:
        _import_factory(name)
    else:
        raise ConfigError(
            f"eval.features {name!r}: unknown feature extractor; use {INCEPTION!r}, {DIGITS!r}, a registered "
            "name or 'package.module:factory'"
        )


def load_extractor(name: str, *, manifest: Any = None, weights: str | os.PathLike[str] | None = None,
                   device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build the extractor ``name`` (see the module docstring) on ``device``."""
    name = canonical_name(name)
    if name == INCEPTION:
        return InceptionExtractor(weights, device)
    if name == DIGITS:
        loc = _digits_location(manifest, weights)
        check_extractor(name, manifest=manifest, weights=weights)
        if "://" in loc:
            return load_digits_extractor(bytes(read_bytes(loc)), device)
        return load_digits_extractor(loc, device)
    factory = _REGISTRY.get(name) or (_import_factory(name) if ":" in name else None)
    if factory is None:
        check_extractor(name)
    ext = factory(manifest=manifest, weights=weights, device=device)
    if not isinstance(ext, FeatureExtractor):
        raise ConfigError(f"eval.features {name!r}: the factory returned {type(ext).__name__}, not a FeatureExtractor")
    return ext


def describe_resize(name: str, image_size: int | None = None) -> str:
    """How images reach the extractor (a run tag), without building it."""
    name = canonical_name(name)
    if name == INCEPTION:
        return INCEPTION_RESIZE
    if name == DIGITS:
        if image_size is None:
            return f"bilinear, antialiased, to min(image_size, {DIGITS_MAX_INPUT}) px (F.interpolate)"
        s = digits_input_size(image_size)
        return f"bilinear, antialiased, to {s}x{s} (F.interpolate)"
    return "as the extractor defines"


def digits_feature_nets(source: Any, out_dir: str, seed: int) -> dict[str, Any]:
    """The manifest's ``features`` for the built-in sets: the ``digits-cnn-v1`` classifier behind
    their FID (seeded, ~1-2 s on a CPU for the digits), kept when a rerun finds one trained with
    the same settings. Passed to :func:`dit.latents.begin_prepare` as ``feature_nets``; the
    digits and the synthetic random latents get one (so their studies need no download), other
    sources none."""
    if getattr(source, "kind", None) not in ("digits", "random-latents"):
        return {}
    path = os.path.join(out_dir, DIGITS_FILE)
    rec = digits_classifier_record(path, digits_classifier_config(source, seed=seed))
    if rec is None:
        rec = train_digits_classifier(source, path, seed=seed)
    keep = ("sha256", "dim", "input_size", "heldout_accuracy", "seed")
    return {DIGITS: {"path": DIGITS_FILE, **{k: rec[k] for k in keep}}}
