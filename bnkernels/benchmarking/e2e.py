"""The ``e2e`` section: a whole training step (forward, cross-entropy loss, backward, SGD step)
of VGG-16 on CIFAR-10 (32x32, batch 128, a BatchNorm after each conv) and ResNet-50 on ImageNet
(224x224, batch 64), in fp32 and bf16 autocast, NCHW and channels_last, with torch's BatchNorm
and with bnkernels' (the default backend, "auto", and each available backend by name).

Each provider trains its own copy of one freshly initialized model (BatchNorm weights and biases
drawn at random, not 1 and 0, so that they matter; bnkernels:
``bnkernels.convert(copy, to="batchnorm")``, which keeps the weights) on the same fixed batch.
``median_ms`` is the median wall time of a step bracketed by synchronizes
(:func:`.timing.step_times`) after warm-up steps; ``ratio_vs_torch`` divides it by torch's
BatchNorm's time for the same model, dtype and layout. ``check`` is "ok" when the converted
model's state_dict equals the copy's before conversion exactly (``weights_kept``) and its first
step's loss (``loss_first``: same weights, same data for every provider) is within
``LOSS_TOL`` of torch's (relative, ``loss_rel_diff``); "FAIL" otherwise.

Variants of a provider, by suffix: ``-fused`` runs ``bnkernels.fuse`` after the conversion
(every BatchNorm -> ReLU and BatchNorm -> add -> ReLU site one fused call), ``-compile``
``torch.compile``s the model (torch's BatchNorm: ``torch-compile``). ``norm_MB``: the bytes a
step moves through normalization and the ReLUs and residual adds around it, modeled per
element (:func:`norm_bytes`; None for compiled models, whose fusions the model does not know).

cuDNN runs with ``benchmark=True`` (as a training script sets it) for every provider; TF32 is
left at torch's defaults (cuDNN convolutions may use it, matmuls do not).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import bnkernels

from . import models
from . import providers as P
from .shapes import combo_order
from .timing import step_times, synchronize


@dataclass(frozen=True)
class ModelSpec:
    """One network and its input. ``name``: at full size, the network's name in shapes.py."""

    name: str
    arch: str  # "vgg16" or "resnet50" (models.build)
    batch: int
    image: int  # square input side, pixels
    classes: int
    width: float = 1.0  # channel multiplier (1: the real network)


GPU_MODELS = (ModelSpec("vgg16-cifar-b128", "vgg16", 128, 32, 10),
              ModelSpec("resnet50-imagenet-b64", "resnet50", 64, 224, 1000))
# The smoke run's, at 1/16 width. VGG's five pools need 32x32 inputs. ResNet-50 at 32x32 ends at
# 1x1 pixels: with batch 8 its last BatchNorms see 8 values per channel (with 2 or 4, rounding
# differences grow chaotically through the blocks: the first-loss check could not be met).
TINY_MODELS = (ModelSpec("vgg16-cifar-tiny", "vgg16", 2, 32, 10, 1 / 16),
               ModelSpec("resnet50-tiny", "resnet50", 8, 32, 10, 1 / 16))
LIMITS = {"vgg16": 0.95, "resnet50": 1.0}  # target: t(bnkernels, default) / t(torch) <= limit
DTYPES = ("fp32", "bf16")  # bf16: torch.autocast
LAYOUTS = ("NCHW", "channels_last")
BASELINE = "torch"  # torch.nn.BatchNorm2d
LR, MOMENTUM = 0.01, 0.9
# |loss_first - torch's| / |torch's| accepted: the first step's loss of the same weights on the
# same batch, through 13 (VGG) or 53 (ResNet) BatchNorms in the dtype's precision. Each
# BatchNorm agrees with torch's to rounding; the network amplifies that, most at the tiny sizes
# (CPU, reference backend: up to 1.3e-5 in fp32, 1.4e-2 in bf16 autocast over 10 seeds).
LOSS_TOL = {"fp32": 1e-3, "bf16": 5e-2}

GPU_PROVIDERS = (BASELINE, "bnkernels-auto", "bnkernels-triton", "bnkernels-cuda",
                 "bnkernels-auto-fused", "torch-compile", "bnkernels-auto-fused-compile")
CPU_PROVIDERS = (BASELINE, "bnkernels-reference", "bnkernels-reference-fused")
FUSED, COMPILE = "-fused", "-compile"  # provider name suffixes (see the module docstring)
NOT_ON_CPU = {
    "bnkernels-auto": "on the CPU 'auto' runs the interpreted Triton kernels (seconds per step "
                      "of even the tiny models); the reference backend stands in",
    "bnkernels-triton": "interpreted on the CPU: seconds per step of even the tiny models",
    "bnkernels-cuda": "the CUDA backend needs a CUDA device",
    "bnkernels-auto-fused": "'auto' runs the interpreted Triton kernels on the CPU; "
                            "bnkernels-reference-fused stands in",
    "torch-compile": "compiling the models takes minutes on the CPU: GPU runs only",
    "bnkernels-auto-fused-compile": "compiling the models takes minutes on the CPU: GPU runs "
                                    "only",
}

