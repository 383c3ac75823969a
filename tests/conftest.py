import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test: the tests use tiny tensors, where OpenMP hand-offs cost more
    than they save, and on a shared 2-core machine two threads can be many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides():
    """A digits run small enough for a unit test: few epochs, two students."""
    return ["teacher.epochs=3", "train.epochs=1", "train.batch_size=16", "data.val_per_class=5",
            "data.test_per_class=10", "data.max_unlabeled=200", "pseudo.threshold=0.0"]
