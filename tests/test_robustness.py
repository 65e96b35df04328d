"""Robustness evaluation against plain torchattacks loops, closed forms and masked models."""

import math

import pytest
import torch
import torchattacks
from torch import nn

from lcnn_plugin.robustness import evaluate, wilson_interval

N_CLASSES = 4


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(N_CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    x = (protos[y] + 0.1 * torch.randn(n, 3, 8, 8, generator=gen)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, N_CLASSES))
    x, y = _data(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(150):
        idx = torch.arange(i * 64, (i + 1) * 64) % 512
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def _loader(n: int = 40, batch: int = 16) -> list:
    x, y = _data(n, 1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]  # 16, 16, 8


def test_wilson_interval_closed_form():
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.40383) < 1e-4 and abs(hi - 0.59617) < 1e-4
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 3.8415 / 13.8415) < 1e-4  # z²/(n+z²) at k = 0


def test_pgd_equals_a_plain_torchattacks_loop(trained):
    eps = [4 / 255, 32 / 255]
    res = evaluate(trained, _loader(), ["pgd"], eps, steps=5, seed=3, checks=False, progress=False)
    for e in eps:
        hits = clean_hits = 0
        for i, (x, y) in enumerate(_loader()):
            torch.manual_seed(3 + i)
            adv = torchattacks.PGD(trained, eps=e, alpha=2.5 * e / 5, steps=5, random_start=True)(x, y)
            with torch.no_grad():
                clean = trained(x).argmax(1) == y
                hits += int(((trained(adv).argmax(1) == y) & clean).sum())
            clean_hits += int(clean.sum())
        entry = next(en for en in res.entries if en.eps == e)
        assert entry.n == 40 and entry.robust_acc == hits / 40
        assert res.clean_acc == clean_hits / 40
    assert res.entries[0].robust_acc >= res.entries[1].robust_acc


def test_honesty_checks_quiet_on_a_normal_model(trained):
    trained.train()
    rng = torch.get_rng_state()
    res = evaluate(trained, _loader(), ["pgd", "apgd"], [8 / 255, 32 / 255, 64 / 255], steps=10,
                   progress=False, model_name="tiny", dataset="blobs")
    assert trained.training  # mode restored
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert res.clean_acc >= 0.9
    assert not res.flagged, str(res)
    names = {c.name for c in res.checks}
    assert names == {"monotone_eps", "stronger_attack", "large_eps", "apgd_not_weaker", "gradients",
                     "deterministic"}
    for w in res.worst_case:  # worst case = an example survives every attack
        ok = torch.stack([res.correct[f"{a}@{w.eps:g}"] for a in ("pgd", "apgd")]).all(0)
        assert w.robust_acc == ok.double().mean().item()
        assert w.robust_acc <= min(e.robust_acc for e in res.entries if e.eps == w.eps)
    rows = res.summary_rows()
    keys = {"model", "dataset", "norm", "eps", "attack", "n_examples", "clean_acc", "robust_acc"}
    assert keys <= set(rows[0])
    assert '"flagged": false' in res.to_json() and "| tiny | blobs | Linf |" in res.table()


class Quantised(nn.Module):
    """A gradient-masking input layer: rounding has zero gradient everywhere."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


def test_honesty_checks_fire_on_a_masked_model(trained):
    res = evaluate(Quantised(trained), _loader(), ["pgd"], [8 / 255, 32 / 255], progress=False)
    failed = {c.name for c in res.checks if not c.passed}
    assert res.flagged and {"gradients", "large_eps"} <= failed, str(res)
    assert "FLAGGED" in str(res)


def test_checks_sample_examples_across_a_sorted_loader(trained):
    """Loaders sorted by class must not give the checks one class: the stronger-attack check
    compares on a uniform sample, so its baseline equals that sample's own accuracy."""
    x, y = _data(64, 2)
    order = torch.argsort(y, stable=True)
    loader = [(x[order][i : i + 16], y[order][i : i + 16]) for i in range(0, 64, 16)]
    res = evaluate(trained, loader, ["pgd"], [32 / 255], check_examples=16, progress=False)
    idx = res.settings["check_indices"]
    assert len(idx) == len(set(idx)) == 16 and max(idx) >= 48  # drawn from the whole loader
    assert len(set(y[order][:16].tolist())) <= 2 < len(set(y[order][idx].tolist()))
    detail = next(c.detail for c in res.checks if c.name == "stronger_attack")
    assert "on 16 examples" in detail


class Noisy(nn.Module):
    """A randomised model: fresh input noise on every forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.05 * torch.randn_like(x))


class BatchCentred(nn.Module):
    """A batch-dependent model: logits centred on the batch mean (like BatchNorm in training)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x - x.mean(0, keepdim=True) + 0.5)


@pytest.mark.parametrize("wrapper", [Noisy, BatchCentred])
def test_deterministic_check_fires_on_randomised_and_batch_dependent_models(trained, wrapper):
    res = evaluate(wrapper(trained), _loader(16, 16), ["pgd"], [8 / 255], progress=False)
    assert not next(c for c in res.checks if c.name == "deterministic").passed, str(res)
    res = evaluate(trained, _loader(16, 16), ["pgd"], [8 / 255], progress=False)
    assert next(c for c in res.checks if c.name == "deterministic").passed, str(res)


def _model_of(n_classes: int) -> nn.Module:
    torch.manual_seed(1)
    protos = torch.rand(n_classes, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    y = torch.arange(128) % n_classes
    x = (protos[y] + 0.15 * torch.randn(128, 3, 8, 8)).clamp(0, 1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 16, n_classes))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:24], y[:24]


