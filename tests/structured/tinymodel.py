"""A tiny random Llama with a character-level tokenizer and a chat template, saved to a folder.

Small enough that a generation server starts in a few seconds on a CPU, real enough that every
code path (chat rendering, stop ids, peft adapters, safetensors reload) runs as with a real model.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
PAD, BOS, EOS_DOC, UNK, USER, ASSISTANT, END, SYSTEM = range(len(SPECIALS))
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 96 incl. space and \n
VOCAB_SIZE = len(SPECIALS) + len(CHARS)

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% else %}<|system|>{% endif %}{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(seed: int = 0, layers: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=BOS, eos_token_id=END, pad_token_id=PAD)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def save_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write model + tokenizer to `path` (created) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_model(seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def hf_logprobs(model, prompt, completion, temperature):
    """log p(completion_t | prompt, completion_<t) under softmax(logits / T), recomputed by HF."""
    import torch

    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    P = len(prompt)
    return [lp[P - 1 + t, tok].item() for t, tok in enumerate(completion)]


def with_random_lora(model, scale: float, seed: int = 0):
    """`model` wrapped in a rank-8 LoRA on q/v whose B matrices are random (not peft's zeros), so
    the adapter changes the outputs: what a LoRA sync must then reproduce on the server."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft_model


def structured_config(model_dir, port: int, run_dir, **over):
    """A structured-mode config for the tiny model against a server on 127.0.0.1:port."""
    from ebft_engine.config import load_config

    trl = {"num_generations": 4, "max_completion_length": 12, "temperature": 0.9,
           "vllm_server_port": int(port), "vllm_lora_sync": True, "vllm_server_timeout": 30}
    trl.update(over.pop("trl", {}))
    ebft = {"mode": "structured", "embed_method": "completion_mean",
            "feature_layers": [0.25, 0.5, 0.75]}
    ebft.update(over.pop("ebft", {}))
    raw = {"base_model": str(model_dir), "rl": "ebft", "device": "cpu", "ebft": ebft, "trl": trl,
           "datasets": [{"path": "unused.jsonl"}], "adapter": "lora", "lora_r": 8,
           "lora_alpha": 16, "lora_target_linear": True, "micro_batch_size": 4,
           "gradient_accumulation_steps": 2, "max_steps": 4, "output_dir": str(run_dir),
           "bf16": False, "sequence_len": 128, "learning_rate": 1e-3, "seed": 3}
    raw.update(over)
    return load_config(raw)


def build(cfg):
    from ebft_engine.modeling import build_model_and_tokenizer

    return build_model_and_tokenizer(cfg)
