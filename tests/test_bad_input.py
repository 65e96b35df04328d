"""Bad input through the ``lcnn`` command line and the Python API.

For every case: exit status 2 (or the documented exception), one line on stderr that names
the argument or file, no traceback, and the workspace (runs, data, the user's own folder)
byte for byte as it was, with nothing added. Warnings (legal input that is probably not
meant) are printed and recorded in the JSON output.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from lcnn_plugin import convert, strip
from lcnn_plugin.cli import main
from lcnn_plugin.curvature import measure, report
from lcnn_plugin.robustness import evaluate
from lcnn_plugin.train import TrainConfig, load_checkpoint, train
from lcnn_plugin.validate import InputError, LcnnWarning

MODEL = "lcnn_resnet10_w16_cifar"


def _images(folder: Path, classes: int, per_class: int, mode: str = "RGB", size: int = 32,
            odd: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    for c in range(classes):
        d = folder / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if channels == 1 else (size, size, channels)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    for name, img in (odd or {}).items():
        img.save(folder / "class00" / name)
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace: a finished run, broken runs, data folders and the user's own files."""
    root = tmp_path_factory.mktemp("ws")
    train(TrainConfig(model=MODEL, objective="standard", epochs=1, batch_size=16, max_train_examples=32,
                      eval_examples=16), root / "run", progress=False)
    meta = json.loads((root / "run" / "checkpoint.json").read_text())
    for name, edit in {
        "noconfig": lambda m: {k: v for k, v in m.items() if k != "config"},
        "foreign": lambda m: {"format": "something-else/3", "epoch": 1},
    }.items():
        shutil.copytree(root / "run", root / name)
        (root / name / "checkpoint.json").write_text(json.dumps(edit(meta)))
    shutil.copytree(root / "run", root / "badjson")
    (root / "badjson" / "checkpoint.json").write_text("{not json")
    shutil.copytree(root / "run", root / "badsha")
    tensors = root / "badsha" / meta["tensors"]
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    user = root / "userdir"
    user.mkdir()
    (user / "metrics.jsonl").write_text('{"mine": 1}\n')
    (user / "notes.txt").write_text("my notes\n")
    (root / "file.txt").write_text("a file\n")
    weights = root / "weights"
    weights.mkdir()
    (weights / "truncated.safetensors").write_bytes((root / "run" / meta["tensors"]).read_bytes()[:100])
    (weights / "text.safetensors").write_text("hello\n")
    save_file({"fc.weight": torch.zeros(3, 4)}, str(weights / "other.safetensors"))
    data = root / "data"
    data.mkdir()
    _images(data / "good" / "train", 10, 2)
    _images(data / "good" / "test", 10, 2)
    _images(data / "gray", 10, 2, "L")
    _images(data / "rgba", 10, 2, "RGBA")
    _images(data / "mixed", 10, 2, odd={"big.png": Image.new("RGB", (40, 40))})
    _images(data / "notimage", 10, 2)
    (data / "notimage" / "class03" / "broken.png").write_text("not a png")
    _images(data / "twelve", 12, 2)
    _images(data / "flat", 10, 4)  # no train/ and test/: one folder for every split
    (data / "empty").mkdir()
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return int(e.code)


