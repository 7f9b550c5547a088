"""Benchmark cases: which attention problems are timed, their inputs, and their useful work.

A ``Case`` is one problem (pattern + shape + dtype). ``make_cases`` builds the sweep from a
profile (``cpu-quick``, ``cpu``, ``gpu-quick``, ``gpu``) and the command-line overrides:
the base point (first head dim, first dtype, first batch x heads) runs at every sequence
length; every other head dim / dtype / batch x heads runs at the pivot sequence length (one
factor at a time), unless ``grid=True`` asks for the full cross product.

Useful work (docs/design.md § Benchmark protocol):

* FLOPs: ``4 * D * (sum over batch, query heads and queries of the keys the query sees)`` for the
  forward; the backward is 2.5x that, forward+backward 3.5x. Full attention is thus
  ``4*B*H*Nq*Nk*D``, causal about half, a window ``4*B*H*Nq*w*D``, top-k ``4*B*H*Nq*k*D``.
* Bytes (memory-bound cases only: decode and top-k): the data the kernel must move at least,
  without reuse between queries (see ``Case.bytes``).

``varlen`` (not in the default pattern list; ``--patterns varlen``): a packed causal batch of one
sequence of the sweep's length and ``VARLEN_SHORT_COUNT`` sequences of ``VARLEN_SHORT`` tokens
(issue 16: 1 x 2048 + 31 x 128), run by ``flashlite.varlen_attention``; the shape's batch is the
sequence count and its length the longest sequence. Its inputs are packed ``[T, H, D]``; the SDPA
peer pads them (outside the timing) to ``[S, H, max, D]`` with a causal + padding mask, and the
``per-sequence`` peer calls ``flashlite.attention`` once per sequence. Useful work: each
sequence's own causal keys.

``stats`` (not in the default pattern list; ``--patterns stats``): head statistics (issue 18) over
causal attention at the sweep's shapes, forward (and forward+backward with the entropy as a loss
term): ``flashlite.attention_stats`` per backend, beside ``plain:<backend>`` (``flashlite.attention``
on the same inputs: the ratio stats / plain is the cost of the statistics) and the ``eager`` peer
(the materialized ``P = softmax(QK^T * scale + causal mask)``, ``out = P V`` and the statistics
computed from ``P``: what users of transformers' ``output_attentions=True`` do). Useful work: the
causal keys, as ``causal``; ``stats_memory`` gives eager's ``[B, H, Nq, Nk]`` matrix against the
O(B H Nq) statistics.

``paged`` (not in the default pattern list; ``--patterns paged``; issue 17): the ``decode`` case's
shape (one query per sequence, GQA 8:1) over a paged KV cache of ``PAGED_PAGE_SIZE``-key pages in a
shuffled order: ``flashlite.paged_attention`` per backend (the cache is paged outside the timing),
beside ``plain:<backend>`` (``flashlite.attention`` on the contiguous cache: the ratio paged / plain
is the cost of the pages) and SDPA on the contiguous cache (what a serving stack that gathers its
pages first runs, the gather not timed). Useful work and bytes: as ``decode``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

PATTERNS = ("full", "causal", "window", "block_sparse", "topk", "decode")  # the default sweep
ALL_PATTERNS = PATTERNS + ("varlen", "stats", "paged")  # on request only (--patterns varlen / stats / paged)
DEFAULT_PATTERNS = PATTERNS
VARLEN_SHORT, VARLEN_SHORT_COUNT = 128, 31
PAGED_PAGE_SIZE = 16  # keys per page of the paged case (vLLM's default block size)
STATS_SINK_TOKENS = 4  # attention_stats' default sink_tokens
STATS_PLANES = 6  # AttentionStats: entropy, max_prob, mean_distance, sink_mass, keys, lse ([B, Hq, Nq] float32)
PATTERN_ALIASES = {"block-sparse": "block_sparse", "blocksparse": "block_sparse", "sparse": "block_sparse",
                   "top-k": "topk", "top_k": "topk", "sliding_window": "window", "sliding-window": "window"}
MODES = ("fwd", "bwd", "fwd+bwd")
BACKWARD_FACTOR = 2.5  # backward FLOPs per forward FLOP (docs/design.md)
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16", "f16": "float16",
                 "half": "float16", "bf16": "bfloat16"}
DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
MEMORY_BOUND = ("decode", "topk", "paged")
DECODE_PATTERNS = ("decode", "paged")  # one query per sequence, over every key (forward only)


class Skip(Exception):
    """Raised when an implementation cannot run a case; the message is the reason."""


def parse_pattern(name: str) -> str:
    name = name.strip().lower()
    name = PATTERN_ALIASES.get(name, name)
    if name not in ALL_PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(ALL_PATTERNS)}; got {name!r}")
    return name


def parse_dtype(name: str) -> str:
    name = name.strip().lower().replace("torch.", "")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of float32/fp32, float16/fp16, bfloat16/bf16; got {name!r}")
    return name


def parse_batch_heads(text: str) -> Tuple[int, int]:
    """``"2x16"`` -> (2, 16)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"batch x heads must look like 2x16 (positive ints), got {text!r}")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int

    def text(self) -> str:
        heads = f"{self.heads_q}" if self.heads_q == self.heads_kv else f"{self.heads_q}/{self.heads_kv}"
        return f"{self.batch}x{heads} {self.seqlen_q}x{self.seqlen_k} d{self.head_dim}"


