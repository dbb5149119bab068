"""TRL's DPOTrainer step: its default path, its Liger path (if installed) and fastdpo, same model and batch.

    python benchmarks/bench_trl.py                          # Llama-3.2-1B-shaped model, 4 pairs x 1024 tokens, GPU
    python benchmarks/bench_trl.py --model llama-3-8b-head --pairs 2
    python benchmarks/bench_trl.py --device cpu --tiny      # smoke test only: CPU numbers are never results

Every implementation trains the same randomly initialized model (built from a config: no
download) on the same batch, a word-level tokenizer over the whole vocabulary and one set of P
preference examples reused every step: prompt T/4 tokens, completions that fill the rest of the
row up to a random right padding of at most T/4 tokens (the masks of common.py's anchor_masks). TRL's defaults
otherwise (bf16 autocast, gradient checkpointing, AdamW, a reference model in memory).

Per implementation: median step time (optimizer step included) after warm-up steps, peak memory
allocated during a step, and peak above what was allocated when the step began (activations,
logits, gradients), plus the first step's loss (it should agree across implementations).
Implementations: trl (default path), trl-liger (use_liger_kernel=True: in TRL 1.15-1.16 that means
Liger's layer kernels; the LM head stays TRL's), fastdpo / fastdpo-linear (FastDPOTrainer's two
modes), and the same without the token-metrics pass (-nometrics). Writes JSON and a Markdown
table to --out and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {  # name -> LlamaConfig kwargs (shapes only; weights are random)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # Llama-3-8B's width and vocabulary with 4 layers: the LM head dominates, as at shape A of common.py's SHAPES.
    "llama-3-8b-head": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
IMPLS = ("trl", "trl-liger", "fastdpo", "fastdpo-nometrics", "fastdpo-linear", "fastdpo-linear-nometrics")


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose words are the ids themselves: 'w17' -> 17 (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def preference_data(pairs: int, T: int, vocab: int, seed: int = 0):
    """P examples: prompt T/4 words; chosen and rejected fill the row up to a padding of at most T/4."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(3, vocab, (n,), generator=g))

    prompt_len = T // 4
    rows = []
    for _ in range(pairs):
        # -1: TRL appends the EOS token to each completion.
        lengths = [T - prompt_len - int(torch.randint(0, T // 4 + 1, (1,), generator=g)) - 1 for _ in range(2)]
        rows.append({"prompt": words(prompt_len), "chosen": " " + words(max(1, lengths[0])),
                     "rejected": " " + words(max(1, lengths[1]))})
    return Dataset.from_list(rows)


class StepMeter:
    """A TrainerCallback timing each step and recording its peak memory."""

    def __init__(self, device: torch.device) -> None:
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                meter.begin()

            def on_step_end(self, args, state, control, **kwargs):
                meter.end()

        self.callback = _Callback()
        self.device = device
        self.times_ms: list[float] = []
        self.peak_gb: list[float] = []
        self.extra_gb: list[float] = []

    def begin(self) -> None:
        common.sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        self._t0 = time.perf_counter()

    def end(self) -> None:
        common.sync(self.device)
        self.times_ms.append(1e3 * (time.perf_counter() - self._t0))
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_gb.append(peak / 1e9)
            self.extra_gb.append((peak - self._base) / 1e9)


def build_trainer(impl: str, policy, ref, data, tokenizer, args_kwargs: dict, meter: StepMeter):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**args_kwargs, use_liger_kernel=impl == "trl-liger")
    common_kwargs = dict(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[meter.callback])
    if impl.startswith("fastdpo"):
        from fastdpo.integrations.trl import FastDPOTrainer

        mode = "linear" if "linear" in impl else "logits"
        return FastDPOTrainer(**common_kwargs, fastdpo_mode=mode, fastdpo_token_metrics="nometrics" not in impl)
    return DPOTrainer(**common_kwargs)


def available(impl: str, device: torch.device) -> str | None:
    """None if `impl` can run here, else why not."""
    return common.liger_unavailable(device) if impl == "trl-liger" else None


def run_one(impl: str, cfg, data, tokenizer, args_kwargs: dict, device: torch.device, dtype: torch.dtype,
            warmup: int, seed: int) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    torch.manual_seed(seed + 1)
    ref = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    meter = StepMeter(device)
    # trl-liger's layer kernels (applied when the trainer is made) replace transformers' own
    # module-wide: undone after the row
    with common.modeling_patches_undone(cfg.model_type):
        trainer = build_trainer(impl, policy, ref, data, tokenizer, args_kwargs, meter)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    measured = slice(warmup, None)
    result = {
        "impl": impl,
        "step_ms": statistics.median(meter.times_ms[measured]),
        "step_ms_all": meter.times_ms,
        "peak_gb": max(meter.peak_gb[measured]) if meter.peak_gb else None,
        "step_extra_gb": max(meter.extra_gb[measured]) if meter.extra_gb else None,
        "first_loss": losses[0] if losses else None,
    }
    del trainer, policy, ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def table(results: list[dict], meta: dict) -> str:
    head = ("CPU SMOKE TEST: these numbers are not measurements. " if meta["smoke_test"] else "")
    lines = [
        f"{head}{meta['device']}, {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"trl {meta['trl']}, liger {meta['liger']}; model {meta['model']} ({meta['params_m']:.0f}M params), "
        f"{meta['pairs']} pairs x {meta['seq_len']} tokens, {meta['dtype']}",
        "",
        "| impl | step ms | peak GB | step extra GB | first loss |",
        "|---|---|---|---|---|",
    ]
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    for r in results:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['impl']} | {fmt(r['step_ms'], '.1f')} | {fmt(r['peak_gb'], '.2f')} | "
                         f"{fmt(r['step_extra_gb'], '.2f')} | {fmt(r['first_loss'], '.5f')} |")
    return "\n".join(lines)


