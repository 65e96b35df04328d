"""The one table of op facts (lcnn_plugin.ops) against independent ground truth, and the
defects of the kind the table removes (facts that drifted between bound, fold, piecewise)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_plugin import fold_batchnorm, model_bound, ops, strip
from lcnn_plugin.curvature import measure, piecewise_linear_violations
from lcnn_plugin.layers import CenteredSoftplus, LipschitzBatchNormAct2d, SNConv2d

# one instance of every torch class the table names (abstract bases through a concrete child)
INSTANCES = {
    nn.Identity: nn.Identity(), nn.Flatten: nn.Flatten(), nn.Unflatten: nn.Unflatten(1, (2, 4)),
    nn.modules.dropout._DropoutNd: nn.Dropout(0.3), nn.PixelShuffle: nn.PixelShuffle(2),
    nn.PixelUnshuffle: nn.PixelUnshuffle(2), nn.modules.padding._ConstantPadNd: nn.ZeroPad2d(1),
    nn.modules.padding._ReflectionPadNd: nn.ReflectionPad2d(1),
    nn.modules.padding._ReplicationPadNd: nn.ReplicationPad2d(1),
    nn.modules.conv._ConvTransposeNd: nn.ConvTranspose2d(8, 4, 3), nn.Conv1d: nn.Conv1d(8, 4, 3),
    nn.Conv2d: nn.Conv2d(8, 4, 3, padding=1), nn.Conv3d: nn.Conv3d(8, 4, 1), nn.Linear: nn.Linear(4, 3),
    nn.modules.batchnorm._BatchNorm: nn.BatchNorm2d(8), nn.AvgPool2d: nn.AvgPool2d(2),
    nn.AdaptiveAvgPool2d: nn.AdaptiveAvgPool2d(3), nn.modules.pooling._AvgPoolNd: nn.AvgPool1d(2),
    nn.modules.pooling._AdaptiveAvgPoolNd: nn.AdaptiveAvgPool1d(3), nn.MaxPool2d: nn.MaxPool2d(2),
    nn.modules.pooling._MaxPoolNd: nn.MaxPool1d(2),
    nn.modules.pooling._AdaptiveMaxPoolNd: nn.AdaptiveMaxPool2d(3),
    nn.Upsample: nn.Upsample(scale_factor=2), nn.ReLU6: nn.ReLU6(), nn.Hardtanh: nn.Hardtanh(),
    nn.ReLU: nn.ReLU(), nn.LeakyReLU: nn.LeakyReLU(0.2), nn.PReLU: nn.PReLU(init=0.3),
    nn.RReLU: nn.RReLU(), nn.Softplus: nn.Softplus(beta=3.0), nn.GELU: nn.GELU(), nn.SiLU: nn.SiLU(),
    nn.Hardswish: nn.Hardswish(), nn.Mish: nn.Mish(), nn.ELU: nn.ELU(), nn.CELU: nn.CELU(),
    nn.SELU: nn.SELU(), nn.Sigmoid: nn.Sigmoid(), nn.Tanh: nn.Tanh(), nn.Hardsigmoid: nn.Hardsigmoid(),
    nn.GLU: nn.GLU(1), nn.Softmax: nn.Softmax(1), nn.LayerNorm: nn.LayerNorm([8, 6, 6]),
    nn.GroupNorm: nn.GroupNorm(2, 8), nn.LocalResponseNorm: nn.LocalResponseNorm(2, alpha=1.0),
    nn.modules.instancenorm._InstanceNorm: nn.InstanceNorm2d(8),
    SNConv2d: SNConv2d(8, 4, 3, padding=1), CenteredSoftplus: CenteredSoftplus(beta=3.0),
}
INPUTS = {nn.Conv1d: (1, 8, 6), nn.AvgPool1d: (1, 8, 6), nn.AdaptiveAvgPool1d: (1, 8, 6),
          nn.MaxPool1d: (1, 8, 6), nn.Conv3d: (1, 8, 3, 3, 3), nn.Linear: (1, 4), nn.Unflatten: (1, 8)}


def _torch_entries():
    for classes, op in ops.MODULES:
        for cls in classes:
            if cls.__module__.startswith("torch.nn") or cls in (SNConv2d, CenteredSoftplus):
                yield cls, op


def test_every_torch_class_of_the_table_is_checked():
    missing = [c.__name__ for c, _ in _torch_entries() if c not in INSTANCES and c.__name__ not in (
        "MultiheadAttention", "RMSNorm", "SNConv1d", "SNConv3d", "SNLinear", "LipschitzBatchNorm2d",
        "LipschitzBatchNormAct2d")]
    assert not missing, f"add an instance for {missing}"


def _second_difference(f, x, d, h):
    return (f(x + h * d) - 2 * f(x) + f(x - h * d)).abs().max() / h**2


@pytest.mark.parametrize("cls", list(INSTANCES), ids=lambda c: c.__name__)
def test_piecewise_linear_claims(cls):
    """Piecewise linear: the second difference is 0 at random points (up to rounding, h
    small enough that no kink is crossed); not piecewise linear: it is not, somewhere (a
    larger h, far above rounding)."""
    m = INSTANCES[cls].double().eval()
    op = ops.module_op(m)
    assert op is not None
    shape = INPUTS.get(type(m), (1, 8, 6, 6))
    g = torch.Generator().manual_seed(0)
    h = 1e-6 if op.piecewise_linear else 1e-3
    worst = 0.0
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            d = torch.randn(shape, generator=g, dtype=torch.float64)
            worst = max(worst, float(_second_difference(m, x, d, h)))
    if op.piecewise_linear:
        assert worst < 1e-2, (cls.__name__, worst)  # float64 rounding / h² ≈ 1e-4
    else:
        assert worst > 1e-4, (cls.__name__, worst)  # rounding / h² ≈ 1e-10


def _derivatives(f, lo=-12.0, hi=12.0, n=400001):
    x = torch.linspace(lo, hi, n, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True)
    d2 = torch.zeros_like(x) if d2 is None else d2
    return d1.detach().abs().max().item(), d2.detach().abs().max().item()


ELEMENTWISE = [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(), nn.LeakyReLU(0.2), nn.LeakyReLU(-1.5),
               nn.Softplus(beta=3.0), nn.Sigmoid(), nn.Tanh()]


@pytest.mark.parametrize("m", ELEMENTWISE, ids=repr)
def test_elementwise_constants_are_the_sup_of_the_derivatives(m):
    """L = max |f'| and K = max |f''| on a fine grid (autograd of torch's own function)."""
    rule = ops.module_op(m).rule
    local = rule(m, (1, 1)) if callable(rule) else rule
    d1, d2 = _derivatives(m.double())
    assert local.L >= d1 * (1 - 1e-9) and local.L <= d1 * (1 + 1e-3), (local.L, d1)
    if local.K is not None:
        assert local.K >= d2 * (1 - 1e-9) and local.K <= d2 * (1 + 1e-3), (local.K, d2)


@pytest.mark.parametrize("name,f", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("relu", F.relu)])
def test_function_constants_are_the_sup_of_the_derivatives(name, f):
    local = ops.function_op(f).rule
    d1, d2 = _derivatives(f)
    assert local.L == pytest.approx(d1, rel=1e-3)
    if local.K is not None:
        assert local.K == pytest.approx(d2, rel=1e-3)


@pytest.mark.parametrize("f,pl", [
    (F.relu, True), (F.relu6, True), (F.hardtanh, True), (F.leaky_relu, True), (F.hardsigmoid, True),
    (lambda x: torch.clamp(x, -0.5, 0.5), True), (lambda x: F.max_pool2d(x, 2), True),
    (lambda x: F.avg_pool2d(x, 2), True), (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), True),
    (lambda x: torch.sigmoid(x), False), (lambda x: torch.tanh(x), False), (lambda x: F.gelu(x), False),
    (F.silu, False), (lambda x: F.softplus(x), False),
    (lambda x: F.layer_norm(x, (4, 6, 6)), False), (lambda x: F.softmax(x, 1), False),
])
def test_function_piecewise_linear_claims(f, pl):
    gm = torch.fx.symbolic_trace(f)
    node = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")][-1]
    op = ops.function_op(node.target)
    assert op is not None and op.piecewise_linear == pl
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64)
    d = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64)
    assert (_second_difference(f, x, d, 1e-6) < 1e-2) == pl  # rounding / h² ≈ 1e-4


def test_user_function_with_a_torch_name_is_unknown():
    def relu(x):  # not torch's
        return x * x

    assert ops.function_op(relu) is None
    assert ops.function_op(torch.relu) is not None and ops.function_op("relu") is not None


def test_subclass_with_its_own_forward_is_unknown():
    class Doubling(nn.ReLU):
        def forward(self, x):
            return 2 * x * x

    class Same(nn.ReLU):
        pass

    assert ops.module_op(Doubling()) is None
    assert ops.module_op(Same()) is ops.module_op(nn.ReLU())


# --- siblings: each failed before the table (numbers given without a word) -------------------

def _jacobian_norm(f, shape):
    x = torch.rand(1, *shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: f(t.view(1, *shape)).flatten(), x.flatten())
    return float(torch.linalg.matrix_norm(J, ord=2))


class _Expand(nn.Module):
    def forward(self, x):
        return x.mean((2, 3), keepdim=True).expand_as(x).flatten(1)


class _Sum(nn.Module):
    def forward(self, x):
        return x.sum((2, 3))


@pytest.mark.parametrize("model", [_Expand(), _Sum()], ids=["expand_as", "sum"])
def test_copying_and_summing_are_bounded_from_above(model):
    """expand_as copies every element H·W times (norm √(HW) of a mean's 1/√(HW)): it was passed
    as the identity, and torch.sum was not known."""
    b = model_bound(model, (2, 4, 4), strict=True)
    exact = _jacobian_norm(model, (2, 4, 4))
    assert exact <= b.lipschitz * (1 + 1e-12) and b.lipschitz <= exact * (1 + 1e-9)


class _Refused(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "copying index":
            return x[:, [0, 0, 0]].flatten(1)
        if self.kind == "alpha":
            return torch.add(x, x, alpha=3).flatten(1)
        return F.dropout(x, 0.5).flatten(1)  # training=True by default: applied in eval


@pytest.mark.parametrize("kind", ["copying index", "alpha", "dropout"])
def test_operations_that_scale_are_refused_not_passed(kind):
    b = model_bound(_Refused(kind), (2, 4, 4))
    assert b.lipschitz is None and len(b.unbounded) == 1, str(b)


def test_piecewise_linear_refuses_an_activation_inside_a_batchnorm_act():
    """LipschitzBatchNormAct2d counted as a BatchNorm (piecewise linear) whatever its act: the
    'exact' Hessian of a smooth model came out 5x low."""
    bnact = LipschitzBatchNormAct2d(4, act=CenteredSoftplus(beta=5.0))
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bnact, nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    m.train()
    m(torch.rand(8, 3, 6, 6))
    m.eval()
    x = torch.rand(2, 3, 6, 6)
    assert piecewise_linear_violations(m, x[:1]) == ["1.act: CenteredSoftplus is not piecewise linear"]
    with pytest.raises(ValueError, match="1.act: CenteredSoftplus"):
        measure(m, x, method="piecewise_linear")
    relu = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LipschitzBatchNormAct2d(4, act=nn.ReLU()),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    assert piecewise_linear_violations(relu, x[:1]) == []


def _sn_model():
    m = nn.Sequential(SNConv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), CenteredSoftplus(),
                      SNConv2d(6, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m.train()
    for _ in range(3):
        m(torch.rand(4, 3, 8, 8))
    return m.eval()


def test_strip_and_fold_at_another_input_size_keep_the_function():
    """σ depends on the input size: stripped at the trained size, the copy differed from the
    model on other sizes; with example_input it equals it there."""
    m = _sn_model()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
        scale = want.abs().max()
        assert (strip(m)(x) - want).abs().max() > 1e-3 * scale  # the trained size's σ
        assert (strip(m, example_input=x)(x) - want).abs().max() <= 1e-5 * scale
        folded = fold_batchnorm(m, x)
        assert (folded(x) - want).abs().max() <= 1e-5 * scale
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())


def test_fold_leaves_a_conv_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(self.conv(x)))

    m = Twice()
    m.train()
    m(torch.rand(4, 3, 6, 6))
    m.eval()
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(m, x)(x), m(x), atol=1e-6)


def test_bound_chain_parts_carry_the_table_facts():
    bnact = LipschitzBatchNormAct2d(4, act=nn.SiLU())
    facts = [(name, ops.layer_op(part)) for name, part in ops.parts(bnact)]
    assert [(n, o.role, o.piecewise_linear) for n, o in facts] == [
        ("", "batchnorm", True), ("drop", "rearrange", True), ("act", "activation", False)]
    assert math.isclose(ops.module_op(nn.LeakyReLU(-3.0)).rule(nn.LeakyReLU(-3.0), (1, 1)).L, 3.0)
