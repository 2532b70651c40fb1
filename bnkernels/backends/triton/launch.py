"""Pre-bound kernel launches: a plan's launches resolved once, then launched without Triton's
per-call binder.

A :class:`Launch` is one kernel launch of a plan with everything that depends only on the
plan's signature fixed when the plan is made: the kernel, its grid, ``num_warps``, the
constexprs and the per-plan integer arguments (sizes, split counts). A call passes only the
per-call arguments, by name (``launch.run(x_ptr=x, y_ptr=y, eps=eps)``).

``kernel[grid](...)`` (Triton's ``JITFunction.run``) costs ~10-20 us of host time per launch
on a GPU: it binds every argument, computes the specialization key, looks up the kernel cache,
reads the knobs and builds launch metadata. None of that changes between two calls of one
plan, so after the first call a launch goes straight to the compiled kernel's launcher, with
the arguments in the order Triton itself passes them (Triton >= 3.3: every parameter, the
constexprs included, as ``JITFunction.run`` does). The direct call is generated once per
launch as a function with keyword-only parameters (named arguments at the cost of positional
ones).

The direct call passes every pointer as the integer address (Triton's launcher then makes
no ``cuPointerGetAttribute`` call per pointer) and, when the kernel needs no scratch memory,
calls the C entry behind Triton's ``CudaLauncher`` itself, with the arguments
``CudaLauncher.__call__`` would pass it.

It is taken only while it is exactly what the JIT would launch:

* the plan's device is the current one (else the call makes it current for the launch, as
  torch's own ops do, and the JIT path does the same: a function handle, a stream and the
  tensors of one device);
* every per-call pointer the kernel was specialized as 16-byte aligned is 16-byte aligned at
  this call (a view at an odd offset takes the JIT path, which compiles its own variant):
  outputs the plan allocates are checked as well, at the cost of one ``|`` each;
* the per-call integers keep their Triton type (i32 or i64 by value);
* no launch hook is installed (a profiler such as proton: the JIT path calls the hooks).

Otherwise, and on Triton < 3.3, on the interpreter, or with ``BNKERNELS_TRITON_LAUNCH=jit``
(read once, when this module is imported), a call goes through ``kernel[grid](...)``. The
bound launch holds the ``CompiledKernel`` it launches, so its function handle stays loaded
whatever Triton does with its caches. ``docs/launch-path.md`` lists these guarantees and the
checks that hold them.
"""

from __future__ import annotations

import itertools
import os
import weakref
from types import SimpleNamespace

import torch
import triton

from ..plan import _raw_stream_getter
from .common import INTERPRET

# Triton >= 3.3 launches with every bound argument (constexprs included) and keeps its launch
# hooks in triton.knobs; earlier versions differ, and take the JIT path.
_KNOBS = getattr(triton, "knobs", None)
_MODE = os.environ.get("BNKERNELS_TRITON_LAUNCH", "direct")
if _MODE not in ("direct", "jit"):
    raise ValueError(f"BNKERNELS_TRITON_LAUNCH must be 'direct' or 'jit', got {_MODE!r}")
DIRECT = _MODE == "direct" and _KNOBS is not None and not INTERPRET

_I32 = (-(2**31), 2**31 - 1)
_I64 = (-(2**63), 2**63 - 1)

# Every launch made, so that stub_launches() can reach them (weak: plans are evictable).
_ALL: weakref.WeakSet = weakref.WeakSet()
_stubbed = False
_jit_only = False
_emulated = False

# The current CUDA device (read per call; ~40 ns) and a guard that makes another one current
# for a block. Module attributes so that a fake driver (tests/triton_launch_check.py) can
# stand in for them.
_get_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_device_guard = torch.cuda.device


