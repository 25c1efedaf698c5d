"""The one seam between the training loop and a mode (strided or structured).

`train.py` owns what every mode shares: data order, optimizer, scheduler, clipping, logging,
checkpoints, resume. A mode's `Stepper` owns how one optimizer step's rollouts, rewards and losses
are made, including the backward passes over its micro-batches (it knows how it splits the work).
Keeping the seam this small is what lets the loop read top to bottom (nanoGPT) instead of through
a hierarchy of trainer classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence


@dataclass
class StepResult:
    """What one optimizer step's worth of work produced (gradients are already accumulated)."""

    metrics: dict[str, float] = field(default_factory=dict)
    """Spec-named metrics: `ebft/alignment`, `ebft/diversity`, `ebft/cfm_loss`, `ebft/reward`,
    `entropy`, `loss`, plus mode extras (`ce_loss`, `rl_loss`, `is_ratio_min`, `gen_wait_s`...)."""
    n_tokens: int = 0
    """Tokens that went through the trainable forward pass (for tokens/s)."""
    skipped: bool = False
    """True when the step had nothing to learn from (e.g. all advantages zero): the loop then
    skips the optimizer update but still counts and logs the step."""


class NothingToTrainError(ValueError):
    """No row of the training data gives the mode anything to learn from: the run would log NaN
    metrics to its end and call that done. The message says what a row needs."""


class Stepper(Protocol):
    """A mode. Built once by `train.py` with the config, the trainable model and the tokenizer."""

    rows_per_step: int
    """Dataset rows consumed per optimizer step (strided: documents; structured: prompts)."""

    # Optional: `rows_in_flight: int`, rows taken for later steps but not trained on yet (structured
    # async prefetch). A checkpoint rewinds the data order by that many, so a resumed run takes
    # them again instead of skipping them.
    #
    # Optional: `check_rows(data) -> str | None`, run once on the training data before the first
    # step: raises NothingToTrainError when no row can train anything (strided: rows too short for
    # one block), returns a warning when some rows cannot.
    #
    # Optional: `on_phase: Callable[[str], None]`, set by train.py; a mode calls `report_phase`
    # at its phase boundaries so the log says what a long step is doing (a `phase` record).

    def run_step(self, rows: Sequence[dict[str, Any]], step: int) -> StepResult:
        """Roll out, score and backpropagate one optimizer step's rows (loss already divided for
        accumulation). Must not call `optimizer.step()`."""
        ...

    def after_optimizer_step(self, step: int) -> None:
        """Hook after the weights changed (structured mode syncs LoRA to the server here)."""
        ...

    def close(self) -> None:
        """Release servers, threads and files."""
        ...


def report_phase(stepper: Any, phase: str) -> None:
    """Tell the loop which part of the step runs now: generating, scoring or training."""
    callback: Callable[[str], None] | None = getattr(stepper, "on_phase", None)
    if callback is not None:
        callback(phase)
