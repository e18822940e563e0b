"""Write a config in BioTorch's own format (modelled on its ``benchmark_configs/cifar10/le_net/
sgd/*.yaml``) for LeNet on MNIST or Fashion-MNIST at the protocol of its Benchmarks.md: 32x32
inputs, Xavier init, SGD momentum 0.9, weight decay 1e-3, batch 64, lr / 10 at epochs 50 and 75,
deterministic, on the CPU. BioTorch publishes no MNIST or Fashion-MNIST config: this one is rebuilt from that
text. Its data sets normalise with their own mean and std (MNIST 0.1307 / 0.3081, Fashion-MNIST
0.2859 / 0.3530, ``biotorch/datasets``).

usage: gen_config.py RULE LR SEED EPOCHS OUT_DIR DATA_DIR [--milestones 50 75]
                     [--dataset mnist|fashion_mnist]
"""

import argparse
from pathlib import Path

import yaml

MODES = {"bp": "backpropagation", "fa": "fa", "dfa": "dfa", "usf": "usf", "brsf": "brsf",
         "frsf": "frsf"}  # fmt: skip


def config(rule: str, lr: float, seed: int, epochs: int, out: Path, data_dir: Path,
           milestones: list[int], dataset: str = "mnist") -> dict:  # fmt: skip
    """The BioTorch config of one cell."""
    options = {"constrain_weights": False, "init": "xavier", "gradient_clip": False}
    return {
        "experiment": {"name": "run", "output_dir": str(out), "seed": seed, "deterministic": True},
        "data": {
            "dataset": dataset,
            "dataset_path": str(data_dir),
            "target_size": 32,
            "num_workers": 0,
        },
        "model": {
            "architecture": "le_net_mnist",
            "mode": {"type": MODES[rule], "options": options},
            "pretrained": False,
            "loss_function": {"name": "cross_entropy"},
        },
        "training": {
            "hyperparameters": {"epochs": epochs, "batch_size": 64},
            "optimizer": {"type": "SGD", "lr": lr, "weight_decay": 1e-3, "momentum": 0.9},
            "lr_scheduler": {"type": "multistep_lr", "gamma": 0.1, "milestones": milestones},
            "metrics": {
                "top_k": 5,
                "display_iterations": 500,
                "layer_alignment": True,
                "weight_ratio": True,
            },
        },
        "infrastructure": {"gpus": -1},
        "evaluation": True,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rule", choices=sorted(MODES))
    p.add_argument("lr", type=float)
    p.add_argument("seed", type=int)
    p.add_argument("epochs", type=int)
    p.add_argument("out_dir", type=Path)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--milestones", type=int, nargs="*", default=[50, 75])
    p.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
    a = p.parse_args()
    out = a.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(a.rule, a.lr, a.seed, a.epochs, out, a.data_dir.resolve(), a.milestones, a.dataset)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    main()
