"""metrics.jsonl writer and reader (docs/log-contract.md), the console line, live health warnings."""

from __future__ import annotations

import json
import math

from ebft_engine.metrics import (HealthMonitor, MetricsLog, console_line, last_logged_step, read_records,
                                 trend)


def test_record_shape_and_non_finite_values_become_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.run(mode="strided", max_steps=20, base_model="m", output_dir=str(tmp_path))
        log.metrics(1, {"ebft/alignment": 0.5, "loss": float("nan"), "grad_norm": float("inf"),
                        "entropy": -float("inf"), "max_steps": 20})
        log.status("training", 1, "go")
        log.warning(1, "ebft/alignment", "low", "try x")
        log.error(1, "boom", "fix")
        log.checkpoint(1, "checkpoints/step-000001")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    lines = text.splitlines()
    assert len(lines) == 6 and text.endswith("\n")
    records = [json.loads(line) for line in lines]  # strict JSON: every line parses
    assert [r["event"] for r in records] == ["run", "metrics", "status", "warning", "error", "checkpoint"]
    for r in records:
        assert r["v"] == 1 and isinstance(r["ts"], float)
    assert records[0]["resumed_from"] is None
    m = records[1]
    assert m["step"] == 1 and m["ebft/alignment"] == 0.5
    assert m["loss"] is None and m["grad_norm"] is None and m["entropy"] is None
    assert records[2] == {**records[2], "phase": "training", "step": 1, "message": "go"}
    assert records[3]["metric"] == "ebft/alignment" and records[3]["hint"] == "try x"
    assert records[5]["path"] == "checkpoints/step-000001"


def test_tensor_and_numpy_scalars_are_written_as_numbers(tmp_path):
    import numpy as np
    import torch

    with MetricsLog(tmp_path / "m.jsonl") as log:
        log.metrics(3, {"a": torch.tensor(1.5), "b": np.float32(2.0), "c": np.int64(4), "d": torch.tensor(float("nan"))})
    (record,) = read_records(tmp_path / "m.jsonl")
    assert record["a"] == 1.5 and record["b"] == 2.0 and record["c"] == 4 and record["d"] is None


def test_reader_skips_torn_and_invalid_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"v": 1, "ts": 1.0, "event": "metrics", "step": 1})
    path.write_text(good + "\nnot json\n[1, 2]\n" + good.replace('"step": 1', '"step": 2') + "\n" + good[:25])
    records = read_records(path)
    assert [r["step"] for r in records] == [1, 2]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_writer_after_a_torn_line_ends_it_instead_of_extending_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.metrics(1, {"loss": 1.0})
    with open(path, "a") as f:  # a writer killed in the middle of its record
        f.write('{"v": 1, "ts": 2.0, "event": "metr')
    with MetricsLog(path) as log:
        log.metrics(2, {"loss": 0.5})
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert [r["step"] for r in read_records(path)] == [1, 2]


def test_two_writers_one_after_the_other_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in (1, 2):
            log.metrics(step, {"loss": 1.0 / step})
    first = path.read_bytes()
    with MetricsLog(path) as log:
        log.metrics(3, {"loss": 0.3})
    assert path.read_bytes().startswith(first)  # never truncated or rewritten
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]
    assert last_logged_step(read_records(path)) == 3


def test_every_record_is_flushed_as_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.metrics(1, {"loss": 1.0})
    assert read_records(path)[0]["step"] == 1  # visible to a reader while the writer is open
    log.close()


def test_already_logged_steps_are_not_written_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.already_logged_through = 5
        assert log.metrics(5, {"loss": 1.0}) is None
        assert log.warning(4, "x", "m", "h") is None
        log.status("resumed", 4, "resumed")  # other events are always written
        assert log.metrics(6, {"loss": 1.0}) is not None
    assert [(r["event"], r["step"]) for r in read_records(path)] == [("status", 4), ("metrics", 6)]


def test_trend_arrows():
    assert trend(1.0, []) == "="
    assert trend(1.0, [0.5, 0.6]) == "^"
    assert trend(0.1, [0.5, 0.6]) == "v"
    assert trend(0.5, [0.5, 0.5]) == "="
    assert trend(0.0231, [0.0230]) == "^"  # small values have a relative tolerance, not an absolute one
    assert trend(float("nan"), [1.0]) == "="
    assert trend(1.0, [float("nan")]) == "="


def test_console_line_matches_the_contract_format():
    metrics = {"ebft/alignment": 0.412, "ebft/diversity": 0.023, "ebft/cfm_loss": 4.231,
               "ebft/reward": 0.389, "grad_norm": 1.1, "step_time_s": 3.2}
    history = {"ebft/alignment": [0.3, 0.35], "ebft/diversity": [0.05], "ebft/cfm_loss": [5.0],
               "ebft/reward": [0.2]}
    line = console_line(12, 20, metrics, history)
    assert line == ("step 12/20 | align +0.412 ^ | divers +0.023 v | cfm 4.231 v | reward +0.389 ^ "
                    "| gn 1.10 | 3.2s")


