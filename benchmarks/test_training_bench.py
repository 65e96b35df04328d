"""One training step per objective against the standard objective, same model and batch.

``pytest benchmarks/test_training_bench.py [--bench-train-model NAME] [--bench-train-batch N]``
(defaults: LCNN ResNet-18 with the CIFAR stem, batch 64, 32×32). Each step is forward,
objective, backward and an SGD update; the reported figure is the best of 3 timed steps
after a warm-up. Targets (asserted when timing): LCNN ≤ 1.2×, GradReg ≤ 3×, 3-step
adversarial ≤ 5× the standard step.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import timed

from lcnn_plugin.objectives import make_objective, param_groups

TARGETS = {"lcnn": 1.2, "gradreg": 3.0, "lcnn+gradreg": None, "cure": None, "adversarial": 5.0}
_TIMES: dict = {}


@pytest.fixture(scope="module")
def setup(request):
    name = request.config.getoption("--bench-train-model")
    batch = request.config.getoption("--bench-train-batch")
    size = request.config.getoption("--bench-size")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    return model, opt, x, y


def _step_time(model, opt, x, y, objective) -> float:
    def step():
        out = objective(model, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    step()  # warm-up
    return min(timed(step)[1] for _ in range(3))


@pytest.mark.parametrize("objective", ["standard", *TARGETS])
def test_training_step(benchmark, setup, objective):
    model, opt, x, y = setup
    obj = make_objective(objective)
    if "standard" not in _TIMES:
        _TIMES["standard"] = _step_time(model, opt, x, y, make_objective("standard"))
    t = _TIMES["standard"] if objective == "standard" else _step_time(model, opt, x, y, obj)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are in extra_info
    ratio = t / _TIMES["standard"]
    benchmark.extra_info.update(step_seconds=t, standard_step_seconds=_TIMES["standard"], ratio=ratio)
    target = TARGETS.get(objective)
    if target is not None and not benchmark.disabled:
        assert ratio <= target, f"{objective}: {ratio:.2f}× the standard step (target ≤ {target}×)"
