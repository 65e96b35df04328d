"""Robust accuracy under torchattacks attacks over an ε sweep, with honesty checks.

``evaluate(model, loader, attacks, eps)`` runs each attack at each ε of its norm on every
example (inputs in [0, 1]; any normalisation lives inside the model, so torchattacks sees
exactly the model's own logits) and returns clean and robust accuracy with a 95% Wilson
interval, the per-example worst case over the attacks of each norm and ε, and the results
of checks that expose gradient masking:

- ``monotone_eps``: robust accuracy does not rise with ε (beyond ``tol``);
- ``stronger_attack``: 4× the steps and one more restart do not raise it beyond ``tol``;
- ``large_eps``: at an ε that covers the whole input box it falls to ≤ 5%;
- ``apgd_not_weaker``: APGD / AutoAttack is not weaker than PGD at the same norm and ε;
- ``gradients``: input gradients of the loss are finite and non-zero;
- ``deterministic``: two forwards of the same batch agree, and an example's logits do not
  depend on the rest of its batch (a randomised or batch-dependent model defeats the attacks);
- ``square_not_stronger`` (with ``autoattack`` / ``autoattackl2``; AutoAttack's own flag): the
  black-box Square attack breaks no more than 0.2% of the examples that the white-box attacks
  left standing.

AutoAttack: ``autoattack`` / ``autoattackl2`` run the standard protocol of Croce & Hein (2020),
the one RobustBench reports (:class:`StandardAutoAttack`: APGD-CE 100 iterations, APGD-T over the
9 most likely other classes with 100 iterations each, FAB-T over 9 targets with 100 iterations,
Square with 5000 queries, each on the examples still standing); ``autoattack-fast`` /
``autoattackl2-fast`` are torchattacks' ``AutoAttack(version="standard")`` with its default
10 iterations, a cheaper and weaker variant. Every figure names its protocol
(:func:`protocol`) and its evaluation time.

A model that fails one is flagged (``result.flagged``): its figures may be an artefact of
masked gradients rather than robustness. ``tol`` is max(2/n, 1%) over the n examples a
check compares.

Determinism: the caller's RNG state is kept; each attack call on batch i is preceded by
``torch.manual_seed(seed + i)``, and APGD / AutoAttack get ``seed`` explicitly (torchattacks'
AutoAttack seeds itself from the clock otherwise).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import validate as check

NORMS = ("Linf", "L2")
# name: norm of the attack
ATTACKS = {"fgsm": "Linf", "pgd": "Linf", "pgdl2": "L2", "apgd": "Linf", "apgdl2": "L2",
           "autoattack": "Linf", "autoattackl2": "L2", "autoattack-fast": "Linf", "autoattackl2-fast": "L2"}
_ITERATIVE = ("pgd", "pgdl2", "apgd", "apgdl2")

__all__ = ["ATTACKS", "Check", "Entry", "RobustnessResult", "StandardAutoAttack", "build_attack", "evaluate",
           "protocol", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


class StandardAutoAttack:
    """The standard AutoAttack (Croce & Hein, 2020; RobustBench's protocol) from torchattacks'
    components: APGD-CE (100 iterations), APGD-T (100 iterations for each of the
    ``n_targets`` most likely other classes), FAB-T (likewise) and Square (5000 queries), one
    restart each, every component seeded with ``seed`` and run only on the examples that are
    still classified correctly. After a call, :attr:`broken_by` holds for each example the
    index in :attr:`COMPONENTS` of the attack that broke it (-1: still robust, -2: misclassified
    when clean)."""

    COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")

    def __init__(self, model: nn.Module, norm: str, eps: float, n_classes: int, *, seed: int = 0,
                 steps: int = 100, n_queries: int = 5000, n_targets: int = 9) -> None:
        import torchattacks

        check.choice("norm", norm, NORMS)
        self.model, self.norm, self.eps = model, norm, eps
        targets = min(n_targets, n_classes - 1)
        apgdt = torchattacks.APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed,
                                   n_classes=n_classes)
        fabt = torchattacks.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed,
                                multi_targeted=True, n_classes=n_classes)
        apgdt.n_target_classes = fabt.n_target_classes = targets  # the protocol: the top 9 targets
        self.attacks = [
            torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed),
            apgdt, fabt,
            torchattacks.Square(model, norm=norm, eps=eps, n_queries=n_queries, n_restarts=1, p_init=0.8,
                                loss="margin", resc_schedule=True, seed=seed),
        ]
        self.broken_by = torch.empty(0, dtype=torch.long)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            standing = self.model(x).argmax(1) == y
        broken_by = torch.where(standing, -1, -2)
        adv = x.clone()
        for i, atk in enumerate(self.attacks):
            idx = standing.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            a = atk(x[idx], y[idx])
            with torch.no_grad():
                wrong = self.model(a).argmax(1) != y[idx]
            adv[idx[wrong]] = a[wrong]
            standing[idx[wrong]] = False
            broken_by[idx[wrong]] = i
        self.broken_by = broken_by.cpu()
        return adv


_SQUARE = StandardAutoAttack.COMPONENTS.index("square")


def protocol(name: str, steps: int = 10, restarts: int = 1) -> str:
    """How attack ``name`` is run, in words (the label of its figures)."""
    check.choice("attack", name, tuple(ATTACKS))
    norm = ATTACKS[name]
    if name == "fgsm":
        return "FGSM (L∞, one step of ε)"
    if name in ("pgd", "pgdl2"):
        return f"PGD-{norm}, {steps} steps, α = 2.5ε/{steps}, random start"
    if name in ("apgd", "apgdl2"):
        return f"APGD-CE-{norm}, {steps} iterations, {restarts} restart{'s' if restarts > 1 else ''}"
    if name.endswith("-fast"):
        return (f"AutoAttack-fast {norm} (torchattacks' AutoAttack 'standard' at its default 10 iterations: "
                "APGD-CE, APGD-T, FAB-T; Square 5000 queries) — weaker than the standard protocol")
    return (f"AutoAttack standard {norm} (Croce & Hein 2020: APGD-CE 100 it., APGD-T 9 targets × 100 it., "
            "FAB-T 9 targets × 100 it., Square 5000 queries)")


def build_attack(name: str, model: nn.Module, eps: float, *, steps: int = 10, restarts: int = 1,
                 seed: int = 0, n_classes: int = 10) -> Any:
    """A torchattacks attack by our name (see :data:`ATTACKS`), with the step size
    α = 2.5·ε/steps for PGD (Madry et al.) and explicit seeds for APGD and AutoAttack
    (``steps`` and ``restarts`` do not apply to AutoAttack: its protocol fixes them)."""
    import torchattacks

    check.choice("attack", name, tuple(ATTACKS))
    check.number("eps", eps, 0)
    check.integer("steps", steps)
    check.integer("restarts", restarts)
    check.integer("n_classes", n_classes, 2)
    norm = ATTACKS[name]
    alpha = 2.5 * eps / steps
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=eps)
    if name == "pgd":
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    if name == "pgdl2":
        return torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    if name in ("apgd", "apgdl2"):
        return torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=restarts, seed=seed)
    if name.endswith("-fast"):
        return torchattacks.AutoAttack(model, norm=norm, eps=eps, version="standard", n_classes=n_classes,
                                       seed=seed)
    return StandardAutoAttack(model, norm, eps, n_classes, seed=seed)


@dataclass
class Entry:
    """Robust accuracy of one attack (or ``worst-case``) at one ε."""

    attack: str
    norm: str
    eps: float
    n: int
    robust_acc: float
    ci95: tuple[float, float]
    seconds: float
    protocol: str = ""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class RobustnessResult:
    model: str
    dataset: str
    n: int
    clean_acc: float
    clean_ci95: tuple[float, float]
    entries: list[Entry]
    worst_case: list[Entry]
    checks: list[Check]
    settings: dict[str, Any] = field(default_factory=dict)
    # per-example correctness: "clean" and "<attack>@<eps>" → bool tensor (n,)
    correct: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)  # legal but probably not meant (see validate)

    @property
    def flagged(self) -> bool:
        """True when an honesty check failed (possible gradient masking)."""
        return any(not c.passed for c in self.checks)

    def summary_rows(self) -> list[dict[str, Any]]:
        """RobustBench-style rows: model, dataset, norm, eps, attack, n_examples, clean_acc, robust_acc."""
        return [dict(model=self.model, dataset=self.dataset, norm=e.norm, eps=e.eps, attack=e.attack,
                     n_examples=e.n, clean_acc=self.clean_acc, robust_acc=e.robust_acc,
                     robust_acc_ci95=list(e.ci95), protocol=e.protocol, seconds=e.seconds)
                for e in self.entries + self.worst_case]

    def as_dict(self) -> dict[str, Any]:
        return dict(model=self.model, dataset=self.dataset, n_examples=self.n, clean_acc=self.clean_acc,
                    clean_acc_ci95=list(self.clean_ci95), rows=self.summary_rows(),
                    checks=[asdict(c) for c in self.checks], flagged=self.flagged, settings=self.settings,
                    warnings=self.warnings)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.as_dict(), **kwargs)

    def table(self) -> str:
        head = ("| model | dataset | norm | eps | attack | n | clean acc | robust acc (95% CI) | seconds |\n"
                + "|---" * 9 + "|")
        rows = [f"| {r['model']} | {r['dataset']} | {r['norm']} | {r['eps']:.4g} | {r['attack']} | "
                f"{r['n_examples']} | {100 * r['clean_acc']:.1f} | {100 * r['robust_acc']:.1f} "
                f"({100 * r['robust_acc_ci95'][0]:.1f}–{100 * r['robust_acc_ci95'][1]:.1f}) | "
                f"{r['seconds']:.1f} |"
                for r in self.summary_rows()]
        protocols = {e.attack: e.protocol for e in self.entries}
        return "\n".join([head, *rows, "", "protocols:", *[f"  {a}: {how}" for a, how in protocols.items()]])

    def __str__(self) -> str:
        lines = [self.table(), "", "honesty checks:"]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        if self.flagged:
            lines.append("FLAGGED: a check failed; the robust accuracy may reflect gradient masking")
        return "\n".join(lines)


class _EvalMode:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.training)


def _eps_plan(
    attacks: Sequence[str], eps: Mapping[str, Sequence[float]] | Sequence[float]
) -> dict[str, list]:
    for a in check.distinct("attacks", attacks):
        check.choice("attacks", a, tuple(ATTACKS))
    if isinstance(eps, Mapping):
        for norm in eps:
            if norm not in NORMS:
                raise ValueError(f"eps: keys must be norms {NORMS}, got {norm!r}")
        plan = {a: list(eps.get(ATTACKS[a], ())) for a in attacks}
        for a, values in plan.items():
            if not values:
                raise ValueError(f"eps: no ε given for the {ATTACKS[a]} norm of attack {a!r}")
    else:
        norms = {ATTACKS[a] for a in attacks}
        if len(norms) > 1:
            raise ValueError(f"eps: attacks of several norms {sorted(norms)}; give eps as {{norm: [ε, ...]}}")
        plan = {a: list(eps) for a in attacks}
    for a, values in plan.items():
        for e in check.distinct(f"eps ({ATTACKS[a]})", values):
            check.number(f"eps ({ATTACKS[a]})", e, 0)
    return plan


def _attack_correct(model: nn.Module, atk: Any, x: torch.Tensor, y: torch.Tensor, norm: str,
                    eps: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    adv = atk(x, y)
    if not bool(torch.isfinite(adv).all()):  # NaN would pass every comparison below
        raise RuntimeError(f"{type(atk).__name__} returned non-finite adversarial examples")
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    if (size > eps * (1 + 1e-4) + 1e-6).any() or adv.min() < 0 or adv.max() > 1:
        raise RuntimeError(f"{type(atk).__name__} left the {norm} ball of radius {eps} or the [0, 1] box "
                           f"(max size {float(size.max()):.4g})")
    with torch.no_grad():
        return model(adv).argmax(1) == y


def evaluate(
    model: nn.Module,
    loader: Iterable,
    attacks: Sequence[str] = ("pgd", "apgd"),
    eps: Mapping[str, Sequence[float]] | Sequence[float] = (2 / 255, 4 / 255, 8 / 255),
    *,
    steps: int = 10,
    restarts: int = 1,
    max_examples: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    checks: bool = True,
    check_examples: int = 256,
    progress: bool = True,
    model_name: str | None = None,
    dataset: str = "",
) -> RobustnessResult:
    """Clean and robust accuracy of ``model`` on ``loader`` ((x, y) batches, x in [0, 1]).

    Args:
        attacks: names from :data:`ATTACKS` (fgsm, pgd, pgdl2, apgd, apgdl2, autoattack,
            autoattackl2); each has a norm.
        eps: the ε sweep: a sequence (all attacks of one norm) or ``{"Linf": [...], "L2": [...]}``.
        steps, restarts: iterations of PGD / APGD and restarts of APGD.
        max_examples: evaluate at most this many examples. device: move batches (and the
            model) there. seed: see the module docstring.
        checks: run the honesty checks on ``check_examples`` examples drawn uniformly (seeded
            reservoir sampling) from those evaluated.
        model_name, dataset: labels for the summary.

    The model is evaluated in eval mode and its mode is restored afterwards.
    """
    check.module(model)
    plan = _eps_plan(attacks, eps)
    for name, value in (("steps", steps), ("restarts", restarts), ("check_examples", check_examples)):
        check.integer(name, value)
    check.integer("max_examples", max_examples, optional=True)
    check.integer("seed", seed, 0)
    with check.collect() as warned:
        result = _evaluate(model, loader, attacks, plan, steps, restarts, max_examples, device, seed, checks,
                           check_examples, progress, model_name, dataset)
    result.warnings = warned
    return result


def _evaluate(model, loader, attacks, plan, steps, restarts, max_examples, device, seed, checks,  # noqa: ANN001,ANN202
              check_examples, progress, model_name, dataset):
    from tqdm.auto import tqdm

    if device is not None:
        model = model.to(device)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    keys = [(a, e) for a in attacks for e in plan[a]]
    correct: dict[str, list[torch.Tensor]] = {"clean": []}
    correct.update({f"{a}@{e:g}": [] for a, e in keys})
    seconds = dict.fromkeys(keys, 0.0)
    square_breaks: dict[tuple[str, float], int] = {}  # per standard-AutoAttack run: what Square broke
    kept: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # a uniform sample of (x, y, index)
    reservoir = torch.Generator().manual_seed(seed)
    n_classes = seen = 0
    bar = tqdm(total=max_examples, disable=not progress, desc="robustness", unit="ex")
    with _EvalMode(model), torch.random.fork_rng(devices=devices):
        for i, batch in enumerate(loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"batch {i}: the loader must yield (inputs, labels)")
            x, y = batch[0], batch[1]
            if max_examples is not None:
                x, y = x[: max_examples - seen], y[: max_examples - seen]
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = check.check_batch(model, x, y, f"batch {i}")
            n_classes = logits.shape[1]
            y = y.long()
            clean = logits.argmax(1) == y
            correct["clean"].append(clean.cpu())
            for a, e in keys:
                atk = build_attack(a, model, e, steps=steps, restarts=restarts, seed=seed,
                                   n_classes=n_classes)
                t0 = time.perf_counter()
                ok = _attack_correct(model, atk, x, y, ATTACKS[a], e, seed + i)
                seconds[(a, e)] += time.perf_counter() - t0
                if isinstance(atk, StandardAutoAttack):
                    broke = int((atk.broken_by == _SQUARE).sum())
                    square_breaks[(a, e)] = square_breaks.get((a, e), 0) + broke
                correct[f"{a}@{e:g}"].append((ok & clean).cpu())
            for j in range(x.shape[0]):  # reservoir sampling: loaders are often sorted by class
                if seen + j < check_examples:
                    kept.append((x[j].detach(), y[j], seen + j))
                else:
                    r = int(torch.randint(0, seen + j + 1, (1,), generator=reservoir))
                    if r < check_examples:
                        kept[r] = (x[j].detach(), y[j], seen + j)
            seen += x.shape[0]
            bar.update(x.shape[0])
            if max_examples is not None and seen >= max_examples:
                break
        bar.close()
        if seen == 0:
            raise check.InputError("loader: yielded no examples")
        if seen < check.FEW_EXAMPLES:
            lo, hi = wilson_interval(seen // 2, seen)
            check.warn(f"robustness evaluated on {seen} examples only: a 95% interval at 50% spans "
                       f"{100 * (hi - lo):.0f} points")
        flat = {k: torch.cat(v) for k, v in correct.items()}
        entries = [_entry(a, ATTACKS[a], e, flat[f"{a}@{e:g}"], seconds[(a, e)], protocol(a, steps, restarts))
                   for a, e in keys]
        worst = []
        for norm in NORMS:
            for e in sorted({e for a, e in keys if ATTACKS[a] == norm}):
                names = [a for a, ee in keys if ATTACKS[a] == norm and ee == e]
                if len(names) > 1:
                    both = torch.stack([flat[f"{a}@{e:g}"] for a in names]).all(0)
                    worst.append(_entry("worst-case", norm, e, both, sum(seconds[(a, e)] for a in names),
                                        "per-example worst case of " + ", ".join(names)))
        check_list: list[Check] = []
        check_indices: list[int] = []
        if checks:
            xs, ys = torch.stack([k[0] for k in kept]), torch.stack([k[1] for k in kept])
            idx = torch.tensor([k[2] for k in kept])
            check_list = _honesty_checks(model, xs, ys, idx, entries, flat, plan, steps, restarts, seed,
                                         n_classes, square_breaks)
            check_indices = idx.tolist()
    clean_all = flat["clean"]
    k = int(clean_all.sum())
    settings = dict(attacks=list(attacks), eps={a: plan[a] for a in attacks}, steps=steps, restarts=restarts,
                    seed=seed, alpha="2.5*eps/steps", check_examples=check_examples,
                    check_indices=check_indices)
    return RobustnessResult(model_name or type(model).__name__, dataset, seen, k / seen,
                            wilson_interval(k, seen), entries, worst, check_list, settings, flat)


def _entry(attack: str, norm: str, eps: float, ok: torch.Tensor, seconds: float, how: str) -> Entry:
    n, k = len(ok), int(ok.sum())
    return Entry(attack, norm, float(eps), n, k / n, wilson_interval(k, n), seconds, how)


def _tol(n: int) -> float:
    return max(2.0 / n, 0.01)


def _honesty_checks(model, x, y, idx, entries, flat, plan, steps, restarts, seed, n_classes,  # noqa: ANN001
                    square_breaks) -> list[Check]:
    out = []
    n_all = len(flat["clean"])
    # 1. monotone in ε
    bad = []
    for a, values in plan.items():
        by_eps = {en.eps: en.robust_acc for en in entries if en.attack == a}
        accs = [(e, by_eps[e]) for e in sorted(values)]
        for (e0, a0), (e1, a1) in zip(accs, accs[1:]):
            if a1 > a0 + _tol(n_all):
                bad.append(f"{a}: {100 * a0:.1f}% at ε={e0:g} < {100 * a1:.1f}% at ε={e1:g}")
    out.append(Check("monotone_eps", not bad, "; ".join(bad) or "robust accuracy never rises with ε"))
    n = x.shape[0]
    clean = flat["clean"][idx].to(x.device)
    # 2. a stronger attack does not do worse
    iterative = [a for a in plan if a in _ITERATIVE]
    if iterative:
        a = iterative[0]
        e = sorted(plan[a])[len(plan[a]) // 2]
        base = float(flat[f"{a}@{e:g}"][idx].double().mean())
        ok = clean.clone()
        for r in range(restarts + 1):
            atk = build_attack(a, model, e, steps=4 * steps, restarts=restarts + 1, seed=seed + 1 + r,
                               n_classes=n_classes)
            ok &= _attack_correct(model, atk, x, y, ATTACKS[a], e, seed + 7919 * (r + 1))
            if a.startswith("apgd"):
                break  # APGD restarts internally
        strong = float(ok.double().mean())
        out.append(Check("stronger_attack", strong <= base + _tol(n),
                         f"{a} at ε={e:g} on {n} examples: {100 * base:.1f}% with {steps} steps, "
                         f"{100 * strong:.1f}% with {4 * steps} steps and {restarts + 1} restarts"))
    # 3. an ε that covers the input box drives robust accuracy to ~0
    norm = ATTACKS[next(iter(plan))]
    big = 1.0 if norm == "Linf" else math.sqrt(x[0].numel())
    pgd = "pgd" if norm == "Linf" else "pgdl2"
    atk = build_attack(pgd, model, big, steps=max(20, steps), n_classes=n_classes)
    acc = float((_attack_correct(model, atk, x, y, norm, big, seed) & clean).double().mean())
    out.append(Check("large_eps", acc <= 0.05,
                     f"{norm} PGD at ε={big:.4g} (the whole input box) leaves {100 * acc:.1f}% robust"))
    # 4. APGD / AutoAttack not weaker than PGD
    bad, compared = [], 0
    for strong_name in [a for a in ATTACKS if a.startswith(("apgd", "autoattack"))]:
        weak_name = "pgd" if ATTACKS[strong_name] == "Linf" else "pgdl2"
        for e in set(plan.get(strong_name, ())) & set(plan.get(weak_name, ())):
            compared += 1
            s = float(flat[f"{strong_name}@{e:g}"].double().mean())
            w = float(flat[f"{weak_name}@{e:g}"].double().mean())
            if s > w + _tol(n_all):
                bad.append(f"{strong_name} {100 * s:.1f}% > {weak_name} {100 * w:.1f}% at ε={e:g}")
    if compared:
        out.append(Check("apgd_not_weaker", not bad, "; ".join(bad) or f"{compared} comparisons"))
    # 5. input gradients finite and non-zero
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg, allow_unused=True)
    if g is None:
        out.append(Check("gradients", False, "the loss has no gradient with respect to the input"))
    else:
        norms = g.flatten(1).norm(dim=1)
        finite = bool(torch.isfinite(g).all())
        zero = int((norms == 0).sum())
        out.append(Check("gradients", finite and zero == 0,
                         f"{'finite' if finite else 'NOT finite'}; {zero} of {n} examples have a zero "
                         f"input gradient; median norm {float(norms.median()):.3g}"))
    # 6. a deterministic, per-example function (AutoAttack's randomised / dynamic-model flags)
    with torch.no_grad():
        first, again = model(x), model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(min(n, 8))])
    scale = float(first.abs().max()) + 1e-12
    drift = float((first - again).abs().max()) / scale
    batch_dep = float((first[: len(alone)] - alone).abs().max()) / scale
    out.append(Check("deterministic", drift <= 1e-4 and batch_dep <= 1e-4,
                     f"two forwards differ by {drift:.2g}, one example alone vs in its batch by "
                     f"{batch_dep:.2g} (relative to the largest logit; ≤ 1e-4 expected)"))
    # 7. AutoAttack's own flag: the black-box Square attack must not beat the white-box ones
    for (a, e), k in square_breaks.items():
        frac = k / n_all
        out.append(Check("square_not_stronger", frac <= 0.002,
                         f"{a} at ε={e:g}: Square broke {k} of {n_all} examples ({100 * frac:.1f}%) that "
                         "APGD-CE, APGD-T and FAB-T left standing (AutoAttack flags > 0.2%)"))
    return out
