"""Model specifications: one string names a model, for the command line and the pytest plugin.

==========================  ==================================================================
``lcnn_resnet18_cifar``     a timm model name (random weights, or the weights below)
``resnet18=weights.pth``    a timm model name with a weights file (timm's ``pretrained_cfg_overlay``)
``runs/my-run``             a run directory of ``lcnn train`` (its last checkpoint)
``mypkg.models:build``      a callable ``build()`` returning a ``torch.nn.Module``, imported from the
                            current directory or ``sys.path``
==========================  ==================================================================

:func:`parse` checks a specification without building the model (the file or folder exists,
the timm name is registered, the module imports and has the function); :meth:`ModelSpec.load`
builds the model in eval mode. Both raise :class:`~lcnn_plugin.validate.InputError` with one
line naming the specification.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .validate import InputError, suggest, timm_model, timm_name

KINDS = ("timm", "run", "factory")
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

__all__ = ["KINDS", "ModelSpec", "parse"]


@dataclass(frozen=True)
class ModelSpec:
    text: str  # as given
    kind: str  # one of KINDS
    target: str  # timm name, run folder or "module:function"
    weights: str | None = None  # weights file of a timm name

    def load(self, num_classes: int | None = None) -> nn.Module:
        """The model in eval mode (``num_classes`` applies to timm names only)."""
        if self.kind == "run":
            from .train import load_checkpoint

            return load_checkpoint(self.target)[0]
        if self.kind == "timm":
            kwargs = {} if num_classes is None else dict(num_classes=num_classes)
            return timm_model(self.target, pretrained_file=self.weights, **kwargs).eval()
        fn, attr = self.factory(), self.target.partition(":")[2]
        try:
            model = fn()
        except Exception as e:  # noqa: BLE001 - the user's code: name it, in one line
            raise InputError(f"model {self.text}: {attr}() raised {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from e
        if not isinstance(model, nn.Module):
            raise InputError(f"model {self.text}: {attr}() returned {type(model).__name__}, expected a "
                             "torch.nn.Module")
        return model.eval()

    def factory(self) -> Callable[[], Any]:
        """The function of a ``module:function`` specification (imported, checked callable)."""
        module_name, _, attr = self.target.partition(":")
        try:
            module = _import(module_name)
        except ImportError as e:
            raise InputError(f"model {self.text}: cannot import {module_name} ({e})") from e
        fn = getattr(module, attr, None)
        if not callable(fn):
            names = [n for n in dir(module) if not n.startswith("_")]
            hint = suggest(attr, names)
            raise InputError(f"model {self.text}: {module_name} has no callable {attr!r}{hint}")
        return fn


def _import(name: str):  # noqa: ANN202 - a module
    """Import ``name``; the current directory counts, as for ``python -m``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        cwd = os.getcwd()
        if cwd in sys.path:
            raise
        sys.path.insert(0, cwd)
        return importlib.import_module(name)


def parse(text: str) -> ModelSpec:
    """Check the specification ``text`` (see the module docstring) without building the model."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"model: expected a timm name, a run folder, NAME=WEIGHTS or module:function, "
                         f"got {text!r}")
    path = Path(text)
    if path.is_dir():
        if not (path / "checkpoint.json").exists():
            raise InputError(f"model {text}: a folder without checkpoint.json (not an `lcnn train` run)")
        return ModelSpec(text, "run", text)
    if "=" in text:
        name, _, weights = text.partition("=")
        if not Path(weights).is_file():
            raise InputError(f"model {text}: weights file {weights!r} not found")
        return ModelSpec(text, "timm", timm_name(name, f"model {text}"), weights)
    if ":" in text and not path.exists():
        module_name, _, attr = text.partition(":")
        if not (_DOTTED.match(module_name) and attr.isidentifier()):
            raise InputError(f"model {text}: expected module:function (a dotted module name, a function "
                             "name)")
        spec = ModelSpec(text, "factory", text)
        spec.factory()  # importable, and the function exists
        return spec
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        parent = path.parent
        runs = [str(p) for p in parent.iterdir() if (p / "checkpoint.json").exists()] \
            if parent.is_dir() else []
        raise InputError(f"model: no run folder {text}{suggest(text, runs)}")
    return ModelSpec(text, "timm", timm_name(text))
