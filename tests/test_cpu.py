"""CPU threads (noisystudent.runtime.cpu): fewer where other processes keep cores busy, at start-up
and while training, PyTorch's defaults where the machine is free, the user's own settings always."""

import json
import os
import subprocess
import sys

import pytest
import torch

from noisystudent.runtime import cpu

TWO_CORES = {"cpus": 2, "physical": 2, "quota": None}


def configure(env: dict, busy: float | None, cores: dict = TWO_CORES) -> dict:
    return cpu.configure(env, busy=lambda: busy, cores=cores)


def test_an_idle_machine_keeps_pytorchs_defaults():
    env = {}
    decided = configure(env, busy=0.1)
    assert env == {} and decided["threads"]["threads"] == 2 and decided["governed"]


def test_cores_busy_with_other_work_mean_fewer_threads():
    env = {}
    decided = configure(env, busy=1.9)  # another process keeps both cores busy
    assert env["OMP_NUM_THREADS"] == "1" and decided["set"]["OMP_NUM_THREADS"] == "1"
    assert decided["threads"]["others_busy_cores"] == 1.9
    big = {"cpus": 16, "physical": 16, "quota": None}
    for busy, threads in ((4.2, "12"), (0.4, None), (30.0, "1")):
        env = {}
        configure(env, busy=busy, cores=big)
        assert env.get("OMP_NUM_THREADS") == threads


def test_a_cgroup_quota_caps_the_threads():
    env = {}
    configure(env, busy=0.0, cores={"cpus": 8, "physical": 8, "quota": 2.5})
    assert env["OMP_NUM_THREADS"] == "3"  # PyTorch alone would start 8 threads on 2.5 CPUs


def test_smt_siblings_are_not_extra_threads():
    env = {}
    configure(env, busy=0.0, cores={"cpus": 8, "physical": 4, "quota": None})
    assert "OMP_NUM_THREADS" not in env  # PyTorch's default (the physical cores) is right


def test_the_users_settings_win():
    env = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    decided = configure(env, busy=2.0)
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"} and decided["set"] == {}
    assert decided["kept"] == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"} and not decided["governed"]
    env = {cpu.OFF_VARIABLE: "0"}
    decided = configure(env, busy=2.0)
    assert "disabled" in decided["note"] and env == {cpu.OFF_VARIABLE: "0"} and not decided["governed"]


def test_a_child_process_chooses_its_threads_again():
    env = {}
    configure(env, busy=2.0)  # the parent, on a busy machine
    assert env["OMP_NUM_THREADS"] == "1"
    configure(env, busy=0.0)  # its child, started when the machine is free again
    assert "OMP_NUM_THREADS" not in env and cpu.OURS_VARIABLE not in env


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_other_processes_cpu_use_is_measured():
    busy = cpu.others_busy_cores(0.05)
    assert busy is not None and 0.0 <= busy <= os.cpu_count() + 0.5
    cores = cpu.usable_cores()
    assert 1 <= cores["physical"] <= cores["cpus"] <= os.cpu_count()


