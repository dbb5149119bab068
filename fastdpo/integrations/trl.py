"""TRL's DPOTrainer on fastdpo's kernels: same config, data, callbacks and logging; one line to switch.

    from trl import DPOConfig
    from fastdpo.integrations.trl import FastDPOTrainer

    trainer = FastDPOTrainer(model=model, ref_model=ref, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()   # or: patch_trainer(existing_dpo_trainer); FastDPOTrainer(..., fastdpo_mode="linear")

What changes: the policy and reference log-probs (and TRL's precompute pass) come from fastdpo's
head (see `fastdpo.head`): by default the from-logits kernel over the completion
positions only, or with `fastdpo_mode="linear"` the fused-linear path (hidden states and
`lm_head.weight`, the logits are never built); the loss comes from `fastdpo.losses`, one term per
TRL loss type with TRL's weights. Everything else is TRL's: batches are [chosen; rejected] rows
from its collator, labels are the input ids outside the completion mask set to -100 and shifted
by one, precomputed `ref_chosen_logps` / `ref_rejected_logps` columns are used as given, and the
metrics are TRL's names with TRL's meaning (rewards/*, logps/*, logits/* as the mean score over
vocabulary and completion tokens, entropy, mean_token_accuracy, num_tokens), gathered as TRL does.

Every DPOConfig loss option of these TRL versions is honoured with TRL's numbers: f-divergences
(`f_divergence_type`, `f_alpha_divergence_coef`, in fastdpo.losses), WPO (`use_weighting`: the
per-token log sum_v p_v^2 comes from the same kernel pass as the log-probs), LD-DPO (`ld_alpha`:
each row's scored tokens split at the shorter answer's length as segments of the same pass, no
per-token tensor beyond [B, T]), and TRL's completion-token counts for `ipo` / `sigmoid_norm`.
One difference: TRL 1.16 fails on `use_weighting=True` with `"sft"` in `loss_type` (an in-place
multiply of its expanded sft term); here that term is weighted like the others (the sft value
times the mean pair weight).

Several processes (accelerate's DDP and FSDP2; tests/test_trl_distributed.py): nothing to set, the
head runs inside the wrapped model's forward, where DDP sees it and FSDP2 has gathered `lm_head`;
`precompute_ref_log_probs` there needs datasets with cache files (`check_precompute_datasets`).

Supported TRL versions: SUPPORTED_TRL (checked at import). What fastdpo does not do (MoE router
loss, vision models, loss types with no fastdpo twin) raises at construction instead of training
differently. `use_liger_kernel` keeps meaning what it means in these TRL versions (Liger's layer
kernels; the LM head is ours).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from dataclasses import fields
from typing import Any

import torch

from ..extras import require

require(["trl"], "trl", "fastdpo.integrations.trl")

import trl  # noqa: E402
from packaging.version import Version  # noqa: E402

# The DPOTrainer internals this module relies on (`_compute_loss`, `compute_ref_log_probs(model, inputs)`,
# the fused-LM-head metrics set, attribute names) are those of TRL 1.15 and 1.16; 1.14 and older
# compute log-probs from full logits with another metrics set, and later versions are unknown.
SUPPORTED_TRL = (Version("1.15.0"), Version("1.17.0"))  # [min, max)
SUPPORTED_TRL_SPEC = f"trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}"


def check_trl_version(version: str) -> None:
    """Raise ImportError unless `version` is in the range this integration was written and tested for."""
    low, high = SUPPORTED_TRL
    try:
        parsed = Version(version)
    except Exception as err:  # packaging's InvalidVersion, or a non-string
        raise ImportError(f"fastdpo.integrations.trl supports {SUPPORTED_TRL_SPEC}; cannot read trl version {version!r}") from err
    if not low <= Version(parsed.base_version) < high:
        raise ImportError(
            f"fastdpo.integrations.trl supports {SUPPORTED_TRL_SPEC} (it overrides DPOTrainer internals that "
            f"change between releases); found trl {version}. Install a supported version, e.g. "
            f"pip install '{SUPPORTED_TRL_SPEC}'"
        )


check_trl_version(trl.__version__)

from accelerate.utils import is_peft_model  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from ..attention import activation_dtype, layout_support, model_inputs  # noqa: E402
from ..head import HeadOptions, RowStats, install_head  # noqa: E402
from ..layouts import LayoutBatch, build, pairs_from_padded  # noqa: E402
from ..losses import COUPLED_LOSSES, F_DIVERGENCES, LOSSES, LossConfig, wpo_weights  # noqa: E402
from ..objective import loss_from_rows  # noqa: E402
from .fsdp_reference import reference_from_rank0  # noqa: E402

# The loss types of DPOTrainer in the supported TRL versions.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# TRL loss type -> fastdpo loss name, where they differ (none today: fastdpo uses TRL's names). Every
# other TRL name maps to itself and is supported when fastdpo.losses.LOSSES has it (checked when a
# trainer is built, so new losses are picked up as they land).
TRL_TO_FASTDPO: dict[str, str] = {}
# TRL applies label_smoothing only in these loss types (its "sigmoid" ignores it).
SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}
# TRL normalizes these by the completion-mask count before the shift (the others count scored tokens).
UNSHIFTED_COUNTS = {"ipo", "sigmoid_norm"}
# TRL's sft term is the mean per-token log-prob of the chosen tokens, never LD-DPO's weighted sum.
UNWEIGHTED_LOGPS = {"sft"}
_CORE_FIELDS = {"loss_type", "loss_weights", "beta", "label_smoothing", "use_weighting"}
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# The start of TRL 1.16's warning that `padding_free=True` is ignored (see _without_trl_padding_free_warning).
_TRL_FALLBACK = "`padding_free=True` is temporarily unavailable"
_logger = logging.getLogger(__name__)


def fastdpo_loss_name(trl_loss_type: str) -> str:
    return TRL_TO_FASTDPO.get(trl_loss_type, trl_loss_type)


def supported_loss_types(candidates=TRL_LOSS_TYPES) -> list[str]:
    """The TRL loss types among `candidates` that fastdpo implements right now."""
    return [t for t in candidates if fastdpo_loss_name(t) in LOSSES]


def check_args(args: Any) -> None:
    """Reject DPOConfig settings the fastdpo path cannot reproduce, before any work is done."""
    if args is None:
        return
    missing = [t for t in args.loss_type if fastdpo_loss_name(t) not in LOSSES]
    if missing:
        raise ValueError(
            f"loss_type {missing} has no fastdpo implementation; fastdpo implements these TRL loss types: "
            f"{supported_loss_types(TRL_LOSS_TYPES)}"
        )
    # TRL itself refuses the combinations it does not define (f-divergences with losses outside its
    # list, WPO with the aot family) when DPOTrainer is built; an unknown f-divergence it only meets
    # in the first loss computation, so refuse that here, before any work.
    if args.f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {args.f_divergence_type!r}")


def check_precompute_datasets(args: Any, named_datasets: dict[str, Any]) -> None:
    """Refuse `precompute_ref_log_probs` on several processes with a dataset that has no cache files.

    TRL (1.15, 1.16) computes the reference log-probs on all ranks, then rank 0 writes them to a file
    beside the dataset's cache files and every rank reads that file back. A dataset built in memory
    (`Dataset.from_list`, `from_dict`, ...) or with datasets' caching off has no such place: each
    process draws its own random file name and every rank but 0 fails with FileNotFoundError.
    """
    if args is None or not getattr(args, "precompute_ref_log_probs", False) or args.world_size <= 1:
        return
    from datasets import Dataset, is_caching_enabled

    for name, dataset in named_datasets.items():
        for split, part in (dataset.items() if isinstance(dataset, dict) else [(None, dataset)]):
            if isinstance(part, Dataset) and not (part.cache_files and is_caching_enabled()):
                label = name if split is None else f"{name}[{split!r}]"
                raise ValueError(
                    f"{label} has no cache files (built in memory, or datasets' caching is off), and "
                    f"precompute_ref_log_probs=True on {args.world_size} processes needs them: TRL shares the "
                    "precomputed log-probs between ranks through a file beside the dataset's cache; save it and "
                    "load it back (Dataset.save_to_disk then datasets.load_from_disk, or datasets.load_dataset "
                    "from files)"
                )


def check_adapters(configs) -> None:
    """PEFT adapters the head can serve: those on the model's weights (LoRA and its kin). Prompt
    learning (prompt, prefix, p-tuning) adds virtual tokens that move the scored positions."""
    if any(getattr(c, "is_prompt_learning", False) for c in configs):
        raise NotImplementedError(
            "fastdpo's TRL integration supports adapters on the model's weights (LoRA and its kin), not PEFT prompt "
            "learning (prompt, prefix or p-tuning), whose virtual tokens move the scored positions; use trl.DPOTrainer"
        )


def _check_trainer(trainer: DPOTrainer) -> None:
    """Model-level checks, once TRL has built the trainer."""
    if getattr(trainer, "_is_vlm", False) or getattr(trainer, "_is_vision_dataset", False):
        raise NotImplementedError("fastdpo's TRL integration supports text-only causal LMs, not vision models")
    inner = trainer.accelerator.unwrap_model(trainer.model)
    check_adapters(inner.peft_config.values() if is_peft_model(inner) else ())
    if getattr(trainer, "aux_loss_enabled", False):
        raise NotImplementedError(
            "fastdpo's TRL integration does not add the MoE router load-balancing loss; set router_aux_loss_coef=0.0 "
            "or use trl.DPOTrainer"
        )
    if trainer.fastdpo_options.mode == "linear" and trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise NotImplementedError("fastdpo_mode='linear' reads lm_head.weight directly and does not support ZeRO-3")


def requested_layout(args: Any, share_prompt: bool, padding_free: bool | None) -> str:
    """fastdpo's batch layout for these options: shared, packed (padding-free) or padded."""
    if share_prompt and padding_free is False:
        raise ValueError("share_prompt=True runs pairs padding-free; it conflicts with padding_free=False")
    if share_prompt:
        return "shared"
    if padding_free is None:
        padding_free = bool(getattr(args, "padding_free", False))
    return "packed" if padding_free else "padded"


