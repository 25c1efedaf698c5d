"""The config schema: every key of the spec's EBFT YAML, its default and its rules, in one place.

A config is the YAML the spec's examples write (`base_model`, `rl: ebft`, `ebft:`, `trl:`, `vllm:`,
`datasets:` ...), axolotl's published EBFT configs included (decisions.md §2). Attribute names are
the YAML keys: `cfg.ebft.stride`, `cfg.trl.num_generations`, `cfg.micro_batch_size`,
`cfg.vllm.backend`, `cfg.datasets[0].path`.

    cfg = load_config("presets/smollm2-135m-strided-cpu.yaml", ["ebft.diversity_coef=0.5"])

`load_config` checks everything before any model or dataset is loaded, without torch or the network,
and reports every problem at once (decisions.md §3) as a `ConfigError` whose `.problems` each name
their key and say what to do. A key this schema does not model is settled by its row of the axolotl
table (`compat.py`, `axolotl_keys.yaml`): mapped keys move to the key they mean (`bfloat16: true` ->
`bf16: true`), inert ones (`ddp`, `vllm.serve_module`, ...) only warn, refused ones are problems;
a key in neither suggests the closest known one. An empty value means "unset". Warnings (ignored
keys, automatic fallbacks, keys without effect in the chosen mode) land on `cfg.warnings`.

Resolution done here, so every consumer sees one meaning:
- `attn_implementation: flex_attention` sets `flex_attention: true`;
- strided `n_samples_per_prompt: 1` switches `advantage_estimator` to `reinforce` and
  `diversity_coef` to 0 (with a warning);
- `trl.use_vllm: false` selects `vllm.backend: hf`;
- `adapter: lora` with no target keys sets `lora_target_linear: true`;
- an unset `output_dir` becomes `./outputs/ebft-<model>-<mode>`;
- axolotl's `batch_size`, `saves_per_epoch`, `evals_per_epoch` become gradient_accumulation_steps,
  save_steps and eval_steps (fractions of the run), as axolotl computes them, and are cleared;
- `save_strategy: steps` / `eval_strategy: steps` without an interval take transformers' defaults.
`bf16: auto` stays "auto" (the modeling code resolves it per device), and
`cfg.vllm.effective_executable()` applies the EBFT_VLLM_EXECUTABLE override at launch time.

This module imports only pydantic, yaml and the standard library.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from ebft_engine.compat import KeyRow, load_table
from ebft_engine.yaml_input import YamlInputError, bool_for_number, load_yaml, read_text

LOOPBACK = "127.0.0.1"
WORLD_SIZE = 1  # one trainer process; data-parallel training is not implemented

# --------------------------------------------------------------------------------------------------
# Problems


@dataclass
class Problem:
    """One thing wrong with a config: the dotted key it is about and a paragraph saying what to do."""

    key: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "message": self.message}


class ConfigError(Exception):
    """A config that cannot run; `.problems` lists every problem found (all at once)."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        where = f"{self.source}: " if self.source else ""
        head = f"{where}{n} problem{'s' if n != 1 else ''} in the config:"
        return "\n\n".join([head, *(p.message for p in self.problems)])


# --------------------------------------------------------------------------------------------------
# Schema


def _f(default: Any = None, description: str = "", *, section: str | None = None,
       mode: str | None = None, factory: Any = None, **constraints: Any) -> Any:
    """A Field with its description and the TUI metadata (`section`, the `mode` it applies to)."""
    extra = {k: v for k, v in (("section", section), ("mode", mode)) if v is not None}
    kwargs: dict[str, Any] = dict(description=description, json_schema_extra=extra or None, **constraints)
    if factory is not None:
        return Field(default_factory=factory, **kwargs)
    return Field(default, **kwargs)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic would take `true` (and YAML's `yes`/`on`) as 1 where a number is expected."""
        if info.field_name and bool_for_number(cls.model_fields[info.field_name].annotation, value):
            raise ValueError("a true/false value where a number is expected")
        return value


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class EbftSection(_Section):
    """`ebft:` — the spec's "Common Parameters" and "Strided Mode Parameters" tables, plus our extra."""

    mode: Literal["structured", "strided"] = _f(
        "structured", "EBFT operating mode: structured (prompt/completion data, a generation server) "
        "or strided (anchors inside documents, one device, no server)")
    feature_layers: list[Fraction] = _f(
        None, "Fractional layer depths for feature extraction (0.25 = a quarter of the way up); the "
        "selected layers' hidden states are concatenated", factory=lambda: [0.25, 0.5, 0.75], min_length=1)
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = _f(
        "last_token", "Pooling of per-token hidden states into one vector per sequence: last_token, "
        "mean_pooling, completion_mean (completion tokens only) or concat (states at 25/50/75% positions)")
    use_whitening: bool = _f(False, "Apply SVD whitening to feature embeddings before reward computation")
    alignment_coef: float = _f(1.0, "Weight for alignment reward (cosine similarity with ground truth)")
    diversity_coef: float = _f(1.0, "Weight for diversity penalty (pairwise dot product between samples)")
    ce_coef: float = _f(0.0, "Cross-entropy loss coefficient on ground-truth tokens")
    adaptive_max_tokens: bool = _f(
        True, "Dynamically set the generation max_tokens from the ground-truth length (structured mode)",
        mode="structured")
    gt_length_multiplier: float = _f(
        1.5, "Multiplier for ground-truth token count when computing adaptive max tokens (min 0.1)",
        mode="structured", ge=0.1)
    stride: int = _f(8, "Number of tokens between anchor points (must be >= 1)", mode="strided", ge=1)
    context_length: int = _f(
        8, "Context for each generated block (must be >= 1): the prefix the first anchor needs; every "
        "block attends to the whole document before its anchor unless sliding_context_window is on",
        mode="strided", ge=1)
    generate_max_len: int = _f(8, "Number of tokens to generate per block (must be >= 1)", mode="strided", ge=1)
    n_samples_per_prompt: int = _f(
        4, "Number of independent rollouts per document (must be >= 1; 1 switches to reinforce without "
        "diversity penalty)", mode="strided", ge=1)
    temperature: float = _f(0.6, "Sampling temperature for strided generation", mode="strided", gt=0)
    top_p: float = _f(1.0, "Top-p nucleus sampling threshold", mode="strided", gt=0, le=1)
    rl_coef: float = _f(1.0, "RL policy gradient loss coefficient", mode="strided")
    advantage_estimator: Literal["rloo", "group_norm", "reinforce"] = _f(
        "rloo", "Advantage estimation method: rloo (leave-one-out baseline), group_norm or reinforce",
        mode="strided")
    min_completion_prefix: int = _f(
        0, "Minimum tokens into the completion span before placing anchors", mode="strided", ge=0)
    sliding_context_window: bool = _f(
        False, "ebft extra (decisions.md §5): limit each block's view of the document to the "
        "context_length tokens before its anchor instead of the whole prefix (the paper's behaviour)",
        mode="strided")


class GenerationKwargs(_Section):
    stop_token_ids: list[int] | None = _f(
        None, "Token ids that end a generation (unset: the tokenizer's end-of-sequence tokens)")


class TrlSection(_Section):
    """`trl:` — the spec's "Structured Mode TRL Parameters" table and the common extras of §2."""

    num_generations: int | None = _f(None, "Number of completions generated per prompt (required in "
                                     "structured mode)", ge=1)
    max_completion_length: int | None = _f(None, "Maximum tokens per generated completion (required in "
                                           "structured mode)", ge=1)
    temperature: float = _f(0.7, "Sampling temperature for generation", gt=0)
    top_p: float = _f(1.0, "Top-p nucleus sampling threshold", gt=0, le=1)
    top_k: int | None = _f(None, "Top-k sampling (unset, 0 or -1: off)", ge=-1)
    min_p: float | None = _f(None, "Min-p sampling threshold (unset: off)", ge=0, le=1)
    use_vllm: bool | None = _f(None, "Generate with vLLM; false selects our transformers server "
                               "(vllm.backend: hf)")
    vllm_server_host: str | None = _f(
        None, "Address the generation server listens on (unset: 127.0.0.1; the trainer always "
        "connects through loopback)")
    vllm_server_port: int = _f(8000, "Port of the generation server (0: pick a free port)", ge=0, le=65535)
    vllm_server_timeout: int = _f(600, "Seconds to wait for the generation server to become ready", gt=0)
    vllm_lora_sync: bool = _f(False, "Sync LoRA adapters via filesystem (recommended)")
    vllm_sync_interval: int = _f(1, "Steps between weight syncs to the generation server", ge=1)
    use_data_producer: bool | None = _f(None, "Required for sync mode with LoRA sync")
    async_prefetch: bool = _f(False, "Enable async generation (overlaps with training)")
    streaming_partial_batch: bool = _f(False, "Score groups incrementally (async mode)")
    skip_zero_advantage_batches: bool = _f(False, "Skip micro-batches where all advantages are zero")
    scale_rewards: bool | Literal["group", "batch", "none"] = _f(
        True, "Normalize rewards within each prompt group: true/group (group std), batch (batch std), "
        "false/none (mean only)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = _f(
        "grpo", "Loss type for policy optimization: grpo (token mean per sequence), bnpo (token mean "
        "over the batch), dr_grpo (token sum / (batch x max_completion_length))")
    epsilon: float = _f(0.2, "Clipping parameter for importance sampling", gt=0)
    epsilon_high: float | None = _f(None, "Upper clipping parameter (unset: epsilon)", gt=0)
    importance_sampling_cap: float = _f(
        3.0, "Cap of the per-token importance weight between trainer and server log-probs "
        "(the weight is clamped to [1/cap, cap])", ge=1)
    generation_kwargs: GenerationKwargs = _f(None, "Extra sampling settings", factory=GenerationKwargs)
    chat_template_kwargs: dict[str, Any] = _f(
        None, "Arguments for the chat template, e.g. {enable_thinking: false} for Qwen3 / Qwen3.5",
        factory=dict)


class VllmSection(_Section):
    """`vllm:` — the generation server."""

    gpu_memory_utilization: float = _f(0.9, "Fraction of GPU memory the vLLM server may use", gt=0, le=1)
    max_model_len: int | None = _f(None, "Longest prompt + completion the server accepts (unset: "
                                   "sequence_len + max_completion_length)", ge=1)
    enforce_eager: bool = _f(False, "Disable CUDA graphs in vLLM")
    tensor_parallel_size: int = _f(1, "GPUs the vLLM server shards the model over", ge=1)
    backend: Literal["vllm", "hf"] = _f(
        "vllm", "Generation server: vllm (`vllm serve`, GPU) or hf (our transformers server, any device)")
    executable: str | None = _f(
        None, "Path of the `vllm` binary of a separate environment (env EBFT_VLLM_EXECUTABLE overrides; "
        "unset: `vllm` on PATH)")
    extra_args: list[str] = _f(None, "Extra command-line arguments for `vllm serve`", factory=list)
    max_n_per_request: int = _f(
        64, "Our hf server: most samples of one prompt a request may ask for (n; at least "
        "trl.num_generations)", ge=1)
    max_prompts_per_request: int = _f(
        256, "Our hf server: most prompts in one request (at least two steps' prompts: async "
        "prefetch asks for two at the start)", ge=1)
    max_tokens_per_request: int | None = _f(
        None, "Our hf server: most tokens one sample may generate (unset: "
        "trl.max_completion_length)", ge=1)
    max_request_mb: float = _f(32.0, "Our hf server: largest request body it reads, in MiB", gt=0)

    def effective_executable(self) -> str:
        """The `vllm` binary to launch: $EBFT_VLLM_EXECUTABLE, else `executable`, else `vllm`."""
        return os.environ.get("EBFT_VLLM_EXECUTABLE") or self.executable or "vllm"


class DatasetConfig(_Section):
    """One entry of `datasets:` / `test_datasets:`."""

    path: str = _f("", "Hub id, local file or folder, or builtin:NAME")
    type: str | None = _f(None, "Transform, e.g. ebft_opencode.transform or my_module.transform")
    split: str = _f("train", "Split, with an optional slice: train, train[:500], train[:1%]")
    name: str | None = _f(None, "Dataset configuration name (hub datasets with several)")
    data_files: str | list[str] | None = _f(None, "Files to load from path")
    ds_type: str | None = _f(None, "File format when it cannot be guessed: json, jsonl, parquet, csv")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit)")


