"""The paper's training objectives (inputs in [0, 1], pixel units).

Every objective is ``Objective(...)(model, x, y) -> ObjectiveOutput`` (loss, logits and the
value of each term), and every coefficient is a constructor argument:

==================  =========================================================================
``standard``        cross-entropy
``lcnn``            CE + λ_β Σᵢ βᵢ + λ_γ Σ_k |log γ_k| (every CenteredSoftplus, every γ-BN and
                    every learnable spectral-norm scale of a converted model)
``gradreg``         CE + λ_g · s_g · ‖∇ₓ CE_mean‖² / B  (double backprop; s_g = 1e5)
``lcnn+gradreg``    both
``cure``            CE + λ_c · s_c · ‖∇ℓ(x + h z) − ∇ℓ(x)‖² / B, z = sign(g)/‖sign(g)‖ per
                    example (detached), h = 1, ℓ the batch-mean CE (s_c = 1e3)
``adversarial``     CE on torchattacks PGDL2 examples (ε = 0.1, step 0.01, 3 steps, random
                    start; true labels, or the prediction with ``use_predicted=True``)
``softplus+wd``     CE; the objective of the softplus(β = 10) baseline, whose weight decay is
                    the optimiser's
==================  =========================================================================

Defaults are the reference script's: λ_β = λ_γ = 1e-3, λ_g = 1e-3, λ_c = 1e-3 (see
paper-notes §3). β and γ must be excluded from weight decay: :func:`param_groups` does it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .layers.activation import CenteredSoftplus
from .layers.norm import LipschitzBatchNorm2d
from .validate import choice

OBJECTIVES = ("standard", "lcnn", "gradreg", "lcnn+gradreg", "cure", "adversarial", "softplus+wd")

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "make_objective", "param_groups"]


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE_mean, logits, ∇ₓ CE_mean) with x a leaf that requires grad (even under no_grad)."""
    with torch.enable_grad():
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        (g,) = torch.autograd.grad(ce, x, create_graph=create_graph and torch.is_grad_enabled())
    return ce, logits, g


