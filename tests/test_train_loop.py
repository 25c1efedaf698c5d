"""The training loop with a small real Stepper (supervised CE) on the tiny Llama.

The CE stepper is a test double for a mode, but a working one: it splits its rows into
micro-batches, normalises the loss over the whole step's tokens, backpropagates, and draws from
the torch and Python RNGs (random crops, row order) so that resume tests notice an RNG that is not
restored.
"""

from __future__ import annotations

import math
import importlib.machinery
import random
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from tiny_models import make_tiny_llama
from ebft_engine.config import load_config
from ebft_engine.metrics import read_records
from ebft_engine.stepper import StepResult
from ebft_engine.train import DataOrder, build_optimizer, build_scheduler, config_differences, train

VOCAB = 97


def tiny_cfg(run_dir: Path, **overrides):
    """A real EbftConfig for the tiny runs (the model, stepper and rows are the tests' own)."""
    values = dict(
        base_model="tiny-llama", rl="ebft", ebft={"mode": "strided", "use_whitening": False},
        datasets=[{"path": "rows.jsonl", "type": "ebft_strided_structured.transform"}],
        output_dir=str(run_dir), seed=7, max_steps=8, learning_rate=5e-3, micro_batch_size=2,
        gradient_accumulation_steps=2, logging_steps=1, save_steps=4, save_total_limit=None,
        max_grad_norm=1.0, weight_decay=0.0, warmup_steps=1, lr_scheduler="cosine", adapter="lora",
    )
    values.update(overrides)
    return load_config(values)


