"""The ``lcnn`` command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from . import __version__
from .argtypes import count, floats, names, real
from .bound import model_bound
from .layers.spectral import TIGHT_GRAM_LIMIT
from .validate import FEW_EXAMPLES, InputError, collect, fits, timm_model

Payload = tuple[str, dict[str, Any]]  # what a command prints: text, and the JSON object


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _models(args: argparse.Namespace) -> Payload:
    names = timm.list_models(args.filter)
    if not names:
        raise InputError(f"--filter: no timm model matches {args.filter!r}")
    lines = [f"{n:34s} {(timm.models.model_entrypoint(n).__doc__ or '').strip()}" for n in names]
    return "\n".join(lines), dict(models=names)


def _parse_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must be C,H,W integers, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"--input-size must be three positive integers C,H,W, got {text!r}")
    return size


def _bound(args: argparse.Namespace) -> Payload:
    model = timm_model(args.model, num_classes=args.num_classes)
    size = args.input_size or model.pretrained_cfg["input_size"]
    result = model_bound(model, size, tight=args.tight)
    return str(result), dict(model=args.model, **result.as_dict())


_CONFIG_FLAGS = {  # CLI option -> TrainConfig field
    "model": "model", "model_kwargs": "model_kwargs", "objective": "objective", "data": "data",
    "data_root": "data_root",
    "download": "download", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "momentum": "momentum", "weight_decay": "weight_decay", "seed": "seed",
    "checkpoint_every": "checkpoint_every", "max_train_examples": "max_train_examples",
    "eval_examples": "eval_examples", "convert": "convert",
}
_OBJECTIVE_FLAGS = ("lambda_beta", "lambda_gamma", "lambda_grad", "lambda_cure", "adv_eps", "adv_step",
                    "adv_steps", "use_predicted")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _train(args: argparse.Namespace) -> Payload:
    from .train import TrainConfig, train

    given = {f: getattr(args, k) for k, f in _CONFIG_FLAGS.items() if getattr(args, k) is not None}
    obj_kwargs = {k: getattr(args, k) for k in _OBJECTIVE_FLAGS if getattr(args, k) is not None}
    if args.no_augment:
        given["augment"] = False
    if args.pretrained_file:
        if not Path(args.pretrained_file).is_file():
            raise InputError(f"--pretrained-file: {args.pretrained_file} is not a file")
        given["model_kwargs"] = dict(given.get("model_kwargs", {}), pretrained=True,
                                     pretrained_cfg_overlay=dict(file=args.pretrained_file))
    if args.resume:
        if given or obj_kwargs:
            flags = ", ".join("--" + k.replace("_", "-") for k in [*given, *obj_kwargs])
            raise InputError(f"--resume takes the configuration from the checkpoint; drop {flags}")
        result = train(None, args.out, resume=True, progress=not args.no_progress)
    else:
        config = TrainConfig(**given, objective_kwargs=obj_kwargs)
        result = train(config, args.out, progress=not args.no_progress)
    last = result.history[-1] if result.history else {}
    text = (f"trained {args.out}: epoch {last.get('epoch')}, train acc {last.get('train_acc', 0):.4f}, "
            f"test acc {last.get('test_acc', 0):.4f} on {last.get('test_examples')} test images "
            f"(checkpoint in {args.out}/checkpoint.json)")
    return text, dict(out=str(result.out_dir), history=result.history)


def _load_model(text: str, num_classes: int, pretrained_file: str | None) -> torch.nn.Module:
    """A model specification (:mod:`lcnn_plugin.spec`), in eval mode."""
    import dataclasses

    from .spec import parse

    spec = parse(text)
    if pretrained_file:
        if spec.kind != "timm" or spec.weights:
            what = {"run": "the run folder", "factory": "the factory"}.get(spec.kind, "a NAME=WEIGHTS model")
            raise InputError(f"--pretrained-file: applies to a timm model name, not to {what} {text}")
        spec = dataclasses.replace(spec, weights=pretrained_file)
    return spec.load(num_classes if spec.kind == "timm" else None)


def _dataset(args: argparse.Namespace, model: torch.nn.Module, n: int, seed: int):  # noqa: ANN202
    """The --data/--split set, checked against the model, and its seeded sample of ``n``."""
    from .data import load_dataset

    data = load_dataset(args.data, args.split, args.data_root)
    fits(model, data.images, data.labels, len(data.classes), f"data {data.name}")
    return data.sample(n, seed)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a timm model name, NAME=WEIGHTS_FILE, a run directory of `lcnn train`, or "
                                 "module:function returning a torch.nn.Module")
    p.add_argument("--num-classes", type=count(2), default=10, help="classes of a timm model (10)")
    p.add_argument("--pretrained-file", default=None, help="weights file for a timm model name")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (default), cifar10, cifar100, svhn, or an ImageFolder path")
    p.add_argument("--data-root", default="./data", help="root of the torchvision datasets (./data)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _curvature(args: argparse.Namespace) -> Payload:
    from .curvature import report

    model = _load_model(args.model, args.num_classes, args.pretrained_file)
    data = _dataset(args, model, args.max_examples, args.seed)
    rep = report(model, data.batches(args.batch_size), method=args.method, engine=args.engine,
                 fold_bn=args.fold_bn, progress=not args.json)
    return f"{rep}\ndata: {data.name}", dict(
        model=args.model, data=data.name, n=rep.n, method=rep.method, hvps_mean=rep.hvps_mean,
        converged_fraction=rep.converged_fraction, stats=rep.stats, **rep.options)


def _robustness(args: argparse.Namespace) -> Payload:
    from .robustness import ATTACKS, evaluate

    model = _load_model(args.model, args.num_classes, args.pretrained_file)
    data = _dataset(args, model, args.max_examples, args.seed)
    eps = {}
    if any(ATTACKS[a] == "Linf" for a in args.attacks):
        eps["Linf"] = args.eps_linf
    if any(ATTACKS[a] == "L2" for a in args.attacks):
        eps["L2"] = args.eps_l2
    res = evaluate(model, data.batches(args.batch_size), args.attacks, eps, steps=args.steps,
                   restarts=args.restarts, seed=args.seed, checks=not args.no_checks, progress=not args.json,
                   model_name=args.model, dataset=data.name)
    return str(res), res.as_dict()


def _convert(args: argparse.Namespace) -> Payload:
    from .convert import convert

    model = _load_model(args.model, args.num_classes, args.pretrained_file)
    if args.data:
        args.split = "test"
        x = _dataset(args, model, args.examples, 0).floats()[0]
    else:
        size = args.input_size or model.pretrained_cfg["input_size"]
        x = torch.rand(args.examples, *size, generator=torch.Generator().manual_seed(0))
    _, report = convert(model, beta=args.beta, gamma=args.gamma, spectral_norm=not args.no_spectral_norm,
                        lipschitz_bn=not args.no_lipschitz_bn, preserve_function=args.preserve_function,
                        exclude=[p for p in args.exclude.split(",") if p], strict=args.strict,
                        max_pool=args.max_pool, bound=not args.no_bound, example_input=x)
    return str(report), report.as_dict()


def _quickstart(args: argparse.Namespace) -> Payload:
    from .quickstart import run

    report = run(args.out, epochs=args.epochs, train_examples=args.train_examples,
                 curvature_examples=args.curvature_examples, robust_examples=args.robust_examples,
                 overwrite=args.overwrite, progress=not args.json)
    return report["text"], report


def _count_or_all(text: str) -> int | str:
    return text if text == "all" else count()(text)


def _shown(name: str, value: Any) -> str:
    """A setting as its option would be written."""
    if isinstance(value, tuple):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value)
    return "all" if value is None and name == "train_examples" else str(value)


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    """One option per :class:`~lcnn_plugin.reproduce.Settings` field, its help naming each preset's value."""
    import dataclasses

    from .reproduce import MODELS, PRESETS, Settings

    parsers = {"int": count(), "int | None": _count_or_all, "float": real(0, above=True), "str": str,
               "str | None": str, "tuple[float, ...]": lambda t: tuple(floats(t)),
               "tuple[str, ...]": lambda t: tuple(names(tuple(MODELS))(t))}
    helps = {"arch": "architecture: each model is its timm prefix + this", "models": "comma-separated labels",
             "data": "dataset name or ImageFolder with train/ and test/",
             "second_test": "second test set (accuracy only)",
             "train_examples": "seeded random subset of the train split ('all': every image)",
             "checkpoint_every": "checkpoint every N steps (0: per epoch)", "eps": "L2 ε of PGD and APGD",
             "steps": "PGD/APGD steps", "rgr_radii": "‖δ‖ of relative gradient robustness",
             "rgr_samples": "random directions per example and norm"}
    for f in dataclasses.fields(Settings):
        parse = count(0) if f.name in ("checkpoint_every", "seed") else parsers[f.type]
        values = "; ".join(f"{k}: {_shown(f.name, v.get(f.name, f.default))}" for k, v in PRESETS.items())
        p.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None,
                       help=f"{helps.get(f.name, f.name.replace('_', ' '))} ({values})")


