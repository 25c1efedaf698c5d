"""The training loop, top to bottom (nanoGPT's train.py is the model to read it against).

`train()` at the bottom of this file runs these phases, each a function above it, in this order:

    seed, run dir     prepare_run_dir   fresh start or resume? (a different config is refused)
    set-up            set_up            model, tokenizer (LoRA), the mode's Stepper, data order,
                                        AdamW + schedule
    resume            resume_run        the latest checkpoint (or resume_from_checkpoint), the
                                        metrics and evals already logged
                      evaluate_at_start a fresh run with evals: the baseline eval (step 0)
    each step         optimizer_step    rows -> the Stepper (rollouts, rewards, backward) -> clip
                                        -> update -> schedule
                      log_progress      metrics.jsonl, wandb, the console line, health warnings
                      evaluate_if_due   every eval_steps (or epoch): held-out CE/CFM, early stopping
                      checkpoint_if_due every save_steps (or epoch, by save_strategy) and at the end
    the end           finish            the final adapter, or a checkpoint when a signal stopped it
    shutdown          shut_down         the Stepper (server, threads), wandb, the log

What every mode shares lives here (data order, optimizer, schedule, clipping, logging,
checkpoints, resume); how one step's rollouts and losses are made is the Stepper's
(`ebft_engine/stepper.py`). Steps are numbered from 1: `step` is the number of optimizer steps
done once it finishes, as in the log records.

Resume: re-running the same command continues from `RUN_DIR/checkpoints/` (weights, optimizer,
schedule, RNG and data position are restored, so the run continues as if never stopped). The steps
between that checkpoint and a kill are re-run; their metric records are already in metrics.jsonl
and are not written again (docs/log-contract.md).

Exit codes: 0 done, 1 failed (error record), 2 bad config or run dir, or data no step can train
on (error record), 3 non-finite loss or gradient, 128+signal when stopped by SIGTERM/SIGINT
(after a checkpoint).
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
import traceback
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from ebft_engine import watchdog
from ebft_engine.checkpoint import (CHECKPOINTS, MANIFEST, STATE_FILE, atomic_dir, capture_rng, checkpoint_config,
                                    clean_leftovers, find_resumable, latest_checkpoint, load_checkpoint,
                                    manifest_problem, restore_rng, save_checkpoint)
from ebft_engine.config import EbftConfig
from ebft_engine.metrics import HealthMonitor, MetricsLog, console_line, last_logged_step, read_records
from ebft_engine.stepper import NothingToTrainError, Stepper
from ebft_engine.train_eval import (EarlyStopping, EvalSchedule, HeldOutEval, build_held_out_eval, eval_schedule,
                                    steps_of)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NONFINITE = 0, 1, 2, 3

RESUME_MAY_CHANGE = ("max_steps", "num_epochs", "save_", "saves_per_epoch", "logging_steps", "output_dir",
                     "wandb_", "eval_", "evals_per_epoch", "early_stopping_patience", "metric_for_best_model",
                     "greater_is_better", "resume_from_checkpoint", "auto_resume_from_checkpoints",
                     "dataset_prepared_path")
"""Config keys (and prefixes) a resumed run may change; any other difference refuses the resume."""


class RunDirError(Exception):
    """The run dir holds something this run must not continue or overwrite (exit 2)."""


# ---------------------------------------------------------------------------------------------
# The pieces the loop composes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_stepper(cfg: EbftConfig, model: Any, tokenizer: Any, device: Any, dtype: Any) -> Stepper:
    if cfg.mode == "strided":
        from ebft_engine.strided.step import StridedStepper

        return StridedStepper(cfg, model, tokenizer, device, dtype)
    if cfg.mode == "structured":
        from ebft_engine.structured import StructuredStepper

        return StructuredStepper(cfg, model, tokenizer, device, dtype)
    raise ValueError(f"ebft.mode {cfg.mode!r}: use strided or structured")


def build_model(cfg: EbftConfig):
    from ebft_engine.modeling import build_model_and_tokenizer

    return build_model_and_tokenizer(cfg)


def load_data(cfg: EbftConfig, tokenizer: Any):
    from ebft_engine.data import load_training_data

    return load_training_data(cfg, tokenizer, split="train")


def load_held_out(cfg: EbftConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """The first `eval_max_rows` held-out rows (test_datasets, else the val_set_size hold-out),
    transformed as the training rows are."""
    from ebft_engine.data import load_eval_data

    rows = load_eval_data(cfg, tokenizer)
    return [] if rows is None else [rows[i] for i in range(min(len(rows), cfg.eval_max_rows))]


class DataOrder:
    """A fresh shuffled order of the rows every epoch, drawn from (seed, epoch) alone, so the
    order is the same in every run with this seed and a resume only needs (epoch, position)."""

    def __init__(self, n_rows: int, seed: int):
        if n_rows <= 0:
            raise ValueError("the training data has no rows")
        self.n_rows, self.seed = n_rows, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_rows, generator=generator).tolist()

    def take(self, k: int) -> list[int]:
        """The next `k` row indices, wrapping into the next epoch as needed."""
        out = []
        while len(out) < k:
            if self.position == self.n_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            n = min(k - len(out), self.n_rows - self.position)
            out += self._perm[self.position:self.position + n]
            self.position += n
        return out

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.position / self.n_rows

    @property
    def epochs_done(self) -> int:
        """Epochs whose every row has been taken (the next epoch starts lazily, on the next take)."""
        return self.epoch + (1 if self.position == self.n_rows else 0)

    def state_dict(self, rewind: int = 0) -> dict[str, int]:
        """Where the order stands, or `rewind` rows earlier: rows a stepper has taken but not
        trained on yet (async prefetch) must be taken again by a resumed run."""
        epoch, position = self.epoch, self.position - max(0, int(rewind))
        while position < 0 and epoch > 0:
            epoch, position = epoch - 1, position + self.n_rows
        return {"epoch": epoch, "position": max(0, position), "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_rows"] != self.n_rows or state["seed"] != self.seed:
            raise RunDirError(f"the checkpoint was taken over {state['n_rows']} rows with seed "
                              f"{state['seed']}; this run has {self.n_rows} rows and seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)


def build_optimizer(cfg: EbftConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or plain SGD with `optimizer: sgd`) over the trainable parameters; matrices decay,
    vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    fused = "fused" in cfg.optimizer and params[0].is_cuda
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, **({"fused": True} if fused else {}))


def warmup_steps(cfg: EbftConfig, max_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_ratio` of max_steps (both unset: no warmup)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil((cfg.warmup_ratio or 0.0) * max_steps)


def build_scheduler(cfg: EbftConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """Linear warmup (`warmup_steps`, else `warmup_ratio` of max_steps), then `lr_scheduler`:
    cosine or linear decay to 0, or constant."""
    warmup = warmup_steps(cfg, max_steps)
    kind = cfg.lr_scheduler

    def factor(done: int) -> float:  # done = optimizer steps already taken
        if done < warmup:
            return (done + 1) / (warmup + 1)
        progress = min(1.0, (done - warmup) / max(1, max_steps - warmup))
        if kind.startswith("constant"):
            return 1.0
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine (and anything else: the default)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def config_differences(old_yaml: str, new_yaml: str) -> list[str]:
    """Keys whose values differ between two resolved configs, but for those a resume may change."""
    old, new = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return [k for k in keys if not k.startswith(RESUME_MAY_CHANGE)]


def prepare_run_dir(run_dir: Path, cfg_yaml: str, *, resume: bool, overwrite: bool,
                    resume_from: str | None = None) -> tuple[Path | None, list[str]]:
    """Decide fresh start or resume; returns the checkpoint to resume from (None: step 0) and
    warnings about checkpoints that did not verify (skipped, see `checkpoint.find_resumable`).

    A run dir that already holds a run (checkpoints or metric records) is continued by default,
    when its config matches; `resume=False` refuses it unless `overwrite`, which deletes it.
    `resume_from` (resume_from_checkpoint) names the checkpoint explicitly; see `chosen_checkpoint`.
    Leftovers of saves that were killed (`.tmp-*`) are removed first.
    `RUN_DIR/config.yaml` keeps the config that runs here (a resume before the first checkpoint
    is checked against it); an equivalent one, e.g. the launcher's, is left as it is."""
    clean_leftovers(run_dir)
    ckpt, notes = find_resumable(run_dir)
    has_run = ckpt is not None or last_logged_step(read_records(run_dir / "metrics.jsonl")) > 0
    if has_run and not resume:
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run: re-run without --no-resume to continue "
                              f"it, choose another output_dir, or add --overwrite to delete it")
        for name in (CHECKPOINTS, "adapter", "model", "metrics.jsonl"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        ckpt, has_run = None, False
    if resume_from:
        ckpt = chosen_checkpoint(Path(resume_from).expanduser(), ckpt)
    saved = run_dir / "config.yaml"
    if has_run or ckpt is not None:
        reference = checkpoint_config(ckpt) if ckpt else _read(saved)
        differences = config_differences(reference, cfg_yaml) if reference is not None else []
        if differences:
            raise RunDirError(
                f"{run_dir} holds a run with a different config ({', '.join(differences[:8])}): "
                f"use another output_dir, or --no-resume --overwrite to start it over")
    if not saved.is_file() or (not has_run and config_differences(saved.read_text(encoding="utf-8"), cfg_yaml)):
        saved.write_text(cfg_yaml, encoding="utf-8")
    return ckpt, notes


def chosen_checkpoint(explicit: Path, latest_here: Path | None) -> Path:
    """`resume_from_checkpoint` wins, except over this run dir's own later checkpoints saved by a
    run that itself started from it: re-running the same command after a kill continues where that
    run stopped instead of going back (a rewind to an older checkpoint of the same dir still works)."""
    if not (explicit / STATE_FILE).is_file():
        raise RunDirError(f"resume_from_checkpoint: {explicit} is not an ebft checkpoint (a folder "
                          f"RUN_DIR/checkpoints/step-N holding {STATE_FILE}); checkpoints of other trainers "
                          "cannot be resumed")
    problem = manifest_problem(explicit) if (explicit / MANIFEST).exists() else None
    if problem:
        raise RunDirError(f"resume_from_checkpoint: {explicit} is damaged ({problem}); name another "
                          "checkpoint")
    if latest_here is None or latest_here.resolve() == explicit.resolve():
        return explicit
    saved = yaml.safe_load(checkpoint_config(latest_here) or "") or {}
    started_from = saved.get("resume_from_checkpoint") if isinstance(saved, dict) else None
    if started_from and Path(started_from).expanduser().resolve() == explicit.resolve():
        return latest_here
    return explicit


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def save_final(run_dir: Path, model: Any, tokenizer: Any) -> Path:
    """`RUN_DIR/adapter/` (LoRA, reloadable with PeftModel.from_pretrained) or `RUN_DIR/model/`."""
    name = "adapter" if hasattr(model, "peft_config") else "model"

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_dir(run_dir / name, fill)


def start_wandb(cfg: EbftConfig, run_dir: Path, cfg_yaml: str) -> Any:
    """A wandb run when `wandb_project` is set and wandb is installed (decisions.md §2), else None.
    metrics.jsonl stays the record the TUI reads; wandb gets the same metrics records."""
    project, mode = cfg.wandb_project, cfg.wandb_mode
    if not project or mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb_project is set but wandb is not installed (pip install wandb): metrics go to "
              "metrics.jsonl only", file=sys.stderr, flush=True)
        return None
    return wandb.init(project=project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                      id=cfg.wandb_run_id, resume="allow", mode=mode, dir=str(run_dir),
                      config=yaml.safe_load(cfg_yaml))


