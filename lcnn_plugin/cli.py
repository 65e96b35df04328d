"""The ``lcnn`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import timm
import torch

from . import __version__
from .bound import UnboundedError, model_bound


def _models(args: argparse.Namespace) -> int:
    names = timm.list_models(args.filter)
    if args.json:
        print(json.dumps(names))
    else:
        for name in names:
            fn = timm.models.model_entrypoint(name)
            print(f"{name:34s} {(fn.__doc__ or '').strip()}")
    return 0


def _parse_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must be C,H,W integers, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"--input-size must be three positive integers C,H,W, got {text!r}")
    return size


def _bound(args: argparse.Namespace) -> int:
    model = timm.create_model(args.model, num_classes=args.num_classes)
    size = args.input_size or model.pretrained_cfg["input_size"]
    result = model_bound(model, size)
    print(json.dumps(dict(model=args.model, **result.as_dict())) if args.json else result)
    return 0


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


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    given = {f: getattr(args, k) for k, f in _CONFIG_FLAGS.items() if getattr(args, k) is not None}
    obj_kwargs = {k: getattr(args, k) for k in _OBJECTIVE_FLAGS if getattr(args, k) is not None}
    if args.no_augment:
        given["augment"] = False
    if args.pretrained_file:
        given["model_kwargs"] = dict(given.get("model_kwargs", {}), pretrained=True,
                                     pretrained_cfg_overlay=dict(file=args.pretrained_file))
    if args.resume:
        if given or obj_kwargs:
            flags = ", ".join("--" + k.replace("_", "-") for k in [*given, *obj_kwargs])
            raise ValueError(f"--resume takes the configuration from the checkpoint; drop {flags}")
        result = train(None, args.out, resume=True, progress=not args.no_progress)
    else:
        config = TrainConfig(**given, objective_kwargs=obj_kwargs)
        result = train(config, args.out, progress=not args.no_progress)
    last = result.history[-1] if result.history else {}
    if args.json:
        print(json.dumps(dict(out=str(result.out_dir), history=result.history)))
    else:
        print(f"trained {args.out}: epoch {last.get('epoch')}, train acc {last.get('train_acc', 0):.4f}, "
              f"test acc {last.get('test_acc', 0):.4f} (checkpoint in {args.out}/checkpoint.json)")
    return 0


def _load_model(spec: str, num_classes: int, pretrained_file: str | None) -> torch.nn.Module:
    """A run directory written by ``lcnn train``, or a timm model name."""
    from pathlib import Path

    from .train import load_checkpoint

    if Path(spec, "checkpoint.json").exists():
        return load_checkpoint(spec)[0]
    if Path(spec).is_dir():
        raise ValueError(f"{spec}: a directory without checkpoint.json (not an lcnn train run)")
    kwargs = dict(num_classes=num_classes)
    if pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file))
    try:
        return timm.create_model(spec, **kwargs).eval()
    except RuntimeError as e:
        raise ValueError(f"model: {e}") from e


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory of `lcnn train`, or a timm model name")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a timm model (10)")
    p.add_argument("--pretrained-file", default=None, help="weights file for a timm model name")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (default), cifar10, cifar100, svhn, or an ImageFolder path")
    p.add_argument("--data-root", default="./data", help="root of the torchvision datasets (./data)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _curvature(args: argparse.Namespace) -> int:
    from .curvature import report
    from .data import load_dataset

    model = _load_model(args.model, args.num_classes, args.pretrained_file)
    data = load_dataset(args.data, args.split, args.data_root)
    rep = report(model, data.batches(args.batch_size, args.max_examples), method=args.method,
                 engine=args.engine, fold_bn=args.fold_bn, progress=not args.json)
    if args.json:
        print(json.dumps(dict(model=args.model, data=data.name, n=rep.n, method=rep.method,
                              hvps_mean=rep.hvps_mean, converged_fraction=rep.converged_fraction,
                              stats=rep.stats)))
    else:
        print(rep)
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _robustness(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .robustness import ATTACKS, evaluate

    model = _load_model(args.model, args.num_classes, args.pretrained_file)
    data = load_dataset(args.data, args.split, args.data_root)
    attacks = [a for a in args.attacks.split(",") if a]
    eps = {}
    if any(ATTACKS.get(a) == "Linf" for a in attacks):
        eps["Linf"] = args.eps_linf
    if any(ATTACKS.get(a) == "L2" for a in attacks):
        eps["L2"] = args.eps_l2
    res = evaluate(model, data.batches(args.batch_size, args.max_examples), attacks, eps, steps=args.steps,
                   restarts=args.restarts, seed=args.seed, checks=not args.no_checks, progress=not args.json,
                   model_name=args.model, dataset=data.name)
    print(res.to_json() if args.json else res)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    model = _load_model(args.model, args.num_classes, args.pretrained_file)
    if args.data:
        from .data import load_dataset

        x = load_dataset(args.data, "test", args.data_root).floats(slice(0, args.examples))[0]
    else:
        size = args.input_size or model.pretrained_cfg["input_size"]
        x = torch.rand(args.examples, *size, generator=torch.Generator().manual_seed(0))
    _, report = convert(model, beta=args.beta, gamma=args.gamma, spectral_norm=not args.no_spectral_norm,
                        lipschitz_bn=not args.no_lipschitz_bn, preserve_function=args.preserve_function,
                        exclude=[p for p in args.exclude.split(",") if p], strict=args.strict,
                        max_pool=args.max_pool, bound=not args.no_bound, example_input=x)
    print(json.dumps(report.as_dict()) if args.json else report)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run

    report = run(args.out, epochs=args.epochs, train_examples=args.train_examples,
                 curvature_examples=args.curvature_examples, robust_examples=args.robust_examples,
                 overwrite=args.overwrite, progress=not args.json)
    print(json.dumps(report) if args.json else report["text"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lcnn", description="Low-curvature neural networks for timm and torchattacks."
    )
    p.add_argument("--version", action="version", version=f"lcnn-plugin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quickstart",
        help="offline demo: train a standard and an LCNN+GradReg model on the embedded data, "
             "compare curvature and PGD robustness",
    )
    q.add_argument("--out", default="lcnn-quickstart",
                   help="output folder: the two runs, results.json, quickstart.png (lcnn-quickstart)")
    q.add_argument("--epochs", type=int, default=4, help="training epochs of each model (4)")
    q.add_argument("--train-examples", type=int, default=3200, help="training images used (3200)")
    q.add_argument("--curvature-examples", type=int, default=200, help="test images for the curvature (200)")
    q.add_argument("--robust-examples", type=int, default=500, help="test images for the attacks (500)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart in --out")
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
    t.add_argument("--epochs", type=int, help="epochs (10)")
    t.add_argument("--batch-size", type=int, help="global batch size (128)")
    t.add_argument("--lr", type=float, help="learning rate (0.1)")
    t.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    t.add_argument("--weight-decay", type=float, help="weight decay, not applied to β and γ (5e-4)")
    t.add_argument("--no-augment", action="store_true", help="no RandomCrop/flip")
    t.add_argument("--seed", type=int, help="seed (0)")
    t.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (0: per epoch only)")
    t.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    t.add_argument("--eval-examples", type=int, help="test examples evaluated per epoch (2000)")
    for flag in _OBJECTIVE_FLAGS[:-2]:
        t.add_argument("--" + flag.replace("_", "-"), type=float,
                       help="objective setting (defaults: lcnn_plugin.objectives)")
    t.add_argument("--adv-steps", type=int, help="PGD steps of adversarial training (3)")
    t.add_argument("--use-predicted", action="store_true", default=None,
                   help="attack the predicted instead of the true labels")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the metrics as JSON")
    t.set_defaults(func=_train)

    c = sub.add_parser("curvature",
                       help="per-example gradient norm, Hessian norm and curvature over a dataset")
    _model_args(c)
    c.add_argument("--max-examples", type=int, default=200, help="examples measured (200)")
    c.add_argument("--batch-size", type=int, default=50, help="examples per batch (50)")
    c.add_argument("--method", default="lanczos",
                   choices=("lanczos", "power", "reference", "exact", "piecewise_linear"))
    c.add_argument("--engine", default="auto", choices=("auto", "autograd", "func", "compiled", "triton"))
    c.add_argument("--fold-bn", action="store_true", help="fold eval BatchNorm into the convolutions")
    c.set_defaults(func=_curvature)

    r = sub.add_parser("robustness", help="clean and robust accuracy under torchattacks, with honesty checks")
    _model_args(r)
    r.add_argument("--attacks", default="pgd,apgd",
                   help="comma-separated: fgsm, pgd, pgdl2, apgd, apgdl2, autoattack, autoattackl2 "
                        "(pgd,apgd)")
    r.add_argument("--eps-linf", type=_floats, default=[2 / 255, 4 / 255, 8 / 255],
                   help="L-inf ε sweep (2/255,4/255,8/255)")
    r.add_argument("--eps-l2", type=_floats, default=[0.1, 0.25, 0.5], help="L2 ε sweep (0.1,0.25,0.5)")
    r.add_argument("--steps", type=int, default=10, help="PGD/APGD steps (10)")
    r.add_argument("--restarts", type=int, default=1, help="APGD restarts (1)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-examples", type=int, default=500, help="examples evaluated (500)")
    r.add_argument("--batch-size", type=int, default=250, help="examples per batch (250)")
    r.add_argument("--no-checks", action="store_true", help="skip the honesty checks")
    r.set_defaults(func=_robustness)

    v = sub.add_parser("convert", help="retrofit a timm model into an LCNN and report what changed",
                       description="Convert a timm model (lcnn_plugin.convert) and print the report: every "
                                   "change, every module left as is with the reason, the agreement with the "
                                   "original (--preserve-function) and the data-free bounds. To fine-tune "
                                   "the converted model, use `lcnn train --convert JSON`.")
    v.add_argument("model", help="a timm model name")
    v.add_argument("--num-classes", type=int, default=10, help="classifier outputs (10)")
    v.add_argument("--pretrained-file", default=None, help="weights file for the model")
    v.add_argument("--input-size", type=_parse_size, default=None,
                   help="C,H,W of the example input (default: the model's pretrained_cfg input_size)")
    v.add_argument("--data", default=None,
                   help="take the example input from this dataset's test split (default: uniform noise)")
    v.add_argument("--data-root", default="./data", help="root of the torchvision datasets (./data)")
    v.add_argument("--examples", type=int, default=8, help="example inputs (8)")
    v.add_argument("--beta", type=float, default=None, help="initial β (5; 1000 with --preserve-function)")
    v.add_argument("--gamma", type=float, default=10.0, help="initial γ of the γ-Lipschitz BatchNorms (10)")
    v.add_argument("--preserve-function", action="store_true", help="keep a pretrained model's outputs")
    v.add_argument("--exclude", default="", help="comma-separated module path patterns to leave as they are")
    v.add_argument("--strict", action="store_true", help="fail if any module would stay uncontrolled")
    v.add_argument("--max-pool", default="keep", choices=("keep", "avg"), help="replace max-pooling (keep)")
    v.add_argument("--no-spectral-norm", action="store_true", help="leave convs and linears as they are")
    v.add_argument("--no-lipschitz-bn", action="store_true", help="leave BatchNorms as they are")
    v.add_argument("--no-bound", action="store_true", help="skip the data-free bounds")
    v.add_argument("--json", action="store_true", help="print JSON instead of text")
    v.set_defaults(func=_convert)

    m = sub.add_parser("models", help="list the registered timm models")
    m.add_argument("--filter", default="lcnn_*", help="timm name pattern (default lcnn_*)")
    m.add_argument("--json", action="store_true", help="print JSON instead of text")
    m.set_defaults(func=_models)

    b = sub.add_parser("bound", help="data-free Lipschitz and curvature bounds of a model")
    b.add_argument("model", help="a timm model name, e.g. lcnn_resnet18_cifar")
    b.add_argument("--num-classes", type=int, default=10, help="classifier outputs (10)")
    b.add_argument("--input-size", type=_parse_size, default=None,
                   help="C,H,W (default: the model's pretrained_cfg input_size)")
    b.add_argument("--json", action="store_true", help="print JSON instead of text")
    b.set_defaults(func=_bound)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, UnboundedError, OSError) as e:
        print(f"lcnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
