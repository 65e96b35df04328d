"""CenteredSoftplus against closed forms and a 50-digit reference."""

import math

import mpmath
import pytest
import torch

from lcnn_plugin.layers import CenteredSoftplus, centered_softplus

mpmath.mp.dps = 50


def _ref(x: float, beta: float) -> float:
    """(softplus(βx) − log 2)/β at 50 digits."""
    z = mpmath.mpf(x) * mpmath.mpf(beta)
    return float((mpmath.log1p(mpmath.exp(z)) - mpmath.log(2)) / mpmath.mpf(beta))


def _derivs(x: torch.Tensor, beta: float):
    x = x.clone().requires_grad_(True)
    y = centered_softplus(x, beta)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    return y.detach(), d1.detach(), d2


@pytest.mark.parametrize("beta", [1e-3, 0.5, 5.0, 1000.0])
def test_value_matches_high_precision_reference(beta):
    xs = [0.0, 1e-12, -1e-9, 3e-7, -0.25, 1.0, -7.5, 40.0 / beta, -40.0 / beta, 1e4 / beta]
    x = torch.tensor(xs, dtype=torch.float64)
    got = centered_softplus(x, beta)
    ref = torch.tensor([_ref(v, beta) for v in xs], dtype=torch.float64)
    assert got[0] == 0.0
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-300)


def test_float32_is_accurate_near_zero():
    """No cancellation against log 2: relative accuracy holds for tiny inputs."""
    xs = [1e-8, -3e-6, 2e-4]
    got = centered_softplus(torch.tensor(xs), 5.0)
    for g, x in zip(got.tolist(), xs):
        assert abs(g - _ref(x, 5.0)) <= 1e-6 * abs(_ref(x, 5.0))


@pytest.mark.parametrize("beta", [0.1, 5.0, 60.0])
def test_derivatives_are_the_closed_forms(beta):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    x = torch.cat([x, torch.zeros(1, dtype=torch.float64)])
    _, d1, d2 = _derivs(x, beta)
    s = torch.sigmoid(beta * x)
    torch.testing.assert_close(d1, s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d2, beta * s * (1 - s), rtol=1e-10, atol=1e-14)
    inner = (beta * x).abs() < 30
    assert ((d1[inner] > 0) & (d1[inner] < 1)).all()
    assert abs(d2.max().item() - beta / 4) < 1e-12 * beta  # attained at x = 0
    assert d1[-1].item() == 0.5 and abs(d2[-1].item() - beta / 4) < 1e-12 * beta
    assert (d2.abs() <= beta * d1.abs() + 1e-12).all()  # |s''|/|s'| <= β


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", [1e-3, 5.0, 1e3, 1e4])
def test_finite_at_extremes(dtype, beta):
    z = torch.tensor([-1e4, -1e3, -50.0, -1.0, 0.0, 1.0, 50.0, 1e3, 1e4], dtype=torch.float64)
    x = (z / beta).to(dtype)
    x = x[torch.isfinite(x)]  # |βx| up to 1e4 where x itself is representable in dtype
    y, d1, d2 = _derivs(x, beta)
    for t in (y, d1, d2):
        assert torch.isfinite(t).all(), (dtype, beta, t)
    assert y.dtype == dtype
    # values agree with the float64 reference to the dtype's precision
    ref = torch.tensor([_ref(float(v), beta) for v in x.double()], dtype=torch.float64)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((y.double() - ref).abs() <= tol * (ref.abs() + 1.0 / beta)).all()


def test_small_beta_tends_to_half_identity():
    x = torch.linspace(-2, 2, 11, dtype=torch.float64)
    torch.testing.assert_close(centered_softplus(x, 1e-8), x / 2, rtol=0, atol=1e-8)


def test_module_learnable_beta_and_bounds():
    act = CenteredSoftplus(beta=5.0, inplace=True)
    assert abs(act.beta.item() - 5.0) < 1e-6
    x = torch.randn(4, 3)
    act(x).sum().backward()
    assert act.log_beta.grad is not None and torch.isfinite(act.log_beta.grad)
    assert act.lipschitz() == 1.0
    assert abs(act.curvature_bound() - 5.0 / 4) < 1e-6
    fixed = CenteredSoftplus(beta=3.0, learnable=False)
    assert "log_beta" not in dict(fixed.named_parameters())
    assert "log_beta" in fixed.state_dict()


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        CenteredSoftplus(beta=beta)


def test_reference_is_what_the_paper_defines():
    """Independent of our formula: torch's softplus − log 2, over β, where it is accurate."""
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)
    beta = 3.0
    expect = (torch.nn.functional.softplus(beta * x) - math.log(2)) / beta
    torch.testing.assert_close(centered_softplus(x, beta), expect, rtol=1e-9, atol=1e-12)
