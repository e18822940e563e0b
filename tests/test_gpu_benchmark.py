"""The GPU throughput benchmark (benchmarks/gpu_throughput.py) runs end to end on the CPU with
--quick, writes its markdown and JSON, and reports a failing configuration without stopping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import biograd
from benchmark_scripts import load


def test_quick_cpu_run_reports_every_configuration_and_survives_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load("gpu_throughput")
    real_convert, real_step = biograd.convert, bench.train_step

    def convert(model: Any, rule: str, **kwargs: Any) -> Any:
        if rule == "kp":
            raise RuntimeError("simulated conversion failure\nsecond line")
        return real_convert(model, rule, **kwargs)

    def train_step(r: Any, x: Any, y: Any, amp: Any) -> None:
        if r.rule == "fa" and amp is not None and r.times:  # fails mid-timing, bf16 only
            raise RuntimeError("simulated out of memory")
        real_step(r, x, y, amp)

    monkeypatch.setattr(biograd, "convert", convert)
    monkeypatch.setattr(bench, "train_step", train_step)
    argv = ["--quick", "--device", "cpu", "--models", "resnet20,resnet18"]
    argv += ["--rules", "fa,kp,dfa", "--precisions", "fp32,bf16", "--out", str(tmp_path)]
    assert bench.main(argv) == 0

    record = json.loads((tmp_path / "gpu_throughput.json").read_text())
    text = (tmp_path / "gpu_throughput.md").read_text()
    rows = {(r["workload"], r["precision"], r["rule"]): r for r in record["rows"]}
    assert set(rows) == {
        (w, p, r)
        for w in ("resnet20", "resnet18")
        for p in ("fp32", "bf16")
        for r in ("bp", "fa", "kp", "dfa")
    }
    assert record["environment"]["torch"] and record["environment"]["device"] == "cpu"
    assert record["settings"]["rules"] == ["bp", "fa", "kp", "dfa"]  # the baseline comes first

    for (workload, precision, rule), row in rows.items():
        assert row["mode"] == "eager" and row["batch"] >= 2
        if rule == "kp" or (rule == "fa" and precision == "bf16"):
            assert row["status"] == "error"
            expected = "conversion failure" if rule == "kp" else "out of memory"
            assert row["error"].startswith("RuntimeError: simulated " + expected)
            continue
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["ms_per_step"] / 1e3))
        assert row["steps"] == record["settings"]["reps"] * record["settings"]["inner"]
        assert row["peak_mib"] is None  # CUDA only
        base = rows[(workload, precision, "bp")]
        assert row["x_bp"] == pytest.approx(base["ms_per_step"] / row["ms_per_step"])
        assert row["x_bp_p10"] <= row["x_bp_p90"]
    assert rows[("resnet20", "fp32", "bp")]["in_shape"] == [3, 16, 16]
    assert rows[("resnet18", "fp32", "bp")]["classes"] == 1000

    assert "CIFAR ResNet-20" in text and "ResNet-18, 3x224x224" in text
    assert "| kp | error |" in text and "simulated conversion failure" in text
    assert "second line" not in text  # one line per error
    assert "| dfa | " in text and "eager bf16" in text


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("gpu_throughput")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--rules", "bp,nosuchrule"])
    assert exc.value.code == 2
    assert "nosuchrule" in capsys.readouterr().err


def test_compiled_rules_do_not_share_compiled_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # brsf breaks the graph; compiled first in the same process, its frames must not capture fa's
    # model (which alone compiles to one graph) nor be recompiled while the rules are timed.
    bench = load("gpu_throughput")
    tiny = bench.Workload("lenet", "lenet", "LeNet", (1, 28, 28), 10, 2, "dense", (1, 28, 28), 2)
    monkeypatch.setitem(bench.WORKLOADS, "lenet", tiny)
    argv = ["--quick", "--device", "cpu", "--models", "lenet", "--rules", "brsf,fa"]
    argv += ["--modes", "compile", "--compile-backend", "eager", "--precisions", "fp32"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_throughput.json").read_text())["rows"]
    by_rule = {r["rule"]: r for r in rows}
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    assert by_rule["bp"]["dynamo_graphs"] == 1 and by_rule["fa"]["dynamo_graphs"] == 1
    assert by_rule["brsf"]["dynamo_graphs"] >= 1
    assert all(r["graphs_compiled_while_timed"] == 0 for r in (by_rule["bp"], by_rule["fa"]))


def test_spent_time_budget_skips_the_rest(tmp_path: Path) -> None:
    bench = load("gpu_throughput")
    argv = ["--quick", "--device", "cpu", "--models", "resnet20", "--rules", "fa"]
    assert bench.main([*argv, "--max-minutes", "1e-9", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_throughput.json").read_text())["rows"]
    assert [(r["rule"], r["precision"], r["status"]) for r in rows] == [
        ("bp", "fp32", "skipped"),
        ("fa", "fp32", "skipped"),
        ("bp", "bf16", "skipped"),
        ("fa", "bf16", "skipped"),
    ]
    assert "| fa | skipped |" in (tmp_path / "gpu_throughput.md").read_text()
