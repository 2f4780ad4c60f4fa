import json

import pytest

from lora_fx import ConfigError, LoraConfig


def test_defaults_are_peft_defaults():
    import dataclasses

    import peft

    ours = LoraConfig()
    theirs = peft.LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        if f.name in ("extra", "peft_type"):
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"r=0 is invalid; expected a positive integer"),
        ({"r": -2}, r"r=-2 is invalid"),
        ({"r": 2.5}, r"r=2.5 is invalid"),
        (
            {"bias": "some"},
            r"bias='some' is invalid; expected one of \['none', 'all', 'lora_only'\]",
        ),
        ({"lora_dropout": 1.5}, r"lora_dropout=1.5 is invalid"),
        ({"init_lora_weights": "pissa_x"}, r"init_lora_weights='pissa_x' is not supported"),
        ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq' needs loftq_config"),
        ({"lora_bias": True, "use_dora": True}, r"lora_bias=True is not supported with use_dora"),
        ({"target_parameters": "experts.w"}, r"target_parameters='experts.w' is invalid"),
        ({"target_modules": [1, 2]}, r"target_modules=\[1, 2\] is invalid"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]=0 is invalid"),
        ({"lora_alpha": float("nan")}, r"lora_alpha=nan is invalid"),
        ({"layers_pattern": "layers"}, r"layers_pattern is only used with layers_to_transform"),
        ({"layers_to_transform": [0], "target_modules": "q.*"}, r"needs target_modules as a list"),
    ],
)
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        LoraConfig(r=0)


def test_scale_rank_and_alpha_patterns():
    cfg = LoraConfig(
        r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"layers.1.v_proj": 2}
    )
    assert cfg.rank_for("model.layers.0.q_proj") == 4
    assert cfg.rank_for("model.layers.0.k_proj") == 8
    assert cfg.alpha_for("model.layers.1.v_proj") == 2
    assert cfg.alpha_for("model.layers.0.v_proj") == 16
    assert cfg.scale_for("model.layers.0.q_proj") == 16 / 4
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scale_for("x") == 8 / 4


def test_round_trip_keeps_unknown_keys(tmp_path):
    import peft

    peft.LoraConfig(r=4, target_modules=["q"], lora_alpha=3).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["some_future_field"] = {"x": 1}
    cfg = LoraConfig.from_dict(data)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (4, 3, ["q"])
    assert cfg.extra["some_future_field"] == {"x": 1}
    out = cfg.to_dict()
    assert out["some_future_field"] == {"x": 1}
    assert out["peft_type"] == "LORA"
    assert set(data) <= set(out)


def test_from_dict_refuses_other_peft_types():
    with pytest.raises(ConfigError, match=r"peft_type='IA3'; lora_fx reads only 'LORA'"):
        LoraConfig.from_dict({"peft_type": "IA3", "r": 8})


def test_set_targets_become_sorted_lists():
    assert LoraConfig(target_modules={"b", "a"}).target_modules == ["a", "b"]
