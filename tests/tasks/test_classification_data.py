"""Image classification data: the bundled digits and users' ImageFolder trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from seqapps.errors import InputError
from seqapps.tasks.classification.data import ImageDataModule, split_indices


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 50)
    train, val, test = split_indices(labels, seed=3)
    assert len(set(train) | set(val) | set(test)) == 200 and not set(train) & set(test)
    assert all((labels[train] == c).sum() == 35 for c in range(4))


def test_digits_are_real_and_standardised_on_train():
    dm = ImageDataModule(dataset="digits", batch_size=32)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    info = dm.info()
    assert info["num_classes"] == 10 and info["in_chans"] == 1 and info["img_size"] == 8
    total = sum(len(dm.splits[s]) for s in ("train", "val", "test"))
    assert total == 1797
    train_x = torch.stack([dm.splits["train"][i][0] for i in range(len(dm.splits["train"]))])
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-2


def _write_folder(root, classes=("cat", "dog"), per_class=10, size=12):
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            pixels = (rng.random((size, size, 3)) * 80 + 120 * i).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{j}.png")
    return root


def test_image_folder_layout_is_read_and_split(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    dm = ImageDataModule(path=str(root), img_size=16, batch_size=4)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    assert dm.info()["class_names"] == ["cat", "dog"] and dm.info()["in_chans"] == 3
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 20
    gray = ImageDataModule(path=str(root), img_size=8, grayscale=True)
    gray.setup()
    assert gray.splits["train"][0][0].shape == (1, 8, 8)


def test_bad_folder_and_dataset_are_one_line(tmp_path):
    with pytest.raises(InputError, match="no folder at"):
        ImageDataModule(path=str(tmp_path / "missing")).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an ImageFolder root"):
        ImageDataModule(path=str(tmp_path / "empty")).load()
    with pytest.raises(InputError, match="not a bundled dataset"):
        ImageDataModule(dataset="cifar").load()
    root = _write_folder(tmp_path / "imgs")
    (root / "dog" / "3.png").write_text("not an image")
    with pytest.raises(InputError, match=r"an image cannot be read \(.*dog/3.png"):
        ImageDataModule(path=str(root)).load()
