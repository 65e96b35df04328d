"""The fused Triton centered softplus against closed forms (σ, βσ(1−σ), torch's softplus)."""

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from lcnn_plugin.kernels import fused_centered_softplus, triton_available, use_fused_softplus
from lcnn_plugin.layers import CenteredSoftplus

DEVICE = "cuda" if triton_available("cuda") else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton is not installed, or there is no CUDA and TRITON_INTERPRET is not 1",
)


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(1000, dtype=torch.float64) * 3
    x[:6] = torch.tensor([0.0, 1e-9, -1e-9, 1e-4, 40.0, -40.0])
    return x.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("beta", [0.3, 5.0, 1000.0])
def test_value_and_two_derivatives(dtype, rtol, beta):
    x = _inputs(dtype).requires_grad_(True)
    y = fused_centered_softplus(x, beta)
    xd = x.detach().double()
    z = beta * xd
    mpmath.mp.dps = 40
    value = torch.tensor([float((mpmath.log1p(mpmath.exp(mpmath.mpf(zi))) - mpmath.log(2)) / beta)
                          for zi in z.tolist()], dtype=torch.float64, device=x.device)
    s = torch.sigmoid(z)
    v = torch.randn_like(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad(g, x, v)
    atol = rtol * 1e-3
    torch.testing.assert_close(y.double(), value, rtol=rtol * 10, atol=0)
    torch.testing.assert_close(g.double(), s, rtol=rtol, atol=atol)
    torch.testing.assert_close(hv.double(), v.double() * beta * s * (1 - s), rtol=rtol * 10, atol=atol * beta)


def test_half_precision_and_shapes():
    x = torch.randn(2, 3, 5, 7, device=DEVICE).half()
    y = fused_centered_softplus(x, 5.0)
    assert y.dtype == torch.float16 and y.shape == x.shape
    ref = (F.softplus(5.0 * x.float()) - math.log(2)) / 5.0
    torch.testing.assert_close(y.float(), ref, rtol=1e-3, atol=1e-3)
    empty = fused_centered_softplus(torch.empty(0, device=DEVICE), 5.0)
    assert empty.shape == (0,)


def test_module_switch_and_learnable_beta_guard():
    act = CenteredSoftplus(beta=4.0).to(DEVICE)
    x = torch.randn(64, device=DEVICE)
    with use_fused_softplus(act) as n:
        assert n == 1 and act.fused
        with pytest.raises(ValueError, match="β requires grad"):
            act(x)
        with torch.no_grad():
            torch.testing.assert_close(act(x), CenteredSoftplus(beta=4.0).to(DEVICE)(x), rtol=1e-6, atol=1e-7)
    assert not act.fused
    with pytest.raises(ValueError, match="beta must be > 0"):
        fused_centered_softplus(x, 0.0)
