"""Optimizer helpers from the seed papers, as thin wrappers around any ``torch.optim.Optimizer``.

- :class:`BatchManhattan`: the step uses the sign of the mini-batch gradient (Liao, Leibo,
  Poggio 2016, "Batch Manhattan"; used by Xiao et al. 2018 and Moskovitz et al. 2018).
- :class:`NoSignChange`: an update that would flip the sign of a weight is not applied to that
  entry (Liao et al. 2016); with sign-concordant feedback (usf, frsf, brsf: B = |R| sign(W)) this
  keeps sign(B) fixed for the whole run.
- :class:`WeightNormConstraint`: after every step each forward weight W is rescaled to the
  Frobenius norm it had when the wrapper was made (Moskovitz, Litwin-Kumar, Abbott 2018).

Each wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults``
are those of the wrapped optimizer (the same objects), so LR schedulers, ``GradScaler`` and
checkpointing work on the wrapper. Parameters are changed in place; no Parameter object is ever
replaced. Wrappers nest, and :func:`wrap` nests them in the order that keeps every guarantee.
See docs/optim.md for the exact update of each wrapper.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["BatchManhattan", "NoSignChange", "OptimizerWrapper", "WeightNormConstraint", "wrap"]

_NORMS_KEY = "biograd_weight_norms"


class OptimizerWrapper(Optimizer):
    """An ``Optimizer`` that runs ``optimizer.step()`` between :meth:`before_step` and
    :meth:`after_step`, and otherwise passes everything through to ``optimizer``.

    Args:
        optimizer: any torch optimizer (or another wrapper).
        params: the tensors this wrapper acts on (default: every parameter of ``optimizer``,
            including parameter groups added later).

    A ``closure`` given to :meth:`step` is evaluated once, before the update, and the wrapped
    optimizer steps without it (so optimizers that re-evaluate the closure, such as LBFGS, are
    not supported).
    """

    def __init__(self, optimizer: Optimizer, params: Iterable[Tensor] | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # Optimizer.__init__ would build new param_groups; only its hook tables are needed.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self._only: set[int] | None = None if params is None else {id(p) for p in params}
        if self._only is not None:
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not self._only <= known:
                raise ValueError(f"{type(self).__name__}: params must be held by the optimizer")

    # ---------------------------------------------------------------- pass-through
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.optimizer.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    # ---------------------------------------------------------------- the step
    def targets(self) -> Iterator[Tensor]:
        """The parameters this wrapper acts on, in the optimizer's order."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if self._only is None or id(p) in self._only:
                    yield p

    def before_step(self) -> Any:
        """Runs before the wrapped step; its result is handed to :meth:`after_step`."""
        return None

    def after_step(self, token: Any) -> None:
        """Runs after the wrapped step."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        token = self.before_step()
        try:
            self.optimizer.step()
        finally:
            self.after_step(token)
        return loss


class BatchManhattan(OptimizerWrapper):
    """Batch Manhattan: the wrapped optimizer steps on ``sign(g)`` instead of the mini-batch
    gradient ``g`` (Liao, Leibo, Poggio 2016, section "Batch Manhattan"; Xiao et al. 2018).

    The sign is taken of the loss gradient only; weight decay is added *after* the sign by the
    wrapped optimizer, as in Liao et al.'s rule ``dW <- m dW - lr (sign(g) + wd W)``. With
    ``SGD(lr, momentum=m, weight_decay=wd)`` the update is exactly that; with ``AdamW`` the decay
    is decoupled as usual. Entries with a zero gradient get ``sign(0) = 0``.

    ``p.grad`` holds the true gradient again after :meth:`step` (the signs are temporary tensors),
    so monitors that read gradients after the step see the real ones.
    """

    def before_step(self) -> list[tuple[Tensor, Tensor]]:
        saved = []
        for p in self.targets():
            g = p.grad
            if g is not None:
                saved.append((p, g))
                p.grad = torch.sign(g)
        return saved

    def after_step(self, token: list[tuple[Tensor, Tensor]]) -> None:
        for p, g in token:
            p.grad = g


class NoSignChange(OptimizerWrapper):
    """No sign change: after the wrapped step, every entry whose sign the step flipped
    (``w_old * w_new < 0``) is set back to ``w_old`` (Liao et al. 2016); all other entries keep
    the optimizer's update.

    An entry at exactly 0 has no sign and may move either way; an update that lands exactly on
    0 is applied. The optimizer's own state (momentum, Adam moments) advances as if the update
    had been applied everywhere: only the weight is held. Cost: one copy of every parameter that
    has a gradient, during the step.

    With sign-concordant feedback (usf, frsf, brsf: ``B = |R| * sign(W)``) sign(W), and so
    sign(B), then never change during training. For kp the feedback B is a parameter of the
    optimizer and is held by its own sign; pass ``params`` to restrict the wrapper to some tensors.
    """

    @torch.no_grad()
    def before_step(self) -> list[tuple[Tensor, Tensor]]:
        return [(p, p.detach().clone()) for p in self.targets() if p.grad is not None]

    @torch.no_grad()
    def after_step(self, token: list[tuple[Tensor, Tensor]]) -> None:
        for p, old in token:
            flipped = (old * p) < 0
            p.copy_(torch.where(flipped, old, p))


class WeightNormConstraint(OptimizerWrapper):
    """Forward-weight norm constraint: after every step each constrained weight ``W`` is
    multiplied by ``||W_0||_F / ||W||_F``, with ``W_0`` its value when the wrapper was made
    (Moskovitz, Litwin-Kumar, Abbott 2018). The norm of a convolution kernel is taken over the
    whole kernel tensor.

    Args:
        optimizer: any torch optimizer holding the weights.
        target: a model, whose converted layers' ``weight`` are constrained (``ValueError`` if it
            has none); or an iterable of tensors, each kept at its own initial norm.

    Kolen-Pollack: when ``target`` is a model, a rule's tensors named in ``tied_to_weight`` (kp's B) are
    multiplied by the *same* factor as their ``W``, so that B receives the same update as W and
    ``W - B`` keeps decaying. Biases and BatchNorm parameters are never touched. A weight whose
    norm is 0 is left as it is. The initial norms are saved in ``state_dict``.

    Wrap this one outermost (as :func:`wrap` does) so the norm holds after every other wrapper.
    """

    def __init__(self, optimizer: Optimizer, target: nn.Module | Iterable[Tensor]) -> None:
        pairs: list[tuple[Tensor, list[Tensor]]] = []
        if isinstance(target, nn.Module):
            from .convert import converted_layers

            for _, layer in converted_layers(target):
                rule = layer.rule
                tied = [t for n in rule.tied_to_weight if (t := getattr(rule, n)).requires_grad]
                pairs.append((layer.weight, tied))
            if not pairs:
                raise ValueError(
                    f"{type(target).__name__} has no converted layers: convert it with "
                    "biograd.convert first, or pass the weights to constrain"
                )
        else:
            pairs = [(p, []) for p in target]
        super().__init__(optimizer)
        self.constrained = pairs
        self.norms = [self._norm(w) for w, _ in pairs]

    @staticmethod
    @torch.no_grad()
    def _norm(w: Tensor) -> Tensor:
        return torch.linalg.vector_norm(w.detach(), dtype=_norm_dtype(w))

    @torch.no_grad()
    def after_step(self, token: Any) -> None:
        for (w, tied), n0 in zip(self.constrained, self.norms):
            n = self._norm(w)
            factor = torch.where(n > 0, n0.to(n.device) / n, torch.ones_like(n))
            w.mul_(factor.to(w.dtype))
            for t in tied:
                t.mul_(factor.to(t.dtype))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_NORMS_KEY] = [float(n) for n in self.norms]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        norms = state.pop(_NORMS_KEY, None)
        if norms is not None:
            if len(norms) != len(self.norms):
                raise ValueError(
                    f"state_dict holds {len(norms)} weight norms, this constraint has "
                    f"{len(self.norms)} weights"
                )
            self.norms = [
                torch.tensor(v, dtype=_norm_dtype(w), device=w.device)
                for v, (w, _) in zip(norms, self.constrained)
            ]
        super().load_state_dict(state)


def _norm_dtype(w: Tensor) -> torch.dtype:
    """Norms of half-precision weights are taken in float32."""
    return torch.promote_types(w.dtype, torch.float32)


def wrap(
    optimizer: Optimizer,
    *,
    manhattan: bool = False,
    no_sign_change: bool = False,
    norm_constraint: nn.Module | Iterable[Tensor] | None = None,
) -> Optimizer:
    """Wrap ``optimizer`` with the requested helpers, nested as
    ``WeightNormConstraint(NoSignChange(BatchManhattan(optimizer)))`` so that the norm
    constraint acts last. Returns ``optimizer`` itself when nothing is requested."""
    out: Optimizer = optimizer
    if manhattan:
        out = BatchManhattan(out)
    if no_sign_change:
        out = NoSignChange(out)
    if norm_constraint is not None:
        out = WeightNormConstraint(out, norm_constraint)
    return out
