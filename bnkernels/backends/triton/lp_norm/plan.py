"""The Triton l_p normalization plan: one signature's launches, resolved once (see
:mod:`.kernels`)."""

from __future__ import annotations

import functools

import torch

from ...plan import BasePlan, Signature, Workspaces
from ..batch_norm.kernels import FROM_LP_SCALE, INVSTD, _bn_apply_kernel, _bn_bwd_dx_kernel
from ..batch_norm.plan import _APPLY_CALL as _BN_APPLY_CALL
from ..batch_norm.plan import _DX_CALL as _BN_DX_CALL
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
from .kernels import (
    _lp_bwd_dx_kernel,
    _lp_bwd_kernel,
    _lp_fwd_kernel,
    _p_code,
)

_FWD_CALL = ("x_ptr", "y_ptr", "mean_ptr", "scale_ptr", "rmean_ptr", "rscale_ptr", "w_ptr",
             "b_ptr", "ws_ptr", "ticket_ptr", "nbt_ptr", "momentum", "eps")
_BWD_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "mean_ptr", "scale_ptr", "w_ptr", "dw_ptr", "db_ptr",
             "ws_ptr", "ticket_ptr", "eps")
# BatchNorm's elementwise kernels without a residual (its pointers are constexpr None here)
_APPLY_CALL = tuple(n for n in _BN_APPLY_CALL if n != "res_ptr")
_DX_CALL = tuple(n for n in _BN_DX_CALL if n not in ("out_ptr", "dres_ptr"))
_LP_DX_CALL = ("dy_ptr", "x_ptr", "dx_ptr", "mean_ptr", "scale_ptr", "coef_ptr")
_EW_NO_NOISE = dict(NOISY=False, STEP_PTR=False, RELU=False, n_mu=None, n_sigma=None, r_mu=None,
                    r_sigma=None)


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

    Eval mode is BatchNorm's eval with invstd = 1/(running_scale + eps): the forward is
    BatchNorm's apply kernel (which snapshots the mean and 1/(s + eps) it used), the backward
    BatchNorm's eval dx kernel or reduction."""

    def __init__(self, sig: Signature):
        lay, acc = self._resolve(sig)
        self.ncs = lay.kind == "ncs"
        acfg = apply_config(lay, itemsize=sig.dtype.itemsize)
        self.ew_grid, cols_on_x = ew_grid(lay, acfg)
        self.ew = dict(ROWS=lay.rows, COLS=lay.cols, C=lay.C, BLOCK_R=acfg.block_r,
                       BLOCK_K=acfg.block_k, CHAN_ON_ROWS=self.ncs, ACC=tl_dtype(acc),
                       INT64=lay.int64, ALIGN=row_align(lay.cols), COLS_ON_X=cols_on_x)
        self.ew_warps = acfg.num_warps
        self.has = dict(HAS_W=sig.has_weight, HAS_B=sig.has_bias)
        self._bwd_launches: dict = {}
        if not sig.training:
            self.k_eval = self._apply_launch(FROM_LP_SCALE, SAVE_STATS=False)
            self.k_eval_save = self._apply_launch(FROM_LP_SCALE, SAVE_STATS=True)
            return
        self.fused = strategy(lay) == "fused"
        self.cfg = cfg = reduce_config(lay, fused=self.fused, itemsize=sig.dtype.itemsize)
        self.centered = bool(sig.centered)
        self.P = _p_code(sig.p)
        self.shape = reduce_shape(lay, cfg)
        self.grid = check_grid((cfg.groups, cfg.split), "reduction launch")
        flags = dict(P=self.P, FUSED=self.fused, CENTERED=self.centered, ACC=tl_dtype(acc),
                     INT64=lay.int64, ALIGN=row_align(lay.cols), M_F=float(lay.M))
        self.common = dict(flags, **self.shape)
        fwd = dict(flags, **self.shape, UPDATE=sig.has_running, COUNT=sig.counter, **self.has,
                   PAIR=True)
        if self.fused:
            self.k_fwd = [self._launch(_lp_fwd_kernel, self.grid, cfg.num_warps, _FWD_CALL,
                                       dict(fwd, PHASE=0))]
        else:  # the phases of the reduction (uncentered: one; centered: mean, then scale)
            self.k_fwd = [self._launch(_lp_fwd_kernel, self.grid, cfg.num_warps, _FWD_CALL,
                                       dict(fwd, PHASE=phase))
                          for phase in ((1, 2) if self.centered else (0,))]
            self.k_apply = self._apply_launch(INVSTD, SAVE_STATS=False)
        self.workspaces = Workspaces(lay.device, lambda: _Workspace(lay, cfg, acc))

    def _launch(self, kernel, grid, num_warps, call, consts):
        return Launch(kernel, grid, num_warps, consts, call, device=self.lay.device)

    def _apply_launch(self, scale_from, SAVE_STATS):
        consts = dict(self.ew, **self.has, **_EW_NO_NOISE, S=self.lay.S, SCALE_FROM=scale_from,
                      HAS_LO=False, SAVE_STEP=False, SAVE_STATS=SAVE_STATS, res_ptr=None,
                      HAS_RES=False)
        return self._launch(_bn_apply_kernel, self.ew_grid, self.ew_warps, _APPLY_CALL, consts)

    def _bwd_launch(self, need_dx, need_dw, need_db):
        key = (need_dx, need_dw, need_db)
        launch = self._bwd_launches.get(key)
        if launch is None:
            consts = dict(self.common, HAS_W=self.sig.has_weight, WRITE_DX=need_dx,
                          WRITE_DW=need_dw, WRITE_DB=need_db)
            launch = self._bwd_launches[key] = self._launch(
                _lp_bwd_kernel, self.grid, self.cfg.num_warps, _BWD_CALL, consts)
        return launch

    @functools.cached_property
    def k_dx(self):
        """The split training backward's dx launch."""
        consts = dict(self.ew, P=self.P, CENTERED=self.centered)
        return self._launch(_lp_bwd_dx_kernel, self.ew_grid, self.ew_warps, _LP_DX_CALL, consts)

    @functools.cached_property
    def k_eval_dx(self):
        """Eval dx alone: BatchNorm's eval dx kernel (invstd = the snapshot 1/(s + eps))."""
        consts = dict(self.ew, **self.has, **_EW_NO_NOISE, S=self.lay.S, TRAINING=False,
                      SCALE_FROM=INVSTD, eps=None, out_ptr=None, dres_ptr=None, OUT_MASK=False)
        return self._launch(_bn_bwd_dx_kernel, self.ew_grid, self.ew_warps, _DX_CALL, consts)

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
            launch.run(x_ptr=xc, y_ptr=y, mean_ptr=running_mean, lo_ptr=None,
                       scale_ptr=running_scale, w_ptr=weight, b_ptr=bias, step=None,
                       used_ptr=None, save_mean_ptr=mean, save_invstd_ptr=inv, eps=eps,
                       seed=None)
            return (y if not self.copy else self.lay.restore(y, x)), mean, inv, None
        mean = xc.new_empty(self.C, dtype=self.acc)
        scale = xc.new_empty(self.C, dtype=self.acc)
        if self.fused:
            self.k_fwd[0].run(x_ptr=xc, y_ptr=y, mean_ptr=mean, scale_ptr=scale,
                              rmean_ptr=running_mean, rscale_ptr=running_scale, w_ptr=weight,
                              b_ptr=bias, ws_ptr=None, ticket_ptr=None, nbt_ptr=counter,
                              momentum=momentum, eps=eps)
        else:
            ws = self.workspaces.get()
            for launch in self.k_fwd:
                launch.run(x_ptr=xc, y_ptr=None, mean_ptr=mean, scale_ptr=scale,
                           rmean_ptr=running_mean, rscale_ptr=running_scale, w_ptr=weight,
                           b_ptr=bias, ws_ptr=ws.buf, ticket_ptr=ws.ticket, nbt_ptr=counter,
                           momentum=momentum, eps=eps)
            self.k_apply.run(x_ptr=xc, y_ptr=y, mean_ptr=mean, lo_ptr=None, scale_ptr=ws.vec,
                             w_ptr=weight, b_ptr=bias, step=None, used_ptr=None,
                             save_mean_ptr=None, save_invstd_ptr=None, eps=eps, seed=None)
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
                               w_ptr=weight, b_ptr=bias, coef_ptr=None, step=None, seed=None)
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
