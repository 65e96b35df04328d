"""Options of the benchmark suites (models, sizes), selectable on the pytest command line."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lcnn benchmarks")
    group.addoption("--bench-models", default="lcnn_resnet18_cifar,lcnn_standard_resnet18_cifar",
                    help="comma-separated timm model names")
    group.addoption("--bench-batch", type=int, default=32, help="batch size (32)")
    group.addoption("--bench-size", type=int, default=32, help="input height and width (32)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_name" in metafunc.fixturenames:
        names = [n for n in metafunc.config.getoption("--bench-models").split(",") if n]
        metafunc.parametrize("model_name", names, scope="module")
