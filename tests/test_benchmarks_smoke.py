"""The benchmark scripts run end to end on a tiny CPU shape (a smoke test: CPU numbers are never
results), so a lent GPU session does not find them broken."""

import json
import sys
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
    """Every implementation row of the step benchmark runs on the tiny CPU model (Liger may be absent)."""
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    import bench_train

    impls = ["trl", "trl-liger", "trl-fastdpo-shared", "fastdpo-fused-padded", "fastdpo-fused-packed",
             "fastdpo-fused_linear-shared"]
    rows = bench_train.main(["--tiny", "--device", "cpu", "--checkpointing", "off", "--pairs", "2", "--steps", "1",
                             "--warmup", "0", "--impls", ",".join(impls), "--out", str(tmp_path)])
    by_impl = {r.impl: r for r in rows}
    for impl in impls:
        r = by_impl[impl]
        if impl == "trl-liger" and r.error and r.error.startswith("skipped"):
            continue
        assert r.error is None and r.real_tokens_per_s > 0, (impl, r.error)
    # the same pairs, the same starting model: the same first loss everywhere (log 2 at a copied reference)
    assert len({round(r.first_loss, 5) for r in rows if r.error is None}) == 1
    assert "real tok/s" in (tmp_path / "bench_train.md").read_text()
