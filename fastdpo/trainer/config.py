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
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from fastdpo.attention import IMPLEMENTATION_NEEDS
from fastdpo.losses import LossConfig

EMBEDDED_MODEL = "fastdpo:tiny"
EMBEDDED_DATASET = "fastdpo:sort"

REF_MODES = ("copy", "precompute", "adapter", "none")
LOSS_IMPLS = ("fused", "fused_linear", "reference")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "bf16", "no")
LOGPS_REDUCTIONS = ("sum", "mean")  # fastdpo.losses.LOGPS_REDUCTIONS
ATTENTION = ("auto", *IMPLEMENTATION_NEEDS)


class ConfigError(ValueError):
    """A bad option, input or combination, reported in one line before any model loads."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Options of a fastdpo training run (see `fastdpo train --help` for each one)."""

    model: str = _opt(EMBEDDED_MODEL, "Hub name or local path of an AutoModelForCausalLM; "
                      f"'{EMBEDDED_MODEL}' builds the embedded tiny Llama (random weights)", group="model")
    tokenizer: str = _opt("", "tokenizer name or path", group="model", default_text="the model's")
    dtype: str = _opt("auto", "weight dtype; auto = bfloat16 for a frozen LoRA base on GPU, else float32",
                      choices=DTYPES, group="model")
    mixed_precision: str = _opt("auto", "bf16 autocast; auto = on for GPUs that support it", choices=MIXED_PRECISION,
                                group="model")
    attn_implementation: str = _opt("auto", "the model's attention: auto (transformers' default for the model), "
                                    "sdpa, eager, flex_attention (GPU; takes --share-prompt's mask as a "
                                    "BlockMask) or flash_attention_2/3 (GPU; the flash-attn package, or the kernels "
                                    "package to fetch it from the Hub; packed rows run varlen, no mask; not with "
                                    "--share-prompt)", choices=ATTENTION, group="model")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward", group="model")
    disable_dropout: bool = _opt(True, "set every dropout to 0 (as TRL does for DPO)", group="model")
    lora_r: int = _opt(0, "LoRA rank through peft (0 = full fine-tuning)", group="model")
    lora_alpha: float = _opt(16.0, "LoRA alpha", group="model")
    lora_dropout: float = _opt(0.0, "LoRA dropout", group="model")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names for LoRA, or all-linear",
                                    group="model")

    dataset: str = _opt(EMBEDDED_DATASET, "Hub name, a .jsonl/.json/.parquet file, or a directory of "
                        f"<split>.jsonl|json|parquet files; '{EMBEDDED_DATASET}' is the embedded task", group="data")
    split: str = _opt("train", "training split", group="data")
    eval_split: str = _opt("", "eval split", group="data", default_text="'test' when the dataset has it")
    eval_fraction: float = _opt(0.0, "hold out this fraction of the training split for eval instead "
                                "(at most --max-eval-pairs pairs; the rest trains)", group="data")
    max_length: int = _opt(1024, "tokens per sequence (prompt + completion); the start is kept", group="data")
    max_train_pairs: int = _opt(0, "use only the first N training pairs (0 = all)", group="data")
    max_eval_pairs: int = _opt(0, "use only the first N eval pairs (0 = all)", group="data")
    skip_invalid: bool = _opt(False, "skip malformed rows (counted in the log) instead of stopping", group="data")
    padding_free: Optional[bool] = _opt(None, "run each micro-batch as one row of packed sequences, no padding",
                                        group="data", default_text="on where the model's attention supports it")
    share_prompt: bool = _opt(False, "run each pair as one sequence [prompt, chosen, rejected], the prompt "
                              "computed once (padding-free, with a custom attention mask)", group="data")
    max_tokens: int = _opt(0, "fill micro-batches with whole pairs up to N token positions instead of "
                           "--batch-size pairs (0 = off; give one of the two)", group="data")

    ref: str = _opt("copy", "reference: frozen copy, precomputed log-probs, LoRA base (adapter), or none",
                    choices=REF_MODES, group="reference")
    ref_cache_dir: str = _opt("", "where --ref precompute caches log-probs", group="reference",
                              default_text="~/.cache/fastdpo/ref_logps")

    loss_type: Optional[str] = _opt(None, "a loss name, or several joined by commas, summed (weights: "
                                    "--loss-options loss_weights); one of: {losses}", group="loss")
    loss_impl: str = _opt("fused", "fused (from logits), fused_linear (from hidden states), or reference "
                          "(pure PyTorch)", choices=LOSS_IMPLS, group="loss")
    beta: float = _opt(0.1, "inverse temperature of the implicit reward", group="loss")
    label_smoothing: float = _opt(0.0, "label smoothing of conservative / robust DPO", group="loss")
    logps_reduction: str = _opt("sum", "each sequence's log-prob in the loss and metrics: the sum over its "
                                "completion tokens, or their mean (Liger's average_log_prob, minimind)",
                                choices=LOGPS_REDUCTIONS, group="loss")
    loss_options: dict = field(default_factory=dict, metadata={
        "help": "extra loss options as JSON, e.g. '{\"simpo_gamma\": 0.5}' or '{\"loss_weights\": [1, 0.2]}'",
        "group": "loss", "default_text": "{}"})
    inplace_backward: bool = _opt(False, "write the logits gradient over the logits (fused only)", group="loss")

    learning_rate: Optional[float] = _opt(None, "AdamW learning rate", group="optimisation")
    batch_size: Optional[int] = _opt(None, "pairs per device per micro-batch", group="optimisation")
    grad_accum: int = _opt(1, "micro-batches per optimizer step", group="optimisation")
    max_steps: Optional[int] = _opt(None, "optimizer steps (0 = use --num-epochs)", group="optimisation")
    num_epochs: float = _opt(1.0, "epochs over the training pairs when --max-steps is 0", group="optimisation")
    lr_scheduler: str = _opt("cosine", "decay after warm-up", choices=SCHEDULERS, group="optimisation")
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent warming up the learning rate", group="optimisation")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="optimisation")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = no clipping)", group="optimisation")
    cpu_threads: Optional[int] = _opt(None, "torch threads when training on CPU (0 = torch's default; the embedded "
                                      "model's matrices are too small for threads to pay)", group="optimisation")
    seed: int = _opt(42, "seed of the weights (embedded model), the data order and the RNGs", group="optimisation")
    sft_steps: Optional[int] = _opt(None, "supervised warm-up steps on the chosen answers before DPO",
                                    group="optimisation")
    sft_learning_rate: Optional[float] = _opt(None, "warm-up learning rate", group="optimisation")

    run_dir: str = _opt("", "where metrics, checkpoints and the final model go", group="run",
                        default_text="runs/<time>")
    logging_steps: int = _opt(10, "log metrics every N steps", group="run")
    eval_steps: Optional[int] = _opt(None, "evaluate every N steps and at the end (0 = only at the end)", group="run")
    task_eval_prompts: Optional[int] = _opt(None, "greedy-decode this many held-out prompts before the first DPO "
                                            "step and at each eval, and check the answers by the task's rule "
                                            "(eval/task_success; only the embedded task has a rule)", group="run",
                                            default_text=f"100 for {EMBEDDED_DATASET}, 0 otherwise")
    save_steps: int = _opt(500, "checkpoint every N steps (and always at the end and on Ctrl-C; "
                           "0 = never periodically)", group="run")
    save_total_limit: int = _opt(2, "checkpoints kept (0 = all)", group="run")
    resume: bool = _opt(False, "continue the run in --run-dir with its saved options, from its latest "
                        "checkpoint (or from the start when it has none)", group="run")
    progress_bar: bool = _opt(True, "show a tqdm progress bar", group="run")

    @property
    def embedded_model(self) -> bool:
        return self.model == EMBEDDED_MODEL

    @property
    def loss_types(self) -> list[str]:
        names = self.loss_type
        if names is None:  # not resolved yet: the default for this model
            names = (EMBEDDED_DEFAULTS if self.embedded_model else MODEL_DEFAULTS)["loss_type"]
        return [t.strip() for t in names.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Values for the None ("auto") fields: with these the embedded model learns its task in about half
# a minute on two CPU cores; the others are usual starting points for DPO on a pretrained LLM.
# The embedded model's loss adds the chosen answers' NLL to DPO's (RPO): with the sigmoid loss alone
# both likelihoods fall and greedy answers get worse while reward accuracy rises (see README).
EMBEDDED_DEFAULTS = dict(learning_rate=1e-3, batch_size=32, max_steps=200, sft_steps=150,
                         sft_learning_rate=3e-3, eval_steps=50, cpu_threads=1, loss_type="sigmoid,sft")
MODEL_DEFAULTS = dict(learning_rate=5e-7, batch_size=4, max_steps=0, sft_steps=0,
                      sft_learning_rate=2e-5, eval_steps=200, cpu_threads=0, loss_type="sigmoid")


def check_given(cfg: TrainConfig) -> None:
    """Conflicts between options as the user gave them, before the run's saved options (--resume)
    and the defaults fill in the others (after that, a default batch size is indistinguishable
    from a chosen one)."""
    if cfg.max_tokens and cfg.batch_size is not None:
        raise ConfigError(f"--batch-size {cfg.batch_size} and --max-tokens {cfg.max_tokens} conflict: a micro-batch "
                          "is either a number of pairs or a token budget; give one")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` with the auto (None) fields filled in and a default run directory."""
    if cfg.resume and not cfg.run_dir:
        raise ConfigError("--resume needs --run-dir: the directory of the run to continue")
    table = EMBEDDED_DEFAULTS if cfg.embedded_model else MODEL_DEFAULTS
    filled = {k: v for k, v in table.items() if getattr(cfg, k) is None}
    if cfg.task_eval_prompts is None:  # a property of the data, not of the model
        filled["task_eval_prompts"] = 100 if cfg.dataset == EMBEDDED_DATASET else 0
    if not cfg.run_dir:
        filled["run_dir"] = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return dataclasses.replace(cfg, **filled)


def check(cfg: TrainConfig) -> None:
    """Reject bad values and conflicting options (one line each); touches no file or model."""
    _choice(cfg, "ref", REF_MODES)
    _choice(cfg, "loss_impl", LOSS_IMPLS)
    _choice(cfg, "lr_scheduler", SCHEDULERS)
    _choice(cfg, "dtype", DTYPES)
    _choice(cfg, "mixed_precision", MIXED_PRECISION)
    _choice(cfg, "logps_reduction", LOGPS_REDUCTIONS)
    _choice(cfg, "attn_implementation", ATTENTION)
    for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{_flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "sft_steps", "eval_steps", "save_steps", "save_total_limit", "lora_r",
                 "max_train_pairs", "max_eval_pairs", "cpu_threads", "task_eval_prompts", "max_tokens"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("learning_rate", "sft_learning_rate", "num_epochs"):
        if not 0 < getattr(cfg, name) < math.inf:  # (NaN fails every comparison)
            raise ConfigError(f"--{_flag(name)} must be > 0 and finite, got {getattr(cfg, name)}")
    for name in ("weight_decay", "max_grad_norm"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ConfigError(f"--{_flag(name)} must be >= 0 and finite, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range
        raise ConfigError(f"--seed must be in [0, 2^32), got {cfg.seed}")
    if cfg.lora_r and not 0 < cfg.lora_alpha < math.inf:
        raise ConfigError(f"--lora-alpha must be > 0 and finite, got {cfg.lora_alpha}")
    if cfg.lora_r and not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.dtype == "float16" and not cfg.lora_r:
        raise ConfigError("--dtype float16 needs LoRA (--lora-r > 0): AdamW on float16 weights, with no float32 "
                          "master copy, turns small updates into 0, NaN or -inf; use bfloat16, or float32 with "
                          "--mixed-precision bf16")
    if cfg.eval_split and cfg.eval_split == cfg.split:
        raise ConfigError(f"--eval-split {cfg.eval_split} is the training split: its eval would not be held out "
                          "(use another split or --eval-fraction)")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ConfigError(f"--warmup-ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.eval_fraction and cfg.eval_split:
        raise ConfigError("--eval-split and --eval-fraction conflict: choose one source of eval pairs")
    if cfg.task_eval_prompts and cfg.dataset != EMBEDDED_DATASET:
        raise ConfigError(f"--task-eval-prompts needs a task with an answer rule; only {EMBEDDED_DATASET} has one")
    if not isinstance(cfg.loss_options, dict):
        raise ConfigError(f"--loss-options must be a JSON object, got {cfg.loss_options!r}")
    flagged = sorted(set(cfg.loss_options) & {"loss_type", "beta", "label_smoothing", "logps_reduction"})
    if flagged:
        raise ConfigError(f"--loss-options: give {flagged[0]} as --{_flag(flagged[0])}")
    losses = loss_config(cfg)  # unknown loss types and bad hyper-parameters fail here
    if cfg.ref == "none" and losses.needs_reference:
        raise ConfigError(f"--ref none conflicts with --loss-type {cfg.loss_type}, which needs a reference; "
                          "use --ref copy/precompute/adapter or a reference-free loss")
    if cfg.lora_r:
        from ..extras import MissingExtra, require

        try:
            require(["peft"], "lora", "--lora-r")
        except MissingExtra as e:
            raise ConfigError(str(e)) from None
    if cfg.ref == "adapter" and cfg.lora_r == 0:
        raise ConfigError("--ref adapter needs LoRA (--lora-r > 0): the reference is the base model with adapters off")
    if cfg.ref == "adapter" and cfg.sft_steps:
        raise ConfigError("--ref adapter conflicts with --sft-steps: the warm-up would train the adapters, "
                          "so the base model would not be the starting policy")
    if cfg.share_prompt and cfg.padding_free is False:
        raise ConfigError("--share-prompt runs pairs padding-free; it conflicts with --no-padding-free")
    if cfg.inplace_backward and cfg.loss_impl != "fused":
        raise ConfigError("--inplace-backward applies to --loss-impl fused only")


def loss_config(cfg: TrainConfig) -> LossConfig:
    """fastdpo's LossConfig for these options; unknown names and bad values become ConfigErrors."""
    known = {f.name for f in dataclasses.fields(LossConfig) if f.init}
    unknown = sorted(set(cfg.loss_options) - known)
    if unknown:
        raise ConfigError(f"--loss-options: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    types = cfg.loss_types
    try:
        return LossConfig(loss_type=types[0] if len(types) == 1 else types, beta=cfg.beta,
                          label_smoothing=cfg.label_smoothing, logps_reduction=cfg.logps_reduction,
                          **cfg.loss_options)
    except (ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"--loss-type {cfg.loss_type}: {e}") from None


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        raise ConfigError(f"--{_flag(name)} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# Command line: one flag per field, the same names.


# Help groups in display order: (metadata key, title, description).
GROUPS = [
    ("model", "model", None),
    ("data", "data", None),
    ("reference", "reference", "the frozen policy whose log-probs the DPO rewards are measured against"),
    ("loss", "loss", None),
    ("optimisation", "optimisation", None),
    ("run", "run, eval and checkpoints", None),
    ("distributed", "distributed", "launch with `accelerate launch --config_file CONFIG -m fastdpo.train [options]` "
     "for DDP, FSDP2 or DeepSpeed (ready configs: examples/accelerate/ in fastdpo's repository); --batch-size is per process, so the global batch is "
     "batch-size x processes x grad-accum"),
]


class _Toggle(argparse.BooleanOptionalAction):
    """--flag / --no-flag, with the help text as given (Python <= 3.12 appends a second default)."""

    def __init__(self, *args: Any, help: str | None = None, **kw: Any) -> None:
        super().__init__(*args, help=help, **kw)
        self.help = help


def build_parser(prog: str = "fastdpo train", defaults: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with one `--field-name` option per TrainConfig field, in help groups.

    Options must be spelled out: `--lr` is an error, not `--lr-scheduler`. With defaults=False,
    options not on the command line are left out of the result (to tell which were given)."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=_HelpFormatter, usage="%(prog)s [options]",
        description="DPO training with fastdpo's fused losses. With no options it trains the embedded tiny model "
        f"({EMBEDDED_MODEL}) on the embedded preference task ({EMBEDDED_DATASET}); defaults marked 'for "
        f"{EMBEDDED_MODEL}' apply to it, the other value to any other model.")
    groups = {key: parser.add_argument_group(title, description) for key, title, description in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        kw: dict[str, Any] = {"help": _help(f.name, meta), "dest": f.name}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if f.type in ("bool", bool, "Optional[bool]"):
            kw["action"] = _Toggle
        elif f.name == "loss_options":
            kw.update(type=_json_object, metavar="JSON")
        else:
            kw["type"] = _scalar_type(f.type)
            kw["metavar"] = {int: "N", float: "X"}.get(kw["type"]) if "choices" not in kw else None
        groups[meta.get("group", "run")].add_argument("--" + _flag(f.name), **kw,
                                                      default=default if defaults else argparse.SUPPRESS)
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=min(110, shutil.get_terminal_size().columns))


def _help(name: str, meta: dict) -> str:
    """The field's help with its default stated once: the embedded model's and the others' when they differ."""
    from ..losses import LOSSES

    text = meta["help"].replace("{losses}", ", ".join(sorted(LOSSES)))
    field_ = TrainConfig.__dataclass_fields__[name]
    default = field_.default
    if "default_text" in meta:
        shown = meta["default_text"]
    elif name in EMBEDDED_DEFAULTS:
        shown = f"{_num(EMBEDDED_DEFAULTS[name])} for {EMBEDDED_MODEL}, {_num(MODEL_DEFAULTS[name])} otherwise"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = _num(default)
    return f"{text} (default: {shown})".replace("%", "%%")


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


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
    return parse_args_given(argv, prog)[0]


def parse_args_given(argv: list[str] | None = None, prog: str = "fastdpo train") -> tuple[TrainConfig, set[str]]:
    """TrainConfig from command-line flags, and the names of the fields the flags set explicitly."""
    cfg = TrainConfig(**vars(build_parser(prog).parse_args(argv)))
    given = set(vars(build_parser(prog, defaults=False).parse_args(argv)))
    return cfg, given


# ----------------------------------------------------------------------------------------------
# Resume: the run's saved options, and which ones may change

# Options that leave what is trained unchanged (where output goes, how often to log / eval / save,
# speed knobs) and the run length. Every other option, including ones added later, must keep the
# run's saved value: a resumed run with another model, data, loss, beta, batch layout or learning
# rate would be neither run.
RESUME_FREE = frozenset({
    "run_dir", "resume", "progress_bar", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
    "task_eval_prompts", "max_eval_pairs", "eval_split", "ref_cache_dir", "cpu_threads",
    "gradient_checkpointing", "inplace_backward", "max_steps", "num_epochs", "attn_implementation",
})
SAVED_CONFIG = "config.json"


def read_saved_config(run_dir: str) -> dict[str, Any] | None:
    """The options saved in run_dir/config.json, or None when there is none."""
    path = os.path.join(run_dir, SAVED_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume: cannot read {path} ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} does not hold a fastdpo configuration")
    return saved


def merge_saved(cfg: TrainConfig, saved: dict[str, Any], given: set[str] | None = None) -> TrainConfig:
    """`cfg` for continuing the run whose options are `saved`: options not given take the saved
    value; a given option that changes what is trained (not in RESUME_FREE) must equal it.

    `given`: the options set explicitly (the command line's flags); None means every option
    whose value is not its default (the Python API)."""
    defaults = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if given is None:
        given = {n for n in fields if getattr(cfg, n) != getattr(defaults, n)}
    merged = {}
    free = RESUME_FREE
    if saved.get("eval_fraction"):  # the cap on held-out pairs then decides which pairs train
        free = free - {"max_eval_pairs"}
    for name in fields & set(saved):
        value, old = getattr(cfg, name), saved[name]
        if name not in given:
            merged[name] = old
        elif name not in free and value != old:
            raise ConfigError(f"--resume: --{_flag(name)} {_show(value)} differs from this run's {_show(old)} "
                              f"({os.path.join(cfg.run_dir, SAVED_CONFIG)}); only run length, logging, eval and "
                              "checkpoint options may change when resuming")
    return dataclasses.replace(cfg, **merged)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
