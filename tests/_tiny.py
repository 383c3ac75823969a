"""What many tests share: the tiny-run preset, the tiny network and the torchrun launcher.

* :data:`DIGITS` / :func:`tiny` are the one preset of ``--set`` overrides for a real run of the
  embedded digits at unit-test size; a test adds only what it is about (``tiny("students=[]")``;
  a later override of the same key wins).
* :class:`TinyNet` is the tiny network of the training and labeling tests.
* :func:`torchrun` / :func:`torchrun_argv` start ``python -m torch.distributed.run`` with two CPU processes.

Importable from the test files and from the scripts the tests start as subprocesses (tests/ is
on ``sys.path`` of both). Holds no tests itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.nn as nn

# The digits at unit-test size: small validation and test splits, batches of 16, fp32 (`auto`
# precision is chosen by timing, which two runs compared for equality could choose differently,
# and timing it costs seconds on every stage).
DIGITS = ["train.batch_size=16", "data.val_per_class=5", "data.test_per_class=10", "train.precision=fp32",
          "pseudo.precision=fp32", "evaluate.suites=[clean]"]  # the default's robustness suites: their own tests
# ... and a short chain: 3 teacher epochs, 1 per student (two, the default), 200 pool images,
# every pseudo label kept.
TINY_RUN = DIGITS + ["teacher.epochs=3", "train.epochs=1", "data.max_unlabeled=200", "pseudo.threshold=0.0"]


def tiny(*extra: str) -> list[str]:
    """The tiny-run preset followed by ``extra`` overrides (which win over the preset's)."""
    return TINY_RUN + list(extra)


def cli_sets(overrides: list[str]) -> list[str]:
    """``--set`` arguments of the command line for ``overrides``."""
    return [a for o in overrides for a in ("--set", o)]


class TinyNet(nn.Module):
    """Two 3x3 convolutions (the second with stride 2) and a linear head on a 4x4 grid.

    ``batch_norm=False`` (the default): no BatchNorm and no dropout, so a training step depends
    only on the batch's contents: one process with batch B and two processes with B/2 each must
    make the same update. ``batch_norm=True``: Conv-BN-ReLU with non-trivial running statistics
    (so BN folding matters) and a head scaled up so that top-1 is not a coin toss, the teacher of
    the labeling tests. Weights are drawn from ``torch.manual_seed(seed)``.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, batch_norm: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=not batch_norm)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=not batch_norm)
        self.bn1, self.bn2 = (nn.BatchNorm2d(16), nn.BatchNorm2d(32)) if batch_norm else (nn.Identity(), nn.Identity())
        self.fc = nn.Linear(32 * 4 * 4, num_classes)
        if batch_norm:
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
            self.fc.weight.data.mul_(12.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def free_port() -> int:
    """A TCP port free at the time of asking, for processes a test starts by hand."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGS...``:
    ``--standalone`` lets the OS pick the rendezvous port, so tests run in parallel safely."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """:func:`torchrun_argv` run to its end with one OpenMP thread per process; asserts it
    succeeded (showing the end of its output if not)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun_argv(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


class Crash(Exception):
    """A process killed mid-step (raised by :class:`CrashAt`)."""


class CrashAt(torch.utils.data.Dataset):
    """Raises at the ``at``-th image it loads: a process killed mid-step, nothing saved at that point."""

    def __init__(self, dataset, at=None):
        self.dataset, self.at, self.loaded = dataset, at, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.loaded += 1
        if self.loaded == self.at:
            raise Crash("killed")
        return self.dataset[i]
