"""Attention dropout: one counter-based random stream, the same bits on every backend.

The mask of a call is a pure function of (seed, element): nothing is stored, the backward
regenerates it. Element ``(b, h, i, j)`` of the ``[B, Hq, Nq, Nk]`` probability matrix (a packed
batch uses its ``[1, Hq, Tq, Tk]`` views) has the linear index ``e = ((b·Hq + h)·Nq + i)·Nk + j``
and the random word

    r(e) = Philox4x32-10(key = (seed mod 2^32, seed div 2^32), counter = (e mod 2^32, e div 2^32, 0, 0))[0]

(Salmon et al. 2011; the same function as Triton's ``tl.randint(seed, e)``). The element is kept
iff ``r(e) >= threshold(p) = floor(p·2^32)``: an integer comparison, so no backend's float
rounding can move an element across the line. Kept probabilities are scaled by ``1 / (1 − p)``
(inverted dropout); the lse stays the undropped softmax's.

``seed`` is drawn per call from ``generator`` (or torch's default CPU generator): the same
generator state gives the same mask.
"""
from __future__ import annotations

from typing import Optional

import torch

MASK32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
ROUNDS = 10


def threshold(p: float) -> int:
    """The uint32 below which a word drops its element: ``floor(p·2^32)``."""
    return min(int(p * 4294967296.0), MASK32)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A fresh 63-bit seed from ``generator`` (a CPU generator; None: torch's default)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (the seed is drawn on the host), got one on "
                         f"{generator.device}")
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, dtype=torch.int64))


def _mulhilo(constant: int, x: torch.Tensor):
    """(high, low) 32-bit halves of ``constant · x`` for uint32 values held in int64, exact (no overflow)."""
    p_lo = constant * (x & 0xFFFF)  # < 2^48
    p_hi = constant * (x >> 16)  # < 2^48
    mid = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox_words(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Word 0 of Philox4x32-10 at int64 ``counter`` (non-negative) under ``seed``, as int64 in [0, 2^32)."""
    c0, c1 = counter & MASK32, (counter >> 32) & MASK32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0


def keep_mask(seed: int, p: float, shape, device=None, rows: Optional[tuple] = None,
              cols: Optional[tuple] = None) -> torch.Tensor:
    """Bool mask of the ``[B, Hq, Nq, Nk]`` matrix ``shape``: True where the element is kept.
    ``rows`` / ``cols`` = (start, stop) give only that block of it (a packed sequence's)."""
    batch, heads, seqlen_q, seqlen_k = shape
    r0, r1 = rows if rows is not None else (0, seqlen_q)
    k0, k1 = cols if cols is not None else (0, seqlen_k)
    head = torch.arange(batch * heads, device=device, dtype=torch.int64).view(batch, heads, 1, 1)
    row = torch.arange(r0, r1, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    col = torch.arange(k0, k1, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    return philox_words(seed, (head * seqlen_q + row) * seqlen_k + col) >= threshold(p)


__all__ = ["threshold", "draw_seed", "philox_words", "keep_mask"]
