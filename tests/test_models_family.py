"""The paper's model family: sizes measured on the meta device (no memory, no arithmetic)."""

import pytest
import timm
import torch

from noisystudent.runtime.errors import ConfigError
from noisystudent.models.factory import count_parameters, create_model, model_architecture, resolve_model_name


# The Noisy Student paper's table (millions of parameters at 1000 classes).
PAPER_PARAMS = {"efficientnet_b7": 66e6, "efficientnet_l0": 140e6, "efficientnet_l1": 273e6,
                "efficientnet_l2": 480e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper_within_5_percent(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000, in_chans=3)
    n = count_parameters(model)
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.05, (name, n)
    assert next(model.parameters()).device.type == "meta"


def test_l0_l1_are_timm_efficientnets_with_the_paper_multipliers():
    from timm.models.efficientnet import EfficientNet

    with torch.device("meta"):
        l0 = create_model("efficientnet_l0", 1000, 3)
        l1 = create_model("efficientnet_l1", 1000, 3)
        b0 = create_model("efficientnet_b0", 1000, 3)
    assert isinstance(l0, EfficientNet) and isinstance(l1, EfficientNet)
    assert timm.is_model("efficientnet_l0") and timm.is_model("efficientnet_l1")
    # depth 3.7: stage repeats ceil(3.7 * (1, 2, 2, 3, 3, 4, 1)); width 2.8 / 3.9: stem 32 -> 88 / 128
    assert [len(s) for s in l0.blocks] == [4, 8, 8, 12, 12, 15, 4]
    assert l0.conv_stem.out_channels == 88 and l1.conv_stem.out_channels == 128
    assert b0.conv_stem.out_channels == 32
    assert l0.pretrained_cfg["input_size"] == (3, 380, 380)
    assert l0.pretrained_cfg["test_input_size"] == (3, 600, 600)
    assert model_architecture(l1) == "efficientnet_l1"


def test_paper_aliases_resolve():
    assert resolve_model_name("B7") == "efficientnet_b7"
    assert resolve_model_name("EfficientNet-L0") == "efficientnet_l0"
    assert resolve_model_name("efficientnet-l2") == "efficientnet_l2"
    assert resolve_model_name("ns_cnn_s") == "ns_cnn_s"
    with torch.device("meta"):
        assert model_architecture(create_model("L1", 10, 3)) == "efficientnet_l1"


def test_noise_arguments_reach_the_model():
    with torch.device("meta"):
        m = create_model("efficientnet_l0", 10, 1, dropout=0.5, drop_path=0.2)
    assert m.drop_rate == 0.5
    rates = [b.drop_path.drop_prob for s in m.blocks for b in s if hasattr(b.drop_path, "drop_prob")]
    assert max(rates) == pytest.approx(0.2, abs=0.01)  # survival 0.8 at the last block
    assert m.conv_stem.in_channels == 1 and m.classifier.out_features == 10


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("efficientnet_l9", 10, 3)
