"""The distributed engines under `fastdpo train`: accelerate's set-up, the checks that refuse what
cannot work (at start, in one line), and where models and optimizer state live.

    DDP            every rank holds the whole model; gradients all-reduced
    FSDP2          fully_shard: weights, gradients and optimizer state split over the ranks
    DeepSpeed      ZeRO-1/2 split gradients and optimizer state; ZeRO-3 the weights too

Configs for each: examples/accelerate/. The loss runs inside the wrapped model's forward
(fastdpo/head.py), so every engine's own gathering of the weights applies to it.
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError, TrainConfig, loss_config


def make_accelerator(grad_accum: int, batch_size: int = 1, max_grad_norm: float = 0.0):
    """Accelerate for placement, accumulation and DDP / FSDP / DeepSpeed. Mixed precision is our
    own autocast, because accelerate's would also cast the outputs to fp32: the [tokens x vocab]
    logits copy that fastdpo exists to avoid."""
    from accelerate import Accelerator

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # step_scheduler_with_optimizer=False: we step the scheduler once per optimizer step (accelerate
    # would step it once per process and per micro-batch).
    accelerator = Accelerator(mixed_precision=None if deepspeed else "no", gradient_accumulation_steps=grad_accum,
                              step_scheduler_with_optimizer=False)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        config = plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            # DeepSpeed reads the per-GPU batch from a dataloader passed to prepare(); fastdpo batches its own.
            config["train_micro_batch_size_per_gpu"] = batch_size
        if config.get("gradient_clipping", "auto") == "auto":
            # DeepSpeed's engine clips, not clip_grad_norm_: give it --max-grad-norm (0: no clipping).
            config["gradient_clipping"] = max_grad_norm or 0.0
    return accelerator


def check_distributed(cfg: TrainConfig, accelerator) -> None:
    """Options that cannot work under the chosen distributed engine."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    asked = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(flag, "false").lower() == "true"]
    got = accelerator.distributed_type
    if launched != accelerator.num_processes or (asked and got.name != asked[0]):
        # accelerate without GPUs turns an FSDP / DeepSpeed launch into separate one-process runs (each
        # training alone into the same run directory), or with ACCELERATE_USE_CPU into plain DDP.
        raise ConfigError(f"the launch asked for {asked[0] if asked else 'DDP'} over {launched} processes but "
                          f"accelerate set up {got.value} over {accelerator.num_processes}: FSDP and DeepSpeed "
                          "need GPUs; on CPUs launch DDP (--multi_gpu with ACCELERATE_USE_CPU=true)")
    if got == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("fastdpo runs FSDP version 2 (fully_shard): set fsdp_version: 2 in the accelerate config "
                          "(examples/accelerate/fsdp2.yaml)")
    zero3 = got == DistributedType.DEEPSPEED and zero_stage(accelerator) == 3
    if zero3 and cfg.ref == "copy" and loss_config(cfg).needs_reference:
        raise ConfigError("--ref copy would hold a whole unsharded model on every GPU beside ZeRO-3; use --ref "
                          "precompute (or --ref adapter with LoRA)")
    if zero3 and cfg.loss_impl == "fused_linear":
        # ZeRO-3 gathers a module's weights only inside that module's own forward, which the fused
        # linear path never calls (it reads lm_head.weight beside the hidden states).
        raise ConfigError("--loss-impl fused_linear reads lm_head.weight outside lm_head's forward, where ZeRO-3 "
                          "holds only this GPU's slice; use --loss-impl fused, or FSDP2 (examples/accelerate/fsdp2.yaml)")


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(getattr(plugin, "zero_stage", 0) or 0)


@torch.no_grad()
def check_ranks_agree(accelerator, model, step: int) -> None:
    """Under DDP (and ZeRO-1/2, which keep whole weights) every rank must hold the same parameters
    after a step; a rank that skipped the gradient synchronisation (as TRL + Liger once silently
    did) would train its own model. One fingerprint per rank (a float64 sum of every parameter),
    compared at each logging step. Sharded weights (FSDP, ZeRO-3) differ by design: not checked."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    replicated = kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU) or \
        (kind == DistributedType.DEEPSPEED and zero_stage(accelerator) < 3)
    if accelerator.num_processes == 1 or not replicated:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    fingerprint = torch.stack([p.sum(dtype=torch.float64) for p in params]).sum().reshape(1)  # no fp64 copies
    prints = accelerator.gather(fingerprint.to(accelerator.device))
    if not torch.equal(prints, prints[:1].expand_as(prints)):
        raise RuntimeError(f"after step {step} the {accelerator.num_processes} processes hold different parameters "
                           f"(fingerprints {prints.tolist()}): gradients were not synchronised")


def fused_adamw(accelerator) -> bool:
    """Fused AdamW where the parameters will be on a GPU: not under FSDP's CPU offload (the
    optimizer then steps CPU shards) nor DeepSpeed (its engine owns the step)."""
    from accelerate.utils import DistributedType

    if accelerator.device.type != "cuda" or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return False
    return not (accelerator.distributed_type == DistributedType.FSDP and fsdp_offloads(accelerator))


def fsdp_offloads(accelerator) -> bool:
    """FSDP2 keeps the parameters on the CPU between uses (`fsdp_offload_params`; FSDP1 is refused)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return isinstance(getattr(accelerator.state.fsdp_plugin, "cpu_offload", None), CPUOffloadPolicy)


def prepare_frozen(accelerator, model):
    """The --ref copy model placed like the policy: sharded the same way under FSDP2 (each rank
    holds its shard; forward gathers layer by layer), on the device otherwise. No optimizer state."""
    if model is None:
        return None
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)  # in place: stays in eval mode, frozen
    return model.to(accelerator.device)


def finish(accelerator) -> None:
    """End a finished multi-process run: every rank past its last collective, then the process group
    destroyed, so that no communication thread is left for the interpreter's exit to tear down (on
    gloo that has aborted a rank after a complete run: 'terminate called without an active
    exception'). Only for a process that ends with the run, as `fastdpo train` does."""
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        accelerator.end_training()