def _reproduce(args: argparse.Namespace) -> Payload:
    import dataclasses

    from .reproduce import VERDICT, Settings, reproduce, settings_for

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    overrides = {k: None if v == "all" else v for k, v in given.items() if v is not None}
    command = "lcnn " + shlex.join(args.argv)
    results = reproduce(settings_for(args.preset, **overrides), args.out, progress=not args.no_progress,
                        command=command)
    lines = [f"{VERDICT[v['holds']]}: {v['claim']}" for v in results["verdicts"]]
    return f"report: {Path(args.out) / 'report.md'}\n" + "\n".join(lines), results


def _bench_report(args: argparse.Namespace) -> Payload:
    from . import bench_report
    from .validate import check_dir, claim_dir

    data = bench_report.load(args.file)
    if args.out is None:
        text = bench_report.markdown(data)
        return text, dict(markdown=text)
    out = Path(args.out)
    check_dir("--out", out, "bench-report")
    claim_dir(out, "bench-report")
    plotted = bench_report.plot(data, out / "robust_accuracy.png")
    text = bench_report.markdown(data, "robust_accuracy.png" if plotted else None)
    (out / "report.md").write_text(text)
    files = ["report.md"] + (["robust_accuracy.png"] if plotted else [])
    return f"wrote {', '.join(str(out / f) for f in files)}", dict(markdown=text, out=str(out), files=files)


