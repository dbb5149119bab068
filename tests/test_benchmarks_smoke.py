"""The benchmark scripts run end to end on a tiny CPU shape (a smoke test: CPU numbers are never
results), so a lent GPU session does not find them broken."""

import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FAST = ["--device", "cpu", "--iters", "1", "--warmup", "0"]


def rows(out: Path, title: str) -> dict:
    results = json.loads((out / f"{title}.json").read_text())["results"]
    return {(r["impl"], r["mode"]): r for r in results}


@pytest.mark.filterwarnings("ignore")
def test_bench_linear_lean_tiles(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    import bench_linear

    bench_linear.main(FAST + ["--impls", "eager,fastdpo,fastdpo-lean", "--lean", "16:0,16:300",
                              "--out", str(tmp_path)])
    got = rows(tmp_path, "bench_linear")
    for impl in ("eager", "fastdpo", "fastdpo-lean-16xV", "fastdpo-lean-16x300"):
        for mode in ("fwd+bwd", "fwd"):
            r = got[(impl, mode)]
            assert r["error"] is None and r["ms"] > 0, (impl, mode, r["error"])
    # Every implementation computes the same per-row log-probs (forward) and gradients (step).
    assert got[("fastdpo-lean-16x300", "fwd")]["rel_err"] < 1e-3
    assert got[("fastdpo-lean-16x300", "fwd+bwd")]["extra"]["grad_err_weight"] == pytest.approx(
        got[("eager", "fwd+bwd")]["extra"]["grad_err_weight"], rel=0.5, abs=5e-3)
    assert (tmp_path / "bench_linear.md").exists() and (tmp_path / "bench_linear.png").exists()


@pytest.mark.filterwarnings("ignore")
def test_bench_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    import bench_loss

    bench_loss.main(FAST + ["--impls", "eager,fastdpo", "--out", str(tmp_path)])
    got = rows(tmp_path, "bench_loss")
    assert all(r["error"] is None and r["ms"] > 0 for r in got.values()), got
    assert {impl for impl, _ in got} == {"eager", "fastdpo"}


@pytest.mark.filterwarnings("ignore")
def test_bench_train_tiny(tmp_path, monkeypatch):
    """Every implementation row of the step benchmark runs on the tiny CPU model (Liger may be absent;
    the flex rows say why they cannot)."""
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    import bench_train

    impls = ["trl", "trl-liger", "trl-fastdpo-shared", "fastdpo-fused-padded", "fastdpo-fused-packed",
             "fastdpo-fused_linear-shared", "fastdpo-fused-packed-nocheck", "trl-fastdpo-packed-nocheck",
             "fastdpo-fused-shared-flex"]
    rows = bench_train.main(["--tiny", "--device", "cpu", "--checkpointing", "off", "--pairs", "2", "--steps", "1",
                             "--warmup", "0", "--impls", ",".join(impls), "--out", str(tmp_path)])
    by_impl = {r.impl: r for r in rows}
    for impl in impls:
        r = by_impl[impl]
        if impl == "trl-liger" and r.error and r.error.startswith("skipped"):
            continue
        if impl.endswith("-flex"):  # GPU only
            assert r.error == "skipped: torch's flex attention has no backward on the CPU", r.error
            continue
        assert r.error is None and r.real_tokens_per_s > 0, (impl, r.error)
    # the same pairs, the same starting model: the same first loss everywhere (log 2 at a copied reference)
    assert len({round(r.first_loss, 5) for r in rows if r.error is None}) == 1
    assert "real tok/s" in (tmp_path / "bench_train.md").read_text()


@pytest.mark.filterwarnings("ignore")
def test_bench_linear_peer_rows(tmp_path, monkeypatch):
    """PyTorch's chunked linear_cross_entropy (default and least-memory options) and TRL's chunked
    log-probs give the per-row log-probs and gradients every other row gives."""
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    import bench_linear

    bench_linear.main(FAST + ["--dtype", "float32", "--impls", "eager,torch-lce,torch-lce-lean,trl-chunked",
                              "--out", str(tmp_path)])
    got = rows(tmp_path, "bench_linear")
    for impl in ("torch-lce", "torch-lce-lean", "trl-chunked"):
        if got[(impl, "fwd")]["skipped"]:  # a torch or TRL without it: the row must say why
            assert "linear_cross_entropy" in got[(impl, "fwd")]["skipped"] or impl == "trl-chunked"
            continue
        assert got[(impl, "fwd")]["error"] is None and got[(impl, "fwd")]["rel_err"] < 1e-5, got[(impl, "fwd")]
        step = got[(impl, "fwd+bwd")]
        assert step["error"] is None and step["extra"]["grad_err_hidden"] < 1e-4, step


@pytest.mark.filterwarnings("ignore")
def test_bench_linear_isolated_ratios(tmp_path):
    """--isolate runs each implementation in its own process and adds the ratio table."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear.py"
    env = dict(os.environ, FASTDPO_BACKEND="torch")
    subprocess.run([sys.executable, str(script), *FAST, "--dtype", "float32", "--modes", "fwd+bwd", "--isolate",
                    "--impls", "fastdpo,eager", "--baseline", "fastdpo", "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True)
    got = rows(tmp_path, "bench_linear")  # (eager: a row every torch has; torch-lce needs 2.13+)
    assert set(got) == {("fastdpo", "fwd+bwd"), ("eager", "fwd+bwd")}
    for r in got.values():
        assert r["error"] is None and r["ms"] > 0 and r["extra"]["peak_rss_gb"] > 0 and r["extra"]["cpu_ms"] > 0, r
    assert "| CPU time / fastdpo |" in (tmp_path / "bench_linear.md").read_text()


@pytest.mark.filterwarnings("ignore")
def test_run_gpu_peers_stage(tmp_path):
    """benchmarks/run_gpu.sh peers end to end on CPU with tiny shapes: its three parts run and write."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "out").mkdir()
    env = dict(os.environ, FASTDPO_BACKEND="torch", PYTHON=sys.executable, RESULTS=str(tmp_path / "results"),
               OUT=str(tmp_path / "out"), SKIP_INSTALL="1",
               PEERS_TESTS="tests/test_logps.py::test_scalar_split_keeps_fp64_precision",
               PEERS_LOSS_SHAPES="--shape 1,16,300", PEERS_LINEAR_SHAPES="--shape 1,16,32,300",
               PEERS_LINEAR_IMPLS="torch-lce,torch-lce-lean,trl-chunked,fastdpo,fastdpo-lean", LEAN_TILES="8:100",
               PEERS_TUNE_ARGS="--device cpu --shape 1,4,40 --configs 64:4:1,16:2:4 --unmasked-only",
               TRITON_INTERPRET="1",
               BENCH_ARGS="--device cpu --iters 1 --warmup 0 --dtype float32")
    done = subprocess.run(["bash", "benchmarks/run_gpu.sh", "peers"], cwd=repo, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(tmp_path / "out" / "results.tgz") as packed:  # what a device call brings back
        assert "./peers/tune_B.md" in packed.getnames() and "./peers/linear/bench_linear.json" in packed.getnames()
    tmp_path = tmp_path / "results"
    assert "1 passed" in (tmp_path / "peers" / "tests.log").read_text()
    assert all(r["error"] is None for r in rows(tmp_path / "peers" / "loss_B", "bench_loss").values())
    sweep = [line for line in (tmp_path / "peers" / "tune_B.md").read_text().splitlines() if line.startswith("| P,T,V")]
    assert [line.split(" | ")[1:4] for line in sweep] == [["64", "4", "1"], ["16", "2", "4"]], sweep
    assert not any("failed" in line for line in sweep), sweep
    linear = rows(tmp_path / "peers" / "linear", "bench_linear")
    impls = {impl for impl, _ in linear}
    assert impls == {"torch-lce", "torch-lce-lean", "trl-chunked", "fastdpo", "fastdpo-lean-8x100"}, impls
    assert all(r["error"] is None for r in linear.values()), linear


def test_patches_of_transformers_modeling_modules_are_undone():
    """A row's module-wide replacements in transformers (what Liger-Kernel's layer kernels do) do not
    outlive the row: module attributes, class attributes, added names."""
    import common
    from transformers.models.llama import modeling_llama as m

    rope, norm, forward = m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaForCausalLM.forward
    with common.modeling_patches_undone("llama"):
        m.apply_rotary_pos_emb = lambda *a, **k: None
        m.LlamaRMSNorm = type("OtherNorm", (), {})
        m.LlamaForCausalLM.forward = lambda self, *a, **k: None
        m.LlamaForCausalLM.added_by_the_row = True
        m.added_by_the_row = True
    assert (m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaForCausalLM.forward) == (rope, norm, forward)
    assert not hasattr(m, "added_by_the_row") and not hasattr(m.LlamaForCausalLM, "added_by_the_row")


def test_liger_kernels_applied_in_a_row_are_gone_after_it():
    """Liger-Kernel's own patching (as TRL's use_liger_kernel=True applies it to a model instance)
    replaces transformers' Llama layers module-wide; after the row a new model has its own again."""
    import common
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama as m

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    own = (m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaMLP)
    with common.modeling_patches_undone("llama"):
        _apply_liger_kernel_to_instance(model=LlamaForCausalLM(config))
        assert m.apply_rotary_pos_emb is not own[0] and m.LlamaRMSNorm is not own[1]  # Liger's, module-wide
        assert type(LlamaForCausalLM(config).model.norm).__module__.startswith("liger_kernel")
    assert (m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaMLP) == own
    assert type(LlamaForCausalLM(config).model.norm) is own[1]


@pytest.mark.filterwarnings("ignore")
def test_bench_trl_tiny(tmp_path, monkeypatch):
    """The TRL step benchmark runs on the tiny CPU model: fastdpo's first loss is TRL's (the same
    pairs and models), and a row that cannot run here says why in the written results."""
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    import bench_trl

    assert bench_trl.main(["--device", "cpu", "--tiny", "--impls", "trl,fastdpo,trl-liger", "--out", str(tmp_path)]) == 0
    results = {r["impl"]: r for r in json.loads((tmp_path / "bench_trl_smoke.json").read_text())["results"]}
    assert results["trl"].get("error") is None and results["fastdpo"].get("error") is None, results
    assert results["fastdpo"]["first_loss"] == pytest.approx(results["trl"]["first_loss"], rel=1e-5)
    assert results["trl-liger"]["error"].startswith("not run: ")


def test_run_gpu_ends_before_the_device_calls_limit(tmp_path):
    """Inside a device call ($OUT set) run_gpu.sh cuts a part that would outlast DEADLINE_S and still
    packs what the others wrote: a call killed at its own limit would bring nothing back."""
    import subprocess
    import time

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "slow_test.py").write_text("import time\n\n\ndef test_slow():\n    time.sleep(300)\n")
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHON=sys.executable, RESULTS=str(tmp_path / "results"), OUT=str(tmp_path / "out"),
               SKIP_INSTALL="1", TESTS=str(tmp_path / "slow_test.py"), DEADLINE_S="35")
    start = time.monotonic()
    done = subprocess.run(["bash", "benchmarks/run_gpu.sh", "tests"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)
    assert time.monotonic() - start < 35, done.stdout + done.stderr
    with tarfile.open(tmp_path / "out" / "results.tgz") as packed:
        assert "./tests.log" in packed.getnames()
