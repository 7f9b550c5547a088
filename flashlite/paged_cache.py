"""``PagedKVCache``: one page pool shared by many sequences (the serving layout).

The pool holds ``k_cache, v_cache [num_pages, page_size, Hkv, D]`` (vLLM / flash-attn layout);
each sequence owns a list of pages in logical order. ``append`` writes new keys and values,
taking pages from the free list as a sequence grows; ``free`` gives a sequence's pages back (they
are reused by later appends, most recently freed first); ``attend`` runs
``flashlite.paged_attention`` over the sequences' pages.

Failure atomicity: ``append`` checks everything (arguments, and that the free pages cover every
sequence's growth) before it takes a page or writes a value; when the pool runs out it raises
``PagePoolExhausted`` and the pool, the caches and the tables are unchanged.

Stable tables: ``block_table(seq_ids)`` and ``seqlens(seq_ids)`` return the same tensors for the
same ``seq_ids`` tuple on every call, rewritten in place when a sequence grows (the table is
reallocated only when it must get wider: its width doubles). The plan cache keys these tensors by
identity and version, so calls that change nothing (several ``attend`` calls between two appends,
e.g. one per layer sharing the pool's tables) reuse one plan, dead plans do not pile up, and the
tensors keep their addresses for CUDA-graph capture. The tensors are live: clone them to keep a
snapshot. Forward only (as ``paged_attention``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .backend.base import DTYPES


MAX_HELD_TABLES = 16  # seq_ids tuples whose tables are kept (and updated in place)


class PagePoolExhausted(RuntimeError):
    """An append needs more pages than the pool has free (nothing was written)."""


class PagedKVCache:
    """A page pool shared by many sequences (module docstring).

    Args:
        num_pages, page_size: the pool's pages and keys per page (any page_size >= 1).
        heads_kv, head_dim: K/V heads and head dimension.
        dtype, device: of the caches (float16, bfloat16 or float32).
    """

    def __init__(self, num_pages: int, page_size: int, heads_kv: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device="cpu") -> None:
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("heads_kv", heads_kv),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        self.num_pages, self.page_size, self.heads_kv, self.head_dim = num_pages, page_size, heads_kv, head_dim
        self.k_cache = torch.zeros(num_pages, page_size, heads_kv, head_dim, dtype=dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self._free: List[int] = list(range(num_pages - 1, -1, -1))  # popped from the end: page 0 first
        self._pages: Dict[int, List[int]] = {}
        self._lengths: Dict[int, int] = {}
        self._next_id = 0
        self._tables: Dict[Tuple[int, ...], Tuple[Tensor, Tensor]] = {}

    # -- the pool --------------------------------------------------------------------------------------
    @property
    def pages_free(self) -> int:
        return len(self._free)

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    def new_sequence(self) -> int:
        """A new, empty sequence (takes no page until its first append)."""
        seq_id = self._next_id
        self._next_id += 1
        self._pages[seq_id], self._lengths[seq_id] = [], 0
        return seq_id

    def free(self, seq_id: int) -> None:
        """Give the sequence's pages back to the pool; the id is no longer valid."""
        self._check_ids([seq_id])
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lengths[seq_id]
        for ids in [ids for ids in self._tables if seq_id in ids]:
            del self._tables[ids]

    def _check_ids(self, seq_ids) -> List[int]:
        if isinstance(seq_ids, int) and not isinstance(seq_ids, bool):
            raise TypeError("seq_ids must be a sequence of ints (sequence ids), not one int")
        ids = [int(s) for s in seq_ids]
        for s in ids:
            if s not in self._pages:
                raise ValueError(f"seq_ids: {s} is not a live sequence of this cache (new_sequence() makes one; "
                                 f"free() ends one)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {ids}")
        return ids

    def append(self, seq_ids: Sequence[int], k: Tensor, v: Tensor) -> None:
        """Write ``k, v [len(seq_ids), Hkv, n, D]`` after each sequence's keys, taking pages as needed.
        Raises ``PagePoolExhausted`` (nothing written, nothing taken) when the free pages do not cover it."""
        ids = self._check_ids(seq_ids)
        want = (len(ids), self.heads_kv, None, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor [len(seq_ids), heads_kv, n, head_dim]")
            if t.dim() != 4 or t.shape[0] != want[0] or t.shape[1] != want[1] or t.shape[3] != want[3]:
                raise ValueError(f"{name} must have shape [{want[0]}, {want[1]}, n, {want[3]}] "
                                 f"([len(seq_ids), heads_kv, n, head_dim]), got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        n, ps = k.shape[2], self.page_size
        if n == 0 or not ids:
            return
        new_lengths = [self._lengths[s] + n for s in ids]
        needed = [-(-length // ps) - len(self._pages[s]) for s, length in zip(ids, new_lengths)]
        if sum(needed) > len(self._free):
            raise PagePoolExhausted(f"append needs {sum(needed)} free pages of {ps} keys, the pool has "
                                    f"{len(self._free)} of {self.num_pages}: nothing was written (free() finished "
                                    f"sequences, or make a larger pool)")
        # Past this point nothing can fail: take the pages, then write.
        for s, count in zip(ids, needed):
            for _ in range(count):
                self._pages[s].append(self._free.pop())
        slots = []
        for s in ids:
            pages = torch.tensor(self._pages[s], dtype=torch.int64)
            j = torch.arange(self._lengths[s], self._lengths[s] + n)
            slots.append(pages[j // ps] * ps + j % ps)
        slots = torch.cat(slots).to(self.device)
        for cache, t in ((self.k_cache, k), (self.v_cache, v)):
            flat = cache.view(self.num_pages * ps, self.heads_kv, self.head_dim)
            flat.index_copy_(0, slots, t.permute(0, 2, 1, 3).reshape(-1, self.heads_kv, self.head_dim))
        for s, length in zip(ids, new_lengths):
            self._lengths[s] = length
        self._refresh()

    # -- tables ------------------------------------------------------------------------------------------
    def _values(self, ids: Tuple[int, ...]) -> Tuple[List[List[int]], List[int]]:
        return [self._pages[s] for s in ids], [self._lengths[s] for s in ids]

    def _tensors(self, ids: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
        pages, lengths = self._values(ids)
        held = self._tables.get(ids)
        width = max([len(p) for p in pages] + [1])
        if held is None or held[0].shape[1] < width:
            width = width if held is None else max(width, 2 * held[0].shape[1])
            table = torch.full((len(ids), width), -1, dtype=torch.int32, device=self.device)
            seqlens = torch.zeros(len(ids), dtype=torch.int32, device=self.device)
            held = (table, seqlens)
            self._tables.pop(ids, None)
            self._tables[ids] = held
            while len(self._tables) > MAX_HELD_TABLES:  # the oldest batch composition goes
                del self._tables[next(iter(self._tables))]
            self._write(held, pages, lengths)
        return held

    def _write(self, held: Tuple[Tensor, Tensor], pages, lengths) -> None:
        """Rewrite the held tensors in place, only where a value changed (a version bump means a new plan)."""
        table, seqlens = held
        rows = torch.full(table.shape, -1, dtype=torch.int32)
        for r, p in enumerate(pages):
            rows[r, :len(p)] = torch.tensor(p, dtype=torch.int32)
        rows = rows.to(self.device)
        if not torch.equal(rows, table):
            table.copy_(rows)
        lens = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        if not torch.equal(lens, seqlens):
            seqlens.copy_(lens)

    def _refresh(self) -> None:
        """Bring every held table up to date (after an append)."""
        for ids in list(self._tables):
            table, _ = self._tables[ids]
            pages, lengths = self._values(ids)
            if max([len(p) for p in pages] + [1]) > table.shape[1]:
                del self._tables[ids]  # rebuilt wider on next use
            else:
                self._write(self._tables[ids], pages, lengths)

    def block_table(self, seq_ids: Sequence[int]) -> Tensor:
        """int32 ``[len(seq_ids), max_pages]`` of page ids, ``-1`` past each sequence's pages (live: see the
        module docstring)."""
        return self._tensors(tuple(self._check_ids(seq_ids)))[0]

    def seqlens(self, seq_ids: Sequence[int]) -> Tensor:
        """int32 ``[len(seq_ids)]``: keys per sequence (live: see the module docstring)."""
        return self._tensors(tuple(self._check_ids(seq_ids)))[1]

    def attend(self, q: Tensor, seq_ids: Sequence[int], pattern=None, **kw):
        """``flashlite.paged_attention`` of q ``[len(seq_ids), Hq, Nq, D]`` over these sequences' keys
        (query i at ``p(i) = seqlen − Nq + i``; append the new keys first). ``kw``: scale, softcap,
        return_lse, backend."""
        from .api import paged_attention

        table, seqlens = self._tensors(tuple(self._check_ids(seq_ids)))
        return paged_attention(q, self.k_cache, self.v_cache, table, seqlens, pattern, **kw)

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_pages={self.num_pages}, page_size={self.page_size}, heads_kv={self.heads_kv}, "
                f"head_dim={self.head_dim}, sequences={len(self._pages)}, pages_free={self.pages_free})")


__all__ = ["PagedKVCache", "PagePoolExhausted"]
