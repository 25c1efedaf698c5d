"""Held-out evals inside training (`eval_steps` / `eval_strategy`) and early stopping (issue 18).

axolotl users write `eval_steps: 50` and expect a number every 50 steps that says whether training
helps. ebft answers with the numbers `ebft eval` measures (eval.py), kept cheap: validation CE and
the CFM loss (with alignment) on the first `eval_max_rows` held-out rows; pass@1 only with
`eval_pass_at_1` (it runs model-written code in the sandbox). Each eval is one `eval` record in
metrics.jsonl, with `in_training: true`, which the TUI's eval panel and `ebft watch` show
(docs/log-contract.md). As in transformers with eval_steps, one eval also runs before the first
step of a fresh run: the baseline the panel's arrows compare against.

An eval never changes the run: it draws from forked RNG streams (a run with evals trains exactly as
one without) and leaves the model in training mode. A resumed run does not measure again the
steps it already logged: their records replay into early stopping instead.

Early stopping follows transformers' EarlyStoppingCallback: after `early_stopping_patience` evals
in a row that do not improve on the best value of `metric_for_best_model`, training stops; the run
then ends as done, keeping its last weights (see docs/axolotl-compat.md for axolotl's difference).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from ebft_engine.config import EbftConfig
from ebft_engine.eval import EvalPair, pair_of_record, pairs_ce, pairs_feature_matching


def steps_of(value: int | float | None, max_steps: int) -> int | None:
    """`save_steps` / `eval_steps` as a step count: a whole number as it is, a fraction < 1 of the
    run rounded up (transformers' reading), None when unset."""
    if value is None:
        return None
    if value < 1:
        return max(1, math.ceil(value * max_steps))
    return int(value)


@dataclass
class EvalSchedule:
    """When evals run: every `every` steps and/or at the end of each epoch."""

    every: int | None
    each_epoch: bool

    def due(self, step: int, epoch_ended: bool) -> bool:
        return bool((self.every and step % self.every == 0) or (self.each_epoch and epoch_ended))


def eval_schedule(cfg: EbftConfig, max_steps: int) -> EvalSchedule | None:
    """None when the config runs no evals during training."""
    if not cfg.evaluates_during_training:
        return None
    return EvalSchedule(every=steps_of(cfg.eval_steps, max_steps), each_epoch=cfg.eval_strategy == "epoch")


@dataclass
class EarlyStopping:
    """transformers' rule: stop after `patience` evals in a row without a strictly better value."""

    patience: int | None
    metric: str
    greater_is_better: bool
    best: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0

    @classmethod
    def from_config(cls, cfg: EbftConfig) -> "EarlyStopping":
        metric, greater = cfg.best_metric
        return cls(patience=cfg.early_stopping_patience, metric=metric, greater_is_better=greater)

    def update(self, step: int, record: dict[str, Any]) -> bool:
        """Account one eval; True when training should stop now."""
        value = record.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        better = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
        if better:
            self.best, self.best_step, self.evals_without_improvement = float(value), step, 0
        else:
            self.evals_without_improvement += 1
        return bool(self.patience) and self.evals_without_improvement >= self.patience

    def summary(self) -> str:
        if self.best is None:
            return ""
        return f"best {self.metric} {self.best:.4f} at step {self.best_step}"


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Every RNG the training step draws from comes back as it was (python, numpy, torch, cuda)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@dataclass
class HeldOutEval:
    """The held-out rows, tokenized once, and what measuring them needs."""

    cfg: EbftConfig
    tokenizer: Any
    device: Any
    pairs: list[EvalPair]
    code_rows: list[Any] = field(default_factory=list)
    """Raw test_datasets rows with tests (pass@1), when eval_pass_at_1 asks for it."""
    backend: Any = None
    """The sandbox pass@1 runs in."""
    feature_model: Any = None
    """A full fine-tune's frozen copy (features never come from the weights being trained)."""

    def measure(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """The `eval` record's fields for the model as it is now."""
        from ebft_engine.eval import pass_at_1, sandbox_fields

        cfg, t0 = self.cfg, time.time()
        structured = cfg.mode == "structured"
        samples = cfg.trl.num_generations if structured else cfg.ebft.n_samples_per_prompt
        temperature = cfg.trl.temperature if structured else cfg.ebft.temperature
        budget = (cfg.trl.max_completion_length or 256) if structured else cfg.ebft.generate_max_len
        was_training = model.training
        model.eval()
        try:
            with rng_untouched():
                ce = pairs_ce(model, self.pairs, self.device)
                cfm, align = pairs_feature_matching(
                    model, self.tokenizer, self.pairs, cfg, self.device, n=samples or 2,
                    temperature=temperature, max_new_tokens=budget, seed=cfg.seed,
                    target_cap=None if structured else budget, feature_model=self.feature_model)
                p1, per_task = (pass_at_1(model, self.tokenizer, self.code_rows, cfg, self.device,
                                          max_new_tokens=budget, timeout_s=10.0, backend=self.backend)
                                if self.code_rows else (None, []))
        finally:
            model.train(was_training)
        return {"eval/ce_loss": ce, "eval/cfm_loss": cfm, "eval/alignment": align, "eval/pass@1": p1,
                "eval/n_rows": len(self.pairs), "eval/n_code_tasks": len(per_task),
                **(sandbox_fields(self.backend) if self.code_rows else {}),
                "adapter": None, "in_training": True, "eval/seconds": round(time.time() - t0, 2)}


def build_held_out_eval(cfg: EbftConfig, tokenizer: Any, device: Any, rows: list[dict[str, Any]],
                        feature_model: Any = None) -> HeldOutEval:
    """Tokenize the held-out rows once; with eval_pass_at_1, also find the sandbox and the rows with
    tests (before training starts, so a missing sandbox stops the run at once)."""
    from ebft_engine.data import chat_template_kwargs

    chat_kwargs = chat_template_kwargs(cfg)
    pairs = [pair_of_record(dict(row), i, tokenizer, chat_kwargs) for i, row in enumerate(rows)]
    if not pairs:
        raise ValueError("the held-out set for evals during training is empty: raise val_set_size or check "
                         "test_datasets")
    code_rows: list[Any] = []
    backend = None
    if cfg.eval_pass_at_1:
        from ebft_engine.eval import code_tasks, load_eval_rows
        from ebft_engine.sandbox import require_backend

        code_rows = code_tasks(load_eval_rows(cfg, cfg.eval_max_rows))
        backend = require_backend(False) if code_rows else None
    return HeldOutEval(cfg=cfg, tokenizer=tokenizer, device=device, pairs=pairs, code_rows=code_rows,
                       backend=backend, feature_model=feature_model)
