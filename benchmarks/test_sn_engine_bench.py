"""The spectral-norm engine against the forward it replaced, in the same run.

``pytest benchmarks/test_sn_engine_bench.py`` times a training step (forward, cross-entropy,
backward, SGD) and an eval forward of ``--bench-train-model`` (lcnn_resnet18_cifar, batch
``--bench-train-batch``) with the engine's SN convs, and the same model with every SN conv
swapped for the pre-engine layer (the forward of 47d8113: one power step in training, the
frozen σ in eval, written here over the same ConvOperator), same weights and state,
interleaved rounds, best of each. Target (asserted when timing): engine ≤ 1.05× the old forward.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import timed
from torch import nn

from lcnn_plugin.layers import ConvOperator, SNConv2d
from lcnn_plugin.linalg import unit

TARGET = 1.05
ROUNDS = 7


class _PreEngineSNConv2d(nn.Conv2d):
    """SNConv2d's forward before the engine (state copied from an engine layer)."""

    def __init__(self, sn: SNConv2d) -> None:
        super().__init__(sn.in_channels, sn.out_channels, sn.kernel_size, sn.stride, sn.padding,
                         sn.dilation, sn.groups, sn.bias is not None, sn.padding_mode)
        self.load_state_dict({k: v for k, v in sn.state_dict().items() if not k.startswith("sn_")})
        self.register_buffer("sn_v", sn.sn_v.clone())
        self.register_buffer("sn_sigma", sn.sn_sigma.clone())
        self._op = ConvOperator(self, sn.sn_v.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError("bad input")
        if self.training:
            with torch.no_grad():
                self.sn_v.copy_(unit(self._op.rmatvec(self._op.matvec(self.sn_v))))
            sigma = self._op.matvec(self.sn_v.clone()).norm()
            with torch.no_grad():
                self.sn_sigma.copy_(sigma)
        else:
            sigma = self.sn_sigma
        return self._conv_forward(x, self.weight * (1.0 / sigma.clamp_min(1e-12)), self.bias)


def _pre_engine(model: nn.Module) -> nn.Module:
    old = copy.deepcopy(model)
    for path, m in list(old.named_modules()):
        if isinstance(m, SNConv2d):
            parent, _, name = path.rpartition(".")
            setattr(old.get_submodule(parent) if parent else old, name, _PreEngineSNConv2d(m))
    return old


@pytest.fixture
def pair(request):  # per test: the train-step benchmark moves the weights
    name = request.config.getoption("--bench-train-model")
    batch = request.config.getoption("--bench-train-batch")
    size = request.config.getoption("--bench-size")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    with torch.no_grad():
        model(x)  # the trained shape, converged
    return model, _pre_engine(model), x, y


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _eval(model: nn.Module, x: torch.Tensor):  # noqa: ANN202
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return forward


@pytest.mark.parametrize("work", ["train_step", "eval_forward"])
def test_engine_against_the_pre_engine_forward(benchmark, pair, work):
    model, old, x, y = pair
    mode = work == "train_step"
    model.train(mode), old.train(mode)
    if not mode:
        torch.testing.assert_close(model(x), old(x), rtol=0, atol=0)  # the same function
    new_fn, old_fn = (_step(model, x, y), _step(old, x, y)) if mode else (_eval(model, x), _eval(old, x))
    new_fn(), old_fn()  # warm-up
    t_new, t_old = [], []
    for _ in range(ROUNDS if not benchmark.disabled else 1):
        t_new.append(timed(new_fn)[1])
        t_old.append(timed(old_fn)[1])
    benchmark.pedantic(new_fn, rounds=3 if not benchmark.disabled else 1, iterations=1)
    ratio = min(t_new) / min(t_old)
    benchmark.extra_info.update(engine_seconds=min(t_new), pre_engine_seconds=min(t_old), ratio=ratio)
    if not benchmark.disabled:
        assert ratio <= TARGET, f"{work}: the engine takes {ratio:.3f}× the pre-engine forward"
