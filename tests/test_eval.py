"""Evaluation pieces: mapping held-out rows, turning completions into programs, CE against a manual sum."""

from __future__ import annotations

import pytest
import torch

from ebft_engine.eval import EvalRow, extract_program, to_eval_row, validation_ce
from ebft_engine.sandbox import UNSAFE, detect_backend, run_program

HEADER = 'def add(a, b):\n    """Add two numbers."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def _verdict(completion: str) -> bool:
    program = extract_program(HEADER, completion, "add") + f"\n{TEST}\ncheck(add)\n"
    # these programs are the test's own, not a model's: without a jail they may run unjailed
    return run_program(program, backend=detect_backend()[0] or UNSAFE, timeout_s=5).passed


@pytest.mark.parametrize(
    "completion",
    [
        "    return a + b\n",                                            # a body, HumanEval style
        "return a + b",                                                  # a body the model forgot to indent
        "```python\ndef add(a, b):\n    return a + b\n```\nThis adds.",  # a fenced whole function
        "def add(a, b):\n    return b + a\n",                            # an unfenced whole function
    ],
)
def test_extract_program_accepts_the_shapes_models_answer_in(completion):
    assert _verdict(completion)


def test_extract_program_keeps_wrong_answers_wrong():
    assert not _verdict("    return a - b\n")
    assert not _verdict("```python\ndef add(a, b):\n    while True: pass\n```")


def test_to_eval_row_maps_each_supported_shape():
    he = to_eval_row({"input": HEADER, "output": "    return a + b\n", "prompt": HEADER, "test": TEST,
                      "entry_point": "add", "task_id": "t/0"}, 0, "builtin:humaneval")
    assert he.ground_truth == "    return a + b\n" and he.code_prompt == HEADER and he.entry_point == "add"
    pg = to_eval_row({"prompt": "hi", "ground_truth": "hello"}, 1, "x.jsonl")
    assert pg.prompt == "hi" and pg.test is None
    chat = to_eval_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, 2, "c")
    assert chat.prompt == [{"role": "user", "content": "q"}] and chat.ground_truth == "a"
    with pytest.raises(ValueError, match="row 3"):
        to_eval_row({"text": "no fields"}, 3, "bad.jsonl")