@dataclass
class Objective:
    """CE plus the penalties whose coefficient is non-zero (see the module docstring)."""

    name: str = "standard"
    lambda_beta: float = 0.0
    lambda_gamma: float = 0.0
    lambda_grad: float = 0.0
    grad_scale: float = 1e5
    lambda_cure: float = 0.0
    cure_scale: float = 1e3
    cure_h: float = 1.0
    adversarial: bool = False
    adv_eps: float = 0.1
    adv_step: float = 0.01
    adv_steps: int = 3
    use_predicted: bool = False

    def __post_init__(self) -> None:
        for k in ("lambda_beta", "lambda_gamma", "lambda_grad", "grad_scale", "lambda_cure", "cure_scale",
                  "cure_h", "adv_eps", "adv_step"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise ValueError(f"{self.name}: {k} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.adv_steps, int) and self.adv_steps >= 1):
            raise ValueError(f"{self.name}: adv_steps must be an integer >= 1, got {self.adv_steps!r}")

    @property
    def differentiates_twice(self) -> bool:
        """Whether the loss holds an input gradient (GradReg, CURE): its backward is a double one."""
        return self.lambda_grad > 0 or self.lambda_cure > 0

    def second_derivative_mode(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                               ) -> Callable[[], contextlib.AbstractContextManager]:
        """What to run the training steps in (:func:`lcnn_plugin.ops.second_derivative_mode`),
        from one probe step on (x, y) in eval mode (no statistics updated; parameter gradients
        cleared after)."""
        if not self.differentiates_twice:
            return contextlib.nullcontext
        was = model.training
        model.eval()
        try:
            return ops.second_derivative_mode(lambda: self(model, x, y).loss.backward(),
                                              f"the {self.name} objective")
        finally:
            model.train(was)
            model.zero_grad(set_to_none=True)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        B = x.shape[0]
        terms: dict[str, float] = {}
        if self.adversarial:
            x = self.attack(model, x, y)
        needs_grad = self.lambda_grad > 0 or self.lambda_cure > 0
        if needs_grad:
            xg = x.detach().requires_grad_(True)
            ce, logits, g = _input_grad(model, xg, y, create_graph=True)
        else:
            logits = model(x)
            ce = F.cross_entropy(logits, y)
        loss = ce
        terms["ce"] = float(ce.detach())
        if self.lambda_grad > 0:
            pen = self.lambda_grad * self.grad_scale * g.pow(2).sum() / B
            loss = loss + pen
            terms["gradreg"] = float(pen.detach())
        if self.lambda_cure > 0:
            s = torch.sign(g.detach()).flatten(1)
            z = (s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x)
            xh = (x.detach() + self.cure_h * z).requires_grad_(True)
            _, _, gh = _input_grad(model, xh, y, create_graph=True)
            pen = self.lambda_cure * self.cure_scale * (gh - g).pow(2).sum() / B
            loss = loss + pen
            terms["cure"] = float(pen.detach())
        if self.lambda_beta > 0:
            betas = [m.beta for m in model.modules() if isinstance(m, CenteredSoftplus)]
            if betas:
                pen = self.lambda_beta * torch.stack(betas).sum()
                loss = loss + pen
                terms["beta"] = float(pen.detach())
        if self.lambda_gamma > 0:
            logs = [p.abs() for _, p in _log_scales(model)]
            if logs:
                pen = self.lambda_gamma * torch.stack(logs).sum()
                loss = loss + pen
                terms["gamma"] = float(pen.detach())
        return ObjectiveOutput(loss, logits, terms)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGDL2 examples for adversarial training, the model left in its current mode (the
        reference attacks in train mode); outputs are clipped to [0, 1]."""
        import torchattacks

        atk = torchattacks.PGDL2(model, eps=self.adv_eps, alpha=self.adv_step, steps=self.adv_steps,
                                 random_start=True)
        if model.training:
            atk.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)
        if self.use_predicted:
            with torch.no_grad():
                y = model(x).argmax(1)
        return atk(x, y).detach()


_DEFAULTS: dict[str, dict] = {
    "standard": {},
    "lcnn": dict(lambda_beta=1e-3, lambda_gamma=1e-3),
    "gradreg": dict(lambda_grad=1e-3),
    "lcnn+gradreg": dict(lambda_beta=1e-3, lambda_gamma=1e-3, lambda_grad=1e-3),
    "cure": dict(lambda_cure=1e-3),
    "adversarial": dict(adversarial=True),
    "softplus+wd": {},
}


def make_objective(name: str, **overrides: float | int | bool) -> Objective:
    """The objective ``name`` (one of :data:`OBJECTIVES`) with the reference defaults, any
    coefficient overridden by keyword."""
    choice("objective", name, OBJECTIVES)
    unknown = set(overrides) - set(Objective.__dataclass_fields__) - {"name"}
    if unknown:
        raise ValueError(f"objective {name!r}: unknown settings {sorted(unknown)}")
    return Objective(name=name, **{**_DEFAULTS[name], **overrides})


def _log_scales(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, log γ) of every γ-BN and (name, log c) of every spectral norm's learnable scale
    c (see :func:`lcnn_plugin.convert`'s preserve_function): the terms of λ_γ Σ|log γ|."""
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(m, LipschitzBatchNorm2d):
            yield prefix + "log_gamma", m.log_gamma
        if isinstance(getattr(m, "sn_log_scale", None), nn.Parameter):
            yield prefix + "sn_log_scale", m.sn_log_scale


def _no_decay_names(model: nn.Module) -> Iterator[str]:
    for mod_name, m in model.named_modules():
        if isinstance(m, CenteredSoftplus) and isinstance(m.log_beta, nn.Parameter):
            yield (f"{mod_name}." if mod_name else "") + "log_beta"
    yield from (n for n, p in _log_scales(model) if isinstance(p, nn.Parameter))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser groups: every parameter with ``weight_decay`` except β, γ and the spectral-norm
    scales (none)."""
    skip = set(_no_decay_names(model))
    decay = [p for n, p in model.named_parameters() if n not in skip]
    no_decay = [p for n, p in model.named_parameters() if n in skip]
    groups = [dict(params=decay, weight_decay=weight_decay)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0))
    return groups
