"""Training with the paper's objectives: schedule, metrics, atomic checkpoints, exact resume, DDP.

``train(TrainConfig(...), out_dir)`` trains ``config.model`` (any timm name, optionally
converted by :func:`lcnn_plugin.convert` with the settings in ``config.convert``: fine-tuning
a retrofitted pretrained model) with
``config.objective`` (see :mod:`lcnn_plugin.objectives`) on ``config.data`` (see
:mod:`lcnn_plugin.data`), SGD with momentum and the paper's step schedule (×0.1 at 75% and
87.5% of the epochs), weight decay on everything except β, γ (and SN scales). Inputs are [0, 1] pixels
with RandomCrop(pad 4) + flip.

Run directory ``out_dir``:

- ``metrics.jsonl``: one JSON line per epoch (loss, accuracy, objective terms, test accuracy
  with the test sample it was measured on, learning rate, seconds);
- ``checkpoint.json`` + the ``checkpoint-<step>.safetensors`` it names: model and optimiser
  tensors and the torch RNG state in safetensors, everything else (config, objective,
  optimiser and scheduler settings, epoch, step, the file's sha256) in JSON. A checkpoint is
  written every ``checkpoint_every`` steps and at the end of each epoch, atomically (new
  tensor file, then ``os.replace`` of the JSON, then removal of the old tensor file), so an
  interrupted run always leaves one complete checkpoint.

The folder must be new, empty or an earlier ``train`` run's (its ``.lcnn-plugin.json`` marker):
nothing of the user's is overwritten. The test accuracy is on ``eval_examples`` test images
drawn uniformly (seeded), not the first ones (ImageFolders are sorted by class).

Exact resume: batch order comes from a generator seeded by (seed, epoch); augmentation and
every random draw of a step (dropout, attack starts) from ``torch.manual_seed`` of (seed,
global step). ``train(None, out_dir, resume=True)`` therefore continues with exactly the
batches, weights, optimiser state and RNG an uninterrupted run would have had. Batches
that do not fill ``batch_size`` are dropped.

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); ``batch_size`` is the global batch,
each process takes its slice, and the GradReg/CURE penalties are scaled so that the
averaged gradient equals the single-process one. As with DDP in general, BatchNorm uses
each process' own batch statistics. Only rank 0 writes to ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from . import validate as check
from .data import augment, load_dataset, shared_splits
from .objectives import Objective, make_objective, param_groups

FORMAT = "lcnn-plugin-checkpoint/1"
_META_KEYS = ("tensors", "sha256", "config", "optimizer", "scheduler", "epoch", "step_in_epoch",
              "global_step", "metrics_lines", "partial_epoch")

__all__ = ["TrainConfig", "TrainResult", "load_checkpoint", "train"]


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint)."""

    model: str = "lcnn_resnet10_w16_cifar"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    objective: str = "lcnn+gradreg"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    data_root: str = "./data"
    download: bool = False
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    max_train_examples: int | None = None  # a seeded random subset of this size
    eval_examples: int | None = 2000  # a seeded random sample of the test split, per epoch (None: all)
    convert: dict[str, Any] | None = None  # lcnn_plugin.convert settings applied to the created model

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            check.integer(name, getattr(self, name))
        for name in ("seed", "checkpoint_every"):
            check.integer(name, getattr(self, name), 0)
        for name in ("max_train_examples", "eval_examples"):
            check.integer(name, getattr(self, name), optional=True)
        check.number("lr", self.lr, 0, above=True)
        check.number("momentum", self.momentum, 0)
        check.number("weight_decay", self.weight_decay, 0)
        for name in ("model", "data", "data_root"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise check.InputError(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
        for name in ("model_kwargs", "objective_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise check.InputError(f"{name}: expected a dict, got {getattr(self, name)!r}")
        make_objective(self.objective, **self.objective_kwargs)  # raises on a bad objective
        if self.convert is not None:
            allowed = {"beta", "spectral_norm", "lipschitz_bn", "gamma", "preserve_function", "exclude",
                       "strict", "max_pool"}
            if not isinstance(self.convert, dict) or set(self.convert) - allowed:
                raise ValueError(f"convert must be a dict of lcnn_plugin.convert settings {sorted(allowed)}, "
                                 f"got {self.convert!r}")

    def milestones(self) -> list[int]:
        """Epochs after which the learning rate drops ×0.1 (none at epoch 0: a 1-epoch run keeps lr)."""
        return [m for m in (int(0.75 * self.epochs), int(0.875 * self.epochs)) if m > 0]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    out_dir: Path


def build_model(config: TrainConfig, pretrained: bool = True) -> nn.Module:
    """The run's model: ``timm.create_model(model, **model_kwargs)``, then ``convert`` if set.
    ``pretrained=False`` skips loading pretrained weights (a checkpoint replaces them all)."""
    from .convert import convert

    kwargs = dict(config.model_kwargs)
    if not pretrained:
        kwargs.pop("pretrained", None)
        kwargs.pop("pretrained_cfg_overlay", None)
    file = kwargs.pop("pretrained_cfg_overlay", {}).get("file") if kwargs.get("pretrained") else None
    if file is not None:
        kwargs.pop("pretrained")
    model = check.timm_model(config.model, pretrained_file=file, **kwargs)
    if config.convert is not None:
        model, _ = convert(model, **config.convert)
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checkpoint(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of the run in ``out_dir``, verified; a clear error otherwise."""
    meta_path = out_dir / "checkpoint.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no checkpoint to resume from")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: not a readable JSON checkpoint ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not an lcnn-plugin checkpoint (expected format {FORMAT!r})")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: incomplete checkpoint, missing {', '.join(missing)}")
    saved = meta["config"]
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)}) \
        if isinstance(saved, dict) else None
    if unknown is None or unknown:
        why = f"unknown keys {unknown}" if unknown else "not an object"
        raise ValueError(f"{meta_path}: config is not a TrainConfig ({why})")
    tensor_path = out_dir / str(meta.get("tensors", ""))
    if not tensor_path.is_file():
        raise ValueError(f"{meta_path}: its tensor file {tensor_path.name!r} is missing")
    if _sha256(tensor_path) != meta.get("sha256"):
        raise ValueError(f"{tensor_path}: sha256 does not match {meta_path.name} (corrupted checkpoint)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"{tensor_path}: cannot be read as safetensors ({e})") from e
    return meta, tensors


def _load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source}: the weights do not fit the model its config builds "
                         f"({check._load_error(e)})") from e


def load_checkpoint(out_dir: str | Path) -> tuple[nn.Module, dict]:
    """The trained model of a run directory (eval mode) and the checkpoint's metadata."""
    meta, tensors = _read_checkpoint(Path(out_dir))
    config = TrainConfig(**meta["config"])
    model = build_model(config, pretrained=False)
    _load_model_state(model, tensors, Path(out_dir) / meta["tensors"])
    return model.eval(), meta


def _write_checkpoint(out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
                      sched: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, objective: Objective,
                      epoch: int, step: int, global_step: int, metrics_lines: int, partial: dict) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{i}.{k}"] = v.contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"checkpoint-{global_step:09d}.safetensors"
    tmp = out_dir / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out_dir / name)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    meta = dict(format=FORMAT, tensors=name, sha256=_sha256(out_dir / name), config=asdict(config),
                objective=asdict(objective), optimizer=dict(type="SGD", param_groups=groups),
                scheduler=sched.state_dict(), epoch=epoch, step_in_epoch=step, global_step=global_step,
                metrics_lines=metrics_lines, partial_epoch=partial, torch_version=torch.__version__)
    meta_tmp = out_dir / "checkpoint.json.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(meta_tmp, out_dir / "checkpoint.json")
    for old in out_dir.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink()


def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def correct_count(model: nn.Module, data, device: torch.device, batch: int = 500) -> int:  # noqa: ANN001
    """How many of ``data``'s examples ``model`` classifies correctly (eval mode; its mode restored)."""
    was = model.training
    model.eval()
    hits = 0
    with torch.no_grad():
        for x, y in data.batches(batch):
            hits += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    model.train(was)
    return hits


def train(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False,
          progress: bool = True, device: str | torch.device | None = None) -> TrainResult:
    """Train (or, with ``resume=True``, continue) the run in ``out_dir``; see the module docstring.

    With ``resume=True`` the configuration is the checkpoint's; a ``config`` that differs
    from it is an error. A fresh run refuses a directory that already holds a checkpoint.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    meta = tensors = None
    if resume:
        meta, tensors = _read_checkpoint(out)
        saved = TrainConfig(**meta["config"])
        if config is not None and config != saved:
            diff = [f.name for f in dataclasses.fields(TrainConfig)
                    if getattr(config, f.name) != getattr(saved, f.name)]
            raise ValueError(f"resume: the configuration differs from the checkpoint's in {diff}")
        config = saved
    elif config is None:
        raise ValueError("train: give a TrainConfig (or resume=True)")
    elif (out / "checkpoint.json").exists():
        raise FileExistsError(f"{out}: already holds a run; resume it or choose another directory")
    else:
        check.check_dir("out_dir", out, "train")
    config.validate()
    rank, world, dev = _dist_setup()
    if device is not None:
        dev = torch.device(device)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    train_data = load_dataset(config.data, "train", config.data_root, config.download)
    if shared_splits(config.data):
        check.warn(f"data: {config.data} has no train/ and test/ sub-folders; the test accuracy is "
                   "measured on training images")
    # a seeded sample of the whole test split: ImageFolders are sorted by class
    test_data = load_dataset(config.data, "test", config.data_root, config.download).sample(
        config.eval_examples, config.seed)
    n_train = len(train_data) if config.max_train_examples is None else min(config.max_train_examples,
                                                                            len(train_data))
    # the examples used: all, or a seeded random subset (datasets are often sorted by class)
    pool = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(config.seed))[:n_train]
    if n_train == len(train_data):
        pool = torch.arange(n_train)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n_train} training examples")

    torch.manual_seed(config.seed)
    model = build_model(config, pretrained=meta is None).to(dev)
    n_classes = len(train_data.classes)
    check.fits(model, train_data.images[:1].to(dev), train_data.labels, n_classes, f"data {train_data.name}")
    check.fits(model, test_data.images[:1].to(dev), test_data.labels, n_classes, f"data {test_data.name}")
    objective = objective_saved = make_objective(config.objective, **config.objective_kwargs)
    opt = torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, config.milestones(), gamma=0.1)
    start_epoch, start_step, global_step, history = 0, 0, 0, []
    metrics_path = out / "metrics.jsonl"
    if meta is not None:
        _load_model_state(model, tensors, out / meta["tensors"])
        opt_state = opt.state_dict()
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                opt_state["state"].setdefault(int(i), {})[name] = v
        for group, saved_group in zip(opt_state["param_groups"], meta["optimizer"]["param_groups"]):
            group.update(saved_group)  # lr as scheduled so far, momentum, weight decay
        opt.load_state_dict(opt_state)
        sched_state = dict(meta["scheduler"])  # JSON turned the milestone Counter's keys into strings
        sched_state["milestones"] = Counter({int(k): v for k, v in sched_state["milestones"].items()})
        sched.load_state_dict(sched_state)
        start_epoch, start_step, global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        torch.set_rng_state(tensors["rng.torch"])
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        lines = lines[: meta["metrics_lines"]]
        history = [json.loads(line) for line in lines]
    if rank == 0:
        check.claim_dir(out, "train")
        # a fresh run starts a fresh log; a resumed one drops lines written after its checkpoint
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    net: nn.Module = model
    if world > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        objective = dataclasses.replace(objective, lambda_grad=objective.lambda_grad / world**2,
                                        lambda_cure=objective.lambda_cure / world**2)
    local = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    probe_x, probe_y = train_data.floats(pool[:2])
    twice = objective.second_derivative_mode(model, probe_x.to(dev), probe_y.to(dev))

    def save(epoch: int, step: int, partial: dict) -> None:
        if rank == 0:
            _write_checkpoint(out, model, opt, sched, config, objective_saved, epoch, step, global_step,
                              len(history), partial)

    for epoch in range(start_epoch, config.epochs):
        model.train()
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = pool[torch.randperm(n_train, generator=gen)]
        first = start_step if epoch == start_epoch else 0
        partial = meta["partial_epoch"] if meta is not None and first else {}
        sums: dict[str, float] = dict(partial.get("sums", {}))
        hits, seen = partial.get("hits", 0), partial.get("seen", 0)
        t0 = time.perf_counter() - partial.get("seconds", 0.0)
        bar = tqdm(range(first, steps_per_epoch), disable=not progress or rank != 0,
                   desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
        for step in bar:
            torch.manual_seed(config.seed * 1_000_003 + global_step)
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            x, y = train_data.floats(idx)
            if config.augment:
                x = augment(x, torch.Generator().manual_seed(config.seed * 7_919 + global_step))
            x, y = x[local].to(dev), y[local].to(dev)
            opt.zero_grad(set_to_none=True)
            with twice():
                res = objective(net, x, y)
                res.loss.backward()
            opt.step()
            global_step += 1
            seen += len(y)
            hits += int((res.logits.detach().argmax(1) == y).sum())
            for k, v in {"loss": float(res.loss.detach()), **res.terms}.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{hits / seen:.3f}")
            every = config.checkpoint_every
            if every and global_step % every == 0 and step + 1 < steps_per_epoch:
                save(epoch, step + 1, dict(sums=sums, hits=hits, seen=seen, seconds=time.perf_counter() - t0))
        bar.close()
        sched.step()
        record = dict(epoch=epoch + 1, global_step=global_step, lr=opt.param_groups[0]["lr"],
                      seconds=time.perf_counter() - t0,
                      **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                      train_acc=hits / max(seen, 1),
                      test_acc=correct_count(model, test_data, dev) / len(test_data),
                      test_examples=len(test_data),
                      test_data=test_data.name)
        if world > 1:
            record["processes"] = world
        history.append(record)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        save(epoch + 1, 0, {})
    if world > 1:
        dist.barrier()
    return TrainResult(model.eval(), history, out)
