"""Fused adapter tower layer (MLoRA / MoE-MLoRA) in Triton: forward and backward.

Computes the function specified by :func:`moefast.reference.adapter.adapter_linear`::

    y = act((x W^T + b) * mask + sum_e g[:, e] * ((x A_e) B_e + c_e))

x ``[N, K]``, W ``[OUT, K]``, b ``[OUT]``, A ``[E, K, R]``, B ``[E, R, OUT]``, c ``[E, OUT]``.

Design (DESIGN.md section 4, NOTES.md): experts are treated as concatenated,
``A_cat [K, E R]`` and ``B_cat [E R, OUT]``, so the expert expansion is extra K-iterations of
the base product and needs no sort by expert:
``sum_e g_e (x A_e) B_e = ((x A_cat) * expand(g)) B_cat``. The stacked tensors are read in place
through their strides (no concatenated copy): column ``c`` of a block of ``EB`` experts maps to
expert ``e0 + c // RP`` and rank index ``c % RP``, with the rank padded to ``RP`` (a power of
two) and ``EB * RP >= 16`` so every ``tl.dot`` dimension is at least 16; padded columns are
masked to zero.

Routing is a compile-time ``MODE``:

- ``GATE``: dense per-sample weights ``g [N, E]`` (MoE-MLoRA).
- ``DOMAIN``: per-sample ids; the gate is the one-hot ``g[n, e] = (domain[n] == e)`` built in
  registers. A block of experts none of whose domains occurs in a tile of rows is skipped, so a
  single-domain batch (the seeds' training loop) costs the base product plus one expert.
- ``EXPERT``: one active expert for every row (the expert stage): only that expert is visited.
- ``NONE``: the base layer only.

Two launches forward: ``u = x A_cat`` (fp32, kept for backward), then
``y = act((x W^T + b) * mask + (u * g) B_cat + g c)``. Backward, with ``dz = dy * act'``:
``dv = dz B_cat^T`` (gives ``du = dv * g`` and ``dg = sum_r u dv + dz c^T``), then
``dx = (dz * mask) W + du A_cat^T``, and the weight gradients ``dW = (dz*mask)^T x``,
``db = sum (dz*mask)``, ``dA_e = x^T du_e``, ``dB_e = (g_e u_e)^T dz``, ``dc = g^T dz``, each
launched only when needed. Weight gradients reduce over N in ``S`` row splits written as fp32
partials and summed by torch in a fixed order: deterministic (no atomics) and parallel at small
tile counts; with one split (large weights, or few rows) the kernel writes the gradient itself.

Numerics: every accumulator is fp32; the rank-space intermediate ``u`` stays fp32 and the gate
is applied in fp32 before the single downcast feeding a bf16 tensor-core product. fp32 inputs
use ``input_precision="ieee"`` (NVIDIA defaults to tf32) so results match torch's fp32 matmul.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Routing", "adapter_linear_bwd", "adapter_linear_fwd"]


class Routing(enum.IntEnum):
    """The compile-time routing mode of the kernels (``MODE``)."""

    NONE = 0
    GATE = 1
    DOMAIN = 2
    EXPERT = 3


# Tile sizes. One fixed configuration: the Triton interpreter cannot autotune, and no GPU was
# available when this was written, so these are the conventional 64-wide tiles (NOTES.md: under
# the interpreter 64-wide blocks are ~30x faster than 16-wide ones). Retune on a GPU with
# bench/test_bench_adapter.py.
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64
# Width of one block of concatenated expert columns (EB experts x RP padded ranks).
BLOCK_R_MAX = 64
# tl.dot needs every dimension >= 16 on NVIDIA GPUs.
MIN_DOT = 16
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_idx, e_ok, stride_gm, stride_ge, stride_d,
               MODE: tl.constexpr):
    """fp32 gate values ``[BLOCK_M, C]`` for experts ``e_idx [C]`` (0 where masked)."""
    ok = row_ok[:, None] & e_ok[None, :]
    if MODE == 1:
        ptrs = g_ptr + offs_m64[:, None] * stride_gm + e_idx[None, :] * stride_ge
        g = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    elif MODE == 2:
        d = tl.load(dom_ptr + offs_m64 * stride_d, mask=row_ok, other=-1)
        g = tl.where(ok & (d[:, None] == e_idx[None, :]), 1.0, 0.0)
    else:
        g = tl.where(ok, 1.0, 0.0)
    return g


@triton.jit
def _block_has_rows(dom_ptr, offs_m64, row_ok, e_first, e_end, stride_d, MODE: tl.constexpr):
    """Whether any valid row of the tile routes to an expert in ``[e_first, e_end)``.

    Only the DOMAIN mode can skip work this way; the other modes only skip empty row tiles.
    """
    if MODE == 2:
        d = tl.load(dom_ptr + offs_m64 * stride_d, mask=row_ok, other=-1)
        hit = row_ok & (d >= e_first) & (d < e_end)
    else:
        hit = row_ok
    return tl.max(hit.to(tl.int32), axis=0) > 0


@triton.jit
def _load_dz(dy_ptrs, y_ptrs, ok, ACT: tl.constexpr):
    """``dz = dy * act'(z)`` in fp32; ReLU's derivative is read off the saved output y."""
    dz = tl.load(dy_ptrs, mask=ok, other=0.0).to(tl.float32)
    if ACT == 1:
        y = tl.load(y_ptrs, mask=ok, other=0.0)
        dz = tl.where(y > 0, dz, 0.0)
    return dz


@triton.jit
def _adapter_down_kernel(
    x_ptr, a_ptr, u_ptr, dom_ptr,
    N, K, R, E_LO, E_HI,
    stride_xm, stride_xk, stride_ae, stride_ak, stride_ar,
    stride_um, stride_ue, stride_ur, stride_d,
    MODE: tl.constexpr, RP: tl.constexpr, EB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """u ``[N, E_HI - E_LO, R]`` fp32 = x A_e for one tile of rows and one block of experts."""
    BR: tl.constexpr = EB * RP
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_m64 = offs_m.to(tl.int64)
    e0 = E_LO + pid_e * EB
    cols = tl.arange(0, BR)
    e_col = e0 + cols // RP
    j_col = cols % RP
    col_ok = (j_col < R) & (e_col < E_HI)
    if _block_has_rows(dom_ptr, offs_m64, row_ok, e0, e0 + EB, stride_d, MODE):
        acc = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptr + e_col[None, :].to(tl.int64) * stride_ae
                         + offs_k[:, None] * stride_ak + j_col[None, :] * stride_ar,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        tl.store(u_ptr + offs_m64[:, None] * stride_um + (e_col - E_LO)[None, :] * stride_ue
                 + j_col[None, :] * stride_ur, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _adapter_fwd_kernel(
    x_ptr, w_ptr, b_ptr, mask_ptr, u_ptr, bm_ptr, c_ptr, g_ptr, dom_ptr, y_ptr,
    N, K, OUT, R, E_LO, E_HI,
    stride_xm, stride_xk, stride_wo, stride_wk, stride_b, stride_mm, stride_mo,
    stride_um, stride_ue, stride_ur, stride_be, stride_br, stride_bo, stride_ce, stride_co,
    stride_gm, stride_ge, stride_d, stride_ym, stride_yo,
    MODE: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    RP: tl.constexpr, EB: tl.constexpr, EC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of y: base product, dropout, adapter, bias, activation."""
    BR: tl.constexpr = EB * RP
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < N
    n_ok = offs_n < OUT
    offs_m64 = offs_m.to(tl.int64)
    tile_ok = row_ok[:, None] & n_ok[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * stride_wo + offs_k[:, None] * stride_wk,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    acc += tl.load(b_ptr + offs_n * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs_m64[:, None] * stride_mm + offs_n[None, :] * stride_mo,
                       mask=tile_ok, other=0.0)
        acc *= keep.to(tl.float32)

    if MODE != 0:
        cols = tl.arange(0, BR)
        for e0 in range(E_LO, E_HI, EB):
            e_col = e0 + cols // RP
            j_col = cols % RP
            col_ok = (j_col < R) & (e_col < E_HI)
            if _block_has_rows(dom_ptr, offs_m64, row_ok, e0, e0 + EB, stride_d, MODE):
                g = _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_col, col_ok,
                               stride_gm, stride_ge, stride_d, MODE)
                u = tl.load(u_ptr + offs_m64[:, None] * stride_um
                            + (e_col - E_LO)[None, :] * stride_ue + j_col[None, :] * stride_ur,
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                # u of a row whose gate is 0 may never have been written (skipped blocks).
                h = tl.where(g != 0.0, u * g, 0.0)
                bt = tl.load(bm_ptr + e_col[:, None].to(tl.int64) * stride_be
                             + j_col[:, None] * stride_br + offs_n[None, :] * stride_bo,
                             mask=col_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(h.to(bt.dtype), bt, acc, input_precision=DOT_PRECISION)
        # sum_e g_e c_e
        if MODE == 2:
            d = tl.load(dom_ptr + offs_m64 * stride_d, mask=row_ok, other=-1)
            d_ok = row_ok & (d >= 0) & (d < E_HI)
            ct = tl.load(c_ptr + d[:, None] * stride_ce + offs_n[None, :] * stride_co,
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            acc += ct.to(tl.float32)
        elif MODE == 3:
            ct = tl.load(c_ptr + E_LO * stride_ce + offs_n * stride_co, mask=n_ok, other=0.0)
            acc += ct.to(tl.float32)[None, :]
        else:
            for e0 in range(0, E_HI, EC):
                e_idx = e0 + tl.arange(0, EC)
                e_ok = e_idx < E_HI
                g = _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_idx, e_ok,
                               stride_gm, stride_ge, stride_d, MODE)
                ct = tl.load(c_ptr + e_idx[:, None] * stride_ce + offs_n[None, :] * stride_co,
                             mask=e_ok[:, None] & n_ok[None, :], other=0.0)
                # A few FMAs per output element: fp32 keeps the gate unrounded in bf16 too.
                acc = tl.dot(g, ct.to(tl.float32), acc, input_precision="ieee")

    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _adapter_bwd_rank_kernel(
    dy_ptr, y_ptr, u_ptr, bm_ptr, c_ptr, g_ptr, dom_ptr, du_ptr, dg_ptr,
    N, OUT, R, E_LO, E_HI,
    stride_dym, stride_dyo, stride_ym, stride_yo, stride_um, stride_ue, stride_ur,
    stride_be, stride_br, stride_bo, stride_ce, stride_co, stride_gm, stride_ge, stride_d,
    stride_dum, stride_due, stride_dur, stride_dgm, stride_dge,
    MODE: tl.constexpr, ACT: tl.constexpr, RP: tl.constexpr, EB: tl.constexpr,
    EBP: tl.constexpr, NEED_DU: tl.constexpr, NEED_DG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Rank-space gradients for a tile of rows and a block of experts.

    ``dv = dz B_cat^T``; writes ``du = dv * g`` (fp32) and, in GATE mode,
    ``dg[:, e] = sum_r u_e dv_e + dz c_e^T``.
    """
    BR: tl.constexpr = EB * RP
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_m64 = offs_m.to(tl.int64)
    e0 = E_LO + pid_e * EB
    cols = tl.arange(0, BR)
    e_col = e0 + cols // RP
    j_col = cols % RP
    col_ok = (j_col < R) & (e_col < E_HI)
    t = tl.arange(0, EBP)
    e_t = e0 + t
    t_ok = (t < EB) & (e_t < E_HI)
    if _block_has_rows(dom_ptr, offs_m64, row_ok, e0, e0 + EB, stride_d, MODE):
        dv = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
        dgc = tl.zeros((BLOCK_M, EBP), dtype=tl.float32)
        for n0 in range(0, OUT, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < OUT
            ok = row_ok[:, None] & n_ok[None, :]
            dz = _load_dz(dy_ptr + offs_m64[:, None] * stride_dym + offs_n[None, :] * stride_dyo,
                          y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yo,
                          ok, ACT)
            bt = tl.load(bm_ptr + e_col[None, :].to(tl.int64) * stride_be
                         + j_col[None, :] * stride_br + offs_n[:, None] * stride_bo,
                         mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            dv = tl.dot(dz.to(bt.dtype), bt, dv, input_precision=DOT_PRECISION)
            if NEED_DG:
                ct = tl.load(c_ptr + e_t[None, :] * stride_ce + offs_n[:, None] * stride_co,
                             mask=n_ok[:, None] & t_ok[None, :], other=0.0)
                dgc = tl.dot(dz, ct.to(tl.float32), dgc, input_precision="ieee")
        ok_r = row_ok[:, None] & col_ok[None, :]
        if NEED_DU:
            g = _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_col, col_ok,
                           stride_gm, stride_ge, stride_d, MODE)
            tl.store(du_ptr + offs_m64[:, None] * stride_dum + (e_col - E_LO)[None, :] * stride_due
                     + j_col[None, :] * stride_dur, dv * g, mask=ok_r)
        if NEED_DG:
            u = tl.load(u_ptr + offs_m64[:, None] * stride_um + (e_col - E_LO)[None, :] * stride_ue
                        + j_col[None, :] * stride_ur, mask=ok_r, other=0.0)
            # Sum each expert's RP columns with a 0/1 segment matrix: a dot keeps every shape
            # >= 16 where a reshape to [BLOCK_M, EB, RP] would not.
            seg = tl.where((cols[:, None] // RP) == t[None, :], 1.0, 0.0)
            dg = tl.dot(u * dv, seg, dgc, input_precision="ieee")
            tl.store(dg_ptr + offs_m64[:, None] * stride_dgm + e_t[None, :] * stride_dge,
                     dg.to(dg_ptr.dtype.element_ty), mask=row_ok[:, None] & t_ok[None, :])


@triton.jit
def _adapter_bwd_input_kernel(
    dy_ptr, y_ptr, mask_ptr, w_ptr, du_ptr, a_ptr, g_ptr, dom_ptr, dx_ptr,
    N, K, OUT, R, E_LO, E_HI,
    stride_dym, stride_dyo, stride_ym, stride_yo, stride_mm, stride_mo, stride_wo, stride_wk,
    stride_dum, stride_due, stride_dur, stride_ae, stride_ak, stride_ar,
    stride_gm, stride_ge, stride_d, stride_dxm, stride_dxk,
    MODE: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    RP: tl.constexpr, EB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``dx = (dz * mask) W + du A_cat^T``: one product over the stacked K-dimension."""
    BR: tl.constexpr = EB * RP
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = offs_m < N
    k_ok = offs_k < K
    offs_m64 = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < OUT
        ok = row_ok[:, None] & n_ok[None, :]
        dz = _load_dz(dy_ptr + offs_m64[:, None] * stride_dym + offs_n[None, :] * stride_dyo,
                      y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yo,
                      ok, ACT)
        if HAS_MASK:
            keep = tl.load(mask_ptr + offs_m64[:, None] * stride_mm + offs_n[None, :] * stride_mo,
                           mask=ok, other=0.0)
            dz *= keep.to(tl.float32)
        wt = tl.load(w_ptr + offs_n[:, None] * stride_wo + offs_k[None, :] * stride_wk,
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dz.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)

    if MODE != 0:
        cols = tl.arange(0, BR)
        for e0 in range(E_LO, E_HI, EB):
            e_col = e0 + cols // RP
            j_col = cols % RP
            col_ok = (j_col < R) & (e_col < E_HI)
            if _block_has_rows(dom_ptr, offs_m64, row_ok, e0, e0 + EB, stride_d, MODE):
                g = _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_col, col_ok,
                               stride_gm, stride_ge, stride_d, MODE)
                du = tl.load(du_ptr + offs_m64[:, None] * stride_dum
                             + (e_col - E_LO)[None, :] * stride_due + j_col[None, :] * stride_dur,
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                du = tl.where(g != 0.0, du, 0.0)
                at = tl.load(a_ptr + e_col[:, None].to(tl.int64) * stride_ae
                             + offs_k[None, :] * stride_ak + j_col[:, None] * stride_ar,
                             mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(du.to(at.dtype), at, acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + offs_m64[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _adapter_bwd_weight_kernel(
    dy_ptr, y_ptr, mask_ptr, x_ptr, dw_ptr, db_ptr,
    N, K, OUT, ROWS_PER_SPLIT,
    stride_dym, stride_dyo, stride_ym, stride_yo, stride_mm, stride_mo, stride_xm, stride_xk,
    stride_dws, stride_dwo, stride_dwk, stride_dbs, stride_dbo,
    ACT: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partials of ``dW = (dz*mask)^T x`` and ``db = sum(dz*mask)`` over one row split."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < OUT
    k_ok = offs_k < K
    row_lo = pid_s * ROWS_PER_SPLIT
    row_hi = tl.minimum(N, row_lo + ROWS_PER_SPLIT)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_hi
        offs_m64 = offs_m.to(tl.int64)
        ok_t = n_ok[:, None] & row_ok[None, :]
        dzt = _load_dz(dy_ptr + offs_n[:, None] * stride_dyo + offs_m64[None, :] * stride_dym,
                       y_ptr + offs_n[:, None] * stride_yo + offs_m64[None, :] * stride_ym,
                       ok_t, ACT)  # [BLOCK_N, BLOCK_M]
        if HAS_MASK:
            keep = tl.load(mask_ptr + offs_n[:, None] * stride_mo + offs_m64[None, :] * stride_mm,
                           mask=ok_t, other=0.0)
            dzt *= keep.to(tl.float32)
        if NEED_DW:
            xt = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dzt.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
        if NEED_DB:
            acc_b += tl.sum(dzt, axis=1)
    if NEED_DW:
        tl.store(dw_ptr + pid_s * stride_dws + offs_n[:, None] * stride_dwo
                 + offs_k[None, :] * stride_dwk, acc.to(dw_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & k_ok[None, :])
    if NEED_DB:
        if pid_k == 0:
            tl.store(db_ptr + pid_s * stride_dbs + offs_n * stride_dbo,
                     acc_b.to(db_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _adapter_bwd_a_kernel(
    x_ptr, du_ptr, g_ptr, dom_ptr, da_ptr,
    N, K, R, E_LO, E_HI, ROWS_PER_SPLIT,
    stride_xm, stride_xk, stride_dum, stride_due, stride_dur, stride_gm, stride_ge, stride_d,
    stride_das, stride_dae, stride_dak, stride_dar,
    MODE: tl.constexpr, RP: tl.constexpr, EB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partials of ``dA_e = x^T du_e`` for a block of K, a block of experts, a row split."""
    BR: tl.constexpr = EB * RP
    pid_k = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    e0 = E_LO + pid_e * EB
    cols = tl.arange(0, BR)
    e_col = e0 + cols // RP
    j_col = cols % RP
    col_ok = (j_col < R) & (e_col < E_HI)
    row_lo = pid_s * ROWS_PER_SPLIT
    row_hi = tl.minimum(N, row_lo + ROWS_PER_SPLIT)
    acc = tl.zeros((BLOCK_K, BR), dtype=tl.float32)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_hi
        offs_m64 = offs_m.to(tl.int64)
        if _block_has_rows(dom_ptr, offs_m64, row_ok, e0, e0 + EB, stride_d, MODE):
            xt = tl.load(x_ptr + offs_m64[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                         mask=k_ok[:, None] & row_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            g = _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_col, col_ok,
                           stride_gm, stride_ge, stride_d, MODE)
            du = tl.load(du_ptr + offs_m64[:, None] * stride_dum
                         + (e_col - E_LO)[None, :] * stride_due + j_col[None, :] * stride_dur,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            du = tl.where(g != 0.0, du, 0.0)
            acc = tl.dot(xt, du.to(xt.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(da_ptr + pid_s * stride_das + (e_col - E_LO)[None, :] * stride_dae
             + offs_k[:, None] * stride_dak + j_col[None, :] * stride_dar,
             acc.to(da_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


@triton.jit
def _adapter_bwd_b_kernel(
    dy_ptr, y_ptr, u_ptr, g_ptr, dom_ptr, dbm_ptr, dc_ptr,
    N, OUT, R, E_LO, E_HI, ROWS_PER_SPLIT,
    stride_dym, stride_dyo, stride_ym, stride_yo, stride_um, stride_ue, stride_ur,
    stride_gm, stride_ge, stride_d,
    stride_dbs, stride_dbe, stride_dbr, stride_dbo, stride_dcs, stride_dce, stride_dco,
    MODE: tl.constexpr, ACT: tl.constexpr, RP: tl.constexpr, EB: tl.constexpr,
    EBP: tl.constexpr, NEED_DBM: tl.constexpr, NEED_DC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partials of ``dB_e = (g_e u_e)^T dz`` and ``dc = g^T dz`` over one row split."""
    BR: tl.constexpr = EB * RP
    pid_e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OUT
    e0 = E_LO + pid_e * EB
    cols = tl.arange(0, BR)
    e_col = e0 + cols // RP
    j_col = cols % RP
    col_ok = (j_col < R) & (e_col < E_HI)
    t = tl.arange(0, EBP)
    e_t = e0 + t
    t_ok = (t < EB) & (e_t < E_HI)
    row_lo = pid_s * ROWS_PER_SPLIT
    row_hi = tl.minimum(N, row_lo + ROWS_PER_SPLIT)
    acc = tl.zeros((BR, BLOCK_N), dtype=tl.float32)
    acc_c = tl.zeros((EBP, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_hi
        offs_m64 = offs_m.to(tl.int64)
        if _block_has_rows(dom_ptr, offs_m64, row_ok, e0, e0 + EB, stride_d, MODE):
            ok = row_ok[:, None] & n_ok[None, :]
            dz = _load_dz(dy_ptr + offs_m64[:, None] * stride_dym + offs_n[None, :] * stride_dyo,
                          y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yo,
                          ok, ACT)
            if NEED_DBM:
                g = _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_col, col_ok,
                               stride_gm, stride_ge, stride_d, MODE)
                u = tl.load(u_ptr + offs_m64[:, None] * stride_um
                            + (e_col - E_LO)[None, :] * stride_ue + j_col[None, :] * stride_ur,
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                h = tl.where(g != 0.0, u * g, 0.0).to(dy_ptr.dtype.element_ty)
                acc = tl.dot(tl.trans(h), dz.to(dy_ptr.dtype.element_ty), acc,
                             input_precision=DOT_PRECISION)
            if NEED_DC:
                gt = _gate_tile(g_ptr, dom_ptr, offs_m64, row_ok, e_t, t_ok,
                                stride_gm, stride_ge, stride_d, MODE)
                acc_c = tl.dot(tl.trans(gt), dz, acc_c, input_precision="ieee")
    if NEED_DBM:
        tl.store(dbm_ptr + pid_s * stride_dbs + (e_col - E_LO)[:, None] * stride_dbe
                 + j_col[:, None] * stride_dbr + offs_n[None, :] * stride_dbo,
                 acc.to(dbm_ptr.dtype.element_ty), mask=col_ok[:, None] & n_ok[None, :])
    if NEED_DC:
        tl.store(dc_ptr + pid_s * stride_dcs + (e_t - E_LO)[:, None] * stride_dce
                 + offs_n[None, :] * stride_dco, acc_c.to(dc_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Routing and expert blocking of one call."""

    mode: Routing
    e_lo: int  # the experts visited are [e_lo, e_hi)
    e_hi: int
    rank_pad: int  # RP: the rank rounded up to a power of two
    experts_per_block: int  # EB: EB * RP >= 16 columns per block of concatenated experts

    @property
    def num_visited(self) -> int:
        return self.e_hi - self.e_lo

    @property
    def num_blocks(self) -> int:
        return triton.cdiv(self.num_visited, self.experts_per_block)

    @property
    def gate_block(self) -> int:
        """EBP: the width of a block's gate tile in the c-products (>= 16 for tl.dot)."""
        return max(MIN_DOT, self.experts_per_block)


def _plan(num_experts: int, rank: int, gate: torch.Tensor | None, domain: torch.Tensor | None,
          expert: int | None) -> _Plan:
    if gate is not None:
        mode, lo, hi = Routing.GATE, 0, num_experts
    elif domain is not None:
        mode, lo, hi = Routing.DOMAIN, 0, num_experts
    elif expert is not None:
        mode, lo, hi = Routing.EXPERT, expert, expert + 1
    else:
        mode, lo, hi = Routing.NONE, 0, 0
    rank_pad = triton.next_power_of_2(rank)
    fill = max(1, BLOCK_R_MAX // rank_pad)  # experts that fit one column block
    need = max(1, MIN_DOT // rank_pad)  # experts needed for a 16-wide block
    eb = max(need, min(triton.next_power_of_2(max(hi - lo, 1)), fill))
    return _Plan(mode, lo, hi, rank_pad, eb)


def _dot_precision(dtype: torch.dtype) -> str:
    # "ieee" reaches only fp32 operands; bf16 products use tensor cores either way.
    return "ieee"


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _num_splits(rows: int, tiles: int, device: torch.device) -> int:
    """Row splits for the weight gradients, so that small weights still fill the GPU.

    Aim for about two programs per SM, but keep at least 8 row tiles per split (each extra
    split costs one fp32 partial of the weight and a reduction). Under the interpreter programs run one after another:
    one split.
    """
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(2 * sms, max(tiles, 1))
    most = max(1, triton.cdiv(rows, 8 * BLOCK_M))
    return max(1, min(want, most))


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _act(relu: bool) -> int:
    return 1 if relu else 0


def _rows_per_split(row_tiles: int, splits: int) -> int:
    return triton.cdiv(row_tiles, splits) * BLOCK_M


def _partials(splits: int, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``[splits, *shape]`` buffer for a gradient reduced over row splits.

    With one split the kernel writes the final gradient in the parameter's dtype (no reduction
    launch, no cast); with several, fp32 partials that :func:`_reduce` sums in a fixed order.
    """
    return torch.empty((splits, *shape), dtype=dtype if splits == 1 else torch.float32,
                       device=device)


def _reduce(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if partials.shape[0] == 1:
        return partials[0]
    return partials.sum(0).to(dtype)


def _scatter_experts(visited: torch.Tensor, plan: _Plan, num_experts: int) -> torch.Tensor:
    """The full ``[E, ...]`` stack from the visited experts' gradients (zero elsewhere)."""
    if plan.e_lo == 0 and plan.e_hi == num_experts:
        return visited
    full = visited.new_zeros((num_experts, *visited.shape[1:]))
    full[plan.e_lo : plan.e_hi] = visited
    return full


def adapter_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_c: torch.Tensor,
    gate: torch.Tensor | None,
    domain: torch.Tensor | None,
    expert: int | None,
    dropout_mask: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher; inputs as :func:`moefast.reference.adapter.adapter_linear` (validated).

    Returns ``y [N, OUT]`` in x's dtype and ``u [N, V, R]`` fp32 (``u[:, v] = x A_{e_lo + v}``
    for the V visited experts; rows an expert does not serve in DOMAIN mode are unspecified),
    which backward needs.
    """
    n, k = x.shape
    out = weight.shape[0]
    num_experts, _, rank = lora_A.shape
    plan = _plan(num_experts, rank, gate, domain, expert)
    y = torch.empty((n, out), dtype=x.dtype, device=x.device)
    u = torch.empty((n, plan.num_visited, rank), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, u
    prec = _dot_precision(x.dtype)
    dummy = x
    g_t = gate if gate is not None else dummy
    d_t = domain if domain is not None else dummy
    m_t = dropout_mask if dropout_mask is not None else dummy
    sd = _strides(domain, 1)
    sg = _strides(gate, 2)
    if plan.mode is not Routing.NONE:
        _adapter_down_kernel[(triton.cdiv(n, BLOCK_M), plan.num_blocks)](
            x, lora_A, u, d_t,
            n, k, rank, plan.e_lo, plan.e_hi,
            *x.stride(), *lora_A.stride(), *u.stride(), *sd,
            MODE=int(plan.mode), RP=plan.rank_pad, EB=plan.experts_per_block,
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, DOT_PRECISION=prec, num_warps=NUM_WARPS,
        )
    _adapter_fwd_kernel[(triton.cdiv(n, BLOCK_M), triton.cdiv(out, BLOCK_N))](
        x, weight, bias, m_t, u, lora_B, lora_c, g_t, d_t, y,
        n, k, out, rank, plan.e_lo, plan.e_hi,
        *x.stride(), *weight.stride(), *bias.stride(), *_strides(dropout_mask, 2),
        *u.stride(), *lora_B.stride(), *lora_c.stride(), *sg, *sd, *y.stride(),
        MODE=int(plan.mode), ACT=_act(relu), HAS_MASK=dropout_mask is not None,
        RP=plan.rank_pad, EB=plan.experts_per_block, EC=MIN_DOT,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=prec,
        num_warps=NUM_WARPS,
    )
    return y, u


def adapter_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_c: torch.Tensor,
    gate: torch.Tensor | None,
    domain: torch.Tensor | None,
    expert: int | None,
    dropout_mask: torch.Tensor | None,
    relu: bool,
    needs: tuple[bool, bool, bool, bool, bool, bool, bool],
) -> list[torch.Tensor | None]:
    """Backward launcher: gradients ``[dx, dW, db, dA, dB, dc, dg]``, None where not needed.

    ``needs`` flags the same seven in that order (``ctx.needs_input_grad``); a frozen input
    costs no kernel. ``y`` and ``u`` are the forward's outputs. dA / dB / dc have the shapes of
    the full stacks (zero for experts this call did not visit); ``dg`` exists in GATE mode only.
    """
    need_dx, need_dw, need_db, need_da, need_dbm, need_dc, need_dg = needs
    n, k = x.shape
    out = weight.shape[0]
    num_experts, _, rank = lora_A.shape
    plan = _plan(num_experts, rank, gate, domain, expert)
    adapter = plan.mode is not Routing.NONE
    need_dg = need_dg and gate is not None
    dev = x.device
    grads: list[torch.Tensor | None] = [None] * 7
    if n == 0 or not adapter:
        # Nothing to reduce, or an adapter this call did not use: its gradient is zero.
        for i, (flag, like) in enumerate(zip(needs, (x, weight, weight[:, 0], lora_A, lora_B,
                                                     lora_c, gate), strict=True)):
            if flag and like is not None and (i >= 3 or n == 0):
                grads[i] = torch.zeros(like.shape, dtype=like.dtype, device=dev)
        if n == 0:
            return grads

    prec = _dot_precision(x.dtype)
    act = _act(relu)
    dummy = x
    g_t = gate if gate is not None else dummy
    d_t = domain if domain is not None else dummy
    m_t = dropout_mask if dropout_mask is not None else dummy
    sd, sg, sm = _strides(domain, 1), _strides(gate, 2), _strides(dropout_mask, 2)
    has_mask = dropout_mask is not None
    eb, rp = plan.experts_per_block, plan.rank_pad
    row_tiles = triton.cdiv(n, BLOCK_M)

    need_du = adapter and (need_dx or need_da)
    du = torch.empty((n, plan.num_visited, rank), dtype=torch.float32, device=dev)
    if need_du or need_dg:
        dg = du  # a placeholder pointer unless dg is needed
        if need_dg:
            assert gate is not None
            dg = torch.empty_like(gate, memory_format=torch.contiguous_format)
        _adapter_bwd_rank_kernel[(row_tiles, plan.num_blocks)](
            dy, y, u, lora_B, lora_c, g_t, d_t, du, dg,
            n, out, rank, plan.e_lo, plan.e_hi,
            *dy.stride(), *y.stride(), *u.stride(), *lora_B.stride(), *lora_c.stride(),
            *sg, *sd, *du.stride(), *(dg.stride()[:2]),
            MODE=int(plan.mode), ACT=act, RP=rp, EB=eb, EBP=plan.gate_block,
            NEED_DU=need_du, NEED_DG=need_dg,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=prec, num_warps=NUM_WARPS,
        )
        if need_dg:
            grads[6] = dg

    if need_dx:
        dx = torch.empty((n, k), dtype=x.dtype, device=dev)
        _adapter_bwd_input_kernel[(row_tiles, triton.cdiv(k, BLOCK_K))](
            dy, y, m_t, weight, du, lora_A, g_t, d_t, dx,
            n, k, out, rank, plan.e_lo, plan.e_hi,
            *dy.stride(), *y.stride(), *sm, *weight.stride(), *du.stride(), *lora_A.stride(),
            *sg, *sd, *dx.stride(),
            MODE=int(plan.mode), ACT=act, HAS_MASK=has_mask, RP=rp, EB=eb,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=prec,
            num_warps=NUM_WARPS,
        )
        grads[0] = dx

    if need_dw or need_db:
        k_tiles = triton.cdiv(k, BLOCK_K) if need_dw else 1
        splits = _num_splits(n, triton.cdiv(out, BLOCK_N) * k_tiles, dev)
        dw_part = _partials(splits, (out, k) if need_dw else (1, 1), x.dtype, dev)
        db_part = _partials(splits, (out,) if need_db else (1,), x.dtype, dev)
        _adapter_bwd_weight_kernel[(triton.cdiv(out, BLOCK_N), k_tiles, splits)](
            dy, y, m_t, x, dw_part, db_part,
            n, k, out, _rows_per_split(row_tiles, splits),
            *dy.stride(), *y.stride(), *sm, *x.stride(), *dw_part.stride(), *db_part.stride(),
            ACT=act, HAS_MASK=has_mask, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=prec,
            num_warps=NUM_WARPS,
        )
        if need_dw:
            grads[1] = _reduce(dw_part, x.dtype)
        if need_db:
            grads[2] = _reduce(db_part, x.dtype)

    if adapter and need_da:
        splits = _num_splits(n, triton.cdiv(k, BLOCK_K) * plan.num_blocks, dev)
        da_part = _partials(splits, (plan.num_visited, k, rank), x.dtype, dev)
        _adapter_bwd_a_kernel[(triton.cdiv(k, BLOCK_K), plan.num_blocks, splits)](
            x, du, g_t, d_t, da_part,
            n, k, rank, plan.e_lo, plan.e_hi, _rows_per_split(row_tiles, splits),
            *x.stride(), *du.stride(), *sg, *sd, *da_part.stride(),
            MODE=int(plan.mode), RP=rp, EB=eb,
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, DOT_PRECISION=prec, num_warps=NUM_WARPS,
        )
        grads[3] = _scatter_experts(_reduce(da_part, x.dtype), plan, num_experts)

    if adapter and (need_dbm or need_dc):
        splits = _num_splits(n, plan.num_blocks * triton.cdiv(out, BLOCK_N), dev)
        nv = plan.num_visited
        dbm_part = _partials(splits, (nv, rank, out) if need_dbm else (1, 1, 1), x.dtype, dev)
        dc_part = _partials(splits, (nv, out) if need_dc else (1, 1), x.dtype, dev)
        _adapter_bwd_b_kernel[(plan.num_blocks, triton.cdiv(out, BLOCK_N), splits)](
            dy, y, u, g_t, d_t, dbm_part, dc_part,
            n, out, rank, plan.e_lo, plan.e_hi, _rows_per_split(row_tiles, splits),
            *dy.stride(), *y.stride(), *u.stride(), *sg, *sd,
            *dbm_part.stride(), *dc_part.stride(),
            MODE=int(plan.mode), ACT=act, RP=rp, EB=eb, EBP=plan.gate_block,
            NEED_DBM=need_dbm, NEED_DC=need_dc,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=prec, num_warps=NUM_WARPS,
        )
        if need_dbm:
            grads[4] = _scatter_experts(_reduce(dbm_part, x.dtype), plan, num_experts)
        if need_dc:
            grads[5] = _scatter_experts(_reduce(dc_part, x.dtype), plan, num_experts)
    return grads

