"""Flex attention on a GPU, forward and backward (collected only when CUDA is present; see conftest.py).

On a GPU the shared layout runs through FlexAttention with fastdpo's BlockMask (one per layer type
for sliding-window models), and packed rows through the BlockMask that transformers builds from
their position ids. tests/test_layouts.py checks their forward on the CPU, where torch's
FlexAttention has no backward. Here, on the GPU: the loss, every metric and the gradient of every
parameter of the packed and shared layouts under flex attention equal the padded layout's under
sdpa (eager for Gemma 2, whose attention soft-cap flex applies as a score_mod), in fp32, at
test_layouts.py's tolerance. Head dim 16: flex's GPU kernels take no smaller.
"""

import pytest
import torch
from test_layouts import (assert_grads_close, flex_copy, random_pairs, step,  # noqa: F401 (flex_copy: a fixture)
                          tiny_model)

from fastdpo.layouts import build
from fastdpo.trainer.config import TrainConfig
from fastdpo.trainer.loss import LossFn, attach_head, head_options


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_flex_attention_gradients_equal_padded(arch, flex_copy, _fresh_seed):  # noqa: F811
    make_flex, masks = flex_copy
    g = torch.Generator().manual_seed(_fresh_seed)
    model = tiny_model(arch, "eager" if arch == "gemma2" else "sdpa", head_dim=16).cuda()
    pairs = random_pairs(g)
    cfg = TrainConfig(loss_type="sigmoid,sft", loss_options={"loss_weights": [1.0, 0.5]})
    attach_head(model, head_options(cfg))
    flex = make_flex(model)
    loss_fn = LossFn(cfg, autocast=False)
    ref = (torch.randn(8, generator=g) - 20).cuda()
    loss0, metrics0, grads0 = step(model, build("padded", pairs, range(4), pad_id=0).to("cuda"), loss_fn, ref)
    assert any(t.abs().max() > 0 for t in grads0.values())
    for kind in ("packed", "shared"):
        masks.clear()
        loss, metrics, grads = step(flex, build(kind, pairs, range(4), pad_id=0).to("cuda"), loss_fn, ref)
        assert masks == ["BlockMask"] * flex.config.num_hidden_layers, (kind, masks)
        torch.testing.assert_close(loss, loss0, rtol=2e-5, atol=1e-6, msg=lambda m: f"{kind} loss: {m}")
        assert set(metrics) == set(metrics0)
        for name in metrics0:
            torch.testing.assert_close(metrics[name], metrics0[name], rtol=2e-5, atol=1e-5,
                                       msg=lambda m: f"{kind} {name}: {m}")
        assert_grads_close(grads, grads0, f"flex {kind}")
