import pytest
import yaml

import os

from noisystudent.cli import main
from noisystudent.config.markdown import config_reference_markdown
from noisystudent.config.schema import (ABLATIONS, ConfigError, PseudoLabelConfig, config_from_dict, load_config,
                                        save_config)
from noisystudent.config.stages import resolve_stages, stage_seed
from noisystudent.data.transforms import train_transform


def test_default_config_is_the_digits_experiment():
    cfg = load_config(None)
    assert cfg.data.source == "digits"
    assert [s.model for s in cfg.students] == ["ns_cnn_s", "ns_cnn_m"]


def test_unknown_key_names_the_dotted_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'pseudo\.treshold' \(did you mean 'pseudo\.threshold'\?\)"):
        config_from_dict({"pseudo": {"treshold": 0.3}})


@pytest.mark.parametrize("raw,msg", [
    ({"pseudo": {"threshold": 1.5}}, r"'pseudo\.threshold' must be <= 1"),
    ({"train": {"unlabeled_ratio": -1}}, r"'train\.unlabeled_ratio' must be >= 0"),
    ({"train": {"epochs": "ten"}}, r"'train\.epochs' must be a number"),
    ({"data": {"source": "mnist"}}, r"'data\.source' must be one of"),
    ({"students": [{"model": "ns_cnn_s", "dropot": 0.1}]}, r"unknown config key 'students\[0\]\.dropot'"),
    ({"evaluate": {"suites": ["clean", "bogus"]}}, r"unknown suite 'bogus'"),
])
def test_bad_values_are_rejected_with_the_key(raw, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(raw)


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
    cfg = load_config(None, ["train.epochs=2.5", "pseudo.hard=true", "students.1.model=ns_cnn_l",
                             "evaluate.suites=[clean,fgsm]"])
    assert cfg.train.epochs == 2.5 and cfg.pseudo.hard is True
    assert cfg.students[1].model == "ns_cnn_l"
    assert cfg.evaluate.suites == ["clean", "fgsm"]
    with pytest.raises(ConfigError, match="index out of range"):
        load_config(None, ["students.5.model=x"])


def _stages(*args, **kw):
    return {s.name: s for s in resolve_stages(load_config(*args, **kw))}


def test_ablations_change_only_what_they_name():
    base = _stages(None)
    no_noise = _stages(None, ablation="no-noise")
    for name in ("student-1", "student-2"):
        s = no_noise[name]
        assert (s.noise.augment, s.dropout, s.drop_path, s.noise.dropout, s.noise.drop_path) == (False, 0, 0, 0, 0)
        assert (s.lr, s.epochs, s.model) == (base[name].lr, base[name].epochs, base[name].model)
    no_aug = _stages(None, ablation="no-augmentation")["student-1"]
    assert no_aug.noise.augment is False and (no_aug.dropout, no_aug.drop_path) == (0.3, 0.1)
    assert load_config(None, ["pseudo.hard=false"], ablation="hard-labels").pseudo.hard is True
    assert load_config(None, ablation="soft-labels").pseudo.hard is False  # the default chooses hard labels
    assert load_config(None, ablation="no-balancing").pseudo.balance is False
    assert list(_stages(None, ablation="no-iteration")) == ["teacher", "student-1"]
    with pytest.raises(ConfigError, match="config key 'ablation': unknown ablation 'no-teacher'"):
        config_from_dict({"ablation": "no-teacher"})
    with pytest.raises(ConfigError, match="already applies ablation 'hard-labels'"):
        load_config(None, ["ablation=hard-labels"], "no-noise")


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_the_teacher_keeps_the_configs_noise_under_every_ablation(ablation):
    for chain in ([], ["chain=cpu"]):
        cfg = load_config(None, chain, ablation)
        teacher = _stages(None, chain)["teacher"]
        assert resolve_stages(cfg)[0] == teacher
        assert cfg.noise == load_config(None, chain).noise
        assert (teacher.dropout, teacher.drop_path, teacher.noise.augment) == (0.3, 0.1, True)


def test_chain_preset_first_then_ablation():
    # the preset writes every stage's dropout and drop path; applied after no-noise it would undo it
    stages = _stages(None, ["chain=cpu"], "no-noise")
    assert list(stages) == ["teacher", "baseline", "student-1", "student-2", "student-3"]
    assert [s.model for s in stages.values()] == ["ns_cnn_s", "ns_cnn_l", "ns_cnn_s", "ns_cnn_m", "ns_cnn_l"]
    assert all((s.dropout, s.drop_path, s.noise.augment) == (0, 0, False)
               for name, s in stages.items() if name not in ("teacher", "baseline"))
    # the baseline is trained like the teacher: the ablation acts on students only
    assert stages["baseline"].noise == stages["teacher"].noise and stages["baseline"].noise.augment
    # no-iteration keeps the preset's first student, not the config's student list cut then re-expanded
    assert [s.model for s in resolve_stages(load_config(None, ["chain=cpu"], "no-iteration"))] == \
        ["ns_cnn_s", "ns_cnn_s"]  # no baseline: the final architecture is the teacher's
    # the same order from a plain dict, where the preset sets a dropout the ablation must override
    plain = config_from_dict({"chain": "cpu", "ablation": "no-noise"})
    assert [(s.dropout, s.drop_path, s.augment) for s in plain.students] == [(0, 0, False)] * 3


def test_an_ablation_run_config_loads_back_the_same(tmp_path):
    # a resumed run reloads its config.yaml: the preset is expanded again, the ablation re-applied
    cfg = load_config(None, ["chain=cpu-fixres"], "no-noise")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg  # not re-expanded into the preset's dropout
    assert resolve_stages(again) == resolve_stages(cfg)


def test_default_run_resolves_to_the_numbers_it_always_used():
    stages = resolve_stages(load_config(None))
    assert [(s.name, s.role, s.model) for s in stages] == [
        ("teacher", "teacher", "ns_cnn_s"), ("baseline", "baseline", "ns_cnn_m"), ("student-1", "student", "ns_cnn_s"),
        ("student-2", "student", "ns_cnn_m")]
    assert [s.epochs for s in stages] == [150, 150, 30, 30]
    for s in stages:
        assert (s.image_size, s.test_size, s.dropout, s.drop_path, s.lr, s.batch_size) == (16, 16, 0.3, 0.1, 0.05, 32)
        assert (s.noise.augment, s.noise.randaugment_ops, s.noise.randaugment_magnitude) == (True, 2, 9)
    assert stages[0].unlabeled_ratio == stages[1].unlabeled_ratio == 0 and stages[1].labeling is None
    assert all(s.unlabeled_ratio == 3 and s.labeling.top_k == 10 and s.labeling.temperature == 1.0
               and s.labeling.hard is True and s.labeling.batch_size == 256 for s in stages[2:])  # digits: hard


def test_fixres_stage_resolves_from_the_last_student_and_finetune():
    stages = resolve_stages(load_config(None, ["chain=cpu-fixres"]))
    last, fixres = stages[-2], stages[-1]
    assert (last.image_size, last.test_size) == (20, 28)
    assert (fixres.name, fixres.role, fixres.model) == ("fixres", "fixres", last.model)
    assert (fixres.image_size, fixres.test_size, fixres.epochs, fixres.batch_size) == (28, 28, 1.5, 32)
    assert fixres.lr == pytest.approx(last.lr / 10) and fixres.noise.augment is False
    assert (fixres.dropout, fixres.drop_path, fixres.frozen_blocks, fixres.pretrained) == (0.3, 0.1, None, None)
    tuned = resolve_stages(load_config(None, ["chain=cpu-fixres", "finetune.frozen_blocks=2",
                                              "finetune.batch_size=8", "finetune.epochs=0.5"]))[-1]
    assert (tuned.frozen_blocks, tuned.batch_size, tuned.epochs) == (2, 8, 0.5)
    assert resolve_stages(load_config(None, ["finetune.enabled=false", "chain=cpu-fixres"]))[-1].name == "student-3"
    assert resolve_stages(load_config(None, ["finetune.enabled=true"]))[-1].image_size == 16


def test_an_explicit_zero_is_a_value_not_a_missing_one():
    cfg = config_from_dict({"chain": "cpu-fixres", "train": {"lr": 0.1},
                            "students": [{"lr": 0, "epochs": 0}, {"dropout": 0}, {"lr": 0}]})
    stages = {s.name: s for s in resolve_stages(cfg)}
    assert (stages["student-1"].lr, stages["student-1"].epochs) == (0, 0)
    assert stages["student-2"].lr == 0.1
    assert stages["fixres"].lr == 0  # the last stage's lr / 10, not train.lr / 10
    cfg = config_from_dict({"chain": "cpu-fixres", "finetune": {"lr": 0}})
    assert resolve_stages(cfg)[-1].lr == 0 and resolve_stages(cfg)[-2].lr == 0.05
    assert config_from_dict({"teacher": {"dropout": 0, "augment": False}}).teacher.dropout == 0
    teacher = resolve_stages(config_from_dict({"teacher": {"dropout": 0, "drop_path": 0, "augment": False}}))[0]
    assert (teacher.dropout, teacher.drop_path, teacher.noise.augment) == (0, 0, False)


def test_a_student_can_have_stronger_input_noise_than_its_teacher():
    cfg = config_from_dict({"noise": {"randaugment_magnitude": 5},
                            "students": [{"randaugment_magnitude": 9}, {}]})
    teacher, first, second = resolve_stages(cfg)[:3]
    assert [s.noise.randaugment_magnitude for s in (teacher, first, second)] == [5, 9, 5]
    augment = train_transform(28, 1, (0.5,), (0.5,), first.noise, flip=False).host.transforms[-2]
    assert {op.magnitude for op in augment.ops} == {9}


def test_stage_seeds_differ_per_stage_and_are_stable_across_processes():
    import subprocess
    import sys

    seeds = [s.seed for s in resolve_stages(load_config(None, ["chain=cpu-fixres"]))]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 31 for s in seeds)
    assert [s.seed for s in resolve_stages(load_config(None, ["seed=1", "chain=cpu-fixres"]))] != seeds
    assert stage_seed(0, "student-1") == stage_seed(0, "student-1") != stage_seed(0, "student-2")
    code = "from noisystudent.config.stages import stage_seed; print(stage_seed(7, 'student-2'))"
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h},
                           capture_output=True, text=True, check=True).stdout.strip() for h in ("1", "2")}
    assert outs == {str(stage_seed(7, "student-2"))}
    labeling = [s.labeling.select_seed for s in resolve_stages(load_config(None)) if s.labeling]
    assert len(set(labeling + seeds)) == len(labeling) + len(seeds)