def build_parser() -> argparse.ArgumentParser:
    from .reproduce import PRESETS
    from .robustness import ATTACKS

    p = _Parser(prog="lcnn", description="Low-curvature neural networks for timm and torchattacks. "
                "Errors end with exit status 2 and one line; --debug (or LCNN_DEBUG=1) shows the traceback.")
    p.add_argument("--version", action="version", version=f"lcnn-plugin {__version__}")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quickstart",
        help="offline demo: train a standard and an LCNN+GradReg model on the embedded data, "
             "compare curvature and PGD robustness",
    )
    q.add_argument("--out", default="lcnn-quickstart",
                   help="output folder: the two runs, results.json, quickstart.png (lcnn-quickstart)")
    q.add_argument("--epochs", type=count(), default=4, help="training epochs of each model (4)")
    q.add_argument("--train-examples", type=count(128), default=3200, help="training images used (3200)")
    q.add_argument("--curvature-examples", type=count(), default=200,
                   help="test images for the curvature (200)")
    q.add_argument("--robust-examples", type=count(), default=500, help="test images for the attacks (500)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an earlier quickstart in --out (only a folder lcnn quickstart wrote)")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=_quickstart)

    t = sub.add_parser("train", help="train a timm model with one of the paper's objectives",
                       description="Train with the paper's schedule (SGD, ×0.1 at 75%% and 87.5%% of the "
                                   "epochs), RandomCrop+flip, checkpoints every epoch; --resume continues "
                                   "exactly. Under torchrun, the same command trains with "
                                   "DistributedDataParallel.")
    t.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoint.json)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--model", help="timm model name (lcnn_resnet10_w16_cifar)")
    t.add_argument("--model-kwargs", type=_json_object,
                   help='timm.create_model arguments as JSON, e.g. \'{"img_size": 32}\'')
    t.add_argument("--pretrained-file", help="start from these weights (timm's pretrained_cfg_overlay file)")
    t.add_argument("--convert", type=_json_object,
                   help='convert the model first (lcnn_plugin.convert settings as JSON, e.g. '
                        '\'{"preserve_function": true}\'; {} for the defaults)')
    t.add_argument("--objective", help="standard, lcnn, gradreg, lcnn+gradreg (default), cure, adversarial, "
                                       "softplus+wd")
    t.add_argument("--data", help="synthetic (default), cifar10, cifar100, svhn, or an ImageFolder path")
    t.add_argument("--data-root", help="root of the torchvision datasets (./data)")
    t.add_argument("--download", action="store_true", default=None, help="download a torchvision dataset")
    t.add_argument("--epochs", type=count(), help="epochs (10)")
    t.add_argument("--batch-size", type=count(), help="global batch size (128)")
    t.add_argument("--lr", type=real(0, above=True), help="learning rate (0.1)")
    t.add_argument("--momentum", type=real(), help="SGD momentum (0.9)")
    t.add_argument("--weight-decay", type=real(), help="weight decay, not applied to β and γ (5e-4)")
    t.add_argument("--no-augment", action="store_true", help="no RandomCrop/flip")
    t.add_argument("--seed", type=count(0), help="seed (0)")
    t.add_argument("--checkpoint-every", type=count(0),
                   help="also checkpoint every N steps (0: per epoch only)")
    t.add_argument("--max-train-examples", type=count(),
                   help="train on a seeded random N of the training examples (all)")
    t.add_argument("--eval-examples", type=count(),
                   help="test examples evaluated per epoch: a seeded random sample of the test split (2000)")
    for flag in _OBJECTIVE_FLAGS[:-2]:
        t.add_argument("--" + flag.replace("_", "-"), type=real(),
                       help="objective setting (defaults: lcnn_plugin.objectives)")
    t.add_argument("--adv-steps", type=count(), help="PGD steps of adversarial training (3)")
    t.add_argument("--use-predicted", action="store_true", default=None,
                   help="attack the predicted instead of the true labels")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the metrics as JSON")
    t.set_defaults(func=_train)

    c = sub.add_parser("curvature",
                       help="per-example gradient norm, Hessian norm and curvature over a dataset")
    _model_args(c)
    c.add_argument("--max-examples", type=count(), default=200,
                   help="examples measured: a seeded random sample of the split (200)")
    c.add_argument("--batch-size", type=count(), default=50, help="examples per batch (50)")
    c.add_argument("--seed", type=count(0), default=0, help="seed of the sample (0)")
    c.add_argument("--method", default="lanczos",
                   choices=("lanczos", "power", "reference", "exact", "piecewise_linear"))
    c.add_argument("--engine", default="auto", choices=("auto", "autograd", "func", "compiled", "triton"))
    c.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the BatchNorm-folded copy: --fold-bn requires it, --no-fold-bn never; "
                        "default: when its logits equal the model's")
    c.set_defaults(func=_curvature)

    r = sub.add_parser("robustness", help="clean and robust accuracy under torchattacks, with honesty checks")
    _model_args(r)
    r.add_argument("--attacks", type=names(tuple(ATTACKS), "attack "), default=["pgd", "apgd"],
                   help="comma-separated: fgsm, pgd, pgdl2, apgd, apgdl2, autoattack, autoattackl2 (the "
                        "standard protocol), autoattack-fast, autoattackl2-fast (torchattacks' 10-iteration "
                        "default) (pgd,apgd)")
    r.add_argument("--eps-linf", type=floats, default=[2 / 255, 4 / 255, 8 / 255],
                   help="L-inf ε sweep, decimals or fractions (2/255,4/255,8/255)")
    r.add_argument("--eps-l2", type=floats, default=[0.1, 0.25, 0.5], help="L2 ε sweep (0.1,0.25,0.5)")
    r.add_argument("--steps", type=count(), default=10, help="PGD/APGD steps (10)")
    r.add_argument("--restarts", type=count(), default=1, help="APGD restarts (1)")
    r.add_argument("--seed", type=count(0), default=0, help="seed of the sample and the attacks (0)")
    r.add_argument("--max-examples", type=count(), default=500,
                   help=f"examples evaluated: a seeded random sample of the split (500; fewer than "
                        f"{FEW_EXAMPLES} give a warning)")
    r.add_argument("--batch-size", type=count(), default=250, help="examples per batch (250)")
    r.add_argument("--no-checks", action="store_true", help="skip the honesty checks")
    r.set_defaults(func=_robustness)

    v = sub.add_parser("convert", help="retrofit a timm model into an LCNN and report what changed",
                       description="Convert a timm model (lcnn_plugin.convert) and print the report: every "
                                   "change, every module left as is with the reason, the agreement with the "
                                   "original (--preserve-function) and the data-free bounds. To fine-tune "
                                   "the converted model, use `lcnn train --convert JSON`.")
    v.add_argument("model", help="a timm model name, or a run directory of `lcnn train`")
    v.add_argument("--num-classes", type=count(2), default=10, help="classifier outputs (10)")
    v.add_argument("--pretrained-file", default=None, help="weights file for the model")
    v.add_argument("--input-size", type=_parse_size, default=None,
                   help="C,H,W of the example input (default: the model's pretrained_cfg input_size)")
    v.add_argument("--data", default=None,
                   help="take the example input from a seeded sample of this dataset's test split "
                        "(default: uniform noise)")
    v.add_argument("--data-root", default="./data", help="root of the torchvision datasets (./data)")
    v.add_argument("--examples", type=count(), default=8, help="example inputs (8)")
    v.add_argument("--beta", type=real(0, above=True), default=None,
                   help="initial β (5; 1000 with --preserve-function)")
    v.add_argument("--gamma", type=real(0, above=True), default=10.0,
                   help="initial γ of the γ-Lipschitz BatchNorms (10)")
    v.add_argument("--preserve-function", action="store_true", help="keep a pretrained model's outputs")
    v.add_argument("--exclude", default="", help="comma-separated module path patterns to leave as they are")
    v.add_argument("--strict", action="store_true", help="fail if any module would stay uncontrolled")
    v.add_argument("--max-pool", default="keep", choices=("keep", "avg"), help="replace max-pooling (keep)")
    v.add_argument("--no-spectral-norm", action="store_true", help="leave convs and linears as they are")
    v.add_argument("--no-lipschitz-bn", action="store_true", help="leave BatchNorms as they are")
    v.add_argument("--no-bound", action="store_true", help="skip the data-free bounds")
    v.add_argument("--json", action="store_true", help="print JSON instead of text")
    v.set_defaults(func=_convert)

    rp = sub.add_parser("reproduce", help="train and evaluate the paper's seven models; a report in the "
                                          "paper's layout",
                        description=(
                            "Train the paper's seven models (standard, LCNN, GradReg, LCNN+GradReg, CURE, "
                            "softplus+wd, adversarial) with `lcnn train`'s trainer and evaluate each: "
                            "accuracy, curvature, PGD/APGD-L2 robustness with honesty checks, relative "
                            "gradient robustness, training cost. Writes results.json, report.md and plots "
                            "to --out; re-running continues an interrupted run. Every setting of the preset "
                            "can be overridden; the help of each option lists the presets' values."))
    rp.add_argument("--preset", default="cifar10-cpu", choices=tuple(PRESETS), help="settings (cifar10-cpu)")
    rp.add_argument("--out", required=True,
                    help="output folder (new, or an earlier reproduction to continue)")
    _reproduce_args(rp)
    rp.add_argument("--no-progress", action="store_true", help="no progress bars")
    rp.add_argument("--json", action="store_true", help="print results.json instead of the verdicts")
    rp.set_defaults(func=_reproduce)

    br = sub.add_parser("bench-report", help="a pytest-benchmark JSON file as a markdown report and a plot",
                        description="Tables of the lcnn-plugin benchmark fixtures (robust accuracy with "
                                    "95%% intervals, protocols and honesty checks; curvature; throughput "
                                    "against a twin), every other benchmark's time, and a plot of robust "
                                    "accuracy against ε per model.")
    br.add_argument("file", help="JSON written by pytest --benchmark-json=FILE")
    br.add_argument("--out", default=None,
                    help="folder for report.md and robust_accuracy.png (default: the markdown on stdout, "
                         "no plot)")
    br.add_argument("--json", action="store_true", help="print JSON instead of text")
    br.set_defaults(func=_bench_report)

    m = sub.add_parser("models", help="list the registered timm models")
    m.add_argument("--filter", default="lcnn_*", help="timm name pattern (default lcnn_*)")
    m.add_argument("--json", action="store_true", help="print JSON instead of text")
    m.set_defaults(func=_models)

    b = sub.add_parser("bound", help="data-free Lipschitz and curvature bounds of a model")
    b.add_argument("model", help="a timm model name, e.g. lcnn_resnet18_cifar")
    b.add_argument("--num-classes", type=count(2), default=10, help="classifier outputs (10)")
    b.add_argument("--input-size", type=_parse_size, default=None,
                   help="C,H,W (default: the model's pretrained_cfg input_size)")
    b.add_argument("--tight", action="store_true",
                   help="bound convolutions whose symbol's bound is > 1%% loose exactly, from their Gram "
                        f"matrix (up to {TIGHT_GRAM_LIMIT} rows: about 3 minutes and 4 GiB for ResNet-18 "
                        "at 32x32)")
    b.add_argument("--json", action="store_true", help="print JSON instead of text")
    b.set_defaults(func=_bound)
    return p


