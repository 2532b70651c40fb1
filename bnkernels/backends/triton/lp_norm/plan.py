"""The Triton l_p normalization plan: one signature's launches, resolved once (see
:mod:`.kernels`)."""

from __future__ import annotations

import functools

import torch

from ...plan import BasePlan, Signature, Workspaces
from .. import common as tc
from ..affine import FROM_LP_SCALE, INVSTD, affine_apply_kernel, affine_dx_kernel
from ..launch import Launch
from .kernels import (
    _lp_bwd_dx_kernel,
    _lp_bwd_kernel,
    _lp_fused_fwd_kernel,
    _lp_stats_kernel,
    _p_code,
)

_FUSED_FWD_CALL = ("x_ptr", "y_ptr", "mean_ptr", "scale_ptr", "rmean_ptr", "rscale_ptr", "w_ptr",
                   "b_ptr", "nbt_ptr", "momentum", "eps")
_STATS_CALL = ("x_ptr", "mean_ptr", "scale_ptr", "rmean_ptr", "rscale_ptr", "ws_ptr",
               "ticket_ptr", "nbt_ptr", "momentum", "eps")
_BWD_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "mean_ptr", "scale_ptr", "w_ptr", "dw_ptr", "db_ptr",
             "ws_ptr", "ticket_ptr", "eps")
# The shared affine kernels (..affine) without a residual or an activation
_APPLY_CALL = ("x_ptr", "y_ptr", "mean_ptr", "scale_ptr", "w_ptr", "b_ptr", "save_mean_ptr",
               "save_invstd_ptr", "eps")
_DX_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "mean_ptr", "scale_ptr", "w_ptr", "b_ptr")
_LP_DX_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "mean_ptr", "scale_ptr", "coef_ptr")


class _Workspace:
    """Partials ([4, C, SPLIT]), per-channel results ([4, C]: 1/(s + eps) in the forward, the
    dx coefficients in the backward) and ticket counters."""

    def __init__(self, lay, cfg, acc):
        n = 4 * lay.C * cfg.split + 4 * lay.C
        self.buf = torch.empty(n, device=lay.device, dtype=acc)
        self.ticket = torch.zeros(cfg.groups, device=lay.device, dtype=torch.int32)
        self.vec = self.buf[4 * lay.C * cfg.split:]