@pytest.mark.parametrize("norm,eps", [("Linf", 0.09), ("L2", 1.0)])
def test_standard_autoattack_equals_torchattacks_components_with_the_protocol_settings(norm, eps):
    """12 classes: APGD-T and FAB-T must take the 9 most likely other classes, as torchattacks'
    components built for 10 classes do; the result is compared per example."""
    model, x, y = _model_of(12)
    name = "autoattack" if norm == "Linf" else "autoattackl2"
    res = evaluate(model, [(x, y)], [name], {norm: [eps]}, seed=4, checks=False, progress=False)
    direct = torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=norm, eps=eps, steps=100, n_restarts=1, loss="ce", seed=4),
        torchattacks.APGDT(model, norm=norm, eps=eps, steps=100, n_restarts=1, n_classes=10, seed=4),
        torchattacks.FAB(model, norm=norm, eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                         n_classes=10, seed=4),
        torchattacks.Square(model, norm=norm, eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, seed=4),
    ])
    torch.manual_seed(4)
    adv = direct(x, y)
    with torch.no_grad():
        ok = (model(adv).argmax(1) == y) & (model(x).argmax(1) == y)
    got = res.correct[f"{name}@{eps:g}"]
    assert torch.equal(got, ok), (got, ok)
    assert 0 < int(ok.sum()) < int((model(x).argmax(1) == y).sum())  # the attack matters here
    assert "APGD-T 9 targets × 100 it." in res.entries[0].protocol and res.entries[0].seconds > 0


def test_square_flag_fires_when_only_the_black_box_attack_succeeds(trained):
    """Rounded inputs mask the gradients: the white-box attacks fail, Square does not."""
    x, y = _data(16, 1)
    res = evaluate(Quantised(trained), [(x, y)], ["autoattack"], [0.3], progress=False)
    flag = next(c for c in res.checks if c.name == "square_not_stronger")
    assert not flag.passed and "Square broke" in flag.detail, str(res)


def test_fast_autoattack_is_torchattacks_default_and_named_so(trained):
    res = evaluate(trained, _loader(16, 16), ["autoattack-fast"], [8 / 255], seed=2, checks=False,
                   progress=False)
    torch.manual_seed(2)
    x, y = _loader(16, 16)[0]
    adv = torchattacks.AutoAttack(trained, norm="Linf", eps=8 / 255, version="standard", n_classes=N_CLASSES,
                                  seed=2)(x, y)
    with torch.no_grad():
        ok = (trained(adv).argmax(1) == y) & (trained(x).argmax(1) == y)
    assert torch.equal(res.correct["autoattack-fast@0.0313725"], ok)
    assert "weaker than the standard protocol" in res.entries[0].protocol


def test_autoattack_is_reproducible(trained):
    loader = _loader(12, 12)
    a = evaluate(trained, loader, ["autoattack"], [16 / 255], checks=False, progress=False, seed=5)
    b = evaluate(trained, loader, ["autoattack"], [16 / 255], checks=False, progress=False, seed=5)
    assert torch.equal(a.correct["autoattack@0.0627451"], b.correct["autoattack@0.0627451"])
    assert a.entries[0].robust_acc == b.entries[0].robust_acc


def test_l2_attacks_and_mixed_norms(trained):
    res = evaluate(trained, _loader(16, 16), ["pgd", "pgdl2"], {"Linf": [8 / 255], "L2": [0.5]},
                   checks=False, progress=False)
    got = [(e.attack, e.norm, e.eps) for e in res.entries]
    assert got == [("pgd", "Linf", 8 / 255), ("pgdl2", "L2", 0.5)]
    assert res.worst_case == []  # one attack per norm: no worst case to take


def test_bad_input(trained):
    loader = _loader(8, 8)
    with pytest.raises(ValueError, match="eps .*expected a finite number >= 0"):
        evaluate(trained, loader, ["pgd"], [-0.1], progress=False)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        evaluate(trained, [(loader[0][0] * 2 + 0.5, loader[0][1])], ["pgd"], [0.1], progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        evaluate(trained, [(loader[0][0], loader[0][1] + 10)], ["pgd"], [0.1], progress=False)
    with pytest.raises(ValueError, match="returns probabilities"):
        evaluate(nn.Sequential(trained, nn.Softmax(1)), loader, ["pgd"], [0.1], progress=False)
    with pytest.raises(ValueError, match=r"logits of shape \(B=8, C\)"):
        evaluate(nn.Sequential(trained, nn.Unflatten(1, (2, 2))), loader, ["pgd"], [0.1], progress=False)
    with pytest.raises(ValueError, match="attacks: expected one of .*got 'cw'"):
        evaluate(trained, loader, ["cw"], [0.1], progress=False)
    with pytest.raises(ValueError, match="several norms"):
        evaluate(trained, loader, ["pgd", "pgdl2"], [0.1], progress=False)
    with pytest.raises(ValueError, match="no ε given for the L2 norm"):
        evaluate(trained, loader, ["pgdl2"], {"Linf": [0.1]}, progress=False)
    with pytest.raises(ValueError, match="yielded no examples"):
        evaluate(trained, [], ["pgd"], [0.1], progress=False)
    assert math.isfinite(evaluate(trained, loader, ["fgsm"], [0.0], checks=False, progress=False).clean_acc)