def _mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the steps of one logging interval (NaN kept: it must show)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for metrics in window:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[key] += float(value)
                counts[key] += 1
    return {k: sums[k] / counts[k] for k in sums}


# ---------------------------------------------------------------------------------------------
# The loop, phase by phase in the order they run: set-up, resume, the step, logging, checkpoint,
# the end, shutdown. `train()` at the bottom reads them top to bottom.


@dataclass
class Run:
    """What one training run holds: built by `set_up`, advanced by the phases below."""

    cfg: EbftConfig
    run_dir: Path
    cfg_yaml: str
    log: MetricsLog
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    stepper: Stepper
    data: Any
    order: DataOrder
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_steps: int
    save_every: int | None
    """Steps between checkpoints (save_steps; None: at the end only, or by epoch)."""
    params: list[torch.Tensor]
    monitor: HealthMonitor
    evals: EvalSchedule | None = None
    """When held-out evals run (None: never during training)."""
    held_out: HeldOutEval | None = None
    early: EarlyStopping | None = None
    logged_evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Evals this run dir already logged, by step: a resumed run replays them instead of measuring again."""
    step: int = 0
    """Optimizer steps done."""
    saved_step: int = 0
    """The step of the last checkpoint (or of the start)."""
    epoch_ended: bool = False
    """The last step took the last row of an epoch."""
    stopped_early: str = ""
    """Why early stopping ended the run ("" while it goes on)."""
    history: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Logged values, for the console's arrows."""
    window: list[dict[str, float]] = field(default_factory=list)
    """The metrics of each step since the last log line."""
    wandb_run: Any = None