class GradientCheckpointingKwargs(_Section):
    use_reentrant: bool = _f(True, "Reentrant checkpointing; must stay true with flex_attention")


BEST_METRICS = {"loss": "eval/ce_loss", "ce_loss": "eval/ce_loss", "cfm_loss": "eval/cfm_loss",
                "alignment": "eval/alignment", "pass@1": "eval/pass@1"}
"""metric_for_best_model names (with or without transformers' `eval_` prefix) -> eval record keys."""
HIGHER_IS_BETTER = {"eval/alignment", "eval/pass@1"}
DEFAULT_SAVE_STEPS = 500
"""save_steps when `save_strategy: steps` leaves it unset (the transformers default)."""


def best_metric_key(name: str) -> str | None:
    """`eval_loss` -> `eval/ce_loss`; None for a name no eval record carries."""
    bare = name.strip()
    for prefix in ("eval/", "eval_"):
        bare = bare.removeprefix(prefix)
    return BEST_METRICS.get(bare)


Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw", "sgd"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]


class EbftConfig(_Section):
    """A whole EBFT config. Field order is the order `to_yaml` writes."""

    base_model: str = _f("", "Model: hub id, local folder, GGUF file or builtin:NAME", section="model")
    rl: str | None = _f(None, "Training method; must be ebft", section="model")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Trainer device (auto: cuda when available)",
                                               section="model")
    ebft: EbftSection = _f(None, "EBFT settings", factory=EbftSection)
    trl: TrlSection = _f(None, "Structured-mode generation and GRPO settings", mode="structured",
                         factory=TrlSection)
    vllm: VllmSection = _f(None, "Generation server settings", mode="structured", factory=VllmSection)

    datasets: list[DatasetConfig] = _f(None, "Training datasets (at least one)", section="data", factory=list)
    test_datasets: list[DatasetConfig] | None = _f(None, "Held-out datasets for evaluation", section="data")
    val_set_size: float = _f(0.0, "Held-out part of the training data: a fraction < 1 or a row count",
                             section="data", ge=0)
    dataset_prepared_path: str | None = _f(
        None, "Folder caching the transformed, tokenized rows, reused while nothing that produced them "
        "changes (unset: no cache)", section="data")
    chat_template: str | None = _f(None, "Chat template: chatml, jinja (the text of chat_template_jinja), "
                                   "Jinja text itself, or unset / tokenizer_default (the tokenizer's)",
                                   section="data")
    chat_template_jinja: str | None = _f(None, "Jinja chat template text, used with `chat_template: jinja`",
                                         section="data")
    special_tokens: dict[str, str | list[str]] = _f(
        None, "Special tokens to set, e.g. {pad_token: '<|endoftext|>'} (additional_special_tokens: a list)",
        section="data", factory=dict)

    adapter: Literal["lora"] | None = _f(None, "lora, or unset for full fine-tuning", section="lora")
    lora_r: int = _f(16, "LoRA rank", section="lora", ge=1)
    lora_alpha: int = _f(32, "LoRA alpha (scaling = alpha / r)", section="lora", ge=1)
    lora_dropout: float = _f(0.0, "LoRA dropout", section="lora", ge=0, lt=1)
    lora_target_linear: bool = _f(False, "Target every linear layer (except lm_head)", section="lora")
    lora_target_modules: list[str] | str | None = _f(
        None, "Module names to target, or one regex string matched against full module names",
        section="lora")

    sequence_len: int = _f(1024, "Maximum tokens per training sequence", section="training", ge=8)
    micro_batch_size: int = _f(1, "Sequences per forward/backward pass (structured: completions)",
                               section="training", ge=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step", section="training", ge=1)
    num_epochs: float = _f(1.0, "Passes over the training data (when max_steps is unset)",
                           section="training", gt=0)
    max_steps: int | None = _f(None, "Optimizer steps to run (unset: from num_epochs)", section="training", ge=1)
    batch_size: int | None = _f(None, "Sequences per optimizer step; sets gradient_accumulation_steps to "
                                "batch_size / micro_batch_size (as axolotl does)", section="training", ge=1)
    learning_rate: float = _f(1.0e-5, "Peak learning rate", section="training", gt=0)
    optimizer: Optimizer = _f("adamw_torch", "Optimizer", section="training")
    lr_scheduler: Scheduler = _f("cosine", "Learning-rate schedule after warmup", section="training")
    warmup_steps: int | None = _f(None, "Warmup steps (or set warmup_ratio)", section="training", ge=0)
    warmup_ratio: float | None = _f(None, "Warmup as a fraction of all steps (or set warmup_steps)",
                                    section="training", ge=0, lt=1)
    weight_decay: float = _f(0.0, "Weight decay", section="training", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1: decay of the running mean of gradients", section="training",
                           ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2: decay of the running mean of squared gradients",
                           section="training", ge=0, lt=1)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon: added to the denominator for numerical stability",
                             section="training", gt=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off)", section="training", ge=0)
    seed: int = _f(42, "Random seed", section="training")

    bf16: bool | Literal["auto"] = _f("auto", "bf16 weights/compute: true, false or auto (bf16 where "
                                      "the device supports it, else fp32)", section="performance")
    fp16: bool = _f(False, "fp16 compute", section="performance")
    tf32: bool | Literal["auto"] = _f(False, "Allow TF32 matmuls on Ampere+ GPUs (auto: where supported)",
                                      section="performance")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = _f(
        None, "dtype to load the model in (unset: from bf16/fp16)", section="performance")
    flash_attention: bool = _f(False, "Use flash-attn (falls back to SDPA with a warning when missing)",
                               section="performance")
    flex_attention: bool = _f(False, "Use flex_attention (strided mode: fused block-parallel mask "
                              "kernels; otherwise a dense mask)", section="performance")
    attn_implementation: str | None = _f(
        None, "transformers attention implementation (flex_attention here means flex_attention: true)",
        section="performance")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory",
                                      section="performance")
    gradient_checkpointing_kwargs: GradientCheckpointingKwargs = _f(
        None, "Gradient checkpointing options", section="performance", factory=GradientCheckpointingKwargs)
    torch_compile: bool = _f(False, "torch.compile the model (not with strided flex_attention)",
                             section="performance")
    activation_offloading: bool = _f(False, "Offload activations to CPU (not with flex_attention)",
                                     section="performance")

    output_dir: str = _f("", "Where checkpoints, the adapter and logs go (unset: "
                         "./outputs/ebft-<model>-<mode>)", section="output")
    logging_steps: int = _f(1, "Steps between metric log lines", section="output", ge=1)
    save_steps: int | float | None = _f(
        None, "Steps between checkpoints, or a fraction < 1 of all steps (unset: at the end only)",
        section="output", gt=0)
    save_strategy: Literal["no", "steps", "epoch", "best"] | None = _f(
        None, "When to save checkpoints: steps (every save_steps), epoch, or no (only the final "
        "adapter); unset: steps when save_steps is set, else at the end", section="output")
    saves_per_epoch: int | None = _f(None, "Checkpoints per epoch (sets save_steps to a fraction of "
                                     "the run, as axolotl does)", section="output", ge=1)
    save_first_step: bool = _f(False, "Also save a checkpoint after the first step", section="output")
    save_total_limit: int | None = _f(None, "Checkpoints to keep (unset: all)", section="output", ge=1)
    resume_from_checkpoint: str | None = _f(
        None, "An ebft checkpoint folder (RUN_DIR/checkpoints/step-N) to continue from", section="output")
    auto_resume_from_checkpoints: bool | None = _f(
        None, "Continue a run dir's latest checkpoint (unset or true); false starts over and refuses a "
        "run dir that already holds a run", section="output")

    eval_steps: int | float | None = _f(
        None, "Steps between evals on the held-out rows during training, or a fraction < 1 of all "
        "steps; one also runs at the start", section="eval", gt=0)
    eval_strategy: Literal["no", "steps", "epoch"] | None = _f(
        None, "When to evaluate during training: steps (every eval_steps), epoch or no; unset: steps "
        "when eval_steps is set", section="eval")
    evals_per_epoch: int | None = _f(None, "Evals per epoch (sets eval_steps to a fraction of the run, "
                                     "as axolotl does)", section="eval", ge=1)
    eval_max_rows: int = _f(32, "Held-out rows each eval during training reads (the first N): CE and "
                            "CFM cost one generation per sample of each", section="eval", ge=1)
    eval_pass_at_1: bool = _f(False, "Also measure pass@1 (sandboxed) in the evals during training; "
                              "needs test_datasets rows with tests", section="eval")
    early_stopping_patience: int | None = _f(
        None, "Stop after this many evals in a row without improving metric_for_best_model",
        section="eval", ge=1)
    metric_for_best_model: str | None = _f(
        None, "The eval number early stopping watches: eval_loss (validation CE, the default), "
        "cfm_loss, alignment or pass@1", section="eval")
    greater_is_better: bool | None = _f(
        None, "Whether a larger metric_for_best_model is better (unset: from the metric)", section="eval")

    wandb_project: str | None = _f(None, "wandb project (logs to wandb when set and wandb is installed)",
                                   section="logging")
    wandb_entity: str | None = _f(None, "wandb entity", section="logging")
    wandb_name: str | None = _f(None, "wandb run name", section="logging")
    wandb_run_id: str | None = _f(None, "wandb run id (to resume a wandb run)", section="logging")
    wandb_mode: Literal["online", "offline", "disabled"] | None = _f(None, "wandb mode", section="logging")

    @field_validator("save_strategy", "eval_strategy", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        """YAML reads an unquoted `no` as false; `save_strategy: no` means the strategy "no"."""
        return "no" if value is False else value

    _warnings: list[str] = PrivateAttr(default_factory=list)
    _source: str | None = PrivateAttr(default=None)

    # -- derived -----------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The EBFT mode: "strided" or "structured"."""
        return self.ebft.mode

    @property
    def is_async(self) -> bool:
        """Structured mode with `trl.async_prefetch: true`."""
        return self.mode == "structured" and self.trl.async_prefetch

    @property
    def world_size(self) -> int:
        """Data-parallel trainer processes (always 1)."""
        return WORLD_SIZE

    @property
    def evaluates_during_training(self) -> bool:
        """Held-out evals run inside training (eval_steps, or eval_strategy steps/epoch)."""
        if self.eval_strategy == "no":
            return False
        return self.eval_steps is not None or self.eval_strategy in ("steps", "epoch")

    @property
    def best_metric(self) -> tuple[str, bool]:
        """(eval record key, greater is better) that early stopping watches: metric_for_best_model
        (default: validation CE, as transformers' eval_loss), direction from greater_is_better or
        from the metric."""
        key = best_metric_key(self.metric_for_best_model or "eval_loss") or "eval/ce_loss"
        greater = self.greater_is_better
        return key, (key in HIGHER_IS_BETTER) if greater is None else greater

    @property
    def server_host(self) -> str:
        """The address the generation server listens on (decisions.md §12: 127.0.0.1 unless set)."""
        return self.trl.vllm_server_host or LOOPBACK

    @property
    def client_host(self) -> str:
        """The address the trainer connects to: loopback when the server listens on every interface."""
        host = self.server_host
        return LOOPBACK if host in ("0.0.0.0", "::", "[::]") else host

    @property
    def warnings(self) -> list[str]:
        """Warnings found while loading (ignored keys, automatic fallbacks, keys without effect)."""
        return self._warnings

    @property
    def source(self) -> str | None:
        """The file the config came from (None for a dict)."""
        return self._source

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (every key, defaults filled in)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved config as YAML; `load_config` of it gives the same config back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100,
                              allow_unicode=True)


