"""The option-A CIFAR ResNet: timm registration, the pretrained checkpoint, the exact path."""

import timm
import torch
from conftest import shared_path
from torchvision import datasets, transforms

import lcnn_plugin  # noqa: F401
from lcnn_plugin.curvature import measure, piecewise_linear_violations


def test_registered_and_shaped():
    m = timm.create_model("cifar_resnet20", num_classes=7).eval()
    assert sum(p.numel() for p in m.parameters()) == 269_722 - 650 + 64 * 7 + 7
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    m.reset_classifier(3)
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    assert timm.create_model("cifar_resnet32").layer1[4].conv2.weight.shape == (16, 16, 3, 3)


def test_piecewise_linear_path_agrees_with_lanczos():
    torch.manual_seed(0)
    m = timm.create_model("cifar_resnet20").double().train()
    with torch.no_grad():
        m(torch.rand(32, 3, 32, 32, dtype=torch.float64))
    m.eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert piecewise_linear_violations(m, x[:1]) == []
    exact = measure(m, x, method="piecewise_linear")
    lanczos = measure(m, x, method="lanczos", tol=1e-9, max_iter=40)
    torch.testing.assert_close(exact.grad_norm, lanczos.grad_norm, rtol=1e-10, atol=0)
    torch.testing.assert_close(exact.hessian_norm, lanczos.hessian_norm, rtol=1e-7, atol=0)


def test_pretrained_checkpoint_accuracy():
    ckpt = shared_path("data", "pretrained", "resnet20-12fca82f.th")
    images = shared_path("data", "cifar10_test1000_png")
    overlay = dict(file=str(ckpt))
    m = timm.create_model("cifar_resnet20", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    ds = datasets.ImageFolder(str(images), transform=transforms.ToTensor())
    hits = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(ds, batch_size=250):
            hits += int((m(x).argmax(1) == y).sum())
    assert len(ds) == 1000 and hits / len(ds) >= 0.91  # 91.5% measured (its README: 91.5%)
