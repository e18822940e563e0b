"""Direct rules on sequence models with the defaults (rows by position): a linear-like layer's
input ``(N, *P, d)`` has ``B_k`` of shape ``(d, C)`` shared by its positions; a point whose
positions are the output's gets ``B_k s_{n,t}`` at each position, any other point ``B_k sum_t
s_{n,t}`` at every position of sample ``n`` (``biograd.direct.positions``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import biograd
from biograd.direct import FeedbackError

V, D, H = 7, 6, 5
DIRECT = [r for r in biograd.RULES if biograd.get_rule(r).direct]


class Seq2Seq(nn.Module):
    """A toy encoder-decoder: source ``(N, S)`` and target ``(N, T)`` tokens, logits
    ``(N, T, V)``; the encoder reaches the decoder through its mean over source positions.
    ``mode``: checkpoint the encoder (None: no, else ``use_reentrant``)."""

    def __init__(self, mode: bool | None = None) -> None:
        super().__init__()
        self.src, self.tgt = nn.Embedding(V, D), nn.Embedding(V, D)
        self.enc1, self.act1, self.enc2 = nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H)
        self.dec1, self.act2, self.head = nn.Linear(D, H), nn.Tanh(), nn.Linear(H, V)
        self.mode = mode

    def encode(self, x: Tensor) -> Tensor:
        return self.enc2(self.act1(self.enc1(x)))

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        x = self.src(src)
        mem = (
            self.encode(x)
            if self.mode is None
            else checkpoint(self.encode, x, use_reentrant=self.mode)
        )
        return self.head(self.act2(self.dec1(self.tgt(tgt)) + mem.mean(1, keepdim=True)))


# the point (the input of a converted layer) -> the module whose output it is
POINTS = {"enc1": "src", "enc2": "act1", "dec1": "tgt", "head": "act2"}
POOLED = {"enc1", "enc2"}  # source positions: not the output's


def engine_of(model: nn.Module) -> biograd.direct.DirectFeedback:
    return next(m for m in model.modules() if isinstance(m, biograd.direct.DirectFeedback))


def run(
    model: Seq2Seq, rule: str, src: Tensor, tgt: Tensor, y: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """One backward pass; the output error ``e`` and every point's activity (gradient kept)."""
    acts: dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    handles = [
        mods[m].register_forward_hook(lambda _m, _a, o, k=k: acts.__setitem__(k, o))
        for k, m in POINTS.items()
    ]
    if rule == "drtp":
        biograd.set_targets(model, y)
    out = model(src, tgt)
    for h in handles:
        h.remove()
    out.retain_grad()
    for a in acts.values():
        if a.requires_grad:  # not inside a reentrant checkpoint's first forward
            a.retain_grad()
    F.cross_entropy(out.reshape(-1, V), y.reshape(-1)).backward()
    assert out.grad is not None
    return out.grad, acts


def data(n: int = 3, s: int = 5, t: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    src, tgt = (
        torch.randint(0, V, (n, s), generator=gen),
        torch.randint(0, V, (n, t), generator=gen),
    )
    return src, tgt, torch.randint(0, V, (n, t), generator=gen)


@pytest.mark.parametrize("layout", ["dense", "shared", "hashed"])
@pytest.mark.parametrize("rule", DIRECT)
def test_points_get_the_per_position_or_pooled_projection(rule: str, layout: str) -> None:
    """Closed form: a decoder point's gradient at position t is ``B_k s_t``; an encoder point's
    (source length 5, target length 4) is ``B_k sum_t s_t`` at every source position; the layer
    below a pooled point gets the weight gradient of that broadcast delta; dkp's ``B_k`` gets
    ``(sum_p a_p)^T (sum_t s_t)`` for a pooled point and ``a^T s`` per position."""
    torch.manual_seed(0)
    model = Seq2Seq().double()
    if biograd.get_rule(rule).learned_feedback and layout != "dense":
        with pytest.raises(ValueError, match="dense"):
            biograd.convert(model, rule, layout=layout)
        return
    biograd.convert(model, rule, layout=layout)
    src, tgt, y = data()
    e, acts = run(model, rule, src, tgt, y)
    eng = engine_of(model)
    assert eng.sizes == {"enc1": D, "enc2": H, "dec1": D, "head": H} and eng.classes == V
    s = biograd.get_rule(rule).signal(e.reshape(-1, V), y.reshape(-1))
    if s is None:  # shallow: only the output layer learns
        assert all(a.grad is None for a in acts.values())
        assert model.enc1.weight.grad is None and model.head.weight.grad is not None
        return
    s = s.reshape(e.shape)
    for key, a in acts.items():
        b = eng.matrix(key)
        if key in POOLED:
            want = (s.sum(1) @ b.T).unsqueeze(1).expand(a.shape)
            act = a.detach().sum(1)
            s_k = s.sum(1)
        else:
            want = s @ b.T
            act, s_k = a.detach().reshape(-1, b.shape[0]), s.reshape(-1, V)
        torch.testing.assert_close(a.grad, want, msg=key)
        if biograd.get_rule(rule).learned_feedback:
            torch.testing.assert_close(b.grad, act.T @ s_k, msg=key)
    # an independent formula for the layer below a pooled point: delta = g * (1 - tanh^2)
    delta = acts["enc2"].grad * (1 - acts["enc2"].detach() ** 2)
    x = acts["enc1"].detach()
    torch.testing.assert_close(model.enc1.weight.grad, delta.reshape(-1, H).T @ x.reshape(-1, D))


def test_dfa_defaults_equal_batch_dims_2_where_positions_agree() -> None:
    """Equal source and target lengths and per-token points everywhere: the default reads every
    point per position, as ``batch_dims=2`` does (same B, same gradients)."""
    src, tgt, y = data(s=4, t=4)
    grads = []
    for batch_dims in (None, 2):
        torch.manual_seed(0)
        model = biograd.convert(Seq2Seq(), "dfa", batch_dims=batch_dims)
        run(model, "dfa", src, tgt, y)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], msg=name)


