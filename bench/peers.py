"""What is timed: flashlite's backends and the peers, each as an ``Impl``.

An ``Impl`` turns a case into a forward callable ``f(q, k, v) -> out`` (``prepare``) or raises
``Skip`` with the reason it cannot run the case. Peers express each pattern as faithfully as
they allow:

* PyTorch SDPA, per backend (``torch.nn.attention.sdpa_kernel``: flash, cuDNN, efficient, math,
  whichever the device supports): full; causal as ``is_causal`` (bottom-right mask when
  Nq != Nk); window, block-sparse and top-k as a dense boolean ``attn_mask`` (that is how SDPA
  runs them: O(N^2) work and mask memory, so they are skipped above ``max_mask_bytes``).
* FlexAttention (``torch.nn.attention.flex_attention``, compiled): causal and window as a
  ``mask_mod`` with its ``BlockMask``; block-sparse as a ``mask_mod`` over the layout with a
  BlockMask at the layout's block size (falling back to Flex's default 128 if it refuses);
  top-k has no exact BlockMask form, so it runs as a ``mask_mod`` over a dense per-query index
  mask, on sizes where that mask fits ``max_mask_bytes`` (said in the row's note).

Packed batches (the ``varlen`` case, inputs packed ``[T, H, D]``): flashlite runs
``varlen_attention``; SDPA runs the padded batch ``[S, H, max, D]`` with a dense causal + padding
mask (padding done by ``adapt``, outside the timing); ``PerSequenceImpl`` runs
``flashlite.attention`` once per sequence (its inputs split by ``adapt``, outside the timing).

Head statistics (the ``stats`` case, causal): flashlite runs ``attention_stats``; ``PlainImpl``
(``plain:<backend>``) runs ``flashlite.attention`` on the same inputs and backend, the baseline of
the stats / plain ratio; ``EagerImpl`` (``eager``) is what a user of transformers'
``output_attentions=True`` does today: the probability matrix ``P`` materialized as transformers'
eager attention makes it (scores, additive causal mask, float32 softmax cast back), ``out = P V``,
then the same statistics computed from ``P``. SDPA and Flex return no probabilities: they skip it.

Paged caches (the ``paged`` case, decode): flashlite runs ``paged_attention`` over a pool made from
the case's contiguous k, v by ``adapt`` (pages in the case's shuffled block table, outside the
timing); ``PlainImpl`` runs ``flashlite.attention`` on the contiguous cache; SDPA runs on the
contiguous cache too (the gathered pages of a serving stack, the gather not timed).
"""
from __future__ import annotations

import inspect
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .cases import Case, PatternData, Skip

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NO_STATS = "returns no attention probabilities or statistics (the stats case's peer is eager)"

SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
_SDPA_ENUM = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
              "math": "MATH"}


