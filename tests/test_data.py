"""The embedded dataset, ImageFolder loading and the batched augmentation."""

import torch
import torch.nn.functional as F
from PIL import Image

from lcnn_plugin.data import augment, load_dataset, synthetic


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic("test", n=500), synthetic("test", n=500)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (500, 3, 32, 32) and a.images.dtype == torch.uint8
    counts = torch.bincount(a.labels, minlength=10)
    assert counts.min() >= 30 and len(a.classes) == 10
    assert not torch.equal(synthetic("train", n=500).images, a.images)  # splits differ


def test_synthetic_classes_survive_horizontal_flips():
    """A flipped image is an image of the same class (the orientation sign is random):
    the flipped class mean matches its own class mean far better than any other."""
    d = synthetic("train", n=4000)
    x = d.images.float()
    spectra = [torch.fft.rfft2(x[d.labels == c]).abs().mean(0) for c in range(10)]  # per channel
    flipped = [torch.fft.rfft2(x[d.labels == c].flip(3)).abs().mean(0) for c in range(10)]
    for c in range(10):
        dists = torch.stack([(flipped[c] - s).norm() for s in spectra])
        assert int(dists.argmin()) == c


def test_augment_is_a_padded_crop_possibly_flipped():
    x = torch.rand(6, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(6):
        windows = [padded[i, :, oy:oy + 8, ox:ox + 8] for oy in range(5) for ox in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    again = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)


def test_image_folder_with_splits(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pixels = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for j in range(2):
                arr = torch.randint(0, 256, (4, 4, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(arr.numpy()).save(tmp_path / split / cls / f"{j}.png")
                pixels[(split, cls, j)] = arr.permute(2, 0, 1)
    d = load_dataset(str(tmp_path), "test")
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(d.images[3], pixels[("test", "dog", 1)])
    x, y = d.floats(slice(0, 2))
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0


def _class_sorted_folder(root, classes: int = 10, per_class: int = 10):
    gen = torch.Generator().manual_seed(1)
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for j in range(per_class):
                arr = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(arr.numpy()).save(root / split / f"c{c}" / f"{j}.png")
    return root


def test_train_evaluates_a_sample_across_every_class(tmp_path):
    """A class-sorted ImageFolder: the per-epoch test accuracy is on a seeded sample that spans
    the classes (the first 20 images would be two classes), and equals the trained model's
    accuracy on exactly the images the metrics name."""
    from lcnn_plugin.train import TrainConfig, load_checkpoint, train

    data = _class_sorted_folder(tmp_path / "data")
    cfg = TrainConfig(model="lcnn_resnet10_w16_cifar", objective="standard", data=str(data), epochs=1,
                      batch_size=20, max_train_examples=40, eval_examples=20, seed=3)
    record = train(cfg, tmp_path / "run", progress=False).history[0]
    assert record["test_examples"] == 20 and "seeded random 20 of 100" in record["test_data"]
    sample = load_dataset(str(data), "test").sample(20, seed=3)
    assert len(set(sample.labels.tolist())) >= 7  # the first 20 images are 2 classes
    model = load_checkpoint(tmp_path / "run")[0]
    x, y = sample.floats()
    with torch.no_grad():
        assert record["test_acc"] == float((model(x).argmax(1) == y).double().mean())
