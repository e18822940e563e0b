"""Your own model and data in a run: factories named in the config (see docs/own-model.md).

A *factory spec* is a string naming a callable:

- ``"package.module:function"``: imported with the current directory first on ``sys.path``
  (as ``python -m`` does), then the rest of the Python path;
- ``"path/to/file.py:function"``: that file loaded as a module (a relative path is relative to
  the current directory; the file's own directory is on the path while it runs, so it can import
  its neighbours);
- ``"python:NAME"``: an object handed to :func:`biograd.compare` in this Python process (a lambda,
  a function defined in a notebook or under ``__main__``, data tensors). A config holding one is
  **not reproducible from its file**: it names an object that dies with the process.

The part after the colon may be dotted (``module:Class.build``). A *model factory* is called with
the config's ``model.kwargs`` and must return an ``nn.Module``; when it has a parameter named
``in_shape`` or ``classes`` that the kwargs leave unset, it gets the data's example shape and
number of classes. A *data factory* is called with ``data.kwargs`` and returns the train and test
splits in one of the forms :func:`as_splits` accepts.

Every mistake (no such module or file, no such attribute, an import or a call that raises, a
return value of the wrong type) is a one-line ``ConfigError`` naming the config key and the spec.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.datasets import ImageDataset
from ..data.imagefolder import ImageFolder
from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

SESSION = "python:"
"""Prefix of a spec that names an object of this Python process (not reproducible from a file)."""


# --- specs ------------------------------------------------------------------------------------


def check_spec(spec: str) -> str:
    """``spec`` if it has the form of a factory spec, else ValueError saying which forms exist."""
    module, sep, attr = spec.rpartition(":")
    names = attr.split(".")
    if not sep or not module or not all(n.isidentifier() for n in names if n) or "" in names:
        if spec.startswith(SESSION) and spec[len(SESSION) :]:
            return spec
        raise ValueError(
            f"factory {spec!r} is not of the form 'package.module:function' or "
            "'path/to/file.py:function'"
        )
    return spec


def label(spec: str) -> str:
    """A short name for the spec's object (its last attribute), e.g. for ``model.name``."""
    return spec.rpartition(":")[2].rpartition(".")[2] or spec


def reproducible(cfg: Config) -> bool:
    """Whether every factory of ``cfg`` can be re-created from the config file alone."""
    specs = (cfg.model.factory, cfg.data.factory)
    return not any(s is not None and s.startswith(SESSION) for s in specs)


def is_spec(text: str) -> bool:
    """Whether a ``--model``/``--data`` value names a factory rather than a built-in name."""
    return ":" in text


# --- objects of this process (biograd.compare) ------------------------------------------------

_SESSION_OBJECTS: dict[tuple[str, str], Callable[..., Any]] = {}


def session_spec(role: str, name: str, obj: Callable[..., Any]) -> str:
    """Register ``obj`` under ``python:<name>`` for ``role`` ("model" or "data") in this process
    and return the spec; a later registration of the same name replaces it."""
    _SESSION_OBJECTS[(role, name)] = obj
    return SESSION + name


def spec_of(obj: Any, role: str) -> str:
    """A spec for a callable: its importable ``module:qualname`` when importing that gives back
    the very same object, else a ``python:`` spec of this process."""
    if isinstance(obj, str):
        return check_spec_error(obj, f"{role}.factory")
    if isinstance(obj, nn.Module):
        raise ConfigError(
            f"{role}: pass a function that builds the model, not a model instance (every rule "
            "and seed trains a fresh one)"
        )
    if not callable(obj):
        raise ConfigError(
            f"{role}: expected a callable or a 'module:function' string, got {_kind(obj)}"
        )
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    file = _FILE_SPECS.get(module) if isinstance(module, str) else None
    if file is not None and isinstance(qualname, str) and "<" not in qualname:
        return f"{file}:{qualname}"  # a function of a file loaded from a file spec
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        if module == "__main__":
            spec = _main_file_spec(obj, qualname)
            if spec is not None:
                return spec
        else:
            try:
                if _resolve_attr(importlib.import_module(module), qualname) is obj:
                    return f"{module}:{qualname}"
            except Exception:  # not importable as named: this process's object
                pass
    name = qualname if isinstance(qualname, str) else type(obj).__name__
    return session_spec(role, name, obj)


