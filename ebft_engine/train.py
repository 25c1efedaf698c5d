"""The training loop, top to bottom (nanoGPT's train.py is the model to read it against).

    seed -> run dir, metrics.jsonl -> model, tokenizer (LoRA) -> the mode's Stepper -> data order
    -> AdamW + schedule -> resume from the latest checkpoint -> for each step: rows -> rollouts,
    rewards, backward (the Stepper) -> clip -> update -> log, warn -> checkpoint -> final adapter.

What every mode shares lives here (data order, optimizer, schedule, clipping, logging,
checkpoints, resume); how one step's rollouts and losses are made is the Stepper's
(`ebft_engine/stepper.py`). Steps are numbered from 1: `step` is the number of optimizer steps
done once it finishes, as in the log records.

Resume: re-running the same command continues from `RUN_DIR/checkpoints/` (weights, optimizer,
schedule, RNG and data position are restored, so the run continues as if never stopped). The steps
between that checkpoint and a kill are re-run; their metric records are already in metrics.jsonl
and are not written again (docs/log-contract.md).

Exit codes: 0 done, 1 failed (error record), 2 bad config or run dir, 3 non-finite loss or
gradient, 128+signal when stopped by SIGTERM/SIGINT (after a checkpoint).
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from ebft_engine import watchdog
from ebft_engine.checkpoint import (CHECKPOINTS, atomic_dir, capture_rng, checkpoint_config,
                                    latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint)
from ebft_engine.metrics import HealthMonitor, MetricsLog, console_line, last_logged_step, read_records
from ebft_engine.stepper import Stepper

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NONFINITE = 0, 1, 2, 3

RESUME_MAY_CHANGE = ("max_steps", "num_epochs", "save_steps", "save_total_limit", "logging_steps",
                     "output_dir", "wandb_")
"""Config keys (and prefixes) a resumed run may change; any other difference refuses the resume."""


class RunDirError(Exception):
    """The run dir holds something this run must not continue or overwrite (exit 2)."""


def opt(cfg: Any, key: str, default: Any) -> Any:
    """`cfg.key`, or `default` when the key is unset (None)."""
    value = getattr(cfg, key, None)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# The pieces the loop composes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_stepper(cfg: Any, model: Any, tokenizer: Any, device: Any, dtype: Any) -> Stepper:
    if cfg.mode == "strided":
        from ebft_engine.strided.step import StridedStepper

        return StridedStepper(cfg, model, tokenizer, device, dtype)
    if cfg.mode == "structured":
        from ebft_engine.structured import StructuredStepper

        return StructuredStepper(cfg, model, tokenizer, device, dtype)
    raise ValueError(f"ebft.mode {cfg.mode!r}: use strided or structured")


def build_model(cfg: Any):
    from ebft_engine.modeling import build_model_and_tokenizer

    return build_model_and_tokenizer(cfg)


def load_data(cfg: Any, tokenizer: Any):
    from ebft_engine.data import load_training_data

    return load_training_data(cfg, tokenizer, split="train")


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


def build_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or plain SGD with `optimizer: sgd`) over the trainable parameters; matrices decay,
    vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    weight_decay = float(opt(cfg, "weight_decay", 0.0))
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (float(opt(cfg, "adam_beta1", 0.9)), float(opt(cfg, "adam_beta2", 0.999)))
    if opt(cfg, "optimizer", "adamw_torch") == "sgd":
        return torch.optim.SGD(groups, lr=float(cfg.learning_rate))
    fused = "fused" in str(opt(cfg, "optimizer", "")) and params[0].is_cuda
    return torch.optim.AdamW(groups, lr=float(cfg.learning_rate), betas=betas,
                             eps=float(opt(cfg, "adam_epsilon", 1e-8)), **({"fused": True} if fused else {}))


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, max_steps: int):
    """Linear warmup (`warmup_steps`, else `warmup_ratio` of max_steps), then `lr_scheduler`:
    cosine or linear decay to 0, or constant."""
    warmup = int(opt(cfg, "warmup_steps", 0)) or math.ceil(float(opt(cfg, "warmup_ratio", 0.0)) * max_steps)
    kind = str(opt(cfg, "lr_scheduler", "cosine"))

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


def prepare_run_dir(run_dir: Path, cfg_yaml: str, *, resume: bool, overwrite: bool) -> Path | None:
    """Decide fresh start or resume; returns the checkpoint to resume from (None: step 0).

    A run dir that already holds a run (checkpoints or metric records) is continued by default,
    when its config matches; `resume=False` refuses it unless `overwrite`, which deletes it.
    `RUN_DIR/config.yaml` keeps the config that runs here (a resume before the first checkpoint
    is checked against it); an equivalent one, e.g. the launcher's, is left as it is."""
    ckpt = latest_checkpoint(run_dir)
    has_run = ckpt is not None or last_logged_step(read_records(run_dir / "metrics.jsonl")) > 0
    if has_run and not resume:
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run: re-run without --no-resume to continue "
                              f"it, choose another output_dir, or add --overwrite to delete it")
        for name in (CHECKPOINTS, "adapter", "model", "metrics.jsonl"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        ckpt, has_run = None, False
    saved = run_dir / "config.yaml"
    if has_run:
        reference = checkpoint_config(ckpt) if ckpt else _read(saved)
        differences = config_differences(reference, cfg_yaml) if reference is not None else []
        if differences:
            raise RunDirError(
                f"{run_dir} holds a run with a different config ({', '.join(differences[:8])}): "
                f"use another output_dir, or --no-resume --overwrite to start it over")
    if not saved.is_file() or (not has_run and config_differences(saved.read_text(encoding="utf-8"), cfg_yaml)):
        saved.write_text(cfg_yaml, encoding="utf-8")
    return ckpt


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


def start_wandb(cfg: Any, run_dir: Path, cfg_yaml: str) -> Any:
    """A wandb run when `wandb_project` is set and wandb is installed (decisions.md §2), else None.
    metrics.jsonl stays the record the TUI reads; wandb gets the same metrics records."""
    project, mode = opt(cfg, "wandb_project", None), opt(cfg, "wandb_mode", None)
    if not project or mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb_project is set but wandb is not installed (pip install wandb): metrics go to "
              "metrics.jsonl only", file=sys.stderr, flush=True)
        return None
    return wandb.init(project=project, entity=opt(cfg, "wandb_entity", None), name=opt(cfg, "wandb_name", None),
                      id=opt(cfg, "wandb_run_id", None), resume="allow", mode=mode, dir=str(run_dir),
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
# The loop


def train(cfg: Any, *, resume: bool = True, overwrite: bool = False,
          build_model: Callable = build_model, build_stepper: Callable = build_stepper,
          load_data: Callable = load_data) -> int:
    """Run training for `cfg`; returns the exit code. The three builders are the real ones unless a
    test passes its own (a tiny model, a small Stepper)."""
    seed = int(opt(cfg, "seed", 42))
    logging_steps = max(1, int(opt(cfg, "logging_steps", 1)))
    max_grad_norm = float(opt(cfg, "max_grad_norm", 1.0)) or float("inf")
    seed_everything(seed)

    run_dir = Path(cfg.output_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_yaml = cfg.to_yaml()
    try:
        ckpt = prepare_run_dir(run_dir, cfg_yaml, resume=resume, overwrite=overwrite)
    except RunDirError as error:
        with MetricsLog(run_dir / "metrics.jsonl") as log:
            log.error(0, str(error))
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    log = MetricsLog(run_dir / "metrics.jsonl")
    step = 0
    stepper = wandb_run = None
    watchdog.STOP.reset()
    try:
        # ---- model, mode, data, optimizer
        log.status("loading", 0, f"loading {cfg.base_model}")
        model, tokenizer, device, dtype = build_model(cfg)
        model.train()
        stepper = build_stepper(cfg, model, tokenizer, device, dtype)
        data = load_data(cfg, tokenizer)
        order = DataOrder(len(data), seed)
        max_steps = int(cfg.max_steps or math.ceil(float(opt(cfg, "num_epochs", 1.0)) * len(data)
                                                   / stepper.rows_per_step))
        save_steps = int(opt(cfg, "save_steps", 0)) or max_steps
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer, max_steps)
        params = [p for group in optimizer.param_groups for p in group["params"]]

        # ---- resume
        records = read_records(log.path)
        history: dict[str, list[float]] = defaultdict(list)  # logged values, for the console arrows
        monitor = HealthMonitor(use_whitening=bool(getattr(getattr(cfg, "ebft", None), "use_whitening", False)))
        for record in records:  # what this run dir already logged: arrows and episodes continue
            if record.get("event") == "metrics":
                monitor.update(record["step"], record)
                for key, value in record.items():
                    if key not in ("v", "ts", "step", "max_steps") and isinstance(value, (int, float)):
                        history[key].append(value)
        log.already_logged_through = last_logged_step(records)
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            order.load_state_dict(state["data"])
            step = int(state["step"])
            restore_rng(state["rng"])  # last: nothing after this may draw from the RNG
        resumed_from = str(ckpt.relative_to(run_dir)) if ckpt else None
        log.run(mode=cfg.mode, max_steps=max_steps, base_model=str(cfg.base_model),
                output_dir=str(run_dir), resumed_from=resumed_from)
        if ckpt is not None or log.already_logged_through:
            rerun = (f"; steps {step + 1}-{log.already_logged_through} are re-run and were already logged"
                     if log.already_logged_through > step else "")
            log.status("resumed", step, f"resumed from {resumed_from or 'the start'} at step {step}{rerun}")
            print(f"resumed from {resumed_from or 'the start'} at step {step}{rerun}", flush=True)
        note = ("; use_whitening: diversity is ~0 by construction, its healthy range does not apply"
                if monitor.use_whitening else "")
        log.status("training", step, f"training {cfg.mode} on {device} ({str(dtype).removeprefix('torch.')}), "
                                     f"{len(data)} rows, {stepper.rows_per_step} per step{note}")

        wandb_run = start_wandb(cfg, run_dir, cfg_yaml)

        # ---- the loop
        watchdog.STOP.graceful = True
        stepper.on_phase = lambda phase: log.phase(step + 1, phase)  # `step`: the loop's, read at call time
        window: list[dict[str, float]] = []
        saved_step = step
        while step < max_steps:
            if watchdog.stop_requested():
                break
            t0 = time.perf_counter()
            rows = [data[i] for i in order.take(stepper.rows_per_step)]
            lr = scheduler.get_last_lr()[0]
            result = stepper.run_step(rows, step + 1)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            loss = result.metrics.get("loss", 0.0)
            if not (math.isfinite(float(loss)) and math.isfinite(grad_norm)):
                what = f"loss {loss}" if not math.isfinite(float(loss)) else f"grad_norm {grad_norm}"
                last = latest_checkpoint(run_dir)
                log.error(step + 1, f"non-finite {what} at step {step + 1}: the run stopped before "
                                    f"updating the weights",
                          "Try a lower learning_rate or max_grad_norm, or fp32 (bf16: false); "
                          + (f"the last good checkpoint is {last.relative_to(run_dir)}" if last
                             else "no checkpoint was saved yet"))
                print(f"error: non-finite {what} at step {step + 1}", file=sys.stderr, flush=True)
                return EXIT_NONFINITE
            if not result.skipped:
                optimizer.step()
            with warnings.catch_warnings():  # the schedule follows the step count, skipped or not
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stepper.after_optimizer_step(step + 1)
            step += 1
            step_time = time.perf_counter() - t0
            window.append({**result.metrics, "grad_norm": grad_norm, "lr": lr, "step_time_s": step_time,
                           "tokens_per_s": result.n_tokens / step_time if step_time > 0 else 0.0})

            # ---- log (steps a killed run already logged are re-run silently)
            if (step % logging_steps == 0 or step == max_steps) and step > log.already_logged_through:
                metrics = {"max_steps": max_steps, "epoch": round(order.epoch_float, 4), **_mean_metrics(window)}
                log.metrics(step, metrics)
                if wandb_run is not None:
                    wandb_run.log(metrics, step=step)
                print(console_line(step, max_steps, metrics, history), flush=True)
                for key, value in metrics.items():
                    history[key].append(value)
                for w in monitor.update(step, metrics):
                    log.warning(w.step, w.metric, w.message, w.hint)
                    print(f"warning: {w.message}. {w.hint}", flush=True)
            if step % logging_steps == 0 or step == max_steps:
                window = []

            # ---- checkpoint
            if step % save_steps == 0 or step == max_steps:
                _checkpoint(run_dir, step, log, cfg, model, optimizer, scheduler, order, cfg_yaml,
                            getattr(stepper, "rows_in_flight", 0))
                saved_step = step
                if step < max_steps:
                    log.status("training", step, "")

        if step < max_steps:  # stopped by a signal: keep the progress, then exit 128+signal
            if step > saved_step:
                _checkpoint(run_dir, step, log, cfg, model, optimizer, scheduler, order, cfg_yaml,
                            getattr(stepper, "rows_in_flight", 0))
            log.status("stopped", step, f"stopped by {_signal_name()} at step {step}; re-run to resume")
            print(f"stopped at step {step}; re-run the same command to resume", flush=True)
            return watchdog.STOP.exit_code()

        final = save_final(run_dir, model, tokenizer)
        log.status("done", step, f"done: {step} steps; {final.name} in {final}")
        print(f"done: {step} steps; {final.name} saved in {final}", flush=True)
        return EXIT_OK
    except Exception as error:  # noqa: BLE001 - every failure ends as an error record and exit 1
        message, hint, expected = describe_failure(error)
        log.error(step, message, hint)
        print(f"error: {message}" + (f"\n  {hint}" if hint else ""), file=sys.stderr, flush=True)
        if not expected:
            traceback.print_exc()
        return EXIT_FAILED
    finally:
        watchdog.STOP.graceful = False
        if stepper is not None:
            stepper.close()
        if wandb_run is not None:
            wandb_run.finish()
        log.close()


USER_ERRORS = ("ModelLoadError", "DatasetError", "ConfigError", "TransformError", "RunDirError",
               "ServerError", "StructuredError")
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


def _checkpoint(run_dir: Path, step: int, log: MetricsLog, cfg: Any, model: Any, optimizer: Any,
                scheduler: Any, order: DataOrder, cfg_yaml: str, rows_in_flight: int = 0) -> None:
    log.status("checkpoint", step, f"saving checkpoint at step {step}")
    path = save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           rng_state=capture_rng(), data_state=order.state_dict(rewind=rows_in_flight),
                           config_yaml=cfg_yaml,
                           save_total_limit=opt(cfg, "save_total_limit", None))
    log.checkpoint(step, str(path.relative_to(run_dir)))
