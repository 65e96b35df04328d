"""lcnn_plugin.convert / strip and the InputSpectralNorm hook, against dense ground truths."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import shared_path
from timm.layers import BatchNormAct2d, Conv2dSame, ScaledStdConv2d, StdConv2d
from torch import nn

from lcnn_plugin import ConversionError, convert, strip
from lcnn_plugin.layers import (
    CenteredSoftplus,
    InputSpectralNorm,
    LipschitzBatchNorm2d,
    LipschitzBatchNormAct2d,
    SNConv2d,
    SNLinear,
)
from lcnn_plugin.objectives import make_objective, param_groups


def dense(fn, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of the affine map fn on inputs of ``shape`` (bias removed), float64."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        zero = fn(torch.zeros(1, *shape, dtype=torch.float64))
        return (fn(basis) - zero).reshape(n, -1).T


def op_norm(fn, shape: tuple[int, ...]) -> float:
    return float(torch.linalg.matrix_norm(dense(fn, shape), ord=2))


LAYERS = {
    "conv2d_same": lambda: Conv2dSame(3, 4, 3, stride=2),
    "std_conv": lambda: StdConv2d(3, 4, 3, padding=1),
    "scaled_std_conv": lambda: ScaledStdConv2d(3, 4, 3, padding=1),
    "timm_linear": lambda: timm.layers.Linear(7, 5),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_input_spectral_norm_against_the_unrolled_operator(kind: str) -> None:
    layer = LAYERS[kind]().double()
    shape = (7,) if kind == "timm_linear" else (3, 7, 6)
    reference = copy.deepcopy(layer)
    sigma_true = op_norm(layer, shape)
    hook = InputSpectralNorm.apply(layer)
    x = torch.randn(3, *shape, dtype=torch.float64)
    layer.train()
    layer(x)  # the trained shape: σ converged
    layer.eval()
    y = layer(x)
    sigma = float(layer.sn_sigma)
    assert sigma == pytest.approx(sigma_true, rel=1e-4)
    # eval applies f(x/σ) with the frozen σ, exactly
    torch.testing.assert_close(y, reference.forward(x / sigma), rtol=0, atol=1e-12)
    # the normalised layer's operator norm is σ_true/σ, and lipschitz() (Lanczos) finds it
    assert op_norm(layer, shape) == pytest.approx(sigma_true / sigma, rel=1e-9)
    assert hook.lipschitz(layer) == pytest.approx(sigma_true / sigma, rel=1e-8)
    # training forwards carry σ's gradient: d‖A v‖/dW (v the forward's vector) equals a
    # finite difference of that function written out with the unnormalised layer
    layer.train()
    loss = layer(x).square().sum()
    (g,) = torch.autograd.grad(loss, layer.weight)
    v = layer.sn_v.detach().clone()
    w0 = layer.weight.detach().clone()
    d = torch.randn_like(w0)
    eps = 1e-6

    def loss_at(w: torch.Tensor) -> float:
        with torch.no_grad():
            reference.weight.copy_(w)
            s = (reference.forward(v) - reference.forward(torch.zeros_like(v))).norm()
            return float(reference.forward(x / s).square().sum())

    fd = (loss_at(w0 + eps * d) - loss_at(w0 - eps * d)) / (2 * eps)
    assert float((g * d).sum()) == pytest.approx(fd, rel=1e-5)


def test_input_spectral_norm_state_and_removal() -> None:
    layer = Conv2dSame(3, 4, 3, stride=2)
    original = layer.weight.detach().clone()
    InputSpectralNorm.apply(layer)
    InputSpectralNorm.enable_scale(layer, 2.0)
    layer.eval()
    x = torch.rand(2, 3, 9, 9)
    y = layer(x)
    assert set(layer.state_dict()) == {"weight", "bias", "sn_v", "sn_sigma", "sn_log_scale"}
    twin = Conv2dSame(3, 4, 3, stride=2)
    InputSpectralNorm.apply(twin)
    twin.load_state_dict(layer.state_dict())  # creates the scale, resizes sn_v
    twin.eval()
    torch.testing.assert_close(twin(x), y)
    with pytest.raises(ValueError, match="already spectrally normalised"):
        InputSpectralNorm.apply(layer)
    InputSpectralNorm.of(layer).remove(layer)
    assert InputSpectralNorm.of(layer) is None and set(layer.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(layer.weight, original)


class Tiny(nn.Module):
    """One of each: conv, 'same' conv, BN, BatchNormAct2d, gate, GroupNorm, max-pool, functional relu."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.GELU()
        self.same = Conv2dSame(8, 8, 3, stride=2)
        self.bnact = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.gate = nn.Sigmoid()
        self.norm = nn.GroupNorm(2, 8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = self.bnact(self.same(x))
        x = x * self.gate(x.mean((2, 3), keepdim=True))
        x = F.relu(self.norm(x))
        return self.fc(self.pool(x).mean((2, 3)))


def _trained_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give the BatchNorms non-trivial running statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def test_convert_reports_every_change_and_every_uncontrolled_part() -> None:
    x = torch.rand(4, 3, 12, 12)
    model = Tiny()
    new, report = convert(model, example_input=x, bound=True)
    assert new is not model and type(model.stem) is nn.Conv2d  # a copy by default
    assert isinstance(new.stem, SNConv2d) and isinstance(new.fc, SNLinear)
    assert isinstance(new.act, CenteredSoftplus)
    assert isinstance(new.bn, LipschitzBatchNorm2d)
    assert isinstance(new.bnact, LipschitzBatchNormAct2d) and isinstance(new.bnact.act, CenteredSoftplus)
    assert type(new.same) is Conv2dSame and InputSpectralNorm.of(new.same) is not None
    changes = {c.path: c.kind for c in report.changes}
    assert changes == {"stem": "conv", "bn": "batchnorm", "act": "activation", "same": "conv",
                       "bnact": "batchnorm", "bnact.act": "activation", "fc": "linear"}
    kept = {k.path: k.kind for k in report.kept}
    assert kept == {"": "functional", "gate": "gate", "norm": "normalization", "pool": "pooling"}
    assert "relu" in next(k.reason for k in report.kept if k.path == "")
    assert report.counts() == {"converted": {"conv": 2, "batchnorm": 2, "activation": 2, "linear": 1},
                               "kept": {"functional": 1, "gate": 1, "normalization": 1, "pooling": 1}}
    text = str(report)
    for path in ("gate", "norm", "pool", "<model>"):
        assert path in text
    assert report.bound is not None and report.bound.lipschitz is None  # the gate's product
    assert report.as_dict()["counts"] == report.counts()


def test_strict_exclude_and_double_conversion() -> None:
    x = torch.rand(2, 3, 12, 12)
    model = Tiny()
    with pytest.raises(ConversionError) as err:
        convert(model, example_input=x, strict=True, inplace=True)
    for part in ("gate", "norm", "pool", "calls relu"):
        assert part in str(err.value)
    assert type(model.stem) is nn.Conv2d  # nothing was changed before the error
    new, report = convert(model, example_input=x, exclude=["fc", "bn*"])
    assert type(new.fc) is nn.Linear and type(new.bn) is nn.BatchNorm2d and type(new.bnact) is BatchNormAct2d
    assert {k.path for k in report.kept if k.kind == "excluded"} == {"fc", "bn", "bnact"}
    with pytest.raises(ConversionError, match="already converted"):
        convert(new, example_input=x)
    new.fc = nn.Linear(8, 3)  # e.g. reset_classifier
    again, report = convert(new, example_input=x, allow_converted=True, exclude=["bn*"])
    assert [c.path for c in report.changes] == ["fc"] and isinstance(again.fc, SNLinear)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert("resnet18")
    with pytest.raises(ValueError, match="max_pool"):
        convert(model, example_input=x, max_pool="min")
    with pytest.raises(ValueError, match="beta"):
        convert(model, example_input=x, beta=0.0)
    with pytest.raises(ConversionError, match="example_input is required"):
        convert(nn.Sequential(nn.Linear(3, 3)))


def test_converted_layers_have_unit_operator_norm() -> None:
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    new, _ = convert(Tiny().double(), example_input=x)
    new.eval()
    stem = op_norm(lambda t: F.conv2d(t, new.stem.normalized_weight(), padding=1), (3, 10, 10))
    assert stem == pytest.approx(1, rel=1e-3)
    assert op_norm(new.same, (8, 10, 10)) == pytest.approx(1, rel=1e-3)
    fc = float(torch.linalg.matrix_norm(new.fc.normalized_weight().detach(), ord=2))
    assert fc == pytest.approx(1, rel=1e-3)


def test_preserve_function_keeps_a_relu_network() -> None:
    torch.manual_seed(1)
    model = timm.create_model("cifar_resnet20")
    x = torch.rand(16, 3, 32, 32)
    _trained_bn(model, x)
    new, report = convert(model, example_input=x, preserve_function=True)
    new.eval()
    with torch.no_grad():
        ref, out = model(x), new(x)
    # s0 is within log 2/β of ReLU; the SN scales and γ carry the rest exactly
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert report.agreement["top1_agreement"] == float((ref.argmax(1) == out.argmax(1)).double().mean())
    assert report.agreement["max_abs_diff"] == pytest.approx(float((out - ref).abs().max()), rel=1e-5)
    for m in new.modules():
        if isinstance(m, LipschitzBatchNorm2d):
            assert float(m.lipschitz_scale()) == 1.0
        if isinstance(m, CenteredSoftplus):
            assert float(m.beta) == pytest.approx(1000.0)
    # the LCNN objective pulls every scale toward 1 like γ, and no weight decay is applied to it
    logs = [m.sn_log_scale for m in new.modules() if isinstance(m, (SNConv2d, SNLinear))]
    logs += [m.log_gamma for m in new.modules() if isinstance(m, LipschitzBatchNorm2d)]
    obj = make_objective("lcnn", lambda_beta=0.0, lambda_gamma=1.0)
    out = obj(new.train(), x, torch.zeros(16, dtype=torch.long))
    assert out.terms["gamma"] == pytest.approx(float(sum(p.detach().abs() for p in logs)), rel=1e-6)
    no_decay = {id(p) for g in param_groups(new, 5e-4) if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(p) for p in logs} <= no_decay


def test_preserve_function_on_the_pretrained_resnet20() -> None:
    from lcnn_plugin.data import load_dataset

    ckpt = shared_path("data", "pretrained", "resnet20-12fca82f.th")
    data = load_dataset(str(shared_path("data", "cifar10_test1000_png")), "test")
    x, y = data.floats()
    model = timm.create_model("cifar_resnet20", pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt)))
    new, report = convert(model.eval(), example_input=x[:8], preserve_function=True)
    new.eval()
    with torch.no_grad():
        ref, out = model(x).argmax(1), new(x).argmax(1)
    assert float((ref == out).double().mean()) >= 0.99
    acc_ref, acc_new = float((ref == y).double().mean()), float((out == y).double().mean())
    assert abs(acc_new - acc_ref) <= 0.005
    assert report.agreement["top1_agreement"] == 1.0


