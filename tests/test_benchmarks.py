"""The CPU benchmark scripts run end to end in their quick mode and write their tables (the
numbers themselves are measured by hand and recorded in docs/performance.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import benchmarks/common.py
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_step_time_quick(tmp_path: Path) -> None:
    step_time = _load("step_time")
    assert (
        step_time.main(["--quick", "--cases", "mlp", "--rules", "fa,brsf", "--out", str(tmp_path)])
        == 0
    )
    text = (tmp_path / "step_time.md").read_text()
    for rule in ("bp", "fa", "brsf"):
        assert f"| {rule} |" in text
    assert json.loads((tmp_path / "step_time.json").read_text())


def test_direct_memory_quick(tmp_path: Path) -> None:
    direct_memory = _load("direct_memory")
    assert direct_memory.main(["--quick", "--reps", "2", "--out", str(tmp_path)]) == 0
    text = next(tmp_path.glob("direct_memory*.md")).read_text()
    assert "hashed" in text and "dense" in text