class Impl:
    """One timed implementation."""

    name = "impl"
    kind = "peer"  # "flashlite" or "peer"
    deferred = False  # True: long first call (compilation); timed after every other implementation

    def __init__(self) -> None:
        self.note: Optional[str] = None  # set by prepare when the case runs in a particular way

    def prepare(self, case: Case, data: PatternData, device: torch.device, grad: bool) -> Forward:
        raise NotImplementedError

    def adapt(self, case: Case, data: PatternData, q, k, v) -> tuple:
        """The tensors this implementation's forward takes, made from a case's (q, k, v) outside the
        timing (the autograd leaves of a backward). Default: (q, k, v) themselves. The forward may
        return one tensor or a list of them."""
        return (q, k, v)

    def check(self, forward: Forward, *tensors) -> float:
        """Run once (untimed: compiles, probes support); raise Skip on "cannot run". Returns seconds."""
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = forward(*tensors)
            except Skip:
                raise
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
                if _is_oom(exc):
                    raise Skip("out of memory") from None
                detail = "; ".join(str(w.message).splitlines()[0] for w in caught[:3] if str(w.message).strip())
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise Skip(f"{message}{' (' + detail + ')' if detail else ''}") from None
        first = out[0] if isinstance(out, (list, tuple)) and out else out
        if torch.is_tensor(first) and first.device.type == "cuda":
            torch.cuda.synchronize(first.device)
        return time.perf_counter() - start

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------
# flashlite
# ---------------------------------------------------------------------------------------------
def paged_pool(cache: torch.Tensor, table: torch.Tensor, page_size: int) -> torch.Tensor:
    """A contiguous cache ``[B, Hkv, N, D]`` as a page pool ``[B·pages, page_size, Hkv, D]`` with
    sequence b's logical page j at pool page ``table[b, j]`` (``pages = table.shape[1]`` =
    ⌈N / page_size⌉; the last page zero-padded)."""
    batch, heads, length, dim = cache.shape
    pages = table.shape[1]
    padded = torch.nn.functional.pad(cache, (0, 0, 0, pages * page_size - length))
    logical = padded.view(batch, heads, pages, page_size, dim).permute(0, 2, 3, 1, 4).reshape(-1, page_size, heads, dim)
    pool = torch.empty_like(logical)
    pool[table.flatten().long()] = logical
    return pool


def backend_why_not(name: str, case: Case, data: PatternData, device: torch.device, grad: bool) -> Optional[str]:
    """The backend's own answer to "can you run this?" (None = yes)."""
    from flashlite import backend

    state = backend.report().get(name)
    if state != "available":
        return state or f"unknown backend {name!r}"
    pattern = data.pattern
    try:
        extra = {"packed": True} if case.pattern == "varlen" else {"stats": True} if case.pattern == "stats" else {}
        request = backend.Request(
            device_type=device.type, dtype=case.torch_dtype, head_dim=case.shape.head_dim, engine=pattern.engine,
            pattern=pattern.name, requires_grad=grad, block_size=getattr(pattern, "block_size", None), **extra)
        return backend.get(name).why_not(request)
    except TypeError:  # the Request fields changed: let the call itself answer
        return None


class FlashliteImpl(Impl):
    kind = "flashlite"

    def __init__(self, backend: str, stats_only: Optional[str] = None) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"flashlite:{backend}"
        # set: this backend is timed on stats cases only, and this says why (its note)
        self.stats_only = stats_only

    def prepare(self, case, data, device, grad):
        if self.stats_only and case.pattern != "stats":
            raise Skip(f"timed on the stats case only ({self.stats_only})")
        reason = backend_why_not(self.backend, case, data, device, grad)
        if reason:
            raise Skip(reason)
        import flashlite

        pattern, backend = data.pattern, self.backend
        if case.pattern == "stats":
            sink = int(case.p["sink_tokens"])
            self.note = self.stats_only

            def forward(q, k, v):
                out, stats = flashlite.attention_stats(q, k, v, pattern, sink_tokens=sink, backend=backend)
                # with gradients: the entropy is a loss term beside out (one backward for both)
                return [out, stats.entropy] if torch.is_grad_enabled() else (out, stats)

            return forward
        if case.pattern == "varlen":
            cu = data.cu_seqlens

            def forward(q, k, v):
                return flashlite.varlen_attention(q, k, v, cu, cu, pattern, backend=backend)

            return forward
        if case.pattern == "paged":
            table, lengths = data.block_table, data.cache_seqlens

            def forward(q, k_cache, v_cache):
                return flashlite.paged_attention(q, k_cache, v_cache, table, lengths, pattern, backend=backend)

            return forward

        def forward(q, k, v):
            return flashlite.attention(q, k, v, pattern, backend=backend)

        return forward

    def adapt(self, case, data, q, k, v):
        if case.pattern != "paged":
            return (q, k, v)
        page_size = int(case.p["page_size"])
        return (q, paged_pool(k, data.block_table, page_size), paged_pool(v, data.block_table, page_size))


