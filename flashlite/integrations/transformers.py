"""Hugging Face transformers: flashlite as an ``attn_implementation``.

```python
from flashlite.integrations.transformers import register
names = register()          # ["fl_attention", "fl_topk"]
model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=names[0])
# or: model.set_attn_implementation("fl_attention")
```

Names. The names contain no "flash": transformers 5 routes any implementation name containing
that substring to its own flash-attention kernel loader (``is_flash_attention_requested``),
which fails for us. So the implementation is ``"fl_attention"`` (exact attention) and
``"fl_topk"`` (top-k selected attention) - not ``"flashlite"``.

What is registered:

* an attention function through ``AttentionInterface`` (query ``[B, Hq, Sq, D]``, key/value
  ``[B, Hkv, Sk, D]`` in, ``[B, Sq, Hq, D]`` out; GQA, ``scaling``, ``softcap``,
  ``sliding_window``, ``dropout`` and learned sinks ``s_aux`` are mapped to flashlite);
* a mask function of the same name through ``AttentionMaskInterface``. Without it transformers
  passes no mask at all to an unknown implementation and padding is silently lost. The mask
  function recognises transformers' standard mask functions and returns

  - ``None`` for plain causal attention without padding (the kernel's causal schedule;
    causality then comes from ``module.is_causal``, exactly as for ``sdpa``);
  - a bool key mask ``[B, Sk]`` (True = real token) tagged with the band it belongs to (causal,
    sliding-window causal, bidirectional): padding becomes top-k indices over the kept keys and the
    band a schedule, so no ``[Sq, Sk]`` mask is built (while compiling the key mask is returned
    even when nothing is padded: whether anything is would be a value read);
  - for packed sequences (transformers detected ``position_ids`` restarting inside a row and
    built ``and_masks(<band>, packed_sequence_mask_function)``): the ``[B, S]`` sequence-id
    tensor, tagged as packed with its band;
  - anything it does not recognise (custom ``or``/``and`` mask functions, static caches whose
    queries are not aligned to the end of the keys): the dense bool mask ``sdpa`` would get, which
    flashlite serves on its slow path (plain PyTorch with the explicit mask).

Packed sequences (padding-free training, e.g. ``DataCollatorWithFlattening``: ``input_ids
[1, total]`` and ``position_ids`` restarting at each sequence) run through
:func:`flashlite.varlen_attention`: each sequence attends only to itself (with the layer's band:
causal, sliding window), and the work is the sum over the sequences. The attention function
recognises them, first match wins, from

  1. ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments (what the collator gives with
     ``return_flash_attn_kwargs=True``; any mask transformers built beside them describes the same
     packing and is not read, but a 2-D padding mask with padding in it is an error);
  2. the packed mask of the mask function above;
  3. ``position_ids`` that do not run ``0, 1, 2, ...`` along a batch of one row, with no mask (or
     a key mask with nothing padded), keys as long as the queries (no cache before them): a new
     sequence starts wherever the position does not grow by one (transformers' rule). While
     compiling no value is read, so this case is left to the mask (and a packed batch is not one
     graph: its boundaries are values).

Every mask form the attention functions receive (the tagged key mask, a 4-D bool or float mask,
a position bias) is lowered by the one mask front, :func:`flashlite.core.masks.lower`, and run by
:func:`flashlite.nn.functional.serve`. Nothing on the way reads a tensor value while compiling, so
a padded batch compiles into one graph (``torch.compile(model, fullgraph=True)``).

Every call hands the layer (the attention module) to the router as its identity for
:mod:`flashlite.heads`: while ``heads.record(model)`` runs, the layer's statistics are recorded,
and a ``head_mask`` buffer on the module (``heads.prune``) masks its heads.

On transformers 4.5x without ``AttentionMaskInterface`` the model builds its own 4-D mask, which
takes the slow path: correct, not fast.

``fl_topk``: each query attends the ``k`` keys with the highest scores (plus ``window`` recent and
``sinks`` leading keys), chosen by ``flashlite.selection``, causally, via the gather engine. Where
the sequence has at most ``k`` keys it equals exact attention. Configure with
``register(topk=..., window=..., sinks=...)``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..core.masks import Lowered, lower
from ..core.tracing import values_readable
from ..dispatch import plan as plans
from ..core.patterns import Full, Pattern, SlidingWindow, TopK
from ..heads import _hook as _heads
from ..nn import functional as FL

MAIN_NAME = "fl_attention"
TOPK_NAME = "fl_topk"

Band = Tuple[Optional[int], Optional[int]]  # (left, right); None = unbounded
_CAUSAL_BAND: Band = (None, 0)
_FULL_BAND: Band = (None, None)
_MAX_CACHED_SCHEDULES = 64


@dataclass
class TopKSettings:
    """What ``fl_topk`` selects: ``k`` keys by score, plus ``window`` recent and ``sinks`` leading keys."""

    k: int = 64
    window: int = 0
    sinks: int = 0
    block_size: Optional[int] = None


_settings = TopKSettings()
_backend: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Patterns (shared objects, so their schedules are cached across layers and steps)
# ---------------------------------------------------------------------------------------------
_patterns: Dict[Band, Pattern] = {}


def _pattern_for(band: Band) -> Pattern:
    pattern = _patterns.get(band)
    if pattern is None:
        left, right = band
        if left is None:
            pattern = Full(causal=right == 0) if right in (0, None) else SlidingWindow(1 << 30, right)
        else:
            pattern = SlidingWindow(left, right if right is not None else 1 << 30)
        _patterns[band] = pattern
    # Decode steps see a new key length every step; keep the per-size schedule cache bounded.
    schedules = getattr(pattern, "_schedules", None)
    if isinstance(schedules, dict) and len(schedules) > _MAX_CACHED_SCHEDULES:
        schedules.clear()
    return pattern


def _module_band(module, is_causal: Optional[bool], sliding_window: Optional[int]) -> Band:
    """The band a layer asks for through its attributes / call arguments (as ``sdpa`` reads them)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if sliding_window:
        # transformers: causal window keeps kv > q - w; bidirectional keeps |q - kv| <= w.
        return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
    return _CAUSAL_BAND if causal else _FULL_BAND


