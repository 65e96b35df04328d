"""Datasets as in-memory uint8 tensors, and batched, seeded augmentation.

``load_dataset(name, split)`` gives an :class:`ImageData` (images (N, C, H, W) uint8, labels
(N,) int64, class names):

- ``synthetic`` (default): generated here, deterministic, no download. 32×32 RGB, 10
  classes: an oriented sinusoidal grating (5 orientations ±θ, θ = 0°, 22.5°, ..., 90°, so
  that horizontal flips keep the class) in one of two colour schemes,
  with random frequency, phase, contrast and brightness, plus pixel noise. A small CNN
  reaches high accuracy on it within a minute of CPU training; the class depends on the
  orientation and colour of fine texture, so input curvature and robustness differ between
  models as they do on natural images. 10,000 train and 2,000 test images.
- ``cifar10``, ``cifar100``, ``svhn``: torchvision's datasets under ``root`` (``download=True``
  fetches them; nothing is downloaded otherwise).
- a path: an ImageFolder; if it has ``train/`` and ``test/`` sub-folders, the split's
  sub-folder is used (this is how ../shared/data/cifar10 is read); otherwise the folder
  serves as every split (:func:`shared_splits`; training warns). Every image must be
  readable and all of one size and mode (L, RGB or RGBA): an error names the first that is not.

Evaluation on part of a dataset uses :meth:`ImageData.sample` (seeded, uniform), never the
first N examples: ImageFolders are sorted by class.

Keeping the data as tensors makes augmentation (RandomCrop with 4-pixel zero padding, and
horizontal flips) a batched operation drawn from a generator seeded per step, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .validate import InputError, choice, integer, suggest

BUILTIN = ("synthetic", "cifar10", "cifar100", "svhn")
SYNTHETIC_SIZES = {"train": 10_000, "test": 2_000}


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return self.labels.shape[0]

    def floats(self, index: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(x in [0, 1] float32, y) for the selected examples."""
        return self.images[index].float() / 255.0, self.labels[index]

    def batches(self, batch_size: int):  # noqa: ANN201 - a generator
        """Unshuffled (x, y) batches in [0, 1] of every example (evaluation)."""
        integer("batch_size", batch_size)
        for i in range(0, len(self), batch_size):
            yield self.floats(slice(i, min(i + batch_size, len(self))))

    def sample(self, n: int | None, seed: int = 0) -> ImageData:
        """``n`` examples drawn uniformly without replacement (seeded), all of them when ``n`` is
        None or covers the set: never "the first n", since datasets are often sorted by class.
        ``name`` records the sample."""
        integer("n", n, optional=True)
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageData(self.images[idx], self.labels[idx], self.classes,
                         f"{self.name} (seeded random {n} of {len(self)}, seed {seed})")


