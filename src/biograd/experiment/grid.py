"""The cells of a reproduction grid: one (setting, rule, seed) each, one run directory each.

A grid ``out`` holds ``grid.yaml`` (spec and scale), ``results.md`` (rebuilt from the finished
cells after every cell) and one run directory per cell::

    <out>/<setting>/<rule>-seed<seed>/
        config.yaml  metrics.csv  alignment.csv   the cell's run (biograd.experiment.trainer)
        cell.yaml                                 written when the cell ends: status (done or
                                                  diverged), date, commit, machine, device
        checkpoints/  log.txt                     not for committing

Parallel cells never share a file. A cell with ``cell.yaml`` is finished and is never run again
(a diverged one included: delete its folder to retry); a cell with a checkpoint but no
``cell.yaml`` is partial and continues from its last checkpoint (``trainer.run(resume=True)``).
``--results-from DIR`` (a folder written by :func:`export`, e.g. committed under
``benchmarks/results/``) counts the cells finished there as finished here when their config
matches, so a grid started on one machine can be finished on another; ``results.md`` then
combines both.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import BiogradError, ConfigError, DivergedError
from .config import Config, apply_overrides, config_changes, dump, read_yaml, validate
from .runner import Spec, cell_configs, load_spec
from .table import gradient_curves, late_angle
from .trainer import checkpoint_path, read_rows, run

#: Keys of a cell's config that do not change its result (where it ran, how many threads).
VOLATILE = (
    "data.root",
    "data.download",
    "device",
    "channels_last",
    "threads",
    "out",
    "plots",
    "tensorboard",
    "rule_overrides",  # a cell trains one rule, its own overrides applied: the rest are inert
)
#: The files of a finished cell that are small enough to commit.
SMALL_FILES = ("config.yaml", "metrics.csv", "alignment.csv", "cell.yaml")


@dataclass(frozen=True)
class Cell:
    """One (setting, rule, seed) of a grid, with the config it trains with."""

    index: int
    setting: str
    rule: str
    seed: int
    config: Config

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.rule}-seed{self.seed}"

    def dir(self, out: Path) -> Path:
        return out / self.setting / f"{self.rule}-seed{self.seed}"


def grid_cells(spec: Spec, scale: str, data_dir: str | None = None) -> list[Cell]:
    """Every cell of ``spec`` at ``scale``, numbered setting by setting, then seed by seed, then
    rule by rule (so that a grid run in order completes every rule's first seed before any
    rule's second); ``--cell K`` and ``--list`` use these numbers. A cell's config is its rule's
    (``rule_overrides`` applied, see ``Config.for_rule``) with ``rules``/``seeds`` of one entry
    each: it does not depend on the other rules' settings, nor on the other seeds."""
    cells: list[Cell] = []
    for setting, cfg in cell_configs(spec, scale, data_dir).items():
        rules = cfg.run_rules()
        if "seeds" in spec.settings[setting]:  # a setting's own seeds win over rule_seeds
            seeds = {r: cfg.seeds for r in rules}
        else:
            seeds = {r: seeds_of(spec, scale, r, cfg.seeds) for r in rules}
        order = list(dict.fromkeys(s for r in rules for s in seeds[r]))
        for seed in order:
            for rule in rules:
                if seed not in seeds[rule]:
                    continue
                items = [("rules", [rule]), ("seeds", [seed]), ("rule.name", rule)]
                config = validate(apply_overrides(dump(cfg.for_rule(rule)), items))
                cells.append(Cell(len(cells), setting, rule, seed, config))
    return cells


def seeds_of(spec: Spec, scale: str, rule: str, seeds: list[int]) -> list[int]:
    """The seeds of ``rule``: the scale's ``rule_seeds``, else the spec's, else ``seeds``."""
    sc = spec.scales.get(scale)
    if sc is not None and rule in sc.rule_seeds:
        return sc.rule_seeds[rule]
    return spec.rule_seeds.get(rule, seeds)


# --- status -----------------------------------------------------------------------------------


def changed_keys(cell: Cell, folder: Path) -> list[str]:
    """The config keys (other than :data:`VOLATILE` ones) in which ``folder/config.yaml``
    differs from ``cell``'s config; ``["config.yaml"]`` when there is none. A key added to the
    config since the file was written takes its default there (a new key's default keeps the
    old behaviour), so adding one does not unfinish every committed cell; nor does a new default
    of a key that does nothing (``biograd.experiment.config.config_changes``)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return ["config.yaml"]
    diff = config_changes(read_yaml(path), cell.config)
    return [k for k in diff if k not in VOLATILE and k.split(".")[0] not in VOLATILE]


def finished(folder: Path) -> dict[str, Any] | None:
    """The ``cell.yaml`` of a finished cell folder, else None."""
    path = folder / "cell.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return data if data.get("status") in ("done", "diverged") else None


@dataclass
class Status:
    """Where a cell stands: 'done', 'diverged', 'partial' or 'todo'; ``folder`` holds its files
    (its own run directory, or a ``--results-from`` folder); ``epochs`` done so far."""

    state: str
    folder: Path
    epochs: int = 0

    @property
    def is_finished(self) -> bool:
        return self.state in ("done", "diverged")


def status(cell: Cell, out: Path, results_from: Sequence[Path] = ()) -> Status:
    """The status of ``cell`` in the grid ``out`` (and in the ``results_from`` folders)."""
    own = cell.dir(out)
    info = finished(own)
    if info is not None:
        return Status(str(info["status"]), own, _epochs(own, cell))
    for root in results_from:
        other = cell.dir(root)
        info = finished(other)
        if info is not None and not changed_keys(cell, other):
            return Status(str(info["status"]), other, _epochs(other, cell))
    epochs = _epochs(own, cell)
    if epochs or checkpoint_path(own, cell.rule, cell.seed).exists():
        return Status("partial", own, epochs)
    return Status("todo", own)


def _epochs(folder: Path, cell: Cell) -> int:
    rows = [r for r in read_rows(folder / "metrics.csv") if r["rule"] == cell.rule]
    return max((int(r["epoch"]) for r in rows), default=0)


# --- running ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where this process runs: host, CPU, cores, torch and (if any) the GPU."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The git commit of the biograd sources (``+dirty`` with uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_cell(
    cell: Cell,
    out: Path,
    *,
    progress: bool = False,
    echo: Callable[[str], None] | None = print,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Train ``cell`` into its run directory (continuing a partial one) and write its
    ``cell.yaml``; returns 'done' or 'diverged'. A cell that is finished already is left alone."""
    folder = cell.dir(out)
    info = finished(folder)
    if info is not None:
        return str(info["status"])
    if (folder / "config.yaml").is_file() and not changed_keys(cell, folder):
        from .config import save_config

        save_config(cell.config, folder / "config.yaml")  # where/how it runs may have changed
    started, code = _now(), commit()  # the code that runs, even if the checkout moves meanwhile
    record: dict[str, Any] = {"cell": cell.name, "index": cell.index}
    try:
        rows = run(
            cell.config, folder, resume=True, progress=progress, echo=echo, on_epoch=on_epoch
        )
        record.update(status="done", test_acc=rows[-1].get("test_acc") if rows else None)
    except DivergedError as e:
        record.update(status="diverged", reason=str(e))
        if echo is not None:
            echo(f"{cell.name}: {e}")
    record.update(
        started=started,
        finished=_now(),
        commit=code,
        device=cell.config.device,
        threads=torch.get_num_threads(),
        machine=machine(),
    )
    _write_atomic(folder / "cell.yaml", yaml.safe_dump(record, sort_keys=False))
    return str(record["status"])


def threads_per_job(jobs: int) -> int:
    """CPU threads for each of ``jobs`` parallel cells: max(1, cores // jobs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // jobs)


def run_parallel(
    spec_path: Path,
    scale: str,
    out: Path,
    cells: Sequence[Cell],
    jobs: int,
    *,
    data_dir: str | None,
    results_from: Sequence[Path],
    echo: Callable[[str], None] | None = print,
) -> list[Cell]:
    """Run ``cells`` as up to ``jobs`` processes at once (``biograd reproduce ... --cell K``, each
    with ``threads_per_job(jobs)`` CPU threads; on CUDA they share the GPU), logging each to its
    ``log.txt``. After the first failed cell no new one starts; returns the failed cells."""
    threads = threads_per_job(jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    base = [sys.executable, "-m", "biograd", "reproduce", str(spec_path), "--scale", scale]
    base += ["--out", str(out), "--threads", str(threads), "--no-results"]
    if data_dir is not None:
        base += ["--data-dir", data_dir]
    for r in results_from:
        base += ["--results-from", str(r)]
    pending = list(cells)
    running: dict[int, tuple[subprocess.Popen[bytes], Cell, Any]] = {}
    failed: list[Cell] = []
    try:
        while pending or running:
            while pending and len(running) < jobs and not failed:
                cell = pending.pop(0)
                cell.dir(out).mkdir(parents=True, exist_ok=True)
                log = (cell.dir(out) / "log.txt").open("ab")
                proc = subprocess.Popen(
                    [*base, "--cell", str(cell.index)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                running[proc.pid] = (proc, cell, log)
                if echo is not None:
                    echo(f"[{cell.index}] {cell.name}: started ({threads} threads)")
            if failed:
                pending.clear()
            for pid, (proc, cell, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[pid]
                state = status(cell, out, results_from).state
                if rc != 0 and state not in ("done", "diverged"):
                    failed.append(cell)
                    state = f"failed (exit {rc}): {_last_line(cell.dir(out) / 'log.txt')}"
                elif state == "done":
                    state = f"done, {_final(cell, out)}"
                if echo is not None:
                    echo(f"[{cell.index}] {cell.name}: {state}")
                write_results(out, load_spec(spec_path), scale, results_from)
            time.sleep(0.2)
    finally:
        for proc, _, log in running.values():  # interrupted: the cells stay partial
            proc.terminate()
            proc.wait()
            log.close()
    return failed


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _final(cell: Cell, out: Path) -> str:
    rows = [r for r in read_rows(cell.dir(out) / "metrics.csv") if r["rule"] == cell.rule]
    return f"test accuracy {100 * float(rows[-1]['test_acc']):.2f}%" if rows else "no rows"


def _check_before_writing(cells: Sequence[Cell], out: Path) -> None:
    """Errors that need no data, for every cell (device, model options, optimizer), and a
    ``biograd train``/``compare`` run in ``out``: found before the grid writes anything."""
    from .runner import check_grid_dir
    from .trainer import check

    check_grid_dir(out)
    for c in cells:
        try:
            check(c.config)
        except ConfigError as e:
            raise ConfigError(f"cell {c.name}: {e}") from None


def reproduce_grid(
    spec_path: Path,
    out: Path,
    *,
    scale: str = "full",
    data_dir: str | None = None,
    jobs: int = 1,
    cell: int | None = None,
    results_from: Sequence[Path] = (),
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    results: bool = True,
) -> str:
    """Run the unfinished cells of the grid (only cell ``cell`` when given; ``jobs`` at a time
    as processes when ``jobs > 1``, in this process otherwise), then write and return
    ``results.md``'s table (``results=False``: skip that, for cells run by a parent grid)."""
    spec = load_spec(spec_path)
    cells = grid_cells(spec, scale, data_dir)
    if cell is not None:
        if not 0 <= cell < len(cells):
            raise ConfigError(
                f"--cell {cell}: this grid has cells 0..{len(cells) - 1} (see --list)"
            )
        cells = [cells[cell]]
    _check_before_writing(cells, out)
    out.mkdir(parents=True, exist_ok=True)
    grid = yaml.safe_dump({"scale": scale, "spec": spec.model_dump(mode="json")}, sort_keys=False)
    _write_atomic(out / "grid.yaml", grid)
    todo = [c for c in cells if not status(c, out, results_from).is_finished]
    if echo is not None and cell is None:
        echo(
            f"{spec_path.stem} at scale {scale}: {len(cells) - len(todo)} of {len(cells)} cells finished, {len(todo)} to run"
        )
    if jobs > 1 and len(todo) > 1:
        from .trainer import load_data

        load_data(todo[0].config)  # decode (and cache) the data once before the cells start
        failed = run_parallel(
            spec_path,
            scale,
            out,
            todo,
            jobs,
            data_dir=data_dir,
            results_from=results_from,
            echo=echo,
        )
        if failed:
            raise BiogradError(
                f"{len(failed)} cell(s) failed, e.g. {failed[0].name}: "
                f"{_last_line(failed[0].dir(out) / 'log.txt')} (log: {failed[0].dir(out) / 'log.txt'})"
            )
    else:
        for c in todo:
            if echo is not None:
                echo(f"[{c.index}] {c.name}: {c.config.epochs} epochs")
            run_cell(c, out, progress=progress, echo=echo)
            if results:
                write_results(out, spec, scale, results_from)
    return write_results(out, spec, scale, results_from) if results else ""


# --- listing, results, export -----------------------------------------------------------------


def list_cells(spec: Spec, scale: str, out: Path, results_from: Sequence[Path] = ()) -> str:
    """One line per cell: index, status (with epochs done), setting, rule, seed, where."""
    lines = [f"{'cell':>4}  {'status':<16} {'setting':<20} {'rule':<6} seed  folder"]
    counts: dict[str, int] = {}
    for c in grid_cells(spec, scale):
        st = status(c, out, results_from)
        counts[st.state] = counts.get(st.state, 0) + 1
        state = f"{st.state} {st.epochs}/{c.config.epochs}" if st.state == "partial" else st.state
        lines.append(
            f"{c.index:>4}  {state:<16} {c.setting:<20} {c.rule:<6} {c.seed:>4}  {st.folder}"
        )
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


@dataclass
class _Group:
    values: list[float]
    seeds: list[int]
    epochs: list[int]
    angles: dict[str, list[float]]
    diverged: list[int]


def _late_angles(folder: Path, rule: str) -> dict[str, float]:
    """Each layer's late-training gradient angle in ``folder/alignment.csv``
    (:func:`~biograd.experiment.table.late_angle`: the mean over the last quarter of its
    measurements)."""
    curves = gradient_curves(folder / "alignment.csv")
    return {layer: late_angle(c) for (r, _, layer), c in curves.items() if r == rule}


def _groups(
    spec: Spec, scale: str, out: Path, results_from: Sequence[Path]
) -> tuple[dict[tuple[str, str], _Group], int, int, list[Cell]]:
    groups: dict[tuple[str, str], _Group] = {}
    cells = grid_cells(spec, scale)
    done = 0
    for c in cells:
        st = status(c, out, results_from)
        if not st.is_finished:
            continue
        done += 1
        g = groups.setdefault((c.setting, c.rule), _Group([], [], [], {}, []))
        if st.state == "diverged":
            g.diverged.append(c.seed)
            continue
        rows = [r for r in read_rows(st.folder / "metrics.csv") if r["rule"] == c.rule]
        if not rows:
            continue
        acc = float(rows[-1]["test_acc"])
        g.values.append(100 * acc if spec.metric == "test_acc" else 100 * (1 - acc))
        g.seeds.append(c.seed)
        g.epochs.append(int(rows[-1]["epoch"]))
        for layer, angle in _late_angles(st.folder, c.rule).items():
            g.angles.setdefault(layer, []).append(angle)
    return groups, done, len(cells), cells


def grid_rows(
    out: Path, spec: Spec, scale: str = "full", results_from: Sequence[Path] = ()
) -> list[dict[str, Any]]:
    """One row per (setting, rule) with finished cells: published value, ours (mean and sample
    std over seeds), seeds, epochs, diverged seeds, late-training per-layer gradient angles
    (mean over seeds)."""
    groups, _, _, _ = _groups(spec, scale, out, results_from)
    rows = []
    for (setting, rule), g in groups.items():
        rows.append(
            {
                "setting": setting,
                "rule": rule,
                "published": spec.published.get(setting, {}).get(rule),
                "ours": statistics.fmean(g.values) if g.values else math.nan,
                "std": statistics.stdev(g.values) if len(g.values) > 1 else 0.0,
                "seeds": len(g.values),
                "epochs": min(g.epochs, default=0),
                "diverged": g.diverged,
                "angles": {k: statistics.fmean(v) for k, v in g.angles.items()},
            }
        )
    return rows


def _data_line(cells: list[Cell]) -> str:
    from ..data import data_label

    if not cells:
        return ""
    d = cells[0].config.data
    names = sorted({data_label(c.config.data.name) for c in cells})
    where = (
        f"evaluated on {d.validation} held-out training examples (a validation split), not the test set"
        if d.validation
        else "evaluated on the test set"
    )
    return f"Data: {', '.join(names)}; {where}.\n\n"


def write_results(out: Path, spec: Spec, scale: str, results_from: Sequence[Path] = ()) -> str:
    """Rebuild ``out/results.md`` from every finished cell (here and in ``results_from``):
    published vs ours vs difference per (setting, rule), the late-training gradient angle of
    every layer, and for a sweep the best setting of each rule; returns the main table."""
    metric = "test error (%)" if spec.metric == "test_error" else "test accuracy (%)"
    _, done, total, cells = _groups(spec, scale, out, results_from)
    rows = grid_rows(out, spec, scale, results_from)
    if cells and cells[0].config.data.validation:
        metric = metric.replace("test", "validation")
    lines = [
        f"| setting | rule | published {metric} | ours | difference | seeds | epochs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pub = r["published"]
        if r["seeds"]:
            ours = f"{r['ours']:.2f}" + (f" ± {r['std']:.2f}" if r["seeds"] > 1 else "")
        else:
            ours = "diverged"
        if r["diverged"] and r["seeds"]:
            ours += f" ({len(r['diverged'])} diverged)"
        diff = f"{r['ours'] - pub:+.2f}" if pub is not None and r["seeds"] else "-"
        pub_text = f"{pub:.2f}" if pub is not None else "-"
        lines.append(
            f"| {r['setting']} | {r['rule']} | {pub_text} | {ours} | {diff} | {r['seeds']} | {r['epochs']} |"
        )
    table = "\n".join(lines)
    source = f"Published numbers: {spec.paper}.\n\n" if spec.paper else ""
    text = (
        f"# {spec.title} (scale: {scale})\n\n{source}{_data_line(cells)}"
        f"{done} of {total} cells finished.\n\n{table}\n\n"
        "Ours: mean ± sample std over seeds after the last epoch; difference = ours - published.\n"
    )
    angles = _angle_table(rows)
    if angles:
        text += (
            "\n## Gradient alignment per layer, late in training\n\nAngle (degrees) between the "
            "rule's weight update and backprop's: the mean over the last quarter of the run's "
            "measurements, then over seeds (0 = backprop).\n\n" + angles + "\n"
        )
    if spec.sweep:
        text += "\n" + _sweep_choice(spec, rows)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.md", text)
    return table


def _angle_table(rows: list[dict[str, Any]]) -> str:
    layers: list[str] = []
    for r in rows:
        layers.extend(k for k in r["angles"] if k not in layers)
    if not layers:
        return ""
    lines = ["| setting | rule | " + " | ".join(layers) + " |", "|---|---|" + "---:|" * len(layers)]
    for r in rows:
        cells = [f"{r['angles'][k]:.1f}" if k in r["angles"] else "-" for k in layers]
        lines.append(f"| {r['setting']} | {r['rule']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_group(setting: str) -> str:
    """The group of a sweep setting: its name up to ``lr_`` (``manhattan_lr_1e-4`` ->
    ``manhattan``; ``lr_0.1`` -> ``''``, the plain group). Each rule's best setting is chosen
    within each group."""
    head, sep, _ = setting.rpartition("lr_")
    return head.rstrip("_") if sep else setting


def _swept_keys(spec: Spec, group: str) -> set[str]:
    """The keys that the settings of ``group`` vary (``optim.lr``), not those they share
    (``optim.manhattan``, their ``rules``): only those belong in a rule's override."""
    names = [s for s in spec.settings if sweep_group(s) == group]
    keys = {k for s in names for k in spec.settings[s] if k not in ("rules", "seeds")}
    if len(names) < 2:
        return keys
    return {k for k in keys if len({repr(spec.settings[s].get(k)) for s in names}) > 1}


def _sweep_choice(spec: Spec, rows: list[dict[str, Any]]) -> str:
    """Per group and rule, the setting with the best mean metric, and the ``rule_overrides``
    that carry it into a full spec."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    sign = -1.0 if spec.metric == "test_acc" else 1.0
    for r in rows:
        if not r["seeds"] or r["diverged"]:
            continue
        key = (sweep_group(r["setting"]), r["rule"])
        if key not in best or sign * r["ours"] < sign * best[key]["ours"]:
            best[key] = r
    lines = [
        "## Chosen per rule (best mean; settings where a seed diverged are excluded)",
        "",
        "| group | rule | setting | ours |",
        "|---|---|---|---:|",
    ]
    lines += [
        f"| {g or '(plain)'} | {rule} | {r['setting']} | {r['ours']:.2f} |"
        for (g, rule), r in sorted(best.items())
    ]
    lines += [
        "",
        "Carry the choice into the full spec: `rule_overrides` of its `base` (plain group)",
    ]
    lines += ["or of the setting of that name (other groups):", ""]
    for group in sorted({g for g, _ in best}):
        swept = _swept_keys(spec, group)
        overrides = {
            rule: {k: v for k, v in spec.settings[r["setting"]].items() if k in swept}
            for (g, rule), r in best.items()
            if g == group
        }
        snippet = yaml.safe_dump(
            {"rule_overrides": overrides}, sort_keys=False, default_flow_style=None
        )
        lines += [f"{group or 'base'}:", "", "```yaml", snippet.rstrip(), "```", ""]
    return "\n".join(lines)


def export(
    spec_path: Path,
    scale: str,
    out: Path,
    dest: Path | None = None,
    results_from: Sequence[Path] = (),
) -> Path:
    """Copy the small files (:data:`SMALL_FILES`) of every finished cell of ``out`` or of the
    ``results_from`` folders (where it still counts) to ``dest`` (default
    ``benchmarks/results/<date>-<spec>-<scale>/``, merged into what is there), with ``grid.yaml``,
    ``results.md`` and a ``README.md`` naming the date, commits and machines: ``dest`` alone
    finishes the grid elsewhere."""
    spec = load_spec(spec_path)
    dest = (
        dest
        or Path("benchmarks")
        / "results"
        / f"{dt.date.today().isoformat()}-{spec_path.stem}-{scale}"
    )
    for c in grid_cells(spec, scale):
        st = status(c, out, results_from)
        target = c.dir(dest)
        if not st.is_finished or st.folder.resolve() == target.resolve():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if (st.folder / name).is_file():
                shutil.copy2(st.folder / name, target / name)
    dest.mkdir(parents=True, exist_ok=True)
    grid = yaml.safe_dump({"scale": scale, "spec": spec.model_dump(mode="json")}, sort_keys=False)
    (dest / "grid.yaml").write_text(grid)
    write_results(dest, spec, scale)
    origins: dict[tuple[str, str, str], int] = {}
    for c in grid_cells(spec, scale):
        info = finished(c.dir(dest))
        if info is not None:
            m = info.get("machine", {})
            key = (
                str(info.get("commit")),
                f"{m.get('host')} ({m.get('cpu')}, {m.get('cores')} cores{', ' + m['gpu'] if m.get('gpu') else ''})",
                str(info.get("device")),
            )
            origins[key] = origins.get(key, 0) + 1
    lines = [
        f"# {spec.title}: scale {scale}",
        "",
        f"Exported {_now()} from `{out}` by `biograd reproduce {spec_path.stem} --scale {scale} --export`.",
        "Per cell: config.yaml (resolved), metrics.csv, alignment.csv, cell.yaml (status, dates, commit,",
        "machine). Finish or extend the grid elsewhere with",
        f"`biograd reproduce {spec_path.stem} --scale {scale} --results-from {dest}`.",
        "",
        "| cells | commit | machine | device |",
        "|---:|---|---|---|",
        *(f"| {n} | {c} | {m} | {d} |" for (c, m, d), n in origins.items()),
        "",
    ]
    (dest / "README.md").write_text("\n".join(lines))
    return dest


def finished_cells(
    cells: Iterable[Cell], out: Path, results_from: Sequence[Path] = ()
) -> list[Cell]:
    """The cells of ``cells`` that are finished (here or in ``results_from``)."""
    return [c for c in cells if status(c, out, results_from).is_finished]