# ---------------------------------------------------------------------------------------------
# Mask function (AttentionMaskInterface)
# ---------------------------------------------------------------------------------------------
def _recognise(mask_function) -> Optional[Band]:
    """The band of transformers' standard mask functions, or None for anything else."""
    try:
        from transformers import masking_utils as mu
    except ImportError:  # pragma: no cover
        return None
    if mask_function is None or mask_function is mu.causal_mask_function:
        return _CAUSAL_BAND
    if mask_function is getattr(mu, "bidirectional_mask_function", None):
        return _FULL_BAND
    and_masks = getattr(mu, "and_masks", None)
    code = getattr(mask_function, "__code__", None)
    if and_masks is None or code is None or code is not and_masks(mu.causal_mask_function).__code__:
        return None
    parts = inspect.getclosurevars(mask_function).nonlocals.get("mask_functions", ())
    if len(parts) != 2 or not hasattr(parts[0], "__code__"):
        return None
    window = inspect.getclosurevars(parts[0]).nonlocals.get("sliding_window")
    if not isinstance(window, int) or window < 1:
        return None
    causal_overlay = getattr(mu, "sliding_window_overlay", None)
    if parts[1] is mu.causal_mask_function and causal_overlay is not None \
            and parts[0].__code__ is causal_overlay(1).__code__:
        return (window - 1, 0)
    bidi_overlay = getattr(mu, "sliding_window_bidirectional_overlay", None)
    if parts[1] is getattr(mu, "bidirectional_mask_function", None) and bidi_overlay is not None \
            and parts[0].__code__ is bidi_overlay(1).__code__:
        return (window, window)
    return None


