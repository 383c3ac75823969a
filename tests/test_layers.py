"""The package's layers point one way, and no two modules import each other.

The layers are written down in pyproject.toml (``[tool.importlinter]``) and docs/architecture.md:
runtime < config < data < models | robustness < label : train : evaluate < outcome < report <
pipeline : runs < cli < __main__. ``lint-imports`` (import-linter) checks them; these tests run it
on the package as it is and on a copy with one upward import planted, which it must refuse.
import-linter has no contract for cycles between single modules (``acyclic_siblings`` looks at
packages), so :func:`module_cycles` finds them with grimp, import-linter's own graph library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts of ``cwd/pyproject.toml``, on the package under ``src``."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([*command, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def module_cycles(package: str) -> list[tuple[str, str]]:
    """Pairs of modules of ``package`` that import each other, directly or through others
    (function-level imports included): ``(a, b)`` where ``a`` imports ``b`` and ``b`` reaches ``a``."""
    graph = grimp.build_graph(package, cache_dir=None)  # no cache folder left in the working directory
    return sorted((m, i) for m in graph.modules for i in graph.find_modules_directly_imported_by(m)
                  if graph.chain_exists(importer=i, imported=m))


def test_the_contracts_hold():
    out = lint_imports(ROOT, ROOT / "src")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "layers point one way KEPT" in out.stdout and "0 broken" in out.stdout


def test_a_planted_upward_import_is_refused(tmp_path):
    """A copy of the package where runtime (the bottom layer) imports the pipeline (near the top):
    lint-imports fails and names the import."""
    shutil.copytree(ROOT / "src" / "noisystudent", tmp_path / "src" / "noisystudent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "src" / "noisystudent" / "runtime" / "planted.py").write_text(
        "from ..pipeline import run_pipeline  # upward: runtime must not know the pipeline\n")
    out = lint_imports(tmp_path, tmp_path / "src")
    assert out.returncode != 0, out.stdout[-4000:]
    assert "layers point one way BROKEN" in out.stdout
    assert "noisystudent.runtime.planted -> noisystudent.pipeline" in out.stdout


def test_no_two_modules_import_each_other():
    assert module_cycles("noisystudent") == []


def test_module_cycles_finds_a_planted_cycle(tmp_path, monkeypatch):
    package = tmp_path / "planted_cycle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b  # a function-level import counts too\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text("from .a import f\n")
    (package / "d.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_cycles("planted_cycle") == [("planted_cycle.a", "planted_cycle.b"),
                                              ("planted_cycle.b", "planted_cycle.c"),
                                              ("planted_cycle.c", "planted_cycle.a")]


def test_importing_the_pipeline_neither_imports_pyplot_nor_switches_matplotlibs_backend():
    """No side effects on import: the pipeline's modules draw with matplotlib's object API, imported
    when a plot is drawn, so a command pays for matplotlib only if it plots and a user's own
    pyplot backend is left as it was."""
    code = ("import sys, noisystudent.pipeline, noisystudent.evaluate.classifier, noisystudent.robustness; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MPLBACKEND="svg")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