def test_console_line_without_feature_metrics_and_with_nan():
    line = console_line(1, 8, {"loss": 2.5, "grad_norm": float("nan"), "step_time_s": 0.04}, {})
    assert line == "step 1/8 | loss 2.5000 = | gn nan | 0.0s"
    line = console_line(2, 8, {"ebft/alignment": -0.2}, {"ebft/alignment": [0.1]})
    assert line == "step 2/8 | align -0.200 v"


def _feed(monitor, values, key, start=1):
    fired = []
    for i, v in enumerate(values):
        fired += monitor.update(start + i, {key: v})
    return fired


def test_each_rule_fires_once_per_episode():
    cases = {  # metric: (bad value, good value, patience)
        "ebft/alignment": (0.05, 0.5, 5),
        "ebft/diversity": (1.5, 0.05, 2),
        "ebft/reward": (-0.98, 0.3, 5),
        "entropy": (0.001, 0.2, 3),
        "ebft/cfm_loss": (150.0, 4.0, 3),
        "is_ratio_min": (0.01, 0.8, 3),
    }
    for key, (bad, good, patience) in cases.items():
        monitor = HealthMonitor()
        assert _feed(monitor, [bad] * (patience - 1), key) == [], key
        fired = _feed(monitor, [bad] * 10, key, start=patience)
        assert len(fired) == 1 and fired[0].metric == key and fired[0].step == patience, key
        assert fired[0].hint, key
        # the condition clears, then comes back: a new episode warns again, once
        assert _feed(monitor, [good] + [bad] * (patience - 1), key, start=100) == [], key
        assert len(_feed(monitor, [bad] * 5, key, start=200)) == 1, key


def test_spec_hints_and_grad_norm_rules():
    monitor = HealthMonitor()
    zero = _feed(monitor, [0.0] * 12, "grad_norm")
    assert len(zero) == 1 and zero[0].step == 10 and "num_generations" in zero[0].hint
    assert _feed(HealthMonitor(), [0.0] * 9, "grad_norm") == []  # a few zero-advantage skips are normal
    high = _feed(HealthMonitor(), [25.0] * 3, "grad_norm")
    assert len(high) == 1 and "learning_rate" in high[0].hint
    align = _feed(HealthMonitor(), [0.0] * 5, "ebft/alignment")
    assert "feature_layers or embed_method" in align[0].hint
    div = _feed(HealthMonitor(), [2.0] * 2, "ebft/diversity")
    assert "Increase diversity_coef or temperature".lower() in div[0].hint.lower()
    reward = _feed(HealthMonitor(), [-1.0] * 5, "ebft/reward")
    assert "Reduce diversity_coef or increase alignment_coef".lower() in reward[0].hint.lower()
    # not stuck: -0.9 is outside the 0.05 band around -1
    assert _feed(HealthMonitor(), [-0.9] * 10, "ebft/reward") == []


def test_absent_or_nan_values_neither_extend_nor_end_an_episode():
    monitor = HealthMonitor()
    fired = []
    for step, value in enumerate([0.05, 0.05, None, math.nan, 0.05, 0.05, 0.05], start=1):
        fired += monitor.update(step, {} if value is None else {"ebft/alignment": value})
    assert [w.step for w in fired] == [7]


def test_whitening_suppresses_the_diversity_warning():
    assert _feed(HealthMonitor(use_whitening=True), [5.0] * 10, "ebft/diversity") == []
    assert len(_feed(HealthMonitor(use_whitening=False), [5.0] * 10, "ebft/diversity")) == 1
    # the other rules still apply under whitening
    assert len(_feed(HealthMonitor(use_whitening=True), [0.0] * 5, "ebft/alignment")) == 1


def test_phase_records_are_throttled_within_a_step(tmp_path, monkeypatch):
    from ebft_engine import metrics as m

    clock = {"t": 100.0}
    monkeypatch.setattr(m.time, "monotonic", lambda: clock["t"])
    with m.MetricsLog(tmp_path / "metrics.jsonl") as log:
        log.phase(1, "generating")
        log.phase(1, "scoring")  # same second: dropped
        clock["t"] += 1.5
        log.phase(1, "scoring")  # later: written
        log.phase(1, "scoring")  # unchanged: dropped
        log.phase(2, "generating")  # a new step: always written
    recs = m.read_records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["phase"]) for r in recs] == [(1, "generating"), (1, "scoring"), (2, "generating")]
    assert all(r["event"] == "phase" and r["v"] == 1 for r in recs)