# Element accesses of x's size per training step at each kind of site (forward + backward),
# without cache reuse between passes: torch's BatchNorm reads x twice (statistics, then
# normalize) and writes y, its backward reads dy and x twice and writes dx (8); a ReLU reads
# and writes (forward 2, its backward reads dy and y and writes dx: 3); an add reads two and
# writes one (its backward passes the gradient on: 0). bnkernels' fused BatchNorm + ReLU keeps
# BatchNorm's 8 (the backward recomputes the ReLU's mask from x); + residual add reads the
# residual in the forward, and in the backward reads the output (the mask) and writes
# d(residual) in its first sweep, which its dx pass reads instead of dy (4 + 7).
SITE_ACCESSES = {
    "unfused": {"bn": 8, "bn+relu": 13, "bn+add+relu": 16, "bn+add": 11},
    "fused": {"bn": 8, "bn+relu": 8, "bn+add+relu": 11, "bn+add": 9},
}


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(GPU_PROVIDERS + CPU_PROVIDERS))


@dataclass(frozen=True)
class E2EOptions:
    models: tuple[ModelSpec, ...]
    dtypes: tuple[str, ...]
    layouts: tuple[str, ...]
    providers: tuple[str, ...]
    warmup: int  # untimed steps first (the first one's loss is checked)
    min_steps: int  # timed steps, at least
    min_seconds: float  # ... and more until this much time was timed
    max_steps: int
    max_combos: int | None = None  # only the first (dtype, layout) pairs of combo_order

    @classmethod
    def for_device(cls, device: torch.device, quick: bool, smoke: bool = False,
                   requested: tuple[str, ...] = ()) -> E2EOptions:
        cuda = device.type == "cuda"
        default = GPU_PROVIDERS if cuda else CPU_PROVIDERS
        chosen = tuple(n for n in default if not requested or n in requested or n == BASELINE)
        if smoke:  # compiling each tiny model would take longer than the rest of the run
            chosen = tuple(n for n in chosen if not n.endswith(COMPILE))
        if not cuda or smoke:  # fp32 NCHW and bf16 channels_last only
            return cls(TINY_MODELS, DTYPES, LAYOUTS, chosen, warmup=1, min_steps=2,
                       min_seconds=0.0, max_steps=2, max_combos=2)
        if quick:
            return cls(GPU_MODELS, DTYPES, LAYOUTS, chosen, warmup=2, min_steps=8,
                       min_seconds=0.4, max_steps=200)
        return cls(GPU_MODELS, DTYPES, LAYOUTS, chosen, warmup=5, min_steps=30,
                   min_seconds=3.0, max_steps=1000)

    def left_out(self, device: torch.device) -> list[dict]:
        if device.type == "cuda":
            return []
        return [{"section": "e2e", "provider": n, "reason": NOT_ON_CPU[n]}
                for n in GPU_PROVIDERS if n not in self.providers and n in NOT_ON_CPU]

    def configs(self) -> list[tuple[ModelSpec, str, str]]:
        """(model, dtype, layout) in run order: every model in the common settings first
        (shapes.combo_order), so a run cut by its time limit has both networks."""
        combos = combo_order(self.dtypes, self.layouts)[:self.max_combos]
        return [(m, d, lay) for d, lay in combos for m in self.models]


def _variant(name: str) -> tuple[str, bool, bool]:
    """(provider name, fused, compiled) of an e2e provider name."""
    compiled = name.endswith(COMPILE)
    if compiled:
        name = name[:-len(COMPILE)]
    fused = name.endswith(FUSED)
    if fused:
        name = name[:-len(FUSED)]
    return name, fused, compiled


def _provider(name: str) -> P.Provider | None:
    """The bnkernels provider of a name (None for torch's BatchNorm)."""
    name = _variant(name)[0]
    if name == BASELINE:
        return None
    return P.AUTO if name == P.AUTO.name else P.PROVIDERS[name]