class PerSequenceImpl(Impl):
    """varlen cases only: ``flashlite.attention`` on each sequence of the packed batch in turn
    (``[1, H, n, D]`` each, split outside the timing): what a packed call should cost at most."""

    kind = "peer"

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"per-sequence:{backend}"

    def prepare(self, case, data, device, grad):
        if case.pattern != "varlen":
            raise Skip("times varlen cases only")
        reason = backend_why_not(self.backend, Case("causal", case.shape, case.dtype), data, device, grad)
        if reason:
            raise Skip(reason)
        import flashlite

        pattern, backend = data.pattern, self.backend
        self.note = f"{len(case.lengths)} flashlite.attention calls"

        def forward(*tensors):
            return [flashlite.attention(*tensors[i:i + 3], pattern, backend=backend) for i in range(0, len(tensors), 3)]

        return forward

    def adapt(self, case, data, q, k, v):
        cu = data.cu_seqlens.tolist()
        out = []
        for s in range(len(cu) - 1):
            out += [t[cu[s]:cu[s + 1]].transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v)]
        return tuple(out)


class PlainImpl(Impl):
    """stats and paged cases only: ``flashlite.attention`` on the same inputs and backend (no
    statistics; the contiguous cache): the baseline of the stats / plain and paged / plain ratios
    (``vs_plain`` in the report)."""

    kind = "flashlite"

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"plain:{backend}"

    def prepare(self, case, data, device, grad):
        if case.pattern not in ("stats", "paged"):
            raise Skip("times the stats and paged cases only")
        plain = "causal" if case.pattern == "stats" else "decode"
        reason = backend_why_not(self.backend, Case(plain, case.shape, case.dtype), data, device, grad)
        if reason:
            raise Skip(reason)
        import flashlite

        pattern, backend = data.pattern, self.backend

        def forward(q, k, v):
            return flashlite.attention(q, k, v, pattern, backend=backend)

        return forward


class EagerImpl(Impl):
    """stats cases only: the attention matrix materialized as transformers' eager attention does
    with ``output_attentions=True`` (scores, additive causal mask of the dtype's minimum, float32
    softmax cast to the inputs' dtype, ``out = P V``), then from ``P`` the statistics
    attention_stats returns: entropy, max probability, mean distance, sink mass, visible keys (not
    lse, which eager users do not get). The mask, the distance matrix and the visible-key counts'
    mask are built once outside the timing, as a model builds its mask once per batch. The entropy
    uses ``log(max(P, tiny))`` so its gradient is finite where ``P = 0`` (masked keys)."""

    kind = "peer"
    name = "eager"

    def prepare(self, case, data, device, grad):
        if case.pattern != "stats":
            raise Skip("times the stats case only")
        s = case.shape
        sink = int(case.p["sink_tokens"])
        dtype = case.torch_dtype
        visible = data.dense_mask(case, device).reshape(s.seqlen_q, s.seqlen_k)  # causal, bottom-right
        bias = torch.zeros(s.seqlen_q, s.seqlen_k, device=device, dtype=dtype).masked_fill(
            ~visible, torch.finfo(dtype).min)
        pos = torch.arange(s.seqlen_q, device=device)[:, None] + (s.seqlen_k - s.seqlen_q)
        distance = (pos - torch.arange(s.seqlen_k, device=device)[None, :]).abs().to(torch.float32)
        scale = s.head_dim ** -0.5
        group = s.heads_q // s.heads_kv
        tiny = torch.finfo(torch.float32).tiny
        self.note = "P [B, H, Nq, Nk] materialized; statistics from P"

        def forward(q, k, v):
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.matmul(q, k.transpose(2, 3)) * scale + bias
            probs32 = torch.softmax(scores, dim=-1, dtype=torch.float32)
            probs = probs32.to(dtype)  # what output_attentions returns
            out = torch.matmul(probs, v)
            entropy = -(probs32 * probs32.clamp_min(tiny).log()).sum(-1)
            if torch.is_grad_enabled():
                return [out, entropy]
            stats = (entropy, probs32.amax(-1), (probs32 * distance).sum(-1), probs32[..., :sink].sum(-1),
                     visible.sum(-1).to(torch.float32).expand(s.batch, s.heads_q, s.seqlen_q))
            return out, stats, probs

        return forward


