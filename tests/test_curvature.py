"""Curvature estimates against dense Hessians (float64) and autograd gradients."""

import pytest
import torch
from torch import nn

from lcnn_plugin.curvature import measure, relative_gradient_robustness, report
from lcnn_plugin.fold import fold_batchnorm
from lcnn_plugin.kernels import triton_available
from lcnn_plugin.layers import CenteredSoftplus, LipschitzBatchNorm2d, SNConv2d, SNLinear


def small_lcnn() -> nn.Module:
    return nn.Sequential(
        SNConv2d(3, 6, 3, padding=1), LipschitzBatchNorm2d(6), CenteredSoftplus(),
        SNConv2d(6, 6, 3, stride=2, padding=1), LipschitzBatchNorm2d(6), CenteredSoftplus(),
        nn.Flatten(), SNLinear(6 * 2 * 2, 5),
    )


def small_standard() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Softplus(beta=10),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.Softplus(beta=10),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    )


class Quadratic(nn.Module):
    """logit 0 = ½ xᵀAx with A's spectrum {3, −3, 2, −1, 0.5, 0, ...}: λmax = −λmin."""

    def __init__(self, d: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        spec = torch.zeros(d, dtype=torch.float64)
        spec[:5] = torch.tensor([3.0, -3.0, 2.0, -1.0, 0.5])
        self.register_buffer("A", q @ torch.diag(spec) @ q.t())
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)
        quad = 0.5 * ((v @ self.A) * v).sum(1) * self.w
        return torch.stack([quad, torch.zeros_like(quad)], 1)


def first_logit(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits[:, 0]


def _prepared(model: nn.Module) -> nn.Module:
    model = model.double()
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 4, 4, dtype=torch.float64))  # BN statistics, σ
    return model.eval()


def dense_truth(model, x, y, loss_fn=None):
    """Per-example gradient and dense Hessian by torch.autograd.functional, one at a time."""
    loss_fn = loss_fn or (lambda z, t: nn.functional.cross_entropy(z, t, reduction="none"))
    grads, norms = [], []
    for i in range(x.shape[0]):
        f = lambda t, i=i: loss_fn(model(t[None]), y[i : i + 1]).sum()
        xi = x[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xi), xi)
        H = torch.autograd.functional.hessian(f, x[i]).reshape(x[i].numel(), -1)
        grads.append(g.flatten().norm())
        norms.append(torch.linalg.eigvalsh(H).abs().max())
    return torch.stack(grads), torch.stack(norms)


@pytest.mark.parametrize("build", [small_lcnn, small_standard], ids=["lcnn", "standard"])
@pytest.mark.parametrize("engine", ["autograd", "func"])
def test_matches_dense_hessian(build, engine):
    model = _prepared(build())
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])
    g_true, h_true = dense_truth(model, x, y)
    for method in ("lanczos", "power", "exact"):
        r = measure(model, x, y, method=method, engine=engine)
        torch.testing.assert_close(r.grad_norm, g_true, rtol=1e-6, atol=0)
        rel = ((r.hessian_norm - h_true).abs() / h_true).max().item()
        assert rel <= 1e-3, (method, rel)
        assert r.converged.all() and (r.error <= 1e-3).all()
        torch.testing.assert_close(r.curvature, r.hessian_norm / (r.grad_norm + 1e-6))