def test_eval_refuses_pass_at_1_without_a_sandbox_unless_unsafe_exec(tmp_path):
    """No OS jail (injected: EBFT_SANDBOX_BACKENDS=none): `ebft eval` stops before loading the model,
    exit 2, saying how to get one; `--unsafe-exec` is forwarded to the engine and gets past that check
    (here to the missing model: exit 1, naming it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "EBFT_SANDBOX_BACKENDS": "none"}
    preset = str(root / "presets" / "smollm2-135m-strided-cpu.yaml")
    args = [sys.executable, "-c", "from ebft_tui.cli import main; main()", "eval", preset, "base_model=/nonexistent/model",
            "--max-rows", "1", "--log-dir", str(tmp_path / "run")]
    refused = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "apt-get install bubblewrap" in refused.stderr and "--unsafe-exec" in refused.stderr
    assert "/nonexistent/model" not in refused.stderr  # refused before the model was looked for
    unsafe = subprocess.run(args + ["--unsafe-exec"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert unsafe.returncode == 1 and "/nonexistent/model" in unsafe.stderr, unsafe.stderr[-2000:]
    assert "WARNING" in unsafe.stderr and "EBFT_SANDBOX_BACKENDS=none" in unsafe.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_report_says_where_generated_code_ran():
    from ebft_engine.eval import format_report, sandbox_fields
    from ebft_engine.sandbox import UNSAFE_WARNING, Backend

    base = {"eval/ce_loss": 1.0, "eval/cfm_loss": 0.5, "eval/alignment": 0.1, "eval/pass@1": 0.5,
            "eval/n_code_tasks": 2}
    jailed = {**base, **sandbox_fields(Backend("bwrap", "/usr/bin/bwrap"))}
    assert jailed["sandbox_backend"] == "bwrap" and "sandbox_warning" not in jailed
    assert "sandbox: bwrap" in list(format_report(jailed))[-1]
    unsafe = {**base, **sandbox_fields(UNSAFE)}
    assert unsafe["sandbox_backend"] == "unsafe" and unsafe["sandbox_warning"] == UNSAFE_WARNING
    assert "UNSANDBOXED" in list(format_report(unsafe))[-1]


class _CharTokenizer:
    """A tiny real tokenizer stand-in: one id per character, no chat template."""

    chat_template = None
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (ord(c) % 90) for c in text]
        return {"input_ids": ([3] if add_special_tokens else []) + ids}


def test_validation_ce_equals_manual_token_average(tiny_llama):
    tok = _CharTokenizer()
    rows = [EvalRow(prompt="ab", ground_truth="cd"), EvalRow(prompt="xyz", ground_truth="q")]
    got = validation_ce(tiny_llama, tok, rows, {}, torch.device("cpu"))
    total, count = 0.0, 0
    for row in rows:
        p = tok(row.prompt)["input_ids"]
        g = tok(row.ground_truth, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + g])
        logp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0].float(), -1)
        for k, t in enumerate(g):
            total -= logp[len(p) - 1 + k, t].item()
            count += 1
    assert got == pytest.approx(total / count, rel=1e-5)


@pytest.mark.timeout(900)
def test_eval_before_and_after_a_short_cpu_run(tmp_path, tiny_smollm2_dir):
    """`ebft eval` on the CPU preset prints all three metrics for the base model and for the adapter
    a short run trained, and appends both as `eval` records to the run's metrics.jsonl. The first
    runs as if no OS sandbox existed, with --unsafe-exec; its record carries the warning, the second
    names the jail it used. The model is a tiny random one with SmolLM2's tokenizer: the commands
    and records are the point, and the real 135M model made this test take minutes (600 s and
    more on a busy machine)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    preset = str(root / "presets" / "smollm2-135m-strided-cpu.yaml")
    run = tmp_path / "run"
    model = [f"base_model={tiny_smollm2_dir}", "bf16=false"]
    common = ["--max-rows", "2", "--max-new-tokens", "16", "--n-samples", "2", "--log-dir", str(run)]

    def ebft(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ebft_engine", *args], cwd=root, capture_output=True,
                              text=True, timeout=280, env=env)

    before = ebft("eval", preset, *model, *common, "--unsafe-exec",
                  env={**os.environ, "EBFT_SANDBOX_BACKENDS": "none"})
    assert before.returncode == 0, before.stderr[-2000:]
    trained = ebft("train", preset, *model, "datasets.0.split=train[:1]", "max_steps=2", "save_steps=2",
                   "learning_rate=1e-3", f"output_dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    jail = detect_backend()[0]
    after = ebft("eval", preset, *model, "--adapter", str(run / "adapter"), *common,
                 *([] if jail else ["--unsafe-exec"]))
    assert after.returncode == 0, after.stderr[-2000:]
    for out in (before.stdout, after.stdout):
        assert "validation CE" in out and "CFM loss" in out and "pass@1" in out
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"event": "eval"' in line]
    assert [e["adapter"] for e in evals] == [None, str(run / "adapter")]
    assert evals[0]["sandbox_backend"] == "unsafe" and "WITHOUT an OS sandbox" in evals[0]["sandbox_warning"]
    assert "UNSANDBOXED" in before.stdout and "WARNING" in before.stderr
    assert evals[1]["sandbox_backend"] == (jail.name if jail else "unsafe")
    assert ("sandbox_warning" in evals[1]) == (jail is None)
    for e in evals:
        assert e["eval/ce_loss"] > 0 and e["eval/cfm_loss"] >= 0 and 0 <= e["eval/pass@1"] <= 1
    # the trained adapter really is what was evaluated: its CE differs from the base model's
    assert evals[0]["eval/ce_loss"] != evals[1]["eval/ce_loss"]


def test_held_out_rows_of_every_shape_become_prompt_target_pairs():
    """In-training evals read transformed rows: token rows cut at their prompt (or halfway for a raw
    document, whose target has no end-of-sequence), and prompt / ground-truth rows as `ebft eval` does."""
    from ebft_engine.eval import pair_of_record, pair_of_row

    tok = _CharTokenizer()
    coded = pair_of_record({"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "prompt_length": 2}, 0, tok, {})
    assert (coded.prompt_ids, coded.target_ids, coded.eos_id) == ([5, 6], [7, 8, 9], None)
    document = pair_of_record({"input_ids": [1, 2, 3, 4, 5, 6], "prompt_length": 0}, 1, tok, {})
    assert (document.prompt_ids, document.target_ids) == ([1, 2, 3], [4, 5, 6])
    qa = pair_of_record({"prompt": "ab", "ground_truth": "cd"}, 2, tok, {})
    assert qa == pair_of_row(EvalRow(prompt="ab", ground_truth="cd"), tok, {}) and qa.eos_id == tok.eos_token_id
    with pytest.raises(ValueError, match="row 3"):
        pair_of_record({"input_ids": [4]}, 3, tok, {})


def test_pairs_ce_scores_the_target_and_only_a_real_end(tiny_llama):
    from ebft_engine.eval import EvalPair, pairs_ce

    pair = EvalPair([3, 4, 5], [6, 7], None)
    logp = torch.log_softmax(tiny_llama(input_ids=torch.tensor([[3, 4, 5, 6, 7]])).logits[0].float(), -1)
    assert pairs_ce(tiny_llama, [pair], torch.device("cpu")) == pytest.approx(-(logp[2, 6] + logp[3, 7]).item() / 2, rel=1e-5)
    with_end = EvalPair([3, 4, 5], [6, 7], 1)
    logp = torch.log_softmax(tiny_llama(input_ids=torch.tensor([[3, 4, 5, 6, 7, 1]])).logits[0].float(), -1)
    expected = -(logp[2, 6] + logp[3, 7] + logp[4, 1]).item() / 3
    assert pairs_ce(tiny_llama, [with_end], torch.device("cpu")) == pytest.approx(expected, rel=1e-5)