def check_layout(trainer: DPOTrainer, layout: str) -> str:
    """`layout`, once checked against the trainer's model and collator; raises with the reason."""
    if layout == "padded":
        return layout
    truncating = getattr(trainer.args, "max_length", None) is not None
    if truncating and getattr(trainer.args, "truncation_mode", "keep_start") != "keep_start":
        raise ValueError(f"fastdpo's {layout} layout needs truncation_mode='keep_start' or max_length=None (with "
                         "keep_end the chosen and rejected rows of a pair may keep different parts of the prompt)")
    inner = trainer.accelerator.unwrap_model(trainer.model)
    lm = inner.get_base_model() if is_peft_model(inner) else inner
    reason = layout_support(type(lm), lm.config, layout)
    if reason is not None:
        option = "share_prompt" if layout == "shared" else "padding_free"
        raise ValueError(f"{option}=True: {reason}")
    return layout


class FastDPOMixin:
    """Overrides of DPOTrainer's log-prob, reference and loss computation; everything else is TRL's."""

    fastdpo_options: HeadOptions

    # ---- the head -------------------------------------------------------------------------------
    def _fastdpo_inputs(self, inputs: dict) -> tuple[dict, LayoutBatch | torch.Tensor]:
        """(model kwargs, what the head scores) of one of TRL's padded batches: its own kwargs and
        labels, or with padding_free / share_prompt the same pairs re-laid out (fastdpo.layouts)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.fastdpo_layout == "padded":
            return model_kwargs, inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        extra = sorted(set(model_kwargs) - {"input_ids", "attention_mask", "use_cache"})
        if extra:
            raise NotImplementedError(f"fastdpo's {self.fastdpo_layout} layout takes input_ids alone; this batch also "
                                      f"has {extra}")
        pairs = pairs_from_padded(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        batch = build(self.fastdpo_layout, pairs, range(len(pairs)), pad_id=0)
        return {"use_cache": False}, batch.to(inputs["input_ids"].device)

    def _fastdpo_rows(self, model, model_kwargs: dict, scored: LayoutBatch | torch.Tensor, call: str,
                      **extra) -> RowStats:
        """Per-row statistics from `model` (any wrapper of a causal LM) through the fastdpo head."""
        inner = self.accelerator.unwrap_model(model)
        lm = inner.get_base_model() if is_peft_model(inner) else inner
        install_head(lm, self.fastdpo_options)
        # The head is installed after Accelerate wrapped the forward for mixed precision, so enter the same
        # autocast here (a no-op without mixed precision, harmless when nested).
        with self.accelerator.autocast():
            if isinstance(scored, LayoutBatch):
                layout = model_inputs(scored, lm.config, activation_dtype(lm))
                return model(**model_kwargs, **layout, fastdpo_scoring=scored.scoring, fastdpo_head=call, **extra)
            return model(**model_kwargs, labels=scored, fastdpo_head=call, **extra)

    def _fastdpo_reference(self, model, model_kwargs: dict, labels: LayoutBatch | torch.Tensor) -> torch.Tensor:
        """The reference's per-row log-probs (LD-DPO-weighted as TRL's with ld_alpha): the ref model,
        or the policy with its adapter swapped."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter:
            return self._fastdpo_ld_logps(self._fastdpo_rows(model, model_kwargs, labels, "reference")).detach()

    def compute_ref_log_probs(self, model, inputs):
        """TRL's precompute pass (one batch of its collator), through the fastdpo head."""
        model_kwargs, scored = self._fastdpo_inputs(inputs)
        model_kwargs.update(self._fastdpo_split(inputs["completion_mask"]))
        return self._fastdpo_reference(model, model_kwargs, scored).chunk(2, dim=0)

    # ---- LD-DPO ---------------------------------------------------------------------------------
    def _fastdpo_split(self, completion_mask: torch.Tensor) -> dict:
        """With ld_alpha, the head's `fastdpo_shared` argument: each row's shared length, TRL's
        min(scored tokens of the chosen, of the rejected answer) of its pair; else nothing."""
        if self.args.ld_alpha is None:
            return {}
        lengths = completion_mask[:, 1:].sum(-1)  # TRL counts the shifted mask: the scored tokens
        chosen, rejected = lengths.chunk(2, dim=0)
        return {"fastdpo_shared": torch.minimum(chosen, rejected).repeat(2)}

    def _fastdpo_ld_logps(self, rows: RowStats) -> torch.Tensor:
        """TRL's LD-DPO log-probs: shared part + ld_alpha * tail (the plain sums without ld_alpha)."""
        if self.args.ld_alpha is None:
            return rows.logps
        return (rows.logps - rows.tail_logps) + self.args.ld_alpha * rows.tail_logps

    # ---- the loss -------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs, scored = self._fastdpo_inputs(inputs)
        completion_mask = inputs["completion_mask"]
        split = self._fastdpo_split(completion_mask)
        # The reference first: in "linear" mode the policy pass can then build its gradients in the forward.
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model
            ref = self._fastdpo_reference(ref_model, {**model_kwargs, **split}, scored)
        extra = dict(split)
        if self.fastdpo_options.mode == "linear" and (spec := self._fastdpo_grad_spec()) is not None:
            extra["fastdpo_grad"] = (spec, ref.detach().float())
        policy = self._fastdpo_rows(model, model_kwargs, scored, "policy", **extra)
        ref = ref.to(policy.logps.device)
        loss = self._fastdpo_loss(policy, ref, completion_mask)
        self._fastdpo_log(mode, policy, ref, inputs)
        if not return_outputs:
            return loss
        warnings.warn(
            "return_outputs=True recomputes the logits with an extra forward pass (deprecated in TRL)",
            FutureWarning, stacklevel=2,
        )
        with torch.no_grad():
            return loss, model(**{k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS})

    def _fastdpo_loss(self, policy: RowStats, ref: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """sum_k weight_k * mean(loss_k), one fastdpo loss per TRL loss type with TRL's hyper-parameters."""
        unshifted = completion_mask.sum(dim=1)
        weights = None
        if self.args.use_weighting:  # TRL's WPO weights: plain per-token log-probs over the scored tokens
            weights = wpo_weights(policy.logps, policy.log_sum_sq_sums, policy.counts)
        ld_logps = self._fastdpo_ld_logps(policy)
        loss = None
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            cfg = self._fastdpo_config(loss_type)
            counts = unshifted if loss_type in UNSHIFTED_COUNTS else policy.counts
            logps = policy.logps if loss_type in UNWEIGHTED_LOGPS else ld_logps
            term = loss_from_rows(logps, ref, counts.to(logps.device), cfg, pair_weights=weights) * weight
            loss = term if loss is None else loss + term
        return loss

    def _fastdpo_grad_spec(self) -> str | None:
        """TRL's whole loss as one fastdpo loss spec, for gradients in the forward; None when it is not one.

        A spec that is off for a batch (IPO's count of an unscored first completion token) only costs
        speed: the op's backward sees the mismatch and recomputes exactly.
        """
        names = [fastdpo_loss_name(t) for t in self.loss_types]
        smoothed = {t in SMOOTHED for t in self.loss_types if t in SMOOTHED or t == "sigmoid"}
        if any(n in COUPLED_LOSSES for n in names) or (self.label_smoothing and len(smoothed) > 1):
            return None  # pairs coupled by sorting, or eps read by some types and not others
        if self.args.ld_alpha is not None:
            return None  # LD-DPO's rows are split in two segments, which a loss spec does not describe
        cfg = self._fastdpo_config(self.loss_types[0])
        options = dict(loss_type=names, loss_weights=list(self.loss_weights), beta=self.beta,
                       label_smoothing=self.label_smoothing if smoothed == {True} else 0.0,
                       use_weighting=bool(self.args.use_weighting),
                       **{f.name: getattr(cfg, f.name) for f in fields(LossConfig)
                          if f.init and f.name not in _CORE_FIELDS})
        return LossConfig(**options).encode()

    def _fastdpo_config(self, loss_type: str) -> LossConfig:
        name = fastdpo_loss_name(loss_type)
        if name not in LOSSES:
            raise ValueError(f"loss_type {loss_type!r} has no fastdpo implementation (looked for {name!r})")
        # Loss-specific hyper-parameters share TRL's names (e.g. discopop_tau): take them from the DPOConfig.
        extra = {f.name: getattr(self.args, f.name) for f in fields(LossConfig)
                 if f.init and f.name not in _CORE_FIELDS and hasattr(self.args, f.name)}
        eps = self.label_smoothing if loss_type in SMOOTHED else 0.0
        return LossConfig(loss_type=name, beta=self.beta, label_smoothing=eps,
                          use_weighting=bool(self.args.use_weighting), **extra)

    # ---- the metrics ----------------------------------------------------------------------------
    def _fastdpo_log(self, mode: str, policy: RowStats, ref: torch.Tensor, inputs: dict) -> None:
        """TRL's metrics, names and gathering, from per-row sums."""
        metrics, gather = self._metrics[mode], self.accelerator.gather_for_metrics
        logps = self._fastdpo_ld_logps(policy).detach()
        P = logps.shape[0] // 2
        chosen_tokens, rejected_tokens = policy.counts[:P].sum(), policy.counts[P:].sum()

        def ratio(total: torch.Tensor, count: torch.Tensor) -> float:
            total, count = gather(total).sum().item(), gather(count).sum().item()
            return total / count if count > 0 else 0.0

        if policy.entropy_sums is not None:
            metrics["entropy"].append(ratio(policy.entropy_sums.sum(), policy.counts.sum()))
        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if policy.score_sums is not None:
            # TRL's logits/*: the mean score over the vocabulary, averaged over completion tokens.
            metrics["logits/chosen"].append(ratio(policy.score_sums[:P].sum() / policy.vocab, chosen_tokens))
            metrics["logits/rejected"].append(ratio(policy.score_sums[P:].sum() / policy.vocab, rejected_tokens))
        if policy.top1_counts is not None:
            metrics["mean_token_accuracy"].append(ratio(policy.top1_counts[:P].sum(), chosen_tokens))
        chosen_rewards = self.beta * (logps[:P] - ref[:P].to(logps.dtype))
        rejected_rewards = self.beta * (logps[P:] - ref[P:].to(logps.dtype))
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(logps[:P]).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(logps[P:]).mean().item())


