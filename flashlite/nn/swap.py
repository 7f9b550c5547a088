"""``flashlite.swap``: put flashlite into an existing model in one line."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple, Union

from torch import nn

from .mha import MultiheadAttention
from ..core.patterns import Pattern

logger = logging.getLogger("flashlite")


def swap(model: nn.Module, pattern: Optional[Pattern] = None, *, backend: Optional[str] = None,
         return_count: bool = False) -> Union[nn.Module, Tuple[nn.Module, int]]:
    """Replace every ``torch.nn.MultiheadAttention`` in ``model`` with ``flashlite.nn.MultiheadAttention``.

    The twins share the original parameters (same tensors, so weights, device, dtype, requires_grad
    and an optimizer holding them are kept) and training mode; modules used in several places stay
    shared. Works inside ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` / ``nn.Transformer``:
    PyTorch's fused inference path (``torch._transformer_encoder_layer_fwd``, taken under
    ``no_grad`` in eval mode, which reads the attention weights directly) is switched off for the
    swapped layers - each twin carries a no-op forward pre-hook, which that path checks for - and
    ``nn.TransformerEncoder``'s nested-tensor conversion is disabled (``use_nested_tensor=False``),
    so the swapped modules always run.

    ``need_weights``: PyTorch's ``nn.MultiheadAttention.forward`` defaults to ``need_weights=True``,
    and the attention weights exist only on flashlite's slow path (dense, the reference with the
    explicit mask). ``nn.Transformer*`` layers pass ``need_weights=False`` and stay on the kernels;
    code that calls a swapped module directly should pass ``need_weights=False`` too. A twin called
    with ``need_weights=True`` warns once (``flashlite.nn.SlowPathWarning``).

    Args:
        model: the model (modified in place), or a single ``nn.MultiheadAttention``.
        pattern: a flashlite pattern for every swapped module (None = full attention, as before).
        backend: flashlite backend name for the swapped modules (None = auto).
        return_count: also return how many modules were swapped.

    Returns the model (the twin, if ``model`` itself was an ``nn.MultiheadAttention``), or
    ``(model, count)`` with ``return_count=True``. The count is also logged (logger ``"flashlite"``,
    INFO).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a flashlite pattern or None, got {type(pattern).__name__}")
    twins: Dict[int, MultiheadAttention] = {}

    def twin_of(module: nn.MultiheadAttention) -> MultiheadAttention:
        if id(module) not in twins:
            twins[id(module)] = MultiheadAttention.from_torch(module, pattern=pattern, backend=backend)
        return twins[id(module)]

    if isinstance(model, nn.MultiheadAttention):
        model = twin_of(model)
    else:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):  # every name, also for a shared module
                if isinstance(child, nn.MultiheadAttention):
                    setattr(parent, name, twin_of(child))
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
                if any(isinstance(m, MultiheadAttention) for m in module.modules()):
                    module.use_nested_tensor = False
    count = len(twins)
    logger.info("flashlite.swap: replaced %d torch.nn.MultiheadAttention module(s); calls with need_weights=True "
                "(PyTorch's default) take the slow path - pass need_weights=False to run on the kernels", count)
    return (model, count) if return_count else model


__all__ = ["swap"]
