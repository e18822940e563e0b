"""Experiment configuration: YAML plus dotted ``key=value`` overrides, validated strictly.

Every section forbids unknown keys; an unknown key names the closest valid one and a value of
the wrong type names the expected type, both in one line (``ConfigError``). The ``model`` section
is the exception: besides ``name`` it holds the model's keyword arguments, which the model's
constructor checks when the run starts (``biograd.experiment.trainer.build``).
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError

Int = Annotated[int, Strict()]
"""An integer config value: ``true`` or ``2.0`` or ``"3"`` are errors, not silently 1, 2, 3."""
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**63)]
"""A seed: 0 <= seed < 2**63 (what torch, numpy and the per-layer seeds all accept)."""
Count = Annotated[int, Strict(), Field(gt=0, lt=2**31)]
"""A positive count that torch can index with (batch sizes, subsets)."""


def known_rule(name: str) -> str:
    """``name`` if it is a registered rule, else ValueError naming the closest one."""
    from ..rules import rule_names

    names = rule_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown rule {name!r}; {hint}rules: {', '.join(names)}")
    return name


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class AugmentConfig(Section):
    """Batched augmentation of training images (``biograd.data.Augment``)."""

    crop_padding: Int = Field(default=0, ge=0, le=1024)
    hflip: bool = False
    normalize: bool = True


class DataConfig(Section):
    """Which data set, where its files are, and how it is batched. ``factory`` (a
    ``module:function`` or ``file.py:function`` spec, see ``biograd.experiment.factory``) loads
    your own data instead, called with ``kwargs``; ``name`` is then only a label."""

    name: str = "digits"
    factory: str | None = None
    kwargs: dict[str, Any] = {}
    root: str | None = None
    download: bool = False
    batch_size: Count = 32
    test_batch_size: Count = 1000
    augment: AugmentConfig = AugmentConfig()
    subset: Count | None = Field(default=None, description="train on this many random examples")
    test_subset: Count | None = Field(default=None, description="test on this many random examples")
    validation: Count | None = Field(
        default=None,
        description="hold out this many training examples (a fixed random draw) and evaluate on "
        "them instead of the test set; the test set is not read",
    )
    resize: Count | None = Field(
        default=None,
        description="resize every image to this many pixels square once at load (bilinear, "
        "rounded to 8 bits, as torchvision's Resize of a PIL image; biograd.data.resized)",
    )
    in_memory: bool = Field(
        default=False,
        description="imagefolder: decode same-size images once into a cached tensor "
        "(biograd.data.cache) instead of streaming them",
    )

    @model_validator(mode="before")
    @classmethod
    def _factory_label(cls, data: Any) -> Any:
        return _label_default(data)

    @model_validator(mode="after")
    def _factory_only(self) -> DataConfig:
        if self.factory is None:
            if self.kwargs:
                raise ValueError("kwargs are the arguments of data.factory, which is not set")
            return self
        from ..data import DATASETS
        from .factory import check_spec

        check_spec(self.factory)
        if self.name in DATASETS:
            raise ValueError(
                f"name {self.name!r} is a built-in data set; with factory, name is only a "
                "label: leave it out or choose another"
            )
        if self.root is not None or self.download:
            raise ValueError("root and download are for built-in data sets; pass your "
                             "factory what it needs under data.kwargs")  # fmt: skip
        return self


def _label_default(data: Any) -> Any:
    # With a factory and no name, the name (a label) is the factory's function name.
    if isinstance(data, Mapping) and isinstance(data.get("factory"), str) and "name" not in data:
        from .factory import label

        data = {**data, "name": label(data["factory"])}
        data.setdefault("kwargs", {})
    return data


class ModelConfig(BaseModel):
    """``name`` from ``biograd.models.MODELS``; every other key is a keyword argument of the
    model (e.g. ``widths``, ``activation`` for ``mlp``), checked when the model is built.

    ``factory`` (a ``module:function`` or ``file.py:function`` spec, see
    ``biograd.experiment.factory``) builds your own model instead, called with the mapping
    ``kwargs``; ``name`` is then only a label and ``kwargs`` the only other key."""

    model_config = ConfigDict(extra="allow")

    name: str = "mlp"
    factory: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """The model's keyword arguments (every key but ``name`` and ``factory``)."""
        return dict(self.model_extra or {})

    def factory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``factory`` (``model.kwargs``)."""
        return dict((self.model_extra or {}).get("kwargs") or {})

    @model_validator(mode="before")
    @classmethod
    def _factory_label(cls, data: Any) -> Any:
        return _label_default(data)

    @model_validator(mode="after")
    def _factory_only(self) -> ModelConfig:
        if self.factory is None:
            return self
        from ..models import MODELS
        from .factory import check_spec

        check_spec(self.factory)
        if self.name in MODELS:
            raise ValueError(
                f"name {self.name!r} is a built-in model; with factory, name is only a label: "
                "leave it out or choose another"
            )
        extra = self.model_extra or {}
        for key in extra:
            if key != "kwargs":
                raise ValueError(
                    f"unknown key 'model.{key}' next to model.factory: the factory's arguments "
                    "go under model.kwargs"
                )
        if not isinstance(extra.get("kwargs", {}), dict):
            raise ValueError("kwargs must be a mapping of the factory's keyword arguments")
        return self


class RuleConfig(Section):
    """Arguments of ``biograd.convert`` (see its docstring)."""

    name: str = "bp"
    seed: Seed | None = Field(default=None, description="feedback seed; default: the run's seed")
    overrides: dict[str, str] = {}
    exclude: list[str] = []
    scale: str = "xavier"
    output: str | None = None
    layout: str = "dense"
    norm: str = "launay"
    error: str = Field(
        default="loss", description="direct rules: the loss's output error or each sample's"
    )
    options: dict[str, float | int | str] = Field(
        default={}, description="the rules' own options, e.g. {lr: 0.05} for wm (docs/rules.md)"
    )

    @field_validator("name")
    @classmethod
    def _known_rule(cls, name: str) -> str:
        return known_rule(name)

    @field_validator("overrides")
    @classmethod
    def _known_override_rules(cls, overrides: dict[str, str]) -> dict[str, str]:
        for rule in overrides.values():
            known_rule(rule)
        return overrides

    @field_validator("scale")
    @classmethod
    def _scale(cls, scale: str) -> str:
        from ..rules.base import SCALES

        return _one_of("scale", scale, SCALES)

    @field_validator("layout")
    @classmethod
    def _layout(cls, layout: str) -> str:
        from ..direct import LAYOUTS

        return _one_of("layout", layout, LAYOUTS)

    @field_validator("norm")
    @classmethod
    def _norm(cls, norm: str) -> str:
        from ..direct import NORMS

        return _one_of("norm", norm, NORMS)

    @field_validator("error")
    @classmethod
    def _error(cls, error: str) -> str:
        from ..direct import ERRORS

        return _one_of("error", error, ERRORS)

    def check_used(self, rules: Sequence[str]) -> None:
        """ValueError for an option set away from its default that none of ``rules`` (nor the
        per-layer ``overrides``) uses: ``output``, ``layout``, ``norm`` and ``error`` belong to the
        direct rules, ``scale`` to the others."""
        from ..rules import get_rule

        used = {*rules, *self.overrides.values()}
        direct = {r for r in used if get_rule(r).direct}
        for key in ("output", "layout", "norm", "error"):
            if not direct and getattr(self, key) != RuleConfig.model_fields[key].default:
                raise ValueError(
                    f"rule.{key} is an option of the direct rules (dfa, ...); "
                    f"{', '.join(sorted(used))} do not use it"
                )
        if self.scale != RuleConfig.model_fields["scale"].default and not used - direct:
            raise ValueError(f"rule.scale is not used by {', '.join(sorted(used))}")


def _one_of(key: str, value: str, valid: Iterable[str]) -> str:
    valid = list(valid)  # a tuple of names, or a registry keyed by name
    if value not in valid:
        raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(valid)}")
    return value


class OptimConfig(Section):
    """The optimizer and the wrappers of ``biograd.optim``: ``manhattan`` steps on the sign of
    the gradient (Batch Manhattan, Liao et al. 2016), ``no_sign_change`` keeps every weight's
    sign (Liao et al. 2016), ``weight_norm`` holds each forward weight at its initial norm
    (Moskovitz et al. 2018)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0, allow_inf_nan=False)
    momentum: float = Field(default=0.9, ge=0, allow_inf_nan=False)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    manhattan: bool = False
    no_sign_change: bool = False
    weight_norm: bool = False


