"""OpLog: the aten ops a piece of code dispatches, in order (a TorchDispatchMode), shared by
host_ops.py (every op: each costs host time) and step_profile.py (the ops that launch GPU
work, without views and allocations)."""

from __future__ import annotations

from typing import Callable, Optional

from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch no GPU work (metadata, allocation, views)
NO_LAUNCH = ("empty", "view", "detach", "unsqueeze", "reshape", "select", "alias",
             "as_strided", "expand", "slice")


def launches(name: str) -> bool:
    """Whether the op ``name`` (as str(func) spells it) launches GPU work."""
    return not any(k in name for k in NO_LAUNCH)


class OpLog(TorchDispatchMode):
    """Records ``str(func)`` of every aten op dispatched while active, or of those ``keep``
    accepts, in ``self.ops``."""

    def __init__(self, keep: Optional[Callable[[str], bool]] = None):
        super().__init__()
        self.keep = keep
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.keep is None or self.keep(name):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