class FastDPOTrainer(FastDPOMixin, DPOTrainer):
    """`trl.DPOTrainer` with fastdpo computing the log-probs and the loss.

    Args (besides DPOTrainer's):
        fastdpo_mode: "logits" (from-logits kernel on the completion positions) or "linear"
            (fused linear: hidden states and lm_head weight, the logits are never built).
        fastdpo_token_metrics: also log TRL's `entropy` and `mean_token_accuracy`, from the same
            kernel pass as the log-probs (no extra pass over the scores; `logits/*` are logged either way).
        fastdpo_inplace_backward: in "logits" mode, write the logits gradient over the logits.
        share_prompt: run each pair as one sequence [prompt, chosen, rejected] (the prompt computed
            once; needs sdpa, eager or flex attention). Implies padding-free batches.
        padding_free: run each batch as one row of packed sequences, no padding (default: the
            DPOConfig's `padding_free`, which TRL itself currently ignores).
    """

    def __init__(self, *args: Any, fastdpo_mode: str = "logits", fastdpo_token_metrics: bool = True,
                 fastdpo_inplace_backward: bool = True, share_prompt: bool = False, padding_free: bool | None = None,
                 **kwargs: Any) -> None:
        # Set before DPOTrainer.__init__: its reference precompute already runs through fastdpo
        # (padded: the values are per pair, so any layout can use them).
        given = inspect.signature(DPOTrainer.__init__).bind(self, *args, **kwargs).arguments
        config = given.get("args")
        check_args(config)
        model = given.get("model")
        check_adapters([given["peft_config"]] if given.get("peft_config") is not None else
                       model.peft_config.values() if isinstance(model, torch.nn.Module) and is_peft_model(model)
                       else ())  # (the model may be a name or path, which TRL loads)
        check_precompute_datasets(config, {name: given[name] for name in ("train_dataset", "eval_dataset")
                                           if given.get(name) is not None})
        self.fastdpo_options = HeadOptions(mode=fastdpo_mode, token_metrics=fastdpo_token_metrics,
                                           inplace_backward=fastdpo_inplace_backward,
                                           log_sum_sq=bool(getattr(config, "use_weighting", False)))
        self.fastdpo_layout = "padded"
        layout = requested_layout(config, share_prompt, padding_free)
        quiet = _without_trl_padding_free_warning() if layout != "padded" else contextlib.nullcontext()
        with reference_from_rank0(), quiet:  # (FSDP2: see fsdp_reference.py)
            super().__init__(*args, **kwargs)
        self.fastdpo_layout = check_layout(self, layout)
        _check_trainer(self)


