"""Triton kernels of flashlite (installed as ``flashlite.kernels``).

Import this module only after deciding on ``TRITON_INTERPRET``: Triton reads it when the
kernels are decorated. On CPU tensors the kernels run in Triton's interpreter.
"""
from .launch import tile_backward, tile_config, tile_forward
from .gather_launch import gather_backward, gather_forward

__all__ = ["tile_forward", "tile_backward", "tile_config", "gather_forward", "gather_backward"]