class CEStepper:
    """Next-token cross-entropy over (randomly cropped) token rows, accumulated over micro-batches."""

    def __init__(self, cfg, model, tokenizer, device, dtype, *, crop: int = 12, hooks=None):
        self.model = model
        self.micro_batch_size = cfg.micro_batch_size
        self.accumulation = cfg.gradient_accumulation_steps
        self.rows_per_step = self.micro_batch_size * self.accumulation
        self.crop = crop
        self.hooks = hooks or {}
        self.closed = False

    def _crop(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.crop:
            return ids
        start = int(torch.randint(0, len(ids) - self.crop + 1, (1,)))
        return ids[start:start + self.crop]

    def run_step(self, rows, step):
        rows = list(rows)
        random.Random(random.random()).shuffle(rows)  # draws from the Python RNG
        seqs = [self._crop(list(r["input_ids"])) for r in rows]
        total_targets = sum(len(s) - 1 for s in seqs)
        loss_sum = 0.0
        for i in range(0, len(seqs), self.micro_batch_size):
            batch = seqs[i:i + self.micro_batch_size]
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum")
            (token_loss / total_targets).backward()
            loss_sum += token_loss.item()
        loss = loss_sum / total_targets
        if "loss" in self.hooks:
            loss = self.hooks["loss"](step, loss)
        if "after" in self.hooks:
            self.hooks["after"](step)
        return StepResult(metrics={"loss": loss, "ce_loss": loss}, n_tokens=sum(len(s) for s in seqs))

    def after_optimizer_step(self, step):
        pass

    def close(self):
        self.closed = True


def tiny_rows(n: int = 24, seed: int = 3) -> list[dict]:
    """Rows with a learnable pattern: arithmetic sequences mod VOCAB, lengths 10..20."""
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        start, step, length = g.randrange(VOCAB), g.randrange(1, 5), g.randrange(10, 21)
        rows.append({"input_ids": [(start + k * step) % VOCAB for k in range(length)]})
    return rows


def counting_rows() -> list[dict]:
    """24 rows counting up by one: an easy pattern, for a loss that must fall."""
    return [{"input_ids": [(s + k) % VOCAB for k in range(16)]} for s in range(0, 96, 4)]


def lora_tiny(cfg, seed: int = 0):
    from ebft_engine.modeling import apply_lora

    model = make_tiny_llama(seed=seed)
    if getattr(cfg, "adapter", None) == "lora":
        model = apply_lora(model, r=4, alpha=8)
    return model, None, torch.device("cpu"), torch.float32


def run_tiny(cfg, *, rows=None, hooks=None, built=None, wrap=None, **kwargs) -> int:
    """`train(cfg)` on the tiny model with the CE stepper (wrapped by `wrap(stepper, cfg)` when
    given); `built` collects (model, stepper)."""
    built = built if built is not None else {}

    def build_model(c):
        built["model"] = lora_tiny(c)[0]
        return built["model"], None, torch.device("cpu"), torch.float32

    def build_stepper(c, model, tokenizer, device, dtype):
        stepper = CEStepper(c, model, tokenizer, device, dtype, hooks=hooks)
        built["stepper"] = wrap(stepper, c) if wrap is not None else stepper
        return built["stepper"]

    return train(cfg, build_model=build_model, build_stepper=build_stepper,
                 load_data=lambda c, tok: rows if rows is not None else tiny_rows(), **kwargs)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def metric_records(run_dir: Path) -> list[dict]:
    return [r for r in read_records(run_dir / "metrics.jsonl") if r["event"] == "metrics"]


# ---------------------------------------------------------------------------------------------


def test_loss_decreases_and_the_run_leaves_a_complete_run_dir(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "run", max_steps=30, save_steps=10, save_total_limit=2, learning_rate=1e-2)
    built = {}
    assert run_tiny(cfg, rows=counting_rows(), built=built) == 0
    records = metric_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.2, (first, last)  # from ln(97) = 4.57: LoRA on a random model learns slowly
    r = records[0]
    for key in ("max_steps", "epoch", "lr", "grad_norm", "step_time_s", "tokens_per_s", "loss"):
        assert key in r, key
    assert r["max_steps"] == 30 and 0 < r["epoch"] <= 1 and r["tokens_per_s"] > 0
    assert records[-1]["epoch"] == pytest.approx(30 * 4 / 24)  # 4 rows a step over 24 rows
    events = read_records(tmp_path / "run" / "metrics.jsonl")
    assert events[0]["event"] == "status" and events[0]["phase"] == "loading"
    assert [e for e in events if e["event"] == "run"][0]["resumed_from"] is None
    assert events[-1]["event"] == "status" and events[-1]["phase"] == "done"
    assert [e["path"] for e in events if e["event"] == "checkpoint"] == [
        "checkpoints/step-000010", "checkpoints/step-000020", "checkpoints/step-000030"]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000020", "step-000030"]  # save_total_limit: 2
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert built["stepper"].closed
    out = capsys.readouterr().out
    assert "step 1/30 | loss " in out and "step 30/30 | loss" in out and " | gn " in out


def test_learning_rate_schedule_warmup_then_cosine(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=10, warmup_steps=2, learning_rate=1.0)
    assert run_tiny(cfg) == 0
    lrs = [r["lr"] for r in metric_records(tmp_path / "run")]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05


def test_the_optimizer_takes_its_settings_from_the_config():
    cfg = tiny_cfg(Path("unused"), adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1)
    opt = build_optimizer(cfg, make_tiny_llama())
    matrices, vectors = opt.param_groups
    assert isinstance(opt, torch.optim.AdamW)
    assert matrices["betas"] == (0.8, 0.95) and matrices["eps"] == 1e-6
    assert (matrices["weight_decay"], vectors["weight_decay"]) == (0.1, 0.0)
    assert all(p.ndim >= 2 for p in matrices["params"]) and all(p.ndim < 2 for p in vectors["params"])
    default = build_optimizer(tiny_cfg(Path("unused")), make_tiny_llama()).param_groups[0]
    assert default["betas"] == (0.9, 0.999) and default["eps"] == 1e-8


@pytest.mark.parametrize("kind, expected_last", [("linear", 1 / 8), ("constant", 1.0)])
def test_schedule_kinds(kind, expected_last):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(tiny_cfg(Path("unused"), warmup_steps=0, lr_scheduler=kind), opt, 8)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(expected_last)


def test_gradient_accumulation_matches_a_bigger_micro_batch():
    rows = tiny_rows(2, seed=11)
    grads = []
    for mb, ga in ((1, 2), (2, 1)):
        cfg = tiny_cfg(Path("unused"), micro_batch_size=mb, gradient_accumulation_steps=ga)
        model = make_tiny_llama(seed=1)
        stepper = CEStepper(cfg, model, None, "cpu", torch.float32, crop=100)
        torch.manual_seed(0)
        random.seed(0)
        stepper.run_step(rows, 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=0, msg=name)


def test_nan_loss_stops_the_run_with_exit_code_3_and_no_checkpoint_of_garbage(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "run", max_steps=8, save_steps=2)
    built = {}
    hooks = {"loss": lambda step, loss: float("nan") if step == 3 else loss}
    assert run_tiny(cfg, hooks=hooks, built=built) == 3
    run = tmp_path / "run"
    errors = [r for r in read_records(run / "metrics.jsonl") if r["event"] == "error"]
    assert len(errors) == 1 and errors[0]["step"] == 3 and "non-finite loss" in errors[0]["message"]
    assert "learning_rate" in errors[0]["hint"] and "checkpoints/step-000002" in errors[0]["hint"]
    assert [r["step"] for r in metric_records(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert not (run / "adapter").exists()
    assert built["stepper"].closed
    assert "non-finite loss nan at step 3" in capsys.readouterr().err


def test_non_finite_gradient_stops_the_run(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=4, save_steps=4)
    built = {}

    def poison(step):
        if step == 2:
            next(p for p in built["model"].parameters() if p.requires_grad).grad.fill_(float("inf"))

    before = {}
    assert run_tiny(cfg, hooks={"after": poison}, built=built) == 3
    errors = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["event"] == "error"]
    assert "non-finite grad_norm" in errors[0]["message"] and errors[0]["step"] == 2
    for p in built["model"].parameters():
        assert torch.isfinite(p).all()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    del before


def test_a_failing_step_writes_an_error_record_and_exits_1(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "run", max_steps=4)

    def boom(step, loss):
        if step == 2:
            raise RuntimeError("the stepper broke")
        return loss

    assert run_tiny(cfg, hooks={"loss": boom}) == 1
    errors = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["event"] == "error"]
    assert errors[0]["message"] == "RuntimeError: the stepper broke" and errors[0]["step"] == 1
    err = capsys.readouterr().err
    assert "Traceback" in err  # unexpected: the traceback goes to stderr (trainer.log)


def test_a_user_error_while_loading_is_one_message_without_traceback(tmp_path, capsys):
    from ebft_engine.modeling import ModelLoadError

    def build_model(cfg):
        raise ModelLoadError("base_model 'nope': no such folder")

    cfg = tiny_cfg(tmp_path / "run")
    assert train(cfg, build_model=build_model) == 1
    err = capsys.readouterr().err
    assert "base_model 'nope': no such folder" in err and "Traceback" not in err
    errors = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["event"] == "error"]
    assert errors[0]["message"] == "base_model 'nope': no such folder"