# ---------------------------------------------------------------------------------------------
# PyTorch SDPA
# ---------------------------------------------------------------------------------------------
def _sdpa_enum(name: str):
    from torch.nn.attention import SDPBackend

    member = getattr(SDPBackend, _SDPA_ENUM[name], None)
    if member is None:
        raise Skip(f"this torch has no SDPBackend.{_SDPA_ENUM[name]}")
    return member


def _sdpa_has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtins without a signature: torch >= 2.5 has the argument
        return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class SdpaImpl(Impl):
    """``F.scaled_dot_product_attention`` restricted to one backend."""

    def __init__(self, backend: str, max_mask_bytes: int) -> None:
        super().__init__()
        if backend not in SDPA_BACKENDS:
            raise ValueError(f"SDPA backend must be one of {SDPA_BACKENDS}, got {backend!r}")
        self.backend = backend
        self.name = f"sdpa:{backend}"
        self.max_mask_bytes = max_mask_bytes

    def prepare(self, case, data, device, grad):
        from torch.nn.attention import sdpa_kernel

        if case.pattern == "stats":
            raise Skip(NO_STATS)
        enum = _sdpa_enum(self.backend)
        s = case.shape
        kwargs: Dict[str, object] = {}
        notes: List[str] = []
        if case.pattern == "causal":
            if s.seqlen_q == s.seqlen_k:
                kwargs["is_causal"] = True
            else:
                kwargs["attn_mask"] = self._mask(case, data, device)
        elif case.pattern == "varlen":
            kwargs["attn_mask"] = self._mask(case, data, device)
            notes.append(f"padded to {s.batch}x{s.seqlen_q} (outside the timing), dense causal + padding mask")
        elif case.pattern in ("window", "block_sparse", "topk"):
            kwargs["attn_mask"] = self._mask(case, data, device)
            notes.append("dense bool attn_mask")
        elif case.pattern == "paged":
            notes.append("on the contiguous cache (the pages gathered outside the timing)")
        if self.backend == "math":
            scores = 4 * s.batch * s.heads_q * s.seqlen_q * s.seqlen_k * (3 if grad else 1)
            if device.type == "cpu" and scores > 8 * 2**30:
                raise Skip(f"the math backend would materialise {scores / 2**30:.0f} GiB of scores")
        expand = s.heads_q != s.heads_kv and not _sdpa_has_gqa()
        gqa = s.heads_q != s.heads_kv and not expand
        if expand:
            notes.append("GQA via k/v expanded outside the timing")
        self.note = ", ".join(notes) or None
        group = s.heads_q // s.heads_kv

        def forward(q, k, v):
            if expand:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            with sdpa_kernel([enum]):
                if gqa:
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
                return F.scaled_dot_product_attention(q, k, v, **kwargs)

        return forward

    def adapt(self, case, data, q, k, v):
        if case.pattern != "varlen":
            return (q, k, v)
        s, cu = case.shape, data.cu_seqlens.tolist()
        out = []
        for t in (q, k, v):  # packed [T, H, D] -> padded [S, H, max, D] (zeros past each sequence)
            padded = t.new_zeros(s.batch, t.shape[1], s.seqlen_q, t.shape[2])
            for i in range(len(cu) - 1):
                padded[i, :, :cu[i + 1] - cu[i]] = t[cu[i]:cu[i + 1]].transpose(0, 1)
            out.append(padded)
        return tuple(out)

    def _mask(self, case: Case, data: PatternData, device) -> torch.Tensor:
        need = data.dense_mask_bytes(case)
        if need > self.max_mask_bytes:
            raise Skip(f"needs a dense mask of {need / 2**20:.0f} MiB > --max-mask-mib "
                       f"{self.max_mask_bytes / 2**20:.0f}")
        return data.dense_mask(case, device)


