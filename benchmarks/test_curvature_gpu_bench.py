"""The fused curvature path on CUDA: eager vs compiled vs Triton-fused, batch 128.

Skipped without CUDA; runs unchanged wherever CUDA is present:
``pytest benchmarks/test_curvature_gpu_bench.py``. Each engine's Lanczos run is timed after a
warm-up (the compiled engine compiles there); extra_info records seconds, examples per
second and accuracy against a tight Lanczos run. The target (asserted when timing) is ≥ 10×
the reference estimator's throughput at equal accuracy (≥ 95% of examples within 1%).
"""

from __future__ import annotations

import pytest
import torch
from conftest import LADDER, accuracy, curvature_case, reference_ladder, timed

from lcnn_plugin.curvature import measure
from lcnn_plugin.kernels import triton_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ENGINES = ("autograd", "compiled", "triton")


@pytest.fixture(scope="module")
def case(model_name, request):
    opt = request.config.getoption
    return curvature_case(model_name, opt("--bench-gpu-batch"), opt("--bench-size"),
                          opt("--bench-train-steps"), device="cuda")


@pytest.mark.parametrize("engine", ENGINES)
def test_engine(benchmark, case, engine):
    if engine == "triton" and not triton_available("cuda"):
        pytest.skip("Triton is not installed")
    model, x, y = case["model"], case["x"], case["y"]
    run = lambda: measure(model, x, y, method="lanczos", engine=engine)  # noqa: E731
    run()  # warm-up (compilation, autotuning, allocator)
    res, secs = timed(lambda: benchmark.pedantic(run, rounds=3, iterations=1))
    case["seconds"][engine] = benchmark.stats.stats.min if benchmark.stats else secs / 3
    acc = accuracy(res, case["truth"])
    benchmark.extra_info.update(seconds=secs, examples_per_s=x.shape[0] / secs, **acc)
    assert acc["within_1pct"] >= 0.95


def test_throughput_vs_reference(benchmark, case):
    model, x, y = case["model"], case["x"], case["y"]
    best = min(case["seconds"].values()) if case["seconds"] else timed(
        lambda: measure(model, x, y, method="lanczos"))[1]
    ladder, k_equal = reference_ladder(case)
    ratio = ladder[k_equal or LADDER[-1]]["seconds"] / best
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(best_engine_seconds=best, reference={str(k): v for k, v in ladder.items()},
                                k_equal_accuracy=k_equal, throughput_ratio=ratio)
    if not benchmark.disabled:
        assert ratio >= 10.0, ladder
