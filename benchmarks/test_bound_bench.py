"""Data-free bounds, conversion and measure() on a converted model, each against what it
replaced or skips, in the same run.

- ``test_model_bound``: each timm model of ``--lcnn-models`` (lcnn_resnet18_cifar by default)
  at ``--bench-size``, statistics and spectral norms settled by three training forwards:
  :func:`model_bound` (certified operator norms) against the path it replaced, every
  spectrally normalised layer's norm by float64 Lanczos to a residual of 1e-6 (what
  dominated model_bound at 07eb2c9; not certified). Target (asserted when timing):
  certified ≤ 1× the Lanczos-only path.
- ``test_model_bound_tight``: the same, ``model_bound(tight=True)`` (every loose convolution
  bounded exactly from its Gram matrix) against the default (reported).
- ``test_convert``: each model of ``--bench-convert-models`` at ``--bench-size`` (``resnet50``
  at 224 for the 30 s target), a batch of one: ``convert()`` with its defaults (no bounds)
  against ``convert(bound=True)`` (reported).
- ``test_measure_on_converted``: a converted ``--bench-convert-models`` model after training
  forwards: ``measure()`` with its defaults (folds BatchNorms into convolutions where the
  folded copy is checked to compute the same logits) against ``fold_bn=False`` (reported).
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import timed

from lcnn_plugin import convert, model_bound
from lcnn_plugin.curvature import measure
from lcnn_plugin.layers import SpectralNorm, conv_operator_norm


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "convert_model" in metafunc.fixturenames:
        names = [n for n in metafunc.config.getoption("--bench-convert-models").split(",") if n]
        metafunc.parametrize("convert_model", names)


def _settled(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, size, size))
    return model.eval()


def test_model_bound(benchmark, request, model_name):
    size = request.config.getoption("--bench-size")
    model = _settled(model_name, size)
    shapes: dict[torch.nn.Module, tuple[int, ...]] = {}

    def record(m: torch.nn.Module, args: tuple) -> None:
        shapes.setdefault(m, tuple(args[0].shape[1:]))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()
               if isinstance(m, torch.nn.modules.conv._ConvNd)]
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
    for h in handles:
        h.remove()

    def lanczos_only() -> None:  # every convolution's norm as model_bound found it before
        for m, shape in shapes.items():
            engine = SpectralNorm.of(m)
            if engine is not None:
                engine.operator_norm(m, shape)
            else:
                conv_operator_norm(m, shape[1:])

    result, certified = timed(lambda: model_bound(model, (3, size, size)))
    _, before = timed(lanczos_only)
    benchmark.pedantic(model_bound, args=(model, (3, size, size)), rounds=1, iterations=1)
    benchmark.extra_info.update(seconds_certified=certified, seconds_lanczos_only=before,
                                ratio_certified_over_lanczos_only=certified / before,
                                certified=result.certified, estimated=result.estimated,
                                lipschitz=result.lipschitz, loose_layers=len(result.loose))
    assert not result.estimated, str(result)
    if not benchmark.disabled:
        assert certified <= before


def test_model_bound_tight(benchmark, request, model_name):
    """``model_bound(tight=True)`` (loose convolutions bounded exactly from their Gram
    matrices) against the default (reported: the price of no loose layer)."""
    size = request.config.getoption("--bench-size")
    model = _settled(model_name, size)
    default, seconds = timed(lambda: model_bound(model, (3, size, size)))
    runs: list[tuple] = []  # the tight bound is run once (minutes), timed by pytest-benchmark and here

    def tight_bound() -> None:
        runs.append(timed(lambda: model_bound(model, (3, size, size), tight=True)))

    benchmark.pedantic(tight_bound, rounds=1, iterations=1)
    ((tight, seconds_tight),) = runs
    benchmark.extra_info.update(seconds_default=seconds, seconds_tight=seconds_tight,
                                ratio_tight_over_default=seconds_tight / seconds,
                                lipschitz_default=default.lipschitz, lipschitz_tight=tight.lipschitz,
                                loose_default=len(default.loose), loose_tight=len(tight.loose),
                                worst_gap_tight=max((g for _, g in tight.loose), default=0.0))
    assert tight.certified and tight.lipschitz <= default.lipschitz * (1 + 1e-9)


def test_convert(benchmark, request, convert_model):
    size = request.config.getoption("--bench-size")
    torch.manual_seed(0)
    model = timm.create_model(convert_model, num_classes=10)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    (_, report), seconds = timed(lambda: convert(model, example_input=x))
    (_, bounded), with_bound = timed(lambda: convert(model, example_input=x, bound=True))
    benchmark.pedantic(convert, args=(model,), kwargs=dict(example_input=x), rounds=1, iterations=1)
    benchmark.extra_info.update(seconds_default=seconds, seconds_with_bound=with_bound,
                                ratio_with_bound_over_default=with_bound / seconds,
                                bound_certified=bounded.bound.certified if bounded.bound else None)
    assert report.bound is None and bounded.bound is not None


def test_measure_on_converted(benchmark, request, convert_model):
    size = request.config.getoption("--bench-size")
    batch = request.config.getoption("--bench-batch")
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    model, _ = convert(timm.create_model(convert_model, num_classes=10), example_input=x[:1])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    folded, seconds = timed(lambda: measure(model, x))
    plain, unfolded = timed(lambda: measure(model, x, fold_bn=False))
    benchmark.pedantic(measure, args=(model, x), rounds=1, iterations=1)
    rel = ((folded.hessian_norm - plain.hessian_norm).abs() / plain.hessian_norm).max()
    benchmark.extra_info.update(seconds_default=seconds, seconds_unfolded=unfolded,
                                ratio_default_over_unfolded=seconds / unfolded,
                                folded=folded.options.get("fold_bn"),
                                fold_note=folded.options.get("fold_bn_note"),
                                max_rel_diff_hessian_norm=float(rel))
    assert float(rel) <= 1e-3
