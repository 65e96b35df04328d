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
