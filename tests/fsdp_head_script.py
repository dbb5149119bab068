"""Run by tests/test_head_sharded.py under torchrun (2 gloo processes): fastdpo's fused linear head on
a model whose lm_head is an FSDP2 unit of its own (no final norm gathers it with the last layer).

The linear path never calls lm_head's forward, whose hook is where FSDP2 gathers a unit. Checks,
against the same model unsharded on one process: the per-row log-probs, the gradient of lm_head
and of a decoder weight (the batch split across the ranks), that a no-grad pass leaves lm_head
sharded again, and that a trainable sharded head outside any FSDP unit is refused."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.head import HeadOptions, install_head


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(int(sys.argv[1]))
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    one, model = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    model.load_state_dict(one.state_dict())
    rows = 2 * world
    ids = torch.randint(0, cfg.vocab_size, (rows, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    for m in (one, model):
        install_head(m, HeadOptions(mode="linear", token_metrics=False))

    whole = one(input_ids=ids, labels=labels, fastdpo_head="policy")
    (whole.logps.sum() / rows).backward()

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    mine = slice(2 * rank, 2 * rank + 2)
    part = model(input_ids=ids[mine], labels=labels[mine], fastdpo_head="policy")
    (part.logps.sum() / 2).backward()  # FSDP averages the ranks' gradients

    torch.testing.assert_close(part.logps.detach(), whole.logps.detach()[mine], rtol=1e-5, atol=1e-5)
    for name in ("lm_head.weight", "model.layers.0.mlp.down_proj.weight"):
        got = model.get_parameter(name).grad.full_tensor()
        torch.testing.assert_close(got, one.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)

    with torch.no_grad():
        model(input_ids=ids[mine], labels=labels[mine], fastdpo_head="reference")
    assert hasattr(model.lm_head.weight, "full_tensor"), "a no-grad pass left lm_head gathered"

    # A sharded trainable head that no FSDP unit manages: its gradient could not be right.
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    bare = LlamaForCausalLM(cfg)
    mesh = init_device_mesh("cpu", (world,))
    bare.lm_head.weight = torch.nn.Parameter(distribute_tensor(bare.lm_head.weight.detach(), mesh, [Shard(0)]))
    install_head(bare, HeadOptions(mode="linear", token_metrics=False))
    try:
        bare(input_ids=ids[mine], labels=labels[mine], fastdpo_head="policy")
    except ValueError as e:
        assert "lm_head.weight sharded (a DTensor) outside any FSDP2 unit" in str(e), e
    else:
        raise AssertionError("a sharded head outside FSDP was not refused")
    # Both ranks done before gloo is torn down: a rank that tears it down while the other is still
    # in a collective aborts at exit ("terminate called without an active exception"), seen once
    # under load with torch 2.11.
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("fsdp head checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
