"""Image classification data: scikit-learn's bundled digits (real, 1797 images of 8×8, no
download) and a folder of images in torchvision's ``ImageFolder`` layout for users' own data.

Batches are ``x [B, C, H, W]`` (standardised with training statistics) and ``y [B]``.
``ImageFolder`` layout: ``root/<class>/<image>``; if ``root`` holds ``train/`` (and ``val/``,
``test/``) folders they are used as the splits, otherwise one folder is split 70/15/15.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from seqapps.errors import InputError
from seqapps.tasks.splits import SplitsDataModule

BUILTIN_DATASETS = ("digits",)


def digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits: images ``[1797, 1, 8, 8]`` in [0, 1], labels ``[1797]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images[:, None] / 16.0).astype(np.float32), digits.target.astype(np.int64), \
        [str(c) for c in digits.target_names]


def split_indices(labels: np.ndarray, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> list[np.ndarray]:
    """Stratified train/val/test indices: every class keeps the same proportions."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = int(round(fractions[0] * len(idx))), int(round(fractions[1] * len(idx)))
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])):
            part.extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


class ImageDataModule(SplitsDataModule):
    """Args:
        path: an ``ImageFolder`` root; when ``None``, ``dataset`` (``digits``) is used.
        img_size: images are resized to ``img_size × img_size`` (folders only; digits are 8×8).
        grayscale: read folder images as one channel.
    """

    def __init__(self, path: str | None = None, dataset: str = "digits", img_size: int = 32,
                 grayscale: bool = False, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.path, self.dataset, self.img_size, self.grayscale = path, dataset, img_size, grayscale
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def read(self) -> None:
        if self.path:
            self._load_folder(Path(self.path))
        elif self.dataset == "digits":
            images, labels, self.class_names = digits_arrays()
            train, val, test = split_indices(labels, seed=self.seed)
            self.mean, self.std = float(images[train].mean()), float(images[train].std())
            data = TensorDataset(torch.from_numpy((images - self.mean) / self.std), torch.from_numpy(labels))
            self.splits = {"train": Subset(data, train), "val": Subset(data, val), "test": Subset(data, test)}
            self.in_chans, self.img_size, self.source = 1, 8, "dataset 'digits' (scikit-learn)"
        else:
            raise InputError(f"data.dataset='{self.dataset}' is not a bundled dataset; choose one of "
                             f"{', '.join(BUILTIN_DATASETS)} or give data.path=<an ImageFolder root>")

    def _load_folder(self, root: Path) -> None:
        from torchvision import datasets, transforms

        if not root.is_dir():
            raise InputError(f"data.path: no folder at '{root}'; give an ImageFolder root (root/<class>/<image>)")
        self.in_chans = 1 if self.grayscale else 3
        base = [transforms.Grayscale(1)] if self.grayscale else [transforms.Lambda(lambda im: im.convert("RGB"))]
        base += [transforms.Resize((self.img_size, self.img_size)), transforms.ToTensor()]
        split_roots = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
        try:
            if "train" in split_roots:
                folders = {s: datasets.ImageFolder(str(p), transforms.Compose(base)) for s, p in split_roots.items()}
            else:
                whole = datasets.ImageFolder(str(root), transforms.Compose(base))
        except (FileNotFoundError, RuntimeError) as err:
            raise InputError(f"data.path: '{root}' is not an ImageFolder root ({str(err).splitlines()[0]})") from None
        if "train" not in split_roots:
            train, val, test = split_indices(np.asarray(whole.targets), (0.7, 0.15, 0.15), self.seed)
            folders = {"train": Subset(whole, train), "val": Subset(whole, val), "test": Subset(whole, test)}
            self.class_names = whole.classes
        else:
            self.class_names = folders["train"].classes
            folders.setdefault("val", folders.get("test", folders["train"]))
            folders.setdefault("test", folders["val"])
        stats = torch.stack([_read(folders["train"], i)[0] for i in range(min(len(folders["train"]), 512))])
        self.mean, self.std = float(stats.mean()), float(stats.std())
        self.splits = {s: _Standardised(d, self.mean, self.std) for s, d in folders.items()}
        self.source = f"ImageFolder '{root}'"

    def info(self) -> dict:
        self.load()
        return {"source": self.source, "num_classes": len(self.class_names), "class_names": list(self.class_names),
                "in_chans": self.in_chans, "img_size": self.img_size, "mean": self.mean, "std": self.std}


class _Standardised(Dataset):
    def __init__(self, data: Dataset, mean: float, std: float):
        self.data, self.mean, self.std = data, mean, std

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = _read(self.data, i)
        return (x - self.mean) / self.std, y


def _read(data: Dataset, i: int):
    """Item ``i`` of an image dataset; one line naming the file when it is not an image."""
    from PIL import UnidentifiedImageError

    try:
        return data[i]
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"data.path: an image cannot be read ({err}); remove or replace the file") from None
