"""Curvature estimation: ours (Lanczos) against the paper's reference estimator.

Accuracy is measured against a tightly converged Lanczos run (residual tolerance 1e-7) on
the same model and batch. extra_info records seconds, HVPs per example and the fraction of
examples within 1% of it. Run: ``pytest benchmarks/test_curvature_bench.py``.
"""

from __future__ import annotations

import time

import pytest
import timm
import torch

import lcnn_plugin  # noqa: F401
from lcnn_plugin.curvature import measure

_CACHE: dict = {}


@pytest.fixture(scope="module")
def setup(model_name, request):
    if model_name in _CACHE:
        return _CACHE[model_name]
    batch = request.config.getoption("--bench-batch")
    size = request.config.getoption("--bench-size")
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    x = torch.rand(batch, 3, size, size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(batch, 3, size, size))
    model.eval()
    y = torch.randint(0, 10, (batch,))
    truth = measure(model, x, y, method="lanczos", tol=1e-7, max_iter=200).hessian_norm
    _CACHE[model_name] = (model, x, y, truth)
    return _CACHE[model_name]


def _record(benchmark, result, truth, seconds):
    rel = (result.hessian_norm - truth).abs() / truth
    within = float((rel <= 0.01).double().mean())
    benchmark.extra_info.update(
        seconds=seconds, hvps_mean=float(result.hvps.double().mean()),
        within_1pct=within, median_rel_error=float(rel.median()), max_rel_error=float(rel.max()),
    )
    return within


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def test_ours_lanczos(benchmark, setup):
    model, x, y, truth = setup
    res, secs = _timed(lambda: benchmark.pedantic(
        measure, args=(model, x, y), kwargs=dict(method="lanczos"), rounds=1, iterations=1))
    assert _record(benchmark, res, truth, secs) >= 0.95


@pytest.mark.parametrize("k", [10, 20, 40, 80])
def test_reference(benchmark, setup, k):
    model, x, y, truth = setup
    res, secs = _timed(lambda: benchmark.pedantic(
        measure, args=(model, x, y), kwargs=dict(method="reference", k=k), rounds=1, iterations=1))
    _record(benchmark, res, truth, secs)


def test_one_hvp_against_forward_backward(benchmark, setup):
    """Time of one HVP (graph re-used) over one forward+backward for the input gradient."""
    from lcnn_plugin.curvature.hvp import HVP, per_example_cross_entropy

    model, x, y, _ = setup
    for p in model.parameters():
        p.requires_grad_(False)

    def fwd_bwd():
        t = x.detach().requires_grad_(True)
        torch.autograd.grad(per_example_cross_entropy(model(t), y).sum(), t)

    op = HVP(model, x, y, per_example_cross_entropy, "autograd")
    v = torch.randn_like(x)
    fwd_bwd(), op.apply(v)  # warm-up
    n = 3
    _, t_fb = _timed(lambda: [fwd_bwd() for _ in range(n)])
    _, t_hvp = _timed(lambda: [op.apply(v) for _ in range(n)])
    benchmark.pedantic(op.apply, args=(v,), rounds=1, iterations=1)
    benchmark.extra_info.update(forward_backward_s=t_fb / n, hvp_s=t_hvp / n, ratio=t_hvp / t_fb)
    for p in model.parameters():
        p.requires_grad_(True)
