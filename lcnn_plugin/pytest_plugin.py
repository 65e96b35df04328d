"""pytest plugin (entry point ``pytest11``): benchmark your own models with pytest-benchmark.

Installed with the package; ``pytest --help`` lists its options under "lcnn-plugin". A user's
benchmark file calls the fixtures, each of which times the work it names once with
pytest-benchmark and records its figures under ``extra_info["lcnn"]`` (so they land in
``--benchmark-json``; ``lcnn bench-report FILE.json`` turns that into a markdown report and
a plot)::

    def test_robustness(lcnn_robustness):
        lcnn_robustness()                     # --lcnn-attacks at the --lcnn-eps-* sweep

    def test_curvature(lcnn_curvature):
        lcnn_curvature()                      # Lanczos on --lcnn-curvature-examples images

    def test_pgd_speed(lcnn_throughput):
        lcnn_throughput("pgd")                # against the twin model (--lcnn-twin)

Every test that uses a model runs once per ``--lcnn-models`` specification (timm names,
``NAME=WEIGHTS``, ``lcnn train`` run folders, ``module:function``; see :mod:`lcnn_plugin.spec`).
Data: ``--lcnn-data`` (the embedded ``synthetic`` set, a torchvision dataset or an
ImageFolder); every evaluation takes a seeded random sample of its split. One lcnn fixture
per test (pytest-benchmark times one thing per test). Bad options are usage errors (one line).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from .argtypes import count, floats, names

_GROUP = "lcnn-plugin"
_SKIP = "no --lcnn-models given (pytest --help: lcnn-plugin)"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup(_GROUP, "lcnn-plugin: robustness, curvature and speed benchmarks of your models")
    g.addoption(
        "--lcnn-models",
        default=None,
        help="comma-separated models: timm names, NAME=WEIGHTS_FILE, `lcnn train` run folders, "
        "module:function returning a torch.nn.Module",
    )
    g.addoption("--lcnn-num-classes", type=count(2), default=10, help="classes of timm models (10)")
    g.addoption(
        "--lcnn-twin",
        default=None,
        help="model the throughput fixture compares against (default: lcnn_standard_X for a timm "
        "lcnn_X; otherwise none)",
    )
    g.addoption(
        "--lcnn-data",
        default="synthetic",
        help="synthetic (the embedded set, default), cifar10, cifar100, svhn (torchvision, under "
        "--lcnn-data-root) or an ImageFolder path",
    )
    g.addoption("--lcnn-data-root", default="./data", help="root of the torchvision datasets (./data)")
    g.addoption("--lcnn-split", default="test", choices=("train", "test"), help="split evaluated (test)")
    g.addoption(
        "--lcnn-attacks",
        default="pgd,apgd",
        help="comma-separated attacks of lcnn_plugin.robustness (pgd,apgd)",
    )
    g.addoption(
        "--lcnn-eps-linf",
        type=floats,
        default=[2 / 255, 4 / 255, 8 / 255],
        help="L-inf ε sweep, numbers or fractions (2/255,4/255,8/255)",
    )
    g.addoption("--lcnn-eps-l2", type=floats, default=[0.1, 0.25, 0.5], help="L2 ε sweep (0.1,0.25,0.5)")
    g.addoption("--lcnn-steps", type=count(1), default=10, help="PGD/APGD steps (10)")
    g.addoption(
        "--lcnn-examples",
        type=count(1),
        default=500,
        help="examples of the robustness benchmark: a seeded random sample (500)",
    )
    g.addoption(
        "--lcnn-curvature-examples",
        type=count(1),
        default=100,
        help="examples of the curvature benchmark: a seeded random sample (100)",
    )
    g.addoption("--lcnn-batch-size", type=count(1), default=100, help="examples per batch (100)")
    g.addoption("--lcnn-seed", type=count(0), default=0, help="seed of the samples and attacks (0)")


@dataclass(frozen=True)
class Options:
    models: list  # ModelSpec
    num_classes: int
    twin: Any  # ModelSpec | None
    data: str
    data_root: str
    split: str
    attacks: list[str]
    eps: dict[str, list[float]]
    steps: int
    examples: int
    curvature_examples: int
    batch_size: int
    seed: int


def options(config: pytest.Config) -> Options:
    """The plugin's parsed options (a usage error names the option at fault)."""
    cached = getattr(config, "_lcnn_options", None)
    if cached is not None:
        return cached
    from .data import check_source
    from .robustness import ATTACKS
    from .spec import parse
    from .validate import InputError

    get = config.getoption
    try:
        models = [parse(t) for t in (get("--lcnn-models") or "").split(",") if t]
        twin = parse(get("--lcnn-twin")) if get("--lcnn-twin") else None
    except InputError as e:
        raise pytest.UsageError(f"--lcnn-models/--lcnn-twin: {e}") from None
    try:
        attacks = names(tuple(ATTACKS), "attack ")(get("--lcnn-attacks"))
    except argparse.ArgumentTypeError as e:
        raise pytest.UsageError(f"--lcnn-attacks: {e}") from None
    data = get("--lcnn-data")
    try:
        check_source(data)
    except InputError as e:
        raise pytest.UsageError(f"--lcnn-data: {e}") from None
    norms = {ATTACKS[a] for a in attacks}
    eps = {
        n: get("--lcnn-eps-linf" if n == "Linf" else "--lcnn-eps-l2") for n in ("Linf", "L2") if n in norms
    }
    opts = Options(
        models,
        get("--lcnn-num-classes"),
        twin,
        data,
        get("--lcnn-data-root"),
        get("--lcnn-split"),
        attacks,
        eps,
        get("--lcnn-steps"),
        get("--lcnn-examples"),
        get("--lcnn-curvature-examples"),
        get("--lcnn-batch-size"),
        get("--lcnn-seed"),
    )
    config._lcnn_options = opts
    return opts


