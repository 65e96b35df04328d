"""lcnn_plugin.convert and strip: the eval forward of a converted-then-stripped model against the
unconverted model (same architecture, same batch, same run). Target: stripped ≤ 1.05× unconverted.

The stripped model has no spectral norms or γ clips left (plain convs, linears and BatchNorms
with the factors baked in), but it keeps the centered softplus: that is the LCNN's function,
not an overhead of the conversion. The ratio is reported for eager mode and asserted there.
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
    converted, _ = convert(model, example_input=x[:2], bound=False)
    plain = strip(converted.eval()).eval()

    def forward(m):
        with torch.no_grad():
            return m(x)

    with torch.no_grad():
        err = float((plain(x) - converted(x)).abs().max())
    times = {}
    for label, m in (("unconverted", model), ("converted", converted), ("stripped", plain)):
        forward(m)  # warm-up
        times[label] = min(timed(lambda m=m: forward(m))[1] for _ in range(5))
    benchmark.pedantic(forward, args=(plain,), rounds=1, iterations=1)
    ratio = times["stripped"] / times["unconverted"]
    benchmark.extra_info.update(seconds=times, ratio_stripped_over_unconverted=ratio,
                                ratio_converted_over_unconverted=times["converted"] / times["unconverted"],
                                max_abs_diff_stripped_vs_converted=err)
    assert err <= 1e-5 * max(1.0, float(converted(x).abs().max()))
    if not benchmark.disabled:
        assert ratio <= 1.05
