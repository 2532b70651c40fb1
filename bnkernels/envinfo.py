"""``bnkernels env``: what bnkernels sees on this machine, for bug reports and set-up checks.

Versions (bnkernels, Python, torch, CUDA, cuDNN, Triton, numpy), the GPUs, every backend with
the reasons it cannot run here (:func:`bnkernels.available_backends`), the CUDA extension
(sources, build cache, whether it can build), the optional modules and the extra that installs
each, and the environment variables bnkernels reads, with their values in effect.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys

# Every environment variable bnkernels reads (docs/environment.md describes each).
ENV_VARS = (
    "BNKERNELS_BACKEND",
    "BNKERNELS_TRITON_LAUNCH",
    "BNKERNELS_SKIP_CUDA_BUILD",
    "BNKERNELS_BUILD_CUDA",
    "BNKERNELS_CUDA_PERSISTENT",
    "BNKERNELS_SASS_CACHE",
    "TRITON_INTERPRET",
    "CUDA_HOME",
    "TORCH_CUDA_ARCH_LIST",
    "NVCC_THREADS",
    "MAX_JOBS",
    "XDG_CACHE_HOME",
)

# Optional modules: (import name, distribution name, the extra that installs it, what for).
OPTIONAL = (
    ("ninja", "ninja", "cuda", "building the CUDA backend on first use"),
    ("matplotlib", "matplotlib", "experiments", "the reproduction's figures"),
    ("tqdm", "tqdm", "experiments", "progress bars of the experiments"),
    ("sklearn", "scikit-learn", "experiments", "the bundled digits data set"),
    ("pytest", "pytest", "dev", "the test suite"),
    ("hypothesis", "hypothesis", "dev", "the property tests"),
    ("pybind11", "pybind11", "dev", "the CPU emulation of the CUDA kernels in the tests"),
    ("torchvision", "torchvision", None, "examples/resnet_drop_in.py (optional)"),
)

# The extra to name when a command misses an optional module (see bnkernels.cli.main).
EXTRA_OF = {name: extra for name, _, extra, _ in OPTIONAL if extra is not None}


def install_hint(module: str) -> str | None:
    """``pip install 'bnkernels[extra]'`` for an optional module bnkernels uses, else None."""
    extra = EXTRA_OF.get(module.split(".")[0])
    return None if extra is None else f"pip install 'bnkernels[{extra}]'"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """The report as a dict (``bnkernels env --json`` prints it)."""
    import numpy
    import torch

    import bnkernels
    from bnkernels.backends import available_backends, get_backend

    info: dict = {
        "bnkernels": {"version": bnkernels.__version__,
                      "location": os.path.dirname(bnkernels.__file__)},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": numpy.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # not installed (e.g. not Linux) or broken
        info["triton"] = None
        info["triton_error"] = f"{type(e).__name__}: {e}"
    try:
        from bnkernels.backends.triton import launch

        info["triton_launch"] = ("direct (pre-bound launches)" if launch.DIRECT else
                                 "jit (Triton's own launch: triton < 3.3, the interpreter, or "
                                 "BNKERNELS_TRITON_LAUNCH=jit)")
    except Exception as e:
        info["triton_launch"] = f"unavailable ({type(e).__name__}: {e})"

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    info["gpus"] = gpus

    info["backend"] = get_backend()
    info["backends"] = available_backends()

    from bnkernels.backends.cuda import build_config, loader

    cuda: dict = {"sources": str(build_config.CSRC), "sources_found": build_config.have_sources(),
                  "built": loader.is_built(), "build_reasons": loader.build_reasons()}
    try:
        cuda["cache"] = str(loader.library_path().parent)
    except Exception as e:  # e.g. an unparsable TORCH_CUDA_ARCH_LIST
        cuda["cache"] = f"unknown ({type(e).__name__}: {e})"
    info["cuda_extension"] = cuda

    info["optional"] = {
        name: {"version": _version(dist) if importlib.util.find_spec(name) else None,
               "installed": importlib.util.find_spec(name) is not None,
               "extra": extra, "for": what}
        for name, dist, extra, what in OPTIONAL}
    info["environment"] = {k: os.environ.get(k) for k in ENV_VARS}
    return info


def format_report(info: dict) -> str:
    """The report as text."""
    lines = [f"bnkernels {info['bnkernels']['version']} ({info['bnkernels']['location']})",
             f"python    {info['python']} ({info['platform']})",
             f"torch     {info['torch']} (CUDA {info['torch_cuda'] or 'none: a CPU build'}, "
             f"cuDNN {info['cudnn'] or 'none'})",
             f"triton    {info['triton'] or 'not importable: ' + info.get('triton_error', '')}"
             + (f" (launch path: {info['triton_launch']})" if info["triton"] else ""),
             f"numpy     {info['numpy']}", ""]
    if info["gpus"]:
        lines.append("GPUs:")
        lines += [f"  cuda:{g['index']}  {g['name']} (sm_{g['capability'].replace('.', '')}, "
                  f"{g['memory_gib']} GiB)" for g in info["gpus"]]
    else:
        lines.append("GPUs: none visible to torch")
    lines += ["", f"backends (selected: {info['backend']}):"]
    for name, reasons in info["backends"].items():
        lines.append(f"  {name:<10} {'available' if not reasons else 'unavailable'}")
        lines += [f"             - {r}" for r in reasons]
    c = info["cuda_extension"]
    lines += ["", "CUDA extension:",
              f"  sources   {c['sources']} ({'found' if c['sources_found'] else 'missing'})",
              f"  cache     {c['cache']}",
              f"  built     {'yes' if c['built'] else 'no'}",
              "  can build " + ("yes (on first use, or: python -m bnkernels.backends.cuda build)"
                                if not c["build_reasons"] else "no")]
    lines += [f"            - {r}" for r in c["build_reasons"]]
    lines += ["", "optional modules:"]
    for name, o in info["optional"].items():
        state = o["version"] or ("installed" if o["installed"] else "missing")
        hint = (f"  (pip install 'bnkernels[{o['extra']}]')"
                if not o["installed"] and o["extra"] else "")
        lines.append(f"  {name:<11} {state:<12} {o['for']}{hint}")
    lines += ["", "environment variables (docs/environment.md):"]
    for k, v in info["environment"].items():
        lines.append(f"  {k:<26} {v if v is not None else '(unset)'}")
    return "\n".join(lines)