def _index_of(device: torch.device | None) -> int | None:
    """The CUDA device index a plan's launches run on (None: not a CUDA device)."""
    if device is None or device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _hooks_installed() -> bool:
    """A launch hook is installed (a profiler): launches go through the JIT, which calls it."""
    rt = _KNOBS.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _c_entry(launcher):
    """``(entry, fixed)``: the C function behind Triton's ``CudaLauncher`` and the arguments
    it passes that do not change between calls, when calling it directly is what
    ``CudaLauncher.__call__`` would do (no global or profile scratch to allocate, no
    instrumentation); else None (the launcher is called as the JIT calls it)."""
    try:
        if (launcher.global_scratch_size or launcher.profile_scratch_size
                or getattr(launcher, "gsan_enabled", False)):
            return None
        return launcher.launch, (launcher.launch_cooperative_grid, launcher.launch_pdl,
                                 launcher.arg_annotations, launcher.kernel_signature)
    except AttributeError:  # another Triton's launcher: call it as the JIT does
        return None


class Launch:
    """One kernel launch of a plan (see the module docstring).

    ``grid``, ``num_warps``, ``consts`` (constexprs, and the per-plan values of non-constexpr
    parameters, a tensor the plan owns included) are fixed; ``call`` names the per-call
    parameters, which ``run`` takes as keyword-only arguments. ``device``: the plan's device;
    its launches run there whichever device is current (as torch's own ops do).
    """

    def __init__(self, kernel, grid, num_warps: int, consts: dict, call: tuple[str, ...],
                 device: torch.device | None = None):
        self.kernel = kernel
        names = kernel.arg_names
        missing = [n for n in names if n not in consts and n not in call]
        extra = [n for n in (*consts, *call) if n not in names]
        if missing or extra:
            raise TypeError(f"Launch of {kernel.__name__}: parameters without a value "
                            f"{missing}, unknown names {extra}")
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.num_warps = int(num_warps)
        self.consts = dict(consts)
        self.call = tuple(call)
        self.device_index = _index_of(device)
        self.compiled = None  # the CompiledKernel the direct path launches (kept alive)
        self.direct = False  # the direct path is bound
        self.run = self._first
        if _stubbed:
            self.stub(True)
        _ALL.add(self)

    def __repr__(self) -> str:
        return (f"<Launch {self.kernel.__name__} grid={getattr(self, 'grid', None)} "
                f"{'direct' if getattr(self, 'direct', False) else 'jit'}>")

    # -- the JIT path

    def jit(self, **args):
        """Launch through Triton's JIT (``kernel[grid](...)``) on the plan's device; returns
        what it returns."""
        index = self.device_index
        if index is not None and _get_device() != index:
            with _device_guard(index):
                return self.kernel[self.grid](**args, **self.consts, num_warps=self.num_warps)
        return self.kernel[self.grid](**args, **self.consts, num_warps=self.num_warps)

    def _first(self, **args):
        if _emulated:
            self._bind(_EmulatedKernel(), args, emulated=True)
            return self.run(**args)
        compiled = self.jit(**args)
        if DIRECT and compiled is not None and not (_stubbed or _jit_only):
            self._bind(compiled, args)
        return compiled

    def _other(self, **args):
        """A call the direct path does not take as it is: on another current device, the same
        launch with the plan's device made current; else the JIT."""
        index = self.device_index
        if index is not None and _get_device() != index:
            with _device_guard(index):
                return self.run(**args)
        return self.jit(**args)

    # -- the direct path

    def _bind(self, compiled, args: dict, emulated: bool = False) -> None:
        """Generate ``run``: the compiled kernel's launcher called as the JIT calls it, behind
        the guards that keep it the JIT's choice (see the module docstring). ``emulated``:
        see :class:`emulate_launches`."""
        try:
            launcher = compiled.run
            function, packed = compiled.function, compiled.packed_metadata
        except Exception:  # pragma: no cover - a Triton whose CompiledKernel differs
            return
        index = self.device_index
        if emulated:
            index = 0  # the current device, and its stream, from C builtins of the same cost
            get_device, stream = int, abs
        else:
            if index is None:
                index = _get_device()
                self.device_index = index
            get_device, stream = _get_device, _raw_stream_getter()
        entry = _c_entry(launcher)
        env = {"_launch": launcher, "_function": function, "_packed": packed,
               "_stream": stream, "_index": index, "_other": self._other,
               "_hooks": _hooks_installed, "_dev": get_device}
        # (the interpreter's kernels, under emulate_launches, have no parameter objects: no
        # do_not_specialize there)
        params_by_name = {p.name: p for p in getattr(self.kernel, "params", ())}
        guards, addresses, aligned = [], [], []
        for name in self.call:
            value = args[name]
            param = params_by_name.get(name)
            if isinstance(value, torch.Tensor):
                addresses.append(f"_p_{name} = {name}.data_ptr()")
                if (value.data_ptr() % 16 == 0
                        and not getattr(param, "do_not_specialize_on_alignment", False)):
                    aligned.append(f"_p_{name}")  # specialized as 16-aligned: checked per call
            elif isinstance(value, bool) or value is None:
                guards.append(f"{name} is not _v_{name}")
                env[f"_v_{name}"] = value
            elif isinstance(value, int):
                lo, hi = _I32 if _I32[0] <= value <= _I32[1] else _I64
                guards.append(f"not {lo} <= {name} <= {hi}")  # Triton's i32 / i64
                if not getattr(param, "do_not_specialize", False):  # == 1, divisible by 16
                    guards.append(f"({name} == 1) is not {value == 1}")
                    guards.append(f"({name} % 16 == 0) is not {value % 16 == 0}")
            elif not isinstance(value, float):
                return  # an argument kind the direct path does not know: stay on the JIT
        # The arguments in the kernel's order: the per-call ones as built per call, each run
        # of fixed ones (constexprs, per-plan sizes) one prebuilt tuple, concatenated.
        segments: list = []
        for name in self.kernel.arg_names:
            per_call = name in self.call
            if not segments or segments[-1][0] != per_call:
                segments.append((per_call, []))
            if per_call:
                segments[-1][1].append(f"_p_{name}" if isinstance(args[name], torch.Tensor)
                                       else name)
            else:  # a plan-owned tensor (noisy BatchNorm's noise scalars) by its address
                value = self.consts[name]
                segments[-1][1].append(value.data_ptr() if isinstance(value, torch.Tensor)
                                       else value)
        parts = []
        for i, (per_call, items) in enumerate(segments):
            if per_call:
                parts.append(f"({', '.join(items)},)")
            else:
                env[f"_k{i}"] = tuple(items)
                parts.append(f"_k{i}")
        all_args = " + ".join(parts) if parts else "()"
        g0, g1, g2 = self.grid
        signature = ", ".join(self.call)
        keywords = ", ".join(f"{n}={n}" for n in self.call)
        # Launch hooks: the two HookChains bound here, still in place and with no call in
        # them (a plain read each); anything else (a hook added, a knob replaced) goes to the
        # JIT, which calls the hooks.
        rt = _KNOBS.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if isinstance(getattr(enter, "calls", None), list) and isinstance(
                getattr(leave, "calls", None), list):
            env.update(_rt=rt, _enter=enter, _leave=leave, _enter_calls=enter.calls,
                       _leave_calls=leave.calls)
            hooks = ("_enter_calls or _leave_calls or _rt.launch_enter_hook is not _enter or "
                     "_rt.launch_exit_hook is not _leave")
        else:  # pragma: no cover - a Triton whose hooks are not HookChains
            hooks = "_hooks()"
        guard = " or ".join([hooks, f"_dev() != {index}", *guards])
        lines = [f"def run(*, {signature}):",
                 f"    if {guard}:",
                 f"        return _other({keywords})"]
        # The addresses, passed as ints (Triton then asks the driver nothing per pointer). A
        # pointer bound as a tensor may come as None (an optional tensor absent this call):
        # that is another compiled variant, the JIT's (a try costs nothing when nothing raises).
        if addresses:
            lines += ["    try:", *(f"        {a}" for a in addresses),
                      "    except AttributeError:",
                      f"        return _other({keywords})"]
        if aligned:
            lines += [f"    if ({' | '.join(aligned)}) & 15:",
                      f"        return _other({keywords})"]
        if entry is not None:
            env["_entry"] = entry[0]
            coop, pdl, annotations, ksig = entry[1]
            env.update(_coop=coop, _pdl=pdl, _ann=annotations, _ksig=ksig)
            lines.append(f"    _entry({g0}, {g1}, {g2}, _stream({index}), _function, _coop, _pdl, "
                         f"_packed, None, None, None, None, None, _ann, _ksig, {all_args})")
        else:
            lines.append(f"    _launch({g0}, {g1}, {g2}, _stream({index}), _function, _packed, "
                         f"None, None, None, *({all_args}))")
        src = "\n".join(lines) + "\n"
        self.source = src  # the generated direct call (for reading)
        exec(compile(src, f"<bnkernels launch {self.kernel.__name__}>", "exec"), env)
        # The direct path holds the CompiledKernel itself, not only its function handle:
        # Triton unloads the module when that object goes (its __del__), e.g. when its
        # caches are cleared, and the handle would dangle.
        self.compiled = compiled
        self.run = env["run"]
        self.direct = not emulated

    # -- stubs (host-path measurements)

    def stub(self, on: bool) -> None:
        """Replace the launch by a no-op with the same signature (``on``), or restore it (the
        next call binds again)."""
        if on:
            src = f"def run(*, {', '.join(self.call)}):\n    return None\n"
            env: dict = {}
            exec(compile(src, "<bnkernels stub launch>", "exec"), env)
            self.run = env["run"]
        else:
            self.run = self._first
            self.direct = False
            self.compiled = None


