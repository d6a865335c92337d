"""A data module over fixed train/val/test splits, shared by the tasks whose data fits in memory."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from seqapps.tasks.sampling import EpochSeededSampler


class SplitsDataModule(L.LightningDataModule):
    """Subclasses implement ``load()``, which fills ``self.splits`` (``{"train", "val", "test"}`` ->
    ``Dataset``) once, and set ``batch_size``, ``seed`` and ``num_workers``. The training loader
    shuffles with an epoch-seeded order (a resumed run sees the same batches); the others keep
    the data order and the last, partial batch."""

    splits: dict[str, Dataset]
    batch_size: int
    seed: int
    num_workers: int

    def load(self) -> None:
        raise NotImplementedError

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
