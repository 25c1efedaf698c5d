"""YAML input is bounded and strict (issue 12 §3): alias bombs, deep nesting and huge files are
refused with the line, a key given twice is an error, and `yes`/`no`/`on`/`off` (or true/false)
where the schema wants a number is an error naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ebft_engine.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = "base_model: m\nrl: ebft\ndatasets: [{path: d.jsonl}]\nebft: {mode: strided}\n"


def bomb(levels: int) -> str:
    """The classic: each level repeats the previous one 9 times (9**levels values)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def config_problem(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.key == "config" and str(path) in problem.message
    return problem.message


def test_an_alias_bomb_is_refused_naming_its_line(tmp_path):
    message = config_problem(tmp_path, BASE + bomb(9))  # 9**9 = 387 million values
    assert "aliases" in message and "100,000" in message  # yaml_input.MAX_VALUES
    assert "line 10:" in message  # a5, the first level past the limit (9**6 > 100,000)


def test_aliases_within_the_limit_still_work():
    from ebft_engine.yaml_input import load_yaml

    assert load_yaml(bomb(4))["a3"][0][0][0] == ["lol"] * 9  # 9**4 values: fine
    merged = load_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n")
    assert merged["use"] == {"x": 1, "y": 3}  # a merge key may be overridden: not a duplicate


def test_recursive_aliases_and_deep_nesting_are_refused():
    from ebft_engine.yaml_input import MAX_DEPTH, YamlInputError, load_yaml

    with pytest.raises(YamlInputError, match="recursive alias"):
        load_yaml("a: &a [1, *a]\n")
    with pytest.raises(YamlInputError, match=f"deeper than {MAX_DEPTH}"):
        load_yaml("x: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(YamlInputError, match="deeper"):  # 10,000 levels: no RecursionError
        load_yaml("x: " + "[" * 10_000 + "]" * 10_000)
    # shallow anchors that nest each other: deep only once expanded
    chain = "\n".join(f"k{i}: &k{i} [[[[[[[[[[{'*k' + str(i - 1) if i else 1}]]]]]]]]]]" for i in range(5))
    with pytest.raises(YamlInputError, match="once its aliases"):
        load_yaml(chain)
    assert load_yaml("x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path):
    message = config_problem(tmp_path, BASE + "# " + "x" * (1024 * 1024) + "\n")  # > yaml_input.MAX_BYTES
    assert "larger than" in message


def test_a_key_given_twice_is_an_error_with_both_lines(tmp_path):
    message = config_problem(tmp_path, BASE + "learning_rate: 1e-5\nmax_steps: 3\nlearning_rate: 2e-5\n")
    assert "`learning_rate` appears twice" in message and "line 7" in message and "line 5" in message
    message = config_problem(tmp_path, BASE.replace("ebft: {mode: strided}", "ebft:\n  stride: 4\n  stride: 8"))
    assert "`stride` appears twice" in message


@pytest.mark.parametrize("line, key", [("max_steps: yes", "max_steps"), ("learning_rate: on", "learning_rate"),
                                       ("save_steps: true", "save_steps"), ("ebft:\n  stride: no", "ebft.stride"),
                                       ("ebft:\n  feature_layers: [0.5, off]", "ebft.feature_layers"),
                                       ("trl:\n  top_k: yes", "trl.top_k")])
def test_a_yes_no_word_where_a_number_is_expected_is_an_error(line, key):
    text = BASE.replace("ebft: {mode: strided}\n", "") + line + "\n"
    with pytest.raises(ConfigError) as info:
        load_config(yaml.safe_load(text))
    problems = {p.key: p.message for p in info.value.problems}
    assert key in problems and "true/false" in problems[key] and "yes, no, on and off" in problems[key]


def test_yes_no_still_mean_true_false_for_switches_and_on_the_command_line():
    cfg = load_config(yaml.safe_load(BASE + "bf16: no\ngradient_checkpointing: yes\n"), ["ebft.use_whitening=on"])
    assert cfg.bf16 is False and cfg.gradient_checkpointing is True and cfg.ebft.use_whitening is True
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(yaml.safe_load(BASE), ["max_steps=yes"])


def test_validate_refuses_a_bomb_quickly_and_without_a_traceback(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BASE + bomb(12))
    done = subprocess.run([sys.executable, "-m", "ebft_engine", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # a hang guard: main ran minutes
    assert done.returncode == 2 and "aliases" in done.stderr and "Traceback" not in done.stderr