class _EmulatedKernel:
    """Stands for a CompiledKernel under :class:`emulate_launches`: a launcher whose C entry
    is ``itertools.chain`` (a C callable that takes any positional arguments and does
    nothing with them)."""

    function = 0
    packed_metadata = ()
    run = SimpleNamespace(launch=itertools.chain, global_scratch_size=0, profile_scratch_size=0,
                          launch_cooperative_grid=False, launch_pdl=False, arg_annotations=(),
                          kernel_signature=b"")


class _LaunchMode:
    """Context manager: this module's flag ``_flag`` set inside it; every launch (made before
    or inside it) binds again on its next call, on entry and on exit."""

    _flag = ""

    def __enter__(self):
        globals()[self._flag] = True
        self._unbind()
        return self

    def __exit__(self, *exc):
        globals()[self._flag] = False
        self._unbind()
        return False

    @staticmethod
    def _unbind() -> None:
        for launch in list(_ALL):
            launch.run, launch.direct, launch.compiled = launch._first, False, None


class emulate_launches(_LaunchMode):
    """Context manager: every Triton launch takes the direct path, guards and all, with the
    launcher's C entry a no-op and the current-device and stream calls C builtins of like
    cost: the Python a warm direct launch costs, measurable without a GPU (``bnkernels bench
    --device cpu``'s stack rows). Results are garbage inside it."""

    _flag = "_emulated"


class jit_only(_LaunchMode):
    """Context manager: every Triton launch goes through the JIT (``kernel[grid](...)``), as
    with ``BNKERNELS_TRITON_LAUNCH=jit``; after it, launches bind the direct path again on
    their next call. For measuring what the direct path saves (``bnkernels bench``'s
    ``bnkernels-triton-jit`` overhead rows)."""

    _flag = "_jit_only"


class stub_launches:
    """Context manager: every Triton launch (made before or inside it) is a no-op with the
    same signature, so that what is left is the host path above the launches (``bnkernels
    bench`` overhead rows, tests). Results are garbage inside it."""

    def __enter__(self):
        global _stubbed
        _stubbed = True
        for launch in list(_ALL):
            launch.stub(True)
        return self

    def __exit__(self, *exc):
        global _stubbed
        _stubbed = False
        for launch in list(_ALL):
            launch.stub(False)
        return False


__all__ = ["DIRECT", "Launch", "emulate_launches", "jit_only", "stub_launches"]
