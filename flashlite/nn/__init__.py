"""``flashlite.nn``: drop-in modules.

* ``Attention(pattern)`` and ``FlashAttention``, ``SlidingWindowAttention``,
  ``BlockSparseAttention``, ``TopKAttention`` - the core op as modules;
* ``MultiheadAttention`` - a twin of ``torch.nn.MultiheadAttention`` (same constructor, forward
  and state_dict) running on flashlite (``SlowPathWarning``: a call only the slow path serves,
  e.g. ``need_weights=True``);
* ``functional.scaled_dot_product_attention`` - PyTorch's signature and semantics.
"""
from . import functional
from .mha import MultiheadAttention, SlowPathWarning
from .modules import Attention, BlockSparseAttention, FlashAttention, SlidingWindowAttention, TopKAttention

__all__ = ["Attention", "FlashAttention", "SlidingWindowAttention", "BlockSparseAttention", "TopKAttention",
           "MultiheadAttention", "SlowPathWarning", "functional"]