@pytest.hookimpl(trylast=True)  # after conftest files that set defaults
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--lcnn-models", None) or config.getoption("--lcnn-twin", None):
        options(config)  # usage errors before collection


def pytest_unconfigure(config: pytest.Config) -> None:
    _MODELS.clear()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lcnn_model_spec" not in metafunc.fixturenames:
        return
    specs = options(metafunc.config).models
    if specs:
        metafunc.parametrize("lcnn_model_spec", specs, ids=[s.text for s in specs], scope="session")
    else:
        metafunc.parametrize(
            "lcnn_model_spec",
            [pytest.param(None, marks=pytest.mark.skip(reason=_SKIP))],
            ids=["no-model"],
            scope="session",
        )


def _fail(e: Exception) -> None:
    pytest.fail(f"lcnn-plugin: {e}", pytrace=False)


_MODELS: dict = {}


def _load(spec: Any, num_classes: int) -> Any:
    from .validate import InputError

    key = (spec.text, num_classes)
    if key not in _MODELS:
        try:
            _MODELS[key] = spec.load(num_classes if spec.kind == "timm" else None)
        except InputError as e:
            _fail(e)
    return _MODELS[key]


@pytest.fixture(scope="session")
def lcnn_options(request: pytest.FixtureRequest) -> Options:
    """The plugin's parsed command-line options."""
    return options(request.config)


@pytest.fixture(scope="session")
def lcnn_data(lcnn_options: Options) -> Any:
    """The ``--lcnn-data`` split as :class:`lcnn_plugin.data.ImageData`."""
    from .data import load_dataset
    from .validate import InputError

    try:
        return load_dataset(lcnn_options.data, lcnn_options.split, lcnn_options.data_root)
    except InputError as e:
        _fail(e)


@pytest.fixture(scope="session")
def lcnn_model(lcnn_model_spec: Any, lcnn_options: Options, lcnn_data: Any) -> Any:
    """The model of this test's ``--lcnn-models`` entry (eval mode), checked against the data."""
    from .validate import InputError, fits

    model = _load(lcnn_model_spec, lcnn_options.num_classes)
    try:
        fits(
            model,
            lcnn_data.images[:1],
            lcnn_data.labels,
            len(lcnn_data.classes),
            f"model {lcnn_model_spec.text} on data {lcnn_data.name}",
        )
    except InputError as e:
        _fail(e)
    return model


@pytest.fixture
def lcnn_robustness(
    benchmark: Any, lcnn_model: Any, lcnn_model_spec: Any, lcnn_options: Options, lcnn_data: Any
) -> Callable[..., Any]:
    """``run(attacks=None, eps=None, examples=None, steps=None, checks=True)``: times
    :func:`lcnn_plugin.robustness.evaluate` on a seeded sample and returns its result;
    extra_info["lcnn"] holds clean and robust accuracy per attack and ε with 95% intervals,
    protocols, seconds, the honesty checks' verdicts and ``flagged``."""
    from .robustness import evaluate

    o = lcnn_options

    def run(
        attacks: list[str] | None = None,
        eps: dict[str, list[float]] | None = None,
        examples: int | None = None,
        steps: int | None = None,
        checks: bool = True,
    ) -> Any:
        sample = lcnn_data.sample(examples or o.examples, o.seed)
        batches = list(sample.batches(o.batch_size))
        res = benchmark.pedantic(
            evaluate,
            args=(lcnn_model, batches, attacks or o.attacks, eps or o.eps),
            kwargs=dict(
                steps=steps or o.steps,
                seed=o.seed,
                checks=checks,
                progress=False,
                model_name=lcnn_model_spec.text,
                dataset=sample.name,
            ),
            rounds=1,
            iterations=1,
        )
        benchmark.extra_info["lcnn"] = dict(kind="robustness", **res.as_dict())
        return res

    return run