def _recognise_packed(mask_function) -> Optional[Tuple[Band, Tensor]]:
    """(band, sequence ids ``[B, S]``) of transformers' packed-sequence mask
    ``and_masks(remap_positions_for_packed_sequence(<standard band>), packed_sequence_mask_function(ids))``."""
    try:
        from transformers import masking_utils as mu
    except ImportError:  # pragma: no cover
        return None
    packed_fn = getattr(mu, "packed_sequence_mask_function", None)
    remap_fn = getattr(mu, "remap_positions_for_packed_sequence", None)
    and_masks = getattr(mu, "and_masks", None)
    code = getattr(mask_function, "__code__", None)
    if None in (packed_fn, remap_fn, and_masks, code) or code is not and_masks(mu.causal_mask_function).__code__:
        return None
    parts = inspect.getclosurevars(mask_function).nonlocals.get("mask_functions", ())
    if len(parts) != 2 or not all(hasattr(part, "__code__") for part in parts):
        return None
    dummy = torch.zeros(1, 1, dtype=torch.long)
    if parts[1].__code__ is not packed_fn(dummy).__code__ or parts[0].__code__ is not remap_fn(None, dummy).__code__:
        return None
    ids = inspect.getclosurevars(parts[1]).nonlocals.get("packed_sequence_mask")
    base = inspect.getclosurevars(parts[0]).nonlocals.get("mask_function")
    band = _recognise(base)
    if band is None or not isinstance(ids, Tensor) or ids.dim() != 2:
        return None
    return band, ids


def _as_int(value) -> Optional[int]:
    if isinstance(value, int):
        return value
    if isinstance(value, Tensor) and value.numel() == 1 and not torch.compiler.is_compiling():
        return int(value)
    return None


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Optional[Tensor] = None, local_size: Optional[int] = None,
                   allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                   use_vmap: bool = False, device="cpu", **kwargs):
    """The mask function registered with ``AttentionMaskInterface`` (see the module docstring)."""
    offset = _as_int(q_offset)
    packed = None if use_vmap or attention_mask is not None else _recognise_packed(mask_function)
    if packed is not None and offset == 0 and kv_offset == 0 and q_length == kv_length \
            and values_readable(packed[1]):
        band, ids = packed
        ids = ids.to(device=device, copy=True)  # its own tensor: the tag below is per mask, not per ids
        plans.derived(("transformers-packed",), (ids,), lambda: band)  # read by _packing
        return ids
    band = None if use_vmap else _recognise(mask_function)
    aligned = offset is not None and offset + q_length == kv_offset + kv_length
    if band is not None and (aligned or band == _FULL_BAND):
        keep = None
        if attention_mask is not None:
            from transformers.masking_utils import prepare_padding_mask

            padded = prepare_padding_mask(attention_mask, kv_length, kv_offset)
            keep = padded[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
        # While compiling nothing may be read back: a key mask is then kept (the front lowers
        # it to fixed-width top-k indices, exact whether or not anything is padded).
        all_kept = keep is None or (values_readable(keep) and bool(keep.all()))
        if all_kept and band == _CAUSAL_BAND:
            return None
        if all_kept and band == _FULL_BAND and allow_is_bidirectional_skip:
            return None
        if keep is None:
            keep = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        plans.derived(("transformers-mask",), (keep,), lambda: (band, all_kept))  # read by _resolve
        return keep
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                     use_vmap=use_vmap, device=device)


# ---------------------------------------------------------------------------------------------
# Attention functions (AttentionInterface)
# ---------------------------------------------------------------------------------------------
def _cu_from_ids(ids: Tensor) -> Tuple[Tensor, int]:
    """Sequence ids ``[B, S]`` (equal ids = one sequence, each row on its own) -> int32 cu_seqlens
    over the flattened ``B·S`` tokens, and the longest sequence."""
    batch, seqlen = ids.shape
    flat = (ids.long() + torch.arange(batch, device=ids.device).view(-1, 1) * (seqlen + 1)).reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    cu = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max()) if cu.numel() > 1 else 0


