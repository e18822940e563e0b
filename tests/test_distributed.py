"""DDP on 2 CPU processes (gloo): one step on two half batches equals one single-process step on
the whole batch, for rules whose feedback state could drift between ranks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import biograd
from biograd import distributed

RULES = ["bp", "fa", "brsf", "kp", "dfa", "sdfa"]
BATCH = 12


def _model(rule: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.Tanh(),
        nn.Linear(16, 5),
    ).double()
    example = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    return biograd.convert(model, rule, seed=3, example_input=example)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 5, (BATCH,), generator=g
    )


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, y = _data()
        share = BATCH // world
        for rule in RULES:
            plain = _model(rule)
            ignored = distributed.feedback_buffer_names(plain)
            assert bool(ignored) == (rule not in {"bp", "kp"}), ignored
            model = distributed.wrap(plain)
            _step(model, x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
            if rank == 0:
                torch.save(distributed.unwrap(model).state_dict(), Path(out_dir) / f"{rule}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_states() -> dict[str, dict[str, torch.Tensor]]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        return {rule: torch.load(Path(tmp) / f"{rule}.pt", weights_only=True) for rule in RULES}


@pytest.mark.parametrize("rule", RULES)
def test_ddp_step_equals_single_process_step(rule: str, ddp_states: dict) -> None:
    model = _model(rule)
    x, y = _data()
    _step(model, x, y)
    single = model.state_dict()
    ddp = ddp_states[rule]
    assert single.keys() == ddp.keys()
    for key, value in single.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ddp[key], value, rtol=1e-10, atol=1e-12, msg=key)
        else:
            assert ddp[key] == value, key
    # The step really moved the weights (the comparison is not between two untouched models).
    assert not torch.equal(single["3.weight"], _model(rule).state_dict()["3.weight"])
