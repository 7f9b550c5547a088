"""One plan per call: a pattern compiled, for given shapes and a chosen backend, into everything
the backend's kernels consume.

* tile engine (full, causal, window, block-sparse): the backend's complete launch configuration
  and the block schedule at its tile size (forward lists and the transposed backward lists);
* gather engine (top-k): the canonical rows (sorted, repeats dropped), the inverse key index for
  the backward (one, shared by every backend), and whatever the backend adds of its own (the
  Triton gather modes and reduction pieces);
* a bool head mask (``with_heads``, ``flashlite.core.head_mask``): the masked heads' schedule
  counts zeroed (tile engine), or the rows that run (``row_keep``: gather engine, reference).

``plan_for`` builds a plan or takes it from the one bounded cache, keyed by the pattern's values
and its tensors' identity and version, the call's shapes, dtype, device, backend and whether a
backward is needed. The cache holds pattern tensors weakly (an entry dies with them) and attaches
nothing to user tensors; it also keeps values derived from tensors for the faces (``derived`` /
``recall``: a mask lowered once per forward). While compiling or tracing, the plan is built fresh (its torch ops become
part of the graph) and neither cached nor value-checked; while capturing a CUDA graph a cached
plan is used and a missing one built without host reads, and not cached.

A plan crosses the custom op as ``op_args()``: a list of tensors and a short list of ints, from
which ``Plan.from_op_args`` rebuilds it on the other side.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

from torch import Tensor

from .. import backend as backends
from ..backend.base import Backend, Request, TileConfig
from ..core import head_mask
from ..core.patterns import Pattern
from ..core.schedule import TileSchedule
from ..core.tracing import capturing, tracing, values_readable

ENGINES = ("tile", "gather", "dense")
CACHE_SIZE = 256


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything one call's kernels need besides q, k, v and the scalars."""

    backend: Backend
    engine: str  # "tile", "gather" or "dense" (the reference: the pattern's mask)
    deterministic: bool = True
    # tile engine
    schedule: Optional[TileSchedule] = None
    config: Optional[TileConfig] = None
    # gather engine
    rows: Optional[Tensor] = None  # canonical rows, int64, like the pattern's indices
    causal: bool = False
    key_offsets: Optional[Tensor] = None  # inverse key index (backward only)
    key_slots: Optional[Tensor] = None
    extra_ints: Tuple[int, ...] = ()  # the backend's own part
    extra: Tuple[Tensor, ...] = ()
    # dense (reference backend): the pattern itself
    pattern: Optional[Pattern] = None
    # bool head mask (gather engine, dense): uint8 [B, Hq, Nq], 1 where a query row runs; None: all.
    # (The tile engine carries it in its schedule's counts.)
    row_keep: Optional[Tensor] = None

    @property
    def has_backward(self) -> bool:
        return self.engine != "gather" or self.key_offsets is not None

    # -- across the custom op ------------------------------------------------------------------
    def op_args(self) -> Tuple[List[Tensor], List[int]]:
        """(tensors, ints) that carry the plan through the custom op."""
        head = [backends.NAMES.index(self.backend.name), ENGINES.index(self.engine), int(self.deterministic)]
        if self.engine == "tile":
            s, c = self.schedule, self.config
            packed = [s.q_items, s.k_items, s.cu_seqlens_q, s.cu_seqlens_k] if s.is_packed else []
            paged = [s.block_table, s.cache_seqlens] if s.is_paged else []
            return ([s.kv_tiles, s.kv_count, s.q_tiles, s.q_count, *packed, *paged],
                    head + [int(s.is_list), s.block_m, s.block_n, s.window_left, s.window_right,
                            c.num_warps, c.num_stages, s.page_size])
        if self.engine == "gather":
            none = self.rows.new_empty(0)
            inverse = [self.key_offsets, self.key_slots] if self.has_backward else [none, none]
            keep = self.row_keep if self.row_keep is not None else self.rows  # a stand-in; ints say which
            return ([self.rows, *inverse, keep, *self.extra],
                    head + [int(self.causal), int(self.has_backward), int(self.row_keep is not None),
                            *self.extra_ints])
        raise ValueError("the reference backend's plan does not cross the custom op")

    @classmethod
    def from_op_args(cls, tensors: List[Tensor], ints: List[int], seqlen_q: int, seqlen_k: int) -> "Plan":
        backend = backends.get(backends.NAMES[ints[0]])
        engine, deterministic = ENGINES[ints[1]], bool(ints[2])
        if engine == "tile":
            is_list, block_m, block_n, left, right, warps, stages, page_size = ints[3:11]
            # 8 tensors when packed (+ items and cu_seqlens), 6 when paged (+ block_table, cache_seqlens)
            paged = dict(block_table=tensors[4], cache_seqlens=tensors[5], page_size=page_size) if page_size else {}
            schedule = TileSchedule("list" if is_list else "range", block_m, block_n, seqlen_q, seqlen_k,
                                    left, right, *tensors[:4 if page_size else 8], **paged)
            return cls(backend, engine, deterministic, schedule=schedule,
                       config=TileConfig(block_m, block_n, warps, stages))
        causal, inverse, masked = bool(ints[3]), bool(ints[4]), bool(ints[5])
        return cls(backend, engine, deterministic, rows=tensors[0], causal=causal,
                   key_offsets=tensors[1] if inverse else None, key_slots=tensors[2] if inverse else None,
                   row_keep=tensors[3] if masked else None, extra_ints=tuple(ints[6:]), extra=tuple(tensors[4:]))