@pytest.fixture
def lcnn_curvature(
    benchmark: Any, lcnn_model: Any, lcnn_model_spec: Any, lcnn_options: Options, lcnn_data: Any
) -> Callable[..., Any]:
    """``run(examples=None, **measure_kwargs)``: times :func:`lcnn_plugin.curvature.report`
    (per-example gradient norm, Hessian norm and curvature) on a seeded sample and returns it;
    extra_info["lcnn"] holds the statistics (mean, std, quantiles)."""
    from .curvature import report

    o = lcnn_options

    def run(examples: int | None = None, **measure_kwargs: Any) -> Any:
        sample = lcnn_data.sample(examples or o.curvature_examples, o.seed + 1)
        batches = list(sample.batches(o.batch_size))
        rep = benchmark.pedantic(
            report,
            args=(lcnn_model, batches),
            kwargs=dict(progress=False, **measure_kwargs),
            rounds=1,
            iterations=1,
        )
        benchmark.extra_info["lcnn"] = dict(
            kind="curvature",
            model=lcnn_model_spec.text,
            data=sample.name,
            n=rep.n,
            method=rep.method,
            hvps_mean=rep.hvps_mean,
            converged_fraction=rep.converged_fraction,
            stats=rep.stats,
            **rep.options,
        )
        return rep

    return run


def _default_twin(spec: Any) -> Any:
    from .spec import parse

    name = spec.target if spec.kind == "timm" and not spec.weights else ""
    if name.startswith("lcnn_") and not name.startswith(("lcnn_standard_", "lcnn_softplus_")):
        return parse("lcnn_standard_" + name.removeprefix("lcnn_"))
    return None


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds), synchronising CUDA around the call (also used by benchmarks/)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


@pytest.fixture
def lcnn_throughput(
    benchmark: Any, lcnn_model: Any, lcnn_model_spec: Any, lcnn_options: Options, lcnn_data: Any
) -> Callable[..., float]:
    """``run(kind="eval_forward" | "pgd", rounds=5, batch=None)``: the model's time per batch
    against its twin's (``--lcnn-twin``, or lcnn_standard_X for lcnn_X), interleaved rounds,
    best of each, on the same batch; pytest-benchmark times the model's own call. Returns the
    ratio model / twin; extra_info["lcnn"] holds both times and the ratio. PGD: L∞, ε = 8/255,
    10 steps, α = 2/255, on the model's own predictions."""
    import torch
    import torchattacks

    o = lcnn_options
    twin_spec = o.twin or _default_twin(lcnn_model_spec)

    def run(kind: str = "eval_forward", rounds: int = 5, batch: int | None = None) -> float:
        if kind not in ("eval_forward", "pgd"):
            raise ValueError(f"lcnn_throughput: kind must be 'eval_forward' or 'pgd', got {kind!r}")
        if twin_spec is None:
            pytest.skip(f"no twin for {lcnn_model_spec.text}: give --lcnn-twin")
        twin = _load(twin_spec, o.num_classes)
        x, _ = lcnn_data.sample(batch or o.batch_size, o.seed).floats()

        def work(model: Any) -> Any:
            with torch.no_grad():
                out = model(x)
            if kind == "eval_forward":
                return out
            torch.manual_seed(o.seed)
            return torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)(x, out.argmax(1))

        pair = {lcnn_model_spec.text: lcnn_model, twin_spec.text: twin}
        for m in pair.values():
            work(m)  # warm-up
        times = {k: math.inf for k in pair}
        for _ in range(rounds):
            for k, m in pair.items():
                times[k] = min(times[k], timed(lambda m=m: work(m))[1])
        benchmark.pedantic(work, args=(lcnn_model,), rounds=1, iterations=1)
        ratio = times[lcnn_model_spec.text] / times[twin_spec.text]
        benchmark.extra_info["lcnn"] = dict(
            kind="throughput",
            what=kind,
            model=lcnn_model_spec.text,
            twin=twin_spec.text,
            batch=int(x.shape[0]),
            seconds=times,
            ratio=ratio,
        )
        return ratio

    return run
