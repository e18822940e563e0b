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
first seed. A setting may also hold ``rules: [...]`` (it runs only those of the grid's rules)
and ``seeds: [...]`` (for all its rules); elsewhere ``rule_seeds: {bp: [0, 1]}`` (in the spec or a
scale) gives a rule its own seeds; ``sweep: true`` makes ``results.md`` name each rule's best
setting per group (the setting name up to ``lr_``).

Every (setting, rule, seed) is one cell with its own run directory
(``<out>/<setting>/<rule>-seed<seed>/``), trained by :func:`biograd.experiment.trainer.run` with
``resume=True``: finished cells are skipped and a partial one continues from its last checkpoint;
``--jobs N`` runs cells as parallel processes, ``--cell K`` one cell (see
:mod:`biograd.experiment.grid`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from ..errors import ConfigError
from .config import Config, Section, _describe, apply_overrides, known_rule, read_yaml, validate

SMOKE = {"epochs": 1, "data.subset": 512, "data.test_subset": 512}


class Scale(Section):
    """Overrides of one scale, and optional subsets of the grid's axes."""

    overrides: dict[str, Any] = Field(default_factory=dict)
    rules: list[str] | None = None
    settings: list[str] | None = None
    seeds: list[int] | None = None
    rule_seeds: dict[str, list[int]] = Field(default_factory=dict)


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
    rule_seeds: dict[str, list[int]] = Field(
        default_factory=dict, description="rule -> its seeds, instead of seeds (e.g. more for bp)"
    )
    sweep: bool = Field(
        default=False,
        description="a hyperparameter sweep: results.md names each rule's best setting and the "
        "rule_overrides that carry it into a full spec",
    )

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
    data = read_yaml(path)
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        unknown = [
            ".".join(map(str, err["loc"])) for err in e.errors() if err["type"] == "extra_forbidden"
        ]
        if unknown:  # most likely a run config given to reproduce
            raise ConfigError(
                f"{path} is not a reproduction spec (unknown key {unknown[0]!r}; a spec has "
                f"{', '.join(Spec.model_fields)}); a run config trains with: biograd train {path}"
            ) from None
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
        own = dict(spec.settings[setting])
        # A setting may name its own rules (a subset of the grid's) and seeds.
        own_rules, own_seeds = own.pop("rules", None), own.pop("seeds", None)
        rules = [r for r in sc.rules or spec.rules if own_rules is None or r in own_rules]
        if not rules:
            continue
        items: list[tuple[str, Any]] = [*own.items(), *sc.overrides.items()]
        items.append(("rules", rules))
        items.append(("seeds", sc.seeds or own_seeds or spec.seeds))
        if data_dir is not None:
            items.append(("data.root", data_dir))
        try:
            out[setting] = validate(apply_overrides(spec.base, items)).check_rule_options()
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
    jobs: int = 1,
) -> str:
    """Run (or resume) the grid of ``spec_path`` into ``out``; write and return ``results.md``
    (see :func:`biograd.experiment.grid.reproduce_grid` for cells, ``--jobs`` and resuming)."""
    from .grid import reproduce_grid

    return reproduce_grid(
        spec_path, out, scale=scale, data_dir=data_dir, progress=progress, echo=echo, jobs=jobs
    )


def check_grid_dir(out: Path) -> None:
    """``ConfigError`` when ``out`` holds a run of ``biograd train``/``compare`` (its own
    ``config.yaml`` or ``metrics.csv``): a grid must not replace that run's results."""
    for name in ("config.yaml", "metrics.csv"):
        if (out / name).exists():
            raise ConfigError(
                f"{out} holds a biograd train/compare run ({name}), not a reproduction grid; "
                "choose another --out"
            )


def grid_rows(out: Path, spec: Spec, scale: str = "full") -> list[dict[str, Any]]:
    """One row per (setting, rule) with finished cells (see ``biograd.experiment.grid``)."""
    from .grid import grid_rows as rows

    return rows(out, spec, scale)


def write_grid_results(out: Path, spec: Spec, scale: str) -> str:
    """Rebuild ``results.md`` of a grid from its finished cells."""
    from .grid import write_results

    return write_results(out, spec, scale)
