"""Installing and starting: configs by name (load_config, `config --list`), `--version`, and the
package built as a wheel, installed into a fresh venv and run from a folder outside the checkout."""

import os
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml

from _tiny import cli_sets, tiny
from noisystudent.cli import main
from noisystudent.config.packaged import config_description, packaged_configs, resolve_config_path
from noisystudent.config.schema import load_config
from noisystudent.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "src" / "noisystudent" / "configs"


def test_packaged_configs_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    expected = load_config(PACKAGED / "fashion-mnist.yaml").to_dict()
    for name in ("fashion-mnist", "fashion-mnist.yaml", "configs/fashion-mnist.yaml"):
        assert load_config(name).to_dict() == expected, name
    assert resolve_config_path("configs/digits.yaml").read_text() == (PACKAGED / "digits.yaml").read_text()
    assert list(packaged_configs()) == sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def test_a_path_that_exists_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    mine = yaml.safe_load((PACKAGED / "digits.yaml").read_text()) | {"seed": 7}
    (tmp_path / "configs" / "digits.yaml").write_text(yaml.safe_dump(mine))
    assert load_config("configs/digits.yaml").seed == 7
    assert load_config("digits").seed == 0  # a bare name with no such file here: the packaged one


@pytest.mark.parametrize("name", ["nope", "configs/nope.yaml", "other/digits.yaml"])
def test_unknown_config_names_list_the_packaged_ones(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(name)
    assert str(e.value) == (f"config file not found: {name} (packaged configs, usable by name from any folder: "
                            "digits, fashion-mnist, image-folder; see `noisystudent config --list`)")


def test_config_list_shows_each_config_with_its_first_sentence(capsys):
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("digits", "fashion-mnist", "image-folder"):
        line = next(line for line in lines if line.split()[0:1] == [name])
        comments = [ln.lstrip("# ") for ln in (PACKAGED / f"{name}.yaml").read_text().splitlines() if ln.startswith("#")]
        shown = line.split(None, 1)[1]
        assert " ".join(comments).startswith(shown) and shown.endswith(".") and len(shown) > 20
    assert config_description(PACKAGED / "image-folder.yaml") == "Template for your own images."


def test_version_names_the_package_and_its_libraries(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    import timm
    import torchvision

    assert capsys.readouterr().out.strip() == (
        f"noisystudent {version('noisystudent')} (torch {version('torch')}, torchvision {version('torchvision')}, "
        f"timm {version('timm')})")
    # the metadata's versions are the imported libraries' (less a local tag such as +cu130)
    for library, imported in (("torch", torch), ("torchvision", torchvision), ("timm", timm)):
        assert version(library) == imported.__version__.split("+")[0]


@pytest.mark.slow
@pytest.mark.slow
def test_output_into_a_closed_pipe_ends_quietly():
    """`noisystudent config fashion-mnist | head -1`: head leaves before the config is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent.cli", "config", "fashion-mnist"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes (its imports take seconds)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize("triton_loaded", [False, True])
def test_a_command_unfreezes_at_exit_where_triton_would_report_leaks(monkeypatch, capsys, triton_loaded):
    """A command freezes its objects before exiting (issue 28); with triton loaded (torch 2.15
    imports triton 3.9, whose nanobind extension reports what is alive at exit as leaked) they
    are handed back to the collector at exit."""
    import atexit
    import gc
    import types

    registered, frozen = [], []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))  # the test process stays unfrozen
    if triton_loaded:
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    else:
        monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(sys, "argv", ["noisystudent", "config", "--list"])
    assert main() == 0 and frozen
    assert registered == ([gc.unfreeze] if triton_loaded else [])


def test_wheel_in_a_fresh_venv_runs_outside_the_checkout(tmp_path):
    """The wheel pip builds, installed into a new venv that sees this environment's torch and
    other dependencies (a .pth line, not their .pth files: the checkout's editable install stays
    out), runs the README's commands from an empty folder."""
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("noisystudent-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    fresh_py = venv / "bin" / "python"
    fresh_site = subprocess.run([str(fresh_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(fresh_site, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh_py), "install", "-q", "--no-deps",
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> str:
        proc = subprocess.run([str(venv / "bin" / "noisystudent"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        return proc.stdout

    where, installed = subprocess.run(
        [str(fresh_py), "-c", "import noisystudent; print(noisystudent.__file__); print(noisystudent.__version__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout's
    assert installed == version("noisystudent")
    assert "fashion-mnist" in cli("config", "--list")
    assert yaml.safe_load(cli("config", "fashion-mnist"))["data"]["source"] == "fashion-mnist"
    out = cli("run", "configs/digits.yaml", "--out", "run", "--quiet",
              *cli_sets(tiny("teacher.epochs=1", "students=[]", "evaluate.suites=[]")))
    assert "run directory: run" in out
    assert (elsewhere / "run" / "summary.json").is_file() and (elsewhere / "run" / "teacher" / "model.pt").is_file()
