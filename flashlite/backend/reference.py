"""The reference as a backend: the oracle's plain PyTorch (float32 math), differentiable by autograd.

It runs everywhere and serves every pattern at O(Nq·Nk) memory. Its plan is the pattern itself
(the dense mask); being plain PyTorch it needs no custom op: autograd differentiates it. A packed
batch runs one oracle call per sequence (its own pattern, positions and ALiBi slopes).
"""
from __future__ import annotations

import torch

from .. import reference
from ..core.packed import Packed
from .base import Backend


def _slopes_of(alibi_slopes, sequence: int):
    """A packed call's slopes for one sequence: ``[Hq]`` shared, or row s of ``[S, Hq]``."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[sequence]


def _rows_mask(row_keep):
    """A head mask's rows (uint8 ``[B, Hq, Nq]``) as the oracle's dense mask ``[B, Hq, Nq, 1]``."""
    return None if row_keep is None else row_keep[..., None].bool()


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    engines = ("tile", "gather")
    differentiable = True
    packed_tiles = True
    dropout = True
    stats = True
    # The oracle applies a bool head mask as a mask on its dense scores (plan.row_keep): a masked
    # head sees no key. (Dense math: it is the O(N²) oracle, not a kernel.)
    head_mask = ("tile", "gather")

    def forward(self, plan, q, k, v, scale, softcap, alibi_slopes, dropout=None, stats=None):
        p, seed = dropout or (0.0, 0)
        if isinstance(plan.pattern, Packed):
            return self._packed_forward(plan.pattern, q, k, v, scale, softcap, alibi_slopes, p, seed, stats,
                                        plan.row_keep)
        kw = dict(scale=scale, softcap=softcap or None, alibi_slopes=alibi_slopes, dropout_p=p, dropout_seed=seed,
                  mask=_rows_mask(plan.row_keep))
        if stats is not None:
            return reference.attention_stats(q, k, v, plan.pattern, sink_tokens=stats, **kw)
        return reference.attention(q, k, v, plan.pattern, return_lse=True, **kw)

    def backward(self, plan, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes, dropout=None, entropy=None):
        p, seed = dropout or (0.0, 0)
        if isinstance(plan.pattern, Packed):
            return self._packed_backward(plan.pattern, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes,
                                         p, seed, entropy)
        return reference.attention_backward(grad_out, q, k, v, out, lse, plan.pattern, scale=scale,
                                            softcap=softcap or None, alibi_slopes=alibi_slopes, dropout_p=p,
                                            dropout_seed=seed, entropy_terms=entropy)

    @staticmethod
    def _packed_forward(pattern: Packed, q, k, v, scale, softcap, alibi_slopes, p=0.0, seed=0, stats=None,
                        row_keep=None):
        outs, lses, planes = [], [], []
        total = (1, q.shape[1], q.shape[2], k.shape[2])  # the packed [1, Hq, Tq, Tk] the mask indexes
        for s in pattern.sequences():
            rows, keys = slice(s.q_start, s.q_end), slice(s.k_start, s.k_end)
            if s.q_end == s.q_start:
                continue
            if s.k_end == s.k_start:  # no key: zeros, lse = -inf (and the autograd links kept)
                outs.append(q[:, :, rows] * 0)
                lses.append(torch.full((1, q.shape[1], s.q_end - s.q_start), float("-inf"), device=q.device))
                planes.append(q.new_zeros((5, 1, q.shape[1], s.q_end - s.q_start), dtype=torch.float32))
                continue
            kw = dict(scale=scale, softcap=softcap or None, alibi_slopes=_slopes_of(alibi_slopes, s.index),
                      dropout_p=p, dropout_seed=seed,
                      dropout_block=(total, (s.q_start, s.q_end), (s.k_start, s.k_end)),
                      mask=_rows_mask(None if row_keep is None else row_keep[:, :, rows]))
            args = (q[:, :, rows], k[:, :, keys], v[:, :, keys], s.pattern)
            if stats is not None:
                out, lse, plane = reference.attention_stats(*args, sink_tokens=stats, **kw)
                planes.append(plane)
            else:
                out, lse = reference.attention(*args, return_lse=True, **kw)
            outs.append(out)
            lses.append(lse)
        if stats is not None:
            return torch.cat(outs, 2), torch.cat(lses, 2), torch.cat(planes, 3)
        return torch.cat(outs, 2), torch.cat(lses, 2)

    @staticmethod
    def _packed_backward(pattern: Packed, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes, p=0.0, seed=0,
                         entropy=None):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        total = (1, q.shape[1], q.shape[2], k.shape[2])
        for s in pattern.sequences():
            rows, keys = slice(s.q_start, s.q_end), slice(s.k_start, s.k_end)
            if s.q_end == s.q_start or s.k_end == s.k_start:
                continue
            grads = reference.attention_backward(grad_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                                 out[:, :, rows], lse[:, :, rows], s.pattern, scale=scale,
                                                 softcap=softcap or None,
                                                 alibi_slopes=_slopes_of(alibi_slopes, s.index), dropout_p=p,
                                                 dropout_seed=seed,
                                                 dropout_block=(total, (s.q_start, s.q_end), (s.k_start, s.k_end)),
                                                 entropy_terms=None if entropy is None else entropy[:, :, :, rows])
            dq[:, :, rows], dk[:, :, keys], dv[:, :, keys] = grads
        return dq, dk, dv
