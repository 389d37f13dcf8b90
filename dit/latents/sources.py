"""Image sources: the finite, indexable, labelled image sets that ``ditscale prepare`` encodes.

``make_digits(16)`` is the built-in demo (scikit-learn's digits, no download);
``RandomLatentsSource`` makes synthetic latents of any shape and size (GPU runs that need no
download); ``ImageFolderSource(root, 256)`` reads the ImageNet layout; ``ArraySource`` wraps
arrays (tests, benchmarks). Every image goes through ADM's centre crop (:func:`center_crop_arr`), as in
the DiT reference code, and comes out ``(C, S, S)`` float32 in [-1, 1].
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np

from dit.errors import ConfigError


def center_crop_arr(pil_image: Any, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side >= 2*size, BICUBIC-resize the
    short side to ``size``, then crop the centre. Returns ``(size, size[, C])`` uint8."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _to_chw_unit(arr: np.ndarray) -> np.ndarray:
    """uint8 ``HW`` or ``HWC`` → float32 ``CHW`` in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0


class ImageSource:
    """A finite, indexable set of labelled images. ``load(i)`` returns ``(C, S, S)`` float32 in
    [-1, 1] or raises for a bad input (the writer skips, counts and lists it)."""

    kind = "source"
    parallel_load = False  # True: load() mostly waits on I/O or GIL-free decoding, so threads help
    class_names: list[str]
    image_size: int
    channels: int

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"{self.kind}/{i}"

    def describe(self) -> dict[str, Any]:
        """Fields that identify the input (part of the shard set's fingerprint)."""
        return {"kind": self.kind, "num_inputs": len(self), "channels": self.channels}

    @property
    def prescan_skipped(self) -> list[dict[str, str]]:
        """Inputs rejected before encoding (e.g. files outside any class folder)."""
        return []


class ArraySource(ImageSource):
    """Images already in memory: ``(N, C, S, S)`` float in [-1, 1] (tests, benchmarks)."""

    kind = "arrays"

    def __init__(self, images: np.ndarray, labels: Sequence[int], class_names: Sequence[str] | None = None, *, name: str = "arrays") -> None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ConfigError(f"ArraySource: images must be (N, C, S, S), got {images.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise ConfigError(f"ArraySource: {len(images)} images but {len(self.labels)} labels")
        n_cls = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
        self.image_size = int(images.shape[-1])
        self.channels = int(images.shape[1])
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def key(self, i: int) -> str:
        return f"{self.name}/{i}"

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.images.tobytes())
        digest.update(self.labels.tobytes())
        return {**super().describe(), "name": self.name, "sha256": digest.hexdigest()}


class DigitsSource(ImageSource):
    """scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10 classes, no
    download), upscaled with the same ADM preprocessing as any image → ``(1, S, S)``."""

    kind = "digits"

    def __init__(self, image_size: int = 16) -> None:
        if image_size < 2:
            raise ConfigError(f"--image-size {image_size}: must be at least 2")
        from sklearn.datasets import load_digits

        d = load_digits()
        # 0..16 intensities → 0..255 uint8, white digit on black like MNIST
        self.raw = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
        self.targets = d.target.astype(np.int64)
        self.class_names = [str(c) for c in range(10)]
        self.image_size = int(image_size)
        self.channels = 1

    def __len__(self) -> int:
        return len(self.raw)

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        return _to_chw_unit(center_crop_arr(Image.fromarray(self.raw[i], mode="L"), self.image_size))

    def label(self, i: int) -> int:
        return int(self.targets[i])

    def key(self, i: int) -> str:
        return f"digits/{i:04d}"


def make_digits(image_size: int = 16) -> DigitsSource:
    """The built-in demo data set: sklearn digits at ``image_size`` px, 1 channel."""
    return DigitsSource(image_size)


