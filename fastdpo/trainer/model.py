"""Models and tokenizers: the embedded tiny Llama or any AutoModelForCausalLM, with optional LoRA.

`check_model_source` runs before anything heavy, so a missing model fails in one line at start.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import embedded
from fastdpo.attention import implementation_support, layout_support

from .config import EMBEDDED_MODEL, ConfigError, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_source(name: str) -> None:
    """Fail with a one-line reason unless `name` is the embedded model, or a model directory or Hub
    model whose config can be read and names a causal language model (the config only: no weights
    are read)."""
    if name == EMBEDDED_MODEL:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model path {name} has no config.json (expected a save_pretrained directory)")
    elif path.exists() or looks_local(name):
        raise ConfigError(f"model path not found: {name}")
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if path.is_dir() else name)
    except Exception as e:  # noqa: BLE001 - any failure means the name does not resolve
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"model path {name}: its config cannot be read" if path.is_dir() else \
            f"model {name!r} is not a local path and could not be found on the Hub"
        raise ConfigError(f"{where} ({reason})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = type(config).__name__.removesuffix("Config")
        raise ConfigError(f"model {name} is a {kind} model, not a causal language model (AutoModelForCausalLM has no "
                          "class for it): DPO here trains decoders")


def looks_local(name: str) -> bool:
    """A name that can only be a local path: Hub names are "name" or "org/name"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


@dataclass(frozen=True)
class ModelLimits:
    """What a model can read, from its config: token ids below `vocab` (rows of its embeddings) and
    sequences of at most `positions` tokens (its position table or context); None where unknown."""

    vocab: int | None
    positions: int | None


def model_limits(name: str, tokenizer) -> ModelLimits:
    """The model's ModelLimits from its config alone (no weights are read)."""
    if name == EMBEDDED_MODEL:  # embedded.build_model sizes its embeddings to the tokenizer
        return ModelLimits(vocab=len(tokenizer), positions=embedded.MAX_POSITIONS)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.expanduser(name))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return ModelLimits(vocab=getattr(text, "vocab_size", None), positions=positions)


def load_tokenizer(cfg: TrainConfig):
    """The tokenizer of --tokenizer or the model; padding falls back to EOS when there is no pad token."""
    name = cfg.tokenizer or cfg.model
    if name == EMBEDDED_MODEL:
        tokenizer = embedded.build_tokenizer()
    else:
        from transformers import AutoTokenizer

        if looks_local(name) and not Path(name).expanduser().exists():  # else the Hub's message, misleading
            raise ConfigError(f"tokenizer path not found: {name}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"cannot load the tokenizer of {name} ({str(e).strip().splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {name} has neither a pad nor an EOS token, and batches need one to "
                              "pad with: save the tokenizer with a pad_token set")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_dtype(cfg: TrainConfig, on_gpu: bool) -> torch.dtype:
    """--dtype auto: bf16 for a frozen LoRA base on GPU; otherwise float32, so that AdamW's small
    updates are not rounded away (compute still runs in bf16 under autocast on GPU)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    return torch.bfloat16 if on_gpu and cfg.lora_r and torch.cuda.is_bf16_supported() else torch.float32


def load_model(source: str, cfg: TrainConfig, tokenizer, dtype: torch.dtype):
    """The policy from `source` (the embedded model, a path or a Hub name), ready to train."""
    attention = {} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}
    if source == EMBEDDED_MODEL:
        model = embedded.build_model(tokenizer, cfg.seed, **attention).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(source), dtype=dtype, **attention)
    model.config.use_cache = False  # no KV cache in training
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora_r:
        model = add_lora(model, cfg)
    return model


def enable_checkpointing(model) -> None:
    """Activation checkpointing, non-reentrant (works with frozen inputs, e.g. under LoRA)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the policy's log-probs noisy against the reference's; DPO turns it off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # HF attention applies this functionally


def add_lora(model, cfg: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs peft: pip install 'fastdpo[lora]'") from None
    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return get_peft_model(model, lora)
        except ValueError as e:  # peft's "Target modules ... not found in the base model", say
            raise ConfigError(f"--lora-target-modules {targets}: {str(e).splitlines()[0]}") from None


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def frozen_copy(model):
    """A no-grad, eval-mode copy of the (unwrapped) policy: the --ref copy reference."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def model_class_and_config(name: str):
    """The causal LM class and config `name` loads as (no weights read), or (None, config) when
    transformers has no built-in class for it (custom code)."""
    if name == EMBEDDED_MODEL:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM, LlamaConfig()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(os.path.expanduser(name))
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config
    except KeyError:
        return None, config


def choose_layout(cfg: TrainConfig, device_type: str, log) -> str:
    """The batch layout of this run: shared (--share-prompt), packed (--padding-free, the default
    where the model supports it) or padded. Where the model cannot run the one asked for, an
    explicit flag fails with the reason and the default falls back to padding, logging why.

    The layout is judged with the attention the model will load with (--attn-implementation), and
    that attention itself is checked (the model class, the kernels' package, `device_type`): from
    one read of the model's config, before any weight is read."""
    cls, config = model_class_and_config(cfg.model)
    if cfg.attn_implementation != "auto":
        config._attn_implementation = cfg.attn_implementation
    layout = _layout_for(cfg, cls, config, log)
    if cfg.attn_implementation != "auto" and cls is not None:  # custom code checks its own attention
        reason = implementation_support(cls, cfg.attn_implementation, device_type)
        if reason is not None:
            raise ConfigError(f"--attn-implementation {cfg.attn_implementation}: {reason}")
    return layout


def _layout_for(cfg: TrainConfig, cls, config, log) -> str:
    want = "shared" if cfg.share_prompt else ("padded" if cfg.padding_free is False else "packed")
    if want == "padded":
        return want
    reason = f"{type(config).__name__} has no built-in transformers model class" if cls is None else \
        layout_support(cls, config, want)
    if reason is None:
        return want
    if cfg.share_prompt:
        raise ConfigError(f"--share-prompt: {reason}")
    if cfg.padding_free:
        raise ConfigError(f"--padding-free: {reason}")
    log(f"padding-free batches are off for {cfg.model}: {reason}")
    return "padded"


def check_layout(model, kind: str) -> None:
    """The loaded model (its attention implementation is known now) can run `kind`."""
    lm = model.get_base_model() if is_peft(model) else model
    reason = layout_support(type(lm), lm.config, kind)
    if reason is not None:
        raise ConfigError(f"the {kind} batch layout cannot run on this model: {reason}")
