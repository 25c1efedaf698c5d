"""The config schema: every rule of the spec and decisions.md §1-5, 12, each problem naming its key."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ebft_engine.commands.schema import schema
from ebft_engine.config import ConfigError, EbftConfig, EbftSection, load_config, parse_overrides

ROOT = Path(__file__).resolve().parent.parent

# The spec's quick start (structured) and strided example, as written there.
QUICKSTART = {
    "base_model": "Qwen/Qwen2-0.5B-Instruct",
    "rl": "ebft",
    "ebft": {"feature_layers": [0.25, 0.5, 0.75], "embed_method": "last_token",
             "alignment_coef": 1.0, "diversity_coef": 1.0},
    "trl": {"num_generations": 4, "max_completion_length": 256, "temperature": 0.7, "use_vllm": True,
            "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000, "vllm_lora_sync": True,
            "vllm_sync_interval": 3, "use_data_producer": True, "async_prefetch": False,
            "scale_rewards": True, "loss_type": "grpo"},
    "vllm": {"gpu_memory_utilization": 0.5, "max_model_len": 1024},
    "datasets": [{"path": "nvidia/OpenCodeInstruct", "type": "ebft_opencode.transform", "split": "train[:500]"}],
    "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
    "sequence_len": 1024, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "max_steps": 20,
    "learning_rate": 5.0e-6, "bf16": "auto", "flash_attention": True, "gradient_checkpointing": True,
    "output_dir": "./outputs/ebft-quickstart",
}
STRIDED = {
    "base_model": "meta-llama/Llama-3.2-1B",
    "rl": "ebft",
    "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8,
             "n_samples_per_prompt": 4, "temperature": 0.6, "feature_layers": [0.25, 0.5, 0.75],
             "embed_method": "last_token", "use_whitening": True, "alignment_coef": 1.0,
             "diversity_coef": 1.0, "rl_coef": 1.0, "ce_coef": 0.03, "advantage_estimator": "rloo",
             "min_completion_prefix": 8},
    "datasets": [{"path": "nvidia/OpenCodeInstruct", "type": "ebft_strided_structured.transform",
                  "split": "train[:1%]"}],
    "sequence_len": 2048, "micro_batch_size": 1, "gradient_accumulation_steps": 2,
    "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
    "bf16": "auto", "flex_attention": True, "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": True},
}


def with_(base: dict, **changes) -> dict:
    """A copy of `base` with dotted-key changes (`ebft__stride=0` sets ebft.stride)."""
    cfg = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def problems_of(source, overrides=()) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return {p.key: p.message for p in info.value.problems}


def engine(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ebft_engine", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


# -- the spec's own examples -------------------------------------------------------------------------


def test_quickstart_is_valid_and_resolved():
    cfg = load_config(QUICKSTART)
    assert cfg.mode == "structured" and not cfg.is_async and cfg.world_size == 1
    assert cfg.trl.num_generations == 4 and cfg.micro_batch_size == 2
    assert cfg.bf16 == "auto"  # resolved per device by the modeling code, not here
    assert cfg.ebft.gt_length_multiplier == 1.5 and cfg.trl.epsilon == 0.2
    assert cfg.trl.importance_sampling_cap == 3.0 and cfg.trl.vllm_server_timeout == 600
    # decisions.md §12: 0.0.0.0 listens where told, warns, and the trainer uses loopback.
    assert cfg.server_host == "0.0.0.0" and cfg.client_host == "127.0.0.1"
    assert any("reachable from the network" in w for w in cfg.warnings)


def test_strided_example_is_valid_with_spec_defaults():
    cfg = load_config(STRIDED)
    assert cfg.mode == "strided" and not cfg.is_async
    assert (cfg.ebft.stride, cfg.ebft.context_length, cfg.ebft.generate_max_len) == (8, 8, 8)
    assert cfg.ebft.sliding_context_window is False  # decisions.md §5: the paper's full prefix
    assert cfg.warnings == []


def test_ebft_defaults_match_the_spec_tables():
    e = EbftSection()
    assert e.model_dump() == {
        "mode": "structured", "feature_layers": [0.25, 0.5, 0.75], "embed_method": "last_token",
        "use_whitening": False, "alignment_coef": 1.0, "diversity_coef": 1.0, "ce_coef": 0.0,
        "adaptive_max_tokens": True, "gt_length_multiplier": 1.5, "stride": 8, "context_length": 8,
        "generate_max_len": 8, "n_samples_per_prompt": 4, "temperature": 0.6, "top_p": 1.0,
        "rl_coef": 1.0, "advantage_estimator": "rloo", "min_completion_prefix": 0,
        "sliding_context_window": False,
    }


def test_server_host_defaults_to_loopback():
    cfg = load_config(with_(QUICKSTART, trl__vllm_server_host=None))
    assert cfg.server_host == cfg.client_host == "127.0.0.1"
    assert not any("reachable" in w for w in cfg.warnings)


# -- decisions.md §1: whole prompt groups --------------------------------------------------------------


@pytest.mark.parametrize("mbs, gas, ok", [(2, 4, True), (1, 4, True), (4, 1, True), (8, 1, True),
                                          (2, 3, False), (1, 2, False), (3, 1, False)])
def test_generation_batch_holds_whole_groups(mbs, gas, ok):
    cfg = with_(QUICKSTART, micro_batch_size=mbs, gradient_accumulation_steps=gas)
    if ok:
        load_config(cfg)
        return
    problems = problems_of(cfg)
    message = problems["micro_batch_size"]
    for key in ("micro_batch_size", "gradient_accumulation_steps", "trl.num_generations"):
        assert key in message
    assert "Nearest valid values" in message


def test_group_rule_proposes_nearest_valid_values():
    message = problems_of(with_(QUICKSTART, micro_batch_size=2, gradient_accumulation_steps=3))["micro_batch_size"]
    assert "gradient_accumulation_steps: 2 or 4" in message
    assert "micro_batch_size: 4" in message
    assert "trl.num_generations: 2 or 3" in message


def test_group_rule_does_not_apply_to_strided_mode():
    load_config(with_(STRIDED, micro_batch_size=1, gradient_accumulation_steps=3))


# -- strided constraints ----------------------------------------------------------------------------


def test_torch_compile_with_strided_flex_attention():
    assert "torch_compile" in problems_of(with_(STRIDED, torch_compile=True))["torch_compile"]
    load_config(with_(STRIDED, torch_compile=True, flex_attention=False))  # no flex: allowed


def test_non_reentrant_checkpointing_with_flex_attention():
    problems = problems_of(with_(STRIDED, gradient_checkpointing_kwargs={"use_reentrant": False}))
    assert "use_reentrant: true" in problems["gradient_checkpointing_kwargs.use_reentrant"]


def test_activation_offloading_with_flex_attention():
    assert "flex_attention" in problems_of(with_(STRIDED, activation_offloading=True))["activation_offloading"]


def test_attn_implementation_flex_means_flex_attention():
    cfg = with_(STRIDED, attn_implementation="flex_attention")
    del cfg["flex_attention"]
    assert load_config(cfg).flex_attention is True
    problems = problems_of(with_(cfg, attn_implementation="flex_attention", torch_compile=True))
    assert "torch_compile" in problems


@pytest.mark.parametrize("key", ["stride", "context_length", "generate_max_len", "n_samples_per_prompt"])
def test_strided_sizes_must_be_at_least_one(key):
    message = problems_of(with_(STRIDED, **{f"ebft__{key}": 0}))[f"ebft.{key}"]
    assert f"ebft.{key}" in message and ">= 1" in message


def test_gt_length_multiplier_minimum():
    message = problems_of(with_(QUICKSTART, ebft__gt_length_multiplier=0.05))["ebft.gt_length_multiplier"]
    assert ">= 0.1" in message


def test_feature_layers_are_fractions():
    problems = problems_of(with_(QUICKSTART, ebft__feature_layers=[0.5, 1.5]))
    assert "ebft.feature_layers[1]" in problems
    assert "between 0 and 1" in problems["ebft.feature_layers[1]"]
    assert "ebft.feature_layers" in problems_of(with_(QUICKSTART, ebft__feature_layers=[]))


@pytest.mark.parametrize("dotted, value, choice", [
    ("ebft.embed_method", "mean", "mean_pooling"),
    ("ebft.advantage_estimator", "rlo", "rloo"),
    ("ebft.mode", "stride", "strided"),
    ("trl.loss_type", "ppo", "grpo"),
    ("trl.scale_rewards", "sometimes", "group"),
    ("vllm.backend", "sglang", "hf"),
])
def test_enums_name_the_key_and_the_choices(dotted, value, choice):
    section, key = dotted.split(".")
    message = problems_of(with_(QUICKSTART, **{f"{section}__{key}": value}))[dotted]
    assert dotted in message and choice in message and value in message


def test_scale_rewards_accepts_bools_and_names():
    for value in (True, False, "group", "batch", "none"):
        assert load_config(with_(QUICKSTART, trl__scale_rewards=value)).trl.scale_rewards == value


def test_n_samples_per_prompt_one_falls_back_to_reinforce():
    cfg = load_config(with_(STRIDED, ebft__n_samples_per_prompt=1))
    assert cfg.ebft.advantage_estimator == "reinforce" and cfg.ebft.diversity_coef == 0.0
    assert any("n_samples_per_prompt: 1" in w and "reinforce" in w for w in cfg.warnings)
    quiet = load_config(with_(STRIDED, ebft__n_samples_per_prompt=1, ebft__advantage_estimator="reinforce",
                              ebft__diversity_coef=0.0))
    assert quiet.warnings == []


def test_mode_irrelevant_settings_warn():
    cfg = load_config(with_(QUICKSTART, ebft__stride=16))
    assert any("`ebft.stride`" in w and "strided-mode" in w for w in cfg.warnings)
    cfg = load_config(with_(STRIDED, trl={"num_generations": 8}))
    assert any("`trl.num_generations`" in w for w in cfg.warnings)


# -- structured constraints -------------------------------------------------------------------------


def test_structured_mode_needs_generation_settings():
    cfg = copy.deepcopy(QUICKSTART)
    del cfg["trl"]["num_generations"], cfg["trl"]["max_completion_length"]
    problems = problems_of(cfg)
    assert "trl.num_generations" in problems["trl.num_generations"]
    assert "trl.max_completion_length" in problems["trl.max_completion_length"]


def test_lora_sync_needs_a_lora_adapter():
    problems = problems_of(with_(QUICKSTART, adapter=None))
    assert "adapter: lora" in problems["trl.vllm_lora_sync"]


def test_use_vllm_false_selects_the_hf_backend():
    cfg = load_config(with_(QUICKSTART, trl__use_vllm=False))
    assert cfg.vllm.backend == "hf"
    assert "vllm.backend" in problems_of(with_(QUICKSTART, trl__use_vllm=False, vllm__backend="vllm"))


def test_vllm_executable_env_override(monkeypatch):
    cfg = load_config(with_(QUICKSTART, vllm__executable="/opt/vllm-env/bin/vllm"))
    monkeypatch.delenv("EBFT_VLLM_EXECUTABLE", raising=False)
    assert cfg.vllm.effective_executable() == "/opt/vllm-env/bin/vllm"
    monkeypatch.setenv("EBFT_VLLM_EXECUTABLE", "/elsewhere/vllm")
    assert cfg.vllm.effective_executable() == "/elsewhere/vllm"


# -- keys: rl, unknown, ignored, empty -----------------------------------------------------------------


def test_rl_must_be_ebft():
    assert "rl: ebft" in problems_of(with_(QUICKSTART, rl="grpo"))["rl"]
    cfg = copy.deepcopy(QUICKSTART)
    del cfg["rl"]
    assert "rl: ebft" in problems_of(cfg)["rl"]


def test_unknown_key_suggests_the_closest_known_key():
    problems = problems_of(with_(QUICKSTART, ebft__diversty_coef=0.5))
    assert "diversity_coef" in problems["ebft.diversty_coef"]
    problems = problems_of(with_(QUICKSTART, trl__num_generation=4))
    assert "trl.num_generations" in problems["trl.num_generation"]
    problems = problems_of(with_(QUICKSTART, learnig_rate=1e-5))
    assert "learning_rate" in problems["learnig_rate"]


def test_key_at_the_wrong_level_names_where_it_belongs():
    problems = problems_of(with_(QUICKSTART, stride=4))
    assert "ebft.stride" in problems["stride"]


def test_train_on_split_suggests_split():
    cfg = copy.deepcopy(QUICKSTART)
    cfg["datasets"][0]["train_on_split"] = "train[:100]"
    message = problems_of(cfg)["datasets[0].train_on_split"]
    assert "split: train[:100]" in message and "silently ignored" in message


def test_keys_without_meaning_are_ignored_with_a_warning():
    cfg = load_config(with_(QUICKSTART, ddp=True, device_map="auto", vllm__serve_module="x.y",
                            use_tensorboard=True, wandb_watch="gradients"))
    for key in ("`ddp`", "`device_map`", "`vllm.serve_module`", "`use_tensorboard`", "`wandb_watch`"):
        assert any(key in w and "ignored" in w for w in cfg.warnings), key


def test_empty_value_means_unset():
    text = (ROOT / "presets" / "qwen3-4b-ebft-structured.yaml").read_text()
    text += "\nwandb_run_id:\nmax_grad_norm:\nsave_steps:\n"
    cfg = load_config(yaml.safe_load(text.replace("max_steps: 20", "max_steps:")))
    assert cfg.wandb_run_id is None and cfg.max_grad_norm == 1.0 and cfg.max_steps is None


def test_all_problems_are_reported_at_once():
    cfg = with_(QUICKSTART, rl="dpo", ebft__stride=0, ebft__embed_method="max", ebft__oops=1,
                micro_batch_size=3, gradient_accumulation_steps=1, learning_rate="fast")
    cfg["datasets"][0]["train_on_split"] = "train"
    problems = problems_of(cfg)
    assert {"rl", "ebft.stride", "ebft.embed_method", "ebft.oops", "micro_batch_size", "learning_rate",
            "datasets[0].train_on_split"} <= set(problems)
    assert all(key in message for key, message in problems.items() if not key.startswith("datasets"))


def test_a_bad_value_does_not_also_fail_rules_about_it():
    problems = problems_of(with_(QUICKSTART, trl__num_generations="four"))
    assert list(problems) == ["trl.num_generations"]
    assert "whole number" in problems["trl.num_generations"]


def test_required_keys():
    problems = problems_of({"rl": "ebft", "trl": {"num_generations": 4, "max_completion_length": 8}})
    assert {"base_model", "datasets"} <= set(problems)
    assert "datasets[0].path" in problems_of(with_(QUICKSTART, datasets=[{"type": "x"}]))


# -- files, overrides, round trip -------------------------------------------------------------------


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: x\n  rl: [ebft\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "YAML" in str(info.value)


def test_parse_overrides_builds_nested_dicts():
    assert parse_overrides(["ebft.diversity_coef=0.5", "max_steps=3", "trl.generation_kwargs.stop_token_ids=[2, 0]",
                            "wandb_run_id="]) == {
        "ebft": {"diversity_coef": 0.5}, "max_steps": 3,
        "trl": {"generation_kwargs": {"stop_token_ids": [2, 0]}}, "wandb_run_id": None}
    with pytest.raises(ConfigError) as info:
        parse_overrides(["max_steps"])
    assert info.value.problems[0].key == "max_steps"


def test_overrides_are_typed_by_the_schema():
    cfg = load_config(QUICKSTART, ["ebft.diversity_coef=0.5", "max_steps=3", "learning_rate=1e-5",
                                   "datasets.0.split=train[:10]", "trl.vllm_server_host="])
    assert cfg.ebft.diversity_coef == 0.5 and isinstance(cfg.ebft.diversity_coef, float)
    assert cfg.max_steps == 3 and isinstance(cfg.max_steps, int)
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.datasets[0].split == "train[:10]"
    assert cfg.server_host == "127.0.0.1"


def test_bad_override_names_its_key():
    problems = problems_of(QUICKSTART, ["max_steps=many", "ebft.diversty_coef=1", "junk"])
    assert "max_steps=many" in problems["max_steps"] and "whole number" in problems["max_steps"]
    assert "diversity_coef" in problems["ebft.diversty_coef"]
    assert "junk" in problems


def test_to_yaml_round_trips():
    for source in (QUICKSTART, STRIDED, with_(STRIDED, ebft__n_samples_per_prompt=1)):
        cfg = load_config(source)
        again = load_config(yaml.safe_load(cfg.to_yaml()))
        assert again.to_dict() == cfg.to_dict()
        assert not any("n_samples_per_prompt" in w for w in again.warnings)
    assert load_config(STRIDED).output_dir == "./outputs/ebft-llama-3.2-1b-strided"


def test_config_module_does_not_import_torch():
    code = "import sys, ebft_engine.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# -- the validate and schema commands ---------------------------------------------------------------


def write(tmp_path: Path, cfg: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("changes, key", [
    ({"torch_compile": True}, "torch_compile"),
    ({"gradient_checkpointing_kwargs": {"use_reentrant": False}}, "gradient_checkpointing_kwargs.use_reentrant"),
    ({"ebft__stride": 0}, "ebft.stride"),
    ({"train_on_split": "train"}, "train_on_split"),
])
def test_validate_command_reports_problems_with_exit_2(tmp_path, changes, key):
    path = write(tmp_path, with_(STRIDED, **changes))
    proc = engine("validate", str(path))
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_validate_command_group_rule(tmp_path):
    proc = engine("validate", str(write(tmp_path, QUICKSTART)), "gradient_accumulation_steps=3")
    assert proc.returncode == 2
    for key in ("micro_batch_size", "gradient_accumulation_steps", "trl.num_generations"):
        assert key in proc.stderr


def test_validate_command_json_shape(tmp_path):
    ok = engine("validate", str(write(tmp_path, QUICKSTART)), "ebft.diversity_coef=0.5", "--json")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert set(doc) == {"ok", "problems", "warnings", "config"}
    assert doc["ok"] is True and doc["problems"] == [] and doc["config"]["ebft"]["diversity_coef"] == 0.5
    assert all(isinstance(w, str) for w in doc["warnings"]) and doc["warnings"]

    bad = engine("validate", str(write(tmp_path, with_(QUICKSTART, ebft__stride="x"))), "rl=sft", "--json")
    assert bad.returncode == 2
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and doc["config"] is None and doc["warnings"] == []
    assert {p["key"] for p in doc["problems"]} == {"ebft.stride", "rl"}
    assert all(set(p) == {"key", "message"} for p in doc["problems"])

    missing = engine("validate", str(tmp_path / "none.yaml"), "--json")
    assert missing.returncode == 2 and json.loads(missing.stdout)["problems"][0]["key"] == "config"


def test_validate_command_writes_the_resolved_config(tmp_path):
    out = tmp_path / "run" / "config.yaml"
    proc = engine("validate", str(write(tmp_path, STRIDED)), "max_steps=7", "--write-resolved", str(out))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == yaml.safe_load(out.read_text())
    assert load_config(out).max_steps == 7
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_schema_command_covers_every_key():
    proc = engine("schema")
    assert proc.returncode == 0, proc.stderr
    fields = json.loads(proc.stdout)["fields"]
    by_key = {f["key"]: f for f in fields}
    for name in EbftSection.model_fields:
        assert f"ebft.{name}" in by_key, name
    for key in ("trl.num_generations", "trl.scale_rewards", "trl.generation_kwargs.stop_token_ids",
                "vllm.backend", "micro_batch_size", "bf16", "datasets", "gradient_checkpointing_kwargs.use_reentrant"):
        assert key in by_key, key
    for f in fields:
        assert {"key", "section", "type", "default", "choices", "description", "min"} <= set(f)
        assert f["type"] in {"int", "float", "bool", "str", "list", "dict", "enum"}
        assert f["description"], f["key"]
    assert (by_key["ebft.stride"]["type"], by_key["ebft.stride"]["default"], by_key["ebft.stride"]["min"]) == ("int", 8, 1)
    assert by_key["ebft.embed_method"]["choices"] == ["last_token", "mean_pooling", "completion_mean", "concat"]
    assert by_key["ebft.stride"]["mode"] == "strided" and by_key["trl.num_generations"]["mode"] == "structured"
    assert {f["key"] for f in by_key["datasets"]["item_fields"]} >= {"path", "type", "split"}
    assert schema() == json.loads(proc.stdout)


def test_keys_the_engine_reads_are_schema_fields():
    """The optimizer's betas/epsilon and `chat_template_jinja` were read by the engine without being
    keys of the schema (issue 17): now they are, with a default, a description and bounds."""
    by_key = {f["key"]: f for f in schema()["fields"]}
    for key, default in (("adam_beta1", 0.9), ("adam_beta2", 0.999), ("adam_epsilon", 1e-8),
                         ("chat_template_jinja", None)):
        assert by_key[key]["default"] == default and by_key[key]["description"], key
    assert by_key["adam_beta1"]["section"] == "training" and by_key["adam_beta1"]["max_exclusive"]
    cfg = load_config(QUICKSTART, ["adam_beta2=0.95", "adam_epsilon=1e-6"])
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.95, 1e-6)
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, ["adam_beta1=1.0", "adam_epsilon=0"])
    assert [p.key for p in info.value.problems] == ["adam_beta1", "adam_epsilon"]


def test_every_schema_key_is_accepted_as_an_override():
    """What the TUI's form hands back (key=default) validates."""
    items = []
    for f in schema()["fields"]:
        if f["key"] in ("datasets", "test_datasets", "base_model", "rl", "output_dir", "micro_batch_size",
                        "gradient_accumulation_steps") or f["default"] is None:
            continue
        value = json.dumps(f["default"]) if not isinstance(f["default"], bool) else str(f["default"]).lower()
        items.append(f"{f['key']}={value}")
    cfg = load_config(QUICKSTART, items)
    assert isinstance(cfg, EbftConfig)
