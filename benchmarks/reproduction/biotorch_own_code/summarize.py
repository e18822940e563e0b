"""Per-epoch, last-epoch and best-epoch test error of BioTorch cells, from BioTorch's own log.

Its trainer validates on MNIST's test set after every epoch (``* Acc@1 X`` lines in
``train.log``), keeps the checkpoint of the best one (the first maximum) and, at the end,
evaluates that checkpoint once more (the last ``* Acc@1`` line). Writes ``OUT_DIR/summary.json``
and prints one line per cell.

usage: summarize.py OUT_DIR [OUT_DIR ...]
"""

import json
import re
import sys
from pathlib import Path


def summarize(out: Path) -> dict:
    """The summary of one cell's folder."""
    log = out / "train.log"
    text = log.read_text() if log.exists() else ""
    accs = [float(a) for a in re.findall(r"^ \* Acc@1 ([0-9.]+) Acc@", text, re.M)]
    finished = "Test Results saved in" in text
    errors = [round(100.0 - a, 3) for a in (accs[:-1] if finished else accs)]
    s: dict = {"finished": finished, "epochs_done": len(errors), "per_epoch_test_error": errors}
    if errors:
        best = min(range(len(errors)), key=lambda i: (errors[i], i))
        s |= {"last_epoch_test_error": errors[-1], "best_test_error": errors[best],
              "best_epoch": best + 1}  # fmt: skip
    if finished:
        s["final_evaluation_test_error"] = round(100.0 - accs[-1], 3)
    wall = re.search(r"^wall_seconds (\d+)", text, re.M)
    if wall:
        s["wall_seconds"] = int(wall.group(1))
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    return s


def main() -> None:
    for arg in sys.argv[1:]:
        s = summarize(Path(arg))
        short = {k: v for k, v in s.items() if k != "per_epoch_test_error"}
        print(arg, json.dumps(short))


if __name__ == "__main__":
    main()
