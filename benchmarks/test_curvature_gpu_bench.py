"""The fused curvature path on CUDA: eager vs compiled vs Triton-fused, batch 128.

Skipped without CUDA; runs unchanged wherever CUDA is present:
``pytest benchmarks/test_curvature_gpu_bench.py``. Each engine's Lanczos run is timed after a
warm-up (the compiled engine compiles there); extra_info records seconds, examples per
second and accuracy against a tight Lanczos run. The target (asserted) is ≥ 10× the
reference estimator's throughput at equal accuracy (≥ 95% of examples within 1%).
"""

from __future__ import annotations

import pytest
import torch
from conftest import bench_model, timed

from lcnn_plugin.curvature import measure
from lcnn_plugin.kernels import triton_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ENGINES = ("autograd", "compiled", "triton")
LADDER = (10, 20, 40, 80, 160)
_CACHE: dict = {}


@pytest.fixture(scope="module")
def setup(model_name, request):
    if model_name not in _CACHE:
        batch = request.config.getoption("--bench-gpu-batch")
        size = request.config.getoption("--bench-size")
        steps = request.config.getoption("--bench-train-steps")
        model, x, y = bench_model(model_name, batch, size, device="cuda", train_steps=steps)
        truth = measure(model, x, y, method="lanczos", tol=1e-7, max_iter=200).hessian_norm
        _CACHE[model_name] = dict(model=model, x=x, y=y, truth=truth, seconds={})
    return _CACHE[model_name]


def _within(result, truth) -> float:
    return float((((result.hessian_norm - truth).abs() / truth) <= 0.01).double().mean())


@pytest.mark.parametrize("engine", ENGINES)
def test_engine(benchmark, setup, engine):
    if engine == "triton" and not triton_available("cuda"):
        pytest.skip("Triton is not installed")
    model, x, y, truth = setup["model"], setup["x"], setup["y"], setup["truth"]
    run = lambda: measure(model, x, y, method="lanczos", engine=engine)  # noqa: E731
    run()  # warm-up (compilation, autotuning, allocator)
    res, secs = timed(lambda: benchmark.pedantic(run, rounds=3, iterations=1))
    setup["seconds"][engine] = benchmark.stats.stats.min if benchmark.stats else secs / 3
    benchmark.extra_info.update(seconds=secs, examples_per_s=x.shape[0] / secs,
                                hvps_mean=float(res.hvps.double().mean()), within_1pct=_within(res, truth))
    assert _within(res, truth) >= 0.95


def test_throughput_vs_reference(benchmark, setup):
    model, x, y, truth = setup["model"], setup["x"], setup["y"], setup["truth"]
    best = min(setup["seconds"].values()) if setup["seconds"] else timed(
        lambda: measure(model, x, y, method="lanczos"))[1]
    ladder, k_equal = {}, None
    for k in LADDER:
        res, secs = timed(lambda k=k: measure(model, x, y, method="reference", k=k))
        ladder[k] = dict(seconds=secs, within_1pct=_within(res, truth))
        if ladder[k]["within_1pct"] >= 0.95:
            k_equal = k
            break
    ratio = ladder[k_equal or LADDER[-1]]["seconds"] / best
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(best_engine_seconds=best, reference={str(k): v for k, v in ladder.items()},
                                k_equal_accuracy=k_equal, throughput_ratio=ratio)
    if not benchmark.disabled:
        assert ratio >= 10.0, ladder
