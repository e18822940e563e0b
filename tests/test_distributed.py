"""DDP on 2 CPU processes (gloo): one step on two half batches equals one single-process step on
the whole batch, for rules whose feedback state could drift between ranks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import biograd
from biograd import distributed

RULES = ["bp", "fa", "brsf", "kp", "dfa", "sdfa", "wm", "pfa", "dkp"]
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
        biograd.update_feedback(model)  # wm's mirror step: the same on every rank


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, y = _data()
        share = BATCH // world
        for rule in RULES:
            plain = _model(rule)
            ignored = distributed.feedback_buffer_names(plain)
            assert bool(ignored) == (rule not in {"bp", "kp", "dkp"}), ignored
            model = distributed.wrap(plain)
            _step(model, x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
            if rank == 0:
                torch.save(distributed.unwrap(model).state_dict(), Path(out_dir) / f"{rule}.pt")
            # Free each DDP reducer while the process group is alive: a reducer holding the last
            # reference to a gloo group can deadlock its destructor against the GIL at exit.
            del model, plain
            gc.collect()
        dist.barrier()
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


def test_a_group_init_creates_is_destroyed_before_the_interpreter_exits(tmp_path: Path) -> None:
    """A process group left alive into interpreter teardown can abort the process (gloo's worker
    threads: "terminate called without an active exception"); the group :func:`distributed.init`
    creates is destroyed at exit. The probe's handler, registered first, runs after ours."""
    probe = (
        "import atexit, torch.distributed as dist\n"
        "from biograd import distributed\n"
        "atexit.register(lambda: print('alive at exit:', dist.is_initialized()))\n"
        "distributed.launched = lambda: True\n"
        "print(distributed.init('gloo'))\n"
    )
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(0,", "1)", "alive", "at", "exit:", "False"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ biograd train under torchrun
TRAIN_CONFIG = """\
data: {name: digits, batch_size: 32, subset: 256, test_subset: 64}
model: {name: mlp, widths: [32]}
optim: {name: sgd, lr: 0.05, momentum: 0.9}
rules: [RULE]
seeds: [0]
epochs: 1
plots: false
"""


def _train(
    tmp: Path, out: str, rule: str, *, ranks: int, extra: list[str]
) -> subprocess.CompletedProcess:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(TRAIN_CONFIG.replace("RULE", rule))
    base = [sys.executable, "-m", "biograd.cli", "train", str(cfg), f"out={tmp / out}", *extra]
    if ranks > 1:
        base = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "biograd.cli", "train", str(cfg), f"out={tmp / out}", *extra,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(base, capture_output=True, text=True, timeout=240, env=env, cwd=tmp)


@pytest.mark.parametrize("rule", ["brsf"])
def test_train_under_torchrun_matches_one_process_and_resumes_on_one(
    tmp_path: Path, rule: str
) -> None:
    """`biograd train` on 2 gloo ranks: the global batch is split over the ranks, so one epoch gives
    the single-process weights (up to the order of the gradient sum); its checkpoint then resumes
    on a single process for a second epoch."""
    two = _train(tmp_path, "two", rule, ranks=2, extra=[])
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train(tmp_path, "one", rule, ranks=1, extra=[])
    assert one.returncode == 0, one.stderr[-3000:]
    ckpt = f"checkpoints/{rule}-seed0.pt"
    s2 = torch.load(tmp_path / "two" / ckpt, weights_only=True)
    s1 = torch.load(tmp_path / "one" / ckpt, weights_only=True)
    assert s2["step"] == s1["step"] == 8  # 256 examples / global batch 32
    for key, value in s1["model"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(s2["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # header + one epoch, written once (by rank 0)
    # Loss and accuracy are reduced over the ranks: the whole epoch's, as on one process.
    header = rows[0].split(",")
    two_row = dict(zip(header, rows[1].split(",")))
    one_row = dict(
        zip(header, (tmp_path / "one" / "metrics.csv").read_text().splitlines()[1].split(","))
    )
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert float(two_row[key]) == pytest.approx(float(one_row[key]), rel=1e-4, abs=1e-5), key
    # Resume the 2-rank checkpoint on one process: a run directory holding only that checkpoint,
    # trained for 2 epochs, starts at epoch 2 (its metrics.csv has no epoch-1 row) and ends where
    # an uninterrupted single-process 2-epoch run ends.
    cont = tmp_path / "cont"
    (cont / "checkpoints").mkdir(parents=True)
    (cont / ckpt).write_bytes((tmp_path / "two" / ckpt).read_bytes())
    done = _train(tmp_path, "cont", rule, ranks=1, extra=["epochs=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = [line.split(",")[2] for line in (cont / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["2"]
    whole = _train(tmp_path, "whole", rule, ranks=1, extra=["epochs=2"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = torch.load(cont / ckpt, weights_only=True)
    b = torch.load(tmp_path / "whole" / ckpt, weights_only=True)
    assert a["step"] == b["step"] == 16
    for key, value in b["model"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