def set_up(cfg: EbftConfig, run_dir: Path, cfg_yaml: str, log: MetricsLog, build_model: Callable,
           build_stepper: Callable, load_data: Callable, load_held_out: Callable = load_held_out) -> Run:
    """Model and tokenizer, the mode's Stepper, the data order, optimizer and schedule, and the
    held-out rows when evals run during training."""
    log.status("loading", 0, f"loading {cfg.base_model}")
    model, tokenizer, device, dtype = build_model(cfg)
    model.train()
    stepper = build_stepper(cfg, model, tokenizer, device, dtype)
    try:
        data = load_data(cfg, tokenizer)
        check_rows(stepper, data, log)
        order = DataOrder(len(data), cfg.seed)
        max_steps = int(cfg.max_steps or math.ceil(cfg.num_epochs * len(data) / stepper.rows_per_step))
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer, max_steps)
        evals = eval_schedule(cfg, max_steps)
        held_out = (build_held_out_eval(cfg, tokenizer, device, load_held_out(cfg, tokenizer),
                                        feature_model=getattr(stepper, "feature_model", None))
                    if evals is not None else None)
    except BaseException:
        stepper.close()  # a structured stepper holds a server connection and maybe a thread
        raise
    return Run(cfg=cfg, run_dir=run_dir, cfg_yaml=cfg_yaml, log=log, model=model, tokenizer=tokenizer,
               device=device, dtype=dtype, stepper=stepper, data=data, order=order, optimizer=optimizer,
               scheduler=scheduler, max_steps=max_steps, save_every=steps_of(cfg.save_steps, max_steps),
               params=[p for group in optimizer.param_groups for p in group["params"]],
               monitor=HealthMonitor(use_whitening=cfg.ebft.use_whitening), evals=evals, held_out=held_out,
               early=EarlyStopping.from_config(cfg))


