"""``flashlite.nn.MultiheadAttention``: a twin of ``torch.nn.MultiheadAttention``.

Same constructor, same ``forward`` signature and return values, same parameters and
``state_dict`` keys, so ``twin.load_state_dict(torch_mha.state_dict())`` works (strict) and the
outputs match. The attention itself runs on flashlite:

Every mask form is lowered by the one mask front, :func:`flashlite.core.masks.lower`
(``true_means="masked"``: PyTorch's bool masks are True where a key is *hidden*):

* no mask, ``is_causal=True`` or a causal ``attn_mask`` -> the kernels' full / causal schedules
  (a causal mask is recognised and never used densely; PyTorch's top-left alignment is kept);
* ``key_padding_mask`` -> top-k indices over the kept keys (still a kernel, no dense mask);
* dropout in training mode -> flashlite's attention dropout (``dropout_p``), on the kernels when
  nothing else needs the slow path;
* other ``attn_mask``\\ s (bool or float) and ``need_weights=True`` ->
  the slow path: ``flashlite.reference.attention`` with the explicit mask
  (``flashlite.nn.functional.dense_attention``). ``need_weights=True`` is PyTorch's default: each
  module warns once (:class:`SlowPathWarning`) when it is called with it; pass
  ``need_weights=False`` (as ``nn.TransformerEncoderLayer`` does) to stay on the kernels.

Differences from PyTorch, all deliberate: ``is_causal=True`` does not need an ``attn_mask`` (the
hint is trusted, as on PyTorch's own fast path); a query that sees no key returns zeros, not NaN;
nested tensors are not taken. ``pattern=`` (a flashlite pattern) restricts every head to that
pattern on top of the masks.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from ..core.masks import lower
from ..core.patterns import Pattern
from . import functional as FL

# need_weights materialises [B, H, Nq, Nk]; above this many elements ask for need_weights=False.
MAX_WEIGHT_ELEMENTS = 1 << 30


class SlowPathWarning(UserWarning):
    """A flashlite module was asked for something only the slow path (dense, O(Nq·Nk)) serves."""


_NEED_WEIGHTS_MESSAGE = (
    "flashlite.nn.MultiheadAttention{shape} was called with need_weights=True (PyTorch's default): the "
    "attention weights are computed densely on the slow path (flashlite.reference.attention with the explicit "
    "mask, not the kernels). Pass need_weights=False to run on flashlite's kernels. (Warned once per module.)")


def _visible_columns(mask: Optional[Tensor], extra: int) -> Optional[Tensor]:
    """A PyTorch-convention mask with ``extra`` key columns appended that hide nothing."""
    if mask is None:
        return None
    return F.pad(mask, (0, extra), value=False if mask.dtype == torch.bool else 0.0)


def _keep_off_fused_paths(module, args):
    """A no-op forward pre-hook. Its presence makes ``nn.TransformerEncoderLayer`` skip its fused
    inference path (``torch._transformer_encoder_layer_fwd``), which would read this module's
    weights and bypass ``forward`` - i.e. bypass flashlite."""
    return None


class MultiheadAttention(nn.Module):
    """Multi-head attention on flashlite kernels; a drop-in for ``torch.nn.MultiheadAttention``.

    Args (as PyTorch's): embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
    vdim, batch_first, device, dtype. Keyword-only extras:
        pattern: a flashlite pattern (``SlidingWindow``, ``BlockSparse``, ``TopK``...) every head
            attends over, on top of the masks; None = full attention (PyTorch's behaviour).
        backend: flashlite backend name or None (auto).
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 pattern: Optional[Pattern] = None, backend: Optional[str] = None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a flashlite pattern or None, got {type(pattern).__name__}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")

        if not self._qkv_same_embed_dim:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.pattern = pattern
        self.backend = backend
        self._warned_need_weights = False
        self.register_buffer("head_mask", None, persistent=False)  # flashlite.heads.prune: bool/float [num_heads]
        self._reset_parameters()
        self.register_forward_pre_hook(_keep_off_fused_paths)

    def _reset_parameters(self) -> None:
        """PyTorch's initialisation (xavier-uniform projections, zero biases)."""
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, pattern: Optional[Pattern] = None,
                   backend: Optional[str] = None) -> "MultiheadAttention":
        """A twin that *shares* ``mha``'s parameters (same tensors: device, dtype, requires_grad and
        any optimizer holding them are kept) and its training mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        twin = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                   add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                   vdim=mha.vdim, batch_first=mha.batch_first, device="meta", pattern=pattern, backend=backend)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v"):
            setattr(twin, name, getattr(mha, name))
        twin.out_proj = mha.out_proj
        twin.train(mha.training)
        return twin

    def __setstate__(self, state):
        if "_qkv_same_embed_dim" not in state:
            state["_qkv_same_embed_dim"] = True
        super().__setstate__(state)

    def extra_repr(self) -> str:
        extra = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
        if self.pattern is not None:
            extra += f", pattern={self.pattern!r}"
        return extra

    def _warn_need_weights(self) -> None:
        """Say once per module that need_weights=True takes the slow path (not while compiling)."""
        if self._warned_need_weights or torch.compiler.is_compiling():
            return
        self._warned_need_weights = True
        warnings.warn(_NEED_WEIGHTS_MESSAGE.format(shape=f"(embed_dim={self.embed_dim}, num_heads={self.num_heads})"),
                      SlowPathWarning, stacklevel=6)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, head_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """As ``torch.nn.MultiheadAttention.forward``: returns ``(attn_output, attn_weights or None)``.
        ``head_mask`` (flashlite's, bool or float ``[num_heads]`` / ``[B, num_heads]``) overrides the
        module's ``head_mask`` buffer (``flashlite.heads.prune``): a False head does no work."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("flashlite.nn.MultiheadAttention does not take nested tensors; if this came from "
                             "nn.TransformerEncoder, set its use_nested_tensor=False (flashlite.swap does)")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value must all be 3-D (batched) or 2-D (unbatched), got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        is_batched = query.dim() == 3
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if need_weights:
            self._warn_need_weights()
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal, head_mask)
        if not is_batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """In-projections on ``[B, S, E]`` inputs (one matmul for self-attention, as PyTorch)."""
        bias = self.in_proj_bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
            if key is value:
                w_kv = self.in_proj_weight[self.embed_dim:]
                b_kv = bias[self.embed_dim:] if bias is not None else None
                k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
                return F.linear(query, w_q, b_q), k, v
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal, head_mask=None):
        batch, seqlen_q, embed = query.shape
        seqlen_k = key.shape[1]
        if embed != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got {embed}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != batch:
            raise ValueError(f"key and value must share batch and sequence dims with each other and query's batch; "
                             f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)

        # Masks stay in PyTorch's convention (bool True = hidden, float added) until the front
        # lowers them: key_padding_mask [B, S], attn_mask [1|B, 1|H, L, S].
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seqlen_k):
            raise ValueError(f"key_padding_mask must have shape ({batch}, {seqlen_k}), "
                             f"got {tuple(key_padding_mask.shape)}")
        causal = bool(is_causal)
        mask = None
        if attn_mask is not None and not causal:  # with is_causal the hint is trusted
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (seqlen_q, seqlen_k):
                    raise ValueError(f"a 2-D attn_mask must have shape ({seqlen_q}, {seqlen_k}), "
                                     f"got {tuple(attn_mask.shape)}")
                mask = attn_mask[None, None]
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (batch * heads, seqlen_q, seqlen_k):
                    raise ValueError(f"a 3-D attn_mask must have shape ({batch * heads}, {seqlen_q}, {seqlen_k}), "
                                     f"got {tuple(attn_mask.shape)}")
                mask = attn_mask.view(batch, heads, seqlen_q, seqlen_k)
            else:
                raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (B*num_heads, L, S), got {attn_mask.dim()}-D")

        # Extra key columns (bias_k / zero attention) are visible to every query, as in PyTorch.
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            extra += 1
        q = q.view(batch, seqlen_q, heads, head_dim).transpose(1, 2)
        k = k.view(batch, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(batch, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            extra += 1

        if extra:
            key_padding_mask = _visible_columns(key_padding_mask, extra)
            mask = _visible_columns(mask, extra)
            # PyTorch drops the mask and runs top-left causal over *all* keys (the extra columns
            # included) only for the is_causal hint without padding or weights; otherwise its mask
            # is causal over the original keys with the extra columns visible.
            if causal and not (key_padding_mask is None and not need_weights):
                hidden = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).triu(1)
                mask, causal = _visible_columns(hidden, extra)[None, None], False

        if need_weights and batch * heads * seqlen_q * k.shape[2] > MAX_WEIGHT_ELEMENTS:
            raise ValueError(f"need_weights=True would materialise {batch}x{heads}x{seqlen_q}x{k.shape[2]} attention "
                             f"weights; pass need_weights=False to use the kernels")
        dropout_p = self.dropout if self.training else 0.0
        lowered = lower(q, k, pattern=self.pattern, attn_mask=mask, key_padding_mask=key_padding_mask,
                        is_causal=causal, true_means="masked",
                        dense=FL.needs_slow_path(q, k, v, dropout_p, need_weights))
        out, weights = FL.serve(q, k, v, lowered, dropout_p=dropout_p, need_weights=need_weights,
                                backend=self.backend, layer=self, head_mask=head_mask)
        out = out.transpose(1, 2).reshape(batch, seqlen_q, embed)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        """As ``torch.nn.MultiheadAttention.merge_masks`` (kept for code that calls it)."""
        return nn.MultiheadAttention.merge_masks(self, attn_mask, key_padding_mask, query)  # type: ignore[arg-type]


__all__ = ["MultiheadAttention", "SlowPathWarning", "MAX_WEIGHT_ELEMENTS"]
