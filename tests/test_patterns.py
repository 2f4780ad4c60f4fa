"""`lora_fx.patterns`: `re`'s answers without backtracking, and the errors that name the field."""

import re

import pytest

from lora_fx import ConfigError, patterns

_PATTERNS = [
    r".*\.(q|v)_proj",
    r"^(?!.*vision).*(q_proj|v_proj)$",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
    r"model\.layers\.\d+\.self_attn\.(q|k)_proj",
    r"(?i)Q_PROJ",
    r"(?<=\.)q_proj|\bq\B.*",
    r"(?:[^.]+\.)*q_proj",
    r"(?:a{0,3}){2}q_proj$",
    r"(ab)*|[^a-c\d]+|x?",
    "",
]
_NAMES = [
    "model.layers.0.self_attn.q_proj",
    "vision.layers.1.self_attn.q_proj",
    "decoder.block.0.layer.1.EncDecAttention.q",
    "model.a_proj",
    "aaq_proj",
    "q_proj",
    "abab",
    "xyz",
    "",
]


@pytest.mark.parametrize("pattern", _PATTERNS)
def test_fullmatch_agrees_with_re(pattern):
    for name in _NAMES:
        expected = re.fullmatch(pattern, name) is not None
        assert patterns.fullmatch(pattern, name, field="target_modules") == expected, name


def test_peft_rules_for_keys_modules_and_layers():
    assert patterns.suffix_match("q_proj", "model.q_proj", field="rank_pattern key")
    assert not patterns.suffix_match("proj", "model.q_proj", field="rank_pattern key")
    assert patterns.module_match("score", "model.score", field="modules_to_save")
    assert patterns.module_match("score", "model.score.dense", field="modules_to_save")
    assert not patterns.module_match("score", "model.scores", field="modules_to_save")
    assert patterns.layer_index("layers", "model.layers.12.mlp.up", field="layers_pattern") == 12
    assert patterns.layer_index("h", "model.layers.12.mlp.up", field="layers_pattern") is None


def test_catastrophic_patterns_answer_at_once():
    # Python's re needs ~2^40 steps for each of these on a 40-character name without a match.
    name = "model.layers.10.self_attention.query_key"
    for pattern in (r"(.+)+z", r"(a*)*b", r"(\w|\w)*\.z", r"(?:(?:.*)*)*z"):
        assert not patterns.fullmatch(pattern, name, field="target_modules")
        for short in ("ab.z", "ab.c", "z", ""):  # short enough for re to answer too
            expected = re.fullmatch(pattern, short) is not None
            assert patterns.fullmatch(pattern, short, field="target_modules") == expected


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("(q", r"target_modules='\(q' is not a valid regular expression: missing \)"),
        (r"(a)\1", r"target_modules='\(a\)\\\\1' uses a backreference, which lora_fx does not"),
        (r"(?>a)", r"uses an atomic group"),
        (r"a++", r"uses a possessive repeat"),
        (r"(a)?(?(1)b|c)", r"uses a conditional group"),
    ],
)
def test_patterns_it_cannot_take_name_the_field(pattern, match):
    with pytest.raises(ConfigError, match=match):
        patterns.check_pattern(pattern, field="target_modules")


def test_step_budget_names_field_pattern_and_name(monkeypatch):
    monkeypatch.setattr(patterns, "STEP_BUDGET", 1)
    with pytest.raises(
        ConfigError, match=r"exclude_modules='\(a\|b\)\*c' took more than 1 steps to match 'abab'"
    ):
        patterns.fullmatch("(a|b)*c", "abab", field="exclude_modules")
