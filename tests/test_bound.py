"""Data-free bounds hold: finite differences and Hessian-vector products never exceed them."""

import math

import pytest
import timm
import torch
from conftest import per_model
from timm.layers import StdConv2d
from torch import nn

import lcnn_plugin
from lcnn_plugin import UnboundedError, model_bound
from lcnn_plugin.layers import CenteredSoftplus, InputSpectralNorm, LipschitzBatchNorm2d, SNConv2d
from lcnn_plugin.layers.spectral import GRAM_LIMIT, gram_limit

MODELS = timm.list_models("lcnn_*")


def _randomise_statistics(model: nn.Module) -> None:
    """Move BN statistics, γ and β away from their init so that every constant matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            if isinstance(m, LipschitzBatchNorm2d):
                m.log_gamma.fill_(math.log(1.5))
            if isinstance(m, CenteredSoftplus):
                m.log_beta.fill_(math.log(2.0))


@pytest.mark.parametrize("name", per_model(MODELS))
def test_bounds_hold_on_registered_models(name):
    model = timm.create_model(name, num_classes=4).double()
    _randomise_statistics(model)
    model.eval()
    size = (3, 8, 8)
    b = model_bound(model, size, strict=True)
    assert b.ok and b.lipschitz > 0 and b.curvature >= 0 and b.normalized_curvature > 0
    f = model
    worst_l, worst_k = 0.0, 0.0
    for _ in range(3):
        x = torch.rand(2, *size, dtype=torch.float64)
        u = torch.randn_like(x)
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        h = 1e-4
        # finite-difference gradient norm along u, per example (logits vector)
        fd = (f(x + h * u) - f(x - h * u)) / (2 * h)
        worst_l = max(worst_l, fd.norm(dim=1).max().item())
        # second directional derivative D²f[u,u] by forward-over-forward AD
        _, d2 = torch.func.jvp(lambda t, u=u: torch.func.jvp(f, (t,), (u,))[1], (x,), (u,))
        worst_k = max(worst_k, d2.norm(dim=1).max().item())
        # Hessian-vector product of a random unit combination of the logits
        c = torch.randn(4, dtype=torch.float64)
        c = c / c.norm()
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((f(xg) @ c).sum(), xg, create_graph=True)
        (hv,) = torch.autograd.grad((g * u).sum(), xg)
        worst_k = max(worst_k, hv.flatten(1).norm(dim=1).max().item())
    assert worst_l <= b.lipschitz * (1 + 1e-6), (worst_l, b.lipschitz)
    assert worst_k <= b.curvature * (1 + 1e-6), (worst_k, b.curvature)


def test_rules_are_tight_on_scalar_chains():
    """f(x) = s0(a·x): L = |a|, K = β a²/4, both attained at x = 0; a residual adds."""
    beta, a = 3.0, -1.7
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(a)
    act = CenteredSoftplus(beta)
    chain = nn.Sequential(nn.Flatten(), lin, act)
    b = model_bound(chain, (1,))
    beta_used = act.beta.item()
    assert abs(b.lipschitz - abs(a)) < 1e-6
    assert abs(b.curvature - beta_used * a * a / 4) < 1e-5
    assert abs(b.normalized_curvature - beta_used * abs(a)) < 1e-5

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = CenteredSoftplus(beta)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * (x + self.act(x))

    b = model_bound(Residual(), (1,))
    assert abs(b.lipschitz - 1.0) < 1e-6  # ½(1 + 1)
    assert abs(b.curvature - beta_used / 8) < 1e-5  # ½·β/4


def test_pooling_constants_are_exact():
    for pool in (nn.AvgPool2d(3, 2, 1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d((2, 3)),
                 nn.AvgPool2d(3, 2, 1, count_include_pad=False)):
        b = model_bound(pool, (1, 7, 9))
        x = torch.zeros(1, 1, 7, 9, dtype=torch.float64)
        jac = torch.func.jacrev(pool)(x).reshape(-1, x.numel())
        exact = torch.linalg.matrix_norm(jac, ord=2).item()
        assert abs(b.lipschitz - exact) < 1e-9, pool


def test_unbounded_parts_are_named():
    model = nn.Sequential(SNConv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(4 * 6 * 6))
    b = model_bound(model, (3, 8, 8))
    assert not b.ok and b.curvature is None and b.lipschitz is None
    where = dict(b.unbounded)
    assert "curvature unbounded" in where["1"]
    assert "LayerNorm" in where["3"]
    assert "no bound is known for LayerNorm (1): 3" in str(b)
    with pytest.raises(UnboundedError, match="LayerNorm"):
        model_bound(model, (3, 8, 8), strict=True)
    relu_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    b = model_bound(relu_only, (3, 8, 8))
    assert b.lipschitz is not None and b.curvature is None


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        model_bound(lambda x: x, (3, 8, 8))
    with pytest.raises(ValueError, match="input_size"):
        model_bound(nn.Sequential(nn.Conv2d(3, 3, 3)))


def test_training_mode_is_restored():
    model = timm.create_model("lcnn_resnet18_cifar", num_classes=3)
    model.train()
    lcnn_plugin.model_bound(model, (3, 8, 8))
    assert model.training


def _jacobian_norm(f, shape) -> float:
    x = torch.zeros(1, *shape, dtype=torch.float64)
    jac = torch.func.jacrev(f)(x).reshape(-1, x.numel())
    return torch.linalg.matrix_norm(jac, ord=2).item()


def test_bounds_are_certified_and_say_what_is_not():
    """Above DENSE_LIMIT inputs a convolution's constant is the symbol's certified bound (above
    the exact norm, the SVD of its Jacobian); a loose one is named; an input-normalised affine
    layer of unknown structure contributes its estimate and the bound says NOT certified."""
    torch.manual_seed(0)
    conv = nn.Conv2d(9, 5, 3, padding=1).double()
    b = model_bound(nn.Sequential(conv), (9, 16, 16))
    exact = _jacobian_norm(lambda t: conv._conv_forward(t, conv.weight, None), (9, 16, 16))
    (entry,) = b.layers
    assert b.certified and entry.norm.method == "torus" and "certified" in str(b)
    assert entry.norm.lower <= exact <= entry.norm.upper == b.lipschitz
    small = nn.Conv2d(64, 64, 3, padding=1).double()  # 6×6: the torus is 7×7, the bound loose
    exact = _jacobian_norm(lambda t: small._conv_forward(t, small.weight, None), (64, 6, 6))
    b = model_bound(nn.Sequential(small), (64, 6, 6))  # 2304 Gram rows (> GRAM_LIMIT): loose
    assert b.certified and b.loose and b.loose[0][0] == "0" and "loose" in str(b)
    assert exact <= b.lipschitz
    assert GRAM_LIMIT < 2304
    with gram_limit(2304):  # the Gram route: exact
        b = model_bound(nn.Sequential(small), (64, 6, 6))
    assert b.certified and not b.loose and b.layers[0].norm.method == "gram"
    assert exact <= b.lipschitz <= exact * (1 + 1e-6)
    std = StdConv2d(3, 4, 3, padding=1).double()
    InputSpectralNorm.apply(std)
    big = model_bound(nn.Sequential(std), (3, 32, 32))  # 3072 inputs
    assert not big.certified and big.estimated == ["0"]
    assert "NOT certified" in str(big) and "only estimated" in str(big)
    fits = model_bound(nn.Sequential(std), (3, 16, 16))  # 768 inputs: the dense SVD
    assert fits.certified and fits.layers[0].norm.method == "dense"


def test_tight_bounds_every_loose_convolution_exactly():
    """A 64-channel 3×3 convolution on 6×6 inputs has 2304 Gram rows (> GRAM_LIMIT): by default
    its symbol's bound is certified but loose and named; tight=True bounds it from its Gram
    matrix, within 1e-6 of the Lanczos lower bound, and L_f and K_f can only come down."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Softplus(), nn.Conv2d(64, 64, 3, padding=1),
                          nn.Flatten(), nn.Linear(64 * 36, 10)).double().eval()
    default = model_bound(model, (3, 6, 6))
    assert default.certified and [n for n, _ in default.loose] == ["2"] and "tight=True" in str(default)
    tight = model_bound(model, (3, 6, 6), tight=True)
    entry = next(e for e in tight.layers if e.name == "2")
    assert tight.certified and not tight.loose and entry.norm.method == "gram"
    assert entry.norm.lower <= entry.norm.upper <= entry.norm.lower * (1 + 1e-6)
    assert tight.lipschitz <= default.lipschitz and tight.curvature <= default.curvature