def check_rows(stepper: Stepper, data: Any, log: MetricsLog) -> None:
    """Before the first step: the mode says whether its rows can train anything at all
    (NothingToTrainError, exit 2, instead of NaN metrics to the end) and warns about rows that
    cannot."""
    check = getattr(stepper, "check_rows", None)
    note = check(data) if check is not None else None
    if note:
        log.status("loading", 0, f"warning: {note}")
        print(f"warning: {note}", file=sys.stderr, flush=True)


def resume_run(run: Run, ckpt: Path | None) -> None:
    """Continue what this run dir already did: its logged metrics (console arrows, health
    episodes) and, from its latest checkpoint, weights, optimizer, schedule, data position, RNG."""
    records = read_records(run.log.path)
    for record in records:
        if record.get("event") == "eval" and record.get("in_training") and isinstance(record.get("step"), int):
            run.logged_evals[record["step"]] = record
        if record.get("event") == "metrics":
            run.monitor.update(record["step"], record)
            for key, value in record.items():
                if key not in ("v", "ts", "step", "max_steps") and isinstance(value, (int, float)):
                    run.history[key].append(value)
    run.log.already_logged_through = last_logged_step(records)
    if ckpt is not None:
        state = load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler)
        run.order.load_state_dict(state["data"])
        run.step = run.saved_step = int(state["step"])
        restore_rng(state["rng"])  # last: nothing after this may draw from the RNG
    for step in sorted(s for s in run.logged_evals if s <= run.step):  # early stopping's count so far
        run.early.update(step, run.logged_evals[step])
    resumed_from = _shown_path(ckpt, run.run_dir) if ckpt else None
    run.log.run(mode=run.cfg.mode, max_steps=run.max_steps, base_model=str(run.cfg.base_model),
                output_dir=str(run.run_dir), resumed_from=resumed_from)
    if ckpt is not None or run.log.already_logged_through:
        rerun = (f"; steps {run.step + 1}-{run.log.already_logged_through} are re-run and were already "
                 f"logged" if run.log.already_logged_through > run.step else "")
        message = f"resumed from {resumed_from or 'the start'} at step {run.step}{rerun}"
        run.log.status("resumed", run.step, message)
        print(message, flush=True)