def _ids_from_positions(position_ids: Tensor) -> Tensor:
    """transformers' rule: a new sequence starts wherever the position does not grow by one."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def _packed_keep(ids: Tensor, band: Band, seqlen: int, device) -> Tensor:
    """The dense ``[B, 1, S, S]`` keep-mask of a packed batch (for the paths without a packed kernel)."""
    same = ids[:, None, :, None] == ids[:, None, None, :]
    return same & _pattern_for(band).dense_mask(1, 1, 1, seqlen, seqlen, device)


def _packing(module, query: Tensor, key: Tensor, mask, is_causal, sliding_window, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k, band) when the call carries packed sequences, else None."""
    band = plans.recall(("transformers-packed",), (mask,)) if isinstance(mask, Tensor) and mask.dim() == 2 else None
    given = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in given):
        if isinstance(mask, Tensor) and mask.dim() == 2 and band is None and values_readable(mask) \
                and not bool(mask.all()):
            raise ValueError(f"{MAIN_NAME}: packed sequences (cu_seq_lens_q/k) together with a padding mask: "
                             f"remove the padding (flashlite.compat.bert_padding.unpad_input) or the mask")
        cu_q, cu_k, max_q, max_k = given
        band = band or _module_band(module, is_causal, sliding_window)
        return cu_q.to(torch.int32), cu_k.to(torch.int32), _as_int(max_q), _as_int(max_k), band
    if band is not None:
        cu, longest = plans.derived(("transformers-packed-cu",), (mask,), lambda: _cu_from_ids(mask))
        return cu, cu, longest, longest, band
    position_ids = kwargs.get("position_ids")
    if isinstance(mask, Tensor) and mask.dim() == 2:  # a key mask: only one with nothing padded
        band, all_kept = plans.recall(("transformers-mask",), (mask,)) or (None, False)
        mask = None if all_kept else mask
    if mask is not None or not isinstance(position_ids, Tensor) or query.shape[0] != 1 \
            or query.shape[2] < 2 or key.shape[2] != query.shape[2] or not values_readable(position_ids):
        return None
    position_ids = position_ids.reshape(1, -1)
    if position_ids.shape[1] != query.shape[2]:
        return None
    ids = _ids_from_positions(position_ids)
    if not bool(ids[0, -1]):  # one sequence: the ordinary path
        return None
    cu, longest = _cu_from_ids(ids)
    return cu, cu, longest, longest, band or _module_band(module, is_causal, sliding_window)


def _run_packed(query, key, value, packing, scaling, softcap, dropout, s_aux, head_mask=None) -> Tensor:
    """Packed sequences through flashlite.varlen_attention; ``[B, S, Hq, D]`` out. ``head_mask``:
    ``[Hq]`` (the layer's, flashlite.heads), passed through."""
    from ..api import varlen_attention

    cu_q, cu_k, max_q, max_k, band = packing
    batch, heads_q, seqlen_q, head_dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    kw = dict(max_seqlen_q=max_q, max_seqlen_k=max_k, scale=scaling, softcap=softcap, backend=_backend,
              head_mask=head_mask)
    if dropout:
        kw["dropout_p"] = dropout
    if s_aux is None:
        out = varlen_attention(q, k, v, cu_q, cu_k, _pattern_for(band), **kw)
    else:
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, _pattern_for(band), return_lse=True, **kw)
        gate = torch.sigmoid(lse - s_aux.float().view(1, -1))  # [T, Hq]: the sink joins each row's softmax
        out = (out.float() * gate.unsqueeze(-1)).to(out.dtype)
    return out.reshape(batch, seqlen_q, heads_q, head_dim)


