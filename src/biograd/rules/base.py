"""The rule interface, the registry, and the scale schemes of random feedback.

A rule is the child module ``layer.rule`` of the layer it trains; all its state is registered
tensors (fixed feedback buffers, learned feedback Parameters, int64 counters), so it moves with
``.to()`` and saves with ``torch.save``, safetensors and ``save_pretrained``
(``docs/architecture.md``).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

_REGISTRY: dict[str, type[Rule]] = {}

SCALES = ("xavier", "kaiming", "xiao", "weight")
"""Feedback scale schemes, the standard deviation of the random feedback entries: ``xavier``
(default) ``sqrt(2 / (fan_in + fan_out))`` (Glorot & Bengio 2010; BioTorch's, Sanfiz & Akrout
2021); ``kaiming`` ``sqrt(2 / fan_in)`` (He et al. 2015); ``xiao`` ``sqrt(2 / fan_out)``, for a
convolution ``sqrt(2 / (k*k*C_out))`` (Xiao et al. 2018); ``weight`` the std of the layer's
weight at conversion. ``fan_in = in * prod(kernel)``, ``fan_out = out * prod(kernel)`` (per
group)."""

MASK32 = 0xFFFFFFFF


def check_scale(scheme: str) -> None:
    """``ValueError`` naming :data:`SCALES` unless ``scheme`` is one of them."""
    if scheme not in SCALES:
        raise ValueError(f"unknown feedback scale {scheme!r}; choose one of {', '.join(SCALES)}")


def feedback_std(weight: Tensor, scheme: str) -> float:
    """Standard deviation of the feedback entries for a weight of this shape under ``scheme``."""
    check_scale(scheme)
    if scheme == "weight":
        if weight.is_meta:
            raise ValueError("scale='weight' needs the weight's values: convert after to_empty")
        return float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return math.sqrt(2.0 / {"xavier": fan_in + fan_out, "kaiming": fan_in, "xiao": fan_out}[scheme])


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from the model seed and the layer's name (the same in every process)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def uniform_like(weight: Tensor, std: float, seed: int) -> Tensor:
    """Entries ~ U(-sqrt(3) std, sqrt(3) std) drawn on the CPU from ``seed`` (the same on every
    device and rank), shaped, placed and typed like ``weight`` (empty on the meta device)."""
    if weight.is_meta:
        return torch.empty_like(weight)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    r = torch.rand(weight.shape, generator=gen, dtype=dtype)
    return ((2 * r - 1) * (math.sqrt(3.0) * std)).to(weight.device, weight.dtype)


def mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of 32-bit integers) on int64 tensors."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def in_backward() -> bool:
    """True while autograd runs a backward pass, where a forward pass is activation
    checkpointing's recomputation (both modes), which must repeat the pass it recomputes; False
    under ``torch.compile``, whose graphs recompute on their own."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class Rule(nn.Module):
    """A learning rule for one layer, with its state (``docs/architecture.md``, "Adding a rule").

    Capabilities (class attributes; generic code asks these, never a rule's name): ``direct``
    (the error comes through the direct-feedback engine), ``needs_targets``
    (``biograd.set_targets`` before each forward), ``trains_hidden``, ``learned_feedback`` (owns
    Parameters that learn), ``updates_after_step`` (``biograd.update_feedback`` after every
    optimizer step), ``exact_input_grad`` (the input gradient is autograd's ``W^T delta``),
    ``learned`` (state registered as Parameters), ``tied_to_weight`` (state that gets every
    change made to W, e.g. by ``biograd.optim.WeightNormConstraint``), ``options`` (the rule's
    keyword options). Config (``seed``, ``scheme``, ``std``, ``shape``) is plain attributes.

    The state comes from :meth:`initial_state` (again at ``to_empty`` from the meta device);
    a forward pass hands :meth:`pass_state` to the op, whose backward asks :meth:`matrix` for B
    and :meth:`state_grads` for the state's gradients; :meth:`update` learns outside autograd.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    direct: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = False
    trains_hidden: ClassVar[bool] = True
    learned_feedback: ClassVar[bool] = False
    updates_after_step: ClassVar[bool] = False
    exact_input_grad: ClassVar[bool] = False
    learned: ClassVar[tuple[str, ...]] = ()
    tied_to_weight: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weight: Tensor, seed: int = 0, scale: str = "xavier") -> None:
        super().__init__()
        self.seed, self.scheme = int(seed), scale
        self.std = feedback_std(weight, scale)
        self.shape = tuple(weight.shape)
        state = self.initial_state(weight.detach())
        self.state_names = tuple(state)
        for key, value in state.items():
            if key in self.learned:
                self.register_parameter(key, nn.Parameter(value, weight.requires_grad))
            else:
                self.register_buffer(key, value)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """``ValueError`` for option values the rule cannot take (before anything is converted)."""

    @classmethod
    def for_layer(
        cls, layer: nn.Module, weight: Tensor, seed: int, scale: str, **options: Any
    ) -> Rule:
        """The rule for ``layer``, whose weight in the ``(out, in, *kernel)`` layout is
        ``weight`` (a rule that needs more of the layer, e.g. its groups, overrides this)."""
        return cls(weight, seed, scale, **options)

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        """The rule's state for a weight shaped, typed and placed like ``like``."""
        return {}

    def pass_state(self, advance: bool) -> tuple[Tensor, ...]:
        """What this pass's backward needs (default: the state); ``advance``: a training pass."""
        return tuple(t for _, t in self._state())

    def last_state(self) -> tuple[Tensor, ...]:
        """The :meth:`pass_state` of the last training pass (before any: of the next one)."""
        return self.pass_state(False)

    def matrix(self, weight: Tensor, *state: Tensor) -> Tensor | None:
        """The feedback matrix B (shape of ``weight``) for a pass with ``state``; None: W."""
        return None

    def state_grads(self, grad_weight: Tensor | None, *state: Tensor) -> tuple[Tensor | None, ...]:
        """Gradients of the :meth:`pass_state` tensors from the layer's weight gradient."""
        return (None,) * len(state)

    def update(self, layer: nn.Module) -> None:
        """One learning step of the feedback (rules with ``updates_after_step``)."""

    def _state(self) -> list[tuple[str, Tensor]]:
        return [(k, getattr(self, k)) for k in self.state_names]

    def reset_state(self) -> None:
        """Draw the state again from the seed, in place (Parameters stay the same objects)."""
        state = self._state()
        if not state:
            return
        like = torch.empty(self.shape, dtype=state[0][1].dtype, device=state[0][1].device)
        with torch.no_grad():
            for key, value in self.initial_state(like).items():
                getattr(self, key).copy_(value)

    def _apply(self, fn: Any, recurse: bool = True) -> Rule:
        was_meta = any(t.is_meta for _, t in self._state())
        super()._apply(fn, recurse)
        if was_meta and not any(t.is_meta for _, t in self._state()):
            self.reset_state()  # to_empty: the memory is uninitialised, the seed is not
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        own = {k for k, _ in self._state()}
        saved = {k[len(prefix) :] for k in state_dict if k.startswith(prefix)}
        if saved - own:
            raise RuntimeError(
                f"state_dict was saved with another rule (keys {sorted(saved)} under {prefix!r}); "
                f"this layer uses rule {self.name!r} (keys {sorted(own)})"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, scale={self.scheme}" if self._state() else ""


def register(rule: type[Rule]) -> type[Rule]:
    """Add a rule class to the registry under ``rule.name`` (usable as a class decorator)."""
    _REGISTRY[rule.name] = rule
    return rule


def get_rule(name: str) -> type[Rule]:
    """The rule class registered as ``name``; ``ValueError`` naming the available rules otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown rule {name!r}; available rules: {', '.join(_REGISTRY)}"
        ) from None


def rule_names() -> tuple[str, ...]:
    """Names of all registered rules, in registration order."""
    return tuple(_REGISTRY)
