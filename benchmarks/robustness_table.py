"""First robustness table on real data: the pretrained CIFAR-10 ResNets under PGD, the
ResNet-20 converted into an LCNN (lcnn_plugin.convert, preserve_function) and the same after a
short fine-tune with the LCNN objective (and with LCNN+GradReg), with the curvature of each model.

    python benchmarks/robustness_table.py --pretrained ../shared/data/pretrained \
        --data ../shared/data/cifar10_test1000_png --finetune-data ../shared/data/cifar10 \
        --out benchmarks/results/cifar10_robustness

PGD L2 at ε ∈ {0.05, 0.1, 0.15, 0.2} and PGD L∞ at 8/255 (10 steps, α = 2.5ε/10), on a
seeded random ``--n`` images of an ImageFolder (all of them by default), with the honesty
checks; gradient norm, Hessian norm and normalised curvature (Lanczos) on a seeded random
``--curvature-n`` of those (ImageFolders are sorted by class: never the first N). With
``--finetune-data`` the converted ResNet-20 is fine-tuned (``--steps`` SGD steps of batch 128 at
lr ``--lr``: 4 epochs over a random subset of steps/4 batches, lr ×0.1 twice in the last epoch;
run directory under OUT_runs/). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm

import lcnn_plugin  # noqa: F401
from lcnn_plugin import convert
from lcnn_plugin.curvature import report as curvature_report
from lcnn_plugin.data import load_dataset
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
    p.add_argument("--finetune-data", default=None,
                   help="ImageFolder with train/ and test/ sub-folders: fine-tune the converted "
                        "ResNet-20 on it")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (300)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (0.01)")
    p.add_argument("--objectives", default="lcnn,lcnn+gradreg",
                   help="fine-tuning objectives, one fine-tuned model each (lcnn,lcnn+gradreg)")
    p.add_argument("--lambda-grad", type=float, default=1e-4,
                   help="GradReg coefficient of the fine-tunes (1e-4; the from-scratch 1e-3 wrecks a "
                        "pretrained ReLU net's accuracy within a few steps)")
    p.add_argument("--curvature-n", type=int, default=200, help="images whose curvature is measured (200)")
    args = p.parse_args()
    data = load_dataset(args.data, "test").sample(args.n, seed=0)
    curv_data = data.sample(args.curvature_n, seed=1)
    loader = list(data.batches(args.batch))
    models = {}
    for name, file in CHECKPOINTS.items():
        path = Path(args.pretrained) / file
        if not path.exists():
            sys.exit(f"robustness_table: checkpoint {path} not found")
        overlay = dict(file=str(path))
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        models[name] = (f"{name} (pretrained {file})", model)
    overlay = dict(file=str(Path(args.pretrained) / CHECKPOINTS["cifar_resnet20"]))
    converted, _ = convert(models["cifar_resnet20"][1], example_input=next(iter(loader))[0][:8],
                           preserve_function=True)
    models["cifar_resnet20+convert"] = (
        "cifar_resnet20 converted (lcnn_plugin.convert, preserve_function; no fine-tuning)", converted)
    if args.finetune_data:
        batch = 128
        for objective in [o for o in args.objectives.split(",") if o]:
            obj_kwargs = dict(lambda_grad=args.lambda_grad) if "gradreg" in objective else {}
            cfg = TrainConfig(model="cifar_resnet20",
                              model_kwargs=dict(pretrained=True, pretrained_cfg_overlay=overlay),
                              convert=dict(preserve_function=True), objective=objective,
                              objective_kwargs=obj_kwargs, data=args.finetune_data, epochs=4,
                              batch_size=batch, lr=args.lr, max_train_examples=args.steps // 4 * batch,
                              eval_examples=1000)
            t0 = time.perf_counter()
            run = train(cfg, f"{args.out}_runs/finetune-{objective}")
            secs = time.perf_counter() - t0
            settings = ", ".join([objective] + [f"{k}={v}" for k, v in obj_kwargs.items()])
            desc = (f"cifar_resnet20 converted + fine-tuned ({settings}; {args.steps} steps of {batch} "
                    f"at lr {args.lr}, {secs:.0f} s)")
            models[f"cifar_resnet20+convert+{objective}"] = (desc, run.model)
    results, md = [], []
    summary = ["| model | clean | L2 0.05 | L2 0.1 | L2 0.15 | L2 0.2 | L∞ 8/255 | E‖∇ₓℓ‖ | E‖∇²ₓℓ‖ "
               "| E C_f |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (description, model) in models.items():
        model.eval()
        t0 = time.perf_counter()
        dataset = f"CIFAR-10 {data.name}"
        res = evaluate(model, loader, ["pgdl2", "pgd"], {"L2": [0.05, 0.1, 0.15, 0.2], "Linf": [8 / 255]},
                       model_name=name, dataset=dataset)
        secs = time.perf_counter() - t0
        curv = curvature_report(model, curv_data.batches(args.batch), progress=False)
        results.append(dict(res.as_dict(), description=description, seconds=secs, curvature=curv.stats,
                            curvature_n=curv.n))
        md += [f"## {name}: {description}", "", str(res), "", f"(evaluated in {secs:.0f} s on this machine)",
               "", "```", str(curv), "```", ""]
        accs = [f"{100 * r['robust_acc']:.1f}" for r in res.as_dict()["rows"]]
        stats = [f"{curv.stats[k]['mean']:.3g}" for k in ("grad_norm", "hessian_norm", "curvature")]
        summary.append(f"| {name} | {100 * res.clean_acc:.1f} | " + " | ".join(accs + stats) + " |")
    cmd = "python " + " ".join(sys.argv)
    Path(args.out + ".json").write_text(json.dumps(dict(command=cmd, results=results), indent=1))
    title = "# Robustness on CIFAR-10 test images"
    intro = [title, "", f"Command: `{cmd}`", "",
             f"Robust accuracy (%) under 10-step PGD on {data.name}; curvature means over "
             f"{curv_data.name} (per-example cross-entropy, Lanczos). Details and honesty checks below.",
             "", *summary, ""]
    Path(args.out + ".md").write_text("\n".join([*intro, *md]))
    print("\n".join(md))


if __name__ == "__main__":
    main()
