"""ShortGPTConfig validates itself and round-trips through dict, JSON and config.json."""

import json

import pytest
from tiny_models import tiny_model
from transformers import AutoConfig

from shortgpt_hf import ShortGPTConfig, ShortGPTError, __version__, prune


def test_roundtrip_dict_and_json():
    config = ShortGPTConfig(
        removed_layers=[5, 1],
        original_num_hidden_layers=6,
        metric="bi",
        layer_scores=[0.1] * 6,
        calibration={"num_tokens": 10},
    )
    assert config.removed_layers == [1, 5] and config.kept_layers == [0, 2, 3, 4] and config.num_hidden_layers == 4
    assert config.library_version == __version__
    assert ShortGPTConfig.from_dict(config.to_dict()) == config
    assert ShortGPTConfig.from_json_string(config.to_json_string()) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(removed_layers=[1, 1], original_num_hidden_layers=4), "duplicates"),
        (dict(removed_layers=[4], original_num_hidden_layers=4), "outside"),
        (dict(removed_layers=[0, 1], original_num_hidden_layers=2), "every layer"),
        (dict(removed_layers=[0], original_num_hidden_layers=0), "positive"),
        (dict(removed_layers=[0], original_num_hidden_layers=3, mode="skip"), "mode"),
        (dict(removed_layers=[0], original_num_hidden_layers=3, layer_scores=[0.1]), "layer_scores"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ShortGPTError, match=message):
        ShortGPTConfig(**kwargs)


def test_unknown_keys_warn_and_bad_files_fail():
    data = ShortGPTConfig(removed_layers=[0], original_num_hidden_layers=3).to_dict() | {"from_the_future": 1}
    with pytest.warns(UserWarning, match="from_the_future"):
        assert ShortGPTConfig.from_dict(data).removed_layers == [0]
    with pytest.raises(ShortGPTError, match="not valid JSON"):
        ShortGPTConfig.from_json_string("{oops")
    with pytest.raises(ShortGPTError, match="JSON object"):
        ShortGPTConfig.from_json_string("[1, 2]")
    with pytest.raises(ShortGPTError, match="invalid ShortGPT config"):
        ShortGPTConfig.from_dict({"removed_layers": [0]})


def test_record_survives_config_json(tmp_path):
    model = tiny_model("qwen3")
    prune(model, layers=[0, 5])
    model.config.save_pretrained(tmp_path)
    assert "shortgpt" in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert ShortGPTConfig.from_dict(reloaded.shortgpt) == ShortGPTConfig.from_model(model)
