"""`ebft eval` records in the TUI: one line per eval, arrows against the eval before it."""

from __future__ import annotations

import json
import time

from ebft_tui.metrics.evals import eval_line, eval_lines
from ebft_tui.tui.app import EbftApp
from ebft_tui.tui.screens.run import RunScreen

BASE = {"event": "eval", "step": 0, "eval/ce_loss": 1.182, "eval/cfm_loss": 0.701, "eval/alignment": 0.465,
        "eval/pass@1": 0.0, "eval/n_code_tasks": 5, "adapter": None}
TRAINED = {"event": "eval", "step": 8, "eval/ce_loss": 1.147, "eval/cfm_loss": 0.467, "eval/alignment": 0.611,
           "eval/pass@1": 0.2, "eval/n_code_tasks": 5, "adapter": "/tmp/runs/align-run/adapter"}


def test_first_eval_has_numbers_and_no_arrows():
    line = eval_line(BASE, None)
    assert line == "step 0 · base model: CE 1.182 · CFM 0.701 · align +0.465 · pass@1 0.000 (5 tasks)"


def test_arrows_compare_with_the_previous_eval_and_colour_by_wanted_direction():
    plain = eval_lines([BASE, TRAINED])
    assert plain[1] == ("step 8 · align-run/adapter: CE 1.147 ↓ · CFM 0.467 ↓ · align +0.611 ↑ · "
                        "pass@1 0.200 (5 tasks) ↑")
    worse = dict(TRAINED, **{"eval/ce_loss": 1.5, "eval/pass@1": 0.0})
    marked = eval_lines([BASE, worse], markup=True)[1]
    assert "CE 1.500 [red]↑[/]" in marked  # CE went up: against
    assert "CFM 0.467 [green]↓[/]" in marked  # CFM went down: wanted
    assert "pass@1 0.000 (5 tasks) →" in marked  # unchanged: no colour


def test_missing_or_nan_numbers_are_left_out_and_only_the_last_few_shown():
    partial = {"event": "eval", "eval/ce_loss": float("nan"), "eval/cfm_loss": 0.5, "adapter": "a"}
    assert eval_line(partial, BASE) == "a: CFM 0.500 ↓"
    many = [dict(BASE, step=i) for i in range(6)]
    lines = eval_lines(many, limit=3)
    assert [line.split(" ·")[0] for line in lines] == ["step 3", "step 4", "step 5"]


async def test_watch_screen_shows_the_eval_panel(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recs = [{"v": 1, "ts": 1000.0, "event": "run", "mode": "strided", "max_steps": 8},
            {"v": 1, "ts": 1001.0, "event": "metrics", "step": 8, "max_steps": 8, "ebft/alignment": 0.7},
            {"v": 1, "ts": 1002.0, "event": "status", "phase": "done", "step": 8}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    app = EbftApp(watch_dir=run_dir, install_signal_handlers=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        assert isinstance(screen, RunScreen)
        await pilot.pause(0.3)
        panel = screen.query_one("#evals")
        assert not panel.has_class("-shown")  # no eval yet: no empty box
        # `ebft eval` appends to the same file while the screen follows it.
        with (run_dir / "metrics.jsonl").open("a") as f:
            for rec in (BASE, TRAINED):
                f.write(json.dumps(dict(rec, v=1, ts=1003.0)) + "\n")
        deadline = time.monotonic() + 60  # a hang guard: the screen follows the file within a poll
        while len(screen.history.evals) < 2 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause()
        text = str(panel.content)
        assert panel.has_class("-shown") and panel.display
        assert "base model" in text and "align-run/adapter" in text and "CE 1.147" in text
        await pilot.press("ctrl+q")


def test_an_eval_made_during_training_is_labelled_so():
    during = {"event": "eval", "step": 50, "eval/ce_loss": 1.0, "eval/cfm_loss": 0.4, "eval/pass@1": None,
              "adapter": None, "in_training": True}
    assert eval_line(during, None) == "step 50 · training: CE 1.000 · CFM 0.400"
    assert eval_line(dict(during, in_training=False), None).startswith("step 50 · base model:")
