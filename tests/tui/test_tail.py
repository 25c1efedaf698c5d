"""Followers: torn lines, invalid JSON, truncation, replacement, late creation, a real torn writer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebft_tui.runs.tail import JsonlFollower, TextFollower, follow_jsonl, read_jsonl, tail_lines

FAKE_TRAINER = Path(__file__).resolve().parents[1] / "fakes" / "fake_trainer.py"


def rec(i: int) -> str:
    return json.dumps({"v": 1, "event": "metrics", "step": i}) + "\n"


def test_late_creation_and_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    f = JsonlFollower(path)
    assert f.read_new() == []  # not there yet
    line = rec(1)
    with open(path, "a") as w:
        w.write(line[:10])
        w.flush()
        assert f.read_new() == []  # half a record waits in the buffer
        w.write(line[10:] + rec(2)[:5])
        w.flush()
        assert [r["step"] for r in f.read_new()] == [1]
        w.write(rec(2)[5:])
    assert [r["step"] for r in f.read_new()] == [2]
    assert f.read_new() == []
    f.close()


def test_invalid_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rec(1) + "not json\n" + "[1, 2]\n" + "\n" + rec(2) + '{"v": 1, "x": NaN}\n')
    f = JsonlFollower(path)
    records = f.read_new()
    assert [r.get("step") for r in records] == [1, 2, None]
    assert f.n_invalid == 2


def test_truncation_and_replacement_restart_from_zero(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rec(1) + rec(2))
    f = JsonlFollower(path)
    assert len(f.read_new()) == 2
    path.write_text(rec(7))  # truncated and rewritten: shorter than our offset
    assert [r["step"] for r in f.read_new()] == [7]
    other = tmp_path / "new.jsonl"
    other.write_text(rec(8) + rec(9) + rec(10))
    os.replace(other, path)  # a new file (new inode) under the same name
    assert [r["step"] for r in f.read_new()] == [8, 9, 10]
    assert f.n_resets == 2
    path.unlink()
    assert f.read_new() == []
    path.write_text(rec(11))
    assert [r["step"] for r in f.read_new()] == [11]


def test_text_follower_and_tail_lines(tmp_path):
    path = tmp_path / "trainer.log"
    f = TextFollower(path)
    assert f.read_new() == []
    path.write_text("one\r\ntwo\nthr")
    assert f.read_new() == ["one", "two"]
    with open(path, "a") as w:
        w.write("ee\n\xff\n")
    assert f.read_new() == ["three", "\xff"]
    path.write_text("\n".join(f"line {i}" for i in range(100)) + "\n")
    assert tail_lines(path, 3) == ["line 97", "line 98", "line 99"]
    assert tail_lines(tmp_path / "missing.log") == []
    assert read_jsonl(tmp_path / "missing.jsonl") == []


@pytest.mark.timeout(60)
async def test_follow_jsonl_gets_every_record_from_a_torn_writer(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FAKE_TRAINER), "--out", str(tmp_path), "--steps", "20", "--interval", "0.01", "--torn",
        stdout=subprocess.DEVNULL,
    )
    stop = asyncio.Event()
    got: list[dict] = []

    async def reader():
        async for batch in follow_jsonl(tmp_path / "metrics.jsonl", poll_s=0.01, stop_event=stop):
            got.extend(batch)

    task = asyncio.create_task(reader())
    assert await proc.wait() == 0
    stop.set()
    await asyncio.wait_for(task, 10)
    steps = [r["step"] for r in got if r["event"] == "metrics"]
    assert steps == list(range(1, 21))
    assert got[-1]["event"] == "status" and got[-1]["phase"] == "done"
