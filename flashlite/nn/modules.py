"""The core op as modules: ``Attention(pattern)`` and one convenience module per pattern.

Every module takes ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]`` (GQA when ``Hq`` is a multiple
of ``Hkv``) and returns ``out`` shaped like q (``(out, lse)`` with ``return_lse=True``). The
pattern object is kept on the module, so its block schedule is built once per problem size and
reused by every call. Modules hold no parameters.

Context parallelism: ``context_parallel=`` (every module) makes the module take this rank's shard
of a sequence split across a torch.distributed group and run
``flashlite.distributed.context_parallel_attention`` over the whole sequence, so a model's
attention runs sharded with no other change (docs/context_parallel.md).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ..api import attention, window_pattern
from ..core.patterns import BlockSparse, Full, Pattern, TopK
from ..heads import _hook as _heads


class Attention(nn.Module):
    """``flashlite.attention`` as a module.

    Args:
        pattern: a flashlite pattern (``Full``, ``SlidingWindow``, ``BlockSparse``, ``TopK``) or None
            (full, non-causal).
        scale, softcap, backend: as :func:`flashlite.attention`.
        context_parallel: None (default, off); ``True`` (the world group, ``layout="zigzag"``,
            ``method="ring"``); a ``torch.distributed`` process group (that group, zigzag, ring); or
            a dict with any of ``group``, ``layout`` (``"zigzag"``, ``"contiguous"``) and ``method``
            (``"ring"``, ``"ulysses"``). Then q, k, v are this rank's shard of a sequence split over
            the group in that layout (``flashlite.distributed.shard``), the pattern is over the whole
            sequence (block-sparse layouts global, top-k indices as global key positions for this
            rank's queries) and the output is this rank's shard; every rank calls the module.

    ``forward(q, k, v, *, pattern=None, alibi_slopes=None, return_lse=False, head_mask=None)``:
    ``pattern`` (the pattern input of this call, e.g. a ``TopK`` built from this step's indices)
    overrides the module's. ``head_mask`` (bool or float ``[Hq]`` / ``[B, Hq]``, as
    :func:`flashlite.attention`) overrides the module's ``head_mask`` buffer (None; set by
    ``flashlite.heads.prune``): a False head does no work and outputs zeros.
    """

    def __init__(self, pattern: Optional[Pattern] = None, *, scale: Optional[float] = None,
                 softcap: Optional[float] = None, backend: Optional[str] = None,
                 context_parallel: Union[None, bool, Any, Dict[str, Any]] = None) -> None:
        super().__init__()
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a flashlite pattern or None, got {type(pattern).__name__}")
        self.pattern = pattern
        self.scale = scale
        self.softcap = softcap
        self.backend = backend
        self.context_parallel = _context_parallel(context_parallel)
        self.register_buffer("head_mask", None, persistent=False)

    def _run(self, q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern], alibi_slopes: Optional[Tensor],
             return_lse: bool, head_mask: Optional[Tensor] = None):
        if self.context_parallel is not None:
            if head_mask is not None or getattr(self, "head_mask", None) is not None:
                raise NotImplementedError("head_mask: not available with context_parallel")
            from ..distributed import context_parallel_attention  # loads torch.distributed only when used

            return context_parallel_attention(q, k, v, pattern, scale=self.scale, softcap=self.softcap,
                                              alibi_slopes=alibi_slopes, return_lse=return_lse, backend=self.backend,
                                              **self.context_parallel)
        if _heads.engaged(self, head_mask):  # flashlite.heads: recording, importance gates, head masks
            return _heads.attend(self, q, k, v, pattern, head_mask=head_mask, return_lse=return_lse, scale=self.scale,
                                 softcap=self.softcap, alibi_slopes=alibi_slopes, backend=self.backend)
        return attention(q, k, v, pattern, scale=self.scale, softcap=self.softcap, alibi_slopes=alibi_slopes,
                         return_lse=return_lse, backend=self.backend)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, pattern: Optional[Pattern] = None,
                alibi_slopes: Optional[Tensor] = None, return_lse: bool = False, head_mask: Optional[Tensor] = None):
        return self._run(q, k, v, pattern if pattern is not None else self.pattern, alibi_slopes, return_lse,
                         head_mask)

    def extra_repr(self) -> str:
        parts = [repr(self.pattern) if self.pattern is not None else "Full(causal=False)"]
        parts += [f"{n}={getattr(self, n)!r}" for n in ("scale", "softcap", "backend") if getattr(self, n) is not None]
        if self.context_parallel is not None:
            cp = self.context_parallel
            group = "world" if cp["group"] is None else "group"
            parts.append(f"context_parallel=({group}, {cp['layout']}, {cp['method']})")
        return ", ".join(parts)


def _context_parallel(value) -> Optional[Dict[str, Any]]:
    """``context_parallel=`` as the keyword arguments of ``context_parallel_attention`` (None: off)."""
    if value is None or value is False:
        return None
    options: Dict[str, Any] = {"group": None, "layout": "zigzag", "method": "ring"}
    if value is True:
        return options
    if isinstance(value, dict):
        unknown = set(value) - set(options)
        if unknown:
            raise ValueError(f"context_parallel: unknown keys {sorted(unknown)}; expected group, layout, method")
        options.update(value)
    elif type(value).__name__ == "ProcessGroup":
        options["group"] = value
    else:
        raise TypeError(f"context_parallel must be None, a bool, a torch.distributed ProcessGroup or a dict, "
                        f"got {type(value).__name__}")
    if options["layout"] not in ("zigzag", "contiguous"):
        raise ValueError(f"context_parallel: layout must be 'zigzag' or 'contiguous', got {options['layout']!r}")
    if options["method"] not in ("ring", "ulysses"):
        raise ValueError(f"context_parallel: method must be 'ring' or 'ulysses', got {options['method']!r}")
    return options


class FlashAttention(Attention):
    """Full attention; ``causal=True`` keeps keys ``j <= i + Nk - Nq`` (bottom-right)."""

    def __init__(self, causal: bool = False, **kw) -> None:
        super().__init__(Full(causal=causal), **kw)


class SlidingWindowAttention(Attention):
    """Keys ``p(i) - left <= j <= p(i) + right``; an int ``window`` is ``(window, 0)`` when causal,
    ``(window, window)`` otherwise."""

    def __init__(self, window: Union[int, Tuple[int, int], Sequence[int]], causal: bool = True, **kw) -> None:
        super().__init__(window_pattern(window, causal), **kw)


class BlockSparseAttention(Attention):
    """Keys in the ``block_size`` tiles the boolean ``layout`` marks
    (``[B|1, Hq|1, ceil(Nq/bs), ceil(Nk/bs)]``).

    The layout may be given here (its schedule is then cached on the module) or per call:
    ``forward(q, k, v, layout=...)``.
    """

    def __init__(self, layout: Optional[Tensor] = None, block_size: int = 64, causal: bool = False, **kw) -> None:
        super().__init__(BlockSparse(layout, block_size, causal) if layout is not None else None, **kw)
        self.block_size = block_size
        self.causal = causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, layout: Optional[Tensor] = None,
                alibi_slopes: Optional[Tensor] = None, return_lse: bool = False, head_mask: Optional[Tensor] = None):
        if layout is not None:
            pattern: Optional[Pattern] = BlockSparse(layout, self.block_size, self.causal)
        elif self.pattern is not None:
            pattern = self.pattern
        else:
            raise ValueError("BlockSparseAttention needs a layout: give one at construction or as forward(layout=...)")
        return self._run(q, k, v, pattern, alibi_slopes, return_lse, head_mask)


class TopKAttention(Attention):
    """Each query attends only selected keys: a person's marks, an automatic top-k, or both.

    Args:
        window: recent keys every query keeps (``p(i) - window < j <= p(i)``), with marks.
        sinks: leading keys every query keeps, with marks.
        k: if set, select keys automatically by score (``flashlite.selection.topk_by_score``):
            each query gets ``k`` keys in all - the marked / window / sink keys first (always kept,
            even beyond ``k``), the highest-scoring other keys in the remaining slots.
        causal: ignore selected keys after ``p(i)`` (default True).
        block_size: the selection's scoring block size (passed to ``topk_by_score``).

    ``forward(q, k, v, *, marks=None, indices=None)``: ``indices`` (int ``[B, Hkv|1, Nq, K]`` or
    ``[B, Hkv|1, K]``, ``-1`` = empty) are used as given; otherwise ``marks`` (token positions to
    keep, see ``flashlite.selection.from_marks``) and/or the automatic top-k build them.
    """

    def __init__(self, window: int = 0, sinks: int = 0, k: Optional[int] = None, causal: bool = True,
                 block_size: Optional[int] = None, **kw) -> None:
        super().__init__(None, **kw)
        for name, value in (("window", window), ("sinks", sinks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be an int >= 1 or None, got {k!r}")
        self.window, self.sinks, self.k, self.causal, self.block_size = window, sinks, k, bool(causal), block_size

    def select(self, q: Tensor, k: Tensor, marks=None) -> Tensor:
        """The index tensor this module attends for ``q``/``k`` and ``marks``: int ``[B, Hkv|1, Nq, K]``."""
        from .. import selection  # lazily: the selection helpers live in their own module

        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[2], k.shape[2]
        kept = None
        if marks is not None or self.window or self.sinks:
            kept = selection.from_marks(marks, seqlen_k, window=self.window, sinks=self.sinks, causal=self.causal,
                                        num_queries=seqlen_q, batch=batch, device=q.device)
        if self.k is None:
            if kept is None:
                raise ValueError("TopKAttention needs indices=, marks=, window/sinks or k= to select keys")
            return kept
        kw = {} if self.block_size is None else {"block_size": self.block_size}
        return selection.topk_by_score(q, k, self.k, causal=self.causal, keep=kept, **kw)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, marks=None, indices: Optional[Tensor] = None,
                alibi_slopes: Optional[Tensor] = None, return_lse: bool = False, head_mask: Optional[Tensor] = None):
        if indices is None:
            if self.context_parallel is not None:
                raise ValueError("indices: TopKAttention with context_parallel needs indices= (this rank's queries, "
                                 "global key positions); the selection from marks or scores sees only the shard")
            indices = self.select(q, k, marks)
        return self._run(q, k, v, TopK(indices, causal=self.causal), alibi_slopes, return_lse, head_mask)

    def extra_repr(self) -> str:
        return f"window={self.window}, sinks={self.sinks}, k={self.k}, causal={self.causal}"


__all__ = ["Attention", "FlashAttention", "SlidingWindowAttention", "BlockSparseAttention", "TopKAttention"]
