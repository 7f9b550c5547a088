"""flash-attn's ``flash_attn.bert_padding`` helpers (same names, signatures and return tuples),
in plain PyTorch: turn a padded batch ``[B, S, ...]`` plus a padding mask into flash-attn's packed
layout ``[total, ...]`` with ``cu_seqlens``, and back.

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)
    out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out_padded = pad_input(out, indices, batch, seqlen)

All are differentiable (gathers and scatters along the first axis). No einops needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class IndexFirstAxis(torch.autograd.Function):
    """``input[indices]`` along the first axis; the backward scatters into zeros."""

    @staticmethod
    def forward(ctx, input: Tensor, indices: Tensor):
        ctx.save_for_backward(indices)
        assert input.ndim >= 2, "index_first_axis: input must have at least 2 dims"
        ctx.first_axis_dim = input.shape[0]
        return input[indices]

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (indices,) = ctx.saved_tensors
        grad_input = grad_output.new_zeros((ctx.first_axis_dim, *grad_output.shape[1:]))
        grad_input[indices] = grad_output
        return grad_input, None


index_first_axis = IndexFirstAxis.apply


class IndexPutFirstAxis(torch.autograd.Function):
    """Zeros ``[first_axis_dim, ...]`` with ``values`` written at ``indices``; the backward gathers."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, first_axis_dim: int):
        ctx.save_for_backward(indices)
        assert indices.ndim == 1, "index_put_first_axis: indices must be 1-D"
        assert values.ndim >= 2, "index_put_first_axis: values must have at least 2 dims"
        output = values.new_zeros((first_axis_dim, *values.shape[1:]))
        output[indices] = values
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (indices,) = ctx.saved_tensors
        return grad_output[indices], None, None


index_put_first_axis = IndexPutFirstAxis.apply


class IndexFirstAxisResidual(torch.autograd.Function):
    """``(input[indices], input.detach())``: the second output is a residual whose gradient is added."""

    @staticmethod
    def forward(ctx, input: Tensor, indices: Tensor):
        ctx.save_for_backward(indices)
        assert input.ndim >= 2, "index_first_axis_residual: input must have at least 2 dims"
        ctx.first_axis_dim = input.shape[0]
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_residual: Tensor):
        (indices,) = ctx.saved_tensors
        grad_input = grad_residual.clone()
        grad_input.index_add_(0, indices, grad_output)
        return grad_input, None


index_first_axis_residual = IndexFirstAxisResidual.apply


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Tensor = None):
    """
    Arguments:
        hidden_states: (batch, seqlen, ...)
        attention_mask: (batch, seqlen), bool / int, 1 means valid and 0 means not valid.
        unused_mask: (batch, seqlen), bool / int, 1 means the element is allocated but unused.
    Return (flash-attn's 5-tuple):
        hidden_states: (total_nnz, ...), the tokens selected by attention_mask + unused_mask.
        indices: (total_nnz), their indices in the flattened (batch * seqlen) input.
        cu_seqlens: (batch + 1), int32, the cumulative sequence lengths.
        max_seqlen_in_batch: int
        seqused: (batch), int32, the number of tokens selected by attention_mask alone.
    """
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


def unpad_input_for_concatenated_sequences(hidden_states: Tensor, attention_mask_in_length: Tensor):
    """
    Several short samples concatenated in each row. ``attention_mask_in_length`` (batch, seqlen),
    int: row b lists the lengths of its samples, then zeros (e.g. ``[2, 3, 0, 0, 0, 0]``).
    Return (flash-attn's 4-tuple): hidden_states (total_nnz, ...), indices (total_nnz),
    cu_seqlens (samples + 1) int32, max_seqlen_in_batch int.
    """
    length = attention_mask_in_length.sum(dim=-1)
    seqlen = attention_mask_in_length.size(-1)
    positions = torch.arange(seqlen, device=length.device, dtype=length.dtype).expand(len(length), seqlen)
    attention_mask_2d = positions < length.unsqueeze(1)
    real_indices_idx = torch.nonzero(attention_mask_in_length.flatten(), as_tuple=False).flatten()
    seqlens_in_batch = attention_mask_in_length.flatten()[real_indices_idx]
    indices = torch.nonzero(attention_mask_2d.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """
    Arguments:
        hidden_states: (total_nnz, ...), the tokens selected by the attention mask.
        indices: (total_nnz), their indices in the flattened (batch * seqlen) padded input.
        batch: int, batch size of the padded result.
        seqlen: int, sequence length of the padded result.
    Return:
        hidden_states: (batch, seqlen, ...), zeros at the padding.
    """
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])


__all__ = ["index_first_axis", "index_put_first_axis", "index_first_axis_residual", "unpad_input",
           "unpad_input_for_concatenated_sequences", "pad_input", "IndexFirstAxis", "IndexPutFirstAxis",
           "IndexFirstAxisResidual"]
