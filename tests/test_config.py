import dataclasses
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
        value = getattr(theirs, f.name)
        if f.name == "runtime_config":  # PEFT's LoraRuntimeConfig, kept as its dict
            value = dataclasses.asdict(value)
        assert getattr(ours, f.name) == value, f.name


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
        ({"use_rslora": "false"}, r"use_rslora='false' is invalid; expected true or false"),
        ({"use_dora": 1}, r"use_dora=1 is invalid; expected true or false"),
        ({"fan_in_fan_out": None}, r"fan_in_fan_out=None is invalid"),
        ({"lora_dropout": False}, r"lora_dropout=False is invalid"),
        ({"task_type": 3}, r"task_type=3 is invalid; expected a str"),
        ({"modules_to_save": "score"}, r"modules_to_save='score' is invalid; expected a list"),
        ({"rank_pattern": ["q"]}, r"rank_pattern=\['q'\] is invalid; expected a dict"),
        ({"loftq_config": [4]}, r"loftq_config=\[4\] is invalid"),
        ({"layers_to_transform": [True]}, r"layers_to_transform=\[True\] is invalid"),
        ({"layer_replication": [[0, "4"]]}, r"layer_replication=\[\[0, '4'\]\] is invalid"),
        ({"target_modules": "(q"}, r"target_modules='\(q' is not a valid regular expression"),
        ({"exclude_modules": r"(a)\1"}, r"exclude_modules='\(a\)\\\\1' uses a backreference"),
        ({"rank_pattern": {"q[": 2}}, r"rank_pattern key='q\[' is not a valid regular"),
        ({"alpha_pattern": {"(?>q)": 2}}, r"alpha_pattern key='\(\?>q\)' uses an atomic group"),
        (
            {"layers_to_transform": [0], "layers_pattern": "(x", "target_modules": ["q"]},
            r"layers_pattern='\(x' is not a valid regular expression",
        ),
        ({"modules_to_save": ["score)"]}, r"modules_to_save='score\)' is not a valid regular"),
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


def test_a_file_gets_the_checks_a_call_gets_and_is_named(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_rslora": "false"}))
    with pytest.raises(
        ConfigError,
        match=r"use_rslora='false' is invalid; expected true or false.*\(in '.*adapter_config.json'\)",
    ):
        LoraConfig.from_json(str(path))
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": r"(a)\1"}))
    with pytest.raises(
        ConfigError, match=r"target_modules=.* uses a backreference.*adapter_config"
    ):
        LoraConfig.from_json(str(path))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"r": 8,', r"'.*adapter_config.json' is not a JSON file: Expecting"),
        ('["q_proj"]', r"an adapter config is a JSON object of fields, got a list \(in '.*'\)"),
        (b"\xff\xfe", r"'.*adapter_config.json' is not a JSON file"),
    ],
)
def test_unreadable_config_files_are_config_errors_naming_the_file(tmp_path, text, match):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=match):
        LoraConfig.from_json(str(path))


def test_catastrophic_patterns_are_matched_without_backtracking():
    cfg = LoraConfig(rank_pattern={"(.+)+z": 4, "q_proj": 2}, alpha_pattern={"(a*)*b": 3})
    name = "model.layers.10.self_attention.query_key_value_proj"
    assert cfg.rank_for(name) == 8 and cfg.alpha_for(name) == 8
    assert cfg.rank_for("model.layers.0.q_proj") == 2


def test_every_peft_lora_field_is_a_field_here():
    """A PEFT field lora_fx lacks would be kept in `extra` and its math silently dropped."""
    import peft

    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"extra"}
    bookkeeping = {"auto_mapping", "peft_type", "peft_version"}  # written back from `extra`
    peft_fields = set(peft.LoraConfig(target_modules=["q"]).to_dict())
    assert peft_fields - known == bookkeeping


def test_a_default_peft_config_with_every_field_is_accepted():
    import peft

    data = json.loads(json.dumps(peft.LoraConfig(target_modules=["q"]).to_dict(), default=list))
    assert LoraConfig.from_dict(data).target_modules == ["q"]
