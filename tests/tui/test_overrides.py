"""key=value overrides: YAML-typed values, dotted keys, errors that name the item."""

from __future__ import annotations

import pytest

from ebft_tui.overrides import (
    OverrideError, apply_overrides, deep_merge, get_path, is_override, parse_overrides, split_args,
)


def test_values_are_yaml_typed_and_keys_nest():
    got = parse_overrides(["learning_rate=1e-5", "ebft.stride=16", "ebft.feature_layers=[0.25, 0.5]",
                           "trl.use_vllm=true", "base_model=Qwen/Qwen2-0.5B", "wandb_run_id=", "a.b.c=x",
                           "a.b.d=2", "seed=1", "seed=2"])
    assert got == {
        "learning_rate": 1e-5, "ebft": {"stride": 16, "feature_layers": [0.25, 0.5]},
        "trl": {"use_vllm": True}, "base_model": "Qwen/Qwen2-0.5B", "wandb_run_id": None,
        "a": {"b": {"c": "x", "d": 2}}, "seed": 2,
    }
    assert isinstance(got["learning_rate"], float)
    assert parse_overrides(["x=[unclosed"]) == {"x": "[unclosed"}  # not YAML: kept as text


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", "-x=1", "a b=1"])
def test_bad_items_name_themselves(item):
    with pytest.raises(OverrideError) as ei:
        parse_overrides([item])
    assert ei.value.item == item and repr(item) in str(ei.value)


def test_merge_split_and_get():
    base = {"ebft": {"stride": 8, "mode": "strided"}, "max_steps": 10}
    merged = apply_overrides(base, ["ebft.stride=4", "max_steps=3"])
    assert merged == {"ebft": {"stride": 4, "mode": "strided"}, "max_steps": 3}
    assert base["ebft"]["stride"] == 8  # untouched
    assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert get_path(merged, "ebft.mode") == "strided" and get_path(merged, "ebft.nope", 5) == 5
    assert get_path(merged, "max_steps.x") is None
    assert split_args(["a=1", "b.c=2", "--max-num-seqs", "8", "d=3"]) == (["a=1", "b.c=2"], ["--max-num-seqs", "8", "d=3"])
    assert is_override("trl.vllm_server_port=8001") and not is_override("--port=3")