def test_strip_bakes_normalisation_into_plain_layers() -> None:
    class WithStdConv(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.same = StdConv2d(8, 8, 3, padding=1)

    x = torch.rand(4, 3, 12, 12)
    for model in (Tiny(), WithStdConv()):
        new, _ = convert(_trained_bn(model, x), example_input=x, preserve_function=True)
        new.train()
        new(x)  # a training step moves σ and the BN statistics
        new.eval()
        plain = strip(new)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), new(x), rtol=0, atol=1e-5)
        for m in plain.modules():
            assert not isinstance(m, (SNConv2d, SNLinear, LipschitzBatchNorm2d))
            assert InputSpectralNorm.of(m) is None and "sn_sigma" not in m._buffers
        assert type(plain.bnact) is BatchNormAct2d and isinstance(plain.bnact.act, CenteredSoftplus)


def test_timm_model_stays_a_timm_model() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    model = timm.create_model("resnet10t", num_classes=7)
    new, _ = convert(model, example_input=x)
    new.eval()
    with torch.no_grad():
        torch.testing.assert_close(new.forward_head(new.forward_features(x)), new(x))
    # state_dict round trip into a fresh conversion of the same architecture
    new.train()
    new(x)
    twin, _ = convert(timm.create_model("resnet10t", num_classes=7), example_input=x)
    twin.load_state_dict(new.state_dict())
    new.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), new(x))
    # a new classifier is plain until converted; allow_converted converts just it
    new.reset_classifier(3)
    assert type(new.get_classifier()) is nn.Linear
    new, report = convert(new, example_input=x, allow_converted=True)
    assert [c.path for c in report.changes] == ["fc"] and new(x).shape == (2, 3)
    # features_only models convert too
    feats, _ = convert(timm.create_model("resnet10t", features_only=True), example_input=x)
    assert [f.shape[1] for f in feats(x)] == feats.feature_info.channels()
    # torch.compile of the converted model equals eager
    compiled = torch.compile(new.eval(), backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), new(x), rtol=1e-5, atol=1e-5)