def test_indefinite_with_symmetric_spectrum():
    """λmax = −λmin = 3: the Rayleigh quotient ⟨u,Hu⟩ of the paper's estimator fails there,
    ‖Hv‖ (power) and Lanczos' largest |Ritz value| do not."""
    torch.manual_seed(3)
    model = Quadratic(48)
    x = torch.rand(6, 3, 4, 4, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    _, h_true = dense_truth(model, x, y, first_logit)
    torch.testing.assert_close(h_true, torch.full_like(h_true, 3.0))
    for method in ("lanczos", "power"):
        r = measure(model, x, y, method=method, loss_fn=first_logit)
        assert ((r.hessian_norm - 3.0).abs() <= 3e-3).all(), (method, r.hessian_norm)
    ref = measure(model, x, y, method="reference", k=10, loss_fn=first_logit)
    assert ((ref.hessian_norm - 3.0).abs() > 0.03).any()  # the reference under-reads
    assert not ref.converged.any() and ref.hvps.eq(11).all()


def test_predicted_labels_and_custom_loss():
    model = _prepared(small_lcnn())
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    pred = model(x).argmax(1)
    a = measure(model, x, method="exact")
    b = measure(model, x, pred, method="exact")
    torch.testing.assert_close(a.hessian_norm, b.hessian_norm)


def test_state_restored_and_deterministic():
    model = _prepared(small_lcnn())
    model.train()
    model[0].weight.requires_grad_(False)
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    r1 = measure(model, x, method="lanczos", seed=5)
    assert model.training and not model[0].weight.requires_grad and model[3].weight.requires_grad
    r2 = measure(model, x, method="lanczos", seed=5)
    assert torch.equal(r1.hessian_norm, r2.hessian_norm) and torch.equal(r1.hvps, r2.hvps)


def test_chunking_equals_one_batch():
    model = _prepared(small_standard())
    x = torch.rand(7, 3, 4, 4, dtype=torch.float64)
    full = measure(model, x, method="exact")
    chunked = measure(model, x, method="exact", max_batch=3)
    torch.testing.assert_close(full.hessian_norm, chunked.hessian_norm)
    torch.testing.assert_close(full.grad_norm, chunked.grad_norm)


def test_report_aggregates_exactly_the_examples_seen():
    model = _prepared(small_standard())
    x = torch.rand(10, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))
    loader = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 10, 3)]  # 3, 3, 3, 1
    rep = report(model, loader, method="exact", progress=False)
    full = measure(model, x, y, method="exact")
    assert rep.n == 10
    for name in ("grad_norm", "hessian_norm", "curvature"):
        assert abs(rep.stats[name]["mean"] - getattr(full, name).mean().item()) <= 1e-12 * getattr(
            full, name).mean().item()
        assert abs(rep.stats[name]["std"] - getattr(full, name).std().item()) <= 1e-9
    capped = report(model, loader, method="exact", progress=False, max_examples=5)
    assert capped.n == 5
    assert abs(capped.stats["grad_norm"]["mean"] - full.grad_norm[:5].mean().item()) <= 1e-12
    assert "over 10 examples" in str(rep)


def test_relative_gradient_robustness_matches_hessian():
    model = _prepared(small_lcnn())
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    r = relative_gradient_robustness(model, x, radii=(0.0, 1e-5), n_samples=2, seed=1)
    assert r.shape == (2, 2, 2) and (r[0] == 0).all()
    # at a tiny radius, r ≈ ‖Hδ‖/‖g‖ ≤ ‖H‖·‖δ‖/‖g‖
    res = measure(model, x, method="exact")
    assert (r[1] <= res.hessian_norm / res.grad_norm * 1e-5 * (1 + 1e-3)).all()
    assert (r[1] > 0).all()


