"""TRL's own reference model under FSDP2 gets rank 0's weights before it is sharded.

With `fsdp_cpu_ram_efficient_loading` (examples/accelerate/fsdp2.yaml sets it), only rank 0 reads a
checkpoint: transformers up to at least 5.17 fills the other ranks' models with zeros, counting on
the weights being broadcast from rank 0 when the model is prepared. accelerate does that for the
policy. TRL 1.15-1.16 also loads a reference from a path (no `ref_model` given: the policy's own
checkpoint), then shards it with `fully_shard` alone, so every rank but 0 keeps zeros in its shards
of the reference: a silently wrong reference (seen on 2 CPU processes with transformers 5.17: a
step-1 loss of 0.6901 where policy = reference gives log 2 = 0.6931; transformers 5.24 loads real
weights on every rank). FastDPOTrainer broadcasts the reference from rank 0 right before TRL shards
it, as FSDP1's `sync_module_states` does; where every rank already has the weights this changes
nothing but costs one broadcast of the reference at start.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator

import torch


def needs_rank0_weights(model: torch.nn.Module, accelerator: Any) -> bool:
    """FSDP2 with CPU-RAM-efficient loading on several processes, and `model` not sharded yet."""
    from torch.distributed.fsdp import FSDPModule

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return (plugin is not None and getattr(plugin, "fsdp_version", 1) == 2
            and bool(getattr(plugin, "cpu_ram_efficient_loading", False))
            and accelerator.num_processes > 1 and not isinstance(model, FSDPModule))


@torch.no_grad()
def broadcast_from_rank0(model: torch.nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of `model` takes rank 0's values, one tensor at a time through
    `device` (NCCL broadcasts only device tensors)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        staged = tensor.detach().to(device)
        torch.distributed.broadcast(staged, src=0)
        if staged.data_ptr() != tensor.data_ptr():
            tensor.detach().copy_(staged)


@contextlib.contextmanager
def reference_from_rank0() -> Iterator[None]:
    """While DPOTrainer.__init__ runs: TRL's `prepare_fsdp` first gives the model rank 0's weights."""
    from trl.trainer import dpo_trainer

    prepare = getattr(dpo_trainer, "prepare_fsdp", None)
    if prepare is None:  # a TRL that shards its reference elsewhere: nothing to wrap
        yield
        return

    def prepare_fsdp(model: torch.nn.Module, accelerator: Any, *args: Any, **kwargs: Any):
        if needs_rank0_weights(model, accelerator):
            broadcast_from_rank0(model, accelerator.device)
        return prepare(model, accelerator, *args, **kwargs)

    dpo_trainer.prepare_fsdp = prepare_fsdp
    try:
        yield
    finally:
        dpo_trainer.prepare_fsdp = prepare