# --------------------------------------------------------------------------------------------------
# Keys the schema does not model: axolotl's, classified in ebft_engine/axolotl_keys.yaml (compat.py).
# Path patterns use `[]` for list items.

AXOLOTL_KEYS = load_table()

_UNSET = object()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _pattern(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(annotation without None, nullable)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(get_args(annotation))
        if len(args) == 1:
            return args[0], nullable
        return Union[tuple(args)], nullable
    return annotation, False


def _submodel(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(model, is_list) when a field holds a section or a list of sections."""
    ann, _ = _unwrap(annotation)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    if get_origin(ann) is list:
        (item,) = get_args(ann) or (None,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def _levels() -> dict[str, type[BaseModel]]:
    """Every section of the schema by path pattern ("" is the top level)."""
    out: dict[str, type[BaseModel]] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        out[path] = model
        for name, info in model.model_fields.items():
            sub, is_list = _submodel(info.annotation)
            if sub is not None:
                visit(sub, _join(path, name) + ("[]" if is_list else ""))

    visit(EbftConfig, "")
    return out


_LEVELS = _levels()


def schema_descriptions() -> dict[str, str]:
    """Every key of the schema (`trl.temperature`, `datasets[].split`) -> its description."""
    out: dict[str, str] = {}
    for pattern, model in _LEVELS.items():
        for name, info in model.model_fields.items():
            if _submodel(info.annotation)[0] is None:
                out[_join(pattern, name)] = info.description or ""
    return out


# --------------------------------------------------------------------------------------------------
# Overrides


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_][A-Za-z0-9_\-]*)*$")


def _parse_value(text: str) -> Any:
    if text.strip() == "":
        return None
    try:
        return load_yaml(text, "an override")
    except (yaml.YAMLError, YamlInputError):
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["ebft.diversity_coef=0.5", "max_steps=3"]` -> `{"ebft": {"diversity_coef": 0.5}, "max_steps": 3}`.

    Values are read with yaml.safe_load (so `1e-5` and `[0.25, 0.5]` work; the schema types them
    later); an empty value means unset; a numeric part addresses a list item (`datasets.0.split=test`).
    A malformed item raises ConfigError naming it.
    """
    out, problems = _parse_override_items(items)
    if problems:
        raise ConfigError(problems)
    return out


def _parse_override_items(items: Sequence[str]) -> tuple[dict[str, Any], list[Problem]]:
    out: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not _OVERRIDE_KEY.match(key):
            problems.append(Problem(key or str(item), (
                f"The override `{item}` is not of the form key=value with a dotted key, e.g. "
                "`ebft.diversity_coef=0.5` or `max_steps=3`. Write it that way (an empty value, "
                "`wandb_run_id=`, unsets a key).")))
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_value(text)
    return out, problems


def _merge(base: dict[str, Any], extra: dict[str, Any], path: str, problems: list[Problem]) -> dict[str, Any]:
    """`extra` merged into a copy of `base`; digit keys of `extra` address items of a list in `base`."""
    out = dict(base)
    for key, value in extra.items():
        cur = out.get(key, _UNSET)
        full = _join(path, key)
        if isinstance(value, dict) and isinstance(cur, dict):
            out[key] = _merge(cur, value, full, problems)
        elif (isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
              and (isinstance(cur, list) or cur is _UNSET)):
            items = list(cur) if isinstance(cur, list) else []
            for idx_text, item_value in sorted(value.items(), key=lambda kv: int(kv[0])):
                idx = int(idx_text)
                item_path = f"{full}[{idx}]"
                if idx < len(items) and isinstance(items[idx], dict) and isinstance(item_value, dict):
                    items[idx] = _merge(items[idx], item_value, item_path, problems)
                elif idx < len(items):
                    items[idx] = item_value
                elif idx == len(items):
                    items.append(item_value)
                else:
                    problems.append(Problem(item_path, (
                        f"`{full}.{idx}` addresses item {idx} of `{full}`, which has {len(items)} "
                        f"item(s). Use an index from 0 to {len(items)} ({len(items)} appends one).")))
            out[key] = items
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------------
# Loading


def _read_source(source: str | Path | dict) -> tuple[dict[str, Any], str | None]:
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    path = Path(source)
    name = str(source)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ConfigError([Problem("config", f"{name}: no such file. Give the path of a YAML config "
                                             "(or a preset name to `ebft`, e.g. `ebft ls`).")], name) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([Problem("config", f"{name}: cannot be read ({error}).")], name) from None
    except YamlInputError as error:
        raise ConfigError([Problem("config", f"{name}: {error}")], name) from None
    try:
        data = load_yaml(text, name)
    except YamlInputError as error:
        raise ConfigError([Problem("config", f"{name}: {error}")], name) from None
    except yaml.YAMLError as error:
        where = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        what = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError([Problem("config", f"{name}: not valid YAML{where}: {what}. Fix the syntax "
                                             "(indentation, a missing colon or quote).")], name) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", f"{name}: the file holds a {type(data).__name__}, not a "
                                             "mapping of keys (`base_model: ...`, `rl: ebft`, ...).")], name)
    return data, name