def test_skipped_steps_count_and_log_but_do_not_update(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=3, save_steps=3)
    built = {}

    class SkippingStepper(CEStepper):
        def run_step(self, rows, step):
            return StepResult(metrics={"loss": 0.0}, n_tokens=0, skipped=True)

    def build_model(c):
        built["model"] = lora_tiny(c)[0]
        built["before"] = trainable(built["model"])
        return built["model"], None, torch.device("cpu"), torch.float32

    assert train(cfg, build_model=build_model, build_stepper=lambda *a: SkippingStepper(*a),
                 load_data=lambda c, t: tiny_rows()) == 0
    records = metric_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["grad_norm"] == 0.0 for r in records)
    after = trainable(built["model"])
    assert all(torch.equal(after[n], built["before"][n]) for n in after)


def test_logging_steps_average_over_the_interval(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=7, logging_steps=3, save_steps=7)
    losses = {}

    def record(step, loss):
        losses[step] = loss
        return loss

    assert run_tiny(cfg, hooks={"loss": record}) == 0
    records = metric_records(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6, 7]
    assert records[0]["loss"] == pytest.approx(sum(losses[s] for s in (1, 2, 3)) / 3)
    assert records[2]["loss"] == pytest.approx(losses[7])


def test_health_warnings_reach_the_log_once(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=12, save_steps=12)

    class LowAlignment(CEStepper):
        def run_step(self, rows, step):
            result = super().run_step(rows, step)
            result.metrics["ebft/alignment"] = 0.02
            return result

    assert train(cfg, build_model=lora_tiny, build_stepper=lambda *a: LowAlignment(*a),
                 load_data=lambda c, t: tiny_rows()) == 0
    warnings = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["metric"] == "ebft/alignment" and warnings[0]["step"] == 5
    assert "feature_layers" in warnings[0]["hint"]


def test_data_order_is_a_reshuffle_per_epoch_and_resumable():
    a = DataOrder(10, seed=1)
    first = a.take(10)
    second = a.take(10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10)) and first != second
    assert a.epoch == 1 and a.epoch_float == 2.0
    b = DataOrder(10, seed=1)
    b.take(7)
    state = b.state_dict()
    expected = b.take(9)  # wraps into the next epoch
    c = DataOrder(10, seed=1)
    c.load_state_dict(state)
    assert c.take(9) == expected
    assert DataOrder(10, seed=2).take(10) != DataOrder(10, seed=1).take(10)


