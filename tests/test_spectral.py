"""Operator-norm spectral normalisation against the SVD of the layer's exact Jacobian."""

import math

import pytest
import torch
from torch import nn

from lcnn_plugin.layers import (
    ConvOperator,
    SNConv1d,
    SNConv2d,
    SNConv3d,
    SNLinear,
    conv_certificate,
    conv_operator_norm,
    name_layers,
)
from lcnn_plugin.layers.spectral import (
    DENSE_SMALL,
    GRAM_LIMIT,
    _gram_certificate,
    _max_gram_eigenvalue,
    certify,
    dense_norm,
    gram_limit,
)

# (in, out, kernel, stride, padding, dilation, groups, padding_mode, input spatial shape)
CONV2D_CASES = [
    (3, 4, 3, 1, 1, 1, 1, "zeros", (8, 8)),
    (3, 4, 3, 2, 1, 1, 1, "zeros", (8, 8)),
    (3, 4, 3, 3, 1, 1, 1, "zeros", (10, 7)),
    (4, 4, 3, 2, 1, 1, 1, "zeros", (7, 9)),
    (4, 6, 1, 1, 0, 1, 1, "zeros", (6, 5)),
    (4, 6, 1, 2, 0, 1, 1, "zeros", (7, 6)),
    (3, 5, 5, 1, 2, 1, 1, "zeros", (8, 6)),
    (3, 5, 5, 2, 2, 1, 1, "zeros", (9, 9)),
    (3, 5, 5, 3, 0, 1, 1, "zeros", (11, 12)),
    (4, 4, 3, 1, 2, 2, 1, "zeros", (8, 8)),
    (4, 4, 3, 2, 2, 2, 1, "zeros", (9, 10)),
    (4, 4, 3, 1, 1, 1, 2, "zeros", (6, 8)),
    (4, 6, 3, 2, 1, 1, 2, "zeros", (8, 7)),
    (4, 4, 3, 1, 1, 1, 4, "zeros", (8, 8)),  # depthwise
    (4, 8, 3, 2, 1, 1, 4, "zeros", (9, 8)),  # depthwise, multiplier 2
    (4, 4, 5, 1, 2, 1, 4, "zeros", (7, 7)),
    (3, 4, 3, 1, 1, 1, 1, "circular", (8, 8)),
    (3, 4, 3, 2, 1, 1, 1, "circular", (8, 6)),
    (4, 4, 3, 1, 2, 2, 2, "circular", (8, 8)),
    (3, 4, 5, 1, 2, 1, 1, "circular", (6, 7)),
    (3, 4, 3, 1, 1, 1, 1, "reflect", (8, 8)),
    (3, 4, 3, 2, 1, 1, 1, "reflect", (9, 8)),
    (4, 4, 3, 1, 2, 2, 4, "reflect", (8, 8)),
    (3, 4, 5, 3, 2, 1, 1, "reflect", (10, 8)),
    (3, 4, 3, 1, 1, 1, 1, "replicate", (8, 8)),
    (3, 4, 3, 2, 1, 1, 1, "replicate", (7, 8)),
    (4, 6, 3, 3, 1, 1, 2, "replicate", (9, 9)),
    (3, 4, 5, 1, 2, 2, 1, "replicate", (9, 9)),
    (3, 4, 3, 1, "same", 1, 1, "zeros", (7, 9)),
    (3, 4, 4, 1, "same", 1, 1, "zeros", (8, 8)),  # asymmetric 'same' padding
    (3, 4, 4, 1, "same", 2, 1, "reflect", (9, 8)),
    (4, 4, 3, 1, "same", 1, 4, "circular", (6, 6)),
    (3, 4, 3, 1, "valid", 1, 1, "zeros", (8, 8)),
    (3, 4, 3, 1, (1, 0), 1, 1, "zeros", (8, 7)),  # per-axis padding
]


def exact_operator_norm(conv: nn.Module, spatial) -> float:
    """2-norm of the layer's Jacobian (bias removed), built by jacrev, by SVD."""
    x = torch.zeros(1, conv.in_channels, *spatial, dtype=torch.float64)

    def f(t: torch.Tensor) -> torch.Tensor:
        return nn.Conv2d._conv_forward(conv, t, conv.weight.double(), None) if isinstance(
            conv, nn.Conv2d) else conv._conv_forward(t, conv.weight.double(), None)

    jac = torch.func.jacrev(f)(x).reshape(-1, x.numel())
    return torch.linalg.matrix_norm(jac, ord=2).item()