@pytest.mark.parametrize("user_threads", [None, "1"])
def test_the_cli_chooses_threads_before_torch_loads(user_threads):
    """`noisystudent ...` (cli.main) configures first, before anything imports torch: the thread
    count it chose is the one torch starts with; the user's OMP_NUM_THREADS reaches torch untouched."""
    code = ("import contextlib, io, json, sys; import noisystudent.cli as cli; assert 'torch' not in sys.modules; "
            "out = io.StringIO(); redirect = contextlib.redirect_stdout(out); redirect.__enter__(); "
            "cli.main(['config', '--markdown']); redirect.__exit__(None, None, None); "
            "import torch; from noisystudent.runtime import cpu; c = cpu.cpu_settings(); "
            "print(json.dumps({'threads': torch.get_num_threads(), "
            "'chosen': c['configured']['threads'].get('threads'), 'note': c['configured']['note']}))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", cpu.OURS_VARIABLE, cpu.OFF_VARIABLE)}
    if user_threads:
        env["OMP_NUM_THREADS"] = user_threads
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if user_threads:
        assert result == {"threads": 1, "chosen": None, "note": "OMP_NUM_THREADS is set in the environment"}
    else:
        assert result["note"] == "" and result["threads"] == result["chosen"] >= 1


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_governor_follows_the_other_processes(monkeypatch, torch_threads):
    """While training, the thread count drops when another process takes the cores and comes
    back when it leaves; a torch.set_num_threads of the user's ends the governing."""
    others = []
    monkeypatch.setattr(cpu._Sample, "others_since", lambda self, earlier: others[-1])
    decided = {"governed": True, "set": {}, "cores": TWO_CORES}
    torch.set_num_threads(2)  # PyTorch's default on two cores, as start-up left it
    governor = cpu.ThreadGovernor("student-1", recheck=0.0, decided=decided)
    assert governor.active
    for busy, threads in ((0.2, 2), (1.8, 1), (1.0, 1), (0.1, 2)):
        others.append(busy)
        governor.tick()
        assert torch.get_num_threads() == threads
    assert governor.changes == [{"threads": 1, "others_busy_cores": 1.8}, {"threads": 2, "others_busy_cores": 0.1}]
    next_stage = cpu.ThreadGovernor("student-2", recheck=0.0, decided=decided)  # continues the schedule
    others.append(1.9)
    next_stage.tick()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)  # the user's choice, in code
    others.append(1.9)
    next_stage.tick()
    assert torch.get_num_threads() == 2 and not next_stage.active and not decided["governed"]


def test_the_governor_leaves_threads_set_in_code_alone(monkeypatch, torch_threads):
    monkeypatch.setattr(cpu._Sample, "others_since", lambda self, earlier: 2.0)
    torch.set_num_threads(1)  # e.g. the tests' conftest, or a benchmark's --threads
    governor = cpu.ThreadGovernor(recheck=0.0, decided={"governed": True, "set": {}, "cores": TWO_CORES})
    assert not governor.active
    assert not cpu.ThreadGovernor(decided={"governed": False, "set": {}}).active


def test_the_cpu_description_names_the_model_and_native_bf16(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    described = cpu.cpu_description(info)
    assert described["model"] == "AMD EPYC 9R14" and described["native_bf16"] is True
    assert described["cores"] == cpu.usable_cores()["cpus"]
    info.write_text("model name\t: Intel Xeon\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu.cpu_description(info)["native_bf16"] is False
    missing = cpu.cpu_description(tmp_path / "absent")
    assert missing["native_bf16"] is None and missing["model"]


def test_importing_the_package_has_no_side_effects():
    """`import noisystudent` (and its API modules) leaves the environment as it was and loads no
    torch: choosing the CPU threads is an explicit call (configure_cpu), which the CLI makes."""
    code = ("import json, os, sys; before = dict(os.environ); "
            "import noisystudent, noisystudent.cli, noisystudent.config.schema; "
            "from noisystudent.runtime import cpu; "
            "print(json.dumps({'same_env': dict(os.environ) == before, 'torch': 'torch' in sys.modules, "
            "'configured': bool(cpu._applied)}))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", cpu.OURS_VARIABLE, cpu.OFF_VARIABLE)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"same_env": True, "torch": False, "configured": False}


def test_configure_decides_once_per_process():
    """The CLI configures, then run_pipeline configures again: the second call returns the first
    decision (no second sample, no change to the environment)."""
    code = ("import json, os; from noisystudent.runtime import cpu; "
            "first = cpu.configure(); env = dict(os.environ); second = cpu.configure(); "
            "print(json.dumps({'same': first == second, 'env_same': env == dict(os.environ)}))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", cpu.OURS_VARIABLE, cpu.OFF_VARIABLE)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"same": True, "env_same": True}