def test_sequences_of_other_lengths_use_the_same_feedback() -> None:
    torch.manual_seed(0)
    model = biograd.convert(Seq2Seq(), "dfa")
    run(model, "dfa", *data(s=5, t=4))
    before = {k: engine_of(model).matrix(k).clone() for k in POINTS}
    run(model, "dfa", *data(n=2, s=9, t=2))
    for k, b in before.items():
        assert torch.equal(engine_of(model).matrix(k), b)


def test_explicit_batch_dims_refuses_unequal_lengths_in_one_line() -> None:
    model = biograd.convert(Seq2Seq(), "dfa", batch_dims=2)
    with pytest.raises(FeedbackError, match=r"'enc1'.*sample dimensions \(batch_dims=2\) differ"):
        model(*data(s=5, t=4)[:2])


def test_points_whose_samples_differ_from_the_outputs_are_refused() -> None:
    class TimeFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c, self.b = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:  # x: (N, T, 4); c reads (T, N, 4)
            h = torch.tanh(self.c(torch.tanh(self.a(x)).transpose(0, 1)))
            return self.b(h.mean(0))

    model = biograd.convert(TimeFirst(), "dfa")
    with pytest.raises(FeedbackError, match=r"'c' has shape \(5, 2, 4\).*their samples differ"):
        model(torch.randn(2, 5, 4))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_pooled_points_get_the_same_gradients(reentrant: bool) -> None:
    src, tgt, y = data()
    grads = []
    for mode in (None, reentrant):
        torch.manual_seed(0)
        model = biograd.convert(Seq2Seq(mode), "dfa")
        run(model, "dfa", src, tgt, y)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.parametrize("rule", ["dfa", "sdfa", "drtp", "shallow"])
def test_func_grad_with_pooled_points_equals_backward(rule: str) -> None:
    torch.manual_seed(0)
    model = biograd.convert(Seq2Seq(), rule)
    src, tgt, y = data()
    run(model, rule, src, tgt, y)  # draws the feedback, fills .grad

    def loss(p: dict[str, Tensor]) -> Tensor:
        if rule == "drtp":
            biograd.set_targets(model, y)
        out = torch.func.functional_call(model, p, (src, tgt))
        return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))

    params = dict(model.named_parameters())
    got = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
    for name, p in params.items():
        want = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got[name], want, msg=name)


def test_state_dict_round_trip_of_pooled_feedback() -> None:
    torch.manual_seed(0)
    model = biograd.convert(Seq2Seq(), "dfa", layout="hashed")
    src, tgt, y = data()
    run(model, "dfa", src, tgt, y)
    fresh = biograd.convert(copy.deepcopy(Seq2Seq()), "dfa", layout="hashed")
    fresh.load_state_dict(model.state_dict())
    model.zero_grad()
    run(model, "dfa", src, tgt, y)
    run(fresh, "dfa", src, tgt, y)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_feedback_sizes_read_rows_as_the_engine_does() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    sizes, classes = biograd.direct.feedback_sizes(model, (2, 5, 4))
    assert sizes == {"2": 6} and classes == 3
    assert biograd.direct.feedback_sizes(model, (2, 5, 4), batch_dims=1) == ({"2": 30}, 15)
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 3)
    )
    assert biograd.direct.feedback_sizes(cnn, (1, 1, 6, 6)) == ({"2": 32, "4": 8}, 3)


class Classifier(nn.Module):
    """Tokens ``(N, T)`` to per-sample logits ``(N, 3)`` through the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.act, self.head = (
            nn.Embedding(V, D),
            nn.Linear(D, H),
            nn.Tanh(),
            nn.Linear(H, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.lin(self.emb(x))).mean(1))


def test_old_per_sample_checkpoint_needs_batch_dims_1() -> None:
    """A dense checkpoint from ``batch_dims=1`` (``B`` of ``(T * d, C)`` at token points)
    continues under ``batch_dims=1`` and is refused in one line under the default."""
    x, y = torch.randint(0, V, (2, 4)), torch.tensor([0, 2])
    old = biograd.convert(Classifier(), "dfa", batch_dims=1)
    F.cross_entropy(old(x), y).backward()
    assert engine_of(old).sizes == {"lin": 4 * D, "head": H}
    again = biograd.convert(Classifier(), "dfa", batch_dims=1)
    again.load_state_dict(old.state_dict())
    F.cross_entropy(again(x), y).backward()
    new = biograd.convert(Classifier(), "dfa")
    new.load_state_dict(old.state_dict())
    with pytest.raises(FeedbackError, match=r"'lin' has 6 features.*drawn for 24.*set batch_dims"):
        new(x)
