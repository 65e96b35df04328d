"""What timm's own tests/test_models.py asks of every model, asserted here for ours so that CI
keeps it (that file needs timm's sdist; run it with TORCH_BACKEND=lcnn_plugin, see README)."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import per_model
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import lcnn_plugin  # noqa: F401 - registers the models

MODELS = timm.list_models("lcnn_*") + timm.list_models("cifar_resnet*")


@pytest.mark.parametrize("name", MODELS)
def test_default_cfgs_on_the_meta_device(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
    cfg = model.default_cfg
    assert model.in_chans == cfg["input_size"][0] and model.num_classes == cfg["num_classes"]
    assert model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    assert tuple(feats.shape[2:]) == tuple(cfg["pool_size"]) and feats.shape[1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape[1] == model.num_features
    model.to(torch.bfloat16)  # no stale caches after a dtype change
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(0, "")  # no global pooling: the unpooled features
    assert model(x).shape == feats.shape
    assert cfg["first_conv"] + ".weight" in model.state_dict()
    # every tensor on the requested device; a new head on the model's device and dtype
    fresh = timm.create_model(name, device="meta", dtype=torch.float32)
    assert all(t.device.type == "meta" for t in [*fresh.parameters(), *fresh.buffers()])
    fresh.to(dtype=torch.float64)
    fresh.reset_classifier(2)
    head = list(fresh.get_classifier().parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in head)
    assert cfg["classifier"] + ".weight" in fresh.state_dict()


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's FX feature extractor of the model's output (as in its tests)."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", per_model(MODELS))
def test_fx_forward_and_backward_with_timms_tracer(name: str) -> None:
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # as timm's test: a first forward in inference mode, eval
        ref = model(x)
        out = tuple(_fx_model(model)(x).values())[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    fx = _fx_model(timm.create_model(name, num_classes=7)).train()
    out = tuple(fx(x).values())[0]
    out.mean().backward()
    assert all(p.grad is not None for p in fx.parameters() if p.requires_grad)
    feats = timm.models.create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])
    assert torch.isfinite(tuple(feats(x).values())[0]).all()


# one model of each class and stem (each first eval forward converges every σ at a new shape)
@pytest.mark.parametrize("name", ["lcnn_resnet10_w16_cifar", "lcnn_standard_resnet18", "cifar_resnet20",
                                  "cifar_resnet32"])
def test_features_only_matches_the_forward(name: str) -> None:
    """timm's features_only wrapper: one map per feature_info entry, of its channels and
    reduction, and the last one is forward_features' output."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    feats = timm.create_model(name, num_classes=10, features_only=True).eval()
    src = model.state_dict()  # keys: the model's own, or under the hook wrapper's "body."
    feats.load_state_dict({k: src[k if k in src else k.split(".", 1)[1]] for k in feats.state_dict()})
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        outs, ref = feats(x), model.forward_features(x)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()
    assert [32 // o.shape[-1] for o in outs] == feats.feature_info.reduction()
    # untrained deep nets reach large activations: compare relative to their scale
    torch.testing.assert_close(outs[-1], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
