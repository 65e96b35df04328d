"""Options and shared fixtures of the benchmark suites, selectable on the pytest command line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch

import lcnn_plugin  # noqa: F401  (registers the models)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lcnn benchmarks")
    group.addoption("--bench-models", default="lcnn_resnet18_cifar,lcnn_standard_resnet18_cifar",
                    help="comma-separated timm model names")
    group.addoption("--bench-batch", type=int, default=32, help="batch size (32)")
    group.addoption("--bench-size", type=int, default=32, help="input height and width (32)")
    group.addoption("--bench-gpu-batch", type=int, default=128, help="batch size of the GPU benchmarks (128)")
    group.addoption("--bench-train-model", default="lcnn_resnet18_cifar",
                    help="model of the training-step suite (lcnn_resnet18_cifar)")
    group.addoption("--bench-train-batch", type=int, default=64, help="batch of the training-step suite (64)")
    group.addoption("--bench-data", default=None,
                    help="ImageFolder of test images for the robustness suite (default: random images "
                         "labelled by the model's own prediction)")
    group.addoption("--bench-examples", type=int, default=64, help="examples of the robustness suite (64)")
    group.addoption("--bench-eps", default="0.0078431,0.0156863,0.0313725",
                    help="comma-separated L-inf ε of the robustness suite (2/255, 4/255, 8/255)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_name" in metafunc.fixturenames:
        names = [n for n in metafunc.config.getoption("--bench-models").split(",") if n]
        metafunc.parametrize("model_name", names, scope="module")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds), synchronising CUDA around the call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_model(
    name: str, batch: int, size: int, device: str = "cpu"
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A timm model with settled BatchNorm statistics and spectral norms (eval), and a batch."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).to(device)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(batch, 3, size, size, device=device))
    model.eval()
    return model, torch.rand(batch, 3, size, size, device=device)
