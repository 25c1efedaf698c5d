"""Evaluation: does the model get better? Three numbers on held-out data.

- `eval/ce_loss`: validation cross-entropy of the ground-truth completion given the prompt
  (per token, the prompt rendered exactly as in training).
- `eval/cfm_loss`: the feature-matching loss EBFT minimises, ||mean_j φ(ŷ_j) − φ(y*)||², with
  n samples per held-out prompt and features from the frozen base (same layers and pooling as
  training); `eval/alignment` (mean cosine) rides along.
- `eval/pass@1`: for HumanEval-style rows (with `test` and `entry_point`), the greedy completion
  is run against the task's tests in the OS jail (`ebft_engine/sandbox/`): a program that fails, loops or
  misbehaves counts as failed. Without a working jail pass@1 is refused (before the model loads)
  unless the caller passes `unsafe_exec`; the record names the backend (`sandbox_backend`).

Held-out rows come from `test_datasets` (raw rows, before any training transform: `input/output`,
`prompt/ground_truth` or chat `messages`). Results are appended as an `eval` record to
`output_dir/metrics.jsonl` (so `ebft watch` and the TUI show them) and per task to
`output_dir/eval.jsonl`.

CE and CFM work on `EvalPair`s (prompt tokens, target tokens), so the evals during training
(`train_eval.py`) measure the same numbers on transformed rows too: prompt/ground-truth rows, and
the token rows of strided mode (`input_ids` cut at `prompt_length`, or halfway for raw documents).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from ebft_engine.config import EbftConfig

if TYPE_CHECKING:
    from ebft_engine.sandbox import Backend


@dataclass
class EvalRow:
    prompt: str | list[dict]
    ground_truth: str
    code_prompt: str | None = None  # HumanEval: the function header the completion continues
    test: str | None = None
    entry_point: str | None = None
    task_id: str | None = None


def to_eval_row(raw: dict[str, Any], index: int, source: str) -> EvalRow:
    """Map a raw held-out row to prompt / ground truth (+ tests when it is a code task)."""
    if "input" in raw and "output" in raw:
        prompt, gt = raw["input"], raw["output"]
    elif "prompt" in raw and "ground_truth" in raw:
        prompt, gt = raw["prompt"], raw["ground_truth"]
    elif "messages" in raw:
        messages = list(raw["messages"])
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError(f"{source} row {index}: `messages` has no assistant turn to evaluate against")
        prompt, gt = messages[:last], messages[last]["content"]
    else:
        raise ValueError(
            f"{source} row {index}: eval needs `input`/`output`, `prompt`/`ground_truth` or `messages`; "
            f"found {sorted(raw)}"
        )
    return EvalRow(prompt=prompt, ground_truth=str(gt), code_prompt=raw.get("prompt") if "test" in raw else None,
                   test=raw.get("test"), entry_point=raw.get("entry_point"), task_id=raw.get("task_id"))


@dataclass
class EvalPair:
    """One held-out example as tokens: the prompt, the target the model should continue it with,
    and the end-of-sequence id CE also scores after the target (None: the target does not end there,
    e.g. a cut document)."""

    prompt_ids: list[int]
    target_ids: list[int]
    eos_id: int | None = None


def pair_of_row(row: EvalRow, tokenizer, chat_kwargs: dict) -> EvalPair:
    """The prompt rendered exactly as in training, the ground truth encoded, EOS after it."""
    from ebft_engine.data import encode_text, render_prompt_ids

    return EvalPair(render_prompt_ids(tokenizer, row.prompt, chat_kwargs), encode_text(tokenizer, row.ground_truth),
                    tokenizer.eos_token_id)


def pair_of_record(record: dict[str, Any], index: int, tokenizer, chat_kwargs: dict, source: str = "held-out") -> EvalPair:
    """A held-out row of any shape a transform (or none) makes: token rows (`input_ids`, cut at
    `prompt_length`, or halfway when there is no prompt) or prompt / ground-truth rows."""
    if "input_ids" in record:
        ids = [int(i) for i in record["input_ids"]]
        cut = int(record.get("prompt_length") or 0) or len(ids) // 2
        cut = min(max(cut, 1), len(ids) - 1)
        if len(ids) < 2:
            raise ValueError(f"{source} row {index}: fewer than 2 tokens, nothing to evaluate")
        return EvalPair(ids[:cut], ids[cut:], None)
    return pair_of_row(to_eval_row(record, index, source), tokenizer, chat_kwargs)


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_program(code_prompt: str, completion: str, entry_point: str) -> str:
    """The code to test: a whole function if the model wrote one (fenced or not), else the
    task's header followed by the completion as its body (HumanEval's own convention)."""
    fenced = _FENCE.search(completion)
    code = fenced.group(1) if fenced else completion
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        # keep the header's imports and helper functions, then the model's definition overrides
        return f"{code_prompt}\n    pass\n\n{code}\n"
    if code and not code.startswith((" ", "\t")):
        code = "\n".join("    " + line if line.strip() else line for line in code.splitlines())
    return f"{code_prompt}{code}\n"


@torch.no_grad()
def validation_ce(model, tokenizer, rows: list[EvalRow], chat_kwargs: dict, device) -> float:
    """Per-token CE of the ground truth (and EOS) given the rendered prompt."""
    return pairs_ce(model, [pair_of_row(row, tokenizer, chat_kwargs) for row in rows], device)


@torch.no_grad()
def pairs_ce(model, pairs: list[EvalPair], device) -> float:
    """Per-token CE of each pair's target (and EOS, when it has one) given its prompt."""
    total, count = 0.0, 0
    for pair in pairs:
        p = pair.prompt_ids
        g = pair.target_ids + ([pair.eos_id] if pair.eos_id is not None else [])
        ids = torch.tensor([p + g], device=device)
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        targets = ids[0, len(p):]
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(g)
    return total / max(count, 1)