def norm_sites(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, int]]:
    """(site kind, elements) of every BatchNorm call of a training step of ``model`` on a batch
    like ``x``: the kinds :func:`bnkernels.fuse` finds ("bn+relu", "bn+add+relu", "bn+add",
    and "bn" for a BatchNorm it leaves), the elements from a forward on the meta device."""
    fused = bnkernels.fuse(copy.deepcopy(model).train())
    kinds = {name: kind for kind, name, _ in fused.fusion_report.fused}
    sizes: dict[str, int] = {}
    meta = copy.deepcopy(model).to("meta").train()
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: sizes.__setitem__(n, out.numel()))
             for n, m in meta.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        meta(torch.empty(x.shape, device="meta"))
    for h in hooks:
        h.remove()
    return [(kinds.get(n, "bn"), numel) for n, numel in sizes.items()]


def norm_bytes(sites: list[tuple[str, int]], itemsize: int, fused: bool) -> int:
    """Bytes a training step moves through its normalization sites (see SITE_ACCESSES)."""
    table = SITE_ACCESSES["fused" if fused else "unfused"]
    return sum(table[kind] * numel * itemsize for kind, numel in sites)


def _context(name: str):
    prov = _provider(name)
    return contextlib.nullcontext() if prov is None else prov.context()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _trainer(base: torch.nn.Module, provider: str, x: torch.Tensor, y: torch.Tensor,
             dtype: str, layout: str, device: torch.device):
    """A step function training a copy of ``base``, the list its losses go to, and whether
    convert kept the copy's state_dict exactly (None for torch's BatchNorm)."""
    model = copy.deepcopy(base)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    kept = None
    name, fused, compiled = _variant(provider)
    if name != BASELINE:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model = bnkernels.convert(model, to="batchnorm")
        if fused:
            model = bnkernels.fuse(model.train())
        after = model.state_dict()
        kept = before.keys() == after.keys() and all(torch.equal(v, after[k])
                                                     for k, v in before.items())
        del before, after
    model.train()
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    losses: list[torch.Tensor] = []

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if len(losses) < 2:
            losses.append(loss.detach())
        else:
            losses[1] = loss.detach()
    return step, losses, kept


def run(device: torch.device, opts: E2EOptions, skipped: list[dict],
        log: Callable[[str], None] = print, deadline: float | None = None
        ) -> tuple[list[dict], str | None]:
    """Train and time every (model, dtype, layout, provider); returns (rows, truncated), where
    ``truncated`` says what was left out when ``deadline`` (time.monotonic) passed."""
    providers = []
    for name in (BASELINE, *[n for n in opts.providers if n != BASELINE]):
        prov = _provider(name)
        why = prov.unavailable(device) if prov is not None else None
        if why:
            skipped.append({"section": "e2e", "provider": name, "reason": why})
            log(f"e2e: skip {name}: {why}")
        else:
            providers.append(name)
    rows: list[dict] = []
    configs = opts.configs()
    truncated = None
    made: dict[str, tuple] = {}  # model name -> (model, x, y, sites), built once
    # cuDNN's autotuner for the convolutions, as a training script sets it; through the flags
    # context manager, which also works where global flags are frozen (torch's test utilities
    # freeze them).
    flags = torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=True,
                                       deterministic=torch.backends.cudnn.deterministic)
    try:
        flags.__enter__()
        for done, (spec, dtype, layout) in enumerate(configs):
            if deadline is not None and time.monotonic() > deadline:
                truncated = (f"time limit reached: {done} of {len(configs)} (model, dtype, "
                             "layout) configurations measured")
                log(f"e2e: stopping: {truncated}")
                break
            if spec.name not in made:
                try:
                    made[spec.name] = _model_and_batch(spec, device)
                except Exception as e:  # e.g. out of memory
                    made[spec.name] = P.first_line(e)
            if isinstance(made[spec.name], str):
                skipped.append({"section": "e2e", "model": spec.name, "dtype": dtype,
                                "layout": layout, "reason": made[spec.name]})
                continue
            rows += _run_config(spec, dtype, layout, *made[spec.name], providers, device, opts,
                                skipped, log)
    finally:
        flags.__exit__(None, None, None)
        made.clear()
        _release(device)
    return rows, truncated


def _model_and_batch(spec: ModelSpec, device: torch.device):
    """The freshly initialized model (seeded) every provider copies, and its fixed batch."""
    torch.manual_seed(0)
    base = _randomize_norms(models.build(spec.arch, spec.classes, spec.width)).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    x = torch.randn(spec.batch, 3, spec.image, spec.image, device=device, generator=gen)
    y = torch.randint(0, spec.classes, (spec.batch,), device=device, generator=gen)
    return base, x, y, norm_sites(base, x)