class ScheduleConfig(Section):
    """Learning-rate schedule, stepped once per epoch: ``multistep`` multiplies the rate by
    ``gamma`` at each epoch in ``milestones``; ``cosine`` anneals it to 0 over ``epochs``."""

    name: Literal["none", "multistep", "cosine"] = "none"
    milestones: list[Annotated[int, Strict(), Field(ge=0)]] = []
    gamma: float = Field(default=0.1, gt=0, allow_inf_nan=False)


class AlignmentConfig(Section):
    """Measure weight and gradient alignment with backprop every ``every`` training steps
    (0: never)."""

    every: Int = Field(default=0, ge=0)


class BottleneckConfig(Section):
    """Make ``layer`` a bottleneck of ``keep`` units (Launay, Poli, Krzakala 2019, Sec. 4; see
    ``biograd.bottleneck.apply_bottleneck``): a fixed random ``keep / width`` of its weights learn
    (``filter``, their code's method, drawn from the run's seed), only its first ``keep`` units
    learn (``mask``), or only ``keep`` units exist (``narrow``). No ``layer``: no bottleneck."""

    layer: str | None = None
    keep: Count = 1
    mode: Literal["filter", "mask", "narrow"] = "filter"


# Keys a rule may not override: the grid's axes and what is loaded once for every rule.
_SHARED_KEYS = ("data", "rules", "seeds", "rule_overrides", "data.name", "data.root",
                "data.download", "data.subset", "data.test_subset", "data.validation",
                "data.resize", "data.in_memory", "device", "out")  # fmt: skip


