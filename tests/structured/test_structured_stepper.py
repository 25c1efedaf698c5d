"""StructuredStepper end to end: real hf server (sync), fake server (multi-turn, async, failures)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from conftest import records, start_fake, start_hf_server
from ebft_engine.rollout.client import ServerError
from ebft_engine.rollout.vllm_launcher import stop_server
from ebft_engine.structured import StructuredStepper
from simclock import SimClock, wait_event
from tinymodel import END, build, make_tokenizer, structured_config

pytestmark = pytest.mark.timeout(300)

ROWS = [
    {"prompt": "add 2 and 3", "ground_truth": "five"},
    {"prompt": [{"role": "user", "content": "say hi"}], "ground_truth": "hi there, friend"},
    {"prompt": "count to three", "ground_truth": "one two three"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}],
     "ground_truth": "because"},
]
SPEC_METRICS = ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "entropy",
                "loss", "is_ratio_min", "gen_wait_s", "staleness", "sync_version")


class Loop:
    """What train.py does around a Stepper: rows in data order, optimizer, after-step hook."""

    def __init__(self, stepper, model, rows, lr=1e-2):
        self.stepper, self.model, self.rows, self.pos = stepper, model, rows, 0
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def take(self, k):
        out = [self.rows[(self.pos + i) % len(self.rows)] for i in range(k)]
        self.pos += k
        return out

    def step(self, step, check=None):
        result = self.stepper.run_step(self.take(self.stepper.rows_per_step), step)
        if check is not None:
            check(result)
        if not result.skipped:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.stepper.after_optimizer_step(step)
        return result


@pytest.fixture
def tiny_server(tiny_model_dir, tmp_path):
    proc, url = start_hf_server(tiny_model_dir, tmp_path / "server.log")
    yield url, tmp_path / "server.log"
    stop_server(proc, grace_s=5)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_sync_end_to_end_against_the_hf_server(tiny_model_dir, tiny_server, tmp_path):
    url, log = tiny_server
    cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / "run", max_steps=3)
    model, tok, dev, dt = build(cfg)
    stepper = StructuredStepper(cfg, model, tok, dev, dt)
    assert stepper.rows_per_step == 4 * 2 // 4
    phases: list[str] = []
    stepper.on_phase = phases.append  # what train.py turns into `phase` log records
    loop = Loop(stepper, model, ROWS)

    def only_lora_grads(result):
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads.values())
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    results = [loop.step(s, only_lora_grads) for s in (1, 2, 3)]
    stepper.close()
    assert phases == ["generating", "scoring", "training"] * 3
    for r in results:
        for key in SPEC_METRICS:
            assert key in r.metrics and math.isfinite(r.metrics[key]), key
        assert r.n_tokens > 0 and not r.skipped
        assert -1.0 <= r.metrics["ebft/alignment"] <= 1.0
        # the trainer's log-probs at the sampling temperature equal the server's processed ones
        assert abs(r.metrics["is_ratio_min"] - 1.0) < 1e-3
        assert r.metrics["staleness"] == 0.0
    assert [r.metrics["sync_version"] for r in results] == [0.0, 1.0, 2.0]
    text = log.read_text()
    assert "load_lora_adapter name=ebft-policy-v1" in text
    assert "POST /v1/completions model=ebft-policy-v2" in text
    assert "unload_lora_adapter name=ebft-policy-v1" in text  # close() cleans up


def test_zero_advantage_micro_batches_are_skipped(tiny_model_dir, tmp_path):
    proc, url, _, _ = start_fake(tmp_path, "ok", "--same")
    try:
        cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / "run",
                                trl={"skip_zero_advantage_batches": True})
        model, tok, dev, dt = build(cfg)
        stepper = StructuredStepper(cfg, model, tok, dev, dt)
        result = stepper.run_step(ROWS[:2], 1)
        assert result.skipped and result.metrics["skipped_microbatches"] == 2
        assert all(p.grad is None for p in model.parameters())
        assert result.metrics["zero_adv_frac"] == 1.0
        stepper.skip_zero = False
        result = stepper.run_step(ROWS[:2], 2)
        assert not result.skipped and result.metrics["skipped_microbatches"] == 0
        stepper.close()
    finally:
        stop_server(proc, grace_s=2)


def test_multiturn_each_completion_keeps_its_own_history(tiny_model_dir, tmp_path):
    """remaining_turns of different lengths in one batch; completion j continues its own turn 1."""
    from ebft_engine.data import render_chat

    proc, url, record, _ = start_fake(tmp_path, "ok")
    try:
        cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / "run",
                                micro_batch_size=3, gradient_accumulation_steps=2,
                                trl={"num_generations": 2})
        model, tok, dev, dt = build(cfg)
        stepper = StructuredStepper(cfg, model, tok, dev, dt)
        rows = [
            {"prompt": [{"role": "user", "content": "q1"}], "ground_truth": "a1"},
            {"prompt": [{"role": "user", "content": "r1"}], "ground_truth": "b1",
             "remaining_turns": [{"role": "user", "content": "r2"},
                                 {"role": "assistant", "content": "b2"}]},
            {"prompt": [{"role": "user", "content": "s1"}], "ground_truth": "c1",
             "remaining_turns": [{"role": "user", "content": "s2"},
                                 {"role": "assistant", "content": "c2"},
                                 {"role": "user", "content": "s3"},
                                 {"role": "assistant", "content": "c3x"},
                                 {"role": "user", "content": "trailing, ignored"}]},
        ]
        groups = list(stepper._produce(rows, 1, "ebft-base"))
        reqs = [r["body"] for r in records(record) if r["path"] == "/v1/completions"]
        # turn 1: one request, 3 prompts x n=2; turn 2: 2 rows x 2 completions; turn 3: 1 x 2
        assert [len(b["prompt"]) for b in reqs] == [3, 4, 2]
        assert [b["n"] for b in reqs] == [2, 1, 1]
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        for g, row in zip(groups, rows):
            assert g.turns == 1 + len([m for m in row.get("remaining_turns", [])
                                       if m["role"] == "assistant"])
            assert g.completion_ids == [[40, 41, END], [41, 42, END]]  # fake sample j
            for j, feat in enumerate(g.gen_feats):
                # the conversation completion j continued: its OWN first answer, then the turns
                own = tok.decode([40 + j, 41 + j])
                conv = list(row["prompt"]) + [{"role": "assistant", "content": own}]
                for m in row.get("remaining_turns", [])[:4]:
                    conv.append(m if m["role"] == "user" else
                                {"role": "assistant", "content": tok.decode([40, 41])})
                full = encode(render_chat(tok, conv, add_generation_prompt=False))
                assert feat.ids + [END] == full
                assert sum(feat.completion) == 2 * g.turns  # assistant tokens only
            gt_conv = list(row["prompt"]) + [{"role": "assistant", "content": row["ground_truth"]}]
            gt_conv += row.get("remaining_turns", [])[:4]
            assert g.gt_feat.ids + [END] == encode(render_chat(tok, gt_conv,
                                                               add_generation_prompt=False))
        # the turn-2 prompts: each starts with the prompt + that completion's own turn-1 ids
        turn2 = reqs[1]["prompt"]
        for k, (gi, j) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)]):
            head = groups[gi].prompt_ids + [40 + j, 41 + j]
            assert turn2[k][:len(head)] == head
        # a whole step over the same rows runs
        result = stepper.run_step(rows, 1)
        assert math.isfinite(result.metrics["ebft/reward"])
        stepper.close()
    finally:
        stop_server(proc, grace_s=2)


GEN_S, TRAIN_S = 2.5, 0.5  # simulated seconds a batch's generation and a training step take


def force_interleaving(stepper, clock: SimClock, steps: int, generation_slower: bool):
    """Script the async stepper's two threads around a simulated clock, so each step sees the
    interleaving under test on any machine, busy or quiet:

    - generation slower than training: batch k+1 (k >= 1) is pinned while step k trains; the
      training takes TRAIN_S, then the batch is held back until the trainer blocks on it and
      finishes GEN_S - TRAIN_S later: the trainer waits exactly that, and the batch took GEN_S;
    - training slower than generation: batch k+1 is complete before step k finishes training
      (TRAIN_S): the trainer never waits.

    Returns the list the scripted generator appends each step to as it starts."""
    started = {k: threading.Event() for k in range(1, steps + 2)}
    trained = {k: threading.Event() for k in range(1, steps + 2)}
    done = {k: threading.Event() for k in range(1, steps + 2)}
    base_reads: dict[int, int] = {}
    real_produce, real_backward = stepper.prefetcher.produce, stepper._backward
    order: list[int] = []

    def produce(rows, step, policy_name):
        order.append(step)
        started[step].set()
        groups = list(real_produce(rows, step, policy_name))  # the real requests to the server
        if generation_slower and step > 1:
            wait_event(trained[step - 1], f"step {step - 1} trained")
            clock.wait_for_trainer_read(after=base_reads[step])  # the trainer blocks on this batch
            clock.advance(GEN_S - TRAIN_S)
        yield from groups
        done[step].set()

    def backward(*args, **kwargs):
        step = len(base_reads) + 1  # the step being trained
        if step < steps:  # the next batch is pinned before this step's weights change
            wait_event(started[step + 1], f"batch {step + 1} pinned")
            if not generation_slower:
                wait_event(done[step + 1], f"batch {step + 1} generated")
        clock.advance(TRAIN_S)
        base_reads[step + 1] = clock.trainer_reads
        trained[step].set()
        return real_backward(*args, **kwargs)

    stepper.prefetcher.clock = clock
    stepper.prefetcher.produce = produce
    stepper._backward = backward
    return order


@pytest.mark.parametrize("generation_slower", [True, False], ids=["generation-slower", "training-slower"])
def test_async_staleness_bound_and_gen_wait(tiny_model_dir, tmp_path, generation_slower):
    from ebft_engine.data import render_prompt_ids

    interval, steps = 2, 6
    proc, url, record, _ = start_fake(tmp_path, "ok")
    try:
        cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / "run", max_steps=steps,
                                trl={"async_prefetch": True, "vllm_sync_interval": interval})
        model, tok, dev, dt = build(cfg)
        stepper = StructuredStepper(cfg, model, tok, dev, dt)
        clock = SimClock()
        order = force_interleaving(stepper, clock, steps, generation_slower)
        rows = [{"prompt": f"p{i}", "ground_truth": f"g{i}"} for i in range(40)]
        loop = Loop(stepper, model, rows)
        assert stepper.rows_per_step == 4  # two steps' rows at the first step
        results = []
        for s in range(1, steps + 1):
            results.append(loop.step(s))
            # the rows of step s+1 were taken at step s; the last step takes none
            assert stepper.rows_per_step == (2 if s + 2 <= steps else 0)
            # ...and are still untrained: a checkpoint now hands them back to the data order
            assert stepper.rows_in_flight == (2 if s < steps else 0)
        assert loop.pos == steps * 2  # one batch per step, no rows lost
        stepper.close()
        assert order == list(range(1, steps + 1))
        stale = [r.metrics["staleness"] for r in results]
        # batch k is generated while step k-1 trains, with the policy synced after steps 2, 4:
        # staleness = (k-1) - version, never above vllm_sync_interval
        assert stale == [0, 1, 2, 1, 2, 1]
        assert [r.metrics["sync_version"] for r in results] == [0, 0, 0, 2, 2, 4]
        waits = [r.metrics["gen_wait_s"] for r in results]
        gen_times = [r.metrics["gen_time_s"] for r in results]
        # step 1 has nothing to overlap with; its batch takes no simulated time here
        if generation_slower:  # the trainer waits for the rest of each batch's generation
            assert waits == [0.0] + [GEN_S - TRAIN_S] * (steps - 1)
            assert gen_times == [0.0] + [GEN_S] * (steps - 1)
        else:  # every batch is there when the trainer asks for it
            assert waits == [0.0] * steps
        # data order: step k trained on rows 2(k-1), 2(k-1)+1 (prompts rendered in order)
        turn1 = [r["body"] for r in records(record) if r["path"] == "/v1/completions"]
        sent = [tuple(p) for b in turn1 for p in b["prompt"]]
        expect = [tuple(render_prompt_ids(tok, f"p{i}")) for i in range(steps * 2)]
        assert sent == expect
        loads = [r["body"]["lora_name"] for r in records(record)
                 if r["path"] == "/v1/load_lora_adapter"]
        assert loads == ["ebft-policy-v2", "ebft-policy-v4"]  # every 2 steps, not after the last
    finally:
        stop_server(proc, grace_s=2)


def test_server_dying_mid_run_is_a_clear_error(tiny_model_dir, tmp_path):
    for async_mode in (False, True):
        proc, url, _, log = start_fake(tmp_path / str(async_mode), "die")
        try:
            cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / "run",
                                    trl={"async_prefetch": async_mode})
            model, tok, dev, dt = build(cfg)
            stepper = StructuredStepper(cfg, model, tok, dev, dt)
            stepper.client.retries, stepper.client.backoff_s = 2, 0.05
            with pytest.raises(ServerError, match=url.split("//")[1]):
                stepper.run_step(ROWS[:stepper.rows_per_step], 1)
            stepper.close()
        finally:
            stop_server(proc, grace_s=2)


def test_unreachable_server_fails_fast_at_start(tiny_model_dir, tmp_path):
    from ebft_engine.rollout.vllm_launcher import free_port

    port = free_port()
    cfg = structured_config(tiny_model_dir, port, tmp_path / "run", trl={"vllm_server_timeout": 2})
    model, tok, dev, dt = build(cfg)
    # the configured 2 s, not the default wait (the message names the limit it gave up at)
    with pytest.raises(ServerError, match=f"127.0.0.1:{port}.*did not become healthy within 2s"):
        StructuredStepper(cfg, model, tok, dev, dt)


def test_tokenizer_helper_matches_the_template():
    tok = make_tokenizer()
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                      add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    assert ids[0] == 4 and ids[-2:] == [END, 5]


def test_full_finetune_end_to_end(tiny_model_dir, tiny_server, tmp_path):
    """No adapter: a frozen feature copy, all weights train, reload_weights publishes them."""
    url, log = tiny_server
    cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / "run", adapter=None,
                            lora_r=None, lora_alpha=None, lora_target_linear=None,  # unset: no adapter
                            max_steps=3, trl={"vllm_lora_sync": False})
    model, tok, dev, dt = build(cfg)
    stepper = StructuredStepper(cfg, model, tok, dev, dt)
    assert stepper.feature_model is not model
    assert all(not p.requires_grad for p in stepper.feature_model.parameters())
    loop = Loop(stepper, model, ROWS, lr=1e-3)
    results = [loop.step(s) for s in (1, 2)]
    stepper.close()
    assert "collective_rpc reload_weights" in log.read_text()
    assert results[1].metrics["sync_version"] == 1.0
    # the served weights are the trained ones: importance weights stay ~1
    assert abs(results[1].metrics["is_ratio_min"] - 1.0) < 1e-3
    # the feature network did not move with the trained weights
    ref = build(cfg)[0]
    for (n, p), (_, q) in zip(stepper.feature_model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_streaming_scores_each_group_as_it_arrives(tiny_model_dir, tmp_path):
    """Per-prompt requests, and the same rewards as scoring the batch at once."""
    proc, url, record, _ = start_fake(tmp_path, "ok")
    try:
        out = {}
        for streaming in (False, True):
            cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / f"run{streaming}",
                                    max_steps=1, ebft={"adaptive_max_tokens": False},
                                    trl={"async_prefetch": True,
                                         "streaming_partial_batch": streaming})
            model, tok, dev, dt = build(cfg)
            stepper = StructuredStepper(cfg, model, tok, dev, dt)
            assert stepper.streaming is streaming
            start = len(records(record))
            out[streaming] = stepper.run_step(ROWS[:2], 1).metrics
            stepper.close()
            reqs = [r["body"] for r in records(record)[start:] if r["path"] == "/v1/completions"]
            assert [len(b["prompt"]) for b in reqs] == ([1, 1] if streaming else [2])
        for key in ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "loss"):
            assert abs(out[True][key] - out[False][key]) < 1e-5, key
    finally:
        stop_server(proc, grace_s=2)


def test_adaptive_max_tokens_and_client_side_truncation(tiny_model_dir, tmp_path):
    from ebft_engine.data import render_prompt_ids

    proc, url, record, _ = start_fake(tmp_path, "ok")
    try:
        cfg = structured_config(tiny_model_dir, port_of(url), tmp_path / "run",
                                ebft={"gt_length_multiplier": 1.5})
        model, tok, dev, dt = build(cfg)
        stepper = StructuredStepper(cfg, model, tok, dev, dt)
        long_prompt = "x" * 600  # longer than the server's max_model_len (512)
        rows = [{"prompt": "hi", "ground_truth": "five"},            # 4 tokens -> 6
                {"prompt": long_prompt, "ground_truth": "y" * 40}]    # capped at 12
        with pytest.warns(UserWarning, match="cut from the left"):
            stepper.run_step(rows, 1)
        stepper.close()
        bodies = [r["body"] for r in records(record) if r["path"] == "/v1/completions"]
        by_mt = {b["max_tokens"]: b["prompt"] for b in bodies}
        assert sorted(by_mt) == [6, 12]
        assert "truncate_prompt_tokens" not in bodies[0]
        cut = by_mt[12][0]
        full = render_prompt_ids(tok, long_prompt)
        assert len(cut) + 12 == 512 and cut == full[-len(cut):]
        assert by_mt[6][0] == render_prompt_ids(tok, "hi")
    finally:
        stop_server(proc, grace_s=2)
