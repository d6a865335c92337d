"""The state-tracking claim of Grazzi et al., 2024 on parity: trained on strings of length <= 40,
one layer of DeltaNet with β in [0, 2] or Mamba with eigenvalues in [-1, 1] gets the parity of
strings of length 128 and 256 right, while the same layers with eigenvalues in [0, 1] stay near
chance. Protocol and model in ``state_tracking.py`` (next to this file)."""

from __future__ import annotations

import pytest
import torch

from state_tracking import VARIANTS, accuracy_by_length, parity_batch, run_variant


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_parity_batch_labels_are_the_running_parity():
    bits, parity = parity_batch(3, 5, torch.Generator().manual_seed(0))
    assert bits.shape == parity.shape == (3, 5)
    for row_bits, row_parity in zip(bits.tolist(), parity.tolist()):
        assert row_parity == [sum(row_bits[:t + 1]) % 2 for t in range(5)]


def test_accuracy_by_length_reads_the_prefix_of_that_length():
    """A model that answers the true parity up to position 100 and the wrong one after it."""

    class Oracle(torch.nn.Module):
        def forward(self, bits):
            parity = bits.cumsum(1) % 2
            parity[:, 100:] = 1 - parity[:, 100:]
            return torch.nn.functional.one_hot(parity, 2).float()

    assert accuracy_by_length(Oracle(), lengths=(40, 100, 101, 256), n_strings=16) == {
        40: 1.0, 100: 1.0, 101: 0.0, 256: 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("key", ["deltanet_neg", "mamba_neg"])
def test_negative_eigenvalues_track_parity_far_beyond_the_training_lengths(key):
    accuracy, result = run_variant(key)
    assert accuracy[40] >= 0.95, (VARIANTS[key], accuracy)
    assert accuracy[128] >= 0.95, (VARIANTS[key], accuracy)
    assert accuracy[256] >= 0.95, (VARIANTS[key], accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["deltanet_pos", "mamba_pos"])
def test_eigenvalues_in_zero_one_stay_near_chance_on_long_strings(key):
    accuracy, result = run_variant(key)
    assert accuracy[256] < 0.65, (VARIANTS[key], accuracy)
