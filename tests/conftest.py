import os

import pytest
import torch

# Two cores: one intra-op thread per test process keeps runs predictable next to other work.
torch.set_num_threads(1)


@pytest.fixture
def tiny_overrides():
    """A digits run small enough for a unit test: few epochs, two students."""
    return ["teacher.epochs=3", "train.epochs=1", "train.batch_size=16", "data.val_per_class=5",
            "data.test_per_class=10", "data.max_unlabeled=200",
            "pseudo.threshold=0.0"]