def _main_file_spec(obj: Any, qualname: str) -> str | None:
    """``path/to/script.py:qualname`` for an object of a script run as ``__main__`` (so that
    ``python my_script.py`` records a config that ``biograd train`` can re-run; loading the file
    again runs its top level, but not its ``if __name__ == "__main__":`` block). In this process
    the spec resolves to the running script's own objects, without loading it a second time."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str) or not path.endswith(".py"):
        return None
    try:
        if _resolve_attr(main, qualname) is not obj:
            return None
    except AttributeError:
        return None
    file = Path(path).resolve()
    stat = file.stat()
    _FILE_MODULES[str(file)] = ((stat.st_mtime_ns, stat.st_size), main)
    try:
        shown = str(file.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(file)
    return f"{shown}:{qualname}"


def check_spec_error(spec: str, key: str) -> str:
    """``check_spec`` with a ``ConfigError`` naming ``key``."""
    try:
        return check_spec(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


# --- resolution -------------------------------------------------------------------------------


@contextlib.contextmanager
def _on_path(*dirs: str) -> Iterator[None]:
    added = [d for d in dict.fromkeys(dirs) if d not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    here = str(Path(__file__).resolve().parents[1])
    return (*(str(paths[k]) for k in ("stdlib", "purelib", "platlib") if k in paths), here)


def describe_exception(e: BaseException) -> str:
    """``"ValueError: message (nets.py:12)"``: the exception in one line, located at the
    innermost frame outside Python's and the installed libraries' code."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = type(e).__name__ + (f": {first}" if first else "")
    if isinstance(e, SyntaxError):
        return text
    frames = traceback.extract_tb(e.__traceback__)
    libs = _library_dirs()
    own = [f for f in frames if not f.filename.startswith(libs) and not f.filename.startswith("<")]
    frame = own[-1] if own else None
    return text + (f" ({Path(frame.filename).name}:{frame.lineno})" if frame else "")


_FILE_MODULES: dict[str, tuple[tuple[int, int], ModuleType]] = {}
_FILE_SPECS: dict[str, str] = {}  # module name -> the file part of the spec that loaded it


def _load_file(module: str, key: str, spec: str) -> ModuleType:
    path = Path(module).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_file():
        raise ConfigError(f"{key} {spec!r}: no file {module} (from {Path.cwd()})")
    path = path.resolve()
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _FILE_MODULES.get(str(path))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"_biograd_factory_{path.stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"{key} {spec!r}: {module} cannot be loaded as a Python module")
    mod = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = mod  # dataclasses and pickling look their module up here
    try:
        with _on_path(os.getcwd(), str(path.parent)):
            loader_spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ConfigError(
            f"{key} {spec!r}: loading {module} raised {describe_exception(e)}"
        ) from None
    _FILE_MODULES[str(path)] = (stamp, mod)
    _FILE_SPECS[name] = module
    return mod


def _import(module: str, key: str, spec: str) -> ModuleType:
    if module.endswith(".py") or "/" in module or os.sep in module:
        return _load_file(module, key, spec)
    try:
        with _on_path(os.getcwd()):
            importlib.invalidate_caches()
            return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise ConfigError(
                f"{key} {spec!r}: no module named {missing!r} (looked in the current directory "
                "and on the Python path)"
            ) from None
        raise ConfigError(
            f"{key} {spec!r}: importing {module} raised {describe_exception(e)}"
        ) from None
    except Exception as e:
        raise ConfigError(
            f"{key} {spec!r}: importing {module} raised {describe_exception(e)}"
        ) from None


def _resolve_attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(spec: str, key: str) -> Callable[..., Any]:
    """The callable ``spec`` names (``key``, e.g. ``"model.factory"``, prefixes every error)."""
    if spec.startswith(SESSION):
        role = key.partition(".")[0]
        live = _SESSION_OBJECTS.get((role, spec[len(SESSION) :]))
        if live is None:
            raise ConfigError(
                f"{key} {spec!r} was an object of the Python process that wrote this config and "
                "cannot be re-created from the file; name an importable 'module:function' "
                "instead (see docs/own-model.md)"
            )
        return live
    check_spec_error(spec, key)
    module_name, _, attr = spec.rpartition(":")
    obj: Any = _import(module_name, key, spec)
    where = module_name
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} {spec!r}: {where} has no attribute {part!r}{hint}") from None
        where = f"{where}:{part}" if where == module_name else f"{where}.{part}"
    if not callable(obj):
        raise ConfigError(f"{key} {spec!r} is {_kind(obj)}, not a callable")
    return obj  # type: ignore[no-any-return]


def _call(fn: Callable[..., Any], kwargs: Mapping[str, Any], key: str, spec: str) -> Any:
    try:
        with _on_path(os.getcwd()):
            return fn(**kwargs)
    except Exception as e:
        args = f" with {dict(kwargs)}" if kwargs else ""
        raise ConfigError(
            f"{key} {spec!r} raised {describe_exception(e)} (called{args or ' with no arguments'})"
        ) from None


