"""Every registered LCNN model behaves like a good timm model."""

import pytest
import timm
import torch
from conftest import per_model
from safetensors.torch import load_file, save_file

import lcnn_plugin  # noqa: F401 - registers the models
from lcnn_plugin.layers import CenteredSoftplus, LipschitzBatchNorm2d, SNConv2d, SNLinear

MODELS = timm.list_models("lcnn_*")


def test_registry_lists_every_variant():
    for depth in (18, 34, 50):
        for stem in ("", "_cifar"):
            for kind in ("lcnn_resnet", "lcnn_standard_resnet", "lcnn_softplus_resnet"):
                assert f"{kind}{depth}{stem}" in MODELS
    for kind in ("lcnn_resnet", "lcnn_standard_resnet", "lcnn_softplus_resnet"):
        assert f"{kind}10_w16_cifar" in MODELS
    assert len(MODELS) == 21


def test_small_variant_widths():
    m = timm.create_model("lcnn_resnet10_w16_cifar")
    assert [f["num_chs"] for f in m.feature_info] == [16, 16, 32, 64, 128]
    assert len(m.layer1) == 1 and m.num_features == 128
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        timm.create_model("lcnn_resnet18_cifar", width=0)


def _warm(model: torch.nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """A few training forwards so that BN statistics and σ move away from their init."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    model.eval()


@pytest.mark.parametrize("name", per_model(MODELS))
def test_builds_runs_and_round_trips(name, tmp_path):
    in_chans = 1 if "34" in name else 3
    model = timm.create_model(name, num_classes=7, in_chans=in_chans)
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)
    sd = model.state_dict()
    assert cfg["first_conv"] + ".weight" in sd and cfg["classifier"] + ".weight" in sd
    x = torch.rand(2, in_chans, 32, 32)

    # forward and backward, finite
    model.train()
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # timm's checks: forward_features matches num_features; pre_logits; reset_classifier(0)
    _warm(model, x)
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    ref = model(x)
    model.reset_classifier(0)
    assert torch.equal(model(x), pooled)
    model.reset_classifier(7)
    assert isinstance(model.get_classifier(), SNLinear)

    # kind: the right layers
    acts = [m for m in model.modules() if isinstance(m, (CenteredSoftplus, torch.nn.Softplus))]
    if name.startswith("lcnn_resnet"):
        assert all(isinstance(a, CenteredSoftplus) for a in acts)
        assert any(isinstance(m, SNConv2d) for m in model.modules())
        assert any(isinstance(m, LipschitzBatchNorm2d) for m in model.modules())
    else:
        beta = 1000.0 if "standard" in name else 10.0
        assert all(type(a) is torch.nn.Softplus and a.beta == beta for a in acts)
        assert not any(isinstance(m, (SNConv2d, LipschitzBatchNorm2d)) for m in model.modules())

    # safetensors round trip through timm's pretrained_cfg_overlay: identical eval outputs
    model = timm.create_model(name, num_classes=7, in_chans=in_chans)
    _warm(model, x)
    ref = model(x)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    assert set(load_file(str(path))) == set(model.state_dict())
    again = timm.create_model(
        name, pretrained=True, num_classes=7, in_chans=in_chans,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=7, input_size=(in_chans, 32, 32)),
    ).eval()
    assert torch.equal(again(x), ref)
    # fine-tuning to another number of classes and channels: the new head and the adapted
    # first conv are normalised by σ of their own weights (eval norm 1, by SVD)
    new = timm.create_model(name, pretrained=True, num_classes=3, in_chans=in_chans + 1,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=7,
                                                        input_size=(in_chans, 32, 32))).eval()
    new(torch.rand(1, in_chans + 1, 32, 32))
    applied = new.fc.normalized_weight().detach().double()
    assert torch.linalg.matrix_norm(applied, ord=2).item() == pytest.approx(1.0, rel=1e-3)
    if isinstance(new.conv1, SNConv2d):
        shape = (in_chans + 1, 8, 8)
        w = new.conv1.normalized_weight(shape).detach().double()
        conv = lambda t: torch.nn.functional.conv2d(t, w, stride=new.conv1.stride, padding=new.conv1.padding)  # noqa: E731
        jac = torch.func.jacrev(conv)(torch.zeros(1, *shape, dtype=torch.float64)).reshape(-1, 64 * shape[0])
        assert torch.linalg.matrix_norm(jac, ord=2).item() == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("name", per_model(MODELS))
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    x = torch.rand(1, 3, 64, 64)
    feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [64 // f.shape[-1] for f in feats] == model.feature_info.reduction()


@pytest.mark.parametrize("name", per_model(MODELS))
def test_torch_compile_matches_eager(name):
    model = timm.create_model(name, num_classes=5)
    x = torch.rand(2, 3, 32, 32)
    _warm(model, x, steps=1)
    ref = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)


def test_torch_compile_inductor_eval():
    """Inductor (the default backend) on a one-block-per-stage LCNN; every registered model
    is compiled with aot_eager above (inductor's CPU compile of each would take minutes)."""
    torch._dynamo.reset()
    model = lcnn_plugin.models.LcnnResNet(layers=(1, 1, 1, 1), stem="cifar", num_classes=5)
    x = torch.rand(2, 3, 16, 16)
    _warm(model, x, steps=1)
    ref = model(x)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)


def test_grad_checkpointing_gives_the_same_step():
    a = timm.create_model("lcnn_resnet18_cifar", num_classes=5).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    a.train()
    with torch.no_grad():
        a(x)  # first forward initialises the power iterations
    b = timm.create_model("lcnn_resnet18_cifar", num_classes=5).double()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    b.train()
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        if n.split(".")[-1].startswith("sn_"):  # BN statistics are updated on recompute
            torch.testing.assert_close(ba, bb, msg=n)


def test_bad_input_and_foreign_state_dict():
    model = timm.create_model("lcnn_resnet18_cifar")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), got \(2, 4, 8, 8\)"):
        model(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="expected input of shape"):
        model(torch.rand(3, 8, 8))
    other = timm.create_model("lcnn_resnet18_cifar", num_classes=100)
    with pytest.raises(RuntimeError, match=r"size mismatch for fc\.weight"):
        model.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="beta must be > 0"):
        timm.create_model("lcnn_resnet18_cifar", beta=-1.0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        timm.create_model("lcnn_resnet18_cifar", gamma=0.0)
    with pytest.raises(ValueError, match="stem"):
        lcnn_plugin.models.LcnnResNet(stem="deep")
