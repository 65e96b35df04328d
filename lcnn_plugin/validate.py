"""One validation layer for the public API and the ``lcnn`` command line.

Every public entry point checks its arguments here, once, before it does any work or writes
anything: bad input raises :class:`InputError` (a ``ValueError``) whose message is one line
naming the argument, file or layer and what was expected; input that is legal but probably
not meant (a test split that is the training split, an exclude pattern that matched nothing,
an evaluation on few examples) emits a :class:`LcnnWarning`, which the command line prints
and records in its JSON output and which :func:`collect` gathers for results objects.

Folders: the package deletes or overwrites only what it wrote itself, recognised by the
marker file :data:`MARKER` that :func:`claim_dir` writes into every folder it creates.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

MARKER = ".lcnn-plugin.json"
FEW_EXAMPLES = 100  # fewer evaluated examples than this: a warning (the 95% interval is wide)

__all__ = [
    "FEW_EXAMPLES", "MARKER", "InputError", "LcnnWarning", "check_batch", "check_dir", "check_inputs",
    "check_logits", "choice", "claim_dir", "collect", "distinct", "fits", "integer", "module", "number",
    "owner", "suggest", "timm_model", "timm_name", "warn", "writable",
]


class InputError(ValueError):
    """Bad input to the package: the message names the argument, file or layer."""


class LcnnWarning(UserWarning):
    """Legal input that is probably not meant (printed and recorded by the command line)."""


def warn(message: str) -> None:
    warnings.warn(message, LcnnWarning, stacklevel=3)


@contextmanager
def collect(reemit: bool = True) -> Iterator[list[str]]:
    """Gather the :class:`LcnnWarning` messages raised inside (each once), and re-emit them on
    a normal exit when ``reemit``; other warnings pass through."""
    seen: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LcnnWarning)
            yield seen
    finally:  # outside the recording: a warning re-emitted inside it would be recorded again
        for w in caught:
            if not issubclass(w.category, LcnnWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            elif str(w.message) not in seen:
                seen.append(str(w.message))
    for message in seen if reemit else ():
        warnings.warn(message, LcnnWarning, stacklevel=3)


def suggest(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        hint = suggest(value, options) if isinstance(value, str) else ""
        raise InputError(f"{name}: expected one of {', '.join(options)}; got {value!r}{hint}")
    return value


def integer(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """An int ≥ ``minimum`` (bool is not an int here); ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
           above: bool = False, optional: bool = False) -> float | None:
    """A finite real number in [minimum, maximum] (``above``: strictly greater than minimum)."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if above else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if above else '>='} {minimum:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        rule = f" {' and '.join(bounds)}" if bounds else ""
        raise InputError(f"{name}: expected a finite number{rule}, got {value!r}")
    return float(value)


def distinct(name: str, values: Any) -> list:
    """A non-empty sequence without repeats (a repeat would count every example twice)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"{name}: expected a list, got {values!r}")
    values = list(values)
    if not values:
        raise InputError(f"{name}: expected at least one value, got none")
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise InputError(f"{name}: {', '.join(repeated)} given more than once")
    return values


# -- data and models ---------------------------------------------------------------------------
def module(model: Any) -> nn.Module:
    """``model`` is a ``torch.nn.Module`` (a ``TypeError`` otherwise)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_inputs(x: Any, y: Any, where: str, *, unit_box: bool = True) -> None:
    """Inputs: a floating tensor (B, ...), B ≥ 1, finite, in [0, 1] when ``unit_box``; labels
    (unless None): integers of shape (B,)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{where}: inputs must be a floating-point tensor of shape (B, ...), got {got}")
    if x.shape[0] == 0:
        raise InputError(f"{where}: the batch is empty")
    if not torch.isfinite(x).all():
        raise InputError(f"{where}: inputs contain NaN or inf")
    if unit_box:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise InputError(f"{where}: inputs must lie in [0, 1] (normalise inside the model); got "
                             f"values in [{lo:.4g}, {hi:.4g}]")
    if y is not None:
        integral = isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex()
        if not integral or y.dtype == torch.bool or tuple(y.shape) != tuple(x.shape[:1]):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputError(f"{where}: labels must be integers of shape ({x.shape[0]},), got {got}")