def _error_line(command: str, e: BaseException) -> str:
    """One line for an error: ours and the standard ``ValueError``/``TypeError``/``OSError``
    family as they are, anything else with where it came from (a crash in our own code says so)."""
    text = str(e).strip()
    lines = text.splitlines()
    msg = lines[0] if lines else type(e).__name__
    if len(lines) > 1:
        msg += f" (and {len(lines) - 1} more lines; --debug shows all)"
    if isinstance(e, (ValueError, TypeError, OSError)):
        return f"lcnn {command}: error: {msg}"
    frames = traceback.extract_tb(e.__traceback__)
    where = frames[-1] if frames else None
    if where is not None and f"{os.sep}lcnn_plugin{os.sep}" in where.filename:
        rel = where.filename[where.filename.rindex(f"{os.sep}lcnn_plugin{os.sep}") + 1:]
        return (f"lcnn {command}: internal error at {rel}:{where.lineno} in {where.name}: "
                f"{type(e).__name__}: {msg}; please report it (--debug shows the traceback)")
    origin = f" in {Path(where.filename).parent.name}/{Path(where.filename).name}" if where else ""
    return f"lcnn {command}: error: {type(e).__name__}{origin}: {msg} (--debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # as given, for the record (lcnn reproduce's report)
    debug = args.debug or os.environ.get("LCNN_DEBUG", "") not in ("", "0")
    try:
        with collect(reemit=False) as notes:
            text, payload = args.func(args)
    except KeyboardInterrupt:
        print(f"lcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends in one line (see _error_line)
        if debug:
            raise
        print(_error_line(args.command, e), file=sys.stderr)  # the error's one line only
        return 2
    for note in notes:
        print(f"lcnn {args.command}: warning: {note}", file=sys.stderr)
    print(json.dumps(dict(payload, warnings=notes)) if args.json else text)
    return 0

if __name__ == "__main__":
    sys.exit(main())
