"""γ-Lipschitz BatchNorm: the measured Lipschitz constant never exceeds the reported one."""

import pytest
import torch

from lcnn_plugin.layers import LipschitzBatchNorm2d


def _randomised(affine: bool, gamma: float) -> LipschitzBatchNorm2d:
    bn = LipschitzBatchNorm2d(6, gamma=gamma, affine=affine).double()
    with torch.no_grad():
        bn.running_var.uniform_(0.01, 4.0)
        bn.running_mean.normal_()
        if affine:
            bn.weight.normal_(0, 2)
            bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("gamma", [0.3, 1.0, 10.0, 1e3])
def test_measured_lipschitz_never_exceeds_reported(affine, gamma):
    bn = _randomised(affine, gamma)
    inv_std = 1 / torch.sqrt(bn.running_var + bn.eps)
    scale = inv_std * (bn.weight.abs() if affine else 1)
    closed = min(bn.gamma.item(), scale.max().item())  # γ as stored (log γ in float32)
    assert abs(bn.lipschitz() - closed) <= 1e-12 * closed
    x = torch.randn(64, 6, 5, 5, dtype=torch.float64)
    worst = 0.0
    for _ in range(20):
        dx = torch.randn_like(x) * 1e-3
        ratio = ((bn(x + dx) - bn(x)).flatten(1).norm(dim=1) / dx.flatten(1).norm(dim=1)).max()
        worst = max(worst, ratio.item())
    # the worst direction (all of it on the largest channel) attains the constant
    dx = torch.zeros_like(x)
    dx[:, int(scale.argmax())] = 1.0
    attained = ((bn(x + dx) - bn(x)).norm() / dx.norm()).item()
    assert worst <= bn.lipschitz() * (1 + 1e-9)
    assert abs(attained - bn.lipschitz()) <= 1e-9 * bn.lipschitz()


def test_paper_rule_for_affine_free():
    """Reference rule: y = BN(x)·min(1, γ·min_c sqrt(var_c + eps))."""
    bn = _randomised(False, 2.0)
    x = torch.randn(8, 6, 4, 4, dtype=torch.float64)
    sd = torch.sqrt(bn.running_var + bn.eps)
    plain = (x - bn.running_mean.view(1, -1, 1, 1)) / sd.view(1, -1, 1, 1)
    expect = plain * min(1.0, 2.0 * sd.min().item())
    torch.testing.assert_close(bn(x), expect)


def test_gamma_is_learnable_and_bounds():
    bn = LipschitzBatchNorm2d(4, gamma=0.5)
    bn.train()
    bn(torch.randn(8, 4, 3, 3) * 3).sum().backward()
    assert bn.log_gamma.grad is not None
    assert bn.curvature_bound() == 0.0
    assert abs(bn.gamma.item() - 0.5) < 1e-6


def test_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        LipschitzBatchNorm2d(4, gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        LipschitzBatchNorm2d(4, gamma=-2.0)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 4, H, W\), got \(2, 3, 5, 5\)"):
        LipschitzBatchNorm2d(4)(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_eval_input_gradient_with_a_channels_last_gradient(affine, batch):
    """Eval output and input gradient equal the closed form w_c·min(1, γ/L)/σ_c, also for one
    example whose gradient arrives channels-last (BN → flatten(2).transpose(1, 2), as in LeViT),
    where torch 2.14's CPU BatchNorm2d eval backward is wrong."""
    torch.manual_seed(0)
    bn = LipschitzBatchNorm2d(8, gamma=1.5, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    bn.eval()
    w = bn.weight.detach() if affine else torch.ones(8, dtype=torch.float64)
    b = bn.bias.detach() if affine else torch.zeros(8, dtype=torch.float64)
    sigma = (bn.running_var + bn.eps).sqrt()
    c = min(1.0, float(bn.gamma) / float((w.abs() / sigma).max()))  # γ: 1.5 as stored (float32 log)
    x = torch.randn(batch, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    u = torch.randn(batch, 16, 8, dtype=torch.float64)
    y = bn(x)
    want = c * ((x - bn.running_mean.view(1, -1, 1, 1)) * (w / sigma).view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    (y.flatten(2).transpose(1, 2) * u).sum().backward()
    grad = u.transpose(1, 2).reshape(batch, 8, 4, 4) * (c * w / sigma).view(1, -1, 1, 1)
    torch.testing.assert_close(x.grad, grad, rtol=1e-12, atol=1e-12)