def _run_config(spec: ModelSpec, dtype: str, layout: str, base, x, y, sites,
                providers: list[str], device: torch.device, opts: E2EOptions,
                skipped: list[dict], log) -> list[dict]:
    rows = []
    for name in providers:
        where = {"model": spec.name, "dtype": dtype, "layout": layout, "provider": name}
        try:
            times, first, last, kept = _measure(base, name, x, y, dtype, layout, device,
                                                opts)
        except Exception as e:  # an OOM, a provider that cannot run: recorded, the run goes on
            skipped.append({"section": "e2e", **where, "reason": P.first_line(e)})
            log(f"e2e: {spec.name} {dtype} {layout} {name} failed: {P.first_line(e)}")
            continue
        finally:
            _release(device)
        _, fused, compiled = _variant(name)
        norm_mb = None if compiled else norm_bytes(sites, 2 if dtype == "bf16" else 4,
                                                   fused) / 1e6
        rows.append({**where, "arch": spec.arch, "batch": spec.batch, "image": spec.image,
                     "norm_MB": norm_mb,
                     "width": spec.width, "classes": spec.classes, "steps": len(times),
                     "warmup": max(1, opts.warmup), "median_ms": statistics.median(times),
                     "min_ms": min(times), "max_ms": max(times), "loss_first": first,
                     "loss_last": last, "weights_kept": kept, "ratio_vs_torch": None,
                     "loss_rel_diff": None, "check": None})
    add_ratios(rows)
    for r in rows:
        ratio = "-" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.3f}x"
        norm = "-" if r["norm_MB"] is None else f"{r['norm_MB']:.1f}"
        log(f"e2e: {r['model']:<22} {r['dtype']:<4} {r['layout']:<13} {r['provider']:<28} "
            f"{r['median_ms']:>9.2f} ms/step  {ratio} torch  loss {r['loss_first']:.4f}  "
            f"norm {norm} MB" + (f" {r['check']}" if r["check"] else ""))
    return rows


@torch.no_grad()
def _randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm weight ~ U(0.5, 1.5), bias ~ N(0, 0.1^2) instead of 1 and 0 (seeded): a
    convert that dropped them would then change the first loss, and the check sees it."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
    return model


def _measure(base, name, x, y, dtype, layout, device, opts: E2EOptions
             ) -> tuple[list[float], float, float, bool | None]:
    """Step times (ms), first and last loss of one provider's copy of ``base``, and whether
    convert kept its weights."""
    with _context(name):
        step, losses, kept = _trainer(base, name, x, y, dtype, layout, device)
        step()  # the first warm-up step: its loss is checked
        times = step_times(step, device, max(0, opts.warmup - 1), opts.min_steps,
                           opts.min_seconds, opts.max_steps)
        synchronize(device)
        return times, float(losses[0]), float(losses[-1]), kept


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_torch, loss_rel_diff and check (weights kept, first loss within LOSS_TOL) of
    each row against torch's row of the same model, dtype and layout."""
    ref = {(r["model"], r["dtype"], r["layout"]): r for r in rows if r["provider"] == BASELINE}
    for r in rows:
        t = ref.get((r["model"], r["dtype"], r["layout"]))
        if t is None:
            continue
        r["ratio_vs_torch"] = r["median_ms"] / t["median_ms"]
        if r["provider"] != BASELINE:
            diff = abs(r["loss_first"] - t["loss_first"]) / max(abs(t["loss_first"]), 1e-12)
            r["loss_rel_diff"] = diff
            ok = diff <= LOSS_TOL[r["dtype"]] and r.get("weights_kept", True) is not False
            r["check"] = "ok" if ok else "FAIL"


def settings(opts: E2EOptions, device: torch.device) -> dict:
    return {"method": f"training step (zero_grad, forward, cross-entropy, backward, SGD lr={LR} "
                      f"momentum={MOMENTUM}) bracketed by synchronizes, time.perf_counter; "
                      f"median of >= {opts.min_steps} steps (and >= {opts.min_seconds:g} s, <= "
                      f"{opts.max_steps} steps) after {max(1, opts.warmup)} warm-up steps",
            "models": [vars(m) for m in opts.models], "dtypes": list(opts.dtypes),
            "layouts": list(opts.layouts), "providers": list(opts.providers),
            "baseline": BASELINE, "limits": LIMITS, "loss_tol": LOSS_TOL,
            "cudnn": "benchmark=True; TF32 as torch's defaults (cudnn.allow_tf32="
                     f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32="
                     f"{torch.backends.cuda.matmul.allow_tf32})",
            "configs": [{"model": m.name, "arch": m.arch, "dtype": d, "layout": lay}
                        for m, d, lay in opts.configs()]}


__all__ = ["BASELINE", "CPU_PROVIDERS", "DTYPES", "E2EOptions", "GPU_MODELS", "GPU_PROVIDERS",
           "LAYOUTS", "LIMITS", "LOSS_TOL", "ModelSpec", "SITE_ACCESSES", "TINY_MODELS",
           "add_ratios", "names", "norm_bytes", "norm_sites", "run", "settings"]