def _kind(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(type(o).__name__ for o in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a {type(obj).__name__} of {len(obj)} ({inner})"
    if obj is None:
        return "None"
    name = type(obj).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


# --- models -----------------------------------------------------------------------------------


def _parameter_names(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}


def make_model(
    spec: str,
    kwargs: Mapping[str, Any],
    in_shape: Sequence[int],
    classes: int,
    key: str = "model.factory",
) -> nn.Module:
    """Call the model factory ``spec`` with ``kwargs`` (plus ``in_shape``/``classes`` where it
    takes them and ``kwargs`` does not set them); ``ConfigError`` unless it returns a module."""
    fn = resolve(spec, key)
    call = dict(kwargs)
    accepted = _parameter_names(fn)
    for name, value in (("in_shape", tuple(in_shape)), ("classes", classes)):
        if name in accepted and name not in call:
            call[name] = value
    model = _call(fn, call, key, spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key} {spec!r} returned {_kind(model)}, not a torch.nn.Module")
    return model


def check_model(cfg: Config, train: Any) -> None:
    """Build the factory's model once and run two training examples through it, so that a model
    that does not fit the data fails in one line before the run directory is touched."""
    spec = cfg.model.factory
    assert spec is not None
    classes = int(train.classes)
    model = make_model(spec, cfg.model.factory_kwargs(), tuple(train.shape), classes)
    x = train.x[:2] if isinstance(train, ImageDataset) else None
    if x is None:
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise ConfigError(
            f"model.factory {spec!r}: the model fails on a batch of shape {tuple(x.shape)}: "
            f"{describe_exception(e)}"
        ) from None
    finally:
        model.train(was)
    if not isinstance(out, Tensor) or tuple(out.shape) != (len(x), classes):
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else _kind(out)
        raise ConfigError(
            f"model.factory {spec!r}: the model must return logits of shape (batch, {classes}) "
            f"for {classes} classes, got {got} for a batch of shape {tuple(x.shape)}"
        )


# --- data -------------------------------------------------------------------------------------


@dataclass
class DataSplits:
    """What a data factory may return: the train and test splits, each an ``(x, y)`` pair of
    tensors (or numpy arrays), a map-style ``torch.utils.data.Dataset`` of ``(x, y)`` items or a
    ``biograd.data`` data set, and optionally the number of classes (default: the largest label
    plus one)."""

    train: Any
    test: Any
    classes: int | None = None


@dataclass
class TensorData(ImageDataset):
    """A data set from a data factory, in memory: ``x`` float32 of any shape (N, ...) and ``y``
    int64 (N,). Its empty ``mean``/``std`` mean *no normalisation*: the inputs are used as the
    factory returned them."""

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """One example's shape, e.g. the ``in_shape`` of a model."""
        return tuple(int(s) for s in self.x.shape[1:])


def _array(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def _stack(ds: Any, where: str) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"{where}: item {i} is {_kind(item)}, not an (x, y) pair")
        x = _array(item[0])
        if x is None:
            raise ValueError(
                f"{where}: item {i} holds {_kind(item[0])} as x, not a tensor (give the data "
                "set a transform that returns tensors)"
            )
        y = item[1]
        if isinstance(y, (Tensor, np.ndarray)) and y.ndim == 0:
            y = y.item()
        if not isinstance(y, (int, np.integer)) or isinstance(y, bool):
            raise ValueError(f"{where}: item {i} has label {y!r}; labels are class indices (int)")
        xs.append(x)
        ys.append(int(y))
    if not xs:
        raise ValueError(f"{where} is empty")
    try:
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
    except RuntimeError:
        raise ValueError(f"{where}: its examples differ in shape") from None


def _tensors(obj: Any, where: str) -> tuple[Tensor, Tensor] | ImageDataset | ImageFolder:
    if isinstance(obj, (ImageDataset, ImageFolder)):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = _array(obj[0]), _array(obj[1])
        if x is None or y is None:
            raise ValueError(f"{where} is {_kind(obj)}; an (x, y) pair must hold two tensors")
        return x, y
    if isinstance(obj, torch.utils.data.TensorDataset) and len(obj.tensors) == 2:
        return obj.tensors[0].detach().cpu(), obj.tensors[1].detach().cpu()
    if isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__"):
        return _stack(obj, where)
    raise ValueError(
        f"{where} is {_kind(obj)}; expected an (x, y) pair of tensors, a torch Dataset of (x, y) "
        "items or a biograd.data data set"
    )


def _check_pair(x: Tensor, y: Tensor, where: str) -> tuple[Tensor, Tensor]:
    if x.dim() < 2:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}; expected (N, features...)")
    if not x.is_floating_point():
        raise ValueError(f"{where}: x is {x.dtype}; inputs must be floating-point")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"{where}: y is {y.dtype} of shape {tuple(y.shape)}; labels must be integer class "
            "indices of shape (N,)"
        )
    if len(x) != len(y):
        raise ValueError(f"{where}: x holds {len(x)} examples but y {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{where} is empty")
    if int(y.min()) < 0:
        raise ValueError(f"{where}: labels must be class indices >= 0, found {int(y.min())}")
    return x.to(torch.float32).contiguous(), y.to(torch.int64).contiguous()


