"""The bad-input matrix of the command line (data only: no lcnn_plugin import at module level,
so that ``benchmarks/bad_input_census.py`` can run it against any version of the package)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

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


def build_workspace(root: Path) -> Path:
    """The workspace: a finished run, broken runs, data folders and the user's own files."""
    from lcnn_plugin.train import TrainConfig, train

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


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


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
    # model specifications (lcnn_plugin.spec)
    (["curvature", "nomodule_here:build"], "cannot import nomodule_here"),
    (["curvature", "os.path:nosuchfn"], "os.path has no callable 'nosuchfn'"),
    (["curvature", "os:getcwd"], "getcwd() returned str, expected a torch.nn.Module"),
    (["curvature", "os.path:join"], "os.path:join: join() raised TypeError"),
    (["curvature", "a b:c"], "expected module:function"),
    (["curvature", "resnet18={ws}/weights/missing.pth"], "weights file"),
    (["curvature", "resnet18x={ws}/weights/other.safetensors"], "unknown timm model 'resnet18x'"),
    (["curvature", "resnet18={ws}/weights/other.safetensors", "--pretrained-file",
      "{ws}/weights/other.safetensors"], "applies to a timm model name, not to a NAME=WEIGHTS model"),
    # reproduce and bench-report
    (["reproduce", "--out", "{ws}/new", "--models", "lcnn,lcnx"], "unknown 'lcnx' (did you mean 'lcnn'?)"),
    (["reproduce", "--out", "{ws}/new", "--eps", "0.1,0.1"], "argument --eps: 0.1 given more than once"),
    (["reproduce", "--out", "{ws}/new", "--train-examples", "0"],
     "argument --train-examples: expected an integer"),
    (["reproduce", "--out", "{ws}/new", "--preset", "smoke", "--arch", "resnet9"], "arch: no timm model"),
    (["reproduce", "--out", "{ws}/userdir", "--preset", "smoke"],
     "holds files that lcnn-plugin did not write"),
    (["reproduce", "--out", "{ws}/new", "--preset", "smoke", "--data", "{ws}/data/nothere"],
     "neither one of synthetic"),
    (["bench-report", "{ws}/weights/text.safetensors"], "text.safetensors: not JSON"),
    (["bench-report", "{ws}/nothing.json"], "nothing.json: cannot be read"),
]