def synthetic(split: str = "train", n: int | None = None, seed: int = 0) -> ImageData:
    """The embedded dataset (see the module docstring); deterministic in (split, n, seed)."""
    choice("split", split, tuple(SYNTHETIC_SIZES))
    n = SYNTHETIC_SIZES[split] if n is None else integer("n", n)
    gen = torch.Generator().manual_seed(seed * 2 + (split == "test") + 12345)
    y = torch.randint(0, 10, (n,), generator=gen)
    # orientation θ_c ∈ {0°, 22.5°, ..., 90°} with a random sign: horizontal flips keep the class
    sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    angle = sign * (y % 5).float() * (math.pi / 8) + 0.05 * torch.randn(n, generator=gen)
    freq = 2 * math.pi * (3.0 + 2.0 * torch.rand(n, generator=gen)) / 32
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    contrast = 0.25 + 0.1 * torch.rand(n, generator=gen)
    bright = 0.4 + 0.2 * torch.rand(n, generator=gen)
    coords = torch.arange(32, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = xx[None] * angle.cos()[:, None, None] + yy[None] * angle.sin()[:, None, None]
    wave = torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, 32, 32)
    schemes = torch.tensor([[1.0, 0.55, 0.1], [0.1, 0.55, 1.0]])
    colour = schemes[y // 5] + 0.1 * torch.randn(n, 3, generator=gen)
    amp = contrast[:, None, None, None] * colour[:, :, None, None]
    tint = 0.08 * (schemes[y // 5] - 0.55)  # a faint colour cast of the scheme
    img = bright[:, None, None, None] + tint[:, :, None, None] + amp * wave[:, None]
    img = img + 0.05 * torch.randn(n, 3, 32, 32, generator=gen)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    names = [f"{o}deg-{c}" for c in ("warm", "cool") for o in ("0", "22.5", "45", "67.5", "90")]
    return ImageData(images, y, names, f"synthetic-{split}")


_MODES = {"L": 1, "RGB": 3, "RGBA": 4}


def shared_splits(name: str) -> bool:
    """True for an ImageFolder path without train/ and test/: one set of images for every split."""
    path = Path(name)
    return name not in BUILTIN and not ((path / "train").is_dir() and (path / "test").is_dir())


def _image_folder(path: Path, split: str) -> ImageData:
    """An ImageFolder, every image checked: readable, one size, one mode of :data:`_MODES`."""
    import numpy as np
    from PIL import Image
    from torchvision import datasets

    if not path.is_dir():
        raise InputError(f"data: {path} is not a folder")
    root = path if shared_splits(str(path)) else path / split
    try:
        folder = datasets.ImageFolder(str(root), loader=str)
        samples, classes = folder.samples, folder.classes
    except (FileNotFoundError, RuntimeError) as e:
        raise InputError(f"data: {root} is not an ImageFolder (class sub-folders of images): "
                         f"{str(e).splitlines()[0]}") from e
    images = None
    first = ""
    for i, (file, _) in enumerate(samples):
        try:
            with Image.open(file) as img:
                mode, size = img.mode, img.size
                arr = np.asarray(img)
        except OSError as e:
            raise InputError(f"data: {file} is not a readable image ({e})") from e
        if mode not in _MODES:
            raise InputError(f"data: {file} has image mode {mode!r}; expected one of {', '.join(_MODES)}")
        if images is None:
            images = torch.empty(len(samples), _MODES[mode], size[1], size[0], dtype=torch.uint8)
            first = f"{mode} {size[0]}×{size[1]} ({file})"
        elif (_MODES[mode], size[1], size[0]) != tuple(images.shape[1:]) or mode != first.split()[0]:
            raise InputError(f"data: {file} is {mode} {size[0]}×{size[1]}; expected every image like the "
                             f"first, {first}")
        t = torch.from_numpy(np.array(arr, dtype=np.uint8))
        images[i] = t.permute(2, 0, 1) if t.dim() == 3 else t[None]
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return ImageData(images, labels, list(classes), f"{path.name}-{split}")


def _torchvision(name: str, split: str, root: str, download: bool) -> ImageData:
    from torchvision import datasets

    try:
        if name == "svhn":
            ds = datasets.SVHN(root, split=split, download=download)
            return ImageData(torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long(),
                             [str(i) for i in range(10)], f"svhn-{split}")
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        ds = cls(root, train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        msg = f"data: {name} not found under {root!r} ({e}); pass --download to fetch it"
        raise InputError(msg) from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, torch.tensor(ds.targets), list(ds.classes), f"{name}-{split}")


def load_dataset(name: str = "synthetic", split: str = "train", root: str = "./data",
                 download: bool = False) -> ImageData:
    """A dataset by name or ImageFolder path (see the module docstring)."""
    choice("split", split, ("train", "test"))
    check_source(name)
    if name == "synthetic":
        return synthetic(split)
    if name in BUILTIN:
        return _torchvision(name, split, root, download)
    return _image_folder(Path(name), split)


def check_source(name: str) -> None:
    """``name`` is one of :data:`BUILTIN` or an existing path (checked without reading data)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"data: expected a dataset name ({', '.join(BUILTIN)}) or a folder, got {name!r}")
    if name not in BUILTIN and not Path(name).exists():
        raise InputError(f"data: {name!r} is neither one of {', '.join(BUILTIN)} nor an existing folder"
                         + suggest(name, BUILTIN))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """RandomCrop(H, padding=pad, zero fill) and horizontal flip, per example, from ``gen``."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    flip = torch.rand(B, generator=gen) < 0.5
    rows = (oy[:, None] + torch.arange(H))[:, None, :, None]
    cols = ox[:, None] + torch.arange(W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
