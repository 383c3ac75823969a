"""Model family listing and chain presets."""

import dataclasses

import pytest

from noisystudent.config.schema import StageConfig
from noisystudent.runtime.errors import ConfigError
from noisystudent.config.family import CHAIN_PRESETS, chain_preset
from noisystudent.models.zoo import format_model_table, model_family, model_spec, stage_defaults


def test_family_lists_b0_to_b7_and_l0_l1_l2_with_paper_defaults():
    specs = {s.label: s for s in model_family(measure=False, include_cpu=False)}
    assert list(specs) == [f"EfficientNet-B{i}" for i in range(8)] + ["EfficientNet-L0", "EfficientNet-L1",
                                                                      "EfficientNet-L2"]
    assert (specs["EfficientNet-L0"].width, specs["EfficientNet-L0"].depth) == (2.8, 3.7)
    assert (specs["EfficientNet-L1"].width, specs["EfficientNet-L1"].depth) == (3.9, 3.7)
    assert (specs["EfficientNet-L2"].width, specs["EfficientNet-L2"].depth) == (4.3, 5.3)
    assert (specs["EfficientNet-L2"].train_size, specs["EfficientNet-L2"].test_size) == (475, 800)
    assert (specs["EfficientNet-L0"].train_size, specs["EfficientNet-L0"].test_size) == (380, 600)
    assert (specs["EfficientNet-B7"].train_size, specs["EfficientNet-B7"].test_size) == (600, 600)
    dropout = {k[-2:]: s.dropout for k, s in specs.items()}
    assert dropout == {"B0": 0.2, "B1": 0.2, "B2": 0.3, "B3": 0.3, "B4": 0.4, "B5": 0.4, "B6": 0.5,
                       "B7": 0.5, "L0": 0.5, "L1": 0.5, "L2": 0.5}
    assert all(s.drop_path == 0.2 for s in specs.values())  # survival 0.8 at the last block
    assert specs["EfficientNet-B0"].pretrained == "tf_efficientnet_b0.ns_jft_in1k"


def test_measured_size_and_cost():
    b0, s = model_family(names=["efficientnet_b0", "ns_cnn_s"])
    assert abs(b0.params - 5.3e6) / 5.3e6 < 0.05
    assert 0.37e9 < b0.macs < 0.41e9  # EfficientNet-B0: 0.39B "FLOPs" (multiply-adds) at 224 px
    assert s.params > 0 and 0 < s.macs < 1e8


def test_model_table_lists_resolutions_noise_and_counts():
    table = format_model_table(names=["efficientnet_b0", "ns_cnn_m"])
    row = next(line for line in table.splitlines() if line.startswith("efficientnet_b0 "))
    assert "5.29M" in row and "0.39" in row and "224" in row and "tf_efficientnet_b0.ns_jft_in1k" in row
    assert any(line.startswith("ns_cnn_m ") for line in table.splitlines())
    assert "GMACs" in table and "drop path" in table


def test_paper_chain_preset():
    chain = chain_preset("paper")
    assert [d["model"] for d in chain] == ["efficientnet_b7", "efficientnet_b7", "efficientnet_l0",
                                           "efficientnet_l1", "efficientnet_l2", "efficientnet_l2"]
    assert chain[-1] == {"model": "efficientnet_l2", "image_size": 475, "test_size": 800, "dropout": 0.5,
                         "drop_path": 0.2}


@pytest.mark.parametrize("name", sorted(CHAIN_PRESETS))
def test_every_preset_is_a_list_of_stage_configs(name):
    chain = chain_preset(name)
    assert len(chain) >= 2
    fields = {f.name for f in dataclasses.fields(StageConfig)}
    for d in chain:
        assert set(d) == {"model", "image_size", "test_size", "dropout", "drop_path"} <= fields
        StageConfig(**d)
        assert model_spec(d["model"]) is not None


def test_cpu_chains():
    assert [d["model"] for d in chain_preset("cpu")] == ["ns_cnn_s", "ns_cnn_s", "ns_cnn_m", "ns_cnn_l"]
    fixres = chain_preset("cpu-fixres")
    assert all(d["image_size"] == 20 for d in fixres)
    assert fixres[-1]["test_size"] == 28 and all(d["test_size"] == 20 for d in fixres[:-1])
    chain_preset("cpu")[0]["model"] = "changed"  # callers get copies
    assert chain_preset("cpu")[0]["model"] == "ns_cnn_s"


def test_unknown_preset_and_stage_defaults():
    with pytest.raises(ConfigError, match="unknown chain preset 'papr'"):
        chain_preset("papr")
    assert stage_defaults("L2") == {"image_size": 475, "test_size": 800, "dropout": 0.5, "drop_path": 0.2}
    assert stage_defaults("resnet18") == {}
