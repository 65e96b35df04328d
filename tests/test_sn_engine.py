"""The spectral-norm engine's contracts on whole models: eval outputs that depend only on the
state and the input, layers at most 1 + 1e-3 from creation (measured without the engine),
gradient checkpointing that sees the forward's σ, and checkpoints written before the engine."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.utils.checkpoint
from conftest import per_model
from safetensors.torch import load_file
from timm.layers import Conv2dSame
from torch import nn

from lcnn_plugin import convert, model_bound
from lcnn_plugin.curvature import measure
from lcnn_plugin.layers import is_spectrally_normalized
from lcnn_plugin.models import LcnnResNet

DATA = Path(__file__).parent / "data"


def _trained_lcnn() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("lcnn_resnet10_w16_cifar")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(5):
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _converted_timm() -> nn.Module:
    torch.manual_seed(0)
    model, _ = convert(timm.create_model("resnet18", num_classes=10), example_input=torch.rand(2, 3, 32, 32))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("make", [_trained_lcnn, _converted_timm], ids=["lcnn_resnet", "converted_resnet18"])
def test_eval_outputs_do_not_depend_on_what_was_evaluated_before(make) -> None:
    model = make()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        for size in (24, 40, 48):
            model(torch.rand(2, 3, size, size, generator=gen))
        assert torch.equal(model(x), ref)
    model_bound(model, (3, 40, 40))
    measure(model, torch.rand(2, 3, 24, 24, generator=gen))
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def _power_norm(f, shape: tuple[int, ...], tol: float = 1e-8, max_iter: int = 2000) -> float:
    """‖A‖₂ of the linear map v ↦ f(v) − f(0) by float64 power iteration on AᵀA, the adjoint
    by autograd: written here, independent of the engine."""
    v = torch.randn(1, *shape, dtype=torch.float64)
    v = v / v.norm()
    zero = f(torch.zeros_like(v)).detach()
    prev = 0.0
    for _ in range(max_iter):
        v.requires_grad_(True)
        av = f(v) - zero
        (g,) = torch.autograd.grad(av, v, av.detach())
        est = float(av.detach().norm())
        if abs(est - prev) <= tol * est:
            break
        prev = est
        v = (g / g.norm()).detach()
    return est


@pytest.mark.parametrize("name", per_model(timm.list_models("lcnn_*")))
def test_every_sn_layer_is_at_most_one_after_creation(name: str) -> None:
    model = timm.create_model(name, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 3, 8, 8))
    model.eval()
    layers = [(n, m) for n, m in model.named_modules() if is_spectrally_normalized(m)]
    assert layers
    for path, m in layers:
        m64 = copy.deepcopy(m).double().eval()
        shape = tuple(m.sn_v.shape) if isinstance(m, nn.Linear) else tuple(m.sn_v.shape[1:])
        norm = _power_norm(m64, shape)
        assert norm <= 1 + 1e-3, f"{name}: {path} has operator norm {norm}"
        assert norm >= 1 - 1e-3, f"{name}: {path} has operator norm {norm}"  # and it is normalised


class _SameBlocks(nn.Module):
    """Two timm 'same' convs (normalised on their input by the engine's affine kind) run under
    torch.utils.checkpoint when asked."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(Conv2dSame(3, 6, 3, stride=2), nn.ReLU(), Conv2dSame(6, 6, 3), nn.ReLU())
        self.head = nn.Linear(6, 4)
        self.checkpointing, self.reentrant = False, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training:
            x = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant)
        else:
            x = self.body(x)
        return self.head(x.mean((2, 3)))


def _grads_with_and_without_checkpointing(model: nn.Module, enable, x: torch.Tensor) -> None:  # noqa: ANN001
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    enable(b)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12, msg=n)
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        if n.split(".")[-1].startswith("sn_"):  # BN statistics are updated on recompute
            torch.testing.assert_close(ba, bb, rtol=0, atol=0, msg=n)


def test_checkpointing_sees_the_forwards_sigma_on_a_converted_timm_model() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    model, _ = convert(timm.create_model("resnet18", num_classes=5).double(), example_input=x)
    _grads_with_and_without_checkpointing(model, lambda m: m.set_grad_checkpointing(True), x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_sees_the_forwards_sigma_through_input_spectral_norm(reentrant: bool) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    model, _ = convert(_SameBlocks(reentrant).double(), example_input=x)
    x.requires_grad_(True)  # reentrant checkpointing gives gradients only through inputs that need them
    _grads_with_and_without_checkpointing(model, lambda m: setattr(m, "checkpointing", True), x)


class _Small(nn.Module):
    """The converted model of tests/data/make_sn_checkpoint_47d8113.py."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.same = Conv2dSame(6, 6, 3, stride=2)
        self.act = nn.ReLU()
        self.fc = timm.layers.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.same(self.act(self.stem(x)))).mean((2, 3)))


def test_checkpoint_written_before_the_engine_loads_with_equal_outputs() -> None:
    saved = load_file(str(DATA / "sn_checkpoint_47d8113.safetensors"))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}

    net = LcnnResNet(layers=(1, 1, 1, 1), width=4, stem="cifar", num_classes=10)
    net.load_state_dict(part("resnet."))
    conv, _ = convert(_Small(), example_input=torch.rand(2, 3, 12, 12), preserve_function=True)
    conv.load_state_dict(part("converted."))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(saved["input.resnet"]), saved["logits.resnet"],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(conv.eval()(saved["input.converted"]), saved["logits.converted"],
                                   rtol=0, atol=1e-6)


def test_traced_and_compiled_without_graph_breaks() -> None:
    model = timm.create_model("lcnn_resnet10_w16_cifar")
    x = torch.rand(2, 3, 16, 16)
    model.train()
    with torch.no_grad():
        model(x)  # the trained shape
    for mode in (True, False):  # traced per mode, as torch.fx bakes Python branches on .training
        a = copy.deepcopy(model).train(mode)
        b = torch.fx.symbolic_trace(copy.deepcopy(model).train(mode))
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train())(x)
    assert explained.graph_break_count == 0, explained.break_reasons