def test_bad_input():
    model = _prepared(small_lcnn())
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or inf"):
        measure(model, x.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        measure(model, x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(2,\)"):
        measure(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="method"):
        measure(model, x, method="svd")
    with pytest.raises(ValueError, match=r"logits of shape \(B=2, C\)"):
        measure(nn.Sequential(model, nn.Unflatten(1, (5, 1))), x)

    class Detached(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return model(t.detach())

    with pytest.raises(ValueError, match="no differentiable path"):
        measure(Detached(), x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        measure(lambda t: t, x)


class PiecewiseLinear(nn.Module):
    """ReLU, max-pool, eval BN, a residual sum and a scaled branch: piecewise linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = nn.functional.leaky_relu(self.bn2(self.conv2(h)), 0.1) + 0.5 * h
        return self.fc(self.pool(h).flatten(1))


def _prepared6(model: nn.Module) -> nn.Module:
    model = model.double().train()
    with torch.no_grad():
        model(torch.rand(16, 3, 6, 6, dtype=torch.float64))
    return model.eval()


def squared_softmax_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss whose logit Hessian is not diag p − ppᵀ (and is indefinite)."""
    return torch.logsumexp(2 * logits, 1) - logits.gather(1, y[:, None]).squeeze(1) ** 2


@pytest.mark.parametrize("loss_fn", [None, squared_softmax_loss], ids=["ce", "custom"])
def test_piecewise_linear_is_exact(loss_fn):
    torch.manual_seed(0)
    model = _prepared6(PiecewiseLinear())
    x = torch.rand(5, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4])
    g_true, h_true = dense_truth(model, x, y, loss_fn)
    r = measure(model, x, y, method="piecewise_linear", loss_fn=loss_fn)
    torch.testing.assert_close(r.grad_norm, g_true, rtol=1e-9, atol=0)
    torch.testing.assert_close(r.hessian_norm, h_true, rtol=1e-8, atol=0)
    assert r.hvps.eq(5).all() and r.converged.all()
    pred = measure(model, x, method="piecewise_linear", loss_fn=loss_fn)  # predicted labels
    torch.testing.assert_close(pred.hessian_norm, measure(model, x, model(x).argmax(1), method="exact",
                                                          loss_fn=loss_fn).hessian_norm)


def test_piecewise_linear_refuses_smooth_models():
    model = _prepared(small_lcnn())
    with pytest.raises(ValueError, match=r"piecewise-linear model; not: 2: CenteredSoftplus"):
        measure(model, torch.rand(2, 3, 4, 4, dtype=torch.float64), method="piecewise_linear")


def test_report_checks_piecewise_linearity_once(monkeypatch):
    import lcnn_plugin.curvature as curvature

    model = _prepared6(PiecewiseLinear())
    x = torch.rand(9, 3, 6, 6, dtype=torch.float64)
    batches = [x[i:i + 3] for i in range(0, 9, 3)]
    calls = []
    real = curvature.piecewise_linear_violations
    monkeypatch.setattr(curvature, "piecewise_linear_violations", lambda m, e: calls.append(1) or real(m, e))
    r = report(model, batches, method="piecewise_linear", fold_bn=False, progress=False)
    assert len(calls) == 1 and r.n == 9
    torch.testing.assert_close(r.values["hessian_norm"],
                               measure(model, x, method="exact", fold_bn=False).hessian_norm)
    with pytest.raises(ValueError, match="piecewise-linear model; not: 2: CenteredSoftplus"):
        report(_prepared(small_lcnn()), [torch.rand(2, 3, 4, 4, dtype=torch.float64)],
               method="piecewise_linear", progress=False)


@pytest.mark.parametrize("build", [small_lcnn, small_standard], ids=["lcnn", "standard"])
def test_fold_bn_keeps_the_function(build):
    torch.manual_seed(1)
    model = build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.1, 3.0)
            if isinstance(m, LipschitzBatchNorm2d):
                m.log_gamma.data.fill_(0.0)  # γ = 1: the clip is active
    model = model.double().eval()
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    folded = fold_batchnorm(model, x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is intact
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    a = measure(model, x, method="exact", fold_bn=False)
    b = measure(model, x, method="exact", fold_bn=True)
    torch.testing.assert_close(b.hessian_norm, a.hessian_norm, rtol=1e-10, atol=0)
    torch.testing.assert_close(b.grad_norm, a.grad_norm, rtol=1e-10, atol=0)
    assert measure(model, x, method="exact").options["fold_bn"] is True  # the default folds when it can


def test_fold_bn_default_falls_back_when_untraceable():
    model = _prepared(small_standard())

    class Untraceable(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner(t) if t.sum() > -1 else -self.inner(t)

    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    r = measure(Untraceable(), x, method="exact")
    assert r.options["fold_bn"] is False
    torch.testing.assert_close(r.hessian_norm, measure(model, x, method="exact").hessian_norm)
    with pytest.raises(ValueError, match="cannot be traced by torch.fx"):
        measure(Untraceable(), x, method="exact", fold_bn=True)


def test_fold_leaves_batchnorm_subclasses_and_hooked_convs_alone():
    """LipschitzBatchNormAct2d (what convert makes of timm's BatchNormAct2d) is a BatchNorm that
    also applies an activation; a conv with a forward pre-hook does more than W x + b."""
    from lcnn_plugin.layers.norm import LipschitzBatchNormAct2d

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), LipschitzBatchNormAct2d(6, act=nn.Tanh()),
                          nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 2 * 2, 5))
    model = _prepared(model)
    model[2].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))  # the conv does more than W x + b
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    folded = fold_batchnorm(model, x[:1])
    kinds = [type(m) for m in folded.modules()]
    # neither pair was folded (the γ-BN-act is stripped to timm's BatchNormAct2d first, whose
    # batch_norm call stays in the traced graph)
    assert nn.BatchNorm2d in kinds and kinds.count(nn.Conv2d) == 2
    assert any(getattr(n.target, "__name__", "") == "batch_norm" for n in folded.graph.nodes)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 3])