@contextlib.contextmanager
def _without_trl_padding_free_warning():
    """TRL warns that `padding_free=True` falls back to padding: true of its own path, not of
    fastdpo's packed layout, so the warning is dropped while TRL builds a trainer fastdpo packs."""
    dpo_logger = logging.getLogger(DPOTrainer.__module__)
    drop = logging.Filter()
    drop.filter = lambda record: _TRL_FALLBACK not in record.getMessage()
    dpo_logger.addFilter(drop)
    try:
        yield
    finally:
        dpo_logger.removeFilter(drop)


_PATCHED: dict[type, type] = {}


def patch_trainer(trainer: DPOTrainer, *, mode: str = "logits", token_metrics: bool = True,
                  inplace_backward: bool = True, share_prompt: bool = False,
                  padding_free: bool | None = None) -> DPOTrainer:
    """Switch an existing DPOTrainer (or subclass) instance to fastdpo in place; returns it.

    Reference log-probs it already precomputed (TRL's columns) are kept and used as they are.
    `share_prompt` and `padding_free` are FastDPOTrainer's.
    """
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"trainer must be a trl.DPOTrainer, got {type(trainer).__name__}")
    check_args(trainer.args)
    options = HeadOptions(mode=mode, token_metrics=token_metrics, inplace_backward=inplace_backward,
                          log_sum_sq=bool(trainer.args.use_weighting))
    if not isinstance(trainer, FastDPOMixin):
        cls = type(trainer)
        if cls not in _PATCHED:
            _PATCHED[cls] = type(f"FastDPO{cls.__name__}", (FastDPOMixin, cls), {"__module__": __name__})
        trainer.__class__ = _PATCHED[cls]
    trainer.fastdpo_options = options
    trainer.fastdpo_layout = check_layout(trainer, requested_layout(trainer.args, share_prompt, padding_free))
    _check_trainer(trainer)
    if trainer.fastdpo_layout != "padded" and getattr(trainer.args, "padding_free", False):
        _logger.warning("padding_free=True: fastdpo runs this trainer's batches packed (TRL's warning that it falls "
                        "back to padding is about its own path)")
    return trainer


__all__ = ["FastDPOTrainer", "FastDPOMixin", "patch_trainer", "check_trl_version", "SUPPORTED_TRL_SPEC",
           "supported_loss_types", "fastdpo_loss_name"]
