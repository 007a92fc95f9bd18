"""A test guard for device-correct code: every tensor factory call made by library code names its device.

    with ImplicitDeviceGuard() as guard:
        run_the_path()
    assert not guard.sites, guard.report()

A factory without `device=` (torch.zeros(n), torch.tensor([...]), torch.arange(k), ...) allocates on the
default device, the CPU: on a GPU run its result then meets CUDA tensors and the step raises (or, worse,
silently computes on the host). CPU tests cannot see that by value, so this TorchFunctionMode sees every
call instead and records the library line that made it: the first frame outside torch itself, counted when
it lies under `roots` (megatron_rl/ by default). `*_like` and `Tensor.new_*` inherit their input's device
and are fine; `torch.as_tensor` / `torch.tensor` of a tensor keep its device only for as_tensor, so only
as_tensor of a tensor is exempt. The autograd engine does NOT carry a torch-function mode into a custom
Function's backward, so while the guard is active it re-enters itself around every Python backward
(BackwardCFunction.apply, which the engine calls by name): backward passes are checked too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

import megatron_rl

LIBRARY = Path(megatron_rl.__file__).resolve().parent
_TORCH = Path(torch.__file__).resolve().parent

FACTORIES = frozenset({
    torch.zeros, torch.ones, torch.full, torch.empty, torch.empty_strided, torch.tensor, torch.as_tensor,
    torch.arange, torch.range, torch.linspace, torch.logspace, torch.eye, torch.scalar_tensor,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.tril_indices, torch.triu_indices,
})


class ImplicitDeviceGuard(TorchFunctionMode):
    """Records `path:line` of every factory call without device= made from code under `roots`."""

    def __init__(self, roots=(LIBRARY,)):
        super().__init__()
        self.roots = tuple(Path(r).resolve() for r in roots)
        self.sites: dict[str, str] = {}     # "path:line" -> the factory's name
        self.calls = 0                      # factory calls seen from `roots` (the guard is not vacuous)
        self.backward_calls = 0             # custom-Function backwards run under the guard

    def __enter__(self):
        guard, original = self, BackwardCFunction.apply

        def apply(ctx, *args):
            guard.backward_calls += 1
            with _Reentry(guard):
                return original(ctx, *args)

        self._original_apply = original
        BackwardCFunction.apply = apply
        return super().__enter__()

    def __exit__(self, *exc):
        BackwardCFunction.apply = self._original_apply
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            exempt = func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
            site = self._caller()
            if site is not None:
                self.calls += 1
                if not exempt:
                    self.sites.setdefault(site, func.__name__)
        elif func in FACTORIES and self._caller() is not None:
            self.calls += 1
        return func(*args, **kwargs)

    def _caller(self):
        """`relpath:line` of the first frame outside torch and this file, if it lies under a root."""
        f = sys._getframe(2)
        here = Path(__file__).resolve()
        while f is not None:
            p = Path(f.f_code.co_filename).resolve()
            if p != here and _TORCH not in p.parents:
                for root in self.roots:
                    if root in p.parents:
                        return f"{p.relative_to(root.parent)}:{f.f_lineno}"
                return None
            f = f.f_back
        return None

    def report(self) -> str:
        lines = [f"  {site}  torch.{name}(...) without device=" for site, name in sorted(self.sites.items())]
        return "tensor factories without device= (they allocate on the CPU under a GPU run):\n" + "\n".join(lines)


class _Reentry(TorchFunctionMode):
    """The guard's check inside a backward (the same records; a mode instance is entered once)."""

    def __init__(self, guard: ImplicitDeviceGuard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return ImplicitDeviceGuard.__torch_function__(self.guard, func, types, args, kwargs)