def _shown_path(path: Path, run_dir: Path) -> str:
    """Relative to the run dir when inside it (the log contract's form), else as given."""
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def announce(run: Run) -> None:
    note = ("; use_whitening: diversity is ~0 by construction, its healthy range does not apply"
            if run.monitor.use_whitening else "")
    run.log.status("training", run.step,
                   f"training {run.cfg.mode} on {run.device} ({str(run.dtype).removeprefix('torch.')}), "
                   f"{len(run.data)} rows, {run.stepper.rows_per_step} per step{note}")


def optimizer_step(run: Run) -> bool:
    """One optimizer step: the Stepper's rollouts, rewards and backward, then clip, update and
    schedule. False, after an error record, when the loss or the gradient is not finite: the
    weights are then left as they were."""
    t0 = time.perf_counter()
    epochs_before = run.order.epochs_done
    rows = [run.data[i] for i in run.order.take(run.stepper.rows_per_step)]
    lr = run.scheduler.get_last_lr()[0]
    result = run.stepper.run_step(rows, run.step + 1)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm or float("inf")))
    loss = result.metrics.get("loss", 0.0)
    if not (math.isfinite(float(loss)) and math.isfinite(grad_norm)):
        report_nonfinite(run, loss, grad_norm)
        return False
    if not result.skipped:
        run.optimizer.step()
    with warnings.catch_warnings():  # the schedule follows the step count, skipped or not
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.stepper.after_optimizer_step(run.step + 1)
    run.step += 1
    run.epoch_ended = run.order.epochs_done > epochs_before
    step_time = time.perf_counter() - t0
    run.window.append({**result.metrics, "grad_norm": grad_norm, "lr": lr, "step_time_s": step_time,
                       "tokens_per_s": result.n_tokens / step_time if step_time > 0 else 0.0})
    return True


def report_nonfinite(run: Run, loss: float, grad_norm: float) -> None:
    step = run.step + 1
    what = f"loss {loss}" if not math.isfinite(float(loss)) else f"grad_norm {grad_norm}"
    last = latest_checkpoint(run.run_dir)
    run.log.error(step, f"non-finite {what} at step {step}: the run stopped before updating the weights",
                  "Try a lower learning_rate or max_grad_norm, or fp32 (bf16: false); "
                  + (f"the last good checkpoint is {last.relative_to(run.run_dir)}" if last
                     else "no checkpoint was saved yet"))
    print(f"error: non-finite {what} at step {step}", file=sys.stderr, flush=True)


def log_progress(run: Run) -> None:
    """Every `logging_steps` and at the last step: the interval's mean metrics to metrics.jsonl,
    wandb and the console, then health warnings. Steps a killed run already logged are re-run
    silently."""
    step, log = run.step, run.log
    if not (step % run.cfg.logging_steps == 0 or step == run.max_steps):
        return
    if step > log.already_logged_through:
        metrics = {"max_steps": run.max_steps, "epoch": round(run.order.epoch_float, 4),
                   **_mean_metrics(run.window)}
        log.metrics(step, metrics)
        if run.wandb_run is not None:
            run.wandb_run.log(metrics, step=step)
        print(console_line(step, run.max_steps, metrics, run.history), flush=True)
        for key, value in metrics.items():
            run.history[key].append(value)
        for w in run.monitor.update(step, metrics):
            log.warning(w.step, w.metric, w.message, w.hint)
            print(f"warning: {w.message}. {w.hint}", flush=True)
    run.window = []


