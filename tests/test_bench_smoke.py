"""Smoke tests for bench/: each script's --quick path on the tiniest settings prints its table
(bench/structured_sync_async.py runs in the GPU kit's rehearsal, tests/test_gpu_kit.py);
strided generation's two generators agree token for token (the benchmark's own check must be able
to fail, so it is also fed a generator that differs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str):
    """Import bench/<name>.py as a module (bench/ is scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith(header_start))
    assert set(lines[i + 1].replace(" ", "")) == {"-"}
    return [line.split() for line in lines[i + 2:] if line.strip() and not line.startswith("async speed-up")]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_strided_generation_quick(capsys):
    mod = load("strided_generation")
    assert mod.main(["--quick", "--lengths", "48", "96", "--n-samples", "2"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "seq_len")
    assert [r[0] for r in rows] == ["48", "96"]
    assert all(r[-1] == "yes" for r in rows)  # identical tokens
    assert "machine:" in out


def test_strided_generation_flags_different_tokens(monkeypatch, capsys):
    """The 'same tokens' column is a real check: a naive generator that samples differently fails."""
    mod = load("strided_generation")
    real = mod.generate_blocks_naive

    def off_by_one(*args, **kw):
        return (real(*args, **kw) + 1) % 1024

    monkeypatch.setattr(mod, "generate_blocks_naive", off_by_one)
    assert mod.main(["--quick", "--lengths", "48", "--n-samples", "2"]) == 1
    row = table_rows(capsys.readouterr().out, "seq_len")[0]
    assert row[-2:] == ["NO", "(0.0%)"]  # (y + 1) mod V never equals y


def test_flex_vs_dense_quick(capsys):
    mod = load("flex_vs_dense")
    try:
        rc = mod.main(["--quick", "--lengths", "40", "--n-samples", "2"])
    except Exception as exc:  # pragma: no cover - inductor needs a C++ compiler
        pytest.skip(f"flex_attention cannot compile here: {type(exc).__name__}: {exc}")
    out = capsys.readouterr().out
    assert "forward only (no grad)" in out
    rows = table_rows(out, "seq_len")
    assert rc == 0 and rows[0][0] == "40"
    assert rows[0][2] == "1"  # folded (the default): one row holds the document and both samples
    assert float(rows[0][-1]) < 1e-4  # flex and dense outputs agree


def test_strided_step_quick(capsys):
    mod = load("strided_step")
    text, results = mod.run(["--quick", "--lengths", "40"])
    print(text)
    rows = table_rows(capsys.readouterr().out, "model")
    assert [r[:5] for r in rows] == [["tiny", "40", "dense", "folded", "step"],
                                     ["tiny", "40", "dense", "copies", "step"],
                                     ["tiny", "40", "dense", "folded", "train"]]
    folded, copies, train = results
    S = 40
    nbg = (folded["T"] - S) // 4  # NB·G slots per sample
    assert copies["T"] == S + nbg and folded["tokens"] == folded["T"]  # one row: the document once
    assert copies["tokens"] == 4 * copies["T"]  # n = 4 copies of the document
    assert folded["tokens_per_s"] > 0 and folded["tflop"] > 0 and folded["mfu"] == "-"  # no MFU on CPU
    assert folded["vs_copies"].endswith("x") and copies["vs_copies"] == "-"
    assert folded["tflop"] < copies["tflop"]  # the same samples for fewer FLOPs
    # the train row: the same folded forward, its FLOPs the training part of the step's
    assert train["tokens"] == folded["tokens"] and 0 < train["tflop"] < folded["tflop"]


def test_train_alone_replays_rollouts_and_features(monkeypatch):
    """The `train` rows run the stepper's own step with generation and the feature pass recorded
    once and replayed: later calls neither sample nor run the frozen pass, and still backward."""
    mod = load("strided_step")
    from _common import build_model

    from ebft_engine.config import load_config
    from ebft_engine.strided.step import StridedStepper

    calls = {"generate": 0, "features": 0}
    real_generate = mod.step_module.generate_blocks
    real_features = StridedStepper._features

    def counting_generate(*args, **kwargs):
        calls["generate"] += 1
        return real_generate(*args, **kwargs)

    def counting_features(self, *args, **kwargs):
        calls["features"] += 1
        return real_features(self, *args, **kwargs)

    monkeypatch.setattr(mod.step_module, "generate_blocks", counting_generate)
    monkeypatch.setattr(StridedStepper, "_features", counting_features)
    model = build_model("tiny", device=torch.device("cpu"), dtype=torch.float32)
    model.train()
    cfg = load_config(mod.PRESET, ["sequence_len=40"])
    stepper = StridedStepper(cfg, model, None, "cpu", torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    docs = [{"input_ids": torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(0)).tolist()}]
    step = mod.train_alone(stepper, docs, optimizer)
    grads = []

    real_zero = optimizer.zero_grad

    def zero_grad(**kwargs):  # runs right after each backward: record the gradients first
        grads.append(sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None))
        real_zero(**kwargs)

    monkeypatch.setattr(optimizer, "zero_grad", zero_grad)
    first, second = step(), step()
    assert calls == {"generate": 1, "features": 1}
    assert first.metrics["loss"] == second.metrics["loss"]  # the same rollouts, unchanged weights
    assert all(g > 0 for g in grads) and len(grads) == 2
    assert mod.step_module.generate_blocks is counting_generate  # restored after each call
    assert "_features" not in vars(stepper)


def test_step_flops_full_finetune_is_six_p_per_token():
    """With every weight training, the training part is 6·P per trained token (+ the lm_head rows)."""
    mod = load("strided_step")
    from _common import build_model

    from ebft_engine.config import load_config
    from ebft_engine.strided.step import StridedStepper

    model = build_model("tiny", device=torch.device("cpu"), dtype=torch.float32)
    cfg = load_config(mod.PRESET, ["ebft.ce_coef=0"])
    st = StridedStepper(cfg, model, None, "cpu", torch.float32)
    S = 40
    layout = st.make_layout(torch.tensor([S]), torch.tensor([-1]), S)
    p_body = sum(p.numel() for p in model.model.layers.parameters())
    p_head = model.lm_head.weight.numel()
    head_rows = 4 * layout.NB * layout.G
    for fold, rows_x_slots in ((False, 4 * layout.T), (True, S + 4 * layout.NB * layout.G)):
        f = mod.step_flops(model, st, layout, 1, fold=fold)
        assert f["training"] == 6 * p_body * rows_x_slots + 6 * p_head * head_rows + 2 * p_head * S
        assert f["generation"] == 2 * p_body * (S + 7 * 4 * layout.NB) + 2 * p_head * head_rows


def test_memory_probe_drops_the_profilers_usdt_lines():
    """torch's profiler prints `USDT: ... profiler_start/stop` to fd 2 from C++ on every use; the
    CPU memory probe drops those lines and passes on anything else written meanwhile."""
    import subprocess

    code = ("import os, sys, torch\n"
            f"sys.path.insert(0, {str(BENCH)!r})\n"
            "from _common import cpu_peak_alloc_mb\n"
            "def work():\n"
            "    os.write(2, b'kept line\\n')\n"
            "    return torch.ones(1000) + 1\n"
            "print(cpu_peak_alloc_mb(work)[0] > 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "kept line" in done.stderr and "USDT:" not in done.stderr
