"""``lcnn reproduce``: the paper's seven models, trained and evaluated with this package's commands.

Srinivas et al. (2022) compare seven ResNets — standard, LCNN, GradReg, LCNN+GradReg, CURE,
softplus + weight decay, adversarial training — by their input geometry and their robustness.
:func:`reproduce` trains each with :func:`lcnn_plugin.train.train` (our objectives and default
coefficients, the paper's schedule) and evaluates it on the test split:

- accuracy on the whole test split and on an optional second test set, with 95% intervals;
- E‖∇f‖, E‖∇²f‖, E C_f (Lanczos) on a seeded random sample of the test split, mean ± std;
- PGD-L2 and APGD-L2 at each ε on a seeded random sample, their per-example worst case and the
  honesty checks of :func:`lcnn_plugin.robustness.evaluate`, with 95% intervals;
- relative gradient robustness r(x, δ) over random perturbations of several norms;
- training cost: seconds per epoch and the ratio to the standard model's.

Settings are a :class:`Settings`; :data:`PRESETS` holds named ones (every field can be
overridden). The output folder holds ``settings.json``, ``runs/<model>/`` (the training runs),
``eval/<model>.json`` (one model's evaluation, written once it is complete), ``results.json``,
``report.md`` (our figures in the paper's layout, the paper's own CIFAR-100 figures beside them,
labelled as theirs, and a verdict on each claim of the paper) and three plots. The report is
rewritten after every model, so a long run can be read while it goes on.

Interrupting loses nothing: a re-run with the same settings skips finished evaluations, resumes
an interrupted training run from its last checkpoint (the trainer's exact resume) and gives the
same figures as an uninterrupted run (timings aside). ``models`` may change between runs (it
only selects); any other setting must not (the error names it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import plots
from . import validate as check

# label: (timm name prefix, objective); the model is prefix + Settings.arch
MODELS: dict[str, tuple[str, str]] = {
    "standard": ("lcnn_standard_", "standard"),
    "lcnn": ("lcnn_", "lcnn"),
    "gradreg": ("lcnn_standard_", "gradreg"),
    "lcnn+gradreg": ("lcnn_", "lcnn+gradreg"),
    "cure": ("lcnn_standard_", "cure"),
    "softplus+wd": ("lcnn_softplus_", "softplus+wd"),
    "adversarial": ("lcnn_standard_", "adversarial"),
}
# rough cost of one training step relative to the standard model's (for the time estimate only)
_STEP_COST = {"standard": 1.0, "lcnn": 1.35, "gradreg": 2.4, "lcnn+gradreg": 2.5, "cure": 4.0,
              "softplus+wd": 1.0, "adversarial": 4.0}

# The paper's Tables (ResNet-18, CIFAR-100, mean of 2 runs; paper-notes §4): theirs, for the shape.
PAPER_GEOMETRY = {  # label: (E‖∇f‖, E‖∇²f‖, E C_f, accuracy %)
    "standard": (19.66, 6061.96, 270.89, 77.42),
    "gradreg": (8.86, 776.56, 89.47, 77.20),
    "lcnn+gradreg": (9.87, 154.36, 25.30, 77.29),
    "cure": (8.86, 979.45, 116.31, 76.48),
    "softplus+wd": (18.08, 1052.84, 70.39, 77.44),
    "adversarial": (7.99, 501.43, 63.79, 76.96),
}
PAPER_EPS = (0.05, 0.1, 0.15, 0.2)
PAPER_ROBUST = {  # label: (clean, then PGD-L2 at PAPER_EPS), %
    "standard": (77.42, 59.97, 37.55, 23.41, 16.11),
    "lcnn": (77.16, 61.17, 39.72, 25.60, 17.66),
    "gradreg": (77.20, 71.90, 61.06, 49.19, 38.09),
    "lcnn+gradreg": (77.29, 72.68, 63.36, 52.96, 42.70),
    "cure": (76.48, 71.39, 61.28, 49.60, 39.04),
    "softplus+wd": (77.44, 60.86, 38.04, 23.85, 16.20),
    "adversarial": (76.96, 72.76, 64.70, 54.80, 44.98),
}


@dataclass(frozen=True)
class Settings:
    """Everything that defines a reproduction (saved in ``settings.json``)."""

    arch: str = "resnet10_w16_cifar"  # the model of each label is MODELS[label][0] + arch
    models: tuple[str, ...] = tuple(MODELS)
    data: str = "cifar10"  # dataset name or ImageFolder with train/ and test/ (lcnn_plugin.data)
    data_root: str = "./data"
    second_test: str | None = None  # a second test set (accuracy only), e.g. lossless images
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    train_examples: int | None = 20_000  # a seeded random subset of the train split (None: all)
    checkpoint_every: int = 50  # steps (interrupting loses at most this many)
    seed: int = 0
    curvature_examples: int = 500
    robust_examples: int = 1000
    eps: tuple[float, ...] = PAPER_EPS  # L2 ε of PGD and APGD
    steps: int = 10  # PGD / APGD iterations (α = 2.5ε/steps)
    rgr_examples: int = 200
    rgr_radii: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1.0)
    rgr_samples: int = 4  # random directions per example and norm
    eval_batch: int = 250

    def validate(self) -> None:
        for name in check.distinct("models", self.models):
            check.choice("models", name, tuple(MODELS))
        for name in ("epochs", "batch_size", "curvature_examples", "robust_examples", "steps", "rgr_examples",
                     "rgr_samples", "eval_batch"):
            check.integer(name, getattr(self, name))
        check.integer("train_examples", self.train_examples, optional=True)
        check.integer("checkpoint_every", self.checkpoint_every, 0)
        check.integer("seed", self.seed, 0)
        check.number("lr", self.lr, 0, above=True)
        for name in ("eps", "rgr_radii"):
            for v in check.distinct(name, getattr(self, name)):
                check.number(name, v, 0, above=True)
        import timm

        for label in self.models:
            name = MODELS[label][0] + self.arch
            if not timm.is_model(name):
                archs = sorted({n.removeprefix("lcnn_") for n in timm.list_models("lcnn_*")
                                if not n.startswith(("lcnn_standard_", "lcnn_softplus_"))})
                raise check.InputError(f"arch: no timm model {name!r} for {label}; choose one of "
                                       + ", ".join(archs) + check.suggest(self.arch, archs))

    def model_name(self, label: str) -> str:
        return MODELS[label][0] + self.arch


PRESETS: dict[str, dict[str, Any]] = {
    # about 1 h 45 min on 2 CPU cores (measured: benchmarks/results/reproduce_cifar10_cpu/)
    "cifar10-cpu": dict(arch="resnet10_w16_cifar", data="cifar10", epochs=8, train_examples=20_000),
    # the paper's recipe (for a GPU): ResNet-18 with the CIFAR stem, all 50k images, 200 epochs
    "cifar10-paper": dict(arch="resnet18_cifar", data="cifar10", epochs=200, train_examples=None,
                          curvature_examples=1000, robust_examples=10_000),
    # two models, one epoch, on the embedded data: a minute end to end (a smoke test)
    "smoke": dict(arch="resnet10_w16_cifar", models=("standard", "lcnn+gradreg"), data="synthetic", epochs=1,
                  train_examples=512, checkpoint_every=0, curvature_examples=32, robust_examples=100,
                  eps=(0.5, 1.0), steps=5, rgr_examples=32, rgr_radii=(0.1, 1.0), rgr_samples=2),
}


def settings_for(preset: str, **overrides: Any) -> Settings:
    """The preset's settings with ``overrides`` (field names of :class:`Settings`) applied."""
    check.choice("preset", preset, tuple(PRESETS))
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise check.InputError(f"settings: unknown {unknown}; expected some of {sorted(fields)}")
    values = {**PRESETS[preset], **overrides}
    for k in ("models", "eps", "rgr_radii"):
        if k in values and isinstance(values[k], list):
            values[k] = tuple(values[k])
    return Settings(**values)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _slug(label: str) -> str:
    return label.replace("+", "-")


