"""Bad input through the ``lcnn`` command line and the Python API.

For every case: exit status 2 (or the documented exception), one line on stderr that names
the argument or file, no traceback, and the workspace (runs, data, the user's own folder)
byte for byte as it was, with nothing added. Warnings (legal input that is probably not
meant) are printed and recorded in the JSON output.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from bad_input_cases import CLI_CASES, MODEL, build_workspace
from bad_input_cases import snapshot as _snapshot
from torch import nn

from lcnn_plugin import convert, strip
from lcnn_plugin.cli import main
from lcnn_plugin.curvature import measure, report
from lcnn_plugin.robustness import evaluate
from lcnn_plugin.train import TrainConfig, load_checkpoint
from lcnn_plugin.validate import InputError, LcnnWarning


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("ws"))


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return int(e.code)


@pytest.mark.parametrize("argv,expected", CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_cli_bad_input(ws, capsys, argv, expected):
    argv = [a.format(ws=ws) for a in argv]
    before = _snapshot(ws)
    status = _run(argv)
    out, err = capsys.readouterr()
    assert status == 2, (status, out, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"lcnn {argv[0]}: error: "), err
    assert expected.format(ws=ws) in err, err
    assert _snapshot(ws) == before  # nothing changed, removed or added


def test_cli_warnings_are_printed_and_recorded(ws, capsys):
    before = _snapshot(ws)
    flat = str(ws / "data" / "flat")
    assert _run(["robustness", str(ws / "run"), "--data", flat, "--attacks", "fgsm", "--eps-linf", "0.01",
                 "--max-examples", "12", "--no-checks", "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["n_examples"] == 12 and len(res["warnings"]) == 1 and "12 examples only" in res["warnings"][0]
    assert err.count("lcnn robustness: warning: robustness evaluated on 12 examples only") == 1
    assert _snapshot(ws) == before
    out_dir = ws / "trained-on-flat"
    assert _run(["train", "--out", str(out_dir), "--data", flat, "--model", MODEL, "--epochs", "1",
                 "--batch-size", "20", "--no-progress", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "test accuracy is measured on training images" in json.loads(out)["warnings"][0]
    assert "lcnn train: warning: data:" in err
    shutil.rmtree(out_dir)
    assert _run(["convert", "resnet18", "--exclude", "fc,nothing.*", "--input-size", "3,32,32",
                 "--examples", "2", "--no-bound", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["warnings"] == ["exclude: 'nothing.*' matched no module path (paths look like "
                                           "'conv1', 'bn1', 'act1')"]
    assert "warning: exclude: 'nothing.*' matched no module path" in err


def test_cli_crash_is_one_line_with_where(monkeypatch, capsys):
    import lcnn_plugin.cli as cli
    from lcnn_plugin import linalg

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    models = parser._subparsers._group_actions[0].choices["models"]
    models.set_defaults(func=lambda args: linalg.unit(None))  # an AttributeError inside lcnn_plugin
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lcnn models: internal error at lcnn_plugin/linalg.py:") and "AttributeError" in err
    assert "please report it" in err
    models.set_defaults(func=lambda args: torch.zeros(2) @ torch.zeros(3))  # a library's error
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcnn models: error: RuntimeError") and err.count("\n") == 1
    with pytest.raises(RuntimeError):
        main(["--debug", "models"])


def test_quickstart_overwrite_removes_only_its_own_folder(tmp_path):
    from lcnn_plugin.validate import MARKER

    out = tmp_path / "qs"
    assert _run(["quickstart", "--out", str(out), "--epochs", "1", "--train-examples", "128",
                 "--curvature-examples", "4", "--robust-examples", "4", "--json"]) == 0
    assert json.loads((out / MARKER).read_text()) == {"command": "quickstart"}
    (out / "results.json").write_text("old")
    assert _run(["quickstart", "--out", str(out)]) == 2  # its own, but no --overwrite
    assert (out / "results.json").read_text() == "old"
    assert _run(["quickstart", "--out", str(out), "--overwrite", "--epochs", "1", "--train-examples", "128",
                 "--curvature-examples", "4", "--robust-examples", "4", "--json"]) == 0
    assert json.loads((out / "results.json").read_text())["rows"]


# -- the Python API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(ws) -> nn.Module:
    return load_checkpoint(ws / "run")[0]


def _x(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _y(n: int = 4) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


API_CASES = [
    ("measure: softmax output", lambda m: measure(nn.Sequential(m, nn.Softmax(1)), _x()),
     "returns probabilities"),
    ("measure: eps < 0", lambda m: measure(m, _x(), eps=-1.0), "eps: expected a finite number >= 0"),
    ("measure: eps NaN", lambda m: measure(m, _x(), eps=math.nan), "eps: expected a finite number"),
    ("measure: k = 0", lambda m: measure(m, _x(), method="reference", k=0), "k: expected an integer >= 1"),
    ("measure: max_iter = 0", lambda m: measure(m, _x(), max_iter=0), "max_iter: expected an integer >= 1"),
    ("measure: tol < 0", lambda m: measure(m, _x(), tol=-1e-3), "tol: expected a finite number > 0"),
    ("measure: method typo", lambda m: measure(m, _x(), method="lanczo"), "did you mean 'lanczos'"),
    ("measure: feature extractor", lambda m: measure(nn.Identity(), _x()), "must return logits of shape"),
    ("measure: labels beyond classes", lambda m: measure(m, _x(), torch.tensor([0, 1, 2, 10])),
     "labels must lie in [0, 10)"),
    ("measure: NaN input", lambda m: measure(m, _x().fill_(math.nan)), "inputs contain NaN"),
    ("measure: empty batch", lambda m: measure(m, _x()[:0]), "the batch is empty"),
    ("report: max_examples = 0", lambda m: report(m, [(_x(), None)], max_examples=0, progress=False),
     "max_examples: expected an integer >= 1"),
    ("report: empty loader", lambda m: report(m, [], progress=False), "loader: yielded no examples"),
    ("evaluate: repeated ε", lambda m: evaluate(m, [(_x(), _y())], ["pgdl2"], {"L2": [0.1, 0.1]},
                                                progress=False), "0.1 given more than once"),
    ("evaluate: repeated attack", lambda m: evaluate(m, [(_x(), _y())],
                                                     ["pgd", "pgd"], [0.1], progress=False),
     "attacks: 'pgd' given more than once"),
    ("evaluate: inputs outside [0, 1]", lambda m: evaluate(m, [(_x() * 3, _y())], ["fgsm"], [0.1],
                                                           progress=False), "must lie in [0, 1]"),
    ("evaluate: float labels", lambda m: evaluate(m, [(_x(), _y().float())], ["fgsm"], [0.1], progress=False),
     "labels must be integers"),
    ("evaluate: max_examples = 0", lambda m: evaluate(m, [], ["fgsm"], [0.1], max_examples=0, progress=False),
     "max_examples: expected an integer >= 1"),
    ("convert: NaN example input", lambda m: convert(m, example_input=_x().fill_(math.nan)),
     "example_input: inputs contain NaN"),
    ("convert: beta < 0", lambda m: convert(m, beta=-1.0), "beta: expected a finite number > 0"),
    ("TrainConfig: lr inf", lambda m: TrainConfig(lr=math.inf).validate(), "lr: expected a finite number"),
    ("TrainConfig: seed < 0", lambda m: TrainConfig(seed=-1).validate(), "seed: expected an integer >= 0"),
    ("TrainConfig: eval_examples 0", lambda m: TrainConfig(eval_examples=0).validate(), "eval_examples"),
]


@pytest.mark.parametrize("fn,expected", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(model, fn, expected):
    with pytest.raises(InputError) as info:
        fn(model)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_api_warnings(model):
    from lcnn_plugin.models.cifar_resnet import CifarResNet

    plain = CifarResNet(n=1, num_classes=10)
    with pytest.warns(LcnnWarning, match="has no LCNN layer to strip"):
        strip(plain)
    with pytest.warns(LcnnWarning, match="'nothing' matched no module path"):
        _, rep = convert(plain, exclude=["nothing"], example_input=_x(2))
    assert len(rep.warnings) == 1 and rep.warnings[0].startswith("exclude: 'nothing' matched no module path")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = evaluate(model, [(_x(), _y())], ["fgsm"], [0.01], checks=False,
                       progress=False)
    # Wilson 95% interval of 2/4: 0.5 ± 1.96·sqrt(1/16 + 1.96²/64)/(1 + 1.96²/4) = 0.5 ± 0.350
    assert res.warnings == ["robustness evaluated on 4 examples only: a 95% interval at 50% spans 70 points"]
    assert res.as_dict()["warnings"] == res.warnings


def test_collect_records_ours_and_passes_other_warnings_through_once():
    """Regression: re-emitting a library's warning inside the recording recorded it again, for
    ever (a 2-process `lcnn train` with a per-step torch warning ran out of memory)."""
    from lcnn_plugin.validate import collect, warn

    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with collect() as notes:
            warnings.warn("from a library", UserWarning, stacklevel=1)
            warn("probably not meant")
            warn("probably not meant")
    assert notes == ["probably not meant"]
    assert [(w.category, str(w.message)) for w in outside] == [
        (UserWarning, "from a library"), (LcnnWarning, "probably not meant")]


def test_weights_mismatch_is_counted_not_dumped():
    from lcnn_plugin.validate import _load_error

    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(RuntimeError) as info:  # 0.bias, 1.weight, 1.bias missing; x.y extra; 0.weight 5×3
        net.load_state_dict({"0.weight": torch.zeros(5, 3), "x.y": torch.zeros(1)})
    assert _load_error(info.value) == ("weights of another architecture or number of classes "
                                       "(3 missing keys, 1 unexpected keys, 1 size mismatches)")


def test_api_entries_refuse_a_model_that_is_not_a_module():
    from lcnn_plugin import fold_batchnorm, model_bound
    from lcnn_plugin.curvature import relative_gradient_robustness

    x = torch.rand(2, 3, 8, 8)
    y = torch.zeros(2, dtype=torch.long)
    calls = [lambda m: measure(m, x), lambda m: report(m, [(x, y)]),
             lambda m: relative_gradient_robustness(m, x), lambda m: evaluate(m, [(x, y)]),
             lambda m: fold_batchnorm(m), lambda m: model_bound(m, (3, 8, 8)), lambda m: convert(m),
             lambda m: strip(m)]
    for call in calls:
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
            call(lambda t: t)
