"""The ``biograd`` command: compare rules, train from a config, reproduce a paper, report a run.

Every error ends with one line on stderr (``biograd: error: ...``) and exit status 2; Ctrl-C
ends with one line and status 130 (the run continues where it stopped when the same command is
run again; ``train`` needs ``--resume``). ``BIOGRAD_DEBUG=1`` in the environment shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import BiogradError, ConfigError

DEBUG_ENV = "BIOGRAD_DEBUG"
"""Set to 1 to see the traceback of an error instead of its one-line message."""

# What Ctrl-C tells the user, per command: how to continue.
_CONTINUE = {
    "compare": "; run the same command again to continue",
    "train": "; continue with --resume",
    "reproduce": "; run the same command again to continue",
}

COMPARE_RULES = "bp,fa,usf,frsf,brsf,kp,dfa"

# The demo's defaults (`biograd compare` with no options): an MLP on the embedded digits that
# trains every rule well above chance in about a minute on two CPU cores. `biograd.compare` from
# Python starts from them too (biograd.experiment.compare).
COMPARE_DEFAULTS: dict[str, Any] = {
    "data": {"name": "digits", "batch_size": 32},
    "model": {"name": "mlp", "widths": [128, 128]},
    "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
    "alignment": {"every": 20},
    # Small models gain nothing from more CPU threads, and lose a lot when other processes
    # share the cores (OpenMP threads wait on each other); threads=0 restores torch's default.
    "threads": 1,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"biograd: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="biograd",
        description="Train networks without weight transport: compare learning rules, train from "
        "a YAML config, reproduce a paper's grid, report a run directory.",
        epilog=f"Errors are one line on stderr with exit status 2 (Ctrl-C: 130); set {DEBUG_ENV}=1 "
        "to see the traceback instead.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compare", help="train several rules on one task and compare them")
    c.add_argument(
        "--data",
        default="digits",
        help="data set (default: digits, embedded), or your data factory as module:function or "
        "path/to/file.py:function",
    )
    c.add_argument(
        "--model",
        default="mlp",
        help="model (default: mlp), or your model factory as module:function or "
        "path/to/file.py:function (its arguments: model.kwargs.NAME=VALUE)",
    )
    c.add_argument(
        "--rules", default=COMPARE_RULES, help=f"comma-separated (default: {COMPARE_RULES})"
    )
    c.add_argument("--epochs", type=int, default=10, help="epochs per run (default: 10)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per rule (default: 3)")
    c.add_argument("--out", default="runs/compare", help="run directory (default: runs/compare)")
    c.add_argument("--data-dir", help="directory of the data files (mnist, cifar10, ...)")
    c.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="config overrides, e.g. device=cuda",
    )
    c.set_defaults(func=_compare)

    t = sub.add_parser("train", help="train the rules and seeds of a YAML config")
    t.add_argument("config", help="YAML config file")
    t.add_argument(
        "overrides", nargs="*", default=[], metavar="key=value", help="e.g. optim.lr=0.1 epochs=5"
    )
    t.add_argument("--resume", action="store_true", help="continue the run in the config's out")
    t.set_defaults(func=_train)

    r = sub.add_parser("reproduce", help="run (or resume) a paper's grid and compare with it")
    r.add_argument("name", help="configs/<source>/<name>.yaml as source/name, name, or a path")
    r.add_argument("--scale", default="full", help="smoke, full, or a scale the spec defines")
    r.add_argument("--data-dir", help="directory of the data files")
    r.add_argument("--out", help="output directory (default: runs/reproduce/<name>-<scale>)")
    r.add_argument(
        "--jobs", type=int, default=1, help="cells run at once as processes (default: 1)"
    )
    r.add_argument("--list", action="store_true", help="list the cells and their status")
    r.add_argument("--cell", type=int, metavar="K", help="run only cell K (see --list)")
    r.add_argument(
        "--results-from",
        action="append",
        default=[],
        metavar="DIR",
        help="count the cells finished in DIR (an --export folder) as finished (repeatable)",
    )
    r.add_argument(
        "--export",
        nargs="?",
        const="",
        metavar="DIR",
        help="copy the finished cells' small files to DIR "
        "(default: benchmarks/results/<date>-<name>-<scale>) and stop",
    )
    r.add_argument("--threads", type=int, help="CPU threads of this process (torch)")
    r.add_argument("--no-results", action="store_true", help=argparse.SUPPRESS)
    r.set_defaults(func=_reproduce)

    rep = sub.add_parser("report", help="rebuild the table and plots of a run directory")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_report)
    return p


def _progress() -> bool:
    return sys.stderr.isatty()


def _finish(run_dir: Path, plots: bool = True) -> None:
    """Print the table, write results.md and (unless ``plots`` is false) the plots."""
    from .experiment.compare import finish

    table, written = finish(run_dir, plots)
    print(table)
    print(f"\nwrote {run_dir / 'results.md'}" + "".join(f"\n      {p}" for p in written))


def _compare(args: argparse.Namespace) -> int:
    from .experiment.compare import compare_config

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if args.epochs < 1 or args.seeds < 1:
        raise ConfigError("--epochs and --seeds must be at least 1")
    cfg = compare_config(
        data=args.data,
        model=args.model,
        rules=rules,
        epochs=args.epochs,
        seeds=range(args.seeds),
        out=args.out,
        data_dir=args.data_dir,
        overrides=args.overrides,
    )
    cfg.check_rule_options()
    return _run_and_finish(cfg, Path(cfg.out or args.out), resume=True)


def _train(args: argparse.Namespace) -> int:
    from .experiment.config import load_config

    cfg = load_config(args.config, args.overrides).check_rule_options()
    return _run_and_finish(cfg, Path(cfg.out or Path("runs") / Path(args.config).stem), args.resume)


def _run_and_finish(cfg: Any, out: Path, resume: bool) -> int:
    from . import distributed
    from .errors import DivergedError
    from .experiment.trainer import run

    diverged: DivergedError | None = None
    try:
        run(cfg, out, resume=resume, progress=_progress())
    except DivergedError as e:  # the other pairs finished: show their table, then the error
        diverged = e
    if distributed.is_main():  # under torchrun, rank 0 writes the table and plots
        print()
        _finish(out, cfg.plots)
    if diverged is not None:
        raise diverged
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from . import distributed
    from .experiment.grid import export, list_cells, reproduce_grid
    from .experiment.runner import find_spec, load_spec

    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty: give a directory")
    spec = find_spec(args.name)
    out = Path(args.out or Path("runs") / "reproduce" / f"{spec.stem}-{args.scale}")
    results_from = [Path(d) for d in args.results_from]
    for d in results_from:
        if not d.is_dir():
            raise ConfigError(f"--results-from {d}: no such directory")
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if args.list:
        print(list_cells(load_spec(spec), args.scale, out, results_from))
        return 0
    if args.export is not None:
        dest = export(
            spec, args.scale, out, Path(args.export) if args.export else None, results_from
        )
        print(f"wrote {dest}")
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    table = reproduce_grid(
        spec,
        out,
        scale=args.scale,
        data_dir=args.data_dir,
        jobs=args.jobs,
        cell=args.cell,
        results_from=results_from,
        progress=_progress(),
        results=not args.no_results,
    )
    if not distributed.is_main() or args.no_results:
        return 0
    print()
    print(table)
    print(f"\nwrote {out / 'results.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .experiment.config import _describe, read_yaml
    from .experiment.grid import write_results
    from .experiment.runner import Spec

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    if (run_dir / "grid.yaml").exists():
        grid = read_yaml(run_dir / "grid.yaml")
        try:
            spec = Spec.model_validate(grid.get("spec"))
        except ValidationError as e:
            problems = "; ".join(_describe(err) for err in e.errors())
            raise ConfigError(f"{run_dir / 'grid.yaml'} is damaged (spec: {problems})") from None
        print(write_results(run_dir, spec, str(grid.get("scale", "?"))))
        print(f"\nwrote {run_dir / 'results.md'}")
        return 0
    if not (run_dir / "metrics.csv").exists():
        raise ConfigError(f"{run_dir} has no metrics.csv: not a biograd run directory")
    _finish(run_dir)
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _os_error(e: OSError) -> str:
    """``OSError`` as ``<path>: <reason>`` (permissions, a full disk, a file where a folder
    should be, ...)."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
    print(f"biograd: warning: {_one_line(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``biograd`` command; returns the exit status.

    Every error is one line on stderr and status 2; Ctrl-C is one line and status 130. With
    ``BIOGRAD_DEBUG=1`` in the environment errors propagate with their traceback.
    """
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    command = ""
    shown = warnings.showwarning
    if not debug:  # warnings as one line each, like errors
        warnings.showwarning = _show_warning
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help, or a usage error already printed in one line
            return e.code if isinstance(e.code, int) else 2
        command = args.command
        status: int = args.func(args)
        return status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"biograd: interrupted{_CONTINUE.get(command, '')}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, BiogradError):
            message = str(e)
        elif isinstance(e, OSError):
            message = _os_error(e)
        else:  # a bug: still one line, and the way to see more
            message = (
                f"unexpected {type(e).__name__}: {e} (this is a bug in biograd; "
                f"{DEBUG_ENV}=1 shows the traceback)"
            )
        print(f"biograd: error: {_one_line(message)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
