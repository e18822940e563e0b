"""Reproductions: a grid of rules x settings x seeds from a YAML spec, resumable, with the
published numbers next to ours.

A spec (``configs/<source>/<name>.yaml``)::

    title: Feedback alignment on the UCI digits (example)
    paper: "Lillicrap et al. 2016, Fig. 2"     # where the published numbers come from
    base:                # a run config (see biograd.experiment.config), shared by every cell
      data: {name: digits, batch_size: 32}
      model: {name: mlp, widths: [64]}
      epochs: 20
    rules: [bp, fa]      # grid axis 1
    settings:            # grid axis 2: name -> dotted overrides of base ({} = base itself)
      narrow: {model.widths: [16]}
      wide: {model.widths: [256]}
    seeds: [0, 1, 2]     # grid axis 3
    metric: test_error   # or test_acc; percent, after the last epoch
    published:           # setting -> rule -> published value of the metric (percent)
      wide: {bp: 2.0, fa: 2.5}
    scales:              # --scale NAME: overrides for every cell, and optionally fewer axes
      smoke: {overrides: {epochs: 1, data.subset: 256}, seeds: [0]}
      full: {}

``--scale full`` runs the spec as written (when ``scales`` has no ``full`` entry); ``--scale
smoke`` without a ``smoke`` entry runs one epoch on 512 training and 512 test examples with the
first seed. Every setting is one run directory (``<out>/<setting>/``) trained by
:func:`biograd.experiment.trainer.run` with ``resume=True``: finished (rule, seed) cells are
skipped and a partial one continues from its last checkpoint.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from .. import distributed
from ..errors import ConfigError
from .config import Config, Section, _describe, apply_overrides, known_rule, read_yaml, validate
from .table import summarize
from .trainer import run

SMOKE = {"epochs": 1, "data.subset": 512, "data.test_subset": 512}


class Scale(Section):
    """Overrides of one scale, and optional subsets of the grid's axes."""

    overrides: dict[str, Any] = Field(default_factory=dict)
    rules: list[str] | None = None
    settings: list[str] | None = None
    seeds: list[int] | None = None


class Spec(Section):
    """A reproduction spec (see the module docstring)."""

    title: str
    paper: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    rules: list[str]
    settings: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"default": dict[str, Any]()}
    )
    seeds: list[int] = Field(default_factory=lambda: [0])
    metric: Literal["test_error", "test_acc"] = "test_error"
    published: dict[str, dict[str, float]] = Field(default_factory=dict)
    scales: dict[str, Scale] = Field(default_factory=dict)

    @field_validator("rules")
    @classmethod
    def _rules(cls, rules: list[str]) -> list[str]:
        return [known_rule(r) for r in rules]


def find_spec(name: str, search: list[Path] | None = None) -> Path:
    """The spec file for ``name``: a path to a YAML file, ``source/name`` or a bare ``name``
    under ``configs/`` (in the working directory, then next to the installed package)."""
    direct = Path(name)
    if direct.suffix in (".yaml", ".yml") and direct.is_file():
        return direct
    roots = search if search is not None else _config_roots()
    stem = name.removesuffix(".yaml")
    found: list[Path] = []
    for root in roots:
        if (root / f"{stem}.yaml").is_file():
            return root / f"{stem}.yaml"
        found.extend(sorted(root.glob(f"*/{stem}.yaml")))
    if len(found) == 1 or (found and all(f.resolve() == found[0].resolve() for f in found)):
        return found[0]
    if found:
        options = ", ".join(f"{f.parent.name}/{f.stem}" for f in found)
        raise ConfigError(f"reproduction {name!r} is ambiguous: {options}")
    known = sorted({f"{f.parent.name}/{f.stem}" for r in roots for f in r.glob("*/*.yaml")})
    raise ConfigError(
        f"no reproduction named {name!r}; known: {', '.join(known) or 'none'} "
        "(or pass a path to a spec YAML)"
    )


def _config_roots() -> list[Path]:
    here = Path.cwd() / "configs"
    package = Path(__file__).resolve().parents[3] / "configs"
    return [p for p in dict.fromkeys([here, package]) if p.is_dir()]


