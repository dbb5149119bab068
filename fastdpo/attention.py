"""What a Hugging Face causal LM needs to run a fastdpo layout (fastdpo.layouts): ids, positions, masks.

- padded: input_ids and the 2D padding mask, as any trainer passes them.
- packed: input_ids and position_ids restarting at 0 per sequence, and no attention mask. This is
  the models' own padding-free mechanism: transformers (masking_utils.find_packed_sequence_indices)
  reads sequence starts from the position ids and builds a block-diagonal causal mask for sdpa,
  eager and flex attention, and FlashAttention runs varlen from the same position ids.
- shared: a custom mask, since no model builds one where two answers share a prompt: token q
  attends token k iff both are in the same pair, k is not after q, and not (q rejected and k
  chosen); sliding-window layers also need pos(q) - pos(k) < window, in positions (rejected
  positions continue from the prompt's end). It is handed over through the models' public
  `attention_mask` argument: a 4D mask (boolean for sdpa, additive for eager) or a FlexAttention
  BlockMask, and for models with several layer types ("full_attention", "sliding_attention") a
  dict of one mask per type, which those models accept in place of the 2D mask.
"""

from __future__ import annotations

from typing import Any

import torch

from .layouts import LayoutBatch

SHARED_ATTENTION = ("sdpa", "eager", "flex_attention")
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# attention implementation -> (the model class's flag for it, the module its kernels come from);
# its keys are fastdpo train's --attn-implementation choices
IMPLEMENTATION_NEEDS = {"sdpa": ("_supports_sdpa", None), "eager": (None, None),
                        "flex_attention": ("_supports_flex_attn", None),
                        "flash_attention_2": ("_supports_flash_attn", "flash_attn"),
                        "flash_attention_3": ("_supports_flash_attn", "flash_attn_interface")}


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_implementation(config: Any) -> str:
    return getattr(text_config(config), "_attn_implementation", None) or "eager"


def layout_support(model_class: type, config: Any, kind: str) -> str | None:
    """Why a model of `model_class` with `config` cannot run layout `kind`, or None when it can.

    Packed rows need the mask utilities of transformers' attention interface (the model class
    sets `_supports_attention_backend`), which turn restarting position ids into per-sequence
    attention. The shared layout also needs an implementation that takes a custom mask.
    """
    if kind == "padded":
        return None
    name = model_class.__name__
    if not getattr(model_class, "_supports_attention_backend", False):
        return f"{name} does not use transformers' attention interface, which reads packed sequences from position ids"
    if not getattr(text_config(config), "is_causal", True) or getattr(config, "is_encoder_decoder", False):
        return f"{name} is not a decoder-only causal LM"
    impl = attention_implementation(config)
    allowed = SHARED_ATTENTION if kind == "shared" else PACKED_ATTENTION
    # Every FlashAttention runs packed rows varlen from their position ids, also a Hub kernel such as
    # kernels-community/flash-attn2 (transformers' own test for a FlashAttention is "flash" in its name)
    if impl not in allowed and not (kind == "packed" and "flash" in impl):
        what = "a custom attention mask" if kind == "shared" else "packed sequences"
        return f"attn_implementation {impl!r} cannot take {what} (it needs one of {', '.join(allowed)})"
    return None


def implementation_support(model_class: type, impl: str, device_type: str) -> str | None:
    """Why `model_class` cannot train with attention `impl` on `device_type`, or None when it can:
    the class's own support flag, the package of the kernels, the device.
    Transformers makes the first three when it loads the model; here they come before any weight is
    read. The last, flex attention's missing CPU backward, would otherwise fail in the first step."""
    flag, module = IMPLEMENTATION_NEEDS[impl]
    if flag is not None and not getattr(model_class, flag, True):
        return f"{model_class.__name__} does not support attn_implementation {impl!r}"
    if module is not None:
        import importlib.util

        # Without the package, transformers fetches a FlashAttention kernel from the Hub through the
        # `kernels` package (a top-level module of Hugging Face's; fastdpo's are fastdpo.kernels).
        if importlib.util.find_spec(module) is None and importlib.util.find_spec("kernels") is None:
            return (f"attn_implementation {impl!r} needs the {module} package, or the kernels package to fetch "
                    "it from the Hub; neither is installed")
        if device_type != "cuda":
            return f"attn_implementation {impl!r} runs on CUDA GPUs only, not on {device_type}"
    if impl == "flex_attention" and device_type == "cpu":
        return "torch's FlexAttention has no backward on the CPU: use sdpa or eager there"
    return None


def activation_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's activations here: autocast's when it is on, else its embeddings'."""
    weight = model.get_input_embeddings().weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def model_inputs(batch: LayoutBatch, config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of the model's forward for `batch`. `dtype` is the dtype of the model's
    activations (an eager additive mask is made in it)."""
    if batch.kind == "padded":
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if batch.kind == "shared":
        inputs["attention_mask"] = shared_masks(batch, config, dtype)
    return inputs


def shared_masks(batch: LayoutBatch, config: Any, dtype: torch.dtype):
    """The shared-prompt mask in the form the model's attention implementation takes, one per layer type."""
    text = text_config(config)
    impl = attention_implementation(config)
    window = getattr(text, "sliding_window", None)
    types = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))
    masks = {t: _mask(batch, window if t == "sliding_attention" else None, impl, dtype) for t in types}
    if types == ["full_attention"]:
        return masks["full_attention"]
    return masks


def allowed(batch: LayoutBatch, window: int | None) -> torch.Tensor:
    """[N, N] bool: may query q attend key k (the rule in the module docstring)."""
    seq, branch, pos = batch.sequence_ids[0], batch.branch_ids[0], batch.position_ids[0]
    n = seq.numel()
    index = torch.arange(n, device=seq.device)
    ok = (seq[:, None] == seq[None, :]) & (index[None, :] <= index[:, None])
    ok &= ~((branch[:, None] == 2) & (branch[None, :] == 1))
    if window is not None:
        ok &= (pos[:, None] - pos[None, :]) < window
    return ok


def _mask(batch: LayoutBatch, window: int | None, impl: str, dtype: torch.dtype):
    if impl == "flex_attention":
        return _block_mask(batch, window)
    ok = allowed(batch, window)[None, None]  # [1, 1, N, N]
    if impl == "sdpa":
        return ok
    # eager adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere (as transformers does)
    scalar = lambda v: torch.tensor(v, dtype=dtype, device=ok.device)  # noqa: E731
    return torch.where(ok, scalar(0.0), scalar(torch.finfo(dtype).min))


def shared_mask_mod(batch: LayoutBatch, window: int | None):
    """The rule of `allowed` as a FlexAttention mask_mod(b, h, q, k) (token indices -> bool)."""
    seq, branch, pos = batch.sequence_ids[0], batch.branch_ids[0], batch.position_ids[0]

    def mask_mod(b, h, q, k):
        ok = (seq[q] == seq[k]) & (k <= q) & ~((branch[q] == 2) & (branch[k] == 1))
        if window is not None:
            ok = ok & (pos[q] - pos[k] < window)
        return ok

    return mask_mod


def _block_mask(batch: LayoutBatch, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    n = batch.input_ids.shape[1]
    return create_block_mask(shared_mask_mod(batch, window), B=None, H=None, Q_LEN=n, KV_LEN=n,
                             device=batch.input_ids.device)