def _resolve(module, query: Tensor, key: Tensor, mask, is_causal, sliding_window):
    """-> (pattern, key_keep [B, Sk] | None, keep 4-D bool | None, bias 4-D float | None)."""
    seqlen_k = key.shape[2]
    if isinstance(mask, Tensor) and mask.dim() == 2:
        packed_band = plans.recall(("transformers-packed",), (mask,))
        if packed_band is not None:  # a packed mask on a path without the packed kernel: dense
            return None, None, _packed_keep(mask, packed_band, seqlen_k, key.device), None
    if mask is None:
        return _pattern_for(_module_band(module, is_causal, sliding_window)), None, None, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{MAIN_NAME}: attention_mask must be a tensor or None, got {type(mask).__name__} "
                        f"(masks built for another attn_implementation?)")
    if mask.dim() == 2:
        band, all_kept = plans.recall(("transformers-mask",), (mask,)) or (None, False)
        if band is None:
            band = _module_band(module, is_causal, sliding_window)
        pattern = _pattern_for(band)
        if all_kept:
            return pattern, None, None, None
        if mask.shape[-1] != seqlen_k:
            if mask.shape[-1] < seqlen_k:
                raise ValueError(f"{MAIN_NAME}: 2-D attention_mask has {mask.shape[-1]} keys, the layer {seqlen_k}")
            mask = mask[:, -seqlen_k:]
        return pattern, mask.to(torch.bool), None, None
    if mask.dim() != 4:
        raise ValueError(f"{MAIN_NAME}: attention_mask must be None, [B, Sk] or [B, 1|H, Sq, Sk], "
                         f"got shape {tuple(mask.shape)}")
    mask = mask[..., :seqlen_k]
    if mask.dtype == torch.bool:
        return None, None, mask, None
    return None, None, None, mask


def _lower(query: Tensor, key: Tensor, value: Tensor, pattern: Optional[Pattern], key_keep: Optional[Tensor],
           keep: Optional[Tensor], bias: Optional[Tensor], dropout: float) -> Lowered:
    """The mask front for one layer. A key mask alone (the common case: every layer of one forward
    shares it) is lowered once per mask tensor (and version) in eager mode, kept in the plan cache."""
    dense = FL.needs_slow_path(query, key, value, dropout)
    if key_keep is not None and keep is None and bias is None and not dense:
        values = ("transformers-lowered", pattern.cache_key() if pattern is not None else None, query.shape[0],
                  query.shape[2], key.shape[2])
        tensors = (key_keep,) + (pattern.tensors() if pattern is not None else ())
        return plans.derived(values, tensors, lambda: lower(query, key, pattern=pattern, key_padding_mask=key_keep))
    return lower(query, key, pattern=pattern, attn_mask=keep, key_padding_mask=key_keep, attn_bias=bias, dense=dense)


def _finish(out: Tensor) -> Tuple[Tensor, None]:
    """``[B, Hq, Sq, D]`` -> ``[B, Sq, Hq, D]`` contiguous, as transformers expects."""
    return out.transpose(1, 2).contiguous(), None


def _run(module, query, key, value, pattern, key_keep, keep, bias, scaling, softcap, dropout, s_aux):
    lowered = _lower(query, key, value, pattern, key_keep, keep, bias, dropout)
    if s_aux is None:
        out, _ = FL.serve(query, key, value, lowered, scale=scaling, softcap=softcap, dropout_p=dropout,
                          backend=_backend, layer=module)
        return out
    if lowered.dense or dropout >= 1.0:
        raise ValueError(f"{MAIN_NAME}: learned sinks (s_aux) are supported with causal / sliding-window / "
                         f"padding masks and dropout < 1, not with dense masks")
    # Sink logit s per head joins the softmax denominator: out·e^lse / (e^lse + e^s) = out·sigmoid(lse − s)
    # (with dropout too: out is Σ P·Z·v over the undropped l, and lse is the undropped one).
    out, lse = FL.serve(query, key, value, lowered, scale=scaling, softcap=softcap, dropout_p=dropout,
                        backend=_backend, return_lse=True, layer=module)
    gate = torch.sigmoid(lse - s_aux.float().view(1, -1, 1))
    return (out.float() * gate.unsqueeze(-1)).to(out.dtype)


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                      scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                      s_aux: Optional[Tensor] = None, position_bias: Optional[Tensor] = None, **kwargs):
    """``"fl_attention"``: exact attention on flashlite for a transformers attention layer."""
    if kwargs.get("cache") is not None and type(kwargs["cache"]).__name__ == "PagedAttentionCache":
        raise ValueError(f"{MAIN_NAME} does not support transformers' paged (continuous batching) cache")
    if position_bias is None:
        packing = _packing(module, query, key, attention_mask, is_causal, sliding_window, kwargs)
        if packing is not None:
            mask = _heads.packed_mask(module, query) if _heads.engaged(module) else None
            out = _run_packed(query, key, value, packing, scaling, softcap, float(dropout or 0.0), s_aux, mask)
            return out, None
    pattern, key_keep, keep, bias = _resolve(module, query, key, attention_mask, is_causal, sliding_window)
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    out = _run(module, query, key, value, pattern, key_keep, keep, bias, scaling, softcap, float(dropout or 0.0),
               s_aux)
    return _finish(out)


