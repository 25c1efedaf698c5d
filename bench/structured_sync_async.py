"""Structured mode, sync vs async: wall time, and the fraction of it the trainer waits on generation.

One generation server (`python -m ebft_engine serve CONFIG`, the hf backend, a subprocess) serves
two trainer runs of the same config (`python -m ebft_engine train CONFIG`, subprocesses), one with
`trl.async_prefetch=false` and one with `=true`, alternated `--repeats` times. Everything else is
the config's, `trl.vllm_sync_interval` included. Figures come from each run's metrics.jsonl:

- loop s: Σ step_time_s (data, rollouts, rewards, backward, optimizer, weight sync; not model load);
- gen s: Σ gen_time_s, how long generating the step's batches took (in the background when async);
- gen wait s: Σ gen_wait_s, the time the trainer blocked on generation (sync: all of it);
- weight sync s: Σ sync_s, publishing the adapter to the server after optimizer steps;
- wait share = gen wait / loop; s/step after the first (async's first step has nothing to overlap).

The server and the trainer share the machine: on a 2-core CPU, async can only overlap generation
with training as far as the two processes get a core each (`--threads`, default 1 per process).

    python bench/structured_sync_async.py --quick     # random tiny model, SmolLM2 tokenizer: < 1 min
    python bench/structured_sync_async.py             # presets/smollm2-135m-structured-cpu.yaml, 6 steps
    python bench/structured_sync_async.py --preset presets/qwen3-4b-ebft-structured.yaml --threads 0  # GPU
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_json_arg, format_table, machine, ratio, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = REPO / "presets" / "smollm2-135m-structured-cpu.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def tiny_model_dir(path: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template (from the offline
    folder), so generation and training cost little but every code path is the real one."""
    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from ebft_engine.modeling import smollm2_folder

    real = smollm2_folder("float32")
    ref = AutoConfig.from_pretrained(real)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ref.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id,
                      pad_token_id=ref.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    LlamaForCausalLM(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (real / name).exists():
            shutil.copy(real / name, path / name)
    return path


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def engine(*args: str) -> list[str]:
    return [sys.executable, "-m", "ebft_engine", *args]


def start_server(config: Path, overrides: list[str], log: Path, env: dict, timeout: float):
    """`ebft_engine serve` on a free port; (process, url) once it listens."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(engine("serve", str(config), *overrides, "--port", "0"), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
                                env=env, start_new_session=True)
    rx = re.compile(r"listening on (http://[\d.]+:\d+)")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = rx.search(log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the generation server exited with {proc.returncode}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"the generation server did not listen within {timeout:.0f}s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    from ebft_engine.rollout.vllm_launcher import stop_server

    stop_server(proc, grace_s=10)


def train_once(config: Path, overrides: list[str], run_dir: Path, env: dict, timeout: float) -> dict:
    """One trainer run; its per-step metrics summed."""
    from ebft_engine.metrics import read_records

    log = run_dir.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(engine("train", str(config), *overrides, f"output_dir={run_dir}",
                                       "--no-resume", "--overwrite"),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(REPO), env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise SystemExit(f"the trainer ran past {timeout:.0f}s; see {log}")
    wall = time.perf_counter() - t0
    records = read_records(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    steps = [r for r in records if r.get("event") == "metrics"]
    if rc != 0 or not steps:
        raise SystemExit(f"the trainer exited with {rc}:\n{log.read_text(errors='replace')[-3000:]}")
    times = [float(r.get("step_time_s") or 0.0) for r in steps]
    waits = [float(r.get("gen_wait_s") or 0.0) for r in steps]
    total = lambda key: sum(float(r.get(key) or 0.0) for r in steps)  # noqa: E731
    return dict(steps=len(steps), loop_s=sum(times), wait_s=sum(waits), process_s=wall,
                gen_s=total("gen_time_s"), sync_s=total("sync_s"),
                later_s=sum(times[1:]) / max(1, len(times) - 1),
                staleness=max(float(r.get("staleness") or 0.0) for r in steps))


def run(argv: list[str] | None = None) -> tuple[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="random tiny model, short completions, 3 steps: a 2-core CPU in under a minute")
    ap.add_argument("--preset", type=Path, default=DEFAULT_PRESET, help="structured config to run")
    ap.add_argument("--steps", type=int, default=None,
                    help="max_steps per run (default 3 with --quick, else the config's)")
    ap.add_argument("--repeats", type=int, default=1, help="sync/async pairs (best loop time kept)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (server and trainer); 0 = torch's default")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per process (default 120 quick, 1800)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for server and trainer, e.g. --set trl.vllm_sync_interval=2")
    add_json_arg(ap)
    args = ap.parse_args(argv)

    timeout = args.timeout or (120.0 if args.quick else 1800.0)
    env = child_env(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ebft-bench-structured-"))
    try:
        overrides = list(args.overrides)
        model_desc = "config's"
        if args.quick:
            model = tiny_model_dir(work / "tiny-model")
            overrides = [f"base_model={model}", "bf16=false", "trl.max_completion_length=16",
                         "micro_batch_size=8", *overrides]
            model_desc = "random tiny Llama (2 layers, hidden 64) + SmolLM2 tokenizer"
        steps = args.steps or (3 if args.quick else None)
        if steps:
            overrides.append(f"max_steps={steps}")
        overrides.append(f"save_steps={10**6}")  # only the final save: checkpoints are not the point

        from ebft_engine.config import load_config

        cfg = load_config(args.preset, overrides)
        if cfg.mode != "structured":
            raise SystemExit(f"{args.preset}: ebft.mode is {cfg.mode!r}; this bench needs a structured config")
        # As `ebft run` does: one token for server and trainers, and the server's run dir holds the
        # trainers' run dirs (it loads adapters only from inside its own).
        from ebft_engine.rollout.auth import TOKEN_ENV, new_token

        env[TOKEN_ENV] = new_token()
        server, url = start_server(args.preset, [*overrides, f"output_dir={work}"], work / "server.log", env,
                                   timeout)
        env["EBFT_SERVER_URL"] = url
        runs: dict[str, list[dict]] = {"sync": [], "async": []}
        try:
            for i in range(args.repeats):
                for name, flag in (("sync", "false"), ("async", "true")):
                    res = train_once(args.preset, [*overrides, f"trl.async_prefetch={flag}"],
                                     work / f"{name}-{i}", env, timeout)
                    runs[name].append(res)
                    print(f"{name} run {i + 1} done: {res['loop_s']:.1f}s", file=sys.stderr, flush=True)
        finally:
            stop(server)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {k: min(v, key=lambda r: r["loop_s"]) for k, v in runs.items()}
    s, a = best["sync"], best["async"]
    rows = []
    for name, r in best.items():
        rows.append([name, r["steps"], f"{r['loop_s']:.1f}", f"{r['gen_s']:.1f}", f"{r['wait_s']:.1f}",
                     f"{100 * r['wait_s'] / r['loop_s']:.0f}%", f"{r['sync_s']:.1f}", f"{r['later_s']:.2f}",
                     f"{r['staleness']:.0f}", f"{r['process_s']:.1f}"])
    text = "\n".join([
        f"structured sync vs async: {args.preset.name}, model: {model_desc}, "
        f"n={cfg.trl.num_generations}, max_completion_length={cfg.trl.max_completion_length}, "
        f"micro_batch_size={cfg.micro_batch_size}, vllm_sync_interval={cfg.trl.vllm_sync_interval}, "
        f"threads per process={args.threads or 'default'}, best of {args.repeats}",
        f"machine: {machine(threads=False)}",
        format_table(["mode", "steps", "loop s", "gen s", "gen wait s", "wait share", "weight sync s",
                      "s/step after 1st",
                      "max staleness", "process wall s"], rows),
        f"async speed-up: loop {ratio(s['loop_s'], a['loop_s'])}, "
        f"per step after the first {ratio(s['later_s'], a['later_s'])}",
    ])
    write_json(args.json, "structured_sync_async", text, dict(sync=s, async_=a))
    return text, dict(sync=s, async_=a)


def main(argv: list[str] | None = None) -> int:
    text, _ = run(argv)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
