"""Smoke tests for bench/: each script's --quick path on the tiniest settings prints its table;
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
    assert [r[:4] for r in rows] == [["tiny", "40", "dense", "folded"], ["tiny", "40", "dense", "copies"]]
    folded, copies = results
    S = 40
    nbg = (folded["T"] - S) // 4  # NB·G slots per sample
    assert copies["T"] == S + nbg and folded["tokens"] == folded["T"]  # one row: the document once
    assert copies["tokens"] == 4 * copies["T"]  # n = 4 copies of the document
    assert folded["tokens_per_s"] > 0 and folded["tflop"] > 0 and folded["mfu"] == "-"  # no MFU on CPU
    assert folded["vs_copies"].endswith("x") and copies["vs_copies"] == "-"
    assert folded["tflop"] < copies["tflop"]  # the same samples for fewer FLOPs


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


@pytest.mark.slow
def test_structured_sync_async_quick(capsys):
    """Two trainer subprocesses against one hf server subprocess (~20-70 s on 2 cores)."""
    mod = load("structured_sync_async")
    text, res = mod.run(["--quick", "--steps", "2", "--timeout", "300"])
    rows = table_rows(text, "mode")
    assert [r[0] for r in rows] == ["sync", "async"]
    sync, async_ = res["sync"], res["async_"]
    assert sync["steps"] == async_["steps"] == 2
    # sync waits on all of its generation; async at most on all of it
    assert sync["wait_s"] == pytest.approx(sync["gen_s"], rel=0.05, abs=0.05)
    assert 0 <= async_["wait_s"] <= async_["loop_s"]
