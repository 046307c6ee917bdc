"""LiLoRA's up-projections of all adapted weights, built together (used by ``lilora.py``).

A module of its own because it is how LiLoRA *runs*, not what it *is*: per adapted weight the
method's update needs ``B_t = sigmoid(g_t) B0 + (1 - sigmoid(g_t)) P_t Q_t``, which depends on
parameters only. Built layer by layer that is 6 operators forward and ~11 backward for every
adapted weight, and a GPU step at ViT-B/16 sizes is bound by such small launches, not by FLOPs.
:class:`UpProjections` builds the ``B_t`` of every weight of one model with one batched operator
chain per shape group (weights with the same out, r, s, dtype and device)::

    B0s, Ps, Qs, gs = stack over the group            (G, out, r), (G, out, s), (G, s, r), (G,)
    Bs = sigmoid(gs) B0s + (1 - sigmoid(gs)) bmm(Ps, Qs)           # the same formula, batched

so a step pays ~23 operators per group instead of ~17 per weight. The values equal the
per-weight formula (bmm equals mm per slice and the element-wise steps are the same); the
backward (:class:`_GroupedUp`) repeats autograd's per-weight steps batched, except that the gate
gradient's sum over out x r runs as one batched reduction (the same to fp32 rounding).

When ``B_t`` is built: on the first call of any branch after something invalidates the values,
and kept for the calls that follow (the text and image towers of one step, evaluation batches):

* a backward went through them (the next forward belongs to a new step or micro-batch);
* grad mode or the autocast state differs from when they were built;
* a branch's stamp changed: its active task, or the identity, version counter, storage or
  ``requires_grad`` of its B0, P_t, Q_t, g_t (an optimiser step, ``load_state_dict``, ``.to()``,
  freezing). A write through ``.data`` without a backward in between is the one change not seen
  (autograd has the same blind spot); :meth:`UpProjections.clear` forgets the values.

During a backward (gradient checkpointing re-running a forward) the values of the forward are
reused. Under ``torch.compile`` each branch builds its own ``B_t`` with the per-weight formula
(the compiler fuses it), so nothing here is traced; so does a branch whose factors are not
materialised (DeepSpeed ZeRO-3 before the branch's module has run, or with non-persistent adapters).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..adapters.base import in_backward

if TYPE_CHECKING:
    from .lilora import LiLoRABranch


def _factors(branch: LiLoRABranch) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(B0, P_t, Q_t, g_t) of the active task; None without a valid task, or where a factor is not
    materialised: DeepSpeed ZeRO-3 holds a parameter as an empty tensor until its module's forward
    fetches it, and partitions it again afterwards unless it is persistent (the trainer makes
    adapters persistent). Such a branch builds its own B_t. Read from the modules' parameter tables
    directly: this runs for every adapted weight in every forward."""
    task = branch.active_task
    p = branch.P._parameters.get(task) if task is not None else None
    if p is None or not getattr(p, "ds_persist", True):
        return None
    b0, q = branch._parameters["B0"], branch.Q._parameters[task]
    if b0.dim() != 2 or p.dim() != 2 or q.dim() != 2:  # type: ignore[union-attr]
        return None
    return b0, p, q, branch.g._parameters[task]  # type: ignore[return-value]


def _stamp(branch: LiLoRABranch) -> tuple:
    tensors = _factors(branch)
    if tensors is None:
        return (None, branch.active_task)
    return (branch.active_task,) + tuple((id(t), t._version, t.data_ptr(), t.requires_grad) for t in tensors)


def _mode(device: torch.device) -> tuple:
    kind = device.type
    return torch.is_grad_enabled(), torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