@pytest.mark.parametrize("case", CONV2D_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv2d_operator_norm_is_exact(case):
    cin, cout, k, s, p, d, g, mode, spatial = case
    conv = SNConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode).double()
    shape = (cin, *spatial)
    exact = exact_operator_norm(conv, spatial)
    sigma, _, converged = conv.operator_norm(shape)
    assert converged
    assert abs(sigma - exact) <= 1e-6 * exact, (sigma, exact)
    # eval on a shape never trained: σ converged for that shape, nothing written to the state
    x = torch.randn(2, cin, *spatial, dtype=torch.float64)
    conv.eval()
    y = conv(x)
    assert conv.sn_v.numel() == 0
    w = conv.normalized_weight(shape)
    used = (conv.weight.norm() / w.norm()).item()
    assert used <= exact * (1 + 1e-9) and used >= exact * (1 - 1e-4)
    # what it applies is exactly the convolution with W / σ
    ref = nn.functional.conv2d(
        nn.functional.pad(x, conv._reversed_padding_repeated_twice,
                          mode="constant" if mode == "zeros" else mode),
        w, conv.bias, s, 0, d, g)
    torch.testing.assert_close(y, ref)
    # after normalisation the layer's Lipschitz constant is ||A|| / σ
    assert abs(conv.lipschitz(shape) - exact / used) <= 1e-6 * exact


@pytest.mark.parametrize("cls,cin,k,s,p,mode,spatial", [
    (SNConv1d, 3, 3, 2, 1, "zeros", (11,)),
    (SNConv1d, 3, 5, 1, 2, "reflect", (9,)),
    (SNConv3d, 2, 3, 2, 1, "zeros", (5, 4, 6)),
    (SNConv3d, 2, 3, 1, 1, "circular", (4, 4, 3)),
])
def test_conv1d_conv3d_operator_norm_is_exact(cls, cin, k, s, p, mode, spatial):
    conv = cls(cin, 3, k, stride=s, padding=p, padding_mode=mode).double()
    x = torch.zeros(1, cin, *spatial, dtype=torch.float64)
    jac = torch.func.jacrev(lambda t: conv._conv_forward(t, conv.weight, None))(x)
    exact = torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2).item()
    sigma, _, converged = conv.operator_norm((cin, *spatial))
    assert converged and abs(sigma - exact) <= 1e-6 * exact


def test_training_converges_at_once_then_tracks_from_below():
    conv = SNConv2d(4, 6, 3, stride=2, padding=1).double()
    spatial = (9, 7)
    exact = exact_operator_norm(conv, spatial)
    x = torch.randn(2, 4, *spatial, dtype=torch.float64)
    conv.train()
    with torch.no_grad():
        conv(x)  # a new shape: σ converged before the first warm step
        assert exact * (1 - 1e-4) <= conv.sn_sigma.item() <= exact * (1 + 1e-9)
        prev = 0.0
        for _ in range(20):
            conv(x)
            sigma = conv.sn_sigma.item()
            assert sigma >= prev - 1e-12 and sigma <= exact * (1 + 1e-9)  # monotone, from below
            prev = sigma


def test_torch_reshaped_spectral_norm_underestimates():
    """torch's spectral_norm divides by ||W reshaped||, below the operator norm of the conv."""
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        conv = SNConv2d(16, 16, 3, padding=1).double()
        exact = exact_operator_norm(conv, (8, 8))
        matrix = torch.linalg.matrix_norm(conv.weight.detach().reshape(16, -1), ord=2).item()
        ratios.append(exact / matrix)
    assert min(ratios) > 1.2, ratios


def test_eval_writes_nothing_and_training_updates():
    conv = SNConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    conv.eval()
    y = conv(x)
    assert conv.sn_v.numel() == 0 and conv.sn_sigma.item() == 1.0  # no trained state yet
    conv.train()
    conv(x)
    frozen = conv.sn_sigma.clone(), conv.sn_v.clone()
    conv.eval()
    conv(x), conv(torch.randn(1, 3, 5, 7))
    assert torch.equal(conv.sn_sigma, frozen[0]) and torch.equal(conv.sn_v, frozen[1])
    torch.testing.assert_close(conv(x), y, rtol=1e-4, atol=1e-6)  # converged σ either way
    conv.train()
    conv(x)
    assert not torch.equal(conv.sn_v, frozen[1])