def check_logits(out: Any, y: torch.Tensor | None, batch: int, where: str, *, logits: bool = True) -> None:
    """A model's output on a batch of ``batch``: (B, C) with an output for every label, and, when
    ``logits`` (what cross-entropy and the attacks need), C ≥ 2 and not probabilities."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"model: must return logits of shape (B={batch}, C), got {got} "
                         "(a feature extractor, e.g. num_classes=0, has no logits)")
    C = out.shape[1]
    if logits and C < 2:
        raise InputError(f"model: returns {C} output(s) per example; expected logits over >= 2 classes")
    if y is not None and (int(y.min()) < 0 or int(y.max()) >= C):
        raise InputError(f"{where}: labels must lie in [0, {C}) for a model with {C} classes, got "
                         f"[{int(y.min())}, {int(y.max())}]")
    if not logits:
        return
    rows = out.detach().double()
    if bool((rows >= 0).all() and (rows <= 1).all() and torch.allclose(rows.sum(1), rows.new_ones(1))):
        raise InputError("model: returns probabilities (rows in [0, 1] summing to 1); expected logits "
                         "(remove the final softmax)")


def check_batch(model: nn.Module, x: Any, y: Any, where: str, *, unit_box: bool = True) -> torch.Tensor:
    """:func:`check_inputs`, then the model's output on them (no grad) by :func:`check_logits`:
    the clean logits."""
    check_inputs(x, y, where, unit_box=unit_box)
    with torch.no_grad():
        out = model(x)
    check_logits(out, y, x.shape[0], where)
    return out


# -- folders -----------------------------------------------------------------------------------
def _marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def owner(path: Path) -> str | None:
    """The command that wrote folder ``path`` (from its marker), or None."""
    mark = _marker(Path(path))
    return mark.get("command") if isinstance(mark, dict) else None


def writable(name: str, path: Path) -> Path:
    """``path`` can be created or written (checked before anything is written)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{name}: {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{name}: cannot write to {path} ({probe} is not a writable folder)")
    return path


def check_dir(name: str, path: str | Path, command: str) -> bool:
    """``path`` may become the output folder of ``command``: new, empty, or written by
    ``command`` before (its marker); an error otherwise. Returns True when it holds files
    (of an earlier ``command``). Writes nothing: call before any work, then :func:`claim_dir`."""
    path = writable(name, Path(path))
    if not (path.is_dir() and any(path.iterdir())):
        return False
    who = owner(path)
    if who != command:
        what = f"was written by `lcnn {who}`" if who else "holds files that lcnn-plugin did not write"
        raise InputError(f"{name}: {path} is not empty and {what}; choose another folder")
    return True


def claim_dir(path: str | Path, command: str, *, clear: bool = False) -> Path:
    """Create ``path`` (checked by :func:`check_dir`) with ``command``'s marker; ``clear``
    first removes what an earlier ``command`` wrote there (and only then: the marker is checked)."""
    path = Path(path)
    if clear and path.is_dir() and any(path.iterdir()):
        if owner(path) != command:
            raise InputError(f"{path}: not written by `lcnn {command}`; refusing to remove it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if owner(path) is None:
        (path / MARKER).write_text(json.dumps({"command": command}) + "\n")
    return path


def fits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, n_classes: int, where: str) -> int:
    """``model`` takes the data's images and has an output for each of its ``n_classes``
    classes (and labels): one eval forward of one image, the model's mode restored.
    Returns the model's number of outputs."""
    x = images[:1].float() / 255.0 if images.dtype == torch.uint8 else images[:1]
    check_inputs(x, None, where)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    except Exception as e:  # noqa: BLE001 - the model cannot take the images: say which
        expect = getattr(model, "pretrained_cfg", {}).get("input_size")
        want = f" (the model's input_size is {tuple(expect)})" if expect else ""
        raise InputError(f"{where}: images of shape {tuple(images.shape[1:])} do not fit the model{want}: "
                         f"{_first_line(e)}") from e
    finally:
        model.train(was)
    check_logits(logits, None, 1, where)
    C = logits.shape[1]
    top = int(labels.max()) if labels.numel() else -1
    if n_classes > C or top >= C:
        raise InputError(f"{where}: {max(n_classes, top + 1)} classes but the model has {C} outputs "
                         "(give the model as many classes, e.g. --num-classes)")
    return C


def timm_name(name: Any, where: str = "model") -> str:
    """A registered timm model name (an error names the closest one)."""
    import timm

    from . import models  # noqa: F401  (registers the LCNN models)

    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: expected a timm model name, got {name!r}")
    arch = timm.models.split_model_name_tag(name)[0]
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.models.is_model(arch):
        raise InputError(f"{where}: unknown timm model {name!r}{suggest(arch, timm.list_models())}")
    return name


def timm_model(name: str, *, pretrained_file: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with one-line errors: an unknown name with the
    closest registered one, a missing, unreadable or mismatched ``pretrained_file``."""
    import timm

    timm_name(name)
    if "num_classes" in kwargs:
        integer("num_classes", kwargs["num_classes"], 2)
    if pretrained_file is not None:
        file = Path(pretrained_file)
        if not file.is_file():
            raise InputError(f"pretrained-file: {file} is not a file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    try:
        return timm.create_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm, torch and safetensors raise many types
        if pretrained_file is None:
            raise
        raise InputError(f"pretrained-file: {pretrained_file}: {_load_error(e)}") from e


def _load_error(e: Exception) -> str:
    """One line for a failed weights load (a state_dict mismatch is summarised, not dumped)."""
    text = str(e)
    if "Error(s) in loading state_dict" not in text:
        return f"not a readable weights file ({_first_line(e)})"

    def quoted(label: str) -> int:  # torch lists keys as "a", "b". after the label
        found = re.search(re.escape(label) + r" in state_dict: (.*?)\.\s", text + " ", re.S)
        return found.group(1).count('"') // 2 if found else 0

    counts = {"missing keys": quoted("Missing key(s)"), "unexpected keys": quoted("Unexpected key(s)"),
              "size mismatches": text.count("size mismatch for ")}
    found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return f"weights of another architecture or number of classes ({found})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