def evaluate_at_start(run: Run) -> None:
    """A fresh run with evals measures the untrained model first (step 0), as transformers does with
    eval_steps: the baseline every later eval is compared with."""
    if run.evals is not None and run.step == 0:
        evaluate(run)


def evaluate_if_due(run: Run) -> None:
    """Every `eval_steps` (or at each epoch's end, by eval_strategy); early stopping reads it."""
    if run.evals is not None and run.evals.due(run.step, run.epoch_ended):
        evaluate(run)


def evaluate(run: Run) -> None:
    """One held-out eval: an `eval` record (or the one a killed run already logged for this step),
    then early stopping's verdict."""
    step = run.step
    record = run.logged_evals.get(step)
    if record is None:
        run.log.status("evaluating", step, f"evaluating on {len(run.held_out.pairs)} held-out rows")
        fields = run.held_out.measure(run.model, step)
        record = run.log.write("eval", step=step, **fields) or fields
        run.logged_evals[step] = record
        print(eval_console_line(step, record), flush=True)
        run.log.status("training", step, "")
    if run.early.update(step, record):
        run.stopped_early = (f"early stopping at step {step}: {run.early.metric} did not improve for "
                             f"{run.early.patience} evals ({run.early.summary()})")


def eval_console_line(step: int, record: dict[str, Any]) -> str:
    numbers = " | ".join(f"{label} {record[key]:.4f}" for key, label in (
        ("eval/ce_loss", "ce"), ("eval/cfm_loss", "cfm"), ("eval/alignment", "align"), ("eval/pass@1", "pass@1"))
        if isinstance(record.get(key), (int, float)))
    return f"eval step {step} | {numbers}"


def checkpoint_if_due(run: Run) -> None:
    """By save_strategy: every `save_steps` (or at each epoch's end), after the first step with
    save_first_step, and at the last step; never with `save_strategy: no`."""
    cfg, step = run.cfg, run.step
    if cfg.save_strategy == "no":
        return
    due = (step == run.max_steps or bool(run.save_every and step % run.save_every == 0)
           or (cfg.save_strategy == "epoch" and run.epoch_ended) or (cfg.save_first_step and step == 1))
    if due:
        save_progress(run)
        if step < run.max_steps:
            run.log.status("training", step, "")


def save_progress(run: Run) -> None:
    """A checkpoint of this step; the data order is rewound by the rows the Stepper took for
    later steps (async prefetch), so a resumed run takes them again."""
    run.log.status("checkpoint", run.step, f"saving checkpoint at step {run.step}")
    path = save_checkpoint(run.run_dir, run.step, model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, rng_state=capture_rng(),
                           data_state=run.order.state_dict(rewind=getattr(run.stepper, "rows_in_flight", 0)),
                           config_yaml=run.cfg_yaml, save_total_limit=run.cfg.save_total_limit)
    run.log.checkpoint(run.step, str(path.relative_to(run.run_dir)))
    run.saved_step = run.step


def finish(run: Run) -> int:
    """Done (all steps, or stopped early): the final adapter (or model). Stopped by a signal: keep the
    progress, exit 128+signal."""
    if run.step < run.max_steps and not run.stopped_early:
        if run.step > run.saved_step:
            save_progress(run)
        run.log.status("stopped", run.step, f"stopped by {_signal_name()} at step {run.step}; re-run to resume")
        print(f"stopped at step {run.step}; re-run the same command to resume", flush=True)
        return watchdog.STOP.exit_code()
    final = save_final(run.run_dir, run.model, run.tokenizer)
    how = run.stopped_early or (f"{run.step} steps" + (f"; {run.early.summary()}" if run.early.summary() else ""))
    run.log.status("done", run.step, f"done: {how}; {final.name} in {final}")
    print(f"done: {how}; {final.name} saved in {final}", flush=True)
    return EXIT_OK


def report_failure(log: MetricsLog, step: int, error: Exception) -> int:
    """Any failure ends as an error record and exit 1 (2 when the data cannot train at all); the
    user's own mistakes without a traceback."""
    message, hint, expected = describe_failure(error)
    log.error(step, message, hint)
    print(f"error: {message}" + (f"\n  {hint}" if hint else ""), file=sys.stderr, flush=True)
    if not expected:
        traceback.print_exc()
    return EXIT_USAGE if isinstance(error, NothingToTrainError) else EXIT_FAILED