def test_training_at_a_new_shape_moves_the_trained_state_eval_does_not():
    conv = SNConv2d(3, 4, 3, stride=2, padding=1).double().train()
    conv(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert conv.sn_v.shape == (1, 3, 8, 8)
    conv.eval()
    x = torch.randn(1, 3, 10, 6, dtype=torch.float64)
    y = conv(x)
    assert conv.sn_v.shape == (1, 3, 8, 8)
    exact = exact_operator_norm(conv, (10, 6))
    used = (conv.weight.norm() / conv.normalized_weight((3, 10, 6)).norm()).item()
    assert exact * (1 - 1e-4) <= used <= exact * (1 + 1e-9)
    conv.train()
    conv(x)
    assert conv.sn_v.shape == (1, 3, 10, 6)
    conv.eval()
    torch.testing.assert_close(conv(x), y, rtol=1e-6, atol=1e-9)


def test_gradient_flows_through_sigma():
    """d(W/σ)/dW includes σ = ‖A v‖'s dependence on W (v the forward's vector): against a
    finite difference of that function written out here."""
    conv = SNConv2d(2, 3, 3, padding=1).double().train()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    loss = conv(x).square().sum()
    (g,) = torch.autograd.grad(loss, conv.weight)
    v = conv.sn_v.detach().clone()  # the vector this forward used

    def f(w: torch.Tensor) -> float:
        sigma = nn.functional.conv2d(v, w, padding=1).norm()
        return float(nn.functional.conv2d(x, w / sigma, conv.bias, padding=1).square().sum())

    w0 = conv.weight.detach().clone()
    d = torch.randn_like(w0)
    h = 1e-6
    fd = (f(w0 + h * d) - f(w0 - h * d)) / (2 * h)
    assert abs(fd - (g * d).sum().item()) <= 1e-5 * abs(fd)


def test_state_dict_keeps_weight_and_frozen_state():
    conv = SNConv2d(3, 4, 3, padding=1)
    conv.train()
    conv(torch.randn(2, 3, 8, 8))
    sd = conv.state_dict()
    assert set(sd) == {"weight", "bias", "sn_v", "sn_sigma"}
    other = SNConv2d(3, 4, 3, padding=1)
    other.load_state_dict(sd)
    conv.eval(), other.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(conv(x), other(x))


def test_linear_spectral_norm():
    lin = SNLinear(7, 5).double()
    exact = torch.linalg.matrix_norm(lin.weight.detach(), ord=2).item()
    lin.train()
    with torch.no_grad():
        lin(torch.randn(3, 7, dtype=torch.float64))
    assert exact * (1 - 1e-4) <= lin.sn_sigma.item() <= exact * (1 + 1e-12)
    assert abs(lin.lipschitz() - exact / lin.sn_sigma.item()) <= 1e-9


def test_standalone_operator_norm_of_plain_conv():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode="reflect").double()
    sigma, _, ok = conv_operator_norm(conv, (9, 8))
    assert ok and abs(sigma - exact_operator_norm(conv, (9, 8))) <= 1e-6 * sigma


def test_bad_input_names_the_layer():
    model = nn.Sequential(nn.Identity(), SNConv2d(3, 4, 3))
    name_layers(model)
    with pytest.raises(ValueError, match=r"^1: expected input of shape \(N, 3, H, W\), got \(2, 5, 8, 8\)"):
        model(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        SNConv2d(3, 4, 3)(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        SNLinear(4, 2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="no input shape known yet"):
        SNConv2d(3, 4, 3).lipschitz()


# --- certified bounds ---------------------------------------------------------------------------

ND_CASES = [  # (class, in, kernel, stride, padding, padding_mode, input spatial shape)
    (nn.Conv1d, 3, 3, 2, 1, "zeros", (11,)),
    (nn.Conv1d, 3, 5, 1, 2, "reflect", (9,)),
    (nn.Conv1d, 2, 3, 1, 1, "circular", (10,)),
    (nn.Conv3d, 2, 3, 2, 1, "zeros", (5, 4, 6)),
    (nn.Conv3d, 2, 3, 1, 1, "circular", (4, 4, 3)),
]


def _all_convs():
    for cin, cout, k, s, p, d, g, mode, spatial in CONV2D_CASES:
        yield nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode), spatial
    for cls, cin, k, s, p, mode, spatial in ND_CASES:
        yield cls(cin, 3, k, stride=s, padding=p, padding_mode=mode), spatial


def _jacobian_norm(conv: nn.Module, spatial) -> float:
    x = torch.zeros(1, conv.in_channels, *spatial, dtype=torch.float64)
    jac = torch.func.jacrev(lambda t: conv._conv_forward(t, conv.weight.double(), None))(x)
    return torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2).item()