def _revision() -> str | None:
    """The git commit of the package's source (with ``+dirty`` for uncommitted changes), if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _accuracy(model: torch.nn.Module, data: Any, batch: int, device: torch.device) -> dict[str, Any]:
    from .robustness import wilson_interval
    from .train import correct_count

    hits, n = correct_count(model, data, device, batch), len(data)
    return dict(data=data.name, n=n, acc=hits / n, ci95=list(wilson_interval(hits, n)))


def _train(s: Settings, label: str, run_dir: Path, progress: bool) -> tuple[torch.nn.Module, list[dict]]:
    from .train import TrainConfig, train

    config = TrainConfig(model=s.model_name(label), objective=MODELS[label][1], data=s.data,
                         data_root=s.data_root, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                         seed=s.seed, checkpoint_every=s.checkpoint_every,
                         max_train_examples=s.train_examples, eval_examples=2000)
    result = train(config, run_dir, resume=(run_dir / "checkpoint.json").exists(), progress=progress)
    return result.model, result.history


def _evaluate(s: Settings, label: str, model: torch.nn.Module, history: list[dict], test: Any,
              second: Any | None, progress: bool) -> dict[str, Any]:
    from .curvature import relative_gradient_robustness
    from .curvature import report as curvature_report
    from .objectives import make_objective
    from .robustness import evaluate

    t0 = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device  # where train() put it (CUDA when there is one)
    out: dict[str, Any] = dict(label=label, model=s.model_name(label), objective=MODELS[label][1],
                               objective_settings=asdict(make_objective(MODELS[label][1])))
    out["accuracy"] = {"test": _accuracy(model, test, s.eval_batch, device)}
    if second is not None:
        out["accuracy"]["second"] = _accuracy(model, second, s.eval_batch, device)
    curv_data = test.sample(s.curvature_examples, s.seed + 1)
    curv = curvature_report(model, curv_data.batches(s.eval_batch), progress=progress, device=device)
    out["curvature"] = dict(data=curv_data.name, n=curv.n, method=curv.method, hvps_mean=curv.hvps_mean,
                            converged_fraction=curv.converged_fraction, stats=curv.stats)
    rob_data = test.sample(s.robust_examples, s.seed + 2)
    rob = evaluate(model, rob_data.batches(s.eval_batch), ["pgdl2", "apgdl2"], {"L2": list(s.eps)},
                   device=device, steps=s.steps, seed=s.seed, progress=progress, model_name=label,
                   dataset=rob_data.name)
    out["robustness"] = rob.as_dict()
    rgr_data = test.sample(s.rgr_examples, s.seed + 3)
    x, y = rgr_data.floats()
    r = relative_gradient_robustness(model, x.to(device), y.to(device), radii=s.rgr_radii,
                                     n_samples=s.rgr_samples, seed=s.seed)
    flat = r.flatten(1)
    out["relative_gradient_robustness"] = dict(
        data=rgr_data.name, n=len(rgr_data), samples=s.rgr_samples, radii=list(s.rgr_radii),
        mean=flat.mean(1).tolist(), std=flat.std(1).tolist(), median=flat.median(1).values.tolist())
    per_epoch = [h["seconds"] for h in history]
    out["training"] = dict(epochs=len(history), seconds_per_epoch=per_epoch,
                           train_acc=history[-1]["train_acc"] if history else None,
                           test_acc_per_epoch=[h["test_acc"] for h in history])
    out["eval_seconds"] = time.perf_counter() - t0
    out["revision"] = _revision()  # the code that trained (its last part) and evaluated this model
    return out


def reproduce(settings: Settings, out: str | Path, *, progress: bool = True, command: str | None = None
              ) -> dict[str, Any]:
    """Train and evaluate ``settings.models`` into ``out`` (see the module docstring); returns
    the content of ``results.json``. A re-run continues an interrupted one. ``command``: how the
    run was started, for the report."""
    from tqdm.auto import tqdm

    from .data import load_dataset

    settings.validate()
    out = Path(out)
    saved_path = out / "settings.json"
    is_ours = check.check_dir("out", out, "reproduce")
    if is_ours and saved_path.exists():
        saved = json.loads(saved_path.read_text())
        mine = json.loads(json.dumps(asdict(settings)))
        diff = sorted(k for k in set(saved) | set(mine) if k != "models" and saved.get(k) != mine.get(k))
        if diff:
            detail = "; ".join(f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            raise check.InputError(f"out: {out} holds a reproduction with other settings ({detail}); "
                                   "choose another out or the same settings")
    # every input is read before anything is written
    test = load_dataset(settings.data, "test", settings.data_root)
    second = load_dataset(settings.second_test, "test", settings.data_root) if settings.second_test else None
    check.claim_dir(out, "reproduce")
    (out / "runs").mkdir(exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    if not saved_path.exists():
        _atomic_json(saved_path, asdict(settings))
    weights = {label: _STEP_COST[label] * settings.epochs + 2.0 for label in settings.models}
    done = {label: (out / "eval" / f"{_slug(label)}.json").exists() for label in settings.models}
    bar = tqdm(total=sum(weights.values()), initial=sum(w for label, w in weights.items() if done[label]),
               disable=not progress, desc="reproduce", unit="",
               bar_format="{l_bar}{bar}| {elapsed} elapsed, about {remaining} left")
    evals: dict[str, dict[str, Any]] = {}
    for label in settings.models:
        path = out / "eval" / f"{_slug(label)}.json"
        if not done[label]:
            bar.set_description(f"reproduce: {label}")
            model, history = _train(settings, label, out / "runs" / _slug(label), progress)
            _atomic_json(path, _evaluate(settings, label, model, history, test, second, progress))
            bar.update(weights[label])
        evals[label] = json.loads(path.read_text())
        _write_report(out, settings, evals, command)
    bar.close()
    return json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------- the report

def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _ci(ci: list[float]) -> str:
    return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}"


def _rows(ev: dict[str, Any], attack: str) -> dict[float, dict[str, Any]]:
    return {r["eps"]: r for r in ev["robustness"]["rows"] if r["attack"] == attack}


def _z(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Two-proportion z statistic of robust accuracy a over b (unpooled standard error; the
    models are evaluated on the same examples, for which this test is conservative)."""
    pa, pb, na, nb = a["robust_acc"], b["robust_acc"], a["n_examples"], b["n_examples"]
    se = math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    return (pa - pb) / se if se > 0 else (math.inf if pa > pb else 0.0)