def _drop_unset(value: Any) -> Any:
    """Remove keys whose value is empty (`wandb_run_id:`): unset means default."""
    if isinstance(value, dict):
        return {k: _drop_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_unset(v) for v in value]
    return value


def _unknown_key_message(key: str, path: str) -> str:
    full = _join(path, key)
    pattern = _pattern(path)
    model = _LEVELS.get(pattern)
    siblings = list(model.model_fields) if model is not None else []
    known_here = siblings + AXOLOTL_KEYS.children(pattern)
    close = difflib.get_close_matches(key, known_here, n=1, cutoff=0.6)
    where = f"under `{path}:`" if path else "at the top level"
    elsewhere = [_join(p, key) for p, m in _LEVELS.items() if p != pattern and key in m.model_fields]
    if elsewhere:
        hint = f"It belongs elsewhere: `{elsewhere[0]}` (move it there)."
    elif close:
        hint = f"Did you mean `{_join(path, close[0])}`?"
    else:
        every = {_join(p, k): k for p, m in _LEVELS.items() for k in m.model_fields}
        near = difflib.get_close_matches(key, list(every.values()), n=1, cutoff=0.7)
        full_near = [p for p, k in every.items() if near and k == near[0]]
        hint = (f"Did you mean `{full_near[0]}`?" if full_near
                else "Remove it, or check the spelling against `python -m ebft_engine schema`.")
    listing = ""
    if path and siblings:
        listing = f" Keys known {where}: {', '.join(siblings)}."
    return f"`{full}` is not a key ebft knows {where}. {hint}{listing}"


@dataclass
class _KeyFindings:
    """What reading the keys found: problems, warnings, and mapped keys to move (target, value, source)."""

    problems: list[Problem]
    warnings: list[str]
    mode: str
    moves: list[tuple[str, Any, str]]


def _check_keys(raw: dict[str, Any], path: str, found: _KeyFindings) -> dict[str, Any]:
    """Schema keys kept (recursing into sections); every other key settled by its row of the axolotl
    table (compat.py): mapped ones queued to move, inert ones warned about and dropped, refused
    ones and unknown ones reported."""
    model = _LEVELS.get(_pattern(path))
    fields = model.model_fields if model is not None else {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key)
        full = _join(path, name)
        if name not in fields:
            row = AXOLOTL_KEYS.lookup(_pattern(full))
            if row is None or row.cls == "honoured":
                found.problems.append(Problem(full, _unknown_key_message(name, path)))
            else:
                _settle_table_key(row, full, value, found)
            continue
        sub, is_list = _submodel(fields[name].annotation)
        if sub is not None and not is_list and isinstance(value, dict):
            value = _check_keys(value, full, found)
        elif sub is not None and is_list and isinstance(value, list):
            value = [_check_keys(v, f"{full}[{i}]", found) if isinstance(v, dict) else v
                     for i, v in enumerate(value)]
        out[name] = value
    return out


def _settle_table_key(row: KeyRow, full: str, value: Any, found: _KeyFindings) -> None:
    """A key the schema does not model, by its class: mapped -> queued to move to `row.to`;
    inert -> one warning (its listed sub-keys are checked); refused -> a problem unless the value
    asks for what ebft does anyway (or the row refuses only in the other mode)."""
    if row.cls == "mapped" and row.to:
        applies, target_value = row.mapped_value(value)
        if applies:
            found.moves.append((row.to, target_value, full))
    elif row.cls == "refused" and not row.accepts(value) and row.mode in (None, found.mode):
        shown = _show(value)
        found.problems.append(Problem(full, f"`{full}: {shown}` would change the run, and ebft does not "
                                            f"do that: {row.render(value)}"))
    elif row.cls == "refused" and not row.accepts(value):
        found.warnings.append(f"`{full}` has no meaning in {found.mode} mode and is ignored.")
    elif row.cls == "inert" and isinstance(value, dict) and AXOLOTL_KEYS.has_children(_pattern(full)):
        _check_keys(value, full, found)
    elif row.cls == "inert":
        found.warnings.append(f"`{full}` has no meaning for ebft and is ignored"
                              + (f" ({row.render(value)})." if row.note else "."))


def _move_mapped_keys(data: dict[str, Any], found: _KeyFindings) -> None:
    """Put each mapped key's value under the key it means (`bfloat16: true` -> `bf16: true`);
    a target the config also sets to something else is a problem naming both."""
    for target, value, source in found.moves:
        node = data
        parts = target.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        current = node.get(parts[-1], _UNSET)
        if current is _UNSET:
            node[parts[-1]] = value
        elif current != value:
            found.problems.append(Problem(source, (
                f"`{source}` means `{target}: {_show(value)}`, but the config also sets `{target}: "
                f"{_show(current)}`. Keep one of them.")))


def _loc_path(loc: tuple) -> list[str | int]:
    """The part of a pydantic error location that names config keys (drops union member tags)."""
    out: list[str | int] = []
    model: type[BaseModel] | None = EbftConfig
    in_list = False
    for part in loc:
        if isinstance(part, int) and in_list:
            out.append(part)
            in_list = False
            continue
        if isinstance(part, str) and model is not None and part in model.model_fields:
            out.append(part)
            ann = model.model_fields[part].annotation
            sub, is_list = _submodel(ann)
            inner, _ = _unwrap(ann)
            model = sub
            in_list = is_list or get_origin(inner) is list
            continue
        if isinstance(part, int) and out:  # an item of a list of scalars
            out.append(part)
        break
    return out