def test_cli_config_prints_each_stages_effective_noise(capsys):
    assert main(["config", "--ablation", "no-noise", "--set", "chain=cpu"]) == 0
    out = capsys.readouterr().out
    assert config_from_dict(yaml.safe_load(out)) == load_config(None, ["chain=cpu"], "no-noise")  # still YAML
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line.startswith("# ") and line.split()[1].startswith(("teacher", "student-"))}
    assert list(rows) == ["teacher", "student-1", "student-2", "student-3"]
    # model, size, test, dropout, drop path, augment, lr, epochs, batch, seed
    assert rows["teacher"][:6] == ["ns_cnn_s", "16", "16", "0.3", "0.1", "2x9"]
    for name in ("student-1", "student-2", "student-3"):
        assert rows[name][3:7] == ["0", "0", "off", "0.05"]
    assert rows["student-3"][0] == "ns_cnn_l"


def test_label_defaults_are_the_configs():
    import inspect

    from noisystudent.cli import build_parser
    from noisystudent.label.inference import label_to_store

    pseudo = PseudoLabelConfig()
    args = build_parser().parse_args(["label", "model.pt", "pool/", "--out", "store/"])
    assert (args.top_k, args.temperature, args.batch_size) == (pseudo.top_k, pseudo.temperature, pseudo.batch_size)
    assert inspect.signature(label_to_store).parameters["top_k"].default == pseudo.top_k