def sdpa_backends_supported(device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """Each SDPA backend -> None if it runs a tiny plain call on ``device``, else why not."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    out: Dict[str, Optional[str]] = {}
    for name in SDPA_BACKENDS:
        try:
            enum = _sdpa_enum(name)
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([enum]):
                warnings.simplefilter("always")
                try:
                    F.scaled_dot_product_attention(q, q, q)
                    out[name] = None
                except RuntimeError as exc:
                    detail = "; ".join(str(w.message).splitlines()[0] for w in caught[:2])
                    out[name] = f"{str(exc).splitlines()[0]}{' (' + detail + ')' if detail else ''}"
        except Skip as exc:
            out[name] = str(exc)
    return out


# ---------------------------------------------------------------------------------------------
# FlexAttention
# ---------------------------------------------------------------------------------------------
_FLEX_COMPILED = None


def _flex():
    global _FLEX_COMPILED
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Skip(f"torch.nn.attention.flex_attention is not available ({exc})") from None
    if _FLEX_COMPILED is None:
        import torch._dynamo

        config = torch._dynamo.config
        config.cache_size_limit = max(getattr(config, "cache_size_limit", 8), 512)
        if hasattr(config, "accumulated_cache_size_limit"):
            config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4096)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED, create_block_mask


class FlexImpl(Impl):
    name = "flex"
    deferred = True

    def __init__(self, max_mask_bytes: int) -> None:
        super().__init__()
        self.max_mask_bytes = max_mask_bytes

    def _block_mask(self, create_block_mask, mask_mod, batch, heads, case, device, block_size=None):
        s = case.shape
        kwargs: Dict[str, object] = {"device": device}
        params = inspect.signature(create_block_mask).parameters
        if "_compile" in params and device.type == "cuda":
            kwargs["_compile"] = True  # no dense [B, H, Nq, Nk] evaluation of the mask
        if block_size is not None:
            kwargs["BLOCK_SIZE"] = block_size
        return create_block_mask(mask_mod, batch, heads, s.seqlen_q, s.seqlen_k, **kwargs)

    def prepare(self, case, data, device, grad):
        if case.pattern == "stats":
            raise Skip(NO_STATS)
        if case.pattern == "varlen":
            raise Skip("packed (varlen) batches are not expressed for FlexAttention here")
        compiled, create_block_mask = _flex()
        s = case.shape
        offset = s.seqlen_k - s.seqlen_q  # bottom-right alignment: p(i) = i + offset
        block_mask = None
        self.note = None
        if case.pattern == "causal":
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx

            block_mask = self._block_mask(create_block_mask, mask_mod, None, None, case, device)
        elif case.pattern == "window":
            window = int(case.p["window"])

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx + offset >= kv_idx) & (q_idx + offset - kv_idx <= window)

            block_mask = self._block_mask(create_block_mask, mask_mod, None, None, case, device)
        elif case.pattern == "block_sparse":
            layout = data.layout.to(device)[0]  # [H, Mb, Nb]
            bs = int(case.p["block_size"])

            def mask_mod(b, h, q_idx, kv_idx):
                return layout[h, q_idx // bs, kv_idx // bs]

            try:
                block_mask = self._block_mask(create_block_mask, mask_mod, None, s.heads_q, case, device, bs)
                self.note = f"BlockMask at the layout's block size {bs}"
            except Exception as exc:  # noqa: BLE001 - any refusal: fall back to Flex's default block
                block_mask = self._block_mask(create_block_mask, mask_mod, None, s.heads_q, case, device)
                self.note = f"BlockMask at Flex's default block size ({type(exc).__name__} at {bs})"
            else:
                # Flex may also refuse the finer BlockMask only when it runs: then use its default block size.
                default_mask = lambda: self._block_mask(create_block_mask, mask_mod, None, s.heads_q, case,  # noqa: E731
                                                        device)
                return self._with_fallback(compiled, block_mask, default_mask, s.heads_q != s.heads_kv, bs)
        elif case.pattern == "topk":
            need = data.dense_mask_bytes(case)
            if need > self.max_mask_bytes:
                raise Skip(f"top-k has no exact BlockMask; the dense per-query mask_mod needs {need / 2**20:.0f} MiB "
                           f"> --max-mask-mib {self.max_mask_bytes / 2**20:.0f}")
            dense = data.dense_mask(case, device).expand(s.batch, s.heads_q, s.seqlen_q, s.seqlen_k)

            def mask_mod(b, h, q_idx, kv_idx):
                return dense[b, h, q_idx, kv_idx]

            block_mask = self._block_mask(create_block_mask, mask_mod, s.batch, s.heads_q, case, device)
            self.note = "mask_mod over a dense per-query index mask (not an exact BlockMask)"
        kwargs: Dict[str, object] = {"block_mask": block_mask}
        if s.heads_q != s.heads_kv:
            kwargs["enable_gqa"] = True

        def forward(q, k, v):
            return compiled(q, k, v, **kwargs)

        return forward

    def _with_fallback(self, compiled, block_mask, default_mask, gqa: bool, block_size: int) -> Forward:
        state = {"mask": block_mask, "fallen_back": False}
        extra = {"enable_gqa": True} if gqa else {}

        def forward(q, k, v):
            try:
                return compiled(q, k, v, block_mask=state["mask"], **extra)
            except Exception as exc:  # noqa: BLE001
                if state["fallen_back"] or _is_oom(exc):
                    raise
                state["mask"], state["fallen_back"] = default_mask(), True
                self.note = f"BlockMask at Flex's default block size ({type(exc).__name__} at {block_size})"
                return compiled(q, k, v, block_mask=state["mask"], **extra)

        return forward


# ---------------------------------------------------------------------------------------------
# Choosing what to time
# ---------------------------------------------------------------------------------------------
PEER_NAMES = ("sdpa", *(f"sdpa:{b}" for b in SDPA_BACKENDS), "flex", "eager", "none")


def parse_peers(names: List[str]) -> List[str]:
    """Expand ``sdpa`` to every SDPA backend; validate names."""
    out: List[str] = []
    for name in names:
        name = name.strip().lower()
        if name not in PEER_NAMES:
            raise ValueError(f"peers must be among {', '.join(PEER_NAMES)}; got {name!r}")
        if name == "none":
            continue
        expanded = [f"sdpa:{b}" for b in SDPA_BACKENDS] if name == "sdpa" else [name]
        out += [e for e in expanded if e not in out]
    return out


def make_peers(names: List[str], device: torch.device, dtype: torch.dtype,
               max_mask_bytes: int) -> Tuple[List[Impl], Dict[str, str]]:
    """The peer implementations that run on ``device``, and why the others were left out."""
    impls: List[Impl] = []
    left_out: Dict[str, str] = {}
    supported = sdpa_backends_supported(device, dtype) if any(n.startswith("sdpa:") for n in names) else {}
    for name in names:
        if name.startswith("sdpa:"):
            backend = name.split(":", 1)[1]
            reason = supported.get(backend)
            if reason:
                left_out[name] = f"not supported on {device.type} ({reason.split('. ')[0][:100]})"
            else:
                impls.append(SdpaImpl(backend, max_mask_bytes))
        elif name == "flex":
            impls.append(FlexImpl(max_mask_bytes))
        elif name == "eager":
            impls.append(EagerImpl())
    return impls, left_out
