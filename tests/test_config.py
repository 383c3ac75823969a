import pytest
import yaml

from noisystudent.cli import main
from noisystudent.config.schema import (ConfigError, apply_ablation, config_from_dict, config_reference_markdown,
                                 default_config_dict, load_config)


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


def test_ablations_change_only_what_they_name():
    base = default_config_dict()
    no_noise = config_from_dict(apply_ablation(base, "no-noise"))
    assert no_noise.noise.augment is False and no_noise.noise.dropout == 0 and no_noise.noise.drop_path == 0
    assert config_from_dict(apply_ablation(base, "hard-labels")).pseudo.hard is True
    assert config_from_dict(apply_ablation(base, "no-balancing")).pseudo.balance is False
    assert len(config_from_dict(apply_ablation(base, "no-iteration")).students) == 1
    with pytest.raises(ConfigError, match="unknown ablation"):
        apply_ablation(base, "no-teacher")


def test_fingerprint_changes_with_config():
    assert load_config(None).fingerprint() != load_config(None, ["seed=1"]).fingerprint()
    assert load_config(None).fingerprint() == load_config(None).fingerprint()


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