def test_data_order_rewinds_rows_taken_ahead_even_across_an_epoch():
    for taken, rewind in ((7, 3), (12, 4), (20, 10), (3, 5)):
        a = DataOrder(10, seed=4)
        a.take(taken)
        b = DataOrder(10, seed=4)
        b.take(max(0, taken - rewind))
        c = DataOrder(10, seed=4)
        c.load_state_dict(a.state_dict(rewind=rewind))
        assert c.take(15) == b.take(15), (taken, rewind)  # the same rows again, then on


def test_config_differences_ignore_what_a_resume_may_change():
    old = yaml.safe_dump({"max_steps": 8, "learning_rate": 1e-5, "ebft": {"stride": 8}, "save_steps": 2})
    new = yaml.safe_dump({"max_steps": 16, "learning_rate": 2e-5, "ebft": {"stride": 4}, "save_steps": 4})
    assert config_differences(old, new) == ["ebft.stride", "learning_rate"]
    assert config_differences(old, old) == []


def test_grad_norm_is_reported_before_clipping(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=2, max_grad_norm=1e-6, learning_rate=1.0, save_steps=2)
    assert run_tiny(cfg) == 0
    assert all(r["grad_norm"] > 1e-3 for r in metric_records(tmp_path / "run"))
    assert math.isfinite(metric_records(tmp_path / "run")[-1]["loss"])


def test_without_max_steps_the_run_lasts_num_epochs(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=None, num_epochs=1.5, save_steps=None)
    assert run_tiny(cfg) == 0  # 24 rows, 4 a step: 1.5 epochs = 9 steps
    records = metric_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 10)) and records[-1]["epoch"] == 1.5
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000009"]


def test_full_fine_tuning_saves_the_model_not_an_adapter(tmp_path):
    assert run_tiny(tiny_cfg(tmp_path / "run", adapter=None, max_steps=2, learning_rate=1e-3)) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert not (tmp_path / "run" / "adapter").exists()


def test_wandb_gets_the_metrics_records_when_configured(tmp_path, monkeypatch):
    calls = {"log": [], "finish": 0}

    class FakeRun:
        def log(self, metrics, step):
            calls["log"].append((step, metrics["loss"]))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe find_spec
    fake.init = lambda **kw: calls.setdefault("init", kw) and FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_cfg(tmp_path / "run", max_steps=3, save_steps=3, wandb_project="p", wandb_name="n")
    assert run_tiny(cfg) == 0
    assert calls["init"]["project"] == "p" and calls["init"]["name"] == "n"
    assert calls["init"]["config"]["max_steps"] == 3
    assert [s for s, _ in calls["log"]] == [1, 2, 3] and calls["finish"] == 1
    assert [loss for _, loss in calls["log"]] == [r["loss"] for r in metric_records(tmp_path / "run")]


def test_wandb_project_without_wandb_installed_says_so_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert run_tiny(tiny_cfg(tmp_path / "run", max_steps=1, wandb_project="p")) == 0
    assert "wandb is not installed" in capsys.readouterr().err


def test_phases_within_a_step_reach_the_log_with_the_step_in_progress(tmp_path):
    """A mode reports its phases through `report_phase`; the loop writes them as `phase` records
    of the step being made (the TUI shows "generating step 3 · 0:41" from them)."""
    from ebft_engine.stepper import report_phase

    class Phased:
        def __init__(self, inner):
            self.inner, self.rows_per_step = inner, inner.rows_per_step

        def run_step(self, rows, step):
            for phase in ("generating", "scoring", "training"):
                report_phase(self, phase)
            return self.inner.run_step(rows, step)

        def after_optimizer_step(self, step):
            self.inner.after_optimizer_step(step)

        def close(self):
            self.inner.close()

    cfg = tiny_cfg(tmp_path / "run", max_steps=2)
    assert run_tiny(cfg, wrap=lambda s, c: Phased(s)) == 0
    events = read_records(tmp_path / "run" / "metrics.jsonl")
    phases = [(e["step"], e["phase"]) for e in events if e["event"] == "phase"]
    assert phases[0] == (1, "generating")  # the first phase of each step is always written
    assert (2, "generating") in phases
    assert all(p in ("generating", "scoring", "training") for _, p in phases)
    metrics_at = {e["step"]: i for i, e in enumerate(events) if e["event"] == "metrics"}
    first_of_2 = next(i for i, e in enumerate(events) if e["event"] == "phase" and e["step"] == 2)
    assert first_of_2 > metrics_at[1]  # step 2's phases come after step 1 was logged
