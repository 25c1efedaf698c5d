"""Publishing the trainer's weights to the generation server.

LoRA (the default for EBFT): save the adapter only, under a new versioned name per sync, and ask
the server to load it; generation switches to the new name; versions that fell out of the
staleness window are unloaded, and their folders deleted one sync later (vLLM may still read a
folder right after an unload). Never merged into the base weights: the frozen feature network is
the base model with the adapter disabled, and a bf16 merge/unmerge would drift it.

    <sync_dir>/.tmp-v7  --save_pretrained-->  os.replace  -->  <sync_dir>/ebft-policy-v7
    POST /v1/load_lora_adapter {"lora_name": "ebft-policy-v7", "lora_path": ..., "load_inplace": false}
    POST /v1/unload_lora_adapter {"lora_name": "ebft-policy-v5"}      (keep = 2)

Full fine-tuning (or LoRA without `vllm_lora_sync`: then base + LoRA delta as a *copy*): save the
whole model (safetensors, HF names) to `<sync_dir>/step-N`, then
pause (drain) -> `POST /collective_rpc reload_weights {weights_path}` -> reset prefix cache ->
update weight version -> resume. The served name stays the base name; the version is tracked here.

Versions count optimizer updates: version 0 is the base model, version N holds N updates.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ebft_engine.rollout.client import GenerationClient, ServerError
from ebft_engine.rollout.protocol import BASE_MODEL_NAME, policy_name


def lora_sync_problems(model, max_lora_rank: int | None = None) -> list[str]:
    """Why this peft model cannot be served as a runtime LoRA adapter (empty = it can)."""
    problems = []
    configs = getattr(model, "peft_config", None)
    if not configs:
        return ["the model has no LoRA adapter (adapter: lora is needed for LoRA sync)"]
    if len(configs) != 1:
        problems.append(f"{len(configs)} adapters on the model; LoRA sync serves exactly one")
    for name, c in configs.items():
        if getattr(c, "use_dora", False):
            problems.append(f"adapter {name!r} uses DoRA, which vLLM cannot load at runtime")
        if getattr(c, "bias", "none") != "none":
            problems.append(f"adapter {name!r} trains biases (bias={c.bias!r}); use bias: none")
        if getattr(c, "modules_to_save", None):
            problems.append(f"adapter {name!r} has modules_to_save {c.modules_to_save}; "
                            "vLLM loads only LoRA weights")
        targets = getattr(c, "target_modules", None) or []
        if isinstance(targets, str):
            targets = [targets]
        bad = [t for t in targets if any(k in str(t) for k in ("lm_head", "embed_tokens"))]
        if bad:
            problems.append(f"adapter {name!r} targets {bad}; vLLM drops embedding/lm_head LoRA "
                            "deltas in some paths: keep to the decoder's linear layers")
        r = int(getattr(c, "r", 0) or 0)
        if max_lora_rank is not None and r > max_lora_rank:
            problems.append(f"adapter {name!r} has rank {r} > the server's max_lora_rank "
                            f"{max_lora_rank}")
    return problems


def _atomic_save(save, sync_dir: Path, tmp_name: str, final_name: str) -> Path:
    """Run `save(tmp_dir)` then move the folder that holds the files into place atomically."""
    sync_dir.mkdir(parents=True, exist_ok=True)
    sync_dir = sync_dir.resolve()  # the server checks an absolute path against its run dir
    tmp = sync_dir / tmp_name
    final = sync_dir / final_name
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    src = tmp
    if not any(tmp.glob("*.safetensors")) and not (tmp / "adapter_config.json").exists():
        subdirs = [d for d in tmp.iterdir() if d.is_dir()]  # peft saves non-default names in a subdir
        if len(subdirs) == 1:
            src = subdirs[0]
    if final.exists():  # re-publishing a version (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(src, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


class LoRASync:
    """Versioned adapter publishing. `current_name` is what new generation requests should use."""

    def __init__(self, client: GenerationClient, sync_dir: str | os.PathLike, keep: int = 2):
        self.client = client
        self.sync_dir = Path(sync_dir)
        self.keep = max(1, int(keep))
        self.current_name = BASE_MODEL_NAME
        self.version = 0
        self.loaded: list[tuple[str, Path]] = []
        self._delete_next: list[Path] = []
        self.last_save_s = 0.0
        self.last_load_s = 0.0

    def publish(self, model, version: int) -> str:
        """Save the active adapter of `model` as version `version` and switch to it."""
        name = policy_name(version)
        adapter = getattr(model, "active_adapter", "default")
        if isinstance(adapter, (list, tuple)):
            adapter = adapter[0]
        t0 = time.perf_counter()
        path = _atomic_save(
            lambda d: model.save_pretrained(str(d), selected_adapters=[adapter],
                                            safe_serialization=True),
            self.sync_dir, f".tmp-v{version}", name)
        t1 = time.perf_counter()
        if any(n == name for n, _ in self.loaded):  # same version again: replace it
            self.client.unload_lora(name)
            self.loaded = [(n, p) for n, p in self.loaded if n != name]
        try:
            self.client.load_lora(name, str(path))
        except ServerError as e:
            if "already been loaded" not in str(e):
                raise ServerError(
                    f"{e}\nLoRA sync needs a server with runtime LoRA: `vllm serve ... --enable-lora "
                    f"--max-lora-rank R` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (`ebft serve` adds "
                    f"both), and the adapter folder {path} readable by the server.") from e
            self.client.unload_lora(name)  # left over from an earlier run of this server
            self.client.load_lora(name, str(path))
        self.last_save_s, self.last_load_s = t1 - t0, time.perf_counter() - t1
        self.loaded.append((name, path))
        self.current_name, self.version = name, int(version)
        for old_dir in self._delete_next:  # unloaded one sync ago: no reader left
            shutil.rmtree(old_dir, ignore_errors=True)
        self._delete_next = []
        while len(self.loaded) > self.keep:
            old_name, old_dir = self.loaded.pop(0)
            try:
                self.client.unload_lora(old_name)
            except ServerError as e:
                if "cannot be found" not in str(e) and "does not exist" not in str(e):
                    raise
            self._delete_next.append(old_dir)
        return name

    def close(self, unload: bool = False) -> None:
        """Forget local folders; optionally unload our adapters (a server shared across runs)."""
        if unload:
            for name, _ in self.loaded:
                try:
                    self.client.unload_lora(name)
                except ServerError:
                    pass
        for d in self._delete_next:
            shutil.rmtree(d, ignore_errors=True)
        self._delete_next = []


def save_merged_copy(model, out_dir: str | os.PathLike) -> None:
    """A peft model's base weights plus its LoRA deltas, as new tensors under the plain HF names.

    The trainer's base weights are never touched (no merge_adapter): the frozen feature network
    is the base model with the adapter disabled."""
    import torch
    from safetensors.torch import save_file

    base = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
                continue
            names = [a for a in getattr(module, "active_adapters", [])
                     if a in getattr(module, "lora_A", {})]
            if names:
                deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in names)
        tensors = {}
        for key, value in base.state_dict().items():
            if "lora_" in key:
                continue
            t = value.detach()
            if key in deltas:
                t = t + deltas[key].to(t.dtype)
            tensors[key.replace(".base_layer.", ".")] = t.to("cpu").clone().contiguous()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out_dir) / "model.safetensors"))


class FullSync:
    """Full-weight publishing through a safetensors folder and the server's reload_weights."""

    def __init__(self, client: GenerationClient, sync_dir: str | os.PathLike, keep: int = 1):
        self.client = client
        self.sync_dir = Path(sync_dir)
        self.keep = max(1, int(keep))
        self.current_name = BASE_MODEL_NAME
        self.version = 0
        self.published: list[Path] = []
        self.last_save_s = 0.0
        self.last_load_s = 0.0

    def publish(self, model, version: int) -> str:
        t0 = time.perf_counter()
        if hasattr(model, "peft_config"):  # LoRA without vllm_lora_sync: a merged copy
            def save(d):
                save_merged_copy(model, d)
        else:
            def save(d):
                model.save_pretrained(str(d), safe_serialization=True)
        path = _atomic_save(save, self.sync_dir, f".tmp-step-{version}", f"step-{version}")
        t1 = time.perf_counter()
        self.client.pause("wait")  # drain: every completion comes from a single policy
        try:
            self.client.reload_weights(str(path))
            self.client.reset_prefix_cache()
            self.client.update_weight_version(f"step-{version}")
        finally:
            self.client.resume()
        self.last_save_s, self.last_load_s = t1 - t0, time.perf_counter() - t1
        self.published.append(path)
        while len(self.published) > self.keep:
            shutil.rmtree(self.published.pop(0), ignore_errors=True)
        self.version = int(version)
        return self.current_name

    def close(self, unload: bool = False) -> None:
        pass