def versions() -> dict:
    import transformers
    import trl

    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        liger = version("liger-kernel")
    except ImportError:
        liger = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "liger": liger}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", choices=sorted(MODELS))
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (the CPU smoke test)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--precompute", action="store_true", help="precompute reference log-probs (no ref forward per step)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    smoke = device.type != "cuda"
    if a.tiny:
        a.model, a.pairs, a.seq_len, a.warmup, a.iters = "tiny", 2, 32, 1, 2
    from transformers import LlamaConfig

    cfg = LlamaConfig(**MODELS[a.model], max_position_embeddings=max(2048, a.seq_len), pad_token_id=0,
                      eos_token_id=2, bos_token_id=2)
    tokenizer = word_tokenizer(cfg.vocab_size)
    data = preference_data(a.pairs, a.seq_len, cfg.vocab_size)
    bf16 = device.type == "cuda"
    dtype = torch.float32  # master weights; bf16 is TRL's autocast on the GPU
    args_kwargs = dict(
        output_dir=str(a.out / "trainer"), per_device_train_batch_size=a.pairs, max_steps=a.warmup + a.iters,
        learning_rate=1e-6, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        bf16=bf16, use_cpu=not bf16, gradient_checkpointing=not a.no_gradient_checkpointing,
        precompute_ref_log_probs=a.precompute, max_length=None,
    )
    params = count_params(cfg)
    meta = {"device": common.device_name(device), "date": datetime.date.today().isoformat(), "smoke_test": smoke,
            "model": a.model, "config": MODELS[a.model], "params_m": params / 1e6, "pairs": a.pairs,
            "seq_len": a.seq_len, "dtype": "bf16 autocast, fp32 master weights" if bf16 else "fp32",
            "warmup": a.warmup, "iters": a.iters, "precompute_ref": a.precompute,
            "gradient_checkpointing": not a.no_gradient_checkpointing, **versions()}
    results = []
    a.out.mkdir(parents=True, exist_ok=True)
    name = "bench_trl_smoke" if smoke else "bench_trl"
    for impl in a.impls.split(","):
        why = available(impl, device)
        if why is not None:
            results.append({"impl": impl, "error": f"not run: {why}"})
        else:
            try:
                results.append(run_one(impl, cfg, data, tokenizer, args_kwargs, device, dtype, a.warmup, 0))
            except Exception as err:  # one failing implementation should not lose the others' numbers
                traceback.print_exc()
                results.append({"impl": impl, "error": f"failed: {type(err).__name__}: {str(err)[:200]}"})
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        # Written after each implementation: a run cut short by a time limit keeps what it measured.
        print(f"bench_trl {impl}: {json.dumps(results[-1])}", flush=True)
        (a.out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        (a.out / f"{name}.md").write_text(table(results, meta) + "\n")
    print(table(results, meta))
    return 0


def count_params(cfg) -> int:
    """Parameters of the model, counted on the meta device (nothing allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())


if __name__ == "__main__":
    sys.exit(main())
