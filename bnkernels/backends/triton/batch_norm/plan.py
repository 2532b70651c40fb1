"""The Triton BatchNorm plan: one signature's launches, resolved once (see :mod:`.kernels` for
the kernels and the strategies)."""

from __future__ import annotations

import functools

import torch

from ...plan import BasePlan, Signature, Workspaces
from ..common import (
    apply_config,
    check_grid,
    ew_grid,
    reduce_config,
    reduce_shape,
    row_align,
    strategy,
    tl_dtype,
)
from ..launch import Launch
from ..noise import STEP_INT, STEP_TENSOR
from .kernels import (
    _WS_ROWS,
    FROM_VAR,
    INVSTD,
    _bn_apply_kernel,
    _bn_bwd_dx_kernel,
    _bn_bwd_kernel,
    _bn_fwd_kernel,
)

# The per-call arguments of each kernel (everything else is fixed by the plan). Absent tensors
# (no weight, no running statistics, no noise) are passed as None: Triton takes a None
# argument as a constexpr, so the kernel variant of a plan never sees a placeholder.
_FWD_CALL = ("x_ptr", "y_ptr", "res_ptr", "mean_ptr", "invstd_ptr", "rmean_ptr", "rvar_ptr",
             "w_ptr", "b_ptr", "ws_ptr", "ticket_ptr", "step", "used_ptr", "nbt_ptr", "momentum",
             "eps", "seed")
_APPLY_CALL = ("x_ptr", "y_ptr", "res_ptr", "mean_ptr", "lo_ptr", "scale_ptr", "w_ptr", "b_ptr",
               "step", "used_ptr", "save_mean_ptr", "save_invstd_ptr", "eps", "seed")
_BWD_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "out_ptr", "dres_ptr", "mean_ptr", "scale_ptr",
             "w_ptr", "b_ptr", "dw_ptr",
             "db_ptr", "ws_ptr", "ticket_ptr", "step", "seed")