class _PlanCache:
    """The one cache: bounded LRU. An entry is keyed by plain values plus the identity and version
    of the tensors it was derived from, and holds those tensors weakly (it dies with them). A lock
    makes each lookup and insert atomic: calls from several Python threads share it."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(values: tuple, tensors: tuple) -> tuple:
        return values + tuple((id(t), t._version) for t in tensors)

    def get(self, values: tuple, tensors: tuple):
        key = self.key(values, tensors)
        with self.lock:
            hit = self.entries.get(key)
            if hit is None:
                return None
            refs, value = hit
            if any(ref() is not t for ref, t in zip(refs, tensors)):
                del self.entries[key]  # an id reused by a new tensor
                return None
            self.entries.move_to_end(key)
            return value

    def put(self, values: tuple, tensors: tuple, value) -> None:
        key = self.key(values, tensors)
        refs = tuple(weakref.ref(t) for t in tensors)
        with self.lock:
            self.entries[key] = (refs, value)
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


CACHE = _PlanCache()


def plan_for(pattern: Pattern, q: Tensor, k: Tensor, backend: Backend, req: Request) -> Plan:
    """The plan of (pattern, shapes, backend), from the cache or built now."""
    shape = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
    if tracing(q):
        return build(pattern, q, k, backend, req, shape)
    values = ("plan", pattern.cache_key(), shape, q.dtype, q.device, backend.name, req.requires_grad,
              req.deterministic)
    plan = CACHE.get(values, pattern.tensors())
    if plan is None:
        if capturing(q):
            return build(pattern, q, k, backend, req, shape)
        pattern.check_values(k.shape[2])
        plan = build(pattern, q, k, backend, req, shape)
        CACHE.put(values, pattern.tensors(), plan)
    return plan


def with_heads(plan: Plan, pattern: Pattern, keep: Tensor, q: Tensor) -> Plan:
    """``plan`` with the bool head mask ``keep`` (``[Hq]`` or ``[S, Hq]``, True = runs) lowered in
    (``flashlite.core.head_mask``): a masked head's tiles or rows are never visited. A few tensor
    ops per call, no host read."""
    if plan.engine == "tile":
        return replace(plan, schedule=head_mask.masked_schedule(plan.schedule, keep))
    return replace(plan, row_keep=head_mask.row_keep(pattern, keep, q.shape))


def derived(values: tuple, tensors: tuple, make: Callable[[], object]):
    """A value derived from ``tensors`` (e.g. a mask lowered to a pattern), made once per tensor
    version and kept in the same cache as the plans. Made fresh, uncached, while tracing or
    capturing. ``values`` must start with a name of the caller's choosing."""
    if not tensors or not all(values_readable(t) for t in tensors):
        return make()
    value = CACHE.get(values, tensors)
    if value is None:
        value = make()
        CACHE.put(values, tensors, value)
    return value


def recall(values: tuple, tensors: tuple):
    """What ``derived`` keeps for (values, tensors), or None (also while tracing or capturing)."""
    if not tensors or not all(values_readable(t) for t in tensors):
        return None
    return CACHE.get(values, tensors)


def build(pattern: Pattern, q: Tensor, k: Tensor, backend: Backend, req: Request, shape: tuple) -> Plan:
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    if backend.differentiable:
        return Plan(backend, "dense", req.deterministic, pattern=pattern)
    if pattern.engine == "tile":
        config = backend.tile_config(req, q.device)
        schedule = pattern.schedule(seqlen_q, seqlen_k, config.block_m, config.block_n, q.device)
        return Plan(backend, "tile", req.deterministic, schedule=schedule, config=config)
    causal = pattern.causal
    rows = backend.gather_rows(pattern.gather_indices(), seqlen_q, seqlen_k, causal)
    key_offsets = key_slots = None
    if req.requires_grad:
        key_offsets, key_slots = backend.key_index(rows, seqlen_q, seqlen_k, causal)
    extra_ints, extra = backend.prepare_gather(rows, key_offsets, key_slots, req, shape, causal)
    return Plan(backend, "gather", req.deterministic, rows=rows, causal=causal, key_offsets=key_offsets,
                key_slots=key_slots, extra_ints=tuple(extra_ints), extra=tuple(extra))


__all__ = ["Plan", "plan_for", "with_heads", "build", "derived", "recall", "CACHE", "ENGINES"]
