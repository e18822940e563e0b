"""Stability of ``step_time.py`` across runs: one markdown table of the ``x bp`` ratio of every
(network, rule) in each run, their median and range, and whether the median meets the target.

    .venv/bin/python benchmarks/summarize_runs.py runs/bench1/step_time.json runs/bench2/step_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: rows (network, rule), one column per run, then median, range and target."""
    ratios: dict[tuple[str, str], list[float | None]] = {}
    targets: dict[tuple[str, str], float | None] = {}
    batches: dict[str, int] = {}
    for i, rec in enumerate(records):
        for res in rec["results"]:
            batches[res["case"]] = res["batch"]
            for row in res["rows"]:
                key = (res["case"], row["rule"])
                ratios.setdefault(key, [None] * len(records))[i] = row["ratio"]
                targets[key] = row["target"]
    order = {
        (res["case"], row["rule"]): (ci, ri)
        for rec in sorted(records, key=lambda r: sum(len(x["rows"]) for x in r["results"]))
        for ci, res in enumerate(rec["results"])
        for ri, row in enumerate(res["rows"])
    }
    ratios = dict(sorted(ratios.items(), key=lambda kv: order[kv[0]]))
    runs = " | ".join(f"run {i + 1}" for i in range(len(records)))
    lines = [
        f"| network | rule | {runs} | median | min-max | target | met (median) |",
        "|---|---|" + "---:|" * (len(records) + 2) + "---:|---|",
    ]
    for (case, rule), values in ratios.items():
        if rule == "bp":
            continue
        got = [v for v in values if v is not None]
        med = statistics.median(got)
        target = targets[(case, rule)]
        met = "" if target is None else ("yes" if med <= target else "**no**")
        cells = " | ".join("" if v is None else f"{v:.3f}" for v in values)
        lines.append(
            f"| {case} (batch {batches[case]}) | {rule} | {cells} | {med:.3f} | "
            f"{min(got):.3f}-{max(got):.3f} | {'' if target is None else f'<= {target:.2f}'} "
            f"| {met} |"
        )
    dates = ", ".join(rec["machine"]["date_utc"] for rec in records)
    return "\n".join(lines) + f"\n\nRuns started: {dates}.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="step_time.json files")
    args = parser.parse_args(argv)
    print(table([json.loads(p.read_text()) for p in args.runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