def _key_str(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _field_at(path: Sequence[str | int]) -> Any:
    model: type[BaseModel] | None = EbftConfig
    info = None
    for part in path:
        if isinstance(part, str) and model is not None and part in model.model_fields:
            info = model.model_fields[part]
            model, _ = _submodel(info.annotation)
    return info


def _describe(annotation: Any) -> str:
    ann, _ = _unwrap(annotation)
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(_show(a) for a in get_args(ann))
    if get_origin(ann) is Union:
        return " or ".join(_describe(a) for a in get_args(ann))
    if get_origin(ann) is Annotated:
        return _describe(get_args(ann)[0])
    if get_origin(ann) is list:
        (item,) = get_args(ann)
        inner = _describe(item)
        return "a list of " + {"a whole number": "whole numbers", "a number": "numbers",
                               "a string": "strings"}.get(inner, f"items ({inner})")
    if get_origin(ann) is dict or ann is dict:
        return "a mapping (key: value)"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a mapping with keys " + ", ".join(ann.model_fields)
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(ann, str(ann))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _bounds(info: Any) -> list[str]:
    out = []
    for m in getattr(info, "metadata", []) or []:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {_show(getattr(m, attr))}")
    return out


_HINTS = {
    "ebft.feature_layers": "Each entry is a fraction of the model's depth between 0 and 1 "
                           "(0.25 = a quarter of the way up), e.g. [0.25, 0.5, 0.75].",
    "trl.scale_rewards": "true/group normalises by the group's std, batch by the batch's, false/none "
                         "only subtracts the group mean.",
    "adapter": "Only LoRA adapters are supported (no qlora); remove the key for full fine-tuning.",
}


def _type_problem(path: list[str | int], errors: list[dict], data: dict[str, Any]) -> Problem:
    key = _key_str(path)
    field_path = [p for p in path if isinstance(p, str)]
    field_key = ".".join(field_path)
    info = _field_at(path)
    value = data
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = _UNSET
            break
    shown = "" if value is _UNSET else f"`{_show(value)}` "
    kinds = {e["type"] for e in errors}
    reason = ""
    constraint = next((e for e in errors if e["type"] in ("greater_than_equal", "greater_than",
                                                        "less_than_equal", "less_than", "too_short")), None)
    if "literal_error" in kinds and info is not None and not (kinds - {"literal_error", "bool_parsing",
                                                                       "bool_type"}):
        options = [_show(c) for c in _literal_choices(info.annotation)]
        reason = f"is not a valid choice; use one of {', '.join(options)}"
        close = difflib.get_close_matches(str(value), [o for o in options if o not in ("true", "false")], n=1)
        if close and len(options) > 1:
            reason += f" (did you mean {close[0]}?)"
    elif constraint is not None:
        ctx = constraint.get("ctx") or {}
        sym = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
               "less_than": "<"}.get(constraint["type"])
        what = "every item" if path and isinstance(path[-1], int) else "it"
        if sym:
            bound = next(iter(ctx.values()), "?")
            reason = f"is out of range: {what} must be {sym} {_show(bound)}"
        else:
            reason = "is empty: give at least one item"
    elif "value_error" in kinds and info is not None and bool_for_number(info.annotation, value):
        reason = (f"is true/false where {_describe(info.annotation)} is expected (YAML reads yes, "
                  "no, on and off as true/false)")
    elif info is not None and path and isinstance(path[-1], int):
        inner, _ = _unwrap(info.annotation)
        item = get_args(inner)[0] if get_origin(inner) is list and get_args(inner) else inner
        reason = f"has the wrong type: each item must be {_describe(item)}"
    elif info is not None:
        reason = f"has the wrong type: it must be {_describe(info.annotation)}"
        bounds = _bounds(info)
        if bounds:
            reason += f" ({', '.join(bounds)})"
    else:
        reason = errors[0].get("msg", "is invalid")
    default = ""
    if info is not None and not info.is_required():
        d = info.get_default(call_default_factory=True)
        if isinstance(d, BaseModel):
            d = d.model_dump(mode="json")
        default = f" Fix the value, or remove the key to use the default ({'unset' if d is None else _show(d)})."
    hint = _HINTS.get(field_key)
    return Problem(key, f"`{key}`: {shown}{reason}.{' ' + hint if hint else ''}{default}")


def _literal_choices(annotation: Any) -> list[Any]:
    ann, _ = _unwrap(annotation)
    out: list[Any] = []
    members = get_args(ann) if get_origin(ann) is Union else (ann,)
    for m in members:
        if get_origin(m) is Literal:
            out.extend(get_args(m))
        elif m is bool:
            out.extend([True, False])
    return out


def _delete(data: dict[str, Any], path: list[str | int]) -> bool:
    """Remove the deepest key of `path` from `data` (a list item's field, else the field itself)."""
    while path and isinstance(path[-1], int):
        path = path[:-1]
    if not path:
        return False
    node: Any = data
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False


def _build(data: dict[str, Any]) -> tuple[EbftConfig | None, list[Problem], list[str]]:
    """Validate types; each bad value is reported, removed (its default stands in) and validation
    retried, so the cross-key rules still run on everything else."""
    problems: list[Problem] = []
    bad: list[str] = []
    work = copy.deepcopy(data)
    for _ in range(50):
        try:
            return EbftConfig.model_validate(work), problems, bad
        except ValidationError as error:
            groups: dict[tuple, list[dict]] = {}
            for e in error.errors():
                groups.setdefault(tuple(_loc_path(tuple(e["loc"]))), []).append(e)
            progress = False
            for path, errors in groups.items():
                problems.append(_type_problem(list(path), errors, work))
                bad.append(_key_str(path))
                progress = _delete(work, list(path)) or progress
            if not progress:
                break
    return None, problems, bad