def test_certified_bounds_hold_and_are_within_one_percent():
    """Over every configuration above: lower <= the exact norm (SVD of the Jacobian) <= upper
    <= 1.01 exact, from conv_certificate with its defaults."""
    torch.manual_seed(0)
    for conv, spatial in _all_convs():
        exact = _jacobian_norm(conv, spatial)
        cert = conv_certificate(conv, spatial)
        assert cert.lower <= exact <= cert.upper <= 1.01 * exact, (conv, spatial, cert, exact)


def test_torus_bound_is_an_upper_bound_exact_for_circular_padding():
    """The symbol's bound alone (no dense shortcut) is above the exact norm in every
    configuration, equal to it (to 1e-6) for circular padding where the stride divides the
    input and the outputs do not meet, and Lanczos from its vector gives a lower bound."""
    torch.manual_seed(1)
    for conv, spatial in _all_convs():
        conv = conv.double()
        exact = _jacobian_norm(conv, spatial)
        op = ConvOperator(conv, spatial)
        upper, v0 = op.torus_bound()
        assert upper >= exact * (1 - 1e-12), (conv, spatial, upper, exact)
        if conv.padding_mode == "circular" and all(n % s == 0 and o * s <= n for n, s, o in zip(
                spatial, conv.stride, op.out_spatial)):
            assert upper <= exact * (1 + 1e-6), (conv, spatial, upper, exact)
        if math.prod(op.in_shape) > DENSE_SMALL:
            with gram_limit(0):
                cert = certify(op, dense_limit=0)
            assert cert.method == "torus" and cert.upper == upper
            assert cert.lower <= exact * (1 + 1e-12) <= cert.upper * (1 + 1e-12)


def test_torus_bound_at_realistic_sizes():
    """On a 32×32 input the zero-padded 3×3 convolution's certified bound is within 1% of the
    Lanczos lower bound; on a 16×16 circular one it equals the dense SVD of the operator; on a
    1×1 input it is the centre tap's norm."""
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 16, 3, padding=1).double()
    cert = conv_certificate(conv, (32, 32))
    assert cert.method == "torus" and cert.gap <= 0.01, cert
    sigma, _, ok = conv_operator_norm(conv, (32, 32))
    assert ok and cert.lower <= sigma * (1 + 1e-9) <= cert.upper
    circ = nn.Conv2d(8, 6, 3, stride=2, padding=1, padding_mode="circular").double()
    op = ConvOperator(circ, (16, 16))
    upper, _ = op.torus_bound()
    exact = dense_norm(op)
    assert exact <= upper <= exact * (1 + 1e-6)
    # on a 1×1 input only the centre tap of a padded 3×3 kernel acts: the bound is its matrix norm
    point = nn.Conv2d(300, 20, 3, padding=1).double()
    upper, _ = ConvOperator(point, (1, 1)).torus_bound()
    centre = torch.linalg.matrix_norm(point.weight[:, :, 1, 1].detach(), ord=2).item()
    assert centre <= upper <= centre * (1 + 1e-6)


def test_layer_lipschitz_is_certified():
    """An SN layer's lipschitz() is the certified upper bound of c·‖A‖/σ, also on a shape it
    was not trained on, and on a large input where the symbol's bound is used."""
    conv = SNConv2d(4, 6, 3, stride=2, padding=1).double().train()
    with torch.no_grad():
        conv(torch.randn(2, 4, 9, 7, dtype=torch.float64))
    conv.eval()
    for spatial in [(9, 7), (6, 6), (40, 40)]:
        shape = (4, *spatial)
        exact = dense_norm(ConvOperator(conv, spatial)) if spatial != (40, 40) else None
        cert = conv.lipschitz_certificate(shape)
        scale = float(conv.sn_sigma if spatial == (9, 7) else conv._sn_engine.eval_sigma(conv, shape))
        assert conv.lipschitz(shape) == cert.upper
        if exact is not None:
            assert cert.lower <= exact / scale <= cert.upper <= exact / scale * 1.01
        else:
            assert cert.method == "torus" and cert.lower <= cert.upper


