"""lcnn reproduce: presets, resume after interruptions, settings checks, the claims' verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lcnn_plugin.reproduce as rep
import lcnn_plugin.train as train_mod
from lcnn_plugin.cli import main
from lcnn_plugin.reproduce import reproduce, settings_for, shape_verdicts
from lcnn_plugin.validate import InputError

# the smoke preset, smaller still: two models, one epoch of 2 steps, checkpoints after every step
TINY = dict(train_examples=256, checkpoint_every=1, curvature_examples=8, robust_examples=24, eps=(0.5,),
            steps=2, rgr_examples=8, rgr_radii=(0.1, 1.0), rgr_samples=2)
TIMING = {"seconds", "eval_seconds", "seconds_per_epoch"}


def _without_timing(obj):  # noqa: ANN001,ANN202
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "a"
    with pytest.warns(UserWarning, match="24 examples only"):
        reproduce(settings_for("smoke", **TINY), out, progress=False)
    return out


def test_preset_writes_report_json_and_plots(uninterrupted: Path) -> None:
    results = json.loads((uninterrupted / "results.json").read_text())
    assert list(results["models"]) == ["standard", "lcnn+gradreg"] and results["pending"] == []
    for label, ev in results["models"].items():
        assert ev["model"] == rep.MODELS[label][0] + "resnet10_w16_cifar"
        assert ev["accuracy"]["test"]["n"] == 2000  # the whole synthetic test split
        assert ev["curvature"]["n"] == 8 and ev["robustness"]["n_examples"] == 24
        assert ev["training"]["epochs"] == 1
        assert len(ev["relative_gradient_robustness"]["mean"]) == 2
        run = json.loads((uninterrupted / "runs" / rep._slug(label) / "checkpoint.json").read_text())
        assert run["config"]["objective"] == rep.MODELS[label][1] and run["epoch"] == 1
        log = (uninterrupted / "runs" / rep._slug(label) / "metrics.jsonl").read_text().splitlines()
        assert ev["training"]["seconds_per_epoch"] == [json.loads(line)["seconds"] for line in log]
    report = (uninterrupted / "report.md").read_text()
    per_epoch = {k: ev["training"]["seconds_per_epoch"][0] for k, ev in results["models"].items()}  # 1 epoch
    assert f"| {per_epoch['lcnn+gradreg'] / per_epoch['standard']:.2f} |" in report  # × standard
    for needle in ("## Geometry and accuracy (ours)", "| lcnn+gradreg |", "## The paper's figures (theirs",
                   "E‖∇²f‖", "ε=0.5"):
        assert needle in report
    for plot in ("robust_accuracy.png", "curvature.png", "relative_gradient_robustness.png"):
        assert (uninterrupted / plot).read_bytes()[:4] == b"\x89PNG"


def test_interrupted_run_continues_and_gives_the_same_results(
        uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for("smoke", **TINY)
    out = tmp_path / "b"
    # 1. stop inside the second model's training, right after its mid-epoch checkpoint
    write = train_mod._write_checkpoint
    calls = []

    def write_then_stop(*args, **kwargs):  # noqa: ANN002,ANN003,ANN202
        write(*args, **kwargs)
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_write_checkpoint", write_then_stop)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        reproduce(settings, out, progress=False)
    assert json.loads((out / "runs" / "lcnn-gradreg" / "checkpoint.json").read_text())["step_in_epoch"] == 1
    assert (out / "eval" / "standard.json").exists() and not (out / "eval" / "lcnn-gradreg.json").exists()
    monkeypatch.setattr(train_mod, "_write_checkpoint", write)
    # 2. stop inside the second model's evaluation
    evaluate = rep._evaluate

    def stop(*args, **kwargs):  # noqa: ANN002,ANN003,ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(rep, "_evaluate", stop)
    with pytest.raises(KeyboardInterrupt):
        reproduce(settings, out, progress=False)
    assert json.loads((out / "runs" / "lcnn-gradreg" / "checkpoint.json").read_text())["epoch"] == 1
    monkeypatch.setattr(rep, "_evaluate", evaluate)
    # 3. finish: only the second model's evaluation is left
    with pytest.warns(UserWarning):
        reproduce(settings, out, progress=False)
    a = json.loads((uninterrupted / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert _without_timing(b) == _without_timing(a)
    assert (out / "report.md").exists()


def test_models_may_change_other_settings_may_not(uninterrupted: Path) -> None:
    results = reproduce(settings_for("smoke", **dict(TINY, models=("lcnn+gradreg",))), uninterrupted,
                        progress=False)  # evaluated already: nothing is trained or measured again
    assert list(results["models"]) == ["lcnn+gradreg"]
    with pytest.raises(InputError, match=r"other settings \(epochs: 1 there, 2 now"):
        reproduce(settings_for("smoke", **dict(TINY, epochs=2)), uninterrupted, progress=False)
    reproduce(settings_for("smoke", **TINY), uninterrupted, progress=False)  # restore the fixture's report


def test_settings_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    cases = [(dict(models=("standard", "lcnn+gradre")), r"models: .*did you mean 'lcnn\+gradreg'"),
             (dict(models=()), "models: expected at least one value"),
             (dict(arch="resnet11_cifar"), "arch: no timm model 'lcnn_standard_resnet11_cifar'"),
             (dict(eps=(0.1, 0.1)), "eps"), (dict(eps=(0.0,)), "eps"), (dict(epochs=0), "epochs"),
             (dict(train_examples=0), "train_examples"), (dict(lr=-1.0), "lr")]
    for overrides, match in cases:
        with pytest.raises(InputError, match=match):
            reproduce(settings_for("smoke", **overrides), tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="settings: unknown"):
        settings_for("smoke", epoch=3)
    with pytest.raises(InputError, match="preset"):
        settings_for("cifar10-gpu")
    with pytest.raises(InputError, match="data"):
        reproduce(settings_for("smoke", data=str(tmp_path / "nowhere")), tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="out"):
        reproduce(settings_for("smoke"), user, progress=False)


def test_presets_are_complete_settings() -> None:
    for name in rep.PRESETS:
        s = settings_for(name)
        s.validate()
        assert set(s.models) <= set(rep.MODELS)
    cpu, paper = settings_for("cifar10-cpu"), settings_for("cifar10-paper")
    assert len(cpu.models) == len(paper.models) == 7
    assert (paper.arch, paper.epochs, paper.batch_size) == ("resnet18_cifar", 200, 128)
    assert paper.train_examples is None
    assert cpu.eps == paper.eps == rep.PAPER_EPS


def _ev(acc: float, grad: float, hess: float, curv: float, robust: list[float], flagged: bool = False,
        n: int = 1000) -> dict:
    from lcnn_plugin.robustness import wilson_interval

    stats = {k: dict(mean=v) for k, v in (("grad_norm", grad), ("hessian_norm", hess), ("curvature", curv))}
    rows = [dict(attack="pgdl2", eps=e, robust_acc=r, robust_acc_ci95=list(wilson_interval(round(r * n), n)),
                 n_examples=n) for e, r in zip(rep.PAPER_EPS, robust)]
    return dict(accuracy=dict(test=dict(acc=acc)), curvature=dict(stats=stats),
                robustness=dict(rows=rows, flagged=flagged))


def test_shape_verdicts_on_known_figures() -> None:
    good = {"standard": _ev(0.80, 20, 6000, 270, [0.6, 0.37, 0.23, 0.16]),
            "lcnn": _ev(0.80, 20, 3000, 150, [0.6, 0.38, 0.24, 0.17]),
            "gradreg": _ev(0.79, 9, 700, 90, [0.70, 0.60, 0.49, 0.38]),
            "lcnn+gradreg": _ev(0.795, 10, 150, 25, [0.70, 0.59, 0.50, 0.40])}
    assert [h for _, h, _ in shape_verdicts(good)] == [True] * 6
    # each claim broken in turn, everything else as above
    broken = [
        ("lowest", dict(gradreg=_ev(0.79, 9, 100, 90, [0.70, 0.60, 0.49, 0.38]))),
        ("lowest", dict(standard=_ev(0.80, 20, 740, 110, [0.6, 0.37, 0.23, 0.16]),  # only 4.9× / 4.4×
                        lcnn=_ev(0.80, 20, 600, 90, [0.6, 0.38, 0.24, 0.17]))),
        ("within 2 points", {"lcnn+gradreg": _ev(0.77, 10, 150, 25, [0.70, 0.59, 0.50, 0.40])}),
        ("≥ GradReg's", {"lcnn+gradreg": _ev(0.795, 10, 150, 25, [0.70, 0.52, 0.50, 0.40])}),
        ("above standard's", dict(standard=_ev(0.80, 20, 6000, 270, [0.67, 0.37, 0.23, 0.16]))),  # z = 1.4
        ("LCNN alone", dict(lcnn=_ev(0.80, 20, 7000, 150, [0.6, 0.38, 0.24, 0.17]))),
        ("flagged", dict(lcnn=_ev(0.80, 20, 3000, 150, [0.6, 0.38, 0.24, 0.17], flagged=True))),
    ]
    for words, change in broken:
        verdicts = shape_verdicts({**good, **change})
        failed = [c for c, h, _ in verdicts if h is False]
        assert len(failed) == 1 and words in failed[0], (words, failed)
    # the two-proportion z statistic, by hand: 0.6 vs 0.5 on 100 each, se = sqrt(.24/100 + .25/100) = 0.07
    assert rep._z(dict(robust_acc=0.6, n_examples=100), dict(robust_acc=0.5, n_examples=100)) == \
        pytest.approx(1.428571, rel=1e-6)
    partial = shape_verdicts({"standard": good["standard"]})
    assert [h for _, h, _ in partial][:5] == [None] * 5


def test_cli_help_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps (and splits long words) at the terminal width
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    assert "cifar10-paper: 200" in text and "smoke: standard,lcnn+gradreg" in text
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--out", str(tmp_path / "r"), "--models", "standard,cur"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "did you mean 'cure'" in err
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "r"), "--arch", "resnet9"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "arch: no timm model" in err