def topk_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                           dropout: float = 0.0, scaling: Optional[float] = None,
                           sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                           is_causal: Optional[bool] = None, **kwargs):
    """``"fl_topk"``: each query attends its top-``k`` keys by score (plus window / sinks), causally."""
    settings = _settings
    if key.shape[2] <= settings.k:
        return attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs)
    from ..nn.modules import TopKAttention

    selector = TopKAttention(window=settings.window, sinks=settings.sinks, k=settings.k, causal=True,
                             block_size=settings.block_size)
    pattern: Pattern = TopK(selector.select(query, key), causal=True)
    base, key_keep, keep, bias = _resolve(module, query, key, attention_mask, is_causal, sliding_window)
    if base is not None and not (isinstance(base, Full)):
        band = base.dense_mask(1, 1, 1, query.shape[2], key.shape[2], query.device)
        keep = band if keep is None else keep & band
    dropout = float(dropout or 0.0)
    lowered = lower(query, key, pattern=pattern, attn_mask=keep, key_padding_mask=key_keep, attn_bias=bias,
                    dense=FL.needs_slow_path(query, key, value, dropout))
    out, _ = FL.serve(query, key, value, lowered, scale=scaling, softcap=softcap, dropout_p=dropout,
                      backend=_backend, layer=module)
    return _finish(out)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def register(*, topk: int = 64, window: int = 0, sinks: int = 0, block_size: Optional[int] = None,
             backend: Optional[str] = None) -> List[str]:
    """Register flashlite with transformers; returns ``["fl_attention", "fl_topk"]`` (main name first).

    Args:
        topk, window, sinks, block_size: what ``fl_topk`` selects (see :class:`TopKSettings`).
        backend: flashlite backend for both (None = auto; ``FLASHLITE_BACKEND`` also works).

    Raises ImportError (naming the extra) if transformers is not installed.
    """
    global _settings, _backend
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError("flashlite.integrations.transformers needs transformers>=4.50: "
                          "pip install 'flashlite[transformers]'") from exc
    for name, value in (("topk", topk), ("window", window), ("sinks", sinks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "topk" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'topk' else 0}, got {value!r}")
    _settings = TopKSettings(k=topk, window=window, sinks=sinks, block_size=block_size)
    _backend = backend
    # Load the backends now (the C++ extension is imported on first need): a model's first call
    # may come under torch.compile, where importing it inside the trace would break the graph.
    from .. import backends

    backends()
    AttentionInterface.register(MAIN_NAME, attention_forward)
    AttentionInterface.register(TOPK_NAME, topk_attention_forward)
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # transformers < 4.53: models build their own 4-D masks (slow path, still exact)
        AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(MAIN_NAME, attention_mask)
        AttentionMaskInterface.register(TOPK_NAME, attention_mask)
    return [MAIN_NAME, TOPK_NAME]


__all__ = ["register", "attention_forward", "topk_attention_forward", "attention_mask", "MAIN_NAME", "TOPK_NAME",
           "TopKSettings"]
