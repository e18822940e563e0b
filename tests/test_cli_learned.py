"""``biograd compare`` with the learned-feedback rules, end to end, in process."""

from __future__ import annotations

import csv
import math

from biograd.cli import main

TINY = ["data.subset=240", "data.test_subset=120", "model.widths=[32]"]


def test_compare_with_the_learned_feedback_rules(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    rules = "bp,fa,kp,wm,pfa,dkp,dfa"
    status = main(
        ["compare", "--rules", rules, "--epochs", "1", "--seeds", "1", "--out", str(out), *TINY]
    )
    stdout, _ = capsys.readouterr()
    assert status == 0
    for rule in rules.split(","):
        assert f"| {rule} | " in stdout
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["rule"] for r in rows) == sorted(rules.split(","))
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)  # 8 steps: no accuracy claim


def test_rule_options_reach_the_rule_and_bad_ones_are_a_user_error(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    status = main(
        [
            "compare",
            "--rules",
            "wm",
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--out",
            str(out),
            *TINY,
            "rule.options={lr: 0.01, every: 2}",
        ]
    )
    assert status == 0
    capsys.readouterr()
    status = main(
        [
            "compare",
            "--rules",
            "pfa",
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "bad"),
            *TINY,
            "rule.options={lr: 0.01}",
        ]
    )
    _, err = capsys.readouterr()
    assert status == 2 and "unknown rule option(s) lr" in err and err.count("\n") == 1