def _dotted(key: str) -> str:
    """`datasets[0].path` -> `datasets.0.path` (the override spelling)."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def _overlaps(key: str, others: Sequence[str]) -> bool:
    """True when `key` is one of `others`, inside one, or holds one."""
    k = _dotted(key)
    return any(k == o or k.startswith(o + ".") or o.startswith(k + ".") for o in map(_dotted, others))


def _declared_mode(raw: dict[str, Any]) -> str:
    """`ebft.mode` as written (structured when unset or unreadable): refused rows of one mode only
    need it before the schema has read the config."""
    section = raw.get("ebft")
    mode = section.get("mode") if isinstance(section, dict) else None
    return mode if mode in ("strided", "structured") else "structured"


def load_config(source: str | Path | dict, overrides: Sequence[str] = ()) -> EbftConfig:
    """Read, merge overrides, check and resolve a config; raise ConfigError with every problem."""
    raw, name = _read_source(source)
    problems: list[Problem] = []
    warnings: list[str] = []
    override_keys: dict[str, str] = {}
    if overrides:
        extra, override_problems = _parse_override_items(overrides)
        problems.extend(override_problems)
        raw = _merge(raw, extra, "", problems)
        for item in overrides:
            key, sep, _ = str(item).partition("=")
            if sep:
                override_keys[key.strip()] = str(item)

    raw = _drop_unset(raw)
    found = _KeyFindings(problems, warnings, _declared_mode(raw), [])
    data = _check_keys(raw, "", found)
    _move_mapped_keys(data, found)
    cfg, type_problems, bad = _build(data)
    problems.extend(type_problems)
    if cfg is not None:
        mode_known = not _overlaps("ebft.mode", bad)
        rule_problems = _resolve(cfg, warnings, mode_known)
        problems.extend(p for p in rule_problems if not _overlaps(p.key, bad))

    if problems:
        for p in problems:
            item = next((v for k, v in override_keys.items() if _overlaps(p.key, [k])), None)
            if item is not None and "command line" not in p.message:
                p.message += f" (Set on the command line by `{item}`.)"
        raise ConfigError(problems, name)
    assert cfg is not None
    cfg._warnings = warnings
    cfg._source = name
    return cfg


# --------------------------------------------------------------------------------------------------
# Cross-key rules and resolution


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest_multiples(value: int, step: int) -> list[int]:
    below = (value // step) * step
    return [v for v in (below, below + step) if v >= 1 and v != value]


def _group_problem(cfg: EbftConfig) -> Problem | None:
    """decisions.md §1: a generation batch holds whole prompt groups."""
    n = cfg.trl.num_generations
    mbs, gas, ws = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.world_size
    total = mbs * gas * ws
    if not n or total % n == 0:
        return None
    gas_ok = _nearest_multiples(gas, n // math.gcd(n, mbs * ws))
    mbs_ok = _nearest_multiples(mbs, n // math.gcd(n, gas * ws))
    divs = [d for d in _divisors(total) if d >= 2]
    n_ok = sorted(sorted(divs, key=lambda d: (abs(d - n), d))[:2])
    options = [f"gradient_accumulation_steps: {' or '.join(map(str, gas_ok))}",
               f"micro_batch_size: {' or '.join(map(str, mbs_ok))}"]
    if n_ok:
        options.append(f"trl.num_generations: {' or '.join(map(str, n_ok))}")
    return Problem("micro_batch_size", (
        f"`micro_batch_size` ({mbs}) x `gradient_accumulation_steps` ({gas}) x world size ({ws}) = "
        f"{total} completions per optimizer step, which is not a multiple of `trl.num_generations` "
        f"({n}): each generation batch must hold whole prompt groups of {n} completions. Nearest valid "
        f"values (change one): {'; '.join(options)}."))


_INERT_SCHEMA_KEYS = [k for k, row in AXOLOTL_KEYS.rows.items() if row.cls == "inert" and k in EbftConfig.model_fields]
"""Top-level schema keys the axolotl table calls inert: kept for their cross-key rules, warned about."""
_STRIDED_ONLY_EBFT = [k for k, f in EbftSection.model_fields.items()
                      if (f.json_schema_extra or {}).get("mode") == "strided"]
_STRUCTURED_ONLY_EBFT = [k for k, f in EbftSection.model_fields.items()
                         if (f.json_schema_extra or {}).get("mode") == "structured"]


def _changed(section: BaseModel, keys: Sequence[str] | None = None) -> list[str]:
    """Keys of `section` whose value differs from the default."""
    fresh = type(section)()
    keys = list(type(section).model_fields) if keys is None else keys
    return [k for k in keys if getattr(section, k) != getattr(fresh, k)]


def _slug(text: str) -> str:
    tail = re.split(r"[/:\\]", text.rstrip("/\\"))[-1] or "model"
    tail = re.sub(r"\.(gguf|yaml|yml)$", "", tail, flags=re.I)
    return re.sub(r"[^a-z0-9.]+", "-", tail.lower()).strip("-") or "model"


@dataclass
class _Findings:
    """What the cross-key rules found: problems (the config cannot run) and warnings."""

    problems: list[Problem]
    warnings: list[str]

    def bad(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def warn(self, message: str) -> None:
        self.warnings.append(message)


Rule = Callable[[EbftConfig, _Findings], None]


# -- every mode ------------------------------------------------------------------------------------


def _rl_is_ebft(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.rl is None:
        found.bad("rl", "`rl` is missing. This trainer runs Energy-Based Fine-Tuning only: add `rl: ebft`.")
    elif cfg.rl != "ebft":
        found.bad("rl", f"`rl: {cfg.rl}`: this trainer runs Energy-Based Fine-Tuning only. Set `rl: ebft` "
                        "(other methods such as grpo or dpo need another trainer).")


def _base_model_is_set(cfg: EbftConfig, found: _Findings) -> None:
    if not cfg.base_model.strip():
        found.bad("base_model", "`base_model` is missing. Set it to a hub id (e.g. Qwen/Qwen3-4B), a local "
                                "model folder, a GGUF file, or builtin:smollm2-135m-instruct.")


def _datasets_are_set(cfg: EbftConfig, found: _Findings) -> None:
    if not cfg.datasets:
        found.bad("datasets", "`datasets` is missing or empty. Add at least one, e.g.\n"
                              "datasets:\n  - path: nvidia/OpenCodeInstruct\n    type: ebft_opencode.transform\n"
                              "    split: train[:500]")


def _dataset_entries_have_path_and_split(cfg: EbftConfig, found: _Findings) -> None:
    for label, items in (("datasets", cfg.datasets), ("test_datasets", cfg.test_datasets or [])):
        for i, ds in enumerate(items):
            if not ds.path.strip():
                found.bad(f"{label}[{i}].path", f"`{label}[{i}].path` is missing. Give a hub id, a local file "
                                                "or folder, or builtin:humaneval.")
            if not re.fullmatch(r"[\w.\-]+(\[[^\[\]]*\])?(\+[\w.\-]+(\[[^\[\]]*\])?)*", ds.split.strip()):
                found.bad(f"{label}[{i}].split", f"`{label}[{i}].split: {ds.split}` is not a split name with an "
                                                 "optional slice. Write e.g. `train`, `train[:500]`, `train[:1%]` "
                                                 "or `train[100:200]`.")


def _flex_implementation_means_flex_attention(cfg: EbftConfig, found: _Findings) -> None:
    """`attn_implementation: flex_attention` (axolotl configs) sets `flex_attention: true`."""
    if cfg.attn_implementation == "flex_attention":
        if "flex_attention" in cfg.model_fields_set and not cfg.flex_attention:
            found.bad("flex_attention", "`attn_implementation: flex_attention` and `flex_attention: false` "
                                        "contradict each other. Remove one of them.")
        cfg.flex_attention = True


def _one_attention_kernel(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.flex_attention and (cfg.flash_attention or cfg.attn_implementation in (
            "flash_attention_2", "flash_attention_3")):
        found.bad("flash_attention", "`flash_attention` and `flex_attention` are both on. Choose one: strided "
                                     "mode wants `flex_attention: true` (block-parallel mask kernels), structured "
                                     "mode usually `flash_attention: true`.")


def _no_compile_with_strided_flex(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.ebft.mode == "strided" and cfg.flex_attention and cfg.torch_compile:
        found.bad("torch_compile", "`torch_compile: true` must not be set with strided `flex_attention`: "
                                   "flex_attention compiles its own kernels, and compiling the model too causes "
                                   "conflicts and out-of-memory errors. Remove `torch_compile` (or set it false).")


def _reentrant_checkpointing_with_strided_flex(cfg: EbftConfig, found: _Findings) -> None:
    if (cfg.ebft.mode == "strided" and cfg.flex_attention and cfg.gradient_checkpointing
            and not cfg.gradient_checkpointing_kwargs.use_reentrant):
        found.bad("gradient_checkpointing_kwargs.use_reentrant",
                  "`gradient_checkpointing_kwargs.use_reentrant: false` with strided `flex_attention`: "
                  "non-reentrant checkpointing raises CheckpointError with flex_attention block masks. Set "
                  "`gradient_checkpointing_kwargs: {use_reentrant: true}` (or turn off gradient_checkpointing).")


def _no_offloading_with_flex(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.activation_offloading and cfg.flex_attention:
        found.bad("activation_offloading", "`activation_offloading: true` is incompatible with `flex_attention`. "
                                           "Turn one of them off (strided mode: keep flex_attention and use "
                                           "gradient_checkpointing to save memory).")


def _one_half_precision(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.bf16 is True and cfg.fp16:
        found.bad("fp16", "`bf16: true` and `fp16: true` are both set. Choose one (bf16: auto picks bf16 where "
                          "the device supports it).")


def _one_warmup(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        found.bad("warmup_ratio", "`warmup_steps` and `warmup_ratio` are both set. Keep one of them.")


def _one_eval_source(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.test_datasets and cfg.val_set_size > 0:
        found.bad("val_set_size", "`test_datasets` and `val_set_size` are both set. Use one: held-out datasets, "
                                  "or a part of the training data (set val_set_size: 0).")


def _lora_target_regex_compiles(cfg: EbftConfig, found: _Findings) -> None:
    if isinstance(cfg.lora_target_modules, str):
        try:
            re.compile(cfg.lora_target_modules)
        except re.error as error:
            found.bad("lora_target_modules", f"`lora_target_modules` is a string, so it is a regular expression, "
                                             f"but it does not compile ({error}). Fix it, or give a list of module "
                                             "names such as [q_proj, v_proj].")


def _lora_targets_every_linear_by_default(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.adapter == "lora" and not cfg.lora_target_linear and not cfg.lora_target_modules:
        cfg.lora_target_linear = True
        found.warn("`adapter: lora` without `lora_target_linear` or `lora_target_modules`: targeting "
                   "every linear layer (lora_target_linear: true).")


# -- checkpoints, evals, batch and precision: axolotl's own cross-key rules -------------------------


def _step_counts_are_whole(cfg: EbftConfig, found: _Findings) -> None:
    for key, value in (("save_steps", cfg.save_steps), ("eval_steps", cfg.eval_steps)):
        if isinstance(value, float) and value >= 1 and not value.is_integer():
            found.bad(key, f"`{key}: {value}` is neither a whole number of steps nor a fraction < 1 of the "
                           f"run. Write e.g. `{key}: {math.floor(value)}` or `{key}: 0.25`.")


def _save_strategy_agrees_with_save_steps(cfg: EbftConfig, found: _Findings) -> None:
    strategy, every = cfg.save_strategy, cfg.save_steps
    if strategy == "best":
        found.bad("save_strategy", "`save_strategy: best` keeps the checkpoint with the best eval, and ebft "
                                   "does not choose checkpoints. Use `save_strategy: steps` with `save_steps` "
                                   "and `eval_steps` (the evals name the best step), or remove it.")
    elif strategy in ("no", "epoch") and (every is not None or cfg.saves_per_epoch is not None):
        other = "save_steps" if every is not None else "saves_per_epoch"
        value = every if every is not None else cfg.saves_per_epoch
        found.bad("save_strategy", f"`save_strategy: {strategy}` and `{other}: {_show(value)}` contradict each "
                                   f"other. Set `save_strategy: steps`, or remove `{other}`.")
    elif strategy == "steps" and every is None and cfg.saves_per_epoch is None:
        cfg.save_steps = DEFAULT_SAVE_STEPS
        found.warn(f"`save_strategy: steps` without `save_steps`: saving every {DEFAULT_SAVE_STEPS} steps "
                   "(the transformers default). Set save_steps to choose.")


def _saves_per_epoch_sets_save_steps(cfg: EbftConfig, found: _Findings) -> None:
    """axolotl: save_steps = 1 / (saves_per_epoch x num_epochs) of the run, when that is < 1."""
    per_epoch = cfg.saves_per_epoch
    if per_epoch is None:
        return
    if cfg.save_steps is not None:
        found.bad("saves_per_epoch", "`saves_per_epoch` and `save_steps` are both set: two ways to say how "
                                     "often to save. Keep one of them.")
        return
    fraction = 1.0 / (per_epoch * cfg.num_epochs)
    if fraction < 1:
        cfg.save_steps = fraction
    else:
        found.warn(f"`saves_per_epoch: {per_epoch}` with `num_epochs: {_show(cfg.num_epochs)}` saves less "
                   "than once in the run: saving at the end only.")
    cfg.saves_per_epoch = None


def _eval_strategy_agrees_with_eval_steps(cfg: EbftConfig, found: _Findings) -> None:
    strategy, every = cfg.eval_strategy, cfg.eval_steps
    if strategy in ("no", "epoch") and (every is not None or cfg.evals_per_epoch is not None):
        other = "eval_steps" if every is not None else "evals_per_epoch"
        value = every if every is not None else cfg.evals_per_epoch
        found.bad("eval_strategy", f"`eval_strategy: {strategy}` and `{other}: {_show(value)}` contradict each "
                                   f"other. Set `eval_strategy: steps`, or remove `{other}`.")
    elif strategy == "steps" and every is None and cfg.evals_per_epoch is None:
        cfg.eval_steps = cfg.logging_steps
        found.warn(f"`eval_strategy: steps` without `eval_steps`: evaluating every {cfg.logging_steps} "
                   "steps (logging_steps, as transformers does). Set eval_steps to choose.")


def _evals_per_epoch_sets_eval_steps(cfg: EbftConfig, found: _Findings) -> None:
    """axolotl: eval_steps = 1 / (evals_per_epoch x num_epochs) of the run, when that is < 1."""
    per_epoch = cfg.evals_per_epoch
    if per_epoch is None:
        return
    if cfg.eval_steps is not None:
        found.bad("evals_per_epoch", "`evals_per_epoch` and `eval_steps` are both set: two ways to say how "
                                     "often to evaluate. Keep one of them.")
        return
    fraction = 1.0 / (per_epoch * cfg.num_epochs)
    if fraction < 1:
        cfg.eval_steps = fraction
    else:
        found.warn(f"`evals_per_epoch: {per_epoch}` with `num_epochs: {_show(cfg.num_epochs)}` evaluates less "
                   "than once in the run: no evals during training.")
    cfg.evals_per_epoch = None


def _evals_need_held_out_rows(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.evaluates_during_training and not cfg.test_datasets and not cfg.val_set_size:
        key = "eval_steps" if cfg.eval_steps is not None else "eval_strategy"
        found.bad(key, f"`{key}` evaluates on held-out rows, but there are none: `val_set_size` is 0 and no "
                       "`test_datasets` are set. Set val_set_size (e.g. 0.05, a part of the training rows) "
                       "or test_datasets, or remove the evals.")


def _early_stopping_counts_evals(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.early_stopping_patience and not cfg.evaluates_during_training:
        found.bad("early_stopping_patience", "`early_stopping_patience` counts evals without improvement, but "
                                             "no evals run during training. Set `eval_steps` (and held-out "
                                             "rows: val_set_size or test_datasets), or remove it.")


def _best_metric_is_an_eval_number(cfg: EbftConfig, found: _Findings) -> None:
    name = cfg.metric_for_best_model
    if name is None:
        return
    if best_metric_key(name) is None:
        found.bad("metric_for_best_model", f"`metric_for_best_model: {name}` is not a number ebft's evals "
                                           "measure. Use `eval_loss` (validation CE), `cfm_loss`, "
                                           "`alignment` or `pass@1`.")
    elif not cfg.early_stopping_patience:
        found.warn("`metric_for_best_model` is read by early stopping only, and `early_stopping_patience` "
                   "is not set.")


def _pass_at_1_needs_tests(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.eval_pass_at_1 and not cfg.test_datasets:
        found.bad("eval_pass_at_1", "`eval_pass_at_1: true` runs the held-out rows' tests, which come from "
                                    "`test_datasets` (e.g. `- path: builtin:humaneval` with `split: test`), "
                                    "and none are set. Add them or remove eval_pass_at_1.")
    elif cfg.eval_pass_at_1 and not cfg.evaluates_during_training:
        found.warn("`eval_pass_at_1` has an effect only with evals during training (eval_steps).")


def _batch_size_sets_accumulation(cfg: EbftConfig, found: _Findings) -> None:
    """axolotl: gradient_accumulation_steps = batch_size / micro_batch_size (one process)."""
    total = cfg.batch_size
    if total is None:
        return
    mbs = cfg.micro_batch_size
    if "gradient_accumulation_steps" in cfg.model_fields_set:
        found.bad("batch_size", "`batch_size` and `gradient_accumulation_steps` are both set (batch_size sets "
                                "gradient_accumulation_steps = batch_size / micro_batch_size). Keep one of them.")
    elif total % mbs:
        found.bad("batch_size", f"`batch_size: {total}` is not a multiple of `micro_batch_size: {mbs}`, so no "
                                f"whole number of micro-batches makes it. Use e.g. batch_size: "
                                f"{max(mbs, total // mbs * mbs)}.")
    else:
        cfg.gradient_accumulation_steps = total // mbs
        cfg.batch_size = None


def _precision_keys_agree(cfg: EbftConfig, found: _Findings) -> None:
    dtype = cfg.torch_dtype
    if dtype in (None, "auto"):
        return
    if cfg.bf16 is True and dtype != "bfloat16":
        found.bad("torch_dtype", f"`torch_dtype: {dtype}` and `bf16: true` contradict each other. Keep one of them.")
    elif cfg.fp16 and dtype != "float16":
        found.bad("torch_dtype", f"`torch_dtype: {dtype}` and `fp16: true` contradict each other. Keep one of them.")


_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear", "lora_target_modules")


def _lora_keys_need_an_adapter(cfg: EbftConfig, found: _Findings) -> None:
    """A warning, not an error (axolotl accepts it too): `adapter=null` on the command line is how a
    user turns a LoRA preset into full fine-tuning, and the preset's lora_* keys cannot be unset there."""
    changed = _changed(cfg, _LORA_KEYS)
    if cfg.adapter is None and changed:
        keys = ", ".join(f"`{k}`" for k in changed)
        found.warn(f"{keys} set without `adapter`: the whole model is fine-tuned and the LoRA settings do "
                   "nothing. Add `adapter: lora` to train LoRA adapters instead.")