@dataclass(frozen=True)
class Case:
    """One timed problem. ``params`` hold the pattern's settings (window, density, block_size, k)."""

    pattern: str
    shape: Shape
    dtype: str
    params: Tuple[Tuple[str, object], ...] = ()
    seed: int = 0

    @property
    def p(self) -> Dict[str, object]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """Pattern with its settings, e.g. ``window(1024)``, ``block_sparse(10%)``, ``topk(64)``."""
        p = self.p
        if self.pattern == "window":
            return f"window({p['window']})"
        if self.pattern == "block_sparse":
            return f"block_sparse({round(100 * float(p['density']))}%)"
        if self.pattern == "topk":
            return f"topk({p['k']})"
        if self.pattern == "varlen":
            return f"varlen(1x{self.shape.seqlen_q}+{p['short_count']}x{p['short']})"
        if self.pattern == "paged":
            return f"paged({p['page_size']})"
        return self.pattern

    @property
    def lengths(self) -> List[int]:
        """varlen: the sequence lengths (queries = keys), longest first."""
        p = self.p
        return [self.shape.seqlen_q] + [int(p["short"])] * int(p["short_count"])

    @property
    def id(self) -> str:
        return f"{self.label} {self.shape.text()} {DTYPE_SHORT[self.dtype]}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    @property
    def memory_bound(self) -> bool:
        return self.pattern in MEMORY_BOUND

    @property
    def modes(self) -> Tuple[str, ...]:
        # A decode step is inference: no backward is timed. Head statistics are an analysis path:
        # forward, and forward+backward with the entropy as a loss term (no separate backward).
        if self.pattern == "stats":
            return ("fwd", "fwd+bwd")
        return ("fwd",) if self.pattern in DECODE_PATTERNS else MODES

    # -- useful work ---------------------------------------------------------------------------
    def visited_keys(self, pattern_data: Optional["PatternData"] = None) -> int:
        """Sum over batch, query heads and queries of the keys each query sees (exact)."""
        s = self.shape
        if self.pattern in ("full",) + DECODE_PATTERNS:
            per_head = s.seqlen_q * s.seqlen_k
        elif self.pattern in ("causal", "stats"):
            per_head = band_keys(s.seqlen_q, s.seqlen_k, None, 0)
        elif self.pattern == "window":
            per_head = band_keys(s.seqlen_q, s.seqlen_k, int(self.p["window"]), 0)
        elif self.pattern == "varlen":  # each sequence's own causal keys; batch is the sequence count
            return sum(band_keys(n, n, None, 0) for n in self.lengths) * s.heads_q
        elif self.pattern == "block_sparse":
            data = pattern_data or make_pattern_data(self, "cpu")
            return layout_keys(data.layout, int(self.p["block_size"]), s.seqlen_q, s.seqlen_k, s.batch, s.heads_q)
        elif self.pattern == "topk":
            data = pattern_data or make_pattern_data(self, "cpu")
            valid = int((data.indices >= 0).sum())  # [B, Hkv, Nq, K]
            return valid * (s.heads_q // data.indices.shape[1])
        else:  # pragma: no cover - parse_pattern guards
            raise ValueError(self.pattern)
        return per_head * s.batch * s.heads_q

    def flops(self, mode: str, pattern_data: Optional["PatternData"] = None) -> float:
        """Useful FLOPs of one call in ``mode`` (fwd, bwd, fwd+bwd)."""
        forward = 4.0 * self.shape.head_dim * self.visited_keys(pattern_data)
        return forward * {"fwd": 1.0, "bwd": BACKWARD_FACTOR, "fwd+bwd": 1.0 + BACKWARD_FACTOR}[mode]

    def bytes(self, mode: str, pattern_data: Optional["PatternData"] = None) -> Optional[float]:
        """Minimum bytes moved, for memory-bound cases (None otherwise).

        decode: read q, k, v, write out. top-k: read q, write out, gather one k and one v row per
        (kv head, query, listed key), read the indices. Backward: twice the q/out traffic (dout,
        dq) and the k/v traffic (dk, dv scattered), plus the indices again.
        """
        if not self.memory_bound:
            return None
        s = self.shape
        elt = element_size(self.torch_dtype)
        q_and_out = 2 * s.batch * s.heads_q * s.seqlen_q * s.head_dim * elt
        if self.pattern in DECODE_PATTERNS:
            kv = 2 * s.batch * s.heads_kv * s.seqlen_k * s.head_dim * elt
            index_bytes = 0
        else:
            data = pattern_data or make_pattern_data(self, "cpu")
            kv = 2 * int((data.indices >= 0).sum()) * s.head_dim * elt
            index_bytes = data.indices.numel() * data.indices.element_size()
        forward = q_and_out + kv + index_bytes
        backward = 2 * q_and_out + 2 * kv + index_bytes
        return float({"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode])

    def to_json(self) -> dict:
        s = self.shape
        return {"id": self.id, "pattern": self.pattern, "label": self.label, "params": self.p,
                "shape": {"batch": s.batch, "heads_q": s.heads_q, "heads_kv": s.heads_kv, "seqlen_q": s.seqlen_q,
                          "seqlen_k": s.seqlen_k, "head_dim": s.head_dim},
                "dtype": self.dtype, "memory_bound": self.memory_bound}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def band_keys(seqlen_q: int, seqlen_k: int, left: Optional[int], right: Optional[int]) -> int:
    """Sum over queries of ``|{j : p(i) - left <= j <= p(i) + right, 0 <= j < Nk}|``, p(i) = i + Nk - Nq."""
    pos = torch.arange(seqlen_q, dtype=torch.int64) + (seqlen_k - seqlen_q)
    lo = (pos - left).clamp(min=0) if left is not None else torch.zeros_like(pos)
    hi = (pos + right).clamp(max=seqlen_k - 1) if right is not None else torch.full_like(pos, seqlen_k - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def layout_keys(layout: torch.Tensor, block_size: int, seqlen_q: int, seqlen_k: int, batch: int,
                heads_q: int) -> int:
    """Visited keys of a (non-causal) block layout ``[B|1, H|1, Mb, Nb]`` broadcast to ``[B, Hq]``."""
    mb, nb = layout.shape[-2:]
    rows = (seqlen_q - torch.arange(mb) * block_size).clamp(max=block_size).to(torch.float64)
    cols = (seqlen_k - torch.arange(nb) * block_size).clamp(max=block_size).to(torch.float64)
    per_block_row = layout.to("cpu", torch.float64) @ cols  # [B|1, H|1, Mb]
    total = (per_block_row * rows).sum(-1)  # [B|1, H|1]
    total = total.expand(batch, heads_q)
    return int(round(float(total.sum())))


# ---------------------------------------------------------------------------------------------
# Pattern data and inputs
# ---------------------------------------------------------------------------------------------
@dataclass
class PatternData:
    """The flashlite pattern of a case plus the tensors peers need to express the same pattern."""

    pattern: object  # a flashlite Pattern
    layout: Optional[torch.Tensor] = None  # block_sparse: bool [1, Hq, Mb, Nb]
    indices: Optional[torch.Tensor] = None  # topk: int32 [B, Hkv, Nq, K]
    cu_seqlens: Optional[torch.Tensor] = None  # varlen: int32 [S + 1] (queries and keys)
    block_table: Optional[torch.Tensor] = None  # paged: int32 [B, pages per sequence], shuffled page ids
    cache_seqlens: Optional[torch.Tensor] = None  # paged: int32 [B]
    _dense: Optional[torch.Tensor] = field(default=None, repr=False)

    def dense_mask_bytes(self, case: Case) -> int:
        """Bytes of the bool mask ``[B|1, Hq|1, Nq, Nk]`` a dense-mask peer needs."""
        s = case.shape
        lead = {"window": 1, "causal": 1, "block_sparse": s.heads_q, "topk": s.batch * s.heads_q,
                "varlen": s.batch}.get(case.pattern, 1)
        return lead * s.seqlen_q * s.seqlen_k

    def dense_mask(self, case: Case, device) -> torch.Tensor:
        """Bool mask broadcastable to ``[B, Hq, Nq, Nk]`` (True = attend), built once."""
        if self._dense is None:
            s = case.shape
            if case.pattern == "varlen":  # [S, 1, max, max]: causal inside each sequence, keys past it hidden
                lengths = torch.tensor(case.lengths, device=device).view(-1, 1, 1, 1)
                i = torch.arange(s.seqlen_q, device=device).view(1, 1, -1, 1)
                j = torch.arange(s.seqlen_k, device=device).view(1, 1, 1, -1)
                self._dense = (j <= i) & (j < lengths)
            else:
                self._dense = self.pattern.dense_mask(s.batch, s.heads_q, s.heads_kv, s.seqlen_q, s.seqlen_k, device)
        return self._dense


def stratified_indices(batch: int, heads_kv: int, seqlen_q: int, seqlen_k: int, k: int,
                       generator: torch.Generator) -> torch.Tensor:
    """Distinct random key positions per query: slot ``s`` picks one key in ``[s*Nk/k, (s+1)*Nk/k)``.

    int32 ``[B, Hkv, Nq, min(k, Nk)]``, ascending in each row. O(Nq*k) memory, unlike a top-k over
    random scores.
    """
    k = min(k, seqlen_k)
    starts = (torch.arange(k, dtype=torch.float64) * seqlen_k / k).floor().to(torch.int64)
    ends = ((torch.arange(1, k + 1, dtype=torch.float64) * seqlen_k / k).floor().to(torch.int64))
    widths = (ends - starts).clamp(min=1)
    jitter = torch.rand(batch, heads_kv, seqlen_q, k, generator=generator, dtype=torch.float64)
    picks = starts + (jitter * widths).floor().to(torch.int64)
    return picks.clamp(max=seqlen_k - 1).to(torch.int32)


def random_layout(heads: int, seqlen_q: int, seqlen_k: int, block_size: int, density: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Bool ``[1, H, Mb, Nb]``: each tile kept with probability ``density``, plus the diagonal tile
    of every query block so no query is left without keys."""
    mb, nb = -(-seqlen_q // block_size), -(-seqlen_k // block_size)
    layout = torch.rand(1, heads, mb, nb, generator=generator) < density
    # the key block holding p(first query of the block), p(i) = i + Nk - Nq
    diag = ((torch.arange(mb) * block_size + (seqlen_k - seqlen_q)).clamp(min=0) // block_size).clamp(max=nb - 1)
    layout[:, :, torch.arange(mb), diag] = True
    return layout


def make_pattern_data(case: Case, device) -> PatternData:
    """Build the flashlite pattern (deterministic in ``case.seed``) on ``device``."""
    import flashlite

    s, p = case.shape, case.p
    gen = torch.Generator().manual_seed(1000 + case.seed)
    if case.pattern in ("full", "decode"):
        return PatternData(flashlite.Full(causal=False))
    if case.pattern == "paged":  # every sequence's pages, shuffled over the pool
        pages = -(-s.seqlen_k // int(p["page_size"]))
        table = torch.randperm(s.batch * pages, generator=gen).view(s.batch, pages).to(torch.int32)
        lengths = torch.full((s.batch,), s.seqlen_k, dtype=torch.int32)
        return PatternData(flashlite.Full(causal=False), block_table=table.to(device), cache_seqlens=lengths.to(device))
    if case.pattern in ("causal", "stats"):
        return PatternData(flashlite.Full(causal=True))
    if case.pattern == "varlen":
        cu = torch.tensor([0] + torch.tensor(case.lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        return PatternData(flashlite.Full(causal=True), cu_seqlens=cu)
    if case.pattern == "window":
        return PatternData(flashlite.SlidingWindow(int(p["window"]), 0))
    if case.pattern == "block_sparse":
        layout = random_layout(s.heads_q, s.seqlen_q, s.seqlen_k, int(p["block_size"]), float(p["density"]), gen)
        layout = layout.to(device)
        return PatternData(flashlite.BlockSparse(layout, int(p["block_size"])), layout=layout)
    if case.pattern == "topk":
        indices = stratified_indices(s.batch, s.heads_kv, s.seqlen_q, s.seqlen_k, int(p["k"]), gen).to(device)
        return PatternData(flashlite.TopK(indices, causal=False), indices=indices)
    raise ValueError(f"unknown pattern {case.pattern!r}")


def make_qkv(case: Case, device, sets: int = 1, seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``sets`` independent random (q, k, v) triples in the case's dtype (for rotation)."""
    s = case.shape
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # generated on the device: no host copy
    out = []
    if case.pattern == "varlen":  # packed [T, H, D]
        total = sum(case.lengths)
        for _ in range(sets):
            out.append(tuple(torch.randn(total, heads, s.head_dim, generator=gen, device=device).to(case.torch_dtype)
                             for heads in (s.heads_q, s.heads_kv, s.heads_kv)))
        return out
    for _ in range(sets):
        triple = tuple(
            torch.randn(s.batch, heads, seqlen, s.head_dim, generator=gen, device=device).to(case.torch_dtype)
            for heads, seqlen in ((s.heads_q, s.seqlen_q), (s.heads_kv, s.seqlen_k), (s.heads_kv, s.seqlen_k)))
        out.append(triple)
    return out


def stats_memory(case: Case) -> Dict[str, int]:
    """stats cases: the attention matrix eager materializes (``[B, Hq, Nq, Nk]`` in the inputs' dtype,
    what ``output_attentions=True`` returns; its float32 softmax and the scores exist beside it while
    it is made) against attention_stats' output beyond ``out`` (``STATS_PLANES`` float32 planes
    ``[B, Hq, Nq]``)."""
    s = case.shape
    matrix = s.batch * s.heads_q * s.seqlen_q * s.seqlen_k * element_size(case.torch_dtype)
    stats = STATS_PLANES * s.batch * s.heads_q * s.seqlen_q * 4
    return {"eager_matrix_bytes": matrix, "stats_output_bytes": stats}


def qkv_bytes(case: Case) -> int:
    s = case.shape
    elt = element_size(case.torch_dtype)
    if case.pattern == "varlen":
        return sum(case.lengths) * (s.heads_q + 2 * s.heads_kv) * s.head_dim * elt
    return (s.batch * s.heads_q * s.seqlen_q + 2 * s.batch * s.heads_kv * s.seqlen_k) * s.head_dim * elt


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """What to time. Lists are the values of each axis; the first entry is the base point."""

    patterns: List[str]
    seqlens: List[int]
    head_dims: List[int]
    dtypes: List[str]
    batch_heads: List[Tuple[int, int]]
    window: int
    densities: List[float]
    block_size: int
    topk: int
    decode_group: int = 8  # GQA ratio of the decode case (Hq : Hkv)
    grid: bool = False
    # single cases beyond the sweep (the GPU goals of issue 9): dicts with pattern, seqlen,
    # batch_heads and optional head_dim, dtype, params
    extras: List[Dict[str, object]] = field(default_factory=list)


PROFILES: Dict[str, Dict[str, object]] = {
    # CPU, about a minute on two cores: the README's first command.
    "cpu-quick": dict(seqlens=[256, 1024], head_dims=[64], dtypes=["float32"], batch_heads=[(1, 4)],
                      window=128, densities=[0.25], block_size=64, topk=32),
    # CPU default of `flashlite bench` / `make bench`: a few minutes.
    "cpu": dict(seqlens=[256, 1024, 2048], head_dims=[64, 128], dtypes=["float32", "bfloat16"],
                batch_heads=[(1, 4), (2, 8)], window=128, densities=[0.25], block_size=64, topk=32),
    # GPU, about a minute.
    "gpu-quick": dict(seqlens=[1024, 4096], head_dims=[128], dtypes=["bfloat16"], batch_heads=[(2, 16)],
                      window=512, densities=[0.1], block_size=64, topk=64),
    # GPU full size (bench/gpu_suite.sh), plus the goal cases of issue 9.
    "gpu": dict(seqlens=[1024, 4096, 16384], head_dims=[128, 64], dtypes=["bfloat16", "float16"],
                batch_heads=[(2, 16)], window=1024, densities=[0.1, 0.25, 0.5, 1.0], block_size=64, topk=64,
                extras=[dict(pattern="window", seqlen=65536, batch_heads=(1, 16), params={"window": 4096}),
                        dict(pattern="topk", seqlen=32768, batch_heads=(1, 16), params={"k": 64}),
                        dict(pattern="decode", seqlen=65536, batch_heads=(8, 32))]),
}


def profile_sweep(profile: str, patterns: Sequence[str] = PATTERNS) -> Sweep:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    values = dict(PROFILES[profile])
    return Sweep(patterns=list(patterns), **values)  # type: ignore[arg-type]


def pivot(seqlens: Sequence[int]) -> int:
    """The sequence length where the one-factor-at-a-time variants run: the geometric middle."""
    ordered = sorted(seqlens)
    return ordered[(len(ordered) - 1) // 2]


def _pattern_cases(pattern: str, sweep: Sweep, seqlen: int, head_dim: int, dtype: str,
                   batch_heads: Tuple[int, int]) -> Iterable[Case]:
    batch, heads = batch_heads
    if pattern in DECODE_PATTERNS:
        group = max(g for g in range(1, sweep.decode_group + 1) if heads % g == 0)  # GQA, 8:1 where it divides
        params = (("page_size", PAGED_PAGE_SIZE),) if pattern == "paged" else ()
        yield Case(pattern, Shape(batch, heads, heads // group, 1, seqlen, head_dim), dtype, params)
        return
    shape = Shape(batch, heads, heads, seqlen, seqlen, head_dim)
    if pattern == "window":
        yield Case("window", shape, dtype, (("window", sweep.window),))
    elif pattern == "block_sparse":
        for density in sweep.densities:
            yield Case("block_sparse", shape, dtype, (("density", float(density)), ("block_size", sweep.block_size)))
    elif pattern == "topk":
        yield Case("topk", shape, dtype, (("k", sweep.topk),))
    elif pattern == "stats":  # causal, with head statistics
        yield Case("stats", shape, dtype, (("sink_tokens", STATS_SINK_TOKENS),))
    elif pattern == "varlen":  # 1 x seqlen + 31 x 128; the batch is the sequence count
        if seqlen >= VARLEN_SHORT:
            yield Case("varlen", replace(shape, batch=1 + VARLEN_SHORT_COUNT), dtype,
                       (("short", VARLEN_SHORT), ("short_count", VARLEN_SHORT_COUNT)))
    else:
        yield Case(pattern, shape, dtype)


def _extra_case(extra: Dict[str, object], sweep: Sweep) -> Case:
    pattern = parse_pattern(str(extra["pattern"]))
    batch, heads = extra["batch_heads"]  # type: ignore[misc]
    seqlen = int(extra["seqlen"])  # type: ignore[arg-type]
    head_dim = int(extra.get("head_dim", sweep.head_dims[0]))  # type: ignore[arg-type]
    dtype = str(extra.get("dtype", sweep.dtypes[0]))
    params = dict(extra.get("params", {}))  # type: ignore[arg-type]
    if pattern in DECODE_PATTERNS:
        group = max(g for g in range(1, sweep.decode_group + 1) if heads % g == 0)
        if pattern == "paged":
            params.setdefault("page_size", PAGED_PAGE_SIZE)
        return Case(pattern, Shape(batch, heads, heads // group, 1, seqlen, head_dim), dtype,
                    tuple(sorted(params.items())))
    if pattern == "block_sparse":
        params.setdefault("block_size", sweep.block_size)
    return Case(pattern, Shape(batch, heads, heads, seqlen, seqlen, head_dim), dtype, tuple(sorted(params.items())))


def make_extra_cases(sweep: Sweep) -> List[Case]:
    return [case for case in map(lambda extra: _extra_case(extra, sweep), sweep.extras) if case.pattern in sweep.patterns]


def make_cases(sweep: Sweep) -> List[Case]:
    """The cases of a sweep: the base line from the largest sequence length down (the sizes the
    goals are about come first if a time budget cuts the run), then the one-factor variants at
    the pivot length, then the extra cases."""
    points = []
    base = (sweep.head_dims[0], sweep.dtypes[0], sweep.batch_heads[0])
    if sweep.grid:
        points = [(n, d, t, bh) for n in sweep.seqlens for d in sweep.head_dims for t in sweep.dtypes
                  for bh in sweep.batch_heads]
    else:
        points = [(n, *base) for n in sweep.seqlens]
        middle = pivot(sweep.seqlens)
        points += [(middle, d, base[1], base[2]) for d in sweep.head_dims[1:]]
        points += [(middle, base[0], t, base[2]) for t in sweep.dtypes[1:]]
        points += [(middle, base[0], base[1], bh) for bh in sweep.batch_heads[1:]]
    cases: List[Case] = []
    seen = set()
    if sweep.grid:
        points.sort(key=lambda p: -p[0])
    else:
        points = sorted(points[:len(sweep.seqlens)], key=lambda p: -p[0]) + points[len(sweep.seqlens):]
    for seqlen, head_dim, dtype, bh in points:
        for pattern in sweep.patterns:
            for case in _pattern_cases(pattern, sweep, seqlen, head_dim, dtype, bh):
                if case.id not in seen:
                    seen.add(case.id)
                    cases.append(case)
    for case in make_extra_cases(sweep):
        if case.id not in seen:
            seen.add(case.id)
            cases.append(case)
    return cases


def with_seed(case: Case, seed: int) -> Case:
    return replace(case, seed=seed)


def is_base_point(case: Case, sweep: Sweep) -> bool:
    """True for cases on the base line (first head dim, dtype and batch x heads): the plotted series."""
    s = case.shape
    batch, heads = sweep.batch_heads[0]
    return (s.head_dim == sweep.head_dims[0] and case.dtype == sweep.dtypes[0] and s.batch == batch
            and s.heads_q == heads)


def geometric_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
