"""The run-level API behind the command line (noisystudent.runs): its checks on what it is given.
Evaluating and labeling for real are covered through the CLI (test_faults, test_cli_label)."""

import pytest

from noisystudent.config.schema import load_config
from noisystudent.runs import evaluate_config, evaluate_run, run_models
from noisystudent.runtime.errors import NoisyStudentError
from noisystudent.runtime.rundir import CONFIG, SUMMARY, RunDir


def test_a_folder_without_a_summary_is_not_a_finished_run(tmp_path):
    with pytest.raises(NoisyStudentError, match=f"not a finished run directory \\(no {SUMMARY}\\)"):
        run_models(tmp_path)
    (tmp_path / SUMMARY).write_text("{}")
    with pytest.raises(NoisyStudentError, match=f"{SUMMARY} lists no stages"):
        run_models(tmp_path)
    with pytest.raises(NoisyStudentError, match="neither a run directory nor a checkpoint file"):
        evaluate_run(tmp_path / "absent", load_config(None))


def test_evaluate_config_reads_the_runs_own_config_then_the_options(tmp_path):
    """A run's config.yaml as RunDir.open writes it, then --set, --suite and --max-images."""
    cfg = load_config(None, ["seed=7"])
    RunDir.open(tmp_path, cfg, resume=False).release_lock()
    assert (tmp_path / CONFIG).is_file()
    got = evaluate_config(tmp_path, overrides=["evaluate.batch_size=64"], suites="clean,fgsm", max_images=20)
    assert got.seed == 7 and got.evaluate.suites == ["clean", "fgsm"] and got.evaluate.max_images == 20
    assert got.evaluate.batch_size == 64
    assert evaluate_config(tmp_path / "model.pt").seed == load_config(None).seed  # a checkpoint: the default data
