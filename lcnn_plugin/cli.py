"""The ``lcnn`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def _quickstart(args: argparse.Namespace) -> int:
    """Build an LCNN ResNet-18 (CIFAR stem) through timm, check it, print its bounds."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    name = "lcnn_resnet18_cifar"
    model = timm.create_model(name, num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(8, 3, 32, 32)
    model.train()
    logits = model(x)
    logits.logsumexp(1).mean().backward()
    finite = torch.isfinite(logits).all() and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    model.eval()
    result = model_bound(model, (3, args.size, args.size))
    report = dict(
        model=name, parameters=n_params, forward_backward_finite=bool(finite),
        logits_shape=list(logits.shape), seconds=round(time.perf_counter() - t0, 1),
        bound=result.as_dict(),
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(f"timm.create_model({name!r}, num_classes=10): {n_params:,} parameters")
        print(f"forward + backward on a batch of 8: logits {tuple(logits.shape)}, "
              f"all finite: {bool(finite)}")
        print(result)
        print(f"done in {report['seconds']} s")
    return 0 if finite else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lcnn", description="Low-curvature neural networks for timm and torchattacks."
    )
    p.add_argument("--version", action="version", version=f"lcnn-plugin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quickstart",
        help="offline demo: build an LCNN ResNet-18 through timm, check it, print its bounds",
    )
    q.add_argument("--size", type=int, default=32, help="input height and width for the bounds (32)")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=_quickstart)

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
    except (ValueError, TypeError, RuntimeError, UnboundedError) as e:
        print(f"lcnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
