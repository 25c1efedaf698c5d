"""The axolotl keys of issue 18 the loop honours, on the tiny model with the CE stepper:
save_strategy / save_steps / save_first_step, eval_steps (records the TUI's eval panel shows),
early stopping, resume_from_checkpoint, auto_resume_from_checkpoints."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ebft_engine.metrics import read_records
from ebft_engine.train import train
from ebft_engine.train_eval import EarlyStopping, EvalSchedule, rng_untouched, steps_of
from test_resume import Killed, assert_same_params
from test_train_loop import CEStepper, lora_tiny, metric_records, run_tiny, tiny_cfg, tiny_rows, trainable


class StubTokenizer:
    """What evals need of a tokenizer for token rows: the ids generation pads and stops with."""

    eos_token_id = 0
    pad_token_id = 0

    def save_pretrained(self, folder):
        (folder / "stub_tokenizer.txt").write_text("stub")


def checkpoint_steps(run_dir) -> list[int]:
    return [e["step"] for e in read_records(run_dir / "metrics.jsonl") if e["event"] == "checkpoint"]


def eval_records(run_dir) -> list[dict]:
    return [e for e in read_records(run_dir / "metrics.jsonl") if e["event"] == "eval"]


def run_with_evals(cfg, *, built=None, frozen=False, hooks=None, held_out=None) -> int:
    """`train(cfg)` on the tiny model with held-out token rows; `frozen`: the weights never change
    (every gradient is dropped), so evals never improve."""
    built = built if built is not None else {}

    def build_model(c):
        built["model"] = lora_tiny(c)[0]
        return built["model"], StubTokenizer(), torch.device("cpu"), torch.float32

    def build_stepper(c, model, tokenizer, device, dtype):
        stepper = CEStepper(c, model, tokenizer, device, dtype, hooks=hooks)
        if frozen:
            inner = stepper.run_step

            def run_step(rows, step):
                result = inner(rows, step)
                for p in model.parameters():
                    p.grad = None
                return result

            stepper.run_step = run_step
        built["stepper"] = stepper
        return stepper

    rows = held_out if held_out is not None else tiny_rows(n=4, seed=11)
    return train(cfg, build_model=build_model, build_stepper=build_stepper,
                 load_data=lambda c, tok: tiny_rows(), load_held_out=lambda c, tok: rows)


# -- checkpoints ----------------------------------------------------------------------------------


def test_save_strategy_steps_saves_every_save_steps_and_at_the_end(tmp_path):
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=8, save_steps=3, save_strategy="steps")) == 0
    assert checkpoint_steps(run) == [3, 6, 8]


def test_a_fraction_of_the_run_and_save_first_step(tmp_path):
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=8, save_steps=0.25, save_first_step=True)) == 0
    assert checkpoint_steps(run) == [1, 2, 4, 6, 8]


def test_save_strategy_no_saves_only_the_final_adapter(tmp_path):
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=4, save_steps=None, save_strategy="no")) == 0
    assert checkpoint_steps(run) == [] and not (run / "checkpoints").exists()
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_save_strategy_epoch_saves_when_an_epoch_ends(tmp_path):
    """24 rows, 4 a step: the first epoch ends with step 6, the run with step 8."""
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=8, save_steps=None, save_strategy="epoch")) == 0
    assert checkpoint_steps(run) == [6, 8]


# -- evals during training ------------------------------------------------------------------------


def test_eval_steps_log_eval_records_that_the_tui_eval_panel_shows(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, max_steps=6, eval_steps=2, val_set_size=0.1, learning_rate=1e-2)
    assert run_with_evals(cfg) == 0
    evals = eval_records(run)
    assert [e["step"] for e in evals] == [0, 2, 4, 6]
    for e in evals:
        assert e["in_training"] is True and e["adapter"] is None and e["eval/n_rows"] == 4
        assert e["eval/ce_loss"] > 0 and e["eval/cfm_loss"] >= 0 and -1 <= e["eval/alignment"] <= 1
        assert e["eval/pass@1"] is None
    assert evals[-1]["eval/ce_loss"] < evals[0]["eval/ce_loss"]  # training on the same pattern helps

    from ebft_tui.metrics.evals import eval_lines
    from ebft_tui.metrics.history import MetricHistory
    from ebft_tui.runs.tail import read_jsonl

    history = MetricHistory()  # what the run screen reads the file into
    history.update_many(read_jsonl(run / "metrics.jsonl"))
    lines = eval_lines(history.evals, limit=10)
    assert len(lines) == 4
    assert lines[0].startswith("step 0 · training: CE ") and "↓" not in lines[0]
    assert lines[-1].startswith("step 6 · training: CE ") and "CE " in lines[-1] and "↓" in lines[-1]


def test_an_eval_does_not_change_the_training_run(tmp_path):
    """Evals draw from forked RNG streams: the weights after 6 steps are the same with and without."""
    plain, with_evals = {}, {}
    assert run_tiny(tiny_cfg(tmp_path / "plain", max_steps=6), built=plain) == 0
    cfg = tiny_cfg(tmp_path / "evals", max_steps=6, eval_steps=1, val_set_size=0.1)
    assert run_with_evals(cfg, built=with_evals) == 0
    assert len(eval_records(tmp_path / "evals")) == 7
    assert_same_params(trainable(with_evals["model"]), trainable(plain["model"]))


def test_a_resumed_run_does_not_measure_or_log_an_eval_twice(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, max_steps=8, save_steps=4, eval_steps=2, val_set_size=0.1)

    def kill(step, loss):
        if step == 7:
            raise Killed
        return loss

    with pytest.raises(Killed):
        run_with_evals(cfg, hooks={"loss": kill})
    assert [e["step"] for e in eval_records(run)] == [0, 2, 4, 6]
    assert run_with_evals(cfg) == 0  # resumes from step 4: steps 5-6 and their eval are re-run
    assert [e["step"] for e in eval_records(run)] == [0, 2, 4, 6, 8]


def test_early_stopping_ends_the_run_as_done_when_evals_stop_improving(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, max_steps=8, eval_steps=1, val_set_size=0.1, early_stopping_patience=2)
    assert run_with_evals(cfg, frozen=True) == 0
    assert [e["step"] for e in eval_records(run)] == [0, 1, 2]  # 0 is the best, 1 and 2 no better
    assert [r["step"] for r in metric_records(run)] == [1, 2]
    done = read_records(run / "metrics.jsonl")[-1]
    assert done["phase"] == "done" and "early stopping at step 2" in done["message"]
    assert "best eval/ce_loss" in done["message"] and "at step 0" in done["message"]
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_early_stopping_counts_evals_without_improvement_as_transformers_does():
    stop = EarlyStopping(patience=2, metric="eval/ce_loss", greater_is_better=False)
    verdicts = [stop.update(s, {"eval/ce_loss": v}) for s, v in enumerate([3.0, 2.0, 2.0, 1.5, 1.6, 1.5])]
    assert verdicts == [False, False, False, False, False, True]
    assert (stop.best, stop.best_step) == (1.5, 3)
    up = EarlyStopping(patience=1, metric="eval/alignment", greater_is_better=True)
    assert [up.update(s, {"eval/alignment": v}) for s, v in enumerate([0.1, 0.2, float("nan"), 0.2])] == [
        False, False, False, True]


def test_steps_and_schedule_arithmetic():
    assert [steps_of(v, 10) for v in (None, 5, 5.0, 0.25, 0.01)] == [None, 5, 5, 3, 1]
    every = EvalSchedule(every=3, each_epoch=False)
    assert [s for s in range(1, 10) if every.due(s, False)] == [3, 6, 9]
    epoch = EvalSchedule(every=None, each_epoch=True)
    assert not epoch.due(4, False) and epoch.due(5, True)


def test_rng_untouched_gives_back_every_stream():
    torch.manual_seed(1)
    random.seed(1)
    expected = (torch.rand(1).item(), random.random())
    torch.manual_seed(1)
    random.seed(1)
    with rng_untouched():
        torch.rand(5), random.random(), torch.manual_seed(99)
    assert (torch.rand(1).item(), random.random()) == expected


# -- resume -------------------------------------------------------------------------------------


def test_resume_from_checkpoint_continues_another_run_dirs_checkpoint(tmp_path):
    source, built = tmp_path / "a", {}
    assert run_tiny(tiny_cfg(source, max_steps=8, save_steps=2), built=built) == 0
    expected = trainable(built["model"])
    start = source / "checkpoints" / "step-000004"
    run = tmp_path / "b"
    cfg = tiny_cfg(run, max_steps=8, save_steps=2, resume_from_checkpoint=str(start))

    def kill(step, loss):
        if step == 7:
            raise Killed
        return loss

    with pytest.raises(Killed):
        run_tiny(cfg, hooks={"loss": kill})
    assert [r["step"] for r in metric_records(run)] == [5, 6]
    built = {}
    assert run_tiny(cfg, built=built) == 0  # the same command again: from b's own step 6, not a's 4
    assert_same_params(trainable(built["model"]), expected)
    assert [r["step"] for r in metric_records(run)] == [5, 6, 7, 8]
    runs = [e["resumed_from"] for e in read_records(run / "metrics.jsonl") if e["event"] == "run"]
    assert runs == [str(start), "checkpoints/step-000006"]


def test_resume_from_checkpoint_must_be_an_ebft_checkpoint(tmp_path, capsys):
    (tmp_path / "hf-checkpoint-50").mkdir()
    cfg = tiny_cfg(tmp_path / "run", resume_from_checkpoint=str(tmp_path / "hf-checkpoint-50"))
    assert run_tiny(cfg) == 2
    assert "is not an ebft checkpoint" in capsys.readouterr().err


def test_auto_resume_false_refuses_a_run_dir_that_holds_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=2)) == 0
    assert run_tiny(tiny_cfg(run, max_steps=4, auto_resume_from_checkpoints=False)) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_pass_at_1_during_training_needs_a_sandbox_before_the_run_starts(tmp_path, monkeypatch):
    """`eval_pass_at_1` runs model-written code: with no OS jail the run stops while setting up, with
    the sandbox's own message (a user error: one message, no traceback)."""
    from ebft_engine.sandbox import SandboxUnavailable
    from ebft_engine.train_eval import build_held_out_eval

    monkeypatch.setenv("EBFT_SANDBOX_BACKENDS", "none")
    cfg = tiny_cfg(tmp_path / "run", eval_steps=2, eval_pass_at_1=True, eval_max_rows=2,
                   test_datasets=[{"path": "builtin:humaneval", "split": "test"}])
    with pytest.raises(SandboxUnavailable):
        build_held_out_eval(cfg, StubTokenizer(), torch.device("cpu"), tiny_rows(n=2))
