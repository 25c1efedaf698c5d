"""MetricHistory: trends, health against the spec's ranges, non-finite values, ETA, console line."""

from __future__ import annotations

import math

from ebft_tui.catalog import METRICS, healthy_range
from ebft_tui.metrics.history import MetricHistory, MetricSeries, console_arrow, format_duration


def metrics(step, ts=None, **vals):
    rec = {"v": 1, "event": "metrics", "step": step, "max_steps": 20}
    if ts is not None:
        rec["ts"] = ts
    rec.update({k.replace("__", "/"): v for k, v in vals.items()})
    return rec


def test_series_keeps_finite_values_and_counts_the_rest():
    s = MetricSeries("x", maxlen=3)
    for v in [1.0, None, float("nan"), float("inf"), 2.0, 3.0, 4.0, "text", True]:
        s.add(v)
    assert list(s.values) == [2.0, 3.0, 4.0]  # bounded
    assert s.n_nonfinite == 5 and s.min == 1.0 and s.max == 4.0 and s.last == 4.0
    s.add(None)
    assert s.last == 4.0 and not s.last_is_finite


def test_trend():
    s = MetricSeries("x")
    assert s.trend() is None
    s.add(1.0)
    assert s.trend() is None
    s.add(2.0)
    assert s.trend() == "up"
    down = MetricSeries("y")
    for v in [5, 4, 3, 2, 1, 0.5]:
        down.add(v)
    assert down.trend() == "down" and down.arrow() == "v"
    flat = MetricSeries("z")
    for v in [1.0, 1.0, 1.0, 1.0]:
        flat.add(v)
    assert flat.trend() == "flat"
    noisy = MetricSeries("n")  # tiny drift against a large spread reads as flat
    for v in [0.0, 10.0, 0.0, 10.0, 0.1, 10.0, 0.0, 10.0]:
        noisy.add(v)
    assert noisy.trend() == "flat"


def test_health_ranges_and_direction():
    h = MetricHistory()
    assert h.health("ebft/alignment") == "unknown"
    for i, a in enumerate([0.35, 0.4, 0.45]):
        h.update(metrics(i + 1, ebft__alignment=a))
    assert h.health("ebft/alignment") == "good"  # in 0.3-0.9 and rising
    for i, a in enumerate([0.44, 0.42, 0.40, 0.38]):
        h.update(metrics(i + 4, ebft__alignment=a))
    assert h.health("ebft/alignment") == "warn"  # in range but falling
    h.update(metrics(9, ebft__alignment=0.2))
    assert h.health("ebft/alignment") == "warn"  # below the healthy range
    h.update(metrics(10, ebft__alignment=0.05))
    assert h.health("ebft/alignment") == "bad"  # the spec's "stays below 0.1" row

    h.update(metrics(11, ebft__diversity=1.5))
    assert h.health("ebft/diversity") == "bad"  # mode collapse
    h.update(metrics(12, ebft__cfm_loss=150.0))
    assert h.health("ebft/cfm_loss") == "bad"
    h.update(metrics(13, grad_norm=0.0))
    assert h.health("grad_norm") == "good"  # a zero-advantage skip is normal
    h.update(metrics(14, grad_norm=0.0))
    h.update(metrics(15, grad_norm=0.0))
    assert h.health("grad_norm") == "warn"  # consistently zero is not
    h.update(metrics(16, grad_norm=12.0))
    assert h.health("grad_norm") == "bad"
    h.update(metrics(17, ebft__reward=-1.0))
    assert h.health("ebft/reward") == "bad"
    h.update(metrics(18, ebft__reward=0.2))
    assert h.health("ebft/reward") == "good"  # no range; rising
    h.update(metrics(19, entropy=float("nan")))
    assert h.health("entropy") == "bad"
    h.update(metrics(20, is_ratio_min=0.5))
    assert h.health("is_ratio_min") == "good"


def test_whitening_disables_the_diversity_range():
    assert healthy_range("ebft/diversity", whitening=True) is None
    assert healthy_range("ebft/diversity") == METRICS["ebft/diversity"].healthy
    plain, white = MetricHistory(), MetricHistory(whitening=True)
    for h in (plain, white):
        h.update(metrics(1, ebft__diversity=0.5))
        h.update(metrics(2, ebft__diversity=0.4))
    assert plain.health("ebft/diversity") == "warn"
    assert white.health("ebft/diversity") == "good"


