"""The reference model's log-probs, four ways (--ref):

- copy:       a frozen copy of the starting policy, run forward-only each step;
- precompute: one pass of the starting policy over every pair before training, cached on disk
              under a key of model weights + data + settings; no second model is ever held;
- adapter:    the LoRA policy with its adapters disabled (the base model), forward-only;
- none:       no reference (reference-free loss types).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fastdpo.layouts import LayoutBatch

from .data import Encoded, sharded_batches
from .loss import sequence_logps, unwrap


class Reference:
    """Per-row reference log-probs [2P] for a batch of the named split, or None."""

    def logps(self, batch: LayoutBatch, split: str) -> torch.Tensor | None:
        return None


class ModelReference(Reference):
    """--ref copy: a separate frozen model, scored through its own fastdpo head."""

    def __init__(self, model, autocast: bool) -> None:
        self.model, self.autocast = model, autocast

    def logps(self, batch: LayoutBatch, split: str) -> torch.Tensor:
        return sequence_logps(self.model, batch, self.autocast)


class AdapterReference(Reference):
    """--ref adapter: the policy itself with its LoRA adapters switched off."""

    def __init__(self, policy, autocast: bool) -> None:
        self.policy, self.autocast = policy, autocast

    def logps(self, batch: LayoutBatch, split: str) -> torch.Tensor:
        peft_model = unwrap(self.policy)
        was_training = peft_model.training
        peft_model.eval()
        try:
            with peft_model.disable_adapter():
                return sequence_logps(peft_model, batch, self.autocast)
        finally:
            peft_model.train(was_training)


class PrecomputedReference(Reference):
    """--ref precompute: a table [pairs, 2] (chosen, rejected) per split, looked up by pair index."""

    def __init__(self, tables: dict[str, torch.Tensor], origin: str = "") -> None:
        self.tables = tables
        self.origin = origin  # how the tables were obtained, for the run's log

    def logps(self, batch: LayoutBatch, split: str) -> torch.Tensor:
        rows = self.tables[split][batch.index]  # both on the host: no wait for the device
        return torch.cat([rows[:, 0], rows[:, 1]]).to(batch.input_ids.device)


def precompute(policy, accelerator, splits: dict[str, list[Encoded]], cache_file: Path, *,
               batch_size: int, pad_id: int, autocast: bool, layout: str = "padded",
               max_tokens: int = 0) -> PrecomputedReference:
    """Load the cached tables, or compute them with the (prepared) policy and cache them. Values
    are kept per pair, so a table made in one batch layout serves every other."""
    tables, problem = read_cache(cache_file, splits)
    if tables is not None:
        return PrecomputedReference(tables, f"loaded from {cache_file}")
    was_training = policy.training
    policy.eval()
    tables = {}
    for name, data in splits.items():
        table = torch.zeros(len(data), 2, dtype=torch.float32, device=accelerator.device)
        for batch, n in sharded_batches(data, batch_size, world=accelerator.num_processes,
                                        rank=accelerator.process_index, pad_id=pad_id, layout=layout,
                                        max_tokens=max_tokens):
            batch = batch.to(accelerator.device)
            lp = sequence_logps(policy, batch, autocast)
            P = batch.pairs
            table[batch.index[:n]] = torch.stack([lp[:P], lp[P:]], dim=1)[:n]
        # Each rank filled its own disjoint rows; the sum assembles the whole table everywhere.
        tables[name] = accelerator.reduce(table, "sum").cpu() if accelerator.num_processes > 1 else table.cpu()
    policy.train(was_training)
    if accelerator.is_main_process:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(tables, tmp)
        os.replace(tmp, cache_file)  # atomic: readers see the whole file or none
    accelerator.wait_for_everyone()
    again = f" (the cached file {problem}; replaced)" if problem else ""
    return PrecomputedReference(tables, f"precomputed into {cache_file}{again}")


def read_cache(cache_file: Path, splits: dict[str, list[Encoded]]) -> tuple[dict | None, str]:
    """(tables, "") from a cache file that holds a table of the right shape for every split, or
    (None, why not). A cache is only a cache: one that cannot be used is computed again, never a
    reason to stop (it is written atomically, so this means outside damage or another format)."""
    if not cache_file.is_file():
        return None, ""
    try:
        tables = torch.load(cache_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, unpicklable: all mean "unusable"
        return None, f"could not be read: {type(e).__name__}"
    expected = {name: (len(data), 2) for name, data in splits.items()}
    if not (isinstance(tables, dict) and tables.keys() == expected.keys() and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == expected[name]
            for name, t in tables.items())):
        return None, "does not hold a table for every pair"
    return tables, ""


def cache_key(model, splits: dict[str, list[Encoded]], settings: dict) -> str:
    """sha256 of the starting weights (sampled), every token id of the data, and the settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(weights_fingerprint(model).encode())
    for name, data in sorted(splits.items()):
        h.update(name.encode())
        for e in data:
            h.update(repr((e.prompt, e.chosen, e.rejected)).encode())
    return h.hexdigest()[:32]


def weights_fingerprint(model, samples: int = 4096) -> str:
    """A hash of every tensor's name, shape, dtype and up to `samples` evenly spaced values: cheap
    even for billions of weights, and different for different checkpoints."""
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdpo" / "ref_logps"
