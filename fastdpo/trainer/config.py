"""TrainConfig: every option of the trainer in one dataclass; the CLI flags are its fields.

A field `foo_bar` is the flag `--foo-bar`. Fields whose good value depends on the model (learning
rate, batch size, run length, warm-up) default to None and are resolved by `resolve`: tuned values
for the embedded tiny model, conservative LLM values for anything else. `check` rejects bad or
conflicting options with a one-line `ConfigError` before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

EMBEDDED_MODEL = "fastdpo:tiny"
EMBEDDED_DATASET = "fastdpo:sort"

REF_MODES = ("copy", "precompute", "adapter", "none")
LOSS_IMPLS = ("fused", "fused_linear", "reference")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "bf16", "no")
LOGPS_REDUCTIONS = ("sum", "mean")  # fastdpo.losses.LOGPS_REDUCTIONS


class ConfigError(ValueError):
    """A bad option, input or combination, reported in one line before any model loads."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Options of a fastdpo training run (see `fastdpo train --help` for each one)."""

    # Model
    model: str = _opt(EMBEDDED_MODEL, "Hub name or local path of an AutoModelForCausalLM; "
                      f"'{EMBEDDED_MODEL}' builds the embedded tiny Llama (random weights)")
    tokenizer: str = _opt("", "tokenizer name or path (default: the model's)")
    dtype: str = _opt("auto", "weight dtype; auto = bfloat16 for a frozen LoRA base on GPU, else float32",
                      choices=DTYPES)
    mixed_precision: str = _opt("auto", "bf16 autocast; auto = on for GPUs that support it", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward")
    disable_dropout: bool = _opt(True, "set every dropout to 0 (as TRL does for DPO)")
    lora_r: int = _opt(0, "LoRA rank through peft (0 = full fine-tuning)")
    lora_alpha: float = _opt(16.0, "LoRA alpha")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names for LoRA, or all-linear")

    # Data
    dataset: str = _opt(EMBEDDED_DATASET, "Hub name, a .jsonl/.json/.parquet file, or a directory of "
                        f"<split>.jsonl|json|parquet files; '{EMBEDDED_DATASET}' is the embedded task")
    split: str = _opt("train", "training split")
    eval_split: str = _opt("", "eval split (default: 'test' when the dataset has it)")
    eval_fraction: float = _opt(0.0, "hold out this fraction of the training split for eval instead")
    max_length: int = _opt(1024, "tokens per sequence (prompt + completion); the start is kept")
    max_train_pairs: int = _opt(0, "use only the first N training pairs (0 = all)")
    max_eval_pairs: int = _opt(0, "use only the first N eval pairs (0 = all)")
    skip_invalid: bool = _opt(False, "skip malformed rows (counted in the log) instead of stopping")
    padding_free: Optional[bool] = _opt(None, "run each micro-batch as one row of packed sequences, no padding "
                                        "(default: on where the model's attention supports it)")
    share_prompt: bool = _opt(False, "run each pair as one sequence [prompt, chosen, rejected], the prompt "
                              "computed once (padding-free, with a custom attention mask)")
    max_tokens: int = _opt(0, "fill micro-batches with whole pairs up to N token positions instead of "
                           "--batch-size pairs (0 = off)")

    # Reference and loss
    ref: str = _opt("copy", "reference: frozen copy, precomputed log-probs, LoRA base (adapter), or none",
                    choices=REF_MODES)
    ref_cache_dir: str = _opt("", "where --ref precompute caches log-probs (default ~/.cache/fastdpo/ref_logps)")
    loss_type: str = _opt("sigmoid", "a fastdpo loss name, or several joined by commas")
    loss_impl: str = _opt("fused", "fused (from logits), fused_linear (from hidden states), or reference "
                          "(pure PyTorch)", choices=LOSS_IMPLS)
    beta: float = _opt(0.1, "inverse temperature of the implicit reward")
    label_smoothing: float = _opt(0.0, "label smoothing of conservative / robust DPO")
    logps_reduction: str = _opt("sum", "each sequence's log-prob in the loss and metrics: the sum over its "
                                "completion tokens, or their mean (Liger's average_log_prob, minimind)",
                                choices=LOGPS_REDUCTIONS)
    loss_options: dict = field(default_factory=dict, metadata={"help": "extra loss options as JSON, e.g. "
                               "'{\"simpo_gamma\": 0.5}' or '{\"loss_weights\": [1, 0.2]}'"})
    inplace_backward: bool = _opt(False, "write the logits gradient over the logits (fused only)")

    # Optimization
    learning_rate: Optional[float] = _opt(None, "AdamW learning rate (default 1e-3 embedded, 5e-7 otherwise)")
    batch_size: Optional[int] = _opt(None, "pairs per device per micro-batch (default 32 embedded, 4 otherwise)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_steps: Optional[int] = _opt(None, "optimizer steps (default 200 embedded; 0 = use --num-epochs)")
    num_epochs: float = _opt(1.0, "epochs over the training pairs when --max-steps is 0")
    lr_scheduler: str = _opt("cosine", "decay after warm-up", choices=SCHEDULERS)
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent warming up the learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = no clipping)")
    cpu_threads: Optional[int] = _opt(None, "torch threads when training on CPU (default 1 for the embedded "
                                      "model, whose matrices are too small for threads to pay; 0 = torch's default)")
    seed: int = _opt(42, "seed of the weights (embedded model), the data order and the RNGs")
    sft_steps: Optional[int] = _opt(None, "supervised warm-up steps on the chosen answers before DPO "
                                    "(default 150 embedded, 0 otherwise)")
    sft_learning_rate: Optional[float] = _opt(None, "warm-up learning rate (default 3e-3 embedded, 2e-5 otherwise)")

    # Run directory, logging, eval, checkpoints
    run_dir: str = _opt("", "where metrics, checkpoints and the final model go (default runs/<time>)")
    logging_steps: int = _opt(10, "log metrics every N steps")
    eval_steps: Optional[int] = _opt(None, "evaluate every N steps and at the end (default 50 embedded, "
                                     "200 otherwise; 0 = only at the end)")
    save_steps: int = _opt(500, "checkpoint every N steps (and always at the end and on Ctrl-C; "
                           "0 = never periodically)")
    save_total_limit: int = _opt(2, "checkpoints kept (0 = all)")
    resume: bool = _opt(False, "continue from the latest checkpoint in --run-dir")
    progress_bar: bool = _opt(True, "show a tqdm progress bar")

    @property
    def embedded_model(self) -> bool:
        return self.model == EMBEDDED_MODEL

    @property
    def loss_types(self) -> list[str]:
        return [t.strip() for t in self.loss_type.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Values for the None ("auto") fields: with these the embedded model learns its task in about half
# a minute on two CPU cores; the others are usual starting points for DPO on a pretrained LLM.
EMBEDDED_DEFAULTS = dict(learning_rate=1e-3, batch_size=32, max_steps=200, sft_steps=150,
                         sft_learning_rate=3e-3, eval_steps=50, cpu_threads=1)
MODEL_DEFAULTS = dict(learning_rate=5e-7, batch_size=4, max_steps=0, sft_steps=0,
                      sft_learning_rate=2e-5, eval_steps=200, cpu_threads=0)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` with the auto (None) fields filled in and a default run directory."""
    if cfg.resume and not cfg.run_dir:
        raise ConfigError("--resume needs --run-dir: the directory of the run to continue")
    table = EMBEDDED_DEFAULTS if cfg.embedded_model else MODEL_DEFAULTS
    filled = {k: v for k, v in table.items() if getattr(cfg, k) is None}
    if not cfg.run_dir:
        filled["run_dir"] = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return dataclasses.replace(cfg, **filled)


def check(cfg: TrainConfig) -> None:
    """Reject bad values and conflicting options (one line each); touches no file or model."""
    from .loss import loss_config  # the loss registry lives in the core package

    _choice(cfg, "ref", REF_MODES)
    _choice(cfg, "loss_impl", LOSS_IMPLS)
    _choice(cfg, "lr_scheduler", SCHEDULERS)
    _choice(cfg, "dtype", DTYPES)
    _choice(cfg, "mixed_precision", MIXED_PRECISION)
    _choice(cfg, "logps_reduction", LOGPS_REDUCTIONS)
    for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{_flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "sft_steps", "eval_steps", "save_steps", "save_total_limit", "lora_r",
                 "max_train_pairs", "max_eval_pairs", "cpu_threads", "max_tokens"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("learning_rate", "sft_learning_rate", "num_epochs"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{_flag(name)} must be > 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ConfigError(f"--warmup-ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.eval_fraction and cfg.eval_split:
        raise ConfigError("--eval-split and --eval-fraction conflict: choose one source of eval pairs")
    if not isinstance(cfg.loss_options, dict):
        raise ConfigError(f"--loss-options must be a JSON object, got {cfg.loss_options!r}")
    if "logps_reduction" in cfg.loss_options:
        raise ConfigError("--loss-options: give logps_reduction as --logps-reduction")
    losses = loss_config(cfg)  # unknown loss types and bad hyper-parameters fail here
    if cfg.ref == "none" and losses.needs_reference:
        raise ConfigError(f"--ref none conflicts with --loss-type {cfg.loss_type}, which needs a reference; "
                          "use --ref copy/precompute/adapter or a reference-free loss")
    if cfg.ref == "adapter" and cfg.lora_r == 0:
        raise ConfigError("--ref adapter needs LoRA (--lora-r > 0): the reference is the base model with adapters off")
    if cfg.ref == "adapter" and cfg.sft_steps:
        raise ConfigError("--ref adapter conflicts with --sft-steps: the warm-up would train the adapters, "
                          "so the base model would not be the starting policy")
    if cfg.share_prompt and cfg.padding_free is False:
        raise ConfigError("--share-prompt runs pairs padding-free; it conflicts with --no-padding-free")
    if cfg.inplace_backward and cfg.loss_impl != "fused":
        raise ConfigError("--inplace-backward applies to --loss-impl fused only")
    if cfg.loss_impl == "fused_linear":
        import fastdpo

        if not hasattr(fastdpo, "fused_linear_dpo_loss"):
            raise ConfigError("--loss-impl fused_linear needs fastdpo.fused_linear_dpo_loss, which this "
                              "fastdpo build does not have; use --loss-impl fused")


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        raise ConfigError(f"--{_flag(name)} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# Command line: one flag per field, the same names.


def build_parser(prog: str = "fastdpo train") -> argparse.ArgumentParser:
    """An argparse parser with one `--field-name` option per TrainConfig field."""
    parser = argparse.ArgumentParser(
        prog=prog, description="DPO training with fastdpo's fused losses. With no options it trains the "
        "embedded tiny model on the embedded preference task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        kw: dict[str, Any] = {"help": meta.pop("help"), "dest": f.name}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "choices" in meta:
            kw["choices"] = meta.pop("choices")
        if f.type in ("bool", bool, "Optional[bool]"):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "loss_options":
            kw["type"] = _json_object
        else:
            kw["type"] = _scalar_type(f.type)
        parser.add_argument("--" + _flag(f.name), default=default, **kw)
    return parser


def _scalar_type(annotation: Any):
    text = str(annotation)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_args(argv: list[str] | None = None, prog: str = "fastdpo train") -> TrainConfig:
    """TrainConfig from command-line flags."""
    return TrainConfig(**vars(build_parser(prog).parse_args(argv)))