def _inert_schema_keys_warn(cfg: EbftConfig, found: _Findings) -> None:
    """Schema keys the table calls inert (their cross-key rules still run, as axolotl's do)."""
    for key in _changed(cfg, _INERT_SCHEMA_KEYS):
        note = AXOLOTL_KEYS.rows[key].note
        found.warn(f"`{key}` has no meaning for ebft and is ignored" + (f" ({note})." if note else "."))


# -- strided mode ----------------------------------------------------------------------------------


def _one_sample_means_reinforce(cfg: EbftConfig, found: _Findings) -> None:
    e = cfg.ebft
    if e.n_samples_per_prompt == 1 and (e.advantage_estimator != "reinforce" or e.diversity_coef != 0):
        e.advantage_estimator = "reinforce"
        e.diversity_coef = 0.0
        found.warn("`ebft.n_samples_per_prompt: 1`: switching `ebft.advantage_estimator` to "
                   "reinforce and `ebft.diversity_coef` to 0 (baselines and the diversity penalty "
                   "need several samples per document).")


def _sequence_holds_a_block(cfg: EbftConfig, found: _Findings) -> None:
    e = cfg.ebft
    need = e.context_length + e.generate_max_len
    if cfg.sequence_len < need:
        found.bad("sequence_len", f"`sequence_len: {cfg.sequence_len}` leaves no room for a single block: a "
                                  f"strided block needs `ebft.context_length` ({e.context_length}) + "
                                  f"`ebft.generate_max_len` ({e.generate_max_len}) = {need} tokens. Raise "
                                  "sequence_len or lower those two.")


