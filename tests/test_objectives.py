"""Objectives against finite differences and closed forms (float64, tiny models)."""

import math

import pytest
import torch
import torchattacks
from torch import nn

from lcnn_plugin.layers import CenteredSoftplus, LipschitzBatchNorm2d, SNConv2d
from lcnn_plugin.objectives import make_objective, param_groups


def tiny_smooth() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(beta=3), nn.Flatten(), nn.Linear(64, 5)]
    return nn.Sequential(*layers).double()


def tiny_lcnn() -> nn.Module:
    torch.manual_seed(0)
    layers = [SNConv2d(3, 4, 3, padding=1), LipschitzBatchNorm2d(4), CenteredSoftplus(),
              SNConv2d(4, 4, 3, padding=1), LipschitzBatchNorm2d(4, gamma=2.0), CenteredSoftplus(beta=3.0),
              nn.Flatten(), nn.Linear(64, 5)]
    return nn.Sequential(*layers).double().eval()


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 4, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 3, 4])


def fd_input_grad(model, x, y, h=1e-6):
    """∇ₓ CE_mean by central differences, coordinate by coordinate."""
    g = torch.zeros_like(x)
    flat = g.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        with torch.no_grad():
            lp = nn.functional.cross_entropy(model(x + e), y)
            lm = nn.functional.cross_entropy(model(x - e), y)
        flat[i] = (lp - lm) / (2 * h)
    return g


def check_param_gradient(model, objective, x, y, h=1e-6):
    """⟨∇θ L, u⟩ from autograd against a central difference of L along a random u."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    u = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(objective(model, x, y).loss, params)
    analytic = sum((g * d).sum() for g, d in zip(grads, u))
    with torch.no_grad():
        for p, d in zip(params, u):
            p.add_(h * d)
        lp = objective(model, x, y).loss.detach()
        for p, d in zip(params, u):
            p.sub_(2 * h * d)
        lm = objective(model, x, y).loss.detach()
        for p, d in zip(params, u):
            p.add_(h * d)
    numeric = (lp - lm) / (2 * h)
    assert abs(float(analytic - numeric)) <= 1e-5 * max(1.0, abs(float(numeric))), (analytic, numeric)


def test_gradreg_penalty_and_gradient():
    model = tiny_smooth()
    x, y = _batch()
    obj = make_objective("gradreg")
    out = obj(model, x, y)
    g = fd_input_grad(model, x, y)
    expected = 1e-3 * 1e5 * g.pow(2).sum().item() / 3
    assert out.terms["gradreg"] == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(out.terms["ce"] + expected, rel=1e-6)
    check_param_gradient(model, obj, x, y)


def test_cure_penalty_and_gradient():
    model = tiny_smooth()
    x, y = _batch()
    obj = make_objective("cure")
    g = fd_input_grad(model, x, y)
    s = torch.sign(g).flatten(1)
    z = (s / s.norm(dim=1, keepdim=True)).view_as(x)
    gh = fd_input_grad(model, x + z, y)
    expected = 1e-3 * 1e3 * (gh - g).pow(2).sum().item() / 3
    assert obj(model, x, y).terms["cure"] == pytest.approx(expected, rel=1e-5)
    check_param_gradient(model, obj, x, y)


def test_lcnn_penalties_closed_form_and_gradient():
    model = tiny_lcnn()
    x, y = _batch()
    obj = make_objective("lcnn+gradreg", lambda_beta=0.01, lambda_gamma=0.02)
    out = obj(model, x, y)
    assert out.terms["beta"] == pytest.approx(0.01 * (5.0 + 3.0), rel=1e-7)  # β stored in float32 at init
    assert out.terms["gamma"] == pytest.approx(0.02 * (math.log(10.0) + math.log(2.0)), rel=1e-7)
    assert set(out.terms) == {"ce", "gradreg", "beta", "gamma"}
    check_param_gradient(model, obj, x, y)


@pytest.mark.parametrize("name", ["cure", "adversarial"])
def test_several_training_forwards_per_step(name):
    """CURE and adversarial training run the model more than once per step in train mode,
    where spectral norms and BatchNorm update their state in place."""
    model = tiny_lcnn().train()
    x, y = _batch()
    out = make_objective(name)(model, x, y)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_adversarial_uses_torchattacks_pgdl2():
    model = tiny_smooth()
    x, y = _batch()
    obj = make_objective("adversarial")
    torch.manual_seed(9)
    out = obj(model, x, y)
    torch.manual_seed(9)
    adv = torchattacks.PGDL2(model, eps=0.1, alpha=0.01, steps=3, random_start=True)(x, y)
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.1 + 1e-9
    expected = nn.functional.cross_entropy(model(adv), y)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    pred = make_objective("adversarial", use_predicted=True)
    assert pred.use_predicted and pred.adv_eps == 0.1 and pred.adv_steps == 3


def test_beta_and_gamma_are_not_decayed():
    model = tiny_lcnn().train()
    opt = torch.optim.SGD(param_groups(model, 0.5), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n.endswith(("log_beta", "log_gamma")):
            assert torch.equal(p, before[n]), n
        elif p.abs().sum() > 0:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))


def test_bad_settings():
    with pytest.raises(ValueError, match="objective: expected one of"):
        make_objective("trades")
    with pytest.raises(ValueError, match="lambda_grad must be a finite number >= 0"):
        make_objective("gradreg", lambda_grad=-1.0)
    with pytest.raises(ValueError, match="unknown settings"):
        make_objective("lcnn", lambda_delta=1.0)


@pytest.mark.parametrize("name", ["gradreg", "cure"])
def test_penalties_on_models_without_double_backward(name):
    """hardsigmoid and fused attention: the training steps run within equivalents that have a
    second derivative (chosen by one probe), and the parameter gradient matches finite
    differences; an operation with none is named before training."""
    from test_curvature import GatedAttention

    torch.manual_seed(0)
    model = GatedAttention().double()
    x, y = _batch()
    obj = make_objective(name)
    with pytest.raises(RuntimeError, match="derivative for"):
        obj(model, x, y).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train()
    mode = obj.second_derivative_mode(model, x[:2], y[:2])
    assert model.training and all(p.grad is None for p in model.parameters())
    with mode():
        check_param_gradient(model, obj, x, y)
    with pytest.raises(ValueError, match=f"the {name} objective differentiates the model twice"):
        obj.second_derivative_mode(GatedAttention(raw_aten=True).double(), x, y)
