"""Peak memory of the tensors a call creates: what the benchmark reports for each probe against a step.

Counted, not sampled from an allocator: every operation's new outputs are added when they appear and
subtracted once nothing holds their storage any more, so the number is the same on any machine and device
(a CPU has no allocator statistics to read) and a test can check it. It counts the bytes of dense tensor
storages made inside the call (activations kept for backward, gradients, copies of weights), including
those still alive at its end (the ``.grad`` a backward leaves), but not what existed before (parameters,
the batch), nor a kernel's internal scratch space or an allocator's rounding and cache.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as memory: ...``, then ``memory.peak`` (bytes) and ``memory.current`` (bytes
    made inside and still alive). The peak is taken after each operation's outputs are made, with the
    storages freed before it left out."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage's address -> (reference, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._forget_freed()
        out = func(*args, **(kwargs or {}))
        # An output that aliases an input (a view, an in-place or out= op) is a storage seen before or
        # one made outside: only ops whose outputs are fresh allocate.
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    storage = t.untyped_storage()
                    key = storage._cdata
                    if key not in self._live:
                        self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                        self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out

    def _forget_freed(self) -> None:
        freed = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in freed:
            self.current -= self._live.pop(key)[1]

    def __exit__(self, *exc):
        self._forget_freed()  # what the call's last operations let go of
        return super().__exit__(*exc)


def peak_tensor_bytes(call: Callable[[], object]) -> int:
    """The peak bytes of tensors made by ``call()`` and alive at once (see :class:`PeakTensorMemory`)."""
    with PeakTensorMemory() as memory:
        call()
    return memory.peak
