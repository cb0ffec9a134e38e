"""Calibration-data factories for the recalibrate tests (imported as ``tests.data_factories``)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def _dataset() -> TensorDataset:
    return TensorDataset(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(7)))


def make_loader() -> DataLoader:
    return DataLoader(_dataset(), batch_size=4, shuffle=False)


def make_sharded_loader(rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shards itself, as a training script's loader under torchrun does."""
    sampler = DistributedSampler(_dataset(), num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(_dataset(), batch_size=2, sampler=sampler)


def not_iterable() -> int:
    return 3


def raises() -> DataLoader:
    raise RuntimeError("dataset path not found")


def yields_strings() -> list:
    return ["a", "b"]
