"""The learning-rate probe of docs/results.md, section 4: 200 SGD steps (12,800 MNIST images,
batch 64, the BioTorch LeNet settings) per ``rule:lr`` argument; prints train loss, test accuracy
on 2,000 test images and seconds per epoch. Data from ``$BIOGRAD_DATA_DIR`` (default
/work/shared/data)."""

import os
import sys

import torch

from biograd.errors import BiogradError
from biograd.experiment.config import validate
from biograd.experiment.trainer import run

torch.set_num_threads(1)
root = os.environ.get("BIOGRAD_DATA_DIR", "/work/shared/data")
for arg in sys.argv[1:]:
    rule, lr = arg.split(":")[0], float(arg.split(":")[1])
    cfg = validate(
        {
            "data": {
                "name": "mnist",
                "root": root,
                "batch_size": 64,
                "subset": 12800,
                "test_subset": 2000,
            },
            "model": {"name": "lenet", "init": "xavier"},
            "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-3},
            "epochs": 1,
            "rules": [rule],
            "seeds": [0],
        }
    )
    try:
        r = run(cfg, f"runs/probe/{rule}-{lr}", progress=False, echo=None)
        print(rule, lr, r[0]["train_loss"], r[0]["test_acc"], r[0]["epoch_time_s"], flush=True)
    except BiogradError as e:  # a diverged rate is a result, not a crash
        print(rule, lr, "ERR", e, flush=True)
