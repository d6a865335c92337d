"""A data module over fixed train/val/test splits, shared by the tasks whose data fits in memory."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from seqapps.tasks.sampling import EpochSeededSampler, expect_loader_options


class SplitsDataModule(L.LightningDataModule):
    """Subclasses implement ``read()``, which fills ``self.splits`` (``{"train", "val", "test"}`` ->
    ``Dataset``) and whatever else the data says of itself; ``load()`` runs it once. They set
    ``batch_size``, ``seed`` and ``num_workers``. The training loader
    shuffles with an epoch-seeded order (a resumed run sees the same batches); the others keep
    the data order and the last, partial batch."""

    splits: dict[str, Dataset]
    batch_size: int
    seed: int
    num_workers: int

    def read(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define read(), which fills self.splits")

    def load(self) -> None:
        """``read()`` the data, the first time only."""
        if not getattr(self, "_loaded", False):
            expect_loader_options(self.batch_size, self.num_workers)
            self.read()
            self._loaded = True

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.load()
        data = self.splits[split]
        sampler = EpochSeededSampler(len(data), self.seed) if shuffle else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
