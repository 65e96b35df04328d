"""Robustness: PGD over an ε sweep per model, and PGD / eval-forward cost of an LCNN
against its standard twin (same skeleton, same batch).

Run: ``pytest benchmarks/test_robustness_bench.py [--bench-models ...] [--bench-data DIR]
[--bench-examples N] [--bench-eps ...]``. The attack is the timed part; extra_info holds
clean and robust accuracy per ε. Target (asserted): PGD on the LCNN ResNet-18 takes at most
1.10× the time of PGD on the standard ResNet-18.
"""

from __future__ import annotations

import pytest
import torch
import torchattacks
from conftest import bench_model, timed

from lcnn_plugin.robustness import evaluate

TWINS = ("lcnn_resnet18_cifar", "lcnn_standard_resnet18_cifar")


def _batches(model, request):
    n = request.config.getoption("--bench-examples")
    size = request.config.getoption("--bench-size")
    batch = request.config.getoption("--bench-batch")
    root = request.config.getoption("--bench-data")
    if root:
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])
        ds = datasets.ImageFolder(root, transform=tf)
        step = max(1, len(ds) // n)  # spread over the folder: ImageFolders are sorted by class
        sub = torch.utils.data.Subset(ds, range(0, step * min(n, len(ds)), step))
        return list(torch.utils.data.DataLoader(sub, batch_size=batch))
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_pgd_sweep(benchmark, model_name, request):
    model = bench_model(model_name, request.config.getoption("--bench-batch"),
                        request.config.getoption("--bench-size"))[0]
    eps = [float(e) for e in request.config.getoption("--bench-eps").split(",")]
    loader = _batches(model, request)
    res = benchmark.pedantic(evaluate, args=(model, loader, ["pgd"], eps),
                             kwargs=dict(checks=False, progress=False, model_name=model_name),
                             rounds=1, iterations=1)
    benchmark.extra_info.update(n=res.n, clean_acc=res.clean_acc,
                                robust_acc={f"{e.eps:.5g}": e.robust_acc for e in res.entries})


@pytest.fixture(scope="module")
def twins(request):
    batch = request.config.getoption("--bench-batch")
    size = request.config.getoption("--bench-size")
    return {name: bench_model(name, batch, size)[:2] for name in TWINS}


def _ratio(benchmark, twins, fn, n=3):
    times = {}
    for name, (model, x) in twins.items():
        fn(model, x)  # warm-up
        times[name] = min(timed(lambda m=model, t=x: fn(m, t))[1] for _ in range(n))
    model, x = twins[TWINS[0]]
    benchmark.pedantic(fn, args=(model, x), rounds=1, iterations=1)
    ratio = times[TWINS[0]] / times[TWINS[1]]
    benchmark.extra_info.update(seconds=times, ratio_lcnn_over_standard=ratio)
    return ratio


def test_pgd_lcnn_vs_standard(benchmark, twins):
    def pgd(model, x):
        with torch.no_grad():
            y = model(x).argmax(1)
        torch.manual_seed(0)
        return torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)(x, y)

    ratio = _ratio(benchmark, twins, pgd, n=2)
    if not benchmark.disabled:
        assert ratio <= 1.10


def test_eval_forward_lcnn_vs_standard(benchmark, twins):
    def forward(model, x):
        with torch.no_grad():
            return model(x)

    _ratio(benchmark, twins, forward, n=5)