_DX_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "out_ptr", "dres_ptr", "mean_ptr", "scale_ptr",
            "w_ptr", "b_ptr", "coef_ptr",
            "step", "seed")
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
        self.fused = strategy(lay) == "fused"
        self.cfg = cfg = reduce_config(lay, fused=self.fused, itemsize=sig.dtype.itemsize)
        self.ncs = lay.kind == "ncs"
        self.relu = sig.activation == "relu"
        # A residual: the forward adds it before the activation (HAS_RES); with a ReLU, the
        # backward reads the forward's output for the mask (OUT_MASK) and writes d(residual)
        # with dx, instead of recomputing bn(x) + residual (see docs/fused-ops.md).
        self.res = sig.has_residual
        self.out_mask = self.res and self.relu
        self.recompute = self.relu and not self.res  # the backward recomputes the output
        cfg_noise = sig.noisy[0] if sig.is_noisy else None
        self.step_tensor = sig.step_tensor
        self.save_step = self.step_tensor and sig.training
        self.step_mode = STEP_TENSOR if self.step_tensor else STEP_INT
        self.flags = dict(HAS_W=sig.has_weight, HAS_B=sig.has_bias, RELU=self.relu,
                          NOISY=sig.is_noisy, STEP_PTR=self.step_mode, ACC=tl_dtype(acc),
                          INT64=lay.int64, ALIGN=row_align(lay.cols))
        self.noise_consts = dict(
            n_mu=None if cfg_noise is None else float(cfg_noise.n_mu),
            n_sigma=None if cfg_noise is None else float(cfg_noise.n_sigma),
            r_mu=None if cfg_noise is None else float(cfg_noise.r_mu),
            r_sigma=None if cfg_noise is None else float(cfg_noise.r_sigma))
        self.shape = reduce_shape(lay, cfg)
        self.reduce_grid = check_grid((cfg.groups, cfg.split), "reduction launch")
        acfg = apply_config(lay, itemsize=sig.dtype.itemsize, heavy=sig.is_noisy)
        self.ew_grid, cols_on_x = ew_grid(lay, acfg)
        self.ew = dict(ROWS=lay.rows, COLS=lay.cols, C=lay.C, S=lay.S, BLOCK_R=acfg.block_r,
                       BLOCK_K=acfg.block_k, CHAN_ON_ROWS=self.ncs, COLS_ON_X=cols_on_x)
        self.ew_warps = acfg.num_warps
        self.workspaces = Workspaces(lay.device, lambda: _Workspace(lay, cfg, acc))
        self._bwd_launches: dict = {}
        # The launches every call of this signature makes (the others are made on first use).
        if sig.training:
            if self.fused:
                self.k_fwd = self._reduce_fwd_launch(FUSED=True, UPDATE=sig.has_running,
                                                     OUT_VAR=False,
                                                     HAS_LO=not self.recompute,
                                                     SAVE_STEP=self.save_step,
                                                     COUNT=sig.counter)
            else:
                self.k_stats = self._reduce_fwd_launch(
                    FUSED=False, UPDATE=sig.has_running, OUT_VAR=False,
                    HAS_LO=not self.recompute, SAVE_STEP=False, COUNT=sig.counter, NOISY=False,
                    STEP_PTR=STEP_INT, HAS_W=False, HAS_B=False, RELU=False, HAS_RES=False)
                self.k_apply = self._apply_launch(SCALE_FROM=INVSTD,
                                                  HAS_LO=not self.recompute,
                                                  SAVE_STEP=self.save_step, SAVE_STATS=False)
        else:
            self.k_eval = self._apply_launch(SCALE_FROM=FROM_VAR, HAS_LO=False, SAVE_STEP=False,
                                             SAVE_STATS=False)
            self.k_eval_save = self._apply_launch(SCALE_FROM=FROM_VAR, HAS_LO=False,
                                                  SAVE_STEP=False, SAVE_STATS=True)

    # -- launches

    def _launch(self, kernel, grid, num_warps, call, consts):
        return Launch(kernel, grid, num_warps, consts, call, device=self.lay.device)

    def _reduce_fwd_launch(self, **meta):
        consts = dict(self.flags, **self.noise_consts, **self.shape, HAS_RES=self.res,
                      PAIR=self.sig.dtype.itemsize >= 4)
        consts.update(meta)
        return self._launch(_bn_fwd_kernel, self.reduce_grid, self.cfg.num_warps, _FWD_CALL,
                            consts)

    def _apply_launch(self, **meta):
        consts = dict(self.flags, **self.noise_consts, **self.ew, HAS_RES=self.res)
        consts.update(meta)
        return self._launch(_bn_apply_kernel, self.ew_grid, self.ew_warps, _APPLY_CALL, consts)

    def _bwd_launch(self, need_dx: bool, need_dw: bool, need_db: bool, raw: bool = False):
        """The reduction launch of the backward for the gradients wanted (made on first use;
        ``raw``: SyncBatchNorm's sums). With ``need_dx`` in the split training backward it
        writes dx's coefficients to the workspace (the dx launch follows)."""
        key = (need_dx, need_dw, need_db, raw)
        launch = self._bwd_launches.get(key)
        if launch is None:
            consts = dict(self.flags, **self.noise_consts, **self.shape,
                          STEP_PTR=self.step_mode,
                          FUSED=self.fused, TRAINING=self.training or raw,
                          SCALE_FROM=INVSTD, WRITE_DX=need_dx, WRITE_DW=need_dw,
                          WRITE_DB=need_db, DW_RAW=raw, M_F=float(self.lay.M), eps=None,
                          RELU=self.recompute, OUT_MASK=self.out_mask)
            launch = self._bwd_launches[key] = self._launch(
                _bn_bwd_kernel, self.reduce_grid, self.cfg.num_warps, _BWD_CALL, consts)
        return launch

    @functools.cached_property
    def k_dx(self):
        """The elementwise dx launch (split training backward, eval dx alone, SyncBN)."""
        return self._dx_launch(self.step_mode)

    def _dx_launch(self, step_mode):
        # A residual's training dx pass reads the masked dy its reduction wrote (d(residual)):
        # no mask there; eval's one pass masks and writes d(residual) itself.
        consts = dict(self.flags, **self.noise_consts, **self.ew, TRAINING=self.training,
                      SCALE_FROM=INVSTD, eps=None, STEP_PTR=step_mode, RELU=self.recompute,
                      OUT_MASK=self.out_mask and not self.training)
        return self._launch(_bn_bwd_dx_kernel, self.ew_grid, self.ew_warps, _DX_CALL, consts)

    @functools.cached_property
    def k_sync_stats(self):
        return self._reduce_fwd_launch(FUSED=False, UPDATE=False, OUT_VAR=True, HAS_LO=False,
                                       SAVE_STEP=False, COUNT=False, NOISY=False,
                                       STEP_PTR=False, HAS_W=False, HAS_B=False, RELU=False,
                                       HAS_RES=False)

    @functools.cached_property
    def k_sync_apply(self):
        return self._apply_launch(SCALE_FROM=INVSTD, HAS_LO=False, SAVE_STEP=False,
                                  SAVE_STATS=False, HAS_RES=False)

    # -- forward

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):
        """``(y, mean, invstd, used)``: the batch statistics in training; in eval mode
        snapshots of the mean and invstd used (None unless ``need_saved``). ``used``: the step
        a noisy training forward with a tensor step used (1-element int64, written by its
        kernel), else None."""
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
                    scale_ptr=running_var, w_ptr=weight, b_ptr=bias, step=step, used_ptr=None,
                    save_mean_ptr=mean, save_invstd_ptr=invstd, eps=eps, seed=seed)
            else:
                mean = invstd = None
                self.k_eval.run(
                    x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=running_mean, lo_ptr=None,
                    scale_ptr=running_var, w_ptr=weight, b_ptr=bias, step=step, used_ptr=None,
                    save_mean_ptr=None, save_invstd_ptr=None, eps=eps, seed=seed)
            return (y if not self.copy else self._restore(y, x)), mean, invstd, None
        mean = xc.new_empty(self.C, dtype=self.acc)
        invstd = xc.new_empty(self.C, dtype=self.acc)
        used = xc.new_empty(1, dtype=torch.int64) if self.save_step else None
        if self.fused:
            self.k_fwd.run(
                x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=mean, invstd_ptr=invstd,
                rmean_ptr=running_mean,
                rvar_ptr=running_var, w_ptr=weight, b_ptr=bias, ws_ptr=None, ticket_ptr=None,
                step=step, used_ptr=used, nbt_ptr=counter, momentum=momentum, eps=eps,
                seed=seed)
        else:
            ws = self.workspaces.get()
            self.k_stats.run(
                x_ptr=xc, y_ptr=None, res_ptr=None, mean_ptr=mean, invstd_ptr=invstd,
                rmean_ptr=running_mean,
                rvar_ptr=running_var, w_ptr=None, b_ptr=None, ws_ptr=ws.buf,
                ticket_ptr=ws.ticket, step=None, used_ptr=None, nbt_ptr=counter,
                momentum=momentum, eps=eps, seed=None)
            self.k_apply.run(
                x_ptr=xc, y_ptr=y, res_ptr=res, mean_ptr=mean,
                lo_ptr=ws.vec if not self.recompute else None,
                scale_ptr=invstd, w_ptr=weight, b_ptr=bias, step=step, used_ptr=used,
                save_mean_ptr=None, save_invstd_ptr=None, eps=eps, seed=seed)
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
        seed, step = (None, None) if noise is None else (noise[1], noise[2])
        dx = torch.empty_like(x) if need_dx else None
        if not (need_dw or need_db or (need_dx and self.training)):
            if need_dx:  # eval, dx alone: one elementwise pass
                self.k_dx.run(dy_ptr=dyc, x_ptr=x, dx_ptr=dx, out_ptr=out, dres_ptr=dres,
                              mean_ptr=mean, scale_ptr=invstd,
                              w_ptr=weight, b_ptr=bias, coef_ptr=None, step=step, seed=seed)
            return dx, None, None
        dw = torch.empty_like(weight) if need_dw else None
        db = torch.empty_like(bias) if need_db else None
        split_dx = need_dx and self.training and not self.fused
        ws = None if self.fused else self.workspaces.get()
        self._bwd_launch(need_dx, need_dw, need_db).run(
            dy_ptr=dyc, x_ptr=x, dx_ptr=None if split_dx else dx, out_ptr=out,
            dres_ptr=dres, mean_ptr=mean,
            scale_ptr=invstd, w_ptr=weight, b_ptr=bias, dw_ptr=dw, db_ptr=db,
            ws_ptr=ws.buf if ws is not None else None,
            ticket_ptr=ws.ticket if ws is not None else None, step=step, seed=seed)
        if split_dx:  # with a residual and a ReLU, dy is the masked dy the reduction wrote
            self.k_dx.run(
                dy_ptr=dyc if dres is None else dres, x_ptr=x, dx_ptr=dx, out_ptr=None,
                dres_ptr=None, mean_ptr=mean,
                scale_ptr=invstd, w_ptr=weight,
                b_ptr=bias, coef_ptr=ws.vec, step=step, seed=seed)
        return dx, dw, db

    # -- SyncBatchNorm's stages (training plans)

    def stats(self, x):
        """Per-channel (mean, biased var), fp32/fp64."""
        xc = x.contiguous() if self.copy else x
        mean = xc.new_empty(self.C, dtype=self.acc)
        var = xc.new_empty(self.C, dtype=self.acc)
        ws = self.workspaces.get()
        self.k_sync_stats.run(
            x_ptr=xc, y_ptr=None, res_ptr=None, mean_ptr=mean, invstd_ptr=var, rmean_ptr=None,
            rvar_ptr=None,
            w_ptr=None, b_ptr=None, ws_ptr=ws.buf, ticket_ptr=ws.ticket, step=None,
            used_ptr=None, nbt_ptr=None, momentum=0.0, eps=0.0, seed=None)
        return mean, var

    def apply(self, x, mean, invstd, weight, bias, noise):
        """y = act(w * (x - mean) * invstd + b) with given statistics."""
        xc = x.contiguous() if self.copy else x
        y = torch.empty_like(xc)
        seed, step = noise_call(noise)
        self.k_sync_apply.run(
            x_ptr=xc, y_ptr=y, res_ptr=None, mean_ptr=mean.to(self.acc).contiguous(),
            lo_ptr=None,
            scale_ptr=invstd.to(self.acc).contiguous(), w_ptr=weight, b_ptr=bias, step=step,
            used_ptr=None, save_mean_ptr=None, save_invstd_ptr=None, eps=0.0, seed=seed)
        return y if not self.copy else self._restore(y, x)

    def bwd_reduce(self, dy, x, mean, invstd, weight, bias, noise):
        """[sum(g), sum(g * (x - mean))] per channel ([2, C])."""
        if self.copy:
            x = x.contiguous()
        dyc = dy if dy.stride() == x.stride() else self.lay.like(dy, x)
        sums = x.new_empty((2, self.C), dtype=self.acc)
        seed, step = noise_call(noise)
        ws = None if self.fused else self.workspaces.get()
        self._bwd_launch(False, True, True, raw=True).run(
            dy_ptr=dyc, x_ptr=x, dx_ptr=None, out_ptr=None, dres_ptr=None,
            mean_ptr=mean.to(self.acc).contiguous(),
            scale_ptr=invstd.to(self.acc).contiguous(), w_ptr=weight, b_ptr=bias,
            dw_ptr=sums[1], db_ptr=sums[0],
            ws_ptr=ws.buf if ws is not None else None,
            ticket_ptr=ws.ticket if ws is not None else None, step=step, seed=seed)
        return sums

    def bwd_dx(self, dy, x, mean, invstd, weight, bias, mean_sums, noise):
        """Training dx given [mean(g), mean(g * (x - mean))] over the whole batch."""
        acc = self.acc
        if self.copy:
            x = x.contiguous()
        dyc = dy if dy.stride() == x.stride() else self.lay.like(dy, x)
        mean, invstd = mean.to(acc).contiguous(), invstd.to(acc).contiguous()
        coef = torch.stack([mean_sums[0].to(acc), mean_sums[1].to(acc) * invstd * invstd])
        dx = torch.empty_like(x)
        seed, step = noise_call(noise)
        self.k_dx.run(dy_ptr=dyc, x_ptr=x, dx_ptr=dx, out_ptr=None, dres_ptr=None, mean_ptr=mean,
                      scale_ptr=invstd,
                      w_ptr=weight, b_ptr=bias, coef_ptr=coef.contiguous(), step=step,
                      seed=seed)
        return dx


__all__ = ["BatchNormPlan", "noise_call"]