def test_fingerprint_changes_with_config():
    assert load_config(None).fingerprint() != load_config(None, ["seed=1"]).fingerprint()
    assert load_config(None).fingerprint() == load_config(None).fingerprint()


def test_a_key_added_at_its_default_leaves_the_fingerprint_as_it_was():
    """The fingerprint hashes what differs from the defaults: a run made before an upgrade that adds
    a key still resumes, and the accuracy benchmark's cached oracles still hit."""
    import dataclasses

    from noisystudent.config.schema import StageConfig

    @dataclasses.dataclass
    class UpgradedPseudo(PseudoLabelConfig):
        new_key: int = 4

    @dataclasses.dataclass
    class UpgradedStage(StageConfig):
        new_stage_key: float = 0.5

    cfg = load_config(None, ["seed=3", "pseudo.threshold=0.4"])
    upgraded = dataclasses.replace(cfg, pseudo=UpgradedPseudo(**dataclasses.asdict(cfg.pseudo)),
                                   students=[UpgradedStage(**dataclasses.asdict(s)) for s in cfg.students])
    assert upgraded.fingerprint() == cfg.fingerprint()
    assert dataclasses.replace(upgraded, pseudo=dataclasses.replace(upgraded.pseudo, new_key=5)).fingerprint() \
        != cfg.fingerprint()
    moved = [dataclasses.replace(upgraded.students[0], new_stage_key=0.6), *upgraded.students[1:]]
    assert dataclasses.replace(upgraded, students=moved).fingerprint() != cfg.fingerprint()
    # a key set to its default is no change; a key moved off it, or one student more, is
    assert load_config(None, ["pseudo.ensemble_size=1"]).fingerprint() == load_config(None).fingerprint()
    students = load_config(None).students
    assert load_config(None, [f"students=[{', '.join('{model: %s}' % s.model for s in students * 2)}]"]
                       ).fingerprint() != load_config(None).fingerprint()