class LpNormPlan(BasePlan):
    """Everything about an l_p normalization call that depends only on its
    :class:`Signature`, resolved once (as :class:`~..batch_norm.plan.BatchNormPlan`).

    Eval mode is BatchNorm's eval with invstd = 1/(running_scale + eps): the forward is the
    shared affine apply kernel (which snapshots the mean and 1/(s + eps) it used), the
    backward the shared affine dx kernel or BatchNorm's eval reduction."""

    def __init__(self, sig: Signature):
        lay, acc = self._resolve(sig)
        self.ncs = lay.kind == "ncs"
        acfg = tc.apply_config(lay, itemsize=sig.dtype.itemsize)
        self.ew_grid, cols_on_x = tc.ew_grid(lay, acfg)
        self.ew = dict(ROWS=lay.rows, COLS=lay.cols, C=lay.C, BLOCK_R=acfg.block_r,
                       BLOCK_K=acfg.block_k, CHAN_ON_ROWS=self.ncs, ACC=tc.tl_dtype(acc),
                       INT64=lay.int64, ALIGN=tc.row_align(lay.cols), COLS_ON_X=cols_on_x)
        self.ew_warps = acfg.num_warps
        self._bwd_launches: dict = {}
        if not sig.training:
            self.k_eval = self._apply_launch(FROM_LP_SCALE)
            self.k_eval_save = self._apply_launch(FROM_LP_SCALE)
            return
        self.fused = tc.strategy(lay) == "fused"
        self.cfg = cfg = tc.reduce_config(lay, fused=self.fused, itemsize=sig.dtype.itemsize)
        self.centered = bool(sig.centered)
        self.P = _p_code(sig.p)
        self.shape = tc.reduce_shape(lay, cfg)
        self.grid = tc.check_grid((cfg.groups, cfg.split), "reduction launch")
        flags = dict(P=self.P, ACC=tc.tl_dtype(acc), INT64=lay.int64,
                     ALIGN=tc.row_align(lay.cols), M_F=float(lay.M))
        self.common = dict(flags, **self.shape, FUSED=self.fused, CENTERED=self.centered)
        if self.fused:  # (the one-pass kernel takes a channel group's units whole)
            shape = {k: v for k, v in self.shape.items() if k not in ("CHUNK", "SPLIT")}
            self.k_fwd = [self._launch(_lp_fused_fwd_kernel, self.grid, cfg.num_warps,
                                       _FUSED_FWD_CALL, dict(flags, **shape, PAIR=True,
                                                             CENTERED=self.centered))]
        else:  # the phases of the reduction (uncentered: one; centered: mean, then scale)
            self.k_fwd = [self._launch(_lp_stats_kernel, self.grid, cfg.num_warps, _STATS_CALL,
                                       dict(flags, **self.shape, PAIR=True, PHASE=phase))
                          for phase in ((1, 2) if self.centered else (0,))]
            self.k_apply = self._apply_launch(INVSTD)
        self.workspaces = Workspaces(lay.device, lambda: _Workspace(lay, cfg, acc))

    def _launch(self, kernel, grid, num_warps, call, consts):
        return Launch(kernel, grid, num_warps, consts, call, device=self.lay.device)

    def _apply_launch(self, scale_from):
        consts = dict(self.ew, SCALE_FROM=scale_from, RELU=False, res_ptr=None, lo_ptr=None)
        return self._launch(affine_apply_kernel, self.ew_grid, self.ew_warps, _APPLY_CALL,
                            consts)

    def _bwd_launch(self, need_dx, need_dw, need_db):
        key = (need_dx, need_dw, need_db)
        launch = self._bwd_launches.get(key)
        if launch is None:
            launch = self._bwd_launches[key] = self._launch(
                _lp_bwd_kernel, self.grid, self.cfg.num_warps, _BWD_CALL,
                dict(self.common, WRITE_DX=need_dx))
        return launch

    @functools.cached_property
    def k_dx(self):
        """The split training backward's dx launch."""
        consts = dict(self.ew, P=self.P, CENTERED=self.centered)
        return self._launch(_lp_bwd_dx_kernel, self.ew_grid, self.ew_warps, _LP_DX_CALL, consts)

    @functools.cached_property
    def k_eval_dx(self):
        """Eval dx alone: BatchNorm's eval dx kernel (invstd = the snapshot 1/(s + eps))."""
        consts = dict(self.ew, SCALE_FROM=INVSTD, RELU=False, eps=None, out_ptr=None,
                      dres_ptr=None, coef_ptr=None)
        return self._launch(affine_dx_kernel, self.ew_grid, self.ew_warps, _DX_CALL, consts)

    @functools.cached_property
    def eval_bn(self):
        """Eval with dweight or dbias wanted: BatchNorm's eval plan (its reduction)."""
        from ..batch_norm.plan import BatchNormPlan

        return BatchNormPlan(self.sig._replace(op="batch_norm", p=None, centered=None,
                                               counter=False))

    def forward(self, x, weight, bias, call, need_saved=True, residual=None):  # no residual
        """``(y, a, b, None)``: the batch mean and s_p in training; in eval mode snapshots of
        running_mean and 1/(running_scale + eps) (if ``need_saved``), for BatchNorm's eval
        backward."""
        running_mean, running_scale, _, momentum, eps, _, counter = call
        xc = x.contiguous() if self.copy else x
        y = torch.empty_like(xc)
        if not self.training:
            if need_saved:
                mean = xc.new_empty(self.C, dtype=self.acc)
                inv = xc.new_empty(self.C, dtype=self.acc)
                launch = self.k_eval_save
            else:
                mean = inv = None
                launch = self.k_eval
            launch.run(x_ptr=xc, y_ptr=y, mean_ptr=running_mean, scale_ptr=running_scale,
                       w_ptr=weight, b_ptr=bias, save_mean_ptr=mean, save_invstd_ptr=inv,
                       eps=eps)
            return (y if not self.copy else self.lay.restore(y, x)), mean, inv, None
        mean = xc.new_empty(self.C, dtype=self.acc)
        scale = xc.new_empty(self.C, dtype=self.acc)
        if self.fused:
            self.k_fwd[0].run(x_ptr=xc, y_ptr=y, mean_ptr=mean, scale_ptr=scale,
                              rmean_ptr=running_mean, rscale_ptr=running_scale, w_ptr=weight,
                              b_ptr=bias, nbt_ptr=counter, momentum=momentum, eps=eps)
        else:
            ws = self.workspaces.get()
            for launch in self.k_fwd:
                launch.run(x_ptr=xc, mean_ptr=mean, scale_ptr=scale, rmean_ptr=running_mean,
                           rscale_ptr=running_scale, ws_ptr=ws.buf, ticket_ptr=ws.ticket,
                           nbt_ptr=counter, momentum=momentum, eps=eps)
            self.k_apply.run(x_ptr=xc, y_ptr=y, mean_ptr=mean, scale_ptr=ws.vec, w_ptr=weight,
                             b_ptr=bias, save_mean_ptr=None, save_invstd_ptr=None, eps=eps)
        return (y if not self.copy else self.lay.restore(y, x)), mean, scale, None

    def backward(self, dy, x, weight, bias, saved, needs):
        """``(dx, dweight, dbias)``; ``a, b``: the saved mean and s_p, or (eval) the saved mean
        and 1/(s_p + eps)."""
        a, b, eps = saved[0], saved[1], saved[2]
        need_dx, need_dw, need_db = needs
        need_dw = need_dw and weight is not None
        need_db = need_db and bias is not None
        if not (need_dx or need_dw or need_db):
            return None, None, None
        if not self.training:
            if need_dw or need_db:
                return self.eval_bn.backward(dy, x, weight, bias, saved, needs)
            if self.copy:
                x = x.contiguous()
            dyc = dy if dy.stride() == x.stride() else self.lay.like(dy, x)
            dx = torch.empty_like(x)
            self.k_eval_dx.run(dy_ptr=dyc, x_ptr=x, dx_ptr=dx, mean_ptr=a, scale_ptr=b,
                               w_ptr=weight, b_ptr=bias)
            return dx, None, None
        if self.copy:
            x = x.contiguous()
        dyc = dy if dy.stride() == x.stride() else self.lay.like(dy, x)
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.empty_like(weight) if need_dw else None
        db = torch.empty_like(bias) if need_db else None
        ws = None if self.fused else self.workspaces.get()
        self._bwd_launch(need_dx, need_dw, need_db).run(
            dy_ptr=dyc, x_ptr=x, dx_ptr=dx if self.fused else None, mean_ptr=a, scale_ptr=b,
            w_ptr=weight, dw_ptr=dw, db_ptr=db, ws_ptr=ws.buf if ws is not None else None,
            ticket_ptr=ws.ticket if ws is not None else None, eps=eps)
        if need_dx and not self.fused:
            self.k_dx.run(dy_ptr=dyc, x_ptr=x, dx_ptr=dx, mean_ptr=a, scale_ptr=b,
                          coef_ptr=ws.vec)
        return dx, dw, db


__all__ = ["LpNormPlan"]
