"""lcnn_plugin.convert and strip: the eval forward of a converted-then-stripped model (same
architecture, same batch, same run) against

- the unconverted model with only its activations swapped for the centered softplus
  (``convert(spectral_norm=False, lipschitz_bn=False)``): what strip() must match, since it
  removes the conversion's overhead (spectral norms, γ clips) but keeps the LCNN's function.
  Target: stripped ≤ 1.05× this twin (asserted);
- the unconverted model itself (reported): the centered softplus costs several times a ReLU
  (exp and log per element), which no stripping removes.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import timed

from lcnn_plugin import convert, strip


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "convert_model" in metafunc.fixturenames:
        names = [n for n in metafunc.config.getoption("--bench-convert-models").split(",") if n]
        metafunc.parametrize("convert_model", names)


def test_strip_eval_forward(benchmark, request, convert_model):
    batch = request.config.getoption("--bench-batch")
    size = request.config.getoption("--bench-size")
    torch.manual_seed(0)
    model = timm.create_model(convert_model, num_classes=10).eval()
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    converted, _ = convert(model, example_input=x[:2])
    plain = strip(converted.eval()).eval()
    softplus_twin, _ = convert(model, example_input=x[:2], spectral_norm=False,
                               lipschitz_bn=False)
    softplus_twin.eval()

    def forward(m):
        with torch.no_grad():
            return m(x)

    with torch.no_grad():
        err = float((plain(x) - converted(x)).abs().max())
    variants = {"unconverted": model, "activations_only": softplus_twin, "converted": converted,
                "stripped": plain}
    times = {label: float("inf") for label in variants}
    for m in variants.values():
        forward(m)  # warm-up
    for _ in range(10):  # round robin, so that drift of the machine hits every variant alike
        for label, m in variants.items():
            times[label] = min(times[label], timed(lambda m=m: forward(m))[1])
    benchmark.pedantic(forward, args=(plain,), rounds=1, iterations=1)
    ratio = times["stripped"] / times["activations_only"]
    benchmark.extra_info.update(seconds=times, ratio_stripped_over_activations_only=ratio,
                                ratio_stripped_over_unconverted=times["stripped"] / times["unconverted"],
                                ratio_converted_over_unconverted=times["converted"] / times["unconverted"],
                                max_abs_diff_stripped_vs_converted=err)
    assert err <= 1e-5 * max(1.0, float(converted(x).abs().max()))
    if not benchmark.disabled:
        assert ratio <= 1.05
