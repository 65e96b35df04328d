"""Trainer: loss goes down, exact resume after a kill, DDP = one process, safe checkpoints, CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lcnn_plugin.cli import main
from lcnn_plugin.objectives import make_objective, param_groups
from lcnn_plugin.train import TrainConfig, load_checkpoint, train

TINY = ["--model", "lcnn_resnet10_w16_cifar", "--objective", "lcnn+gradreg", "--epochs", "2",
        "--batch-size", "16", "--max-train-examples", "160", "--eval-examples", "32", "--no-progress"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lcnn_plugin.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _weights(run_dir) -> dict:
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    return {k: v for k, v in load_file(str(run_dir / meta["tensors"])).items() if k.startswith("model.")}


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4))
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.05, momentum=0.9)
    obj = make_objective("gradreg")
    first = obj(model, x, y).loss.item()
    for _ in range(20):
        out = obj(model, x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert obj(model, x, y).loss.item() < 0.8 * first


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = _cli("train", "--out", str(full), *TINY)
    assert done.returncode == 0, done.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lcnn_plugin.cli", "train", "--out", str(cut), *TINY,
                             "--checkpoint-every", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads((cut / "checkpoint.json").read_text())["global_step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = json.loads((cut / "checkpoint.json").read_text())["global_step"]
    assert 4 <= killed_at < 20
    resumed = _cli("train", "--out", str(cut), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert len(list(cut.glob("checkpoint-*.safetensors"))) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_equals_one_process(tmp_path):
    """Same global batch on 2 gloo processes and on 1: the same weights (GradReg included)."""
    # a BatchNorm-free model (GroupNorm): with BatchNorm each process uses its own batch statistics
    args = ["--model", "test_efficientnet_gn", "--model-kwargs", '{"num_classes": 10}',
            "--objective", "gradreg", "--epochs", "1", "--batch-size", "16", "--max-train-examples", "64",
            "--eval-examples", "16", "--lr", "0.05", "--no-progress"]
    one = _cli("train", "--out", str(tmp_path / "one"), *args)
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "lcnn_plugin.cli", "train", "--out", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:  # equal up to float reduction order: 1e-4 of each tensor's scale (measured: < 1e-5)
        assert float((b[k] - a[k]).abs().max()) <= 1e-4 * float(a[k].abs().max()) + 1e-7, k
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text())["processes"] == 2


def _tiny_run(out):
    cfg = TrainConfig(model="lcnn_resnet10_w16_cifar", objective="standard", epochs=1, batch_size=16,
                      max_train_examples=32, eval_examples=16)
    return train(cfg, out, progress=False)


def test_bad_checkpoints_give_clear_errors_and_nothing_is_overwritten(tmp_path):
    run = tmp_path / "run"
    _tiny_run(run)
    meta_path = run / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    tensor_path = run / meta["tensors"]
    with pytest.raises(FileExistsError, match="already holds a run"):
        _tiny_run(run)
    snapshot = {p.name: p.read_bytes() for p in run.iterdir()}

    data = bytearray(tensor_path.read_bytes())
    data[-1] ^= 0xFF
    tensor_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 does not match"):
        train(None, run, resume=True, progress=False)
    tensor_path.write_bytes(snapshot[tensor_path.name])
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON checkpoint"):
        train(None, run, resume=True, progress=False)
    meta_path.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ValueError, match="not an lcnn-plugin checkpoint"):
        load_checkpoint(run)
    meta_path.write_bytes(snapshot["checkpoint.json"])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == snapshot
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \['epochs'\]"):
        train(TrainConfig(**{**meta["config"], "epochs": 5}), run, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(None, tmp_path / "empty", resume=True, progress=False)
    model, info = load_checkpoint(run)
    assert info["global_step"] == 2 and not model.training


def test_every_subcommand_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    _tiny_run(run)
    assert main(["models", "--json"]) == 0
    assert "lcnn_resnet10_w16_cifar" in json.loads(capsys.readouterr().out)["models"]
    assert main(["bound", "lcnn_resnet10_w16_cifar", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lipschitz"] > 0
    assert main(["curvature", str(run), "--max-examples", "6", "--batch-size", "4", "--json"]) == 0
    cur = json.loads(capsys.readouterr().out)
    assert cur["n"] == 6 and cur["stats"]["hessian_norm"]["mean"] > 0
    assert main(["robustness", str(run), "--attacks", "pgdl2", "--eps-l2", "0.5,1", "--max-examples", "8",
                 "--no-checks", "--json"]) == 0
    rob = json.loads(capsys.readouterr().out)
    assert rob["n_examples"] == 8 and [r["eps"] for r in rob["rows"]] == [0.5, 1.0]
    assert main(["train", "--out", str(tmp_path / "t2"), "--model", "lcnn_resnet10_w16_cifar",
                 "--epochs", "1", "--batch-size", "16", "--max-train-examples", "16", "--eval-examples", "8",
                 "--objective", "adversarial", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["history"][0]["epoch"] == 1
    q = tmp_path / "qs"
    assert main(["quickstart", "--out", str(q), "--epochs", "1", "--train-examples", "128",
                 "--curvature-examples", "8", "--robust-examples", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["rows"]) == {"standard", "LCNN+GradReg"} and (q / "quickstart.png").stat().st_size > 0
    assert main(["quickstart", "--out", str(q)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--objective", "trades"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcnn train: error: objective: expected one of") and err.count("\n") == 1
    assert main(["curvature", str(tmp_path)]) == 2
    assert "without checkpoint.json" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--resume", "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
