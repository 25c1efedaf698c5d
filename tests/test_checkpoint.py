"""Atomic checkpoints: what they hold, what readers ignore, pruning, and reloading the weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tiny_models import make_tiny_llama
from ebft_engine.checkpoint import (capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint,
                                    load_weights, restore_rng, save_checkpoint)
from ebft_engine.modeling import apply_lora
from ebft_engine.train import save_final

IDS = torch.tensor([[5, 9, 13, 2, 40, 41, 7, 3]])


def lora_model(seed=0):
    model = apply_lora(make_tiny_llama(seed=seed), r=4, alpha=8)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def parts(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model(input_ids=IDS).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def save(run_dir, step, model, optimizer, scheduler, limit=None):
    return save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           rng_state=capture_rng(), data_state={"epoch": 1, "position": 3, "seed": 7, "n_rows": 10},
                           config_yaml="max_steps: 8\n", save_total_limit=limit)


def test_checkpoint_contents_and_a_peft_reload_with_identical_outputs(tmp_path):
    model = lora_model()
    optimizer, scheduler = parts(model)
    path = save(tmp_path, 12, model, optimizer, scheduler)
    assert path == tmp_path / "checkpoints" / "step-000012"
    names = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "config.yaml"} <= names
    assert not any(n.startswith("model") for n in names)  # the adapter only, not the base weights
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 12 and state["data"]["position"] == 3
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert (path / "config.yaml").read_text() == "max_steps: 8\n"

    from peft import PeftModel

    model.eval()
    reloaded = PeftModel.from_pretrained(make_tiny_llama(seed=0), path).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reloaded(input_ids=IDS).logits)


def test_load_checkpoint_restores_weights_optimizer_and_scheduler(tmp_path):
    model = lora_model()
    optimizer, scheduler = parts(model)
    save(tmp_path, 3, model, optimizer, scheduler)

    fresh = apply_lora(make_tiny_llama(seed=0), r=4, alpha=8)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (1 + s))
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt, fresh_sched)
    assert state["step"] == 3
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    assert fresh_sched.last_epoch == scheduler.last_epoch and fresh_sched.get_last_lr() == scheduler.get_last_lr()
    sa, sb = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])


def test_full_weights_without_an_adapter_round_trip(tmp_path):
    model = make_tiny_llama(seed=0)
    optimizer, scheduler = parts(model)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    assert not (path / "adapter_config.json").exists() and list(path.glob("*.safetensors"))
    other = make_tiny_llama(seed=5)
    load_weights(other, path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, other(input_ids=IDS).logits)


def test_leftover_tmp_and_incomplete_folders_are_ignored_then_cleaned(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    model = lora_model()
    optimizer, scheduler = parts(model)
    save(tmp_path, 2, model, optimizer, scheduler)
    (ckpts / ".tmp-step-000004-999").mkdir()  # a save that was killed half-way
    (ckpts / ".tmp-step-000004-999" / "trainer_state.pt").write_bytes(b"partial")
    (ckpts / "step-000006").mkdir()  # no trainer_state.pt: not a checkpoint
    (ckpts / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == ckpts / "step-000002"
    save(tmp_path, 8, model, optimizer, scheduler)
    assert not (ckpts / ".tmp-step-000004-999").exists()
    assert latest_checkpoint(tmp_path) == ckpts / "step-000008"


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoints_intact(tmp_path):
    model = lora_model()
    optimizer, scheduler = parts(model)
    save(tmp_path, 2, model, optimizer, scheduler)

    class Broken(torch.nn.Module):
        def save_pretrained(self, folder):
            (folder / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        save(tmp_path, 4, Broken(), optimizer, scheduler)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    assert not (tmp_path / "checkpoints" / "step-000004").exists()


def test_save_total_limit_keeps_the_newest(tmp_path):
    model = lora_model()
    optimizer, scheduler = parts(model)
    for step in (1, 2, 3, 10, 11):
        save(tmp_path, step, model, optimizer, scheduler, limit=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000010", "step-000011"]
    save(tmp_path, 11, model, optimizer, scheduler, limit=3)  # the same step again replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000010", "step-000011"]


def test_rng_capture_and_restore_round_trip():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_final_adapter_is_peft_reloadable_with_its_tokenizer(tmp_path):
    from peft import PeftModel

    model = lora_model()
    final = save_final(tmp_path, model, None)
    assert final == tmp_path / "adapter" and (final / "adapter_config.json").is_file()
    model.eval()
    reloaded = PeftModel.from_pretrained(make_tiny_llama(seed=0), final).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reloaded(input_ids=IDS).logits)
    assert save_final(tmp_path, make_tiny_llama(), None) == tmp_path / "model"  # full fine-tune


def test_the_manifest_lists_every_other_file_with_its_size_and_sha256(tmp_path):
    import hashlib
    import json

    model = lora_model()
    optimizer, scheduler = parts(model)
    path = save(tmp_path, 3, model, optimizer, scheduler)
    entries = json.loads((path / "manifest.json").read_text())["files"]
    others = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(entries) == others and "trainer_state.pt" in entries
    for name, entry in entries.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_damaged_latest_checkpoint_is_named_skipped_and_set_aside(tmp_path):
    from ebft_engine.checkpoint import find_resumable

    model = lora_model()
    optimizer, scheduler = parts(model)
    for step in (2, 4, 6, 8):
        save(tmp_path, step, model, optimizer, scheduler)
    ckpts = tmp_path / "checkpoints"
    weights = ckpts / "step-000008" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated (a copy cut short)
    state = ckpts / "step-000006" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    state.write_bytes(bytes(data))
    (ckpts / "step-000004" / "config.yaml").unlink()

    found, warnings = find_resumable(tmp_path)
    assert found == ckpts / "step-000002"
    assert len(warnings) == 3
    assert "step-000008" in warnings[0] and "adapter_model.safetensors has 100 bytes" in warnings[0]
    assert "step-000006" in warnings[1] and "trainer_state.pt does not match its sha256" in warnings[1]
    assert "step-000004" in warnings[2] and "config.yaml is missing" in warnings[2]
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "damaged-step-000004", "damaged-step-000006", "damaged-step-000008", "step-000002"]
    assert find_resumable(tmp_path) == (ckpts / "step-000002", [])  # verified once, not again


def test_a_checkpoint_from_before_manifests_is_used_with_a_warning(tmp_path):
    from ebft_engine.checkpoint import find_resumable

    model = lora_model()
    optimizer, scheduler = parts(model)
    path = save(tmp_path, 2, model, optimizer, scheduler)
    (path / "manifest.json").unlink()
    found, warnings = find_resumable(tmp_path)
    assert found == path and "no manifest.json" in warnings[0] and "without verifying" in warnings[0]