class Config(Section):
    """One experiment: every (rule, seed) pair of ``rules`` x ``seeds`` is trained with the same
    data, model, optimizer and schedule."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    rule: RuleConfig = RuleConfig()
    rules: list[str] | None = Field(default=None, description="rules to run; default: [rule.name]")
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    epochs: Int = Field(default=10, gt=0, le=10**6)
    seeds: list[Seed] = [0]
    deterministic: bool = False
    alignment: AlignmentConfig = AlignmentConfig()
    bottleneck: BottleneckConfig = BottleneckConfig()
    rule_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="rule -> dotted overrides for that rule's runs (e.g. a smaller optim.lr)",
    )
    tensorboard: bool = False
    plots: bool = Field(default=True, description="write plots/*.png after the run")
    diverge_factor: float = Field(
        default=100.0,
        ge=0,
        allow_inf_nan=False,
        description="a (rule, seed) pair stops as diverged when a training loss exceeds this "
        "multiple of its first loss (besides a non-finite loss); 0: only non-finite losses",
    )
    device: str = "cpu"
    channels_last: bool = Field(
        default=False,
        description="4-D weights and inputs in torch.channels_last memory format: the same "
        "maths in faster convolution and pooling kernels (LeNet on a CPU: about 1.15x), "
        "rounded differently",
    )
    threads: Int = Field(
        default=0,
        ge=0,
        le=4096,
        description="CPU threads of torch (torch.set_num_threads); 0 keeps torch's default",
    )
    out: str | None = None

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, rules: list[str] | None) -> list[str] | None:
        if rules is not None:
            if not rules:
                raise ValueError("rules must name at least one rule")
            for r in rules:
                known_rule(r)
            repeated = sorted({r for r in rules if rules.count(r) > 1})
            if repeated:
                raise ValueError(f"rules repeat: {', '.join(repeated)}")
        return rules

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("seeds must hold at least one seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(
                f"not a torch device: {device!r} (e.g. cpu, cuda, cuda:1, mps)"
            ) from None
        return device

    @field_validator("out")
    @classmethod
    def _out(cls, out: str | None) -> str | None:
        if out is not None and not out.strip():
            raise ValueError("out is empty: give a directory (or leave out unset)")
        return out

    def run_rules(self) -> list[str]:
        """The rules this config runs."""
        return list(self.rules) if self.rules else [self.rule.name]

    @model_validator(mode="after")
    def _rule_overrides_valid(self) -> Config:
        for rule in self.rule_overrides:
            known_rule(rule)
            self.for_rule(rule)
        return self

    def check_rule_options(self) -> Config:
        """``ConfigError`` for a ``rule`` option that none of the config's rules uses (e.g.
        ``rule.layout`` without a direct rule): a setting that would be silently ignored.
        Checked where a config names all the rules it runs (``train``, ``compare``, a grid's
        setting), not on a grid cell's one-rule config."""
        try:
            self.rule.check_used(self.run_rules())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def for_rule(self, rule: str) -> Config:
        """The config ``rule`` trains with: ``rule_overrides[rule]`` applied (the published
        benchmarks tune e.g. the learning rate per rule)."""
        items = self.rule_overrides.get(rule)
        if not items:
            return self
        for key in items:
            if key in _SHARED_KEYS or key.split(".")[0] in _SHARED_KEYS[1:]:
                raise ValueError(f"rule_overrides.{rule}: {key!r} is shared by every rule")
        data = dump(self)
        data["rule_overrides"] = {}
        try:
            return validate(apply_overrides(data, items.items()))
        except ConfigError as e:
            raise ValueError(f"rule_overrides.{rule}: {e}") from None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema, sections included (``optim``, ``optim.lr``, ...)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(config_keys(ann, key + "."))
    return keys