def _dense_mask_costs_memory(cfg: EbftConfig, found: _Findings) -> None:
    if not cfg.flex_attention and cfg.device != "cpu":
        found.warn("strided mode without `flex_attention: true` uses a dense attention mask, "
                   "which takes much more memory on long sequences.")


def _structured_settings_do_nothing(cfg: EbftConfig, found: _Findings) -> None:
    changed = [f"trl.{k}" for k in _changed(cfg.trl)] + [f"vllm.{k}" for k in _changed(cfg.vllm)]
    changed += [f"ebft.{k}" for k in _changed(cfg.ebft, _STRUCTURED_ONLY_EBFT)]
    if changed:
        found.warn(f"{', '.join(f'`{k}`' for k in changed)}: structured-mode settings, without "
                   "effect in strided mode.")


# -- structured mode -------------------------------------------------------------------------------


def _generations_are_set(cfg: EbftConfig, found: _Findings) -> None:
    t = cfg.trl
    if t.num_generations is None:
        found.bad("trl.num_generations", "`trl.num_generations` is required in structured mode: the number "
                                         "of completions generated per prompt, e.g. `trl: {num_generations: 4}`.")
    elif t.num_generations < 2:
        found.bad("trl.num_generations", f"`trl.num_generations: {t.num_generations}`: with one completion "
                                         "per prompt every group-normalised advantage is zero and nothing is "
                                         "learned. Use 2 or more (4 is typical).")
    if t.max_completion_length is None:
        found.bad("trl.max_completion_length", "`trl.max_completion_length` is required in structured mode: "
                                               "the maximum tokens per completion, e.g. 256.")


def _batches_hold_whole_groups(cfg: EbftConfig, found: _Findings) -> None:
    group = _group_problem(cfg)
    if group is not None and cfg.trl.num_generations and cfg.trl.num_generations >= 2:
        found.problems.append(group)


def _lora_sync_needs_lora(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.trl.vllm_lora_sync and cfg.adapter != "lora":
        found.bad("trl.vllm_lora_sync", "`trl.vllm_lora_sync: true` syncs a LoRA adapter, but this config "
                                        "trains the full model (no `adapter: lora`). Set `adapter: lora`, or "
                                        "set vllm_lora_sync: false to sync full weights.")


def _no_vllm_means_the_hf_server(cfg: EbftConfig, found: _Findings) -> None:
    v = cfg.vllm
    if cfg.trl.use_vllm is False:
        if "backend" in v.model_fields_set and v.backend == "vllm":
            found.bad("vllm.backend", "`trl.use_vllm: false` and `vllm.backend: vllm` contradict each other. "
                                      "Remove one: `vllm.backend: hf` generates with our transformers server.")
        elif v.backend != "hf":
            v.backend = "hf"
            found.warn("`trl.use_vllm: false`: generating with our transformers server (vllm.backend: hf).")


def _context_holds_a_prompt(cfg: EbftConfig, found: _Findings) -> None:
    v, t = cfg.vllm, cfg.trl
    if (v.max_model_len is not None and t.max_completion_length is not None
            and v.max_model_len <= t.max_completion_length):
        found.bad("vllm.max_model_len", f"`vllm.max_model_len: {v.max_model_len}` leaves no room for a prompt "
                                        f"before `trl.max_completion_length: {t.max_completion_length}` "
                                        "tokens. Raise max_model_len (prompt + completion) or lower "
                                        "max_completion_length.")


def _epsilon_high_not_below_epsilon(cfg: EbftConfig, found: _Findings) -> None:
    t = cfg.trl
    if t.epsilon_high is not None and t.epsilon_high < t.epsilon:
        found.bad("trl.epsilon_high", f"`trl.epsilon_high: {t.epsilon_high}` is below `trl.epsilon: "
                                      f"{t.epsilon}`. Set it >= epsilon, or remove it to use epsilon.")


def _streaming_needs_async(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.trl.streaming_partial_batch and not cfg.trl.async_prefetch:
        found.warn("`trl.streaming_partial_batch: true` has an effect only with `trl.async_prefetch: true`.")


def _server_off_loopback_is_reachable(cfg: EbftConfig, found: _Findings) -> None:
    if cfg.server_host != LOOPBACK and cfg.server_host != "localhost":
        found.warn(f"`trl.vllm_server_host: {cfg.server_host}`: the generation server will be "
                   "reachable from the network; the trainer still connects through 127.0.0.1. "
                   "Remove the key to listen on loopback only.")


def _request_caps_fit_the_run(cfg: EbftConfig, found: _Findings) -> None:
    """Our hf server refuses requests over `vllm.max_*_per_request`: the run's own must fit."""
    v, t = cfg.vllm, cfg.trl
    prompts = 2 * cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.world_size // (t.num_generations or 1)
    for key, cap, need, what in (
            ("max_n_per_request", v.max_n_per_request, t.num_generations, "trl.num_generations"),
            ("max_tokens_per_request", v.max_tokens_per_request, t.max_completion_length,
             "trl.max_completion_length"),
            ("max_prompts_per_request", v.max_prompts_per_request, prompts,
             "two steps' prompts (micro_batch_size x gradient_accumulation_steps / num_generations, x2)")):
        if cap is not None and need is not None and cap < need:
            found.bad(f"vllm.{key}", f"`vllm.{key}: {cap}` is below {what} ({need}): the generation "
                                     f"server would refuse the run's own requests. Raise it to at least {need}.")


def _strided_settings_do_nothing(cfg: EbftConfig, found: _Findings) -> None:
    changed = [f"ebft.{k}" for k in _changed(cfg.ebft, _STRIDED_ONLY_EBFT)]
    if changed:
        found.warn(f"{', '.join(f'`{k}`' for k in changed)}: strided-mode settings, without effect "
                   "in structured mode (sampling uses trl.temperature / trl.top_p).")


# -- the table -------------------------------------------------------------------------------------

COMMON_RULES: tuple[Rule, ...] = (
    _rl_is_ebft, _base_model_is_set, _datasets_are_set, _dataset_entries_have_path_and_split,
    _flex_implementation_means_flex_attention, _one_attention_kernel, _no_compile_with_strided_flex,
    _reentrant_checkpointing_with_strided_flex, _no_offloading_with_flex, _one_half_precision,
    _precision_keys_agree, _one_warmup, _one_eval_source, _lora_keys_need_an_adapter,
    _lora_target_regex_compiles, _lora_targets_every_linear_by_default, _batch_size_sets_accumulation,
    _step_counts_are_whole, _save_strategy_agrees_with_save_steps, _saves_per_epoch_sets_save_steps,
    _eval_strategy_agrees_with_eval_steps, _evals_per_epoch_sets_eval_steps, _evals_need_held_out_rows,
    _early_stopping_counts_evals, _best_metric_is_an_eval_number, _pass_at_1_needs_tests,
    _inert_schema_keys_warn,
)
STRIDED_RULES: tuple[Rule, ...] = (
    _one_sample_means_reinforce, _sequence_holds_a_block, _dense_mask_costs_memory,
    _structured_settings_do_nothing,
)
STRUCTURED_RULES: tuple[Rule, ...] = (
    _generations_are_set, _batches_hold_whole_groups, _lora_sync_needs_lora, _no_vllm_means_the_hf_server,
    _context_holds_a_prompt, _epsilon_high_not_below_epsilon, _streaming_needs_async,
    _server_off_loopback_is_reachable, _request_caps_fit_the_run, _strided_settings_do_nothing,
)
"""The cross-key rules, in the order they run (and report). A rule may also fix up what has one
meaning (`attn_implementation: flex_attention` sets `flex_attention`) and warn that it did."""


def _resolve(cfg: EbftConfig, warnings: list[str], mode_known: bool = True) -> list[Problem]:
    """Apply the cross-key rules: fix up what has one meaning, report what cannot run.

    With `mode_known` false (`ebft.mode` itself was invalid) the mode-specific rules are skipped:
    they would only guess."""
    found = _Findings([], warnings)
    rules = COMMON_RULES
    if mode_known:
        rules += STRIDED_RULES if cfg.ebft.mode == "strided" else STRUCTURED_RULES
    for rule in rules:
        rule(cfg, found)
    if not cfg.output_dir.strip():
        cfg.output_dir = f"./outputs/ebft-{_slug(cfg.base_model)}-{cfg.ebft.mode}"
    return found.problems


__all__ = [
    "ConfigError", "DatasetConfig", "EbftConfig", "EbftSection", "GenerationKwargs",
    "GradientCheckpointingKwargs", "Problem", "TrlSection", "VllmSection", "load_config", "parse_overrides",
]