def test_update_folds_every_event():
    h = MetricHistory()
    h.update({"event": "run", "mode": "strided", "max_steps": 10})
    h.update({"event": "status", "phase": "loading", "step": 0, "message": "loading model"})
    assert h.mode == "strided" and h.max_steps == 10 and h.phase == "loading" and h.phase_message == "loading model"
    h.update({"event": "warning", "step": 1, "metric": "ebft/alignment", "message": "low", "hint": "h"})
    h.update({"event": "checkpoint", "step": 2, "path": "checkpoints/step-2"})
    h.update({"event": "eval", "step": 2, "eval/ce_loss": 0.3, "adapter": "x"})
    h.update({"event": "error", "step": 3, "message": "boom", "hint": "fix"})
    h.update({"event": "something-new"})
    h.update("not a dict")  # type: ignore[arg-type]
    assert len(h.warnings) == 1 and len(h.checkpoints) == 1 and len(h.evals) == 1 and len(h.errors) == 1
    assert h.series("eval/ce_loss").last == 0.3
    assert h.phase == "error" and h.finished and h.step == 3 and h.n_records == 7
    assert "adapter" not in h.keys()


def test_eta_from_timestamps_then_step_time():
    h = MetricHistory()
    assert h.eta_seconds() is None
    h.update(metrics(1, step_time_s=3.0))
    assert h.eta_seconds() == 19 * 3.0
    h2 = MetricHistory()
    h2.update(metrics(2, ts=100.0))
    h2.update(metrics(4, ts=110.0))  # 5 s per step
    assert math.isclose(h2.eta_seconds(), 16 * 5.0)
    assert math.isclose(h2.progress, 0.2)
    h2.update(metrics(20, ts=200.0))
    assert h2.eta_seconds() == 0.0
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(None) == "--"


def test_console_line_is_the_engine_format():
    h = MetricHistory()
    r1 = metrics(11, ebft__alignment=0.40, ebft__diversity=0.03, ebft__cfm_loss=4.5, ebft__reward=0.35,
                 grad_norm=1.0, step_time_s=3.0)
    h.update(r1)
    assert h.console_line(r1) == ("step 11/20 | align +0.400 = | divers +0.030 = | cfm 4.500 = | "
                                  "reward +0.350 = | gn 1.00 | 3.0s")
    r2 = metrics(12, ebft__alignment=0.412, ebft__diversity=0.023, ebft__cfm_loss=4.231, ebft__reward=0.389,
                 grad_norm=1.1, step_time_s=3.2)
    h.update(r2)
    assert h.console_line() == ("step 12/20 | align +0.412 ^ | divers +0.023 v | cfm 4.231 v | "
                                "reward +0.389 ^ | gn 1.10 | 3.2s")
    r3 = metrics(13, ebft__cfm_loss=None)
    h.update(r3)
    assert h.console_line(r3) == "step 13/20 | cfm nan ="
    r4 = {"event": "metrics", "step": 3, "loss": 2.5}
    h2 = MetricHistory()
    h2.update(r4)
    assert h2.console_line() == "step 3 | loss 2.5000 ="


def test_console_arrow_matches_the_engine_rule():
    assert console_arrow(1.0, []) == "="
    assert console_arrow(None, [1.0]) == "="
    assert console_arrow(1.0005, [1.0]) == "="  # inside the 1e-3 relative tolerance
    assert console_arrow(1.01, [1.0]) == "^"
    assert console_arrow(0.5, [9.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == "v"  # window of 5


def test_typed_records():
    from ebft_tui.runs.events import CheckpointRecord, MetricRecord, Record, RunRecord, StatusRecord, parse_record

    m = parse_record({"v": 1, "ts": 1.0, "event": "metrics", "step": 3, "max_steps": 9, "ebft/alignment": 0.4,
                      "ebft/cfm_loss": None, "note": "x"})
    assert isinstance(m, MetricRecord) and m.step == 3 and m.max_steps == 9
    assert m.values == {"ebft/alignment": 0.4, "ebft/cfm_loss": None}
    assert isinstance(parse_record({"event": "status", "phase": "done"}), StatusRecord)
    assert parse_record({"event": "checkpoint", "step": 2, "path": "p"}) == CheckpointRecord("checkpoint", None, 2, {"event": "checkpoint", "step": 2, "path": "p"}, "p")
    assert isinstance(parse_record({"event": "run", "mode": "strided"}), RunRecord)
    unknown = parse_record({"event": "future", "step": True})
    assert type(unknown) is Record and unknown.step is None
