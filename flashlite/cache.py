"""``SelectiveKVCache``: a bounded KV cache that keeps only the tokens that matter.

During generation the cache retains, for every batch row,

* the ``sinks`` first tokens (attention sinks),
* every token a person *marked* (``mark(positions)``; absolute positions, past or future),
* the ``window`` most recent tokens,

and drops the rest as soon as they leave the window, so memory stays bounded however long the
generation runs: ``len(cache) <= sinks + marked + window``. With ``capacity`` the cache never holds
more than ``capacity`` tokens: when full it evicts the oldest unmarked, non-sink token first, then
sinks, then the oldest marks.

Storage is preallocated slots (``[B, Hkv, slots, D]`` for keys and values, plus each slot's
absolute position); appending writes the new tokens into free slots with one vectorized copy.
The slot count is ``capacity``, or ``sinks + window`` plus room for marks that grows (doubling)
only when a person marks more tokens than it holds.

``attend(q)`` runs flashlite's top-k kernel on the slots with the retained tokens as indices.
That equals ``flashlite.topk_attention`` over the full history with the retained positions as
indices (causal), which the tests check.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import Tensor

Positions = Union[int, Iterable[int], Tensor]


def _as_positions(positions: Positions, name: str = "positions") -> Tensor:
    if isinstance(positions, Tensor):
        if positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
            raise TypeError(f"{name} must be int positions, got a {positions.dtype} tensor")
        flat = positions.detach().flatten().long().cpu()
    else:
        items = [positions] if isinstance(positions, int) else list(positions)
        for p in items:
            if isinstance(p, bool) or not isinstance(p, int):
                raise TypeError(f"{name} must be an int, a list of ints or an int tensor, got {p!r}")
        flat = torch.tensor(items, dtype=torch.long)
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(flat.min())}")
    return flat.unique()


class SelectiveKVCache:
    """Bounded KV cache: sinks ∪ marked ∪ the most recent ``window`` tokens.

    Args:
        window: recent tokens kept (the newest included), ``>= 0``.
        sinks: leading tokens kept, ``>= 0`` (default 4).
        capacity: hard cap on retained tokens (None: ``sinks + marked + window``).
        mark_room: initial slots for marked tokens (grows by doubling when exceeded; unused with
            ``capacity``).

    ``append(k, v)`` adds ``n`` tokens (``[B, Hkv, n, D]``); ``mark(positions)`` pins absolute
    positions (for every batch row); ``keys`` / ``values`` / ``positions`` give what is retained
    in position order; ``len(cache)`` its count; ``attend(q)`` attends queries at the last
    positions over it.
    """

    def __init__(self, window: int, sinks: int = 4, capacity: Optional[int] = None, *, mark_room: int = 16) -> None:
        for name, value in (("window", window), ("sinks", sinks), ("mark_room", mark_room)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be an int >= 1 or None, got {capacity!r}")
        self.window, self.sinks, self.capacity, self.mark_room = window, sinks, capacity, mark_room
        self._marks = torch.empty(0, dtype=torch.long)  # sorted absolute positions (CPU)
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every token (marks are kept: they are positions a person chose)."""
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None
        self._pos: Optional[Tensor] = None  # [slots] int64 absolute position, -1 = free
        self.total = 0  # tokens appended so far

    @property
    def slots(self) -> int:
        """Allocated token slots (the storage bound)."""
        return 0 if self._pos is None else self._pos.numel()

    def __len__(self) -> int:
        return 0 if self._pos is None else int((self._pos >= 0).sum())

    @property
    def marked(self) -> Tensor:
        """Marked absolute positions (int64, ascending), including ones not generated yet."""
        return self._marks.clone()

    @property
    def memory_bytes(self) -> int:
        """Bytes allocated for keys and values."""
        if self._k is None:
            return 0
        return 2 * self._k.numel() * self._k.element_size()

    @property
    def retained_bytes(self) -> int:
        """Bytes of keys and values of the retained tokens."""
        if self._k is None:
            return 0
        per_token = 2 * self._k.shape[0] * self._k.shape[1] * self._k.shape[3] * self._k.element_size()
        return len(self) * per_token

    def _order(self) -> Tensor:
        """Slots of the retained tokens in position order."""
        pos = self._pos
        key = torch.where(pos >= 0, pos, torch.full_like(pos, torch.iinfo(torch.int64).max))
        order = key.argsort()
        return order[: len(self)]

    @property
    def positions(self) -> Tensor:
        """Absolute positions of the retained tokens, ascending (int64, on the cache's device)."""
        if self._pos is None:
            return torch.empty(0, dtype=torch.long)
        return self._pos[self._order()]

    @property
    def keys(self) -> Tensor:
        """Retained keys ``[B, Hkv, len(cache), D]`` in position order."""
        if self._k is None:
            raise ValueError("the cache is empty: append(k, v) first")
        return self._k.index_select(2, self._order())

    @property
    def values(self) -> Tensor:
        """Retained values ``[B, Hkv, len(cache), D]`` in position order."""
        if self._v is None:
            raise ValueError("the cache is empty: append(k, v) first")
        return self._v.index_select(2, self._order())

    # -- marks ----------------------------------------------------------------------------------
    def mark(self, positions: Positions) -> None:
        """Pin absolute positions (already generated and retained, or still to come)."""
        new = _as_positions(positions)
        if self._pos is not None and new.numel():
            past = new[new < self.total]
            held = torch.isin(past, self._pos.cpu())
            if not bool(held.all()):
                lost = past[~held].tolist()
                raise ValueError(f"positions {lost[:8]}{'...' if len(lost) > 8 else ''} were already evicted; "
                                 f"mark tokens while they are still retained (in the window) or before they come")
        self._marks = torch.cat([self._marks, new]).unique()

    def unmark(self, positions: Positions) -> None:
        """Unpin positions; they are dropped at the next append once outside the window."""
        drop = _as_positions(positions)
        self._marks = self._marks[~torch.isin(self._marks, drop)]

    # -- append ---------------------------------------------------------------------------------
    def _allocate(self, k: Tensor, slots: int) -> None:
        batch, heads, _, dim = k.shape
        self._k = k.new_zeros((batch, heads, slots, dim))  # zeros: free slots stay finite
        self._v = k.new_zeros((batch, heads, slots, dim))
        self._pos = torch.full((slots,), -1, dtype=torch.long, device=k.device)

    def _grow(self, slots: int) -> None:
        extra = slots - self.slots
        self._k = torch.cat([self._k, self._k.new_zeros((*self._k.shape[:2], extra, self._k.shape[3]))], 2)
        self._v = torch.cat([self._v, self._v.new_zeros((*self._v.shape[:2], extra, self._v.shape[3]))], 2)
        self._pos = torch.cat([self._pos, self._pos.new_full((extra,), -1)])

    def _keep(self, pos: Tensor) -> Tensor:
        """sinks ∪ marked ∪ the window of the current total (for valid positions)."""
        marks = self._marks.to(pos.device)
        return (pos >= 0) & ((pos < self.sinks) | (pos >= self.total - self.window) | torch.isin(pos, marks))

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add ``n`` new tokens ``k, v: [B, Hkv, n, D]`` at positions ``total … total + n − 1``."""
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a tensor [B, Hkv, n, D], got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape [B, Hkv, n, D], got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if self._k is not None and (k.shape[:2] != self._k.shape[:2] or k.shape[3] != self._k.shape[3]
                                    or k.dtype != self._k.dtype or k.device != self._k.device):
            raise ValueError(f"k must be [{self._k.shape[0]}, {self._k.shape[1]}, n, {self._k.shape[3]}] "
                             f"{self._k.dtype} on {self._k.device} like earlier appends, got {tuple(k.shape)} "
                             f"{k.dtype} on {k.device}")
        n = k.shape[2]
        if n == 0:
            return
        if self._k is None:
            slots = self.capacity if self.capacity is not None else self.sinks + self.window + self.mark_room
            self._allocate(k, max(slots, 1))
        start = self.total
        self.total += n
        new_pos = torch.arange(start, self.total, device=self._pos.device)
        keep_old = self._keep(self._pos)
        keep_new = self._keep(new_pos)
        if self.capacity is not None:
            keep_old, keep_new = self._cap(keep_old, keep_new, new_pos)
        else:
            needed = int(keep_old.sum()) + int(keep_new.sum())
            if needed > self.slots:  # more marks than room: grow the mark room (doubling)
                self.mark_room = max(2 * self.mark_room, needed - self.sinks - self.window)
                self._grow(self.sinks + self.window + self.mark_room)
                keep_old = torch.cat([keep_old, keep_old.new_zeros(self.slots - keep_old.numel())])
        # Free every slot not kept, then write the kept new tokens into free slots (one copy each).
        self._pos = torch.where(keep_old, self._pos, torch.full_like(self._pos, -1))
        free = torch.nonzero(self._pos < 0).flatten()
        take = torch.nonzero(keep_new).flatten()
        target = free[: take.numel()]
        self._k.index_copy_(2, target, k.index_select(2, take))
        self._v.index_copy_(2, target, v.index_select(2, take))
        self._pos.index_copy_(0, target, new_pos[take])

    def _cap(self, keep_old: Tensor, keep_new: Tensor, new_pos: Tensor):
        """Enforce ``capacity``: drop the lowest-priority tokens (unmarked non-sinks, oldest first;
        then sinks; then the oldest marks)."""
        pos = torch.cat([self._pos, new_pos])
        keep = torch.cat([keep_old, keep_new])
        excess = int(keep.sum()) - self.capacity
        if excess > 0:
            marks = self._marks.to(pos.device)
            rank = torch.isin(pos, marks).long() * 2 + (pos < self.sinks).long()
            priority = torch.where(keep, rank * (self.total + 1) + pos, torch.full_like(pos, -1))
            # the `excess` smallest priorities among the kept go
            order = priority.argsort()
            dropped = order[(priority[order] >= 0).nonzero().flatten()[:excess]]
            keep = keep.clone()
            keep[dropped] = False
        return keep[: keep_old.numel()], keep[keep_old.numel():]

    # -- attention ------------------------------------------------------------------------------
    def indices(self, num_queries: int = 1) -> Tensor:
        """Slot indices for ``num_queries`` queries at the last positions: ``[B, 1, K]`` when one
        query (every retained token is at or before it), else ``[B, 1, Nq, K]`` with ``-1`` where a
        retained token is after the query."""
        order = self._order()
        batch = self._k.shape[0]
        if num_queries == 1:
            return order.view(1, 1, -1).expand(batch, 1, -1).contiguous()
        query_pos = torch.arange(self.total - num_queries, self.total, device=order.device)
        visible = self._pos[order][None, :] <= query_pos[:, None]
        rows = torch.where(visible, order[None, :], torch.full_like(visible, -1, dtype=order.dtype))
        return rows.view(1, 1, num_queries, -1).expand(batch, 1, -1, -1).contiguous()

    def attend(self, q: Tensor, **kw) -> Tensor:
        """Attention of queries ``q [B, Hq, Nq, D]`` - the last ``Nq`` appended positions - over the
        retained tokens (causal), with flashlite's top-k kernel on the cache slots. ``kw`` go to
        ``flashlite.topk_attention`` (scale, softcap, backend, return_lse, ...)."""
        from .api import topk_attention

        if self._k is None or len(self) == 0:
            raise ValueError("the cache is empty: append(k, v) first")
        if not isinstance(q, Tensor) or q.dim() != 4:
            raise ValueError("q must be a tensor [B, Hq, Nq, D]")
        if q.shape[2] > self.total:
            raise ValueError(f"q has {q.shape[2]} queries but only {self.total} tokens were appended")
        return topk_attention(q, self._k, self._v, self.indices(q.shape[2]), causal=False, **kw)

    def __repr__(self) -> str:
        return (f"SelectiveKVCache(window={self.window}, sinks={self.sinks}, capacity={self.capacity}, "
                f"retained={len(self)}, slots={self.slots}, total={self.total}, marked={self._marks.numel()})")


__all__ = ["SelectiveKVCache"]
