"""The Triton BatchNorm plan: one signature's launches, resolved once (see :mod:`.kernels` for
the kernels and the strategies)."""

from __future__ import annotations

import functools

import torch

from ...plan import BasePlan, Signature, Workspaces
from .. import common as tc
from ..affine import FROM_VAR, INVSTD, affine_apply_kernel, affine_dx_kernel
from ..launch import Launch
from ..noise import (
    noise_floats,
    noise_tensor,
    noisy_apply_kernel,
    noisy_dx_kernel,
    step_scratch,
)
from .kernels import (
    _WS_ROWS,
    _bn_fused_bwd_kernel,
    _bn_fused_fwd_kernel,
    _bn_noisy_split_bwd_kernel,
    _bn_split_bwd_kernel,
    _bn_stats_kernel,
)

# The per-call arguments of each kernel (everything else is fixed by the plan). Absent tensors
# (no weight, no running statistics, no residual, no statistics to save) are passed as None:
# Triton takes a None argument as a constexpr, and the kernels read a tensor's presence from
# its pointer, so the kernel variant of a plan never sees a placeholder.
_STATS_CALL = ("x_ptr", "mean_ptr", "invstd_ptr", "rmean_ptr", "rvar_ptr", "ws_ptr",
               "ticket_ptr", "nbt_ptr", "momentum", "eps")
_FUSED_FWD_CALL = ("x_ptr", "y_ptr", "res_ptr", "mean_ptr", "invstd_ptr", "rmean_ptr",
                   "rvar_ptr", "w_ptr", "b_ptr", "nbt_ptr", "momentum", "eps")
APPLY_CALL = ("x_ptr", "y_ptr", "res_ptr", "mean_ptr", "lo_ptr", "scale_ptr", "w_ptr", "b_ptr",
              "save_mean_ptr", "save_invstd_ptr", "eps")
_NOISY_APPLY_CALL = ("x_ptr", "y_ptr", "res_ptr", "mean_ptr", "lo_ptr", "invstd_ptr", "w_ptr",
                     "b_ptr", "seed", "step", "used_ptr")
_BWD_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "out_ptr", "dres_ptr", "mean_ptr", "scale_ptr",
             "w_ptr", "b_ptr", "dw_ptr", "db_ptr")
_SPLIT_BWD_CALL = _BWD_CALL + ("ws_ptr", "ticket_ptr")
DX_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "out_ptr", "dres_ptr", "mean_ptr", "scale_ptr", "w_ptr",
           "b_ptr", "coef_ptr")
_NOISY_DX_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "mean_ptr", "invstd_ptr", "w_ptr", "b_ptr",
                  "coef_ptr", "seed", "step")
_NOISY_SPLIT_BWD_CALL = tuple(n for n in _SPLIT_BWD_CALL if n != "dx_ptr")
# Noisy plans pass the noise's seed and step per call (and the step used, forward); the
# reductions' NoiseConfig scalars are the plan's fp32 tensor (``noise_ptr``, fixed). Plain
# plans fix noise_ptr, seed and step as None (their kernel variant has no noise).
_NOISE_CALL = ("seed", "step")
_NO_NOISE = dict(noise_ptr=None, seed=None, step=None)
# Every per-call pointer is checked for the alignment its kernel variant assumes (see
# ..launch): the user's tensors, and the plan's own too (running_mean is passed as mean_ptr in
# eval, SyncBatchNorm's sums[1] and the workspace's tail sit at offsets of C elements).


class _Workspace:
    """Partials ([_WS_ROWS, C, SPLIT], then [2, C] per-channel results) and ticket counters."""

    def __init__(self, lay, cfg, acc):
        n = _WS_ROWS * lay.C * cfg.split + 2 * lay.C
        self.buf = torch.empty(n, device=lay.device, dtype=acc)
        self.ticket = torch.zeros(cfg.groups, device=lay.device, dtype=torch.int32)
        self.vec = self.buf[_WS_ROWS * lay.C * cfg.split:]  # mean_lo (fwd), coefs (bwd)


def noise_call(noise):
    """(seed, step) of a call: the per-call noise arguments (None for plain BatchNorm). The
    seed and an int step are ints (checked by :mod:`bnkernels.functional`); a tensor step is
    read on the device."""
    return (None, None) if noise is None else (noise[1], noise[2])