class UpProjections:
    """The ``B_t`` of every LiLoRA branch of one model (``branch.ups``); see the module docstring."""

    def __init__(self, branches: Sequence[LiLoRABranch]) -> None:
        self.branches = list(branches)
        for index, branch in enumerate(self.branches):
            branch.ups, branch.up_index = self, index
        self.clear()

    def clear(self) -> None:
        self.values: list[Tensor | None] | None = None
        self.stamps: list[tuple] = []
        self.mode: tuple | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> UpProjections:  # built values hold a graph: not copied
        new = UpProjections.__new__(UpProjections)
        memo[id(self)] = new
        new.branches = copy.deepcopy(self.branches, memo)
        new.clear()
        return new

    def __getstate__(self) -> dict[str, Any]:  # pickling a model (torch.save) keeps no built values
        return {"branches": self.branches}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.branches = state["branches"]
        self.clear()

    def get(self, branch: LiLoRABranch) -> Tensor:
        """``branch``'s ``B_t`` (out, r) for its active task."""
        if torch.compiler.is_compiling():
            return branch.up()
        index, device = branch.up_index, branch._parameters["B0"].device  # type: ignore[union-attr]
        if self.values is None or not (in_backward() or (self.mode == _mode(device)
                                                         and self.stamps[index] == _stamp(branch))):
            self.build(device)
        value = self.values[index]  # type: ignore[index]
        return branch.up() if value is None else value  # None: no valid task (up() says why), or not materialised

    def build(self, device: torch.device) -> None:
        values: list[Tensor | None] = [None] * len(self.branches)
        groups: dict[tuple, list[int]] = {}
        factors = [_factors(branch) for branch in self.branches]
        for index, found in enumerate(factors):
            if found is not None:
                b0, p, q, _ = found
                groups.setdefault((b0.shape, p.shape, q.shape, b0.dtype, b0.device), []).append(index)
        for members in groups.values():
            tensors = [factors[i][k] for k in range(4) for i in members]  # type: ignore[index]
            built = _GroupedUp.apply(self, len(members), *tensors)  # (G, out, r)
            for index, value in zip(members, built.unbind(0)):
                values[index] = value
        self.values, self.stamps, self.mode = values, [_stamp(b) for b in self.branches], _mode(device)


class _GroupedUp(torch.autograd.Function):
    """``(B0s, Ps, Qs, gs) -> sigmoid(g) B0 + (1 - sigmoid(g)) P Q`` for a group, stacked (G, out, r).

    The tensors the backward needs are kept on ``ctx`` (not ``save_for_backward``): they are fresh
    stacks and intermediates nothing modifies, and a second backward through values shared by two
    forwards (``loss1.backward(); loss2.backward()``) must still find them.
    """

    @staticmethod
    def forward(ctx: Any, owner: UpProjections, n: int, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        b0, p, q, g = (torch.stack(tensors[k * n:(k + 1) * n]) for k in range(4))  # (G, out, r) (G, out, s) (G, s, r) (G,)
        sig = torch.sigmoid(g)  # (G,)
        gate = sig[:, None, None]  # (G, 1, 1)
        rest = 1 - gate
        pq = torch.bmm(p, q)  # (G, out, r); under autocast in its dtype, as P_t @ Q_t is
        inner = rest * pq if pq.dtype == rest.dtype else (rest * pq.to(rest.dtype)).to(pq.dtype)
        ctx.owner, ctx.n, ctx.sig, ctx.gate, ctx.rest, ctx.b0, ctx.p, ctx.q, ctx.pq = \
            owner, n, sig, gate, rest, b0, p, q, pq
        return gate * b0 + inner

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        ctx.owner.clear()  # a backward went through: the next forward builds afresh
        n, need = ctx.n, ctx.needs_input_grad[2:]
        wants = [any(need[k * n:(k + 1) * n]) for k in range(4)]
        grads: list[Tensor | None] = [None] * (4 * n)

        def put(k: int, stacked: Tensor) -> None:
            for i, value in enumerate(stacked.unbind(0)):
                if need[k * n + i]:
                    grads[k * n + i] = value

        if wants[0]:
            put(0, grad * ctx.gate)
        if wants[1] or wants[2]:
            grad_pq = (grad * ctx.rest).to(ctx.pq.dtype)
            if wants[1]:
                put(1, torch.bmm(grad_pq, ctx.q.transpose(1, 2).to(grad_pq.dtype)).to(ctx.p.dtype))
            if wants[2]:
                put(2, torch.bmm(ctx.p.transpose(1, 2).to(grad_pq.dtype), grad_pq).to(ctx.q.dtype))
        if wants[3]:  # d sig = sum(grad * B0) - sum(grad * PQ), as autograd adds the two products' parts
            d_sig = -(grad * ctx.pq).sum((1, 2)) + (grad * ctx.b0).sum((1, 2))
            put(3, torch.ops.aten.sigmoid_backward(d_sig, ctx.sig))
        return (None, None, *grads)