R = "{ws}/run"
# (argv, text the one-line error must contain)
CLI_CASES = [
    # models and run folders
    (["curvature", "resnet18x"], "unknown timm model 'resnet18x' (did you mean"),
    (["curvature", "lcnn_resnet10_w16_cfar"], "did you mean 'lcnn_resnet10_w16_cifar'"),
    (["curvature", "{ws}/runn"], "no run folder {ws}/runn (did you mean '{ws}/run'"),
    (["curvature", "{ws}/userdir"], "without checkpoint.json"),
    (["robustness", "{ws}/noconfig"], "checkpoint.json: incomplete checkpoint, missing config"),
    (["curvature", "{ws}/badjson"], "checkpoint.json: not a readable JSON checkpoint"),
    (["curvature", "{ws}/foreign"], "checkpoint.json: not an lcnn-plugin checkpoint"),
    (["curvature", "{ws}/badsha"], "sha256 does not match"),
    (["curvature", MODEL, "--pretrained-file", "{ws}/weights/missing.safetensors"], "is not a file"),
    (["curvature", MODEL, "--pretrained-file", "{ws}/weights/truncated.safetensors"],
     "truncated.safetensors: not a readable weights file"),
    (["robustness", MODEL, "--pretrained-file", "{ws}/weights/text.safetensors"],
     "text.safetensors: not a readable weights file"),
    (["curvature", MODEL, "--pretrained-file", "{ws}/weights/other.safetensors"],
     "other.safetensors: weights of another architecture or number of classes ("),
    (["curvature", R, "--pretrained-file", "{ws}/weights/other.safetensors"], "applies to a timm model name"),
    (["train", "--out", "{ws}/noconfig", "--resume"], "missing config"),
    (["train", "--out", "{ws}/nothing", "--resume"], "no checkpoint to resume from"),
    (["train", "--out", R, "--resume", "--epochs", "3"], "drop --epochs"),
    (["bound", "resnet18x"], "unknown timm model"),
    (["convert", "mobilnetv2_050"], "did you mean 'mobilenetv2_050'"),
    (["train", "--out", "{ws}/new", "--model", "resnt18"], "did you mean 'resnet18'"),
    (["train", "--out", "{ws}/new", "--objective", "lcnn-gradreg"], "did you mean 'lcnn+gradreg'"),
    # ε lists and attacks
    (["robustness", R, "--eps-linf", "0.03,0.03"], "argument --eps-linf: 0.03 given more than once"),
    (["robustness", R, "--eps-l2", "abc"], "argument --eps-l2: expected comma-separated numbers"),
    (["robustness", R, "--eps-l2", ""], "argument --eps-l2: expected comma-separated numbers"),
    (["robustness", R, "--eps-l2=-0.1"], "argument --eps-l2: expected finite numbers >= 0"),
    (["robustness", R, "--eps-l2", "nan"], "argument --eps-l2: expected finite numbers >= 0"),
    (["robustness", R, "--eps-linf", "0.1,inf"], "argument --eps-linf: expected finite numbers >= 0"),
    (["robustness", R, "--attacks", "fgsm,fgsm"], "argument --attacks: fgsm given more than once"),
    (["robustness", R, "--attacks", "pdg"], "unknown attack 'pdg' (did you mean 'pgd'?)"),
    (["robustness", R, "--attacks", ""], "argument --attacks: unknown attack ''"),
    # counts, sizes and settings
    (["robustness", R, "--max-examples", "0"], "argument --max-examples: expected an integer >= 1"),
    (["robustness", R, "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["robustness", R, "--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["robustness", R, "--restarts=-1"], "argument --restarts: expected an integer >= 1"),
    (["robustness", R, "--seed", "x"], "argument --seed: expected an integer >= 0"),
    (["curvature", R, "--max-examples", "0"], "argument --max-examples: expected an integer >= 1"),
    (["curvature", R, "--batch-size", "-5"], "argument --batch-size: expected an integer >= 1"),
    (["curvature", MODEL, "--num-classes", "0"], "argument --num-classes: expected an integer >= 2"),
    (["bound", MODEL, "--num-classes", "1"], "argument --num-classes: expected an integer >= 2"),
    (["bound", MODEL, "--input-size", "0,32,32"], "--input-size must be three positive integers"),
    (["train", "--out", "{ws}/new", "--epochs", "0"], "argument --epochs: expected an integer >= 1"),
    (["train", "--out", "{ws}/new", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["train", "--out", "{ws}/new", "--eval-examples", "0"], "argument --eval-examples: expected an integer"),
    (["train", "--out", "{ws}/new", "--max-train-examples", "0"], "argument --max-train-examples"),
    (["train", "--out", "{ws}/new", "--lr", "nan"], "argument --lr: expected a finite number > 0"),
    (["train", "--out", "{ws}/new", "--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["train", "--out", "{ws}/new", "--momentum=-1"], "argument --momentum: expected a finite number >= 0"),
    (["train", "--out", "{ws}/new", "--lambda-grad=-1"], "argument --lambda-grad"),
    (["train", "--out", "{ws}/new", "--adv-steps", "0"], "argument --adv-steps: expected an integer >= 1"),
    (["train", "--out", "{ws}/new", "--checkpoint-every=-1"], "argument --checkpoint-every"),
    (["train", "--out", "{ws}/new", "--model-kwargs", "[1]"], "expected a JSON object"),
    (["quickstart", "--out", "{ws}/new", "--epochs", "0"], "argument --epochs: expected an integer >= 1"),
    (["quickstart", "--out", "{ws}/new", "--train-examples", "10"], "argument --train-examples"),
    (["convert", MODEL, "--examples", "0"], "argument --examples: expected an integer >= 1"),
    (["convert", MODEL, "--beta", "0"], "argument --beta: expected a finite number > 0"),
    (["convert", MODEL, "--gamma", "nan"], "argument --gamma: expected a finite number > 0"),
    (["models", "--filter", "nothing_like_this*"], "--filter: no timm model matches"),
    # data
    (["curvature", R, "--data", "{ws}/data/missing"], "neither one of synthetic"),
    (["curvature", R, "--data", "cifr10"], "(did you mean 'cifar10'?)"),
    (["curvature", R, "--data", "cifar100", "--data-root", "{ws}/data"], "cifar100 not found under"),
    (["curvature", R, "--data", "{ws}/data/empty"], "data/empty is not an ImageFolder"),
    (["robustness", R, "--data", "{ws}/data/notimage"], "broken.png is not a readable image"),
    (["curvature", R, "--data", "{ws}/data/gray"], "images of shape (1, 32, 32) do not fit the model"),
    (["robustness", R, "--data", "{ws}/data/rgba"], "images of shape (4, 32, 32) do not fit the model"),
    (["curvature", R, "--data", "{ws}/data/mixed"], "big.png is RGB 40×40; expected every image"),
    (["robustness", R, "--data", "{ws}/data/twelve"], "12 classes but the model has 10 outputs"),
    (["train", "--out", "{ws}/new", "--data", "{ws}/data/twelve", "--batch-size", "8"],
     "12 classes but the model has 10 outputs"),
    (["convert", MODEL, "--data", "{ws}/data/gray"], "do not fit the model"),
    # output folders: nothing of the user's is removed or overwritten
    (["quickstart", "--out", "{ws}/userdir", "--overwrite"], "holds files that lcnn-plugin did not write"),
    (["quickstart", "--out", "{ws}/userdir", "--overwrite", "--epochs", "0"], "argument --epochs"),
    (["quickstart", "--out", R, "--overwrite"], "was written by `lcnn train`"),
    (["quickstart", "--out", "{ws}/file.txt"], "file.txt exists and is not a folder"),
    (["train", "--out", "{ws}/userdir", "--epochs", "1"], "holds files that lcnn-plugin did not write"),
    (["train", "--out", R], "already holds a run"),
    (["train", "--out", "{ws}/file.txt/sub"], "cannot write to"),
]


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
    ("convert: NaN example input", lambda m: convert(m, example_input=_x().fill_(math.nan), bound=False),
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
        _, rep = convert(plain, exclude=["nothing"], bound=False, example_input=_x(2))
    assert len(rep.warnings) == 1 and rep.warnings[0].startswith("exclude: 'nothing' matched no module path")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = evaluate(model, [(_x(), _y())], ["fgsm"], [0.01], checks=False,
                       progress=False)
    # Wilson 95% interval of 2/4: 0.5 ± 1.96·sqrt(1/16 + 1.96²/64)/(1 + 1.96²/4) = 0.5 ± 0.350
    assert res.warnings == ["robustness evaluated on 4 examples only: a 95% interval at 50% spans 70 points"]
    assert res.as_dict()["warnings"] == res.warnings