def _strip_stop(ids: list[int], stop_ids: set[int], pad_id: int | None) -> list[int]:
    out = list(ids)
    while out and (out[-1] in stop_ids or out[-1] == pad_id):
        out.pop()
    return out


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], *, n: int, max_new_tokens: int, temperature: float,
             device, seed: int) -> list[list[int]]:
    """n completions (token ids, stop tokens stripped) of one prompt; greedy when temperature is 0."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=n)
    else:
        kwargs.update(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    stops = {tokenizer.eos_token_id}
    return [_strip_stop(seq[len(prompt_ids):].tolist(), stops, tokenizer.pad_token_id) for seq in out]


@torch.no_grad()
def feature_matching(model, tokenizer, rows: list[EvalRow], cfg: EbftConfig, device, *, n: int, temperature: float,
                     max_new_tokens: int, seed: int) -> tuple[float, float]:
    """Mean CFM loss and mean alignment over held-out prompts (features from the frozen base)."""
    pairs = [pair_of_row(row, tokenizer, _chat_kwargs(cfg)) for row in rows]
    return pairs_feature_matching(model, tokenizer, pairs, cfg, device, n=n, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=seed)


@torch.no_grad()
def pairs_feature_matching(model, tokenizer, pairs: list[EvalPair], cfg: EbftConfig, device, *, n: int,
                           temperature: float, max_new_tokens: int, seed: int, target_cap: int | None = None,
                           feature_model=None) -> tuple[float, float]:
    """Mean CFM loss and alignment: n samples of each prompt (up to `max_new_tokens`, or the
    target's length x gt_length_multiplier when shorter) against its target, or the target's first
    `target_cap` tokens. Features come from `feature_model` when given (a full fine-tune's frozen
    copy), else from `model` with its adapter off."""
    from ebft_engine.features import feature_layer_indices, frozen_feature_model, num_decoder_layers, pool, token_features
    from ebft_engine.rewards import compute_rewards

    layers = feature_layer_indices(list(cfg.ebft.feature_layers), num_decoder_layers(model))
    cfms, aligns = [], []
    for k, pair in enumerate(pairs):
        p = pair.prompt_ids
        g = pair.target_ids if target_cap is None else pair.target_ids[:target_cap]
        budget = max(1, min(max_new_tokens, math.ceil(len(g) * cfg.ebft.gt_length_multiplier)))
        samples = generate(model, tokenizer, p, n=n, max_new_tokens=budget, temperature=temperature,
                           device=device, seed=seed + k)
        seqs = [p + s for s in samples] + [p + g]
        T = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long, device=device)
        real = torch.zeros((len(seqs), T), dtype=torch.bool, device=device)
        comp = torch.zeros_like(real)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, device=device)
            real[i, : len(s)] = True
            comp[i, len(p): len(s)] = True
        with frozen_feature_model(feature_model if feature_model is not None else model) as fm:
            feats = token_features(fm, ids, attention_mask=real.long(), layer_indices=layers)
        pooled = pool(feats, real, cfg.ebft.embed_method, comp)
        out = compute_rewards(pooled[:-1].unsqueeze(0), pooled[-1:], alignment_coef=1.0, diversity_coef=0.0,
                              use_whitening=False)
        cfms.append(float(out.cfm.mean()))
        aligns.append(float(out.alignment.mean()))
    return sum(cfms) / max(len(cfms), 1), sum(aligns) / max(len(aligns), 1)


def code_tasks(rows: list[EvalRow]) -> list[EvalRow]:
    """The rows pass@1 runs: those with tests, an entry point and a code prompt."""
    return [r for r in rows if r.test and r.entry_point and r.code_prompt is not None]


def pass_at_1(model, tokenizer, rows: list[EvalRow], cfg: EbftConfig, device, *, max_new_tokens: int,
              timeout_s: float, backend: "Backend") -> tuple[float | None, list[dict]]:
    """Greedy pass@1 over the rows that carry tests, run in `backend`; None when no row has tests."""
    from ebft_engine.data import render_prompt_ids
    from ebft_engine.sandbox import run_programs

    tasks = code_tasks(rows)
    if not tasks:
        return None, []
    completions, programs = [], []
    for row in tasks:
        p = render_prompt_ids(tokenizer, row.prompt, _chat_kwargs(cfg))
        (ids,) = generate(model, tokenizer, p, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                          device=device, seed=0)
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        completions.append(completion)
        program = extract_program(row.code_prompt, completion, row.entry_point)
        programs.append(program + f"\n\n{row.test}\n\ncheck({row.entry_point})\n")
    labels = [f"ebft-sandbox:{row.task_id or i}" for i, row in enumerate(tasks)]
    outcomes = run_programs(programs, backend=backend, timeout_s=timeout_s, labels=labels)
    results = [{"task_id": row.task_id, "passed": res.passed, "status": res.status, "completion": completion,
                "stderr_tail": res.stderr[-500:]} for row, completion, res in zip(tasks, completions, outcomes)]
    return sum(r["passed"] for r in results) / len(results), results


def sandbox_fields(backend: "Backend | None") -> dict[str, Any]:
    """What the eval record says about where generated code ran (always the backend; a warning if unjailed)."""
    from ebft_engine.sandbox import UNSAFE_WARNING

    if backend is None:
        return {"sandbox_backend": None}
    fields: dict[str, Any] = {"sandbox_backend": backend.name}
    if not backend.jailed:
        fields["sandbox_warning"] = UNSAFE_WARNING
    return fields


def _chat_kwargs(cfg: EbftConfig) -> dict:
    from ebft_engine.data import chat_template_kwargs

    return chat_template_kwargs(cfg)


def load_eval_rows(cfg: EbftConfig, max_rows: int | None) -> list[EvalRow]:
    """Raw held-out rows from `test_datasets`, mapped for evaluation."""
    from ebft_engine.data import load_source

    entries = list(cfg.test_datasets or [])
    if not entries:
        raise ValueError(
            "eval needs held-out data: add `test_datasets:` to the config "
            "(e.g. `- path: builtin:humaneval` with `split: test`)"
        )
    rows: list[EvalRow] = []
    for spec in entries:
        ds = load_source(spec)
        for i, raw in enumerate(ds):
            rows.append(to_eval_row(dict(raw), i, spec.path))
    return rows[:max_rows] if max_rows else rows


def evaluate(cfg: EbftConfig, adapter: str | Path | None = None, *, max_rows: int | None = None, n_samples: int = 4,
             max_new_tokens: int = 256, timeout_s: float = 10.0, seed: int = 0,
             log_dir: str | Path | None = None, unsafe_exec: bool = False) -> dict[str, Any]:
    """Run all three measurements; append the `eval` record; return it.

    Raises SandboxUnavailable before loading the model when rows carry tests, no OS jail works here
    and `unsafe_exec` is False."""
    from ebft_engine.metrics import MetricsLog
    from ebft_engine.modeling import config_dtype, load_model, load_tokenizer, resolve_device
    from ebft_engine.sandbox import UNSAFE_NOTICE, detect_backend, require_backend

    t0 = time.time()
    rows = load_eval_rows(cfg, max_rows)
    backend = require_backend(unsafe_exec) if code_tasks(rows) else None
    if backend is not None and not backend.jailed:
        reasons = "".join(f"\n  - {r}" for r in detect_backend()[1])
        print(UNSAFE_NOTICE + reasons, file=sys.stderr, flush=True)
    device = resolve_device(cfg.device)
    dtype = config_dtype(cfg, device)
    tokenizer = load_tokenizer(cfg.base_model, cfg=cfg, dtype=dtype)
    model = load_model(cfg.base_model, dtype=dtype, device=device)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there (expected a peft adapter folder)")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    temperature = cfg.trl.temperature if cfg.mode == "structured" else cfg.ebft.temperature

    ce = validation_ce(model, tokenizer, rows, _chat_kwargs(cfg), device)
    cfm, align = feature_matching(model, tokenizer, rows, cfg, device, n=n_samples, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=seed)
    p1, per_task = pass_at_1(model, tokenizer, rows, cfg, device, max_new_tokens=max_new_tokens, timeout_s=timeout_s,
                             backend=backend)
    record = {"eval/ce_loss": ce, "eval/cfm_loss": cfm, "eval/alignment": align, "eval/pass@1": p1,
              "eval/n_rows": len(rows), "eval/n_code_tasks": len(per_task), **sandbox_fields(backend),
              "adapter": str(adapter) if adapter else None, "eval/seconds": round(time.time() - t0, 1)}
    out_dir = Path(log_dir or cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with MetricsLog(out_dir / "metrics.jsonl") as log:
        log.write("eval", step=_last_step(out_dir), **record)
    with open(out_dir / "eval.jsonl", "a", encoding="utf-8") as f:
        for r in per_task:
            f.write(json.dumps({"ts": time.time(), "adapter": record["adapter"],
                                "sandbox_backend": record["sandbox_backend"], **r}) + "\n")
    return record


def _last_step(out_dir: Path) -> int:
    from ebft_engine.metrics import last_logged_step, read_records

    path = out_dir / "metrics.jsonl"
    return last_logged_step(read_records(path)) if path.exists() else 0


def format_report(record: dict[str, Any]) -> Iterable[str]:
    """Human lines for the terminal."""
    p1 = record.get("eval/pass@1")
    where = ("UNSANDBOXED: --unsafe-exec" if record.get("sandbox_warning")
             else f"sandbox: {record.get('sandbox_backend')}")
    yield f"validation CE   {record['eval/ce_loss']:.4f}  (per ground-truth token)"
    yield f"CFM loss        {record['eval/cfm_loss']:.4f}  (alignment {record['eval/alignment']:+.3f})"
    yield ("pass@1          n/a (no rows with tests)" if p1 is None
           else f"pass@1          {p1:.3f}  ({record['eval/n_code_tasks']} tasks, {where})")
