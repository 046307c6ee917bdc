"""Count the kernel-launching operator calls of one training step (``continual-lora bench --count-ops``).

At ViT-B/16 sizes a GPU training step is bound by the host (Python, the dispatcher, kernel
launches), so the number of operator calls that launch a kernel is a deterministic proxy for a
method's per-step overhead that any CPU can measure. :class:`OpCounter` is a
``TorchDispatchMode``: it sees every operator after autograd (forward, and backward when the
backward runs inside it), i.e. every call that reaches a device kernel. What it counts:

* ``kernel_ops``: every dispatched operator except those that launch no kernel:
  - view and alias operators (the operator schema returns an alias of an input: ``view``,
    ``_unsafe_view``, ``t``, ``transpose``, ``expand``, ``select``, ``slice``, ``unsqueeze``,
    ``squeeze``, ``permute``, ``as_strided``, ``unbind``, ``split``, ``detach``, ``alias``, ...);
  - allocation and metadata operators in :data:`NO_KERNEL` (``empty*``, ``new_empty*``,
    ``lift_fresh``, ``resize_``, ``set_``, ``is_same_size``, ``_has_compatible_shallow_copy_type``,
    ``_unsafe_view``: a view whose schema does not say so).
  An operator of this package's own library (``continual_lora::*``, the fused routing) counts
  as one: on CUDA it is one Triton kernel launch.
* ``aten_ops``: the same, but a ``continual_lora::*`` operator counts as the ATen operators its
  implementation on this device runs instead (on the CPU: the exact ATen fallback; 8 for the
  routing).

:func:`count_step_ops` counts one forward (the loss and the method's loss terms) and its backward;
the optimiser step is not included. :func:`count_ops` does that for a method and the LoRA of the same
rank, alpha and dropout on one of the speed bench's workloads (``continual-lora bench --count-ops``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..adapters import branches
from .speed import _check, _sides, autocast, build_workload

OWN_LIBRARY = "continual_lora"
_BACKENDS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU) | torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
NO_KERNEL = frozenset({
    "aten::empty.memory_format", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::lift_fresh", "aten::resize_", "aten::set_.source_Storage",
    "aten::set_.source_Storage_storage_offset", "aten::set_.source_Tensor", "aten::is_same_size",
    "aten::_has_compatible_shallow_copy_type", "aten::_unsafe_view",
})


def _name(func: torch._ops.OpOverload) -> str:
    return f"{func._schema.name}" + (f".{func._overloadname}" if func._overloadname != "default" else "")


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """False for view / alias operators and for :data:`NO_KERNEL`."""
    return not (getattr(func, "is_view", False) or _name(func) in NO_KERNEL)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...``; then ``c.kernel_ops``, ``c.aten_ops``, ``c.by_op``."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()  # kernel-launching operators by name (own library: one each)
        self.excluded: Counter[str] = Counter()  # views, aliases and NO_KERNEL operators seen
        self.fallback: Counter[str] = Counter()  # ATen operators run inside this package's own operators

    @property
    def kernel_ops(self) -> int:
        return sum(self.by_op.values())

    @property
    def aten_ops(self) -> int:
        own = sum(n for name, n in self.by_op.items() if name.startswith(OWN_LIBRARY + "::"))
        return self.kernel_ops - own + sum(self.fallback.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if not launches_kernel(func):
            self.excluded[name] += 1
            return func(*args, **kwargs)
        self.by_op[name] += 1
        if func.namespace == OWN_LIBRARY:  # run its kernel below this mode, counting the ATen operators inside
            backend = torch._C._dispatch_keys(args[0]) & _BACKENDS  # e.g. CPU: skip this mode, keep the device
            with _Inner(self.fallback):
                return func.redispatch(backend, *args, **kwargs)
        return func(*args, **kwargs)


class _Inner(TorchDispatchMode):
    """Counts the kernel-launching ATen operators inside one of this package's own operators."""

    def __init__(self, into: Counter[str]) -> None:
        super().__init__()
        self.into = into

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if launches_kernel(func):
            self.into[_name(func)] += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(loss_fn: Callable[[], torch.Tensor]) -> OpCounter:
    """Operators of ``loss_fn()`` (forward) and ``.backward()`` of its result."""
    counter = OpCounter()
    with counter:
        loss_fn().backward()
    return counter


def count_ops(method: str, size: str = "vitb16", batch_size: int = 2, device: str = "cpu",
              precision: str = "fp32", rank: int | None = None) -> dict[str, Any]:
    """Kernel-launching operators of one forward + backward step of ``speed.py``'s workload ``size``: the
    method against our LoRA of the same rank, alpha and dropout ("lora": ours against ours)."""
    _check(method, precision)
    work = build_workload(size, batch_size, device, precision)
    sides = _sides(method, work, rank, peft_reference=False)
    counters: dict[str, OpCounter] = {}
    for name, model, terms in ((sides.names[0], sides.subject, sides.loss_terms()),
                               (sides.names[1], sides.reference, dict)):
        counter = OpCounter()
        with counter:
            with autocast(device, precision):
                loss = work.loss(model) + sum(terms().values())
            loss.backward()
        counters[name] = counter
    subject, reference = (counters[n] for n in sides.names)
    weights = len(branches(sides.subject))
    return {
        "method": method,
        "reference": "lora",
        "size": size,
        "precision": precision,
        "device": device,
        "torch": torch.__version__,
        "rank": sides.rank,
        "alpha": sides.alpha,
        "dropout": sides.dropout,
        "adapted_weights": weights,
        "kernel_ops": {n: c.kernel_ops for n, c in counters.items()},
        "kernel_ops_ratio": subject.kernel_ops / reference.kernel_ops,
        "extra_kernel_ops_per_weight": (subject.kernel_ops - reference.kernel_ops) / weights,
        "aten_ops": {n: c.aten_ops for n, c in counters.items()},  # own fused operators replaced by their ATen ops
        "aten_ops_ratio": subject.aten_ops / reference.aten_ops,
        "extra_by_op": {k: v for k, v in sorted((subject.by_op - reference.by_op).items())},
        "own_ops": {k: v for k, v in subject.by_op.items() if k.startswith("continual_lora::")},
    }


def format_op_report(result: dict[str, Any]) -> str:
    subject, ref = list(result["kernel_ops"])
    return "\n".join([
        f"operator count: {result['method']} vs {result['reference']} on {result['size']} "
        f"(rank {result['rank']}, alpha {result['alpha']:g}, dropout {result['dropout']:g}), {result['precision']}, "
        f"{result['device']}, one forward + backward, {result['adapted_weights']} adapted weights",
        f"{'kernel_ops':<12}{subject} {result['kernel_ops'][subject]:,} / {ref} {result['kernel_ops'][ref]:,} "
        f"= {result['kernel_ops_ratio']:.3f}  ({result['extra_kernel_ops_per_weight']:+.2f} per adapted weight)",
        f"{'aten_ops':<12}{subject} {result['aten_ops'][subject]:,} / {ref} {result['aten_ops'][ref]:,} "
        f"= {result['aten_ops_ratio']:.3f}  (fused operators counted as the ATen operators they run here)",
    ])