def as_splits(
    obj: Any, name: str = "factory"
) -> tuple[ImageDataset | ImageFolder, ImageDataset | ImageFolder]:
    """The train and test data sets of what a data factory returned: a ``(train, test)`` pair, a
    mapping or object with ``train`` and ``test`` (and optionally ``classes``, e.g.
    :class:`DataSplits`), where each split is an ``(x, y)`` pair of tensors or numpy arrays
    (float inputs of any shape (N, ...), cast to float32; integer labels (N,)), a map-style
    ``torch.utils.data.Dataset`` of ``(x, y)`` items (read once into memory), or a
    ``biograd.data`` data set. ValueError saying what is wrong otherwise."""
    classes: Any = None
    if isinstance(obj, Mapping) and "train" in obj and "test" in obj:
        train, test, classes = obj["train"], obj["test"], obj.get("classes")
    elif not isinstance(obj, (tuple, list, Tensor, nn.Module, Mapping)) and all(
        hasattr(obj, k) for k in ("train", "test")
    ):
        train, test, classes = obj.train, obj.test, getattr(obj, "classes", None)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        if all(_array(o) is not None for o in obj):
            raise ValueError(
                f"returned {_kind(obj)}: one (x, y) pair; return both splits, "
                "((x_train, y_train), (x_test, y_test))"
            )
        train, test = obj
    else:
        raise ValueError(
            f"returned {_kind(obj)}; expected (train, test), a mapping with 'train' and 'test', "
            "or a DataSplits (see docs/own-model.md)"
        )
    if classes is not None and (
        not isinstance(classes, int) or isinstance(classes, bool) or classes < 2
    ):
        raise ValueError(f"returned classes={classes!r}; expected an int of at least 2")
    parts = {"train": _tensors(train, "its train split"), "test": _tensors(test, "its test split")}
    pairs = {k: _check_pair(*v, f"its {k} split") for k, v in parts.items() if isinstance(v, tuple)}
    if classes is None:
        known = [v.classes for v in parts.values() if not isinstance(v, tuple)]
        seen = [int(y.max()) + 1 for _, y in pairs.values()]
        classes = max(known + seen)
        if classes < 2:
            raise ValueError("its labels hold only one class")
    for k, (_, y) in pairs.items():
        if int(y.max()) >= classes:
            raise ValueError(f"its {k} split has label {int(y.max())}, outside 0..{classes - 1}")
    out: dict[str, ImageDataset | ImageFolder] = {}
    for k, v in parts.items():
        if isinstance(v, tuple):
            x, y = pairs[k]
            out[k] = TensorData(x=x, y=y, classes=classes, name=name, mean=(), std=(), split=k)
        else:
            out[k] = v
    if tuple(out["train"].shape) != tuple(out["test"].shape):
        raise ValueError(
            f"its train examples have shape {tuple(out['train'].shape)} but its test examples "
            f"{tuple(out['test'].shape)}"
        )
    return out["train"], out["test"]


def load_factory_data(cfg: Config) -> tuple[Any, Any]:
    """The train and test splits from ``cfg.data.factory`` called with ``cfg.data.kwargs``."""
    spec = cfg.data.factory
    assert spec is not None
    key = "data.factory"
    fn = resolve(spec, key)
    returned = _call(fn, cfg.data.kwargs, key, spec)
    try:
        train, test = as_splits(returned, cfg.data.name)
    except ValueError as e:
        raise ConfigError(f"{key} {spec!r} {e}") from None
    a = cfg.data.augment
    if (a.crop_padding or a.hflip) and len(train.shape) != 3:
        raise ConfigError(
            f"data.augment: crops and flips need images (N, C, H, W); {spec!r} returned examples "
            f"of shape {tuple(train.shape)}"
        )
    return train, test


def fingerprint(train: ImageDataset | ImageFolder, test: ImageDataset | ImageFolder) -> str:
    """A short hash of in-memory splits (so a resumed run can tell changed data apart)."""
    h = hashlib.sha1()
    for ds in (train, test):
        if isinstance(ds, ImageDataset):
            for t in (ds.x, ds.y):
                h.update(str((tuple(t.shape), t.dtype)).encode())
                h.update(t.contiguous().numpy().tobytes())
        else:
            h.update(str(ds.root if hasattr(ds, "root") else id(ds)).encode())
    return h.hexdigest()[:12]
