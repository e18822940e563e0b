"""Compare rules on one task, from the command line (``biograd compare``) or from Python
(:func:`compare`): the same config, the same trainer (:func:`biograd.experiment.trainer.run`), the
same table and plots. See docs/own-model.md."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..cli import COMPARE_DEFAULTS, COMPARE_RULES
from ..errors import ConfigError
from .config import Config, apply_overrides, config_keys, validate
from .factory import as_splits, fingerprint, is_spec, reproducible, session_spec, spec_of


def compare_config(
    *,
    data: str = "digits",
    model: str = "mlp",
    rules: Sequence[str],
    epochs: int,
    seeds: Sequence[int],
    out: str,
    data_dir: str | None = None,
    overrides: Iterable[str | tuple[str, Any]] = (),
) -> Config:
    """The config of a comparison: :data:`COMPARE_DEFAULTS`, then the data set (a name, or a
    factory spec ``module:function`` that replaces the data section but its batch size), the model
    (a zoo name, or a factory spec that replaces the model section), the rules, epochs, seeds and
    output directory, then ``overrides``."""
    items: list[Any] = [("rules", list(rules)), ("epochs", epochs), ("seeds", list(seeds))]
    items.append(("out", out))
    if is_spec(data):
        items.append(
            ("data", {"factory": data, "batch_size": COMPARE_DEFAULTS["data"]["batch_size"]})
        )
    else:
        items.append(("data.name", data))
    if is_spec(model):
        items.append(("model", {"factory": model}))
    elif model != "mlp":
        items.append(("model", {"name": model}))
    if data_dir:
        items.append(("data.root", data_dir))
    return validate(apply_overrides(COMPARE_DEFAULTS, [*items, *overrides]))


def finish(run_dir: Path, plots: bool = True) -> tuple[str, list[Path]]:
    """Write ``results.md`` and (unless ``plots`` is false) ``plots/*.png`` of ``run_dir``;
    return the table (Markdown) and the plots written."""
    from .plots import plot_alignment, plot_metrics
    from .table import write_results

    table = write_results(run_dir)
    written: list[Path] = []
    if plots:
        written = plot_metrics(run_dir / "metrics.csv", run_dir / "plots")
        if (run_dir / "alignment.csv").exists():
            written += plot_alignment(run_dir / "alignment.csv", run_dir / "plots")
    return table, written


@dataclass
class CompareResult:
    """What :func:`compare` returns: one row per rule (``rule``, ``seeds``, ``epochs``,
    ``test_acc`` mean over seeds after the last epoch and its sample std ``test_acc_std``, the
    per-seed values ``test_acc_per_seed``, ``epoch_time_s``, and ``angles``: the final gradient
    angle with backprop per layer, in degrees), the Markdown table, the plots, the run directory
    and its config. ``reproducible`` is false when the config names objects of this process
    (``python:`` specs), which ``biograd train RUN_DIR/config.yaml`` cannot re-create."""

    run_dir: Path
    rows: list[dict[str, Any]]
    table: str
    plots: list[Path]
    config: Config
    reproducible: bool
    last: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        """The results table as Markdown (what ``results.md`` and the command line show)."""
        return self.table

    def _repr_markdown_(self) -> str:  # notebooks render the table
        return self.table

    def __str__(self) -> str:
        return self.table


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    from .table import summarize

    return [
        {
            "rule": s.rule,
            "seeds": s.seeds,
            "epochs": s.epochs,
            "test_acc": s.mean,
            "test_acc_std": s.std,
            "test_acc_per_seed": list(s.test_acc),
            "epoch_time_s": s.epoch_time_s,
            "angles": dict(s.angles),
        }
        for s in summarize(run_dir)
    ]


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Keyword arguments as dotted overrides: a dict given for a config section is merged into
    it key by key (``optim={"lr": 0.1}`` keeps the other optimizer settings); any other value,
    such as ``model={"kwargs": {...}}``'s mapping, is set as a whole."""
    sections = {k.rpartition(".")[0] for k in config_keys()} | {"model"}
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        dotted = prefix + key
        if isinstance(value, Mapping) and dotted in sections:
            out.extend(_flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def _data_spec(train_data: Any, test_data: Any) -> str:
    if test_data is None and isinstance(train_data, str) and not is_spec(train_data):
        return train_data  # a built-in data set, as `--data NAME`
    if test_data is None:
        if isinstance(train_data, str) or callable(train_data):
            return spec_of(train_data, "data")
        raise ConfigError(
            "data: give test_data as well, or a data factory (a callable or 'module:function') "
            "that returns both splits"
        )
    try:
        train, test = as_splits((train_data, test_data), "data")
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    pair = (train, test)
    return session_spec("data", f"data-{fingerprint(train, test)}", lambda: pair)


def compare(
    make_model: Callable[..., nn.Module] | str,
    train_data: Any,
    test_data: Any = None,
    *,
    rules: Sequence[str] | str = COMPARE_RULES,
    epochs: int = 10,
    seeds: int | Sequence[int] = 3,
    out: str | Path = "runs/compare",
    model_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    **config: Any,
) -> CompareResult:
    """Train every rule of ``rules`` with ``seeds`` on your model and data, as ``biograd
    compare`` does, into ``out``; return the table and the plots.

    ``make_model``: a function returning a fresh ``nn.Module`` (called with ``model_kwargs``, and with
    ``in_shape``/``classes`` when it takes them), a ``"module:function"`` spec, or the name of a
    zoo model. ``train_data`` and ``test_data``: the two splits (``(x, y)`` tensors, torch
    Datasets or ``biograd.data`` sets; see :func:`biograd.experiment.factory.as_splits`), or
    ``train_data`` alone: a data factory (callable or spec, called with ``data_kwargs``) returning
    both, or the name of a built-in data set. ``seeds``: a count (seeds
    ``0..n-1``) or a list. ``**config``: any other config key, a section as a dict merged key by
    key (``optim={"lr": 0.05}``, ``alignment={"every": 10}``, ``device="cuda"``); ``overrides``:
    dotted ``key=value`` strings as on the command line. Like the command, it resumes a run
    already in ``out`` with the same config and refuses one with another.

    A callable importable as ``module:qualname`` is recorded so in ``config.yaml``; a lambda, a
    local function, anything defined under ``__main__`` or in a notebook, and data tensors are
    recorded as ``python:`` specs: the run is then not reproducible from its config alone
    (``CompareResult.reproducible`` is false; a warning says so).
    """
    from .trainer import run

    builtin = isinstance(make_model, str) and not is_spec(make_model)  # as `--model NAME`
    model_spec = (
        make_model if isinstance(make_model, str) and builtin else spec_of(make_model, "model")
    )
    data_spec = _data_spec(train_data, test_data)
    if data_kwargs and test_data is not None:
        raise ConfigError("data_kwargs are for a data factory, not for data given as objects")
    rule_list = (
        [r.strip() for r in rules.split(",") if r.strip()]
        if isinstance(rules, str)
        else list(rules)
    )
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if epochs < 1 or not seed_list:
        raise ConfigError("epochs and seeds must be at least 1")
    items: list[str | tuple[str, Any]] = [*_flatten(config)]
    if model_kwargs:
        items.append(("model.kwargs", dict(model_kwargs)))
    if data_kwargs:
        items.append(("data.kwargs", dict(data_kwargs)))
    items.extend(overrides)
    cfg = compare_config(
        data=data_spec,
        model=model_spec,
        rules=rule_list,
        epochs=epochs,
        seeds=seed_list,
        out=str(out),
        overrides=items,
    )
    ok = reproducible(cfg)
    if not ok:
        warnings.warn(
            f"{out}/config.yaml names objects of this Python process (python: specs); it "
            "cannot be re-run from the file alone (see docs/own-model.md)",
            stacklevel=2,
        )
    run_dir = Path(cfg.out or out)
    last = run(cfg, run_dir, resume=True, progress=progress, echo=echo)
    table, plots = finish(run_dir, cfg.plots)
    return CompareResult(
        run_dir=run_dir,
        rows=_rows(run_dir),
        table=table,
        plots=plots,
        config=cfg,
        reproducible=ok,
        last=last,
    )