class RandomLatentsSource(ImageSource):
    """Synthetic, deterministic "latents" of any shape and count, for runs that need no data set.

    Sample ``i`` of class ``c = i % num_classes`` is ``0.6 * P_c + 0.4 * U_i``: a fixed random
    pattern per class plus per-sample noise, both uniform in [-1, 1] and drawn from generators
    keyed by (seed, class) and (seed, i). So the set is the same on every machine and at any
    size, a model has something to learn (losses fall, classes are separable), and the values
    stay in [-1, 1] like every source's output. Written through the identity codec they are
    ``channels x size x size`` latents (4 x 32 x 32: the shape of 256 px images through the SD
    VAE, so a DiT's cost on them is the paper's at 256 px).
    """

    kind = "random-latents"

    def __init__(self, num_samples: int = 4096, *, channels: int = 4, size: int = 32, num_classes: int = 10,
                 seed: int = 0) -> None:
        if min(num_samples, channels, size, num_classes) < 1:
            raise ConfigError(f"random-latents: num_samples, channels, size and num_classes must be >= 1, got "
                              f"{num_samples}, {channels}, {size}, {num_classes}")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.class_names = [str(c) for c in range(num_classes)]
        self.image_size, self.channels = int(size), int(channels)
        self._patterns: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _uniform(self, *key: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *key])
        return rng.uniform(-1.0, 1.0, (self.channels, self.image_size, self.image_size)).astype(np.float32)

    def load(self, i: int) -> np.ndarray:
        c = self.label(i)
        if c not in self._patterns:
            self._patterns[c] = self._uniform(0, c)
        return 0.6 * self._patterns[c] + 0.4 * self._uniform(1, int(i))

    def label(self, i: int) -> int:
        return int(i) % len(self.class_names)

    def key(self, i: int) -> str:
        return f"random-latents/{i:07d}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "size": self.image_size, "num_classes": len(self.class_names), "seed": self.seed}


class ImageFolderSource(ImageSource):
    """ImageNet layout: ``ROOT/<class>/<image>`` (nested folders allowed); class index =
    sorted class-folder order. Files that PIL cannot read are skipped at encode time."""

    kind = "folder"
    parallel_load = True

    def __init__(self, root: str | os.PathLike[str], image_size: int = 256) -> None:
        root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.exists(root):
            raise ConfigError(f"image folder {root}: does not exist. Fix: pass the folder that holds one subfolder per class")
        if not os.path.isdir(root):
            raise ConfigError(f"image folder {root}: is a file, not a folder. Fix: pass the folder that holds one subfolder per class")
        if image_size < 2:
            raise ConfigError(f"--image-size {image_size}: must be at least 2")
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
        classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        self._prescan: list[dict[str, str]] = [
            {"key": e, "error": "not inside a class subfolder"} for e in entries if e not in classes
        ]
        if not classes:
            what = "is empty" if not entries else "has no class subfolders"
            raise ConfigError(
                f"image folder {root}: {what}. Fix: use the ImageNet layout, one subfolder per class "
                f"({root}/<class_name>/<image files>); class indices follow the sorted folder names"
            )
        files: list[str] = []
        labels: list[int] = []
        for idx, cls in enumerate(classes):
            base = os.path.join(root, cls)
            for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if fn.startswith("."):
                        continue
                    files.append(os.path.relpath(os.path.join(dirpath, fn), root))
                    labels.append(idx)
        if not files:
            raise ConfigError(
                f"image folder {root}: the class subfolders ({', '.join(classes[:5])}{', …' if len(classes) > 5 else ''}) "
                "hold no files. Fix: put the images inside ROOT/<class_name>/"
            )
        self.root = root
        self.files = files
        self.labels = labels
        self.class_names = classes
        self.image_size = int(image_size)
        self.channels = 3

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(os.path.join(self.root, self.files[i])) as img:
            img.load()
            rgb = img.convert("RGB")
        return _to_chw_unit(center_crop_arr(rgb, self.image_size))

    def label(self, i: int) -> int:
        return self.labels[i]

    def key(self, i: int) -> str:
        return self.files[i].replace(os.sep, "/")

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(f"{f}\t{c}" for f, c in zip(self.files, self.labels)).encode())
        return {**super().describe(), "root": self.root, "files_sha256": digest.hexdigest()}

    @property
    def prescan_skipped(self) -> list[dict[str, str]]:
        return list(self._prescan)