def test_max_gram_eigenvalue_solves_what_the_cholesky_screen_cannot_clear():
    """The screen takes the matrix with the largest Lanczos estimate as the reference; a
    matrix whose estimate is low (a spectrum spread evenly up to 10: six Lanczos steps see
    9.3-9.91 from random starts) but whose true top is larger than the reference's (9.95,
    isolated) fails the Cholesky test and is solved exactly: the result is the true maximum
    (eigvalsh of every matrix), found at it."""
    n = 64
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.complex128, generator=gen))
    spread = q @ torch.diag(torch.linspace(0.5, 10.0, n, dtype=torch.float64)).to(torch.complex128) @ q.mH
    isolated = torch.diag(torch.tensor([9.95] + [1.0] * (n - 1), dtype=torch.complex128))
    others = [torch.diag(torch.linspace(0.5, 5.0, n, dtype=torch.float64)).to(torch.complex128)] * 3
    grams = torch.stack([isolated, *others, spread])
    # matrices M with MᴴM = G: the Hermitian square roots
    evals, evecs = torch.linalg.eigh(grams)
    mats = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.mH
    top, where, _ = _max_gram_eigenvalue(mats.unsqueeze(0), chunk=2)
    truth = torch.linalg.eigvalsh(grams)[:, -1]
    assert abs(top - float(truth.max())) <= 1e-12 * float(truth.max())
    assert where == (0, 4)


def test_gram_matrix_is_the_dense_operators():
    """ConvOperator.gram() (built from the tap matrices) equals AᵀA or AAᵀ, whichever is
    smaller, of the Jacobian built by jacrev, in every configuration above (rows by position,
    then channel)."""
    torch.manual_seed(4)
    for conv, spatial in _all_convs():
        conv = conv.double()
        x = torch.zeros(1, conv.in_channels, *spatial, dtype=torch.float64)
        jac = torch.func.jacrev(lambda t, c=conv: c._conv_forward(t, c.weight, None))(x)
        out_shape = jac.shape[1:1 + x.dim() - 1]
        A = jac.reshape(math.prod(out_shape), x.numel())
        op = ConvOperator(conv, spatial)
        gram = op.gram()
        if gram.shape[0] == x.numel():
            want, ch = A.T @ A, conv.in_channels
        else:
            want, ch = A @ A.T, conv.out_channels
        assert gram.shape[0] == op.gram_size() == min(A.shape), (conv, spatial)
        order = torch.arange(want.shape[0]).view(ch, -1).T.flatten()  # rows by position, then channel
        torch.testing.assert_close(gram, want[order][:, order], rtol=0, atol=1e-12, msg=str((conv, spatial)))


def test_gram_certificate_makes_a_loose_bound_exact():
    """A zero-padded 3×3 convolution on 4×4 inputs: the symbol's bound is > 1% loose; from the
    Gram matrix (its rows within GRAM_LIMIT) the bound is ≥ the exact norm and within 0.1% of
    it; with the limit below its rows, the loose bound is what comes back."""
    torch.manual_seed(3)
    conv = nn.Conv2d(24, 24, 3, padding=1).double()
    op = ConvOperator(conv, (4, 4))
    exact = dense_norm(op)
    assert op.gram_size() == 384 <= GRAM_LIMIT
    cert = certify(op, dense_limit=0)
    assert cert.method == "gram" and cert.lower <= exact <= cert.upper <= exact * 1.001, (cert, exact)
    with gram_limit(383):
        loose = certify(op, dense_limit=0)
    assert loose.method == "torus" and loose.gap > 0.01 and loose.upper >= exact
    # Lanczos kept from the top: a grouped conv is block diagonal, and a start in the weaker
    # group never leaves it; the Cholesky test then fails and μ is G's largest eigenvalue
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2).double()
    with torch.no_grad():
        grouped.weight[4:] *= 3
    op = ConvOperator(grouped, (4, 4))
    exact = dense_norm(op)
    start = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    start[:, 4:] = 0
    cert = _gram_certificate(op, start)
    assert exact <= cert.upper <= exact * (1 + 1e-9) and cert.lower <= exact
