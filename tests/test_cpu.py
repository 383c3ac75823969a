"""Start-up CPU settings (noisystudent.runtime.cpu): fewer threads and a short OpenMP spin where
the machine is shared, PyTorch's defaults where it is not, and the user's own settings always."""

import json
import os
import subprocess
import sys

import pytest

from noisystudent.runtime import cpu

TWO_CORES = {"cpus": 2, "physical": 2, "quota": None}


def configure(env: dict, busy: float | None, cores: dict = TWO_CORES) -> dict:
    return cpu.configure(env, busy=lambda: busy, cores=cores)


def test_an_idle_machine_keeps_pytorchs_threads_and_gets_a_short_spin():
    env = {}
    decided = configure(env, busy=0.1)
    assert env == {"GOMP_SPINCOUNT": str(cpu.SPIN_COUNT)} and decided["threads"]["threads"] == 2
    assert cpu.SPIN_COUNT < 300000  # libgomp's own default spins ~7 ms: the collapse on a shared CPU


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
    assert decided["kept"] == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "0"}
    configure(env, busy=0.0)
    assert env == {"GOMP_SPINCOUNT": "0"}
    env = {cpu.OFF_VARIABLE: "0"}
    assert "disabled" in configure(env, busy=2.0)["note"] and env == {cpu.OFF_VARIABLE: "0"}


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


def test_the_cli_configures_openmp_before_torch_loads():
    """`noisystudent ...` imports the package (and so configure) before anything imports torch;
    the user's OMP_NUM_THREADS reaches torch untouched, the spin count is ours."""
    code = ("import noisystudent.cli, os, torch, json; from noisystudent.runtime import cpu; "
            "print(json.dumps({'threads': torch.get_num_threads(), 'note': cpu.cpu_settings()['configured']['note'], "
            "'spin': os.environ.get('GOMP_SPINCOUNT')}))")
    env = {k: v for k, v in os.environ.items() if k not in cpu.WAIT_KNOBS and k != cpu.OFF_VARIABLE}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"threads": 1, "note": "", "spin": str(cpu.SPIN_COUNT)}
