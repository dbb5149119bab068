"""Float64 references written from the formulas, independent of fastdpo's own code paths."""

from __future__ import annotations

import math

import torch


def scores64(logits: torch.Tensor, temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    s = logits.double()
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return s / temperature


def valid_mask(labels, mask=None, ignore_index=-100):
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    return valid


def seq_logps64(logits, labels, mask=None, ignore_index=-100, temperature=1.0, softcap=None):
    """sum_t m_t * (s_{t,y} - log sum_v exp s_tv), in float64 (differentiable w.r.t. a float64 input)."""
    s = scores64(logits, temperature, softcap)
    valid = valid_mask(labels, mask, ignore_index)
    safe = torch.where(valid, labels, 0).long()
    logp = s.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(s, -1)
    return torch.where(valid, logp, torch.zeros_like(logp)).sum(-1)


def logsigmoid64(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def dpo_sigmoid64(logps, ref, beta, eps=0.0):
    """Mean over pairs of -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)."""
    P = logps.shape[0] // 2
    d = (logps[:P] - ref[:P]) - (logps[P:] - ref[P:])
    z = beta * d.double()
    return (-(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)).mean()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |a - e| <= rel * max(1, max |e|): relative to the scale of the expected values."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: finiteness differs"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:.1g} x {scale:.3g}"


# 1 - p_label of the confident tokens the gradient tests draw: down to 1e-7, where 1 - exp(logp)
# in fp32 has no correct digit left.
CONFIDENT_GAPS = (1e-1, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def confident_logits(labels: torch.Tensor, V: int, gaps: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """Float64 logits [len(labels), V] where row n's label has probability 1 - gaps[n]: random
    scores elsewhere, and z_label = log sum_{v != label} exp z_v + log((1 - gap) / gap)."""
    rows = labels.shape[0]
    z = scale * torch.randn(rows, V, dtype=torch.float64, device=labels.device)
    others = torch.logsumexp(z.scatter(1, labels[:, None], float("-inf")), 1)
    gaps = gaps.to(z)
    z[torch.arange(rows, device=z.device), labels] = others + torch.log1p(-gaps) - torch.log(gaps)
    return z


def not_label_mass64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_{v != label} softmax(logits)_v in float64: 1 - p_label without cancellation."""
    p = logits.double().softmax(-1)
    return p.scatter(-1, labels.unsqueeze(-1), 0.0).sum(-1)