def _closest(key: str) -> str:
    """A hint for an unknown key: the closest key of the same section, else a key of another
    section with a (nearly) identical last part, else the valid keys of the section."""
    keys = config_keys()
    section, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == section]
    near = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1)
    if near:
        return f"; did you mean {(section + '.' if section else '') + near[0]!r}?"
    by_leaf = {k.rpartition(".")[2]: k for k in keys}
    near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    if near:
        return f"; did you mean {by_leaf[near[0]]!r}?"
    return f"; valid keys here: {', '.join(k.rpartition('.')[2] for k in siblings)}"


def _describe(err: Mapping[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key {key!r}{_closest(key)}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":
        return f"{key}: {msg}" if key else msg
    return f"{key}: {msg} (got {err['input']!r})"


def validate(data: Mapping[str, Any]) -> Config:
    """A ``Config`` from plain data; ``ConfigError`` in one line otherwise."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(err) for err in e.errors())) from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.1)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict:
    """A deep copy of ``data`` with dotted overrides applied (``model.widths=[64,64]``)."""
    out = _copy(data)
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {key!r}: {where!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {str(k): _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; ``ConfigError`` for a missing file or bad YAML."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML file (binary content)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML; ``None``: the defaults), apply ``overrides``, validate."""
    data = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(data, overrides))


def dump(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (what ``config.yaml`` holds)."""
    data: dict[str, Any] = cfg.model_dump(mode="json")
    if data["model"].get("factory") is None:  # runs without factories keep their config.yaml
        data["model"].pop("factory", None)
    if data["data"].get("factory") is None:
        data["data"].pop("factory", None)
        data["data"].pop("kwargs", None)
    if not data["channels_last"]:  # as configs written before the key existed
        data.pop("channels_last")
    return data


# Sections whose keys do nothing while their switch key is None: section -> switch key.
_INERT_UNLESS = {"bottleneck": "layer"}


def config_changes(saved: Mapping[str, Any], cfg: Config) -> list[str]:
    """The dotted keys in which a config written earlier (``saved``, a dumped config) differs
    from ``cfg``. A key added since takes its default in ``saved``; a section that does nothing
    in both (``bottleneck`` without a layer) is not compared, so a change of its defaults does
    not count. A key since removed is compared as written (and so named)."""
    old: Any = dict(saved)
    with contextlib.suppress(ConfigError):
        old = dump(validate(old))
    new = dump(cfg)
    for section, switch in _INERT_UNLESS.items():
        if all((c.get(section) or {}).get(switch) is None for c in (old, new)):
            old.pop(section, None)
            new.pop(section, None)
    return list(diff_keys(old, new))


def diff_keys(a: Any, b: Any, prefix: str = "") -> Iterable[str]:
    """The dotted keys in which two dumped configs (nested dicts) differ, in sorted order."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(dump(cfg), sort_keys=False))
    os.replace(tmp, path)
