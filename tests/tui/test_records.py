"""Readers skip records whose fields have the wrong type, as they skip lines that are not JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ebft_tui.cli import app
from ebft_tui.metrics.history import MetricHistory
from ebft_tui.runs.events import record_problem
from ebft_tui.runs.tail import JsonlFollower

GOOD = [
    {"v": 1, "ts": 1.0, "event": "run", "mode": "strided", "max_steps": 3, "resumed_from": None},
    {"v": 1, "ts": 2.0, "event": "metrics", "step": 1, "max_steps": 3, "ebft/alignment": 0.3, "ebft/cfm_loss": None},
    {"v": 1, "ts": 3.0, "event": "phase", "phase": "generating", "step": 2},
    {"v": 1, "ts": 4.0, "event": "eval", "step": 1, "eval/ce_loss": 1.2, "adapter": None, "note": "unsafe exec"},
    {"v": 1, "ts": 5.0, "event": "metrics", "step": 2, "max_steps": 3, "ebft/alignment": 0.4},
]
HOSTILE = [
    {"v": 1, "ts": 6.0, "event": "metrics", "step": "3", "ebft/alignment": 0.9},  # step as a string
    {"v": 1, "ts": 6.0, "event": "metrics", "step": [3], "ebft/alignment": 0.9},  # step as a list
    {"v": 1, "ts": 6.0, "event": "metrics", "step": 3, "ebft/alignment": "0.9"},  # a metric as a string
    {"v": 1, "ts": 6.0, "event": "metrics", "step": 3, "grad_norm": [1.0]},  # a metric as a list
    {"v": 1, "ts": 6.0, "event": "metrics", "step": 3, "entropy": True},  # a bool is not a number
    {"v": 1, "ts": 6.0, "event": "metrics", "step": 3, "max_steps": 2.5},  # max_steps not an int
    {"v": 1, "ts": "later", "event": "metrics", "step": 3},  # ts as a string
    {"v": "1", "ts": 6.0, "event": "metrics", "step": 3},  # v as a string
    {"v": 1, "ts": 6.0, "event": 7, "step": 3},  # event as a number
    {"v": 1, "ts": 6.0, "event": "status", "phase": {"x": 1}, "step": 3},  # phase as a mapping
    {"v": 1, "ts": 6.0, "event": "warning", "step": 3, "message": ["a"]},  # message as a list
    {"v": 1, "ts": 6.0, "event": "eval", "step": 3, "eval/pass@1": "all"},  # an eval number as a string
    [1, 2, 3],  # not an object
]


@pytest.mark.parametrize("record", HOSTILE, ids=range(len(HOSTILE)))
def test_each_hostile_record_is_named(record):
    assert record_problem(record) is not None


@pytest.mark.parametrize("record", GOOD, ids=range(len(GOOD)))
def test_well_typed_records_pass(record):
    assert record_problem(record) is None


def write(path: Path) -> None:
    lines = [json.dumps(r) for r in GOOD[:2]] + [json.dumps(r) for r in HOSTILE] + ["{not json"] + \
        [json.dumps(r) for r in GOOD[2:]]
    path.write_text("\n".join(lines) + "\n")


def test_follower_skips_and_counts_them_and_history_stays_sane(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path)
    with JsonlFollower(path) as f:
        records = f.read_new()
        assert f.n_invalid == len(HOSTILE) + 1
    assert records == GOOD
    h = MetricHistory()
    h.update_many(records)
    assert h.step == 2 and h.max_steps == 3
    assert list(h.series("ebft/alignment").values) == [0.3, 0.4]
    assert not h.has("grad_norm") and not h.has("entropy")


def test_watch_once_ignores_them(tmp_path):
    write(tmp_path / "metrics.jsonl")
    res = CliRunner().invoke(app, ["watch", str(tmp_path), "--once"])
    assert res.exit_code == 0, res.output
    steps = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == ["step 1/3", "step 2/3"]
    assert "0.900" not in res.stdout
