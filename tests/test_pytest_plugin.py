"""The pytest plugin as a user would use it: a project in a temporary directory with its own
model factory and benchmark file, run through pytest with the installed plugin; the figures
in the benchmark JSON against a direct robustness.evaluate() call; bench-report on the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lcnn_plugin.cli import main
from lcnn_plugin.data import synthetic
from lcnn_plugin.robustness import evaluate

pytest_plugins = ["pytester"]

FACTORY = """
import torch
from torch import nn


def tiny():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10))
"""

BENCH = """
def test_robust(lcnn_robustness):
    lcnn_robustness()


def test_curvature(lcnn_curvature):
    lcnn_curvature()
"""

ARGS = ["--lcnn-attacks", "pgd", "--lcnn-eps-linf", "2/255,8/255", "--lcnn-examples", "100",
        "--lcnn-batch-size", "16", "--lcnn-curvature-examples", "6", "--lcnn-seed", "1",
        "-p", "no:cacheprovider"]


def _tiny() -> nn.Module:
    ns: dict = {}
    exec(FACTORY, ns)  # the user's factory, built here independently of the plugin
    return ns["tiny"]().eval()


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(mymodels=FACTORY, test_user_bench=BENCH)
    return pytester


def test_user_project_benchmarks_equal_a_direct_evaluation(project: pytest.Pytester, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = project.path / "bench.json"
    result = project.runpytest("--lcnn-models", "mymodels:tiny", *ARGS, f"--benchmark-json={out}")
    result.assert_outcomes(passed=2)
    data = json.loads(out.read_text())
    info = {b["name"]: b["extra_info"]["lcnn"] for b in data["benchmarks"]}
    rob = info["test_robust[mymodels:tiny]"]
    # the same model, data sample, attack and seed, evaluated directly
    sample = synthetic("test").sample(100, 1)
    direct = evaluate(_tiny(), list(sample.batches(16)), ["pgd"], {"Linf": [2 / 255, 8 / 255]}, seed=1,
                      progress=False)
    assert rob["n_examples"] == 100 and rob["clean_acc"] == direct.clean_acc
    got = {(r["attack"], r["eps"]): (r["robust_acc"], r["robust_acc_ci95"]) for r in rob["rows"]}
    want = {(e.attack, e.eps): (e.robust_acc, list(e.ci95)) for e in direct.entries}
    assert got == want
    assert {c["name"] for c in rob["checks"]} >= {"monotone_eps", "large_eps", "gradients", "deterministic"}
    assert rob["rows"][0]["protocol"].startswith("PGD-Linf, 10 steps")
    curv = info["test_curvature[mymodels:tiny]"]
    assert curv["n"] == 6 and set(curv["stats"]) == {"grad_norm", "hessian_norm", "curvature"}
    # bench-report: the markdown tables and the plot
    assert main(["bench-report", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| mymodels:tiny |" in md and "## Input curvature" in md and "PGD-Linf, 10 steps" in md
    assert f"{100 * want[('pgd', 8 / 255)][0]:.1f}" in md
    assert (tmp_path / "report" / "robust_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["bench-report", str(out)]) == 0 and "## Robust accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("spec,message", [
    ("resnet18x", "unknown timm model 'resnet18x' (did you mean"),
    ("mymodels:tinny", "mymodels has no callable 'tinny' (did you mean 'tiny'?)"),
    ("nomodule_here:build", "cannot import nomodule_here"),
    ("./runs/nothere", "no run folder ./runs/nothere"),
    ("resnet18=missing.pth", "weights file 'missing.pth' not found"),
])
def test_bad_model_spec_is_a_one_line_usage_error(project: pytest.Pytester, spec: str, message: str) -> None:
    result = project.runpytest("--lcnn-models", spec, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = [line for line in result.errlines if line.strip()]
    assert len(err) == 1 and message in err[0] and "Traceback" not in result.stdout.str(), result.errlines


def test_options_in_help_and_skip_without_models(project: pytest.Pytester) -> None:
    result = project.runpytest("--help")
    text = result.stdout.str()
    for option in ("--lcnn-models", "--lcnn-data", "--lcnn-attacks", "--lcnn-eps-l2", "--lcnn-examples",
                   "--lcnn-twin"):
        assert option in text
    result = project.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=2)
    assert "no --lcnn-models given" in result.stdout.str()
    bad = project.runpytest("--lcnn-models", "mymodels:tiny", "--lcnn-attacks", "pgd,pgx")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR and "did you mean 'pgd'" in "\n".join(bad.errlines)


def test_throughput_against_a_twin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(mymodels=FACTORY + """

def wider():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 12, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 64, 10))
""", test_speed="""
def test_forward(lcnn_throughput):
    lcnn_throughput("eval_forward", rounds=2)
""")
    out = pytester.path / "t.json"
    result = pytester.runpytest("--lcnn-models", "mymodels:tiny", "--lcnn-twin", "mymodels:wider",
                                "--lcnn-batch-size", "8", f"--benchmark-json={out}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    info = json.loads(out.read_text())["benchmarks"][0]["extra_info"]["lcnn"]
    assert info["twin"] == "mymodels:wider" and info["batch"] == 8
    seconds = info["seconds"]
    assert info["ratio"] == pytest.approx(seconds["mymodels:tiny"] / seconds["mymodels:wider"])


def test_bench_report_refuses_what_is_not_a_benchmark_file(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert main(["bench-report", str(bad)]) == 2
    assert "x.json: not JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"results": []}))
    assert main(["bench-report", str(bad)]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err
    assert main(["bench-report", str(tmp_path / "none.json")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_factory_model_spec_in_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mymodels.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["curvature", "mymodels:tiny", "--max-examples", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    x, y = synthetic("test").sample(4, 0).floats()
    from lcnn_plugin.curvature import measure

    want = measure(_tiny(), x, y).grad_norm.double()
    assert got["stats"]["grad_norm"]["mean"] == pytest.approx(float(want.mean()), rel=1e-6)
    assert torch.isfinite(want).all()
