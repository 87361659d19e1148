"""Counts the calls that would make the host wait for a GPU (tests/test_no_sync.py).

On a GPU a host sync (``.item()``, ``.tolist()``, ``.cpu()``, a tensor built from Python
numbers, a blocking copy) leaves the GPU idle until the host catches up. On CPU nothing
idles, so the tests count those calls through torch's own hooks: a function mode and a
dispatch mode see every tensor call, accelerate's and torch's included.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}
FROM_PYTHON = {torch.tensor, torch.as_tensor}  # host data: a blocking copy to a device
# Ops whose output size depends on the data: the host waits to learn it (boolean-mask
# indexing goes through aten.index with a bool index, counted below).
DATA_SIZED = {"nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}


class SyncCounter:
    """Counts the calls that force a host sync while it is entered; ``where`` lists them."""

    def __init__(self):
        self.where: list[str] = []
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in SYNCING_METHODS or (func in FROM_PYTHON and "device" in kwargs):
                    counter.hit(getattr(func, "__name__", str(func)))
                return func(*args, **kwargs)

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.aten._local_scalar_dense.default:  # item, float, bool, if
                    counter.hit("a tensor read as a Python number")
                elif func.overloadpacket.__name__ in DATA_SIZED or (
                    func is torch.ops.aten.index.Tensor
                    and any(i is not None and i.dtype == torch.bool for i in args[1])
                ):
                    counter.hit(f"{func.overloadpacket.__name__}, sized by the data")
                elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                    src = args[1] if func is torch.ops.aten.copy_.default else args[0]
                    dst = kwargs.get("device") or getattr(args[0], "device", None)
                    dst = torch.device(dst) if dst is not None else src.device
                    moves = dst != src.device and {dst.type, src.device.type} != {"cpu"}
                    if moves and not kwargs.get("non_blocking"):  # ("cpu" and "cpu:0" alike)
                        counter.hit(f"a blocking copy between devices ({src.device} to {dst})")
                return func(*args, **kwargs)

        self.modes = (Functions(), Dispatch())

    def hit(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if "sync_counter" not in f.filename]
        self.where.append(f"{what} at " + " <- ".join(
            f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames[-4:])
        ))  # fmt: skip

    def __enter__(self):
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def counting_steps(trainer_class, found: list[str], skip_first: int = 2):
    """A replacement for ``trainer_class.train_step`` counting syncs inside each call after
    the first ``skip_first`` (lazy set-up: Adam's state, the first step's empty flags) into
    ``found``; ``.calls`` on it counts every call."""
    real, calls = trainer_class.train_step, []

    def counted(self, data, last):
        calls.append(1)
        if len(calls) <= skip_first:
            return real(self, data, last)
        with SyncCounter() as counter:
            boundary = real(self, data, last)
        found.extend(counter.where)
        return boundary

    counted.calls = calls
    return counted