def refuse_run_dir(run_dir: Path, error: RunDirError) -> int:
    with MetricsLog(run_dir / "metrics.jsonl") as log:
        log.error(0, str(error))
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USAGE


def shut_down(run: Run | None, log: MetricsLog) -> None:
    """Whatever happened: signals back to immediate exit, the server and threads released, wandb
    finished, the log closed."""
    watchdog.STOP.graceful = False
    if run is not None:
        run.stepper.close()
        if run.wandb_run is not None:
            run.wandb_run.finish()
    log.close()


def train(cfg: EbftConfig, *, resume: bool = True, overwrite: bool = False,
          build_model: Callable = build_model, build_stepper: Callable = build_stepper,
          load_data: Callable = load_data, load_held_out: Callable = load_held_out) -> int:
    """Run training for `cfg`; returns the exit code. The builders are the real ones unless a test
    passes its own (a tiny model, a small Stepper, its rows)."""
    seed_everything(cfg.seed)
    run_dir = Path(cfg.output_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_yaml = cfg.to_yaml()
    try:
        ckpt, notes = prepare_run_dir(run_dir, cfg_yaml,
                                      resume=resume and cfg.auto_resume_from_checkpoints is not False,
                                      overwrite=overwrite, resume_from=cfg.resume_from_checkpoint)
    except RunDirError as error:
        return refuse_run_dir(run_dir, error)
    log = MetricsLog(run_dir / "metrics.jsonl")
    for note in notes:  # checkpoints that did not verify: named, skipped
        log.status("loading", 0, f"warning: {note}")
        print(f"warning: {note}", file=sys.stderr, flush=True)
    run: Run | None = None
    watchdog.STOP.reset()
    try:
        # ---- set-up: model, mode, data, optimizer
        run = set_up(cfg, run_dir, cfg_yaml, log, build_model, build_stepper, load_data, load_held_out)
        # ---- resume: this run dir's checkpoint, logged metrics and evals
        resume_run(run, ckpt)
        announce(run)
        run.wandb_run = start_wandb(cfg, run_dir, cfg_yaml)
        evaluate_at_start(run)
        # ---- the loop: step, log, eval, checkpoint; a signal or early stopping ends it between steps
        watchdog.STOP.graceful = True
        run.stepper.on_phase = lambda phase: log.phase(run.step + 1, phase)  # the step in progress
        while run.step < run.max_steps and not run.stopped_early and not watchdog.stop_requested():
            if not optimizer_step(run):
                return EXIT_NONFINITE
            log_progress(run)
            evaluate_if_due(run)
            checkpoint_if_due(run)
        # ---- the end: done, or stopped by a signal
        return finish(run)
    except Exception as error:  # noqa: BLE001 - every failure ends as an error record and exit 1
        return report_failure(log, run.step if run is not None else 0, error)
    finally:
        shut_down(run, log)


USER_ERRORS = ("ModelLoadError", "DatasetError", "ConfigError", "TransformError", "RunDirError",
               "ServerError", "StructuredError", "SandboxUnavailable", "NothingToTrainError")
"""Exception class names that mean "the config points at something unusable": one message, no
traceback. (Matched by name so this module need not import every module that defines one.)"""


def describe_failure(error: BaseException) -> tuple[str, str, bool]:
    """(message, hint, expected): `expected` failures are the user's to fix and need no traceback."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & set(USER_ERRORS) or isinstance(error, (FileNotFoundError, PermissionError)):
        return str(error), "", True
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return (f"out of memory: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                "Reduce sequence_len or micro_batch_size (and raise gradient_accumulation_steps)", True)
    if "CheckpointError" in names:
        return (f"{type(error).__name__}: {error}",
                "Set use_reentrant: true in gradient_checkpointing_kwargs", True)
    return f"{type(error).__name__}: {error}", "", False


def _signal_name() -> str:
    import signal

    return signal.Signals(watchdog.STOP.signum or signal.SIGTERM).name
