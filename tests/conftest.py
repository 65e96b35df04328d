import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter (read when a kernel is
    # defined, so it must be set before lcnn_plugin.kernels is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test (the data is not part of the repo)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is not present (../shared/data is provided beside the checkout, not in it)")
    return p


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def per_model(names: list[str]) -> list[str]:
    """The registered models the expensive per-model tests run on: every family (lcnn_,
    lcnn_standard_, lcnn_softplus_) at depth 10 and 18, both stems, and lcnn_resnet50 (the
    bottleneck block). ``LCNN_ALL_MODELS=1`` runs them on all: depth 34 is depth 18's blocks and
    stems, more of them; the other depth-50 variants are those blocks with the stems and
    families above."""
    if os.environ.get("LCNN_ALL_MODELS") == "1":
        return names
    return [n for n in names if "resnet34" not in n and ("resnet50" not in n or n == "lcnn_resnet50")]