VERDICT = {True: "holds", False: "DOES NOT HOLD", None: "not checked"}  # a claim's verdict in words


def shape_verdicts(evals: dict[str, dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The paper's claims checked on our figures: (claim, holds (None: models missing), figures)."""
    def mean(label: str, key: str) -> float:
        return evals[label]["curvature"]["stats"][key]["mean"]

    have = set(evals)
    out: list[tuple[str, bool | None, str]] = []
    claim = "LCNN+GradReg has the lowest E‖∇²f‖ and E C_f of all models, ≥ 5× below standard"
    if {"lcnn+gradreg", "standard"} <= have:
        ok, parts = True, []
        for key in ("hessian_norm", "curvature"):
            lg = mean("lcnn+gradreg", key)
            lowest = min(have, key=lambda lab: mean(lab, key))
            ratio = mean("standard", key) / lg
            ok &= lowest == "lcnn+gradreg" and ratio >= 5
            parts.append(f"{plots.GEOMETRY[key]}: lowest {lowest} ({mean(lowest, key):.3g}), "
                         f"standard/LCNN+GradReg = {ratio:.1f}×")
        out.append((claim, ok, "; ".join(parts)))
    else:
        out.append((claim, None, "needs standard and lcnn+gradreg"))
    claim = "LCNN+GradReg's accuracy is within 2 points of standard's"
    if {"lcnn+gradreg", "standard"} <= have:
        a, b = (evals[k]["accuracy"]["test"]["acc"] for k in ("lcnn+gradreg", "standard"))
        out.append((claim, a >= b - 0.02, f"{_pct(a)}% vs {_pct(b)}% (test split)"))
    else:
        out.append((claim, None, "needs standard and lcnn+gradreg"))
    claim = "LCNN+GradReg's robust accuracy (PGD-L2) is ≥ GradReg's at every ε (within the 95% interval)"
    if {"lcnn+gradreg", "gradreg"} <= have:
        lg, g = _rows(evals["lcnn+gradreg"], "pgdl2"), _rows(evals["gradreg"], "pgdl2")
        bad = [f"ε={e:g}: {_pct(lg[e]['robust_acc'])} ({_ci(lg[e]['robust_acc_ci95'])}) < "
               f"{_pct(g[e]['robust_acc'])}" for e in lg if lg[e]["robust_acc_ci95"][1] < g[e]["robust_acc"]]
        out.append((claim, not bad, "; ".join(bad) or ", ".join(
            f"ε={e:g}: {_pct(lg[e]['robust_acc'])} vs {_pct(g[e]['robust_acc'])}" for e in lg)))
    else:
        out.append((claim, None, "needs gradreg and lcnn+gradreg"))
    claim = ("LCNN+GradReg's robust accuracy is above standard's at every ε, significantly (two-proportion "
             "z-test, z ≥ 1.96)")
    if {"lcnn+gradreg", "standard"} <= have:
        lg, st = _rows(evals["lcnn+gradreg"], "pgdl2"), _rows(evals["standard"], "pgdl2")
        z = {e: _z(lg[e], st[e]) for e in lg}
        out.append((claim, all(v >= 1.96 for v in z.values()), ", ".join(
            f"ε={e:g}: {_pct(lg[e]['robust_acc'])} vs {_pct(st[e]['robust_acc'])} (z = {z[e]:.1f})"
            for e in lg)))
    else:
        out.append((claim, None, "needs standard and lcnn+gradreg"))
    claim = "LCNN alone lowers E‖∇²f‖ and E C_f against standard"
    if {"lcnn", "standard"} <= have:
        ok = all(mean("lcnn", k) < mean("standard", k) for k in ("hessian_norm", "curvature"))
        out.append((claim, ok, ", ".join(
            f"{plots.GEOMETRY[k]} {mean('lcnn', k):.3g} vs {mean('standard', k):.3g}"
            for k in ("hessian_norm", "curvature"))))
    else:
        out.append((claim, None, "needs standard and lcnn"))
    flagged = [k for k, ev in evals.items() if ev["robustness"]["flagged"]]
    out.append(("No model is flagged by the honesty checks (no sign of gradient masking)", not flagged,
                "flagged: " + ", ".join(flagged) if flagged else f"{len(evals)} models checked"))
    return out


def _epoch_seconds(ev: dict[str, Any]) -> float:
    """Median seconds per epoch (robust to one disturbed or warm-up epoch)."""
    return statistics.median(ev["training"]["seconds_per_epoch"])


def _write_report(out: Path, s: Settings, evals: dict[str, dict[str, Any]], command: str | None) -> None:
    labels = list(evals)
    pending = [m for m in s.models if m not in evals]
    std_epoch = _epoch_seconds(evals["standard"]) if "standard" in evals else None
    results = dict(settings=asdict(s), command=command, revision=_revision(), models=evals, pending=pending,
                   verdicts=[dict(claim=c, holds=h, figures=f) for c, h, f in shape_verdicts(evals)])
    _atomic_json(out / "results.json", results)
    geo = {k: {g: ev["curvature"]["stats"][g]["mean"] for g in plots.GEOMETRY} for k, ev in evals.items()}
    plots.save(str(out / "curvature.png"), [lambda ax: plots.geometry_bars(ax, geo)], (7, 3.8))
    curves = {}
    for k, ev in evals.items():
        rows = _rows(ev, "worst-case")
        eps = sorted(rows)
        clean = ev["robustness"]
        curves[k] = ([0.0, *eps], [clean["clean_acc"], *[rows[e]["robust_acc"] for e in eps]],
                     [tuple(clean["clean_acc_ci95"]), *[tuple(rows[e]["robust_acc_ci95"]) for e in eps]])
    xlabel = "L2 ε (worst case of PGD-L2 and APGD-L2)"
    plots.save(str(out / "robust_accuracy.png"), [lambda ax: plots.accuracy_curves(ax, curves, xlabel)],
               (6, 4))
    rgr = {k: ev["relative_gradient_robustness"] for k, ev in evals.items()}
    plots.save(str(out / "relative_gradient_robustness.png"),
               [lambda ax: plots.relative_gradient_robustness(ax, rgr, s.rgr_radii)], (6, 4))

    first = evals[labels[0]]
    test_name = first["accuracy"]["test"]["data"]
    second_name = first["accuracy"].get("second", {}).get("data")
    md = ["# Reproduction of Srinivas et al. (2022), \"Efficient Training of Low-Curvature Neural Networks\"",
          "", f"Command: `{command or 'lcnn_plugin.reproduce.reproduce(...)'}`  ",
          f"Source revision of this report: {results['revision'] or 'unknown (not a git checkout)'}; of "
          "each model's evaluation: " + ", ".join(f"{k} {ev.get('revision') or 'not recorded'}"
                                                  for k, ev in evals.items()) + "  ",
          f"Settings: {json.dumps(asdict(s))}", ""]
    if pending:
        md += [f"**In progress**: {', '.join(pending)} still to come.", ""]
    md += ["## Geometry and accuracy (ours)", "",
           f"Means ± std over {first['curvature']['n']} test images ({first['curvature']['data']}; "
           "per-example cross-entropy of the true label, Lanczos); accuracy with its 95% interval.", ""]
    head = ["model", "E‖∇f‖", "E‖∇²f‖", "E C_f", f"acc % ({test_name})"]
    if second_name:
        head.append(f"acc % ({second_name})")
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for k, ev in evals.items():
        st = ev["curvature"]["stats"]
        cells = [k, *[f"{st[g]['mean']:.3g} ± {st[g]['std']:.2g}" for g in plots.GEOMETRY]]
        cells += [f"{_pct(a['acc'])} ({_ci(a['ci95'])})" for a in
                  [ev["accuracy"]["test"], *([ev["accuracy"]["second"]] if second_name else [])]]
        md.append("| " + " | ".join(cells) + " |")
    rob = first["robustness"]
    md += ["", "## Robust accuracy under L2 attacks (ours)", "",
           f"{rob['n_examples']} test images ({rob['dataset']}); PGD-L2 with {s.steps} steps, "
           f"α = 2.5ε/{s.steps}, random start; APGD-L2 with {s.steps} steps; worst case = an example counts "
           "only if it survives both. Accuracy % (95% interval).", ""]
    head = ["model", "attack", "clean", *[f"ε={e:g}" for e in s.eps]]
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for k, ev in evals.items():
        r = ev["robustness"]
        for attack in ("pgdl2", "apgdl2", "worst-case"):
            rows = _rows(ev, attack)
            first_row = attack == "pgdl2"
            cells = [k if first_row else "", attack, _pct(r["clean_acc"]) if first_row else "",
                     *[f"{_pct(rows[e]['robust_acc'])} ({_ci(rows[e]['robust_acc_ci95'])})" for e in s.eps]]
            md.append("| " + " | ".join(cells) + " |")
    md += ["", "Honesty checks (lcnn_plugin.robustness): "]
    for k, ev in evals.items():
        failed = [c for c in ev["robustness"]["checks"] if not c["passed"]]
        md.append(f"- {k}: " + ("all passed" if not failed else
                                "FLAGGED — " + "; ".join(f"{c['name']}: {c['detail']}" for c in failed)))
    md += ["", "## Training cost (ours)", "",
           "Seconds per epoch: the median over the run's epochs (wall clock of the training steps, "
           "the per-epoch test accuracy excluded).", "",
           "| model | objective | epochs | s / epoch | × standard | train acc % |", "|---" * 6 + "|"]
    for k, ev in evals.items():
        t = ev["training"]
        ratio = f"{_epoch_seconds(ev) / std_epoch:.2f}" if std_epoch else "–"
        acc = _pct(t["train_acc"]) if t["train_acc"] is not None else "–"
        md.append(f"| {k} | {ev['objective']} | {t['epochs']} | {_epoch_seconds(ev):.0f} | "
                  f"{ratio} | {acc} |")
    md += ["", "## The paper's claims, checked on our figures", ""]
    for c, h, f in shape_verdicts(evals):
        md.append(f"- **{VERDICT[h]}**: {c}. {f}")
    md += ["", "## The paper's figures (theirs: ResNet-18 on CIFAR-100, 200 epochs; for the shape only)", "",
           "| model | E‖∇f‖ | E‖∇²f‖ | E C_f | acc % | "
           + " | ".join(f"PGD-L2 ε={e:g}" for e in PAPER_EPS) + " |",
           "|---" * (5 + len(PAPER_EPS)) + "|"]
    for k in MODELS:
        g = PAPER_GEOMETRY.get(k)
        geo_cells = [f"{v:g}" for v in g[:3]] if g else ["–"] * 3
        md.append(f"| {k} | " + " | ".join([*geo_cells, f"{PAPER_ROBUST[k][0]:g}",
                                            *[f"{v:g}" for v in PAPER_ROBUST[k][1:]]]) + " |")
    md += ["", "## Plots", "", "![robust accuracy](robust_accuracy.png)", "",
           "![curvature](curvature.png)", "",
           "![relative gradient robustness](relative_gradient_robustness.png)", ""]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, out / "report.md")


__all__ = ["MODELS", "PRESETS", "VERDICT", "Settings", "reproduce", "settings_for", "shape_verdicts"]
