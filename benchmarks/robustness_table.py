"""First robustness table on real data: the pretrained CIFAR-10 ResNets under PGD, and two
small models trained here (standard and LCNN+GradReg ResNet-10/w16).

    python benchmarks/robustness_table.py --pretrained ../shared/data/pretrained \
        --data ../shared/data/cifar10_test1000_png --train-data ../shared/data/cifar10 \
        --out benchmarks/results/cifar10_robustness

PGD L2 at ε ∈ {0.05, 0.1, 0.15, 0.2} and PGD L∞ at 8/255 (10 steps, α = 2.5ε/10), on the
first ``--n`` images of an ImageFolder, with the honesty checks. With ``--train-data`` the
two small models are trained first (``--train-examples`` images, ``--epochs`` epochs, runs
under OUT_runs/). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
from torchvision import datasets, transforms

import lcnn_plugin  # noqa: F401
from lcnn_plugin.robustness import evaluate
from lcnn_plugin.train import TrainConfig, train

CHECKPOINTS = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet32": "resnet32-d509ac18.th"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="folder with the akamaster checkpoints")
    p.add_argument("--data", required=True, help="ImageFolder of CIFAR-10 test images")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--n", type=int, default=1000, help="number of test images (1000)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--train-data", default=None,
                   help="ImageFolder with train/ and test/ sub-folders: train the two small models on it")
    p.add_argument("--train-examples", type=int, default=10_000, help="training images of the small models")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the small models (5)")
    args = p.parse_args()
    ds = datasets.ImageFolder(args.data, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(args.n, len(ds)))),
                                         batch_size=args.batch)
    models = {}
    for name, file in CHECKPOINTS.items():
        path = Path(args.pretrained) / file
        if not path.exists():
            sys.exit(f"robustness_table: checkpoint {path} not found")
        overlay = dict(file=str(path))
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        models[f"{name} (pretrained {file})"] = model
    if args.train_data:
        for label, (arch, objective) in {"standard": ("lcnn_standard_resnet10_w16_cifar", "standard"),
                                         "lcnn+gradreg": ("lcnn_resnet10_w16_cifar", "lcnn+gradreg")}.items():
            cfg = TrainConfig(model=arch, objective=objective, data=args.train_data, epochs=args.epochs,
                              max_train_examples=args.train_examples, eval_examples=1000)
            t0 = time.perf_counter()
            run = train(cfg, f"{args.out}_runs/{label}")
            secs = time.perf_counter() - t0
            desc = (f"{arch} ({objective}; trained here, {args.epochs} epochs on {args.train_examples} "
                    f"images, {secs:.0f} s)")
            models[desc] = run.model
    results, md = [], []
    for name, model in models.items():
        model.eval()
        t0 = time.perf_counter()
        dataset = f"CIFAR-10 test[:{args.n}] ({Path(args.data).name})"
        res = evaluate(model, loader, ["pgdl2", "pgd"], {"L2": [0.05, 0.1, 0.15, 0.2], "Linf": [8 / 255]},
                       model_name=name.split(" ")[0], dataset=dataset)
        secs = time.perf_counter() - t0
        results.append(dict(res.as_dict(), description=name, seconds=secs))
        md += [f"## {name}", "", str(res), "", f"(evaluated in {secs:.0f} s on this machine)", ""]
    cmd = "python " + " ".join(sys.argv)
    Path(args.out + ".json").write_text(json.dumps(dict(command=cmd, results=results), indent=1))
    title = "# Robustness on CIFAR-10 test images"
    Path(args.out + ".md").write_text("\n".join([title, "", f"Command: `{cmd}`", "", *md]))
    print("\n".join(md))


if __name__ == "__main__":
    main()
