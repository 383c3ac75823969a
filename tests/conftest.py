"""Fixtures of the whole suite: one torch thread, the tiny-run preset, and the real runs that the
tests which only read a run share (built once per session, also under pytest-xdist).

A test that changes a shared run works on its own copy: ``shutil.copytree(finished_run, tmp_path / "run")``.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import torch
from filelock import FileLock

from _tiny import cli_sets, tiny

# The tiny preset's chain, through the command line, with TensorBoard logs (the `tiny_run` fixture).
TINY_CLI_RUN = tiny("tensorboard=true")


SHARED_RUNS = ("finished_run", "tiny_run")


def pytest_collection_modifyitems(items):
    """A test that reads a shared run is `slow`: alone, it waits for the whole run to be built.
    Other slow tests carry @pytest.mark.slow themselves.

    Then the modules with the most slow tests go first, each module's tests in their own order:
    pytest-xdist (--dist loadscope) hands whole modules to workers in this order, and the longest
    first keeps one worker from starting the slowest module when the other is nearly done."""
    for item in items:
        if set(SHARED_RUNS) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: the order within a module is kept


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_session():
    """Session- and module-scoped fixtures (the shared runs) run before the per-test fixture below;
    pytest-xdist runs one worker per core, so one thread each there as well."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test: the tests use tiny tensors, where OpenMP hand-offs cost more
    than they save, and on a shared 2-core machine two threads can be many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A digits run small enough for a unit test: few epochs, two students (tests/_tiny.py)."""
    return tiny()


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(folder / "run")`` once per test session, in a folder that every pytest-xdist worker
    of the session shares (a file lock makes the others wait for the first); returns the run.
    A build that failed is reported by the workers after it too, not built again."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base is <session>/popen-gwN: the session's folder is its parent.
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"shared-{name}"
    with FileLock(str(folder) + ".lock"):
        failed = folder.with_name(folder.name + ".failed")
        if failed.is_file():
            pytest.fail(f"building the shared run {name} failed in another worker: {failed.read_text()}")
        if not (folder / "built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder / "run")
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
            (folder / "built").touch()
    return folder / "run"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished run with everything in it (tests/_report_run.py: three students, fix-res, every
    robustness suite, a pool folder with unreadable images). Read-only: copy it to change it."""
    import _report_run

    return build_once(tmp_path_factory, "finished", _report_run.make_run)


def _tiny_cli_run(root: Path) -> None:
    from noisystudent.cli import main

    assert main(["run", "--out", str(root), "--quiet", *cli_sets(TINY_CLI_RUN)]) == 0


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """``noisystudent run --out RUN --set ...`` of :data:`TINY_CLI_RUN`: a teacher and two
    students in seconds. Read-only: copy it to change it."""
    return build_once(tmp_path_factory, "tiny", _tiny_cli_run)