def load_spec(path: Path) -> Spec:
    """Read and validate a spec file."""
    try:
        return Spec.model_validate(read_yaml(path))
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def cell_configs(spec: Spec, scale: str, data_dir: str | None = None) -> dict[str, Config]:
    """One validated config per setting of ``spec`` at ``scale`` (every rule and seed of the
    setting runs in that config)."""
    if scale in spec.scales:
        sc = spec.scales[scale]
    elif scale == "smoke":
        sc = Scale(overrides=SMOKE, seeds=spec.seeds[:1])
    elif scale == "full":
        sc = Scale()
    else:
        raise ConfigError(
            f"unknown scale {scale!r}; this spec has {', '.join(spec.scales) or 'smoke, full'}"
        )
    settings = sc.settings if sc.settings is not None else list(spec.settings)
    for s in settings:
        if s not in spec.settings:
            raise ConfigError(f"scale {scale!r} names unknown setting {s!r}")
    out = {}
    for setting in settings:
        items: list[tuple[str, Any]] = [*spec.settings[setting].items(), *sc.overrides.items()]
        items.append(("rules", sc.rules or spec.rules))
        items.append(("seeds", sc.seeds or spec.seeds))
        if data_dir is not None:
            items.append(("data.root", data_dir))
        try:
            out[setting] = validate(apply_overrides(spec.base, items))
        except ConfigError as e:
            raise ConfigError(f"setting {setting!r}: {e}") from None
    return out


def reproduce(
    spec_path: Path,
    out: Path,
    *,
    scale: str = "full",
    data_dir: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> str:
    """Run (or resume) the grid of ``spec_path`` into ``out``; write and return ``results.md``."""
    spec = load_spec(spec_path)
    configs = cell_configs(spec, scale, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = {"scale": scale, "spec": spec.model_dump(mode="json")}
    if distributed.is_main():
        (out / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    for setting, cfg in configs.items():
        if echo is not None:
            echo(
                f"== {setting}: {', '.join(cfg.run_rules())} x seeds {cfg.seeds}, {cfg.epochs} epochs"
            )
        run(cfg, out / setting, resume=True, progress=progress, echo=echo)
    if not distributed.is_main():
        return ""
    return write_grid_results(out, spec, scale)


def grid_rows(out: Path, spec: Spec) -> list[dict[str, Any]]:
    """One row per (setting, rule): published value, ours (mean and std over seeds), seeds."""
    rows = []
    for setting in spec.settings:
        if not (out / setting / "metrics.csv").exists():
            continue
        for s in summarize(out / setting):
            values = [100 * a if spec.metric == "test_acc" else 100 * (1 - a) for a in s.test_acc]
            rows.append(
                {
                    "setting": setting,
                    "rule": s.rule,
                    "published": spec.published.get(setting, {}).get(s.rule),
                    "ours": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seeds": len(values),
                    "epochs": s.epochs,
                }
            )
    return rows


def write_grid_results(out: Path, spec: Spec, scale: str) -> str:
    """``results.md`` of a grid: published vs ours vs difference, per setting and rule."""
    metric = "test error (%)" if spec.metric == "test_error" else "test accuracy (%)"
    lines = [
        f"| setting | rule | published {metric} | ours | difference | seeds | epochs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in grid_rows(out, spec):
        pub = r["published"]
        ours = f"{r['ours']:.2f}" + (f" ± {r['std']:.2f}" if r["seeds"] > 1 else "")
        diff = f"{r['ours'] - pub:+.2f}" if pub is not None else "-"
        pub_text = f"{pub:.2f}" if pub is not None else "-"
        lines.append(
            f"| {r['setting']} | {r['rule']} | {pub_text} | {ours} | {diff} | {r['seeds']} | {r['epochs']} |"
        )
    table = "\n".join(lines)
    source = f"Published numbers: {spec.paper}.\n\n" if spec.paper else ""
    text = (
        f"# {spec.title} (scale: {scale})\n\n{source}{table}\n\n"
        "Ours: mean ± sample std over seeds after the last epoch; difference = ours - published.\n"
    )
    (out / "results.md").write_text(text)
    return table