def test_reference_lists_every_section():
    md = config_reference_markdown()
    for key in ("`pseudo.threshold`", "`train.unlabeled_ratio`", "`students[i].model`", "`noise.drop_path`"):
        assert key in md


def test_docs_configuration_reference_is_current():
    from pathlib import Path

    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text().strip() == config_reference_markdown().strip(), \
        "regenerate with: noisystudent config --markdown > docs/configuration.md"


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    assert main(["run", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["noisystudent: error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"]
    assert not (tmp_path / "run").exists()


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("ablation", [None, *ABLATIONS])
@pytest.mark.parametrize("source", [None, "configs/fashion-mnist.yaml", "configs/image-folder.yaml", "chain=cpu-fixres"])
def test_a_config_reloaded_from_its_config_yaml_has_the_same_fingerprint(tmp_path, source, ablation):
    """`noisystudent run --resume RUN_DIR` reloads RUN_DIR/config.yaml: it must fingerprint as the
    config that wrote it (a schema default of 0 for a float key once read back as 0.0, and every
    default run was refused as "made by a different config")."""
    from pathlib import Path

    root = Path(__file__).parent.parent
    path, overrides = (None, [source]) if source and "=" in source else (source and root / source, [])
    cfg = load_config(path, overrides, ablation)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").fingerprint() == cfg.fingerprint()
    # and values set from Python with ints for float keys hash as the loaded floats do
    cfg.train.warmup_epochs, cfg.train.epochs = int(cfg.train.warmup_epochs), int(cfg.train.epochs)
    assert cfg.fingerprint() == load_config(tmp_path / "config.yaml").fingerprint()