def test_max_pool_avg_gives_a_finite_curvature_bound() -> None:
    x = torch.rand(2, 3, 32, 32)
    _, keep = convert(timm.create_model("resnet10t"), example_input=x, bound=True)
    _, avg = convert(timm.create_model("resnet10t"), example_input=x, max_pool="avg", bound=True)
    assert keep.bound.lipschitz is not None and keep.bound.curvature is None
    assert avg.bound.curvature is not None and math.isfinite(avg.bound.curvature)
    assert ("maxpool", "pooling") in {(c.path, c.kind) for c in avg.changes}


def test_cli_convert_and_finetuning_a_converted_model(tmp_path, capsys) -> None:
    import json

    from lcnn_plugin.cli import main
    from lcnn_plugin.train import TrainConfig, load_checkpoint, train

    assert main(["convert", "resnet10t", "--input-size", "3,32,32", "--no-bound", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["converted"] == {"conv": 14, "batchnorm": 14, "activation": 11, "linear": 1}
    assert main(["convert", "resnet10t", "--strict"]) == 2  # the max-pool stays: strict refuses
    assert "maxpool" in capsys.readouterr().err
    cfg = TrainConfig(model="cifar_resnet20", convert=dict(preserve_function=True), objective="lcnn",
                      epochs=1, batch_size=16, max_train_examples=32, eval_examples=16)
    run = train(cfg, tmp_path / "run", progress=False)
    model, meta = load_checkpoint(tmp_path / "run")
    assert meta["config"]["convert"] == {"preserve_function": True}
    assert any(isinstance(m, SNConv2d) and m.sn_log_scale is not None for m in model.modules())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), run.model.eval()(x))
    with pytest.raises(ValueError, match="convert must be a dict"):
        TrainConfig(convert=dict(inplace=True)).validate()
