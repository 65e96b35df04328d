"""Options and shared fixtures of the benchmark suites, selectable on the pytest command line.

Models, data, attacks and example counts are the options of the package's pytest plugin
(``--lcnn-models`` etc., ``pytest --help``); the options below are the suites' own sizes."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch

import lcnn_plugin  # noqa: F401  (registers the models)
from lcnn_plugin.pytest_plugin import options, timed


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lcnn benchmarks")
    group.addoption("--bench-batch", type=int, default=32, help="batch size (32)")
    group.addoption("--bench-size", type=int, default=32, help="input height and width (32)")
    group.addoption("--bench-gpu-batch", type=int, default=128, help="batch size of the GPU benchmarks (128)")
    group.addoption("--bench-train-steps", type=int, default=30,
                    help="SGD steps on the embedded data before the curvature benchmarks (30)")
    group.addoption("--bench-train-model", default="lcnn_resnet18_cifar",
                    help="model of the training-step suite (lcnn_resnet18_cifar)")
    group.addoption("--bench-train-batch", type=int, default=64, help="batch of the training-step suite (64)")
    group.addoption("--bench-convert-models", default="resnet18,cifar_resnet20",
                    help="comma-separated timm models of the convert/strip suite (resnet18,cifar_resnet20)")


DEFAULT_MODELS = "lcnn_resnet18_cifar,lcnn_standard_resnet18_cifar"


def pytest_configure(config: pytest.Config) -> None:
    """The suites' models are the plugin's --lcnn-models (these two by default)."""
    if not config.getoption("--lcnn-models"):
        config.option.lcnn_models = DEFAULT_MODELS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_name" in metafunc.fixturenames:  # the suites that build their own timm models
        specs = options(metafunc.config).models
        names = [s.target for s in specs if s.kind == "timm" and not s.weights]
        metafunc.parametrize("model_name", names, scope="module")


def _synthetic(split: str, n: int, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    from lcnn_plugin.data import synthetic

    x, y = synthetic(split, n=n).floats()
    if size != 32:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.to(device), y.to(device)


def bench_model(
    name: str, batch: int, size: int, device: str = "cpu", train_steps: int = 0
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A timm model (eval) after ``train_steps`` SGD steps of cross-entropy on the embedded
    synthetic images (BatchNorm statistics and spectral norms settled either way), and a
    batch of held-out synthetic images with their labels.

    A few training steps matter for curvature benchmarks: at initialisation input
    gradients and Hessians are tiny (‖∇²f‖ ~ 1e-7..1e-5), where the reference estimator's
    +1e-6 in its normalisation dominates and no accuracy comparison is meaningful.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).to(device)
    model.train()
    if train_steps:
        xs, ys = _synthetic("train", 64 * train_steps, size, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for i in range(train_steps):
            loss = torch.nn.functional.cross_entropy(model(xs[64 * i:64 * (i + 1)]), ys[64 * i:64 * (i + 1)])
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(batch, 3, size, size, device=device))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = _synthetic("test", batch, size, device)
    return model, x, y


_CASES: dict = {}
LADDER = (10, 20, 40, 80, 160)  # k of the paper's estimator tried for equal accuracy


def curvature_case(model_name: str, batch: int, size: int, steps: int, device: str = "cpu") -> dict:
    """A briefly trained model, a held-out batch and the tight Lanczos truth (tol 1e-7, ≤ 200
    steps) of its Hessian norms; cached per arguments."""
    from lcnn_plugin.curvature import measure

    key = (model_name, batch, size, steps, device)
    if key not in _CASES:
        model, x, y = bench_model(model_name, batch, size, device=device, train_steps=steps)
        truth = measure(model, x, y, method="lanczos", tol=1e-7, max_iter=200).hessian_norm
        _CASES[key] = dict(model=model, x=x, y=y, truth=truth, seconds={})
    return _CASES[key]


def accuracy(result: Any, truth: torch.Tensor) -> dict:
    """HVPs per example and the relative error of the Hessian norms against ``truth``."""
    rel = (result.hessian_norm - truth).abs() / truth
    return dict(hvps_mean=float(result.hvps.double().mean()),
                within_1pct=float((rel <= 0.01).double().mean()),
                median_rel_error=float(rel.median()), max_rel_error=float(rel.max()))


def reference_ladder(case: dict) -> tuple[dict, int | None]:
    """The paper's estimator at increasing k until ≥ 95% of examples are within 1% of the
    truth: ({k: seconds and accuracy}, the k that got there or None)."""
    from lcnn_plugin.curvature import measure

    ladder = {}
    for k in LADDER:
        res, secs = timed(lambda k=k: measure(case["model"], case["x"], case["y"], method="reference", k=k))
        ladder[k] = dict(seconds=secs, **accuracy(res, case["truth"]))
        if ladder[k]["within_1pct"] >= 0.95:
            return ladder, k
    return ladder, None