class BatchNormPlan(BasePlan):
    """Everything about a BatchNorm call that depends only on its :class:`Signature`, resolved
    once: the layout view, the strategy ("fused": one launch per direction; "split": two),
    the launches (grids, blocks, warps, constexprs, per-plan sizes) and a cached workspace.
    The methods then allocate the outputs and launch (:class:`~...plan.Plan`,
    :class:`~...plan.SyncStages`)."""

    def __init__(self, sig: Signature):
        lay, acc = self._resolve(sig)
        self.fused = tc.strategy(lay) == "fused"
        self.cfg = cfg = tc.reduce_config(lay, fused=self.fused, itemsize=sig.dtype.itemsize)
        self.ncs = lay.kind == "ncs"
        self.relu = sig.activation == "relu"
        # A residual: the forward adds it before the activation; with a ReLU, the backward
        # reads the forward's output for the mask (out_ptr) and writes d(residual) with dx,
        # instead of recomputing bn(x) + residual (see docs/fused-ops.md).
        self.res = sig.has_residual
        self.out_mask = self.res and self.relu
        self.recompute = self.relu and not self.res  # the backward recomputes the output
        # Noisy (training only): the reductions generate the noise themselves (fused: one
        # launch a direction; split: the statistics and the noisy apply kernel forward, the
        # noisy reduction and the noisy dx kernel backward). The NoiseConfig's four scalars
        # are one fp32 tensor made here for the reductions (it is part of the signature) and
        # float arguments of the elementwise kernels; the seed and the step come per call.
        self.noisy = sig.is_noisy
        self.step_tensor = sig.step_tensor
        self.save_step = self.step_tensor and sig.training
        # where a forward with no backward to come writes the step it used: the kernel variant
        # that saves it, with nothing allocated per call (write-only, so calls may share it)
        self.used_scratch = step_scratch(lay.device) if self.save_step else None
        self.flags = dict(ACC=tc.tl_dtype(acc), INT64=lay.int64, ALIGN=tc.row_align(lay.cols))
        self.noise_t = noise_tensor(sig.noisy[0], lay.device) if self.noisy else None
        self.noise_floats = noise_floats(sig.noisy[0]) if self.noisy else {}
        # the reductions' noise arguments fixed by the plan, and the per-call names added
        self.noise_fixed = dict(noise_ptr=self.noise_t) if self.noisy else _NO_NOISE
        self.noise_call = _NOISE_CALL if self.noisy else ()
        self.shape = tc.reduce_shape(lay, cfg)
        # the one-pass kernels take a channel group's units whole
        self.fused_shape = {k: v for k, v in self.shape.items() if k != "SPLIT"}
        self.reduce_grid = tc.check_grid((cfg.groups, cfg.split), "reduction launch")
        acfg = tc.apply_config(lay, itemsize=sig.dtype.itemsize, heavy=sig.is_noisy)
        self.ew_grid, cols_on_x = tc.ew_grid(lay, acfg)
        self.ew = dict(self.flags, ROWS=lay.rows, COLS=lay.cols, C=lay.C, BLOCK_R=acfg.block_r,
                       BLOCK_K=acfg.block_k, CHAN_ON_ROWS=self.ncs, COLS_ON_X=cols_on_x)
        self.ew_warps = acfg.num_warps
        self.workspaces = Workspaces(lay.device, lambda: _Workspace(lay, cfg, acc))
        self._bwd_launches: dict = {}
        self.pair = sig.dtype.itemsize >= 4
        # The launches every call of this signature makes (the others are made on first use).
        if sig.training:
            if self.fused:
                # (the used step: per call where saved, else fixed as None)
                used = ("used_ptr",) if self.save_step else ()
                fixed = dict(self.noise_fixed, **({} if self.save_step else dict(used_ptr=None)))
                self.k_fwd = self._launch(
                    _bn_fused_fwd_kernel, self.reduce_grid, cfg.num_warps,
                    _FUSED_FWD_CALL + self.noise_call + used,
                    dict(self.flags, **self.fused_shape, **fixed, RELU=self.relu,
                         PAIR=self.pair))
            else:
                self.k_stats = self._stats_launch(OUT_VAR=False)
                self.k_apply = (self._noisy_apply_launch() if self.noisy
                                else self._apply_launch(SCALE_FROM=INVSTD))
        else:
            self.k_eval = self._apply_launch(SCALE_FROM=FROM_VAR)
            self.k_eval_save = self._apply_launch(SCALE_FROM=FROM_VAR)

    # -- launches

    def _launch(self, kernel, grid, num_warps, call, consts):
        return Launch(kernel, grid, num_warps, consts, call, device=self.lay.device)

    def _stats_launch(self, OUT_VAR):
        return self._launch(_bn_stats_kernel, self.reduce_grid, self.cfg.num_warps, _STATS_CALL,
                            dict(self.flags, **self.shape, OUT_VAR=OUT_VAR, PAIR=self.pair))

    def _noisy_apply_launch(self):
        return self._launch(noisy_apply_kernel, self.ew_grid, self.ew_warps, _NOISY_APPLY_CALL,
                            dict(self.ew, **self.noise_floats, S=self.lay.S, RELU=self.relu))

    def _apply_launch(self, SCALE_FROM, RELU=None):
        consts = dict(self.ew, SCALE_FROM=SCALE_FROM, RELU=self.relu if RELU is None else RELU)
        return self._launch(affine_apply_kernel, self.ew_grid, self.ew_warps, APPLY_CALL, consts)

    def _bwd_launch(self, need_dx: bool, need_dw: bool, need_db: bool, raw: bool = False):
        """The reduction launch of the backward for the gradients wanted (made on first use;
        ``raw``: SyncBatchNorm's sums). In the split training backward it writes dx's
        coefficients to the workspace (the dx launch follows)."""
        key = (need_dx, need_dw, need_db, raw)
        launch = self._bwd_launches.get(key)
        if launch is None:
            consts = dict(self.flags, DW_RAW=raw, RELU=self.recompute)
            m_f = dict(M_F=float(self.lay.M))
            if self.fused:
                kernel, call = _bn_fused_bwd_kernel, _BWD_CALL + self.noise_call
                consts.update(self.fused_shape, **self.noise_fixed, **m_f,
                              TRAINING=self.training or raw)
            elif self.noisy:  # training: dx is the noisy dx pass's; M_F made in the kernel
                kernel, call = _bn_noisy_split_bwd_kernel, _NOISY_SPLIT_BWD_CALL + _NOISE_CALL
                consts.update(self.shape, noise_ptr=self.noise_t)
            else:
                kernel, call = _bn_split_bwd_kernel, _SPLIT_BWD_CALL
                consts.update(self.shape, **m_f, TRAINING=self.training or raw)
            launch = self._bwd_launches[key] = self._launch(
                kernel, self.reduce_grid, self.cfg.num_warps, call, consts)
        return launch

    @functools.cached_property
    def k_dx(self):
        """The elementwise dx launch (split training backward, eval dx alone, SyncBN); noisy:
        the noisy dx kernel (its noise regenerated)."""
        if self.noisy:
            return self._launch(noisy_dx_kernel, self.ew_grid, self.ew_warps, _NOISY_DX_CALL,
                                dict(self.ew, **self.noise_floats, S=self.lay.S,
                                     RELU=self.recompute))
        consts = dict(self.ew, SCALE_FROM=INVSTD, eps=None, RELU=self.recompute)
        return self._launch(affine_dx_kernel, self.ew_grid, self.ew_warps, DX_CALL, consts)

    @functools.cached_property
    def k_sync_stats(self):
        return self._stats_launch(OUT_VAR=True)

    @functools.cached_property
    def k_sync_apply(self):
        if self.noisy:
            return self._noisy_apply_launch()
        return self._apply_launch(SCALE_FROM=INVSTD)

    # -- forward

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):
        """``(y, mean, invstd, used)``: the batch statistics in training; in eval mode
        snapshots of the mean and invstd used (None unless ``need_saved``). ``used``: the step
        a noisy training forward with a tensor step used (1-element int64, written by its
        kernel; with no backward to come, ``need_saved`` False, the plan's scratch), else
        None."""
        running_mean, running_var, _, momentum, eps, noise, counter = call
        xc = x.contiguous() if self.copy else x
        y = torch.empty_like(xc)
        seed, step = (None, None) if noise is None else (noise[1], noise[2])
        res = None if residual is None else self.lay.like(residual, xc)  # x's layout
        if not self.training:
            if need_saved:
                mean = xc.new_empty(self.C, dtype=self.acc)
                invstd = xc.new_empty(self.C, dtype=self.acc)
                self.k_eval_save.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=running_mean, lo_ptr=None,
                    scale_ptr=running_var, w_ptr=weight, b_ptr=bias, save_mean_ptr=mean,
                    save_invstd_ptr=invstd, eps=eps)
            else:
                mean = invstd = None
                self.k_eval.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=running_mean, lo_ptr=None,
                    scale_ptr=running_var, w_ptr=weight, b_ptr=bias, save_mean_ptr=None,
                    save_invstd_ptr=None, eps=eps)
            return (y if not self.copy else self._restore(y, x)), mean, invstd, None
        mean = xc.new_empty(self.C, dtype=self.acc)
        invstd = xc.new_empty(self.C, dtype=self.acc)
        used = (xc.new_empty(1, dtype=torch.int64) if need_saved and self.save_step
                else self.used_scratch)
        if self.fused:
            if not self.noisy:
                self.k_fwd.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=mean, invstd_ptr=invstd,
                    rmean_ptr=running_mean, rvar_ptr=running_var, w_ptr=weight, b_ptr=bias,
                    nbt_ptr=counter, momentum=momentum, eps=eps)
            elif used is None:
                self.k_fwd.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=mean, invstd_ptr=invstd,
                    rmean_ptr=running_mean, rvar_ptr=running_var, w_ptr=weight, b_ptr=bias,
                    nbt_ptr=counter, momentum=momentum, eps=eps, seed=seed, step=step)
            else:
                self.k_fwd.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=mean, invstd_ptr=invstd,
                    rmean_ptr=running_mean, rvar_ptr=running_var, w_ptr=weight, b_ptr=bias,
                    nbt_ptr=counter, momentum=momentum, eps=eps, seed=seed, step=step,
                    used_ptr=used)
        else:
            ws = self.workspaces.get()
            self.k_stats.run(
                x_ptr=xc, mean_ptr=mean, invstd_ptr=invstd, rmean_ptr=running_mean,
                rvar_ptr=running_var, ws_ptr=ws.buf, ticket_ptr=ws.ticket, nbt_ptr=counter,
                momentum=momentum, eps=eps)
            lo = ws.vec if not self.recompute else None
            if self.noisy:
                self.k_apply.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=mean, lo_ptr=lo, invstd_ptr=invstd,
                    w_ptr=weight, b_ptr=bias, seed=seed, step=step, used_ptr=used)
            else:
                self.k_apply.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=mean, lo_ptr=lo, scale_ptr=invstd,
                    w_ptr=weight, b_ptr=bias, save_mean_ptr=None, save_invstd_ptr=None,
                    eps=eps)
        return (y if not self.copy else self._restore(y, x)), mean, invstd, used

    def _restore(self, out, x):
        return self.lay.restore(out, x)

    # -- backward

    def backward(self, dy, x, weight, bias, saved, needs):
        """``(dx, dweight, dbias)``, None where ``needs`` says so; ``mean, invstd``: what the
        forward saved (the batch statistics, or the eval snapshots). With a residual,
        ``(dx, dweight, dbias, dresidual)`` (``needs`` has four entries; ``out``: the
        forward's output, read for a ReLU's mask)."""
        mean, invstd, eps, noise, out = saved
        if self.res:
            return self._backward_res(dy, x, mean, invstd, weight, bias, eps, needs, noise, out)
        return self._backward(dy, x, mean, invstd, weight, bias, eps, needs, noise)

    def _backward_res(self, dy, x, mean, invstd, weight, bias, eps, needs, noise, out):
        need_dz = needs[3]
        if not self.out_mask:  # no activation: d(residual) = dy, and bn(x) gets dy
            dx, dw, db = self._backward(dy, x, mean, invstd, weight, bias, eps, needs[:3],
                                        noise)
            return dx, dw, db, (dy if need_dz else None)
        xc = x.contiguous() if self.copy else x
        # d(residual), the masked dy, is written by the first sweep: wanted, or read by the
        # split training backward's dx pass
        split_dx = needs[0] and self.training and not self.fused
        dz = torch.empty_like(xc) if need_dz or split_dx else None
        if need_dz and not any(needs[:3]):  # nothing else wanted: one elementwise op
            return None, None, None, torch.where(out <= 0, torch.zeros_like(dy), dy)
        dx, dw, db = self._backward(dy, x, mean, invstd, weight, bias, eps, needs[:3], noise,
                                    (self.lay.like(out, xc), dz))
        return dx, dw, db, (dz if need_dz else None)

    def _backward(self, dy, x, mean, invstd, weight, bias, eps, needs, noise, res=None):
        """The backward's launches; ``res``: (the forward's output in x's layout, the
        d(residual) out or None) where a ReLU follows a residual add."""
        need_dx, need_dw, need_db = needs
        need_dw = need_dw and weight is not None
        need_db = need_db and bias is not None
        if self.copy:
            x = x.contiguous()
        dyc = dy if dy.stride() == x.stride() else self.lay.like(dy, x)
        out, dres = (None, None) if res is None else res
        dx = torch.empty_like(x) if need_dx else None
        if not (need_dw or need_db or (need_dx and self.training)):
            if need_dx:  # eval, dx alone: one elementwise pass
                self.k_dx.run(dy_ptr=dyc, x_ptr=x, dx_ptr=dx, out_ptr=out, dres_ptr=dres,
                              mean_ptr=mean, scale_ptr=invstd, w_ptr=weight, b_ptr=bias,
                              coef_ptr=None)
            return dx, None, None
        dw = torch.empty_like(weight) if need_dw else None
        db = torch.empty_like(bias) if need_db else None
        split_dx = need_dx and self.training and not self.fused
        if self.noisy:
            return self._backward_noisy(dyc, x, dx, mean, invstd, weight, bias, dw, db, noise,
                                        out, dres, (need_dx, need_dw, need_db))
        if self.fused:
            self._bwd_launch(need_dx, need_dw, need_db).run(
                dy_ptr=dyc, x_ptr=x, dx_ptr=dx, out_ptr=out, dres_ptr=dres, mean_ptr=mean,
                scale_ptr=invstd, w_ptr=weight, b_ptr=bias, dw_ptr=dw, db_ptr=db)
            return dx, dw, db
        ws = self.workspaces.get()
        self._bwd_launch(need_dx, need_dw, need_db).run(
            dy_ptr=dyc, x_ptr=x, dx_ptr=None if split_dx else dx, out_ptr=out, dres_ptr=dres,
            mean_ptr=mean, scale_ptr=invstd, w_ptr=weight, b_ptr=bias, dw_ptr=dw, db_ptr=db,
            ws_ptr=ws.buf, ticket_ptr=ws.ticket)
        if split_dx:  # with a residual and a ReLU, dy is the masked dy the reduction wrote
            self.k_dx.run(
                dy_ptr=dyc if dres is None else dres, x_ptr=x, dx_ptr=dx, out_ptr=None,
                dres_ptr=None, mean_ptr=mean, scale_ptr=invstd, w_ptr=weight, b_ptr=bias,
                coef_ptr=ws.vec)
        return dx, dw, db

    def _backward_noisy(self, dyc, x, dx, mean, invstd, weight, bias, dw, db, noise, out, dres,
                        key):
        """Noisy BatchNorm's training backward: the one-pass kernel (fused), or the noisy
        reduction and the noisy dx pass (split), each regenerating the noise."""
        seed, step = noise[1], noise[2]
        if self.fused:
            self._bwd_launch(*key).run(
                dy_ptr=dyc, x_ptr=x, dx_ptr=dx, out_ptr=out, dres_ptr=dres, mean_ptr=mean,
                scale_ptr=invstd, w_ptr=weight, b_ptr=bias, dw_ptr=dw, db_ptr=db, seed=seed,
                step=step)
            return dx, dw, db
        ws = self.workspaces.get()
        self._bwd_launch(*key).run(
            dy_ptr=dyc, x_ptr=x, out_ptr=out, dres_ptr=dres, mean_ptr=mean, scale_ptr=invstd,
            w_ptr=weight, b_ptr=bias, dw_ptr=dw, db_ptr=db, ws_ptr=ws.buf, ticket_ptr=ws.ticket,
            seed=seed, step=step)
        if dx is not None:  # with a residual and a ReLU, dy is the masked dy the reduction wrote
            self.k_dx.run(dy_ptr=dyc if dres is None else dres, x_ptr=x, dx_ptr=dx,
                          mean_ptr=mean, invstd_ptr=invstd, w_ptr=weight, b_ptr=bias,
                          coef_ptr=ws.vec, seed=seed, step=step)
        return dx, dw, db

    # -- SyncBatchNorm's stages (training plans)

    def stats(self, x):
        """Per-channel (mean, biased var), fp32/fp64."""
        xc = x.contiguous() if self.copy else x
        mean = xc.new_empty(self.C, dtype=self.acc)
        var = xc.new_empty(self.C, dtype=self.acc)
        ws = self.workspaces.get()
        self.k_sync_stats.run(
            x_ptr=xc, mean_ptr=mean, invstd_ptr=var, rmean_ptr=None, rvar_ptr=None,
            ws_ptr=ws.buf, ticket_ptr=ws.ticket, nbt_ptr=None, momentum=0.0, eps=0.0)
        return mean, var

    def apply(self, x, mean, invstd, weight, bias, noise):
        """y = act(w * (x - mean) * invstd + b) with given statistics."""
        xc = x.contiguous() if self.copy else x
        y = torch.empty_like(xc)
        mean, invstd = mean.to(self.acc).contiguous(), invstd.to(self.acc).contiguous()
        if self.noisy:
            seed, step = noise_call(noise)
            self.k_sync_apply.run(x_ptr=xc, y_ptr=y, res_ptr=None, mean_ptr=mean, lo_ptr=None,
                                  invstd_ptr=invstd, w_ptr=weight, b_ptr=bias, seed=seed,
                                  step=step, used_ptr=None)
        else:
            self.k_sync_apply.run(x_ptr=xc, y_ptr=y, res_ptr=None, mean_ptr=mean, lo_ptr=None,
                                  scale_ptr=invstd, w_ptr=weight, b_ptr=bias,
                                  save_mean_ptr=None, save_invstd_ptr=None, eps=0.0)
        return y if not self.copy else self._restore(y, x)

    def _sync_grad(self, dy, x, mean, invstd):
        """(dy in x's layout; x; mean and invstd in ACC)."""
        if self.copy:
            x = x.contiguous()
        dyc = dy if dy.stride() == x.stride() else self.lay.like(dy, x)
        mean, invstd = mean.to(self.acc).contiguous(), invstd.to(self.acc).contiguous()
        return dyc, x, mean, invstd

    def bwd_reduce(self, dy, x, mean, invstd, weight, bias, noise):
        """[sum(g), sum(g * (x - mean))] per channel ([2, C]); noisy: g = dL/da, the noise
        regenerated in the same launch."""
        dyc, x, mean, invstd = self._sync_grad(dy, x, mean, invstd)
        sums = x.new_empty((2, self.C), dtype=self.acc)
        args = dict(dy_ptr=dyc, x_ptr=x, out_ptr=None, dres_ptr=None, mean_ptr=mean,
                    scale_ptr=invstd, w_ptr=weight, b_ptr=bias, dw_ptr=sums[1], db_ptr=sums[0])
        if self.fused or not self.noisy:
            args.update(dx_ptr=None)
        if not self.fused:
            ws = self.workspaces.get()
            args.update(ws_ptr=ws.buf, ticket_ptr=ws.ticket)
        if self.noisy:
            args.update(seed=noise[1], step=noise[2])
        self._bwd_launch(False, True, True, raw=True).run(**args)
        return sums

    def bwd_dx(self, dy, x, mean, invstd, weight, bias, mean_sums, noise):
        """Training dx given [mean(g), mean(g * (x - mean))] over the whole batch."""
        dyc, x, mean, invstd = self._sync_grad(dy, x, mean, invstd)
        acc = self.acc
        coef = torch.stack([mean_sums[0].to(acc), mean_sums[1].to(acc) * invstd * invstd])
        dx = torch.empty_like(x)
        if self.noisy:
            self.k_dx.run(dy_ptr=dyc, x_ptr=x, dx_ptr=dx, mean_ptr=mean, invstd_ptr=invstd,
                          w_ptr=weight, b_ptr=bias, coef_ptr=coef.contiguous(), seed=noise[1],
                          step=noise[2])
        else:
            self.k_dx.run(dy_ptr=dyc, x_ptr=x, dx_ptr=dx, out_ptr=None, dres_ptr=None,
                          mean_ptr=mean, scale_ptr=invstd, w_ptr=weight, b_ptr=bias,
                          coef_ptr=coef.contiguous())
        return dx


__all__ = ["BatchNormPlan", "noise_call"]