def test_fold_bias_free_conv1d_and_conv3d(dim):
    torch.manual_seed(3)
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dim]
    model = nn.Sequential(conv(2, 4, 3, padding=1, bias=False), bn(4), nn.Softplus(), nn.Flatten(),
                          nn.Linear(4 * 4**dim, 3)).double().train()
    shape = (2,) + (4,) * dim
    with torch.no_grad():
        model(torch.rand(16, *shape, dtype=torch.float64))
    model.eval()
    x = torch.rand(3, *shape, dtype=torch.float64)
    folded = fold_batchnorm(model, x[:1])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


class ShiftedFold(nn.Module):
    """A model whose BatchNorm-folded copy differs: the default must notice and not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _prepared(small_standard())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_measure_folds_only_a_copy_that_computes_the_same_function(monkeypatch):
    import lcnn_plugin.curvature as curvature

    model = ShiftedFold()
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    plain = measure(model, x, method="exact", fold_bn=False)
    good = measure(model, x, method="exact")
    assert good.options["fold_bn"] is True and good.options["fold_bn_note"] is None

    def broken_fold(m, example):  # a folding that changes the function (as before the exact-type rule)
        folded = fold_batchnorm(m, example)
        with torch.no_grad():
            next(p for p in folded.parameters() if p.dim() == 4).mul_(1.01)
        return folded

    monkeypatch.setattr(curvature, "fold_batchnorm", broken_fold)
    r = measure(model, x, method="exact")
    assert r.options["fold_bn"] is False and "differ from the model's" in r.options["fold_bn_note"]
    torch.testing.assert_close(r.hessian_norm, plain.hessian_norm, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="fold_bn=True: the folded copy's logits differ"):
        measure(model, x, method="exact", fold_bn=True)


def test_report_folds_once_and_equals_unfolded(monkeypatch):
    import lcnn_plugin.curvature as curvature

    model = _prepared(small_lcnn())
    x = torch.rand(12, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    calls = []
    real = curvature.fold_batchnorm
    monkeypatch.setattr(curvature, "fold_batchnorm", lambda m, e: calls.append(1) or real(m, e))
    folded = report(model, batches, method="exact", progress=False)
    plain = report(model, batches, method="exact", fold_bn=False, progress=False)
    assert len(calls) == 1 and folded.options["fold_bn"] is True and plain.options["fold_bn"] is False
    for k, v in folded.values.items():
        torch.testing.assert_close(v, plain.values[k], rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_engine_equals_eager(dtype):
    model = _prepared(small_lcnn()).to(dtype)
    x = torch.rand(3, 3, 4, 4, dtype=dtype)
    eager = measure(model, x, method="power", engine="autograd", tol=1e-4)
    compiled = measure(model, x, method="power", engine="compiled", tol=1e-4)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(compiled.grad_norm, eager.grad_norm, rtol=rtol, atol=0)
    torch.testing.assert_close(compiled.hessian_norm, eager.hessian_norm, rtol=rtol * 10, atol=0)


@pytest.mark.skipif(not triton_available("cuda") and not triton_available("cpu"),
                    reason="Triton is not installed, or no CUDA and TRITON_INTERPRET is not 1")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_engine_equals_eager(dtype):
    model = _prepared(small_lcnn()).to(dtype)
    x = torch.rand(3, 3, 4, 4, dtype=dtype)
    eager = measure(model, x, method="lanczos", engine="autograd")
    fused = measure(model, x, method="lanczos", engine="triton")
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    assert fused.engine == "triton" and not any(getattr(m, "fused", False) for m in model.modules())
    torch.testing.assert_close(fused.grad_norm, eager.grad_norm, rtol=rtol, atol=0)
    torch.testing.assert_close(fused.hessian_norm, eager.hessian_norm, rtol=rtol * 10, atol=0)


class GatedAttention(nn.Module):
    """An SE-style hardsigmoid gate and self-attention by F.scaled_dot_product_attention: torch
    has no double backward for either (hardsigmoid; the fused CPU attention kernel)."""

    def __init__(self, raw_aten: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 4, 1)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(64, 5)
        self.raw_aten = raw_aten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        g = self.gate(h)
        h = h * (torch.ops.aten.hardsigmoid(g) if self.raw_aten else nn.functional.hardsigmoid(g))
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, -1)
        a = nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.head(a.flatten(1))


def fd_hessian_norms(model, x, y, h=1e-5):
    """|λ|max of each example's Hessian from central differences of autograd input gradients
    (one backward: no second derivative of the model is needed)."""
    def grad(t, i):
        t = t.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(t[None]), y[i:i + 1]), t)
        return g.flatten()

    out = []
    for i in range(x.shape[0]):
        d = x[i].numel()
        cols = []
        for j in range(d):
            e = torch.zeros(d, dtype=x.dtype)
            e[j] = h
            cols.append((grad(x[i] + e.view_as(x[i]), i) - grad(x[i] - e.view_as(x[i]), i)) / (2 * h))
        H = torch.stack(cols, 1)
        out.append(torch.linalg.eigvalsh((H + H.T) / 2).abs().max())
    return torch.stack(out)


@pytest.mark.parametrize("engine", ["autograd", "func"])
def test_models_without_double_backward_are_measured(engine):
    """hardsigmoid and fused attention have no second derivative in torch: measure() computes
    them by equivalents (same values) and matches finite differences of the gradient."""
    torch.manual_seed(0)
    model = GatedAttention().double().eval()
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 4])
    with pytest.raises(RuntimeError, match="derivative for"):  # what torch says without them
        dense_truth(model, x, y)
    truth = fd_hessian_norms(model, x, y)
    r = measure(model, x, y, method="exact", engine=engine)
    torch.testing.assert_close(r.hessian_norm, truth, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError, match="derivative for"):  # nothing is left swapped
        dense_truth(model, x, y)


def test_an_operation_without_any_second_derivative_is_named():
    model = GatedAttention(raw_aten=True).double().eval()  # torch.ops.aten: no equivalent is swapped in
    with pytest.raises(ValueError, match=r"measure\(\) differentiates the model twice.*hardsigmoid_backward"):
        measure(model, torch.rand(2, 3, 4, 4, dtype=torch.float64))
