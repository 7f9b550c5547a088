"""Ring attention: K/V shards travel around the ring of ranks, each rank merges its partial
outputs by their log-sum-exp; the backward sends K/V around again with a dK/dV accumulator.

Forward, rank ``r``, steps ``s = 0 .. S``: it holds the K/V shard of rank ``r − s`` (its own at
``s = 0``). Before running the kernel on it, it posts the transfer of that shard to ``r + 1`` and
the receipt of the next one from ``r − 1`` (``batch_isend_irecv``), so the transfer runs under
the kernel. Shard pairs the pattern cannot see are not computed (``ShardedPattern``), and the ring
stops after the last step at which any rank still needs a shard (``S`` = the largest ring
distance of a visible pair), so a causal window sends one shard, not ``P − 1``.

Partial results merge exactly: with running ``(o, l)`` and a partial ``(o', l')``,
``l* = log(e^l + e^l')``, ``o* = (e^l·o + e^l'·o') / e^l*``; rows that see nothing keep ``l = −∞`` and
``o = 0`` (no NaN: the weights are formed against a finite maximum).

Backward (the ring-flash-attn scheme): K/V travel the same way; at each step rank ``r`` computes
``run_backward`` of its queries against the visiting shard with the *merged* ``out`` and ``lse``
(the softmax normalizer of the whole row), keeps ``dq``, and adds its ``dk, dv`` to the float32
accumulator that travels with the shard (posted after the step's kernel, received during the next
step's). After the last step the accumulator goes straight back to the shard's owner.
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from .comm import Stats, exchange
from .pairs import ShardedPattern


class RingConfig:
    """Everything the ring needs besides q, k, v (one per call)."""

    def __init__(self, sharded: ShardedPattern, group, rank: int, world_size: int, scale: float, softcap: float,
                 backend: Optional[str], stats: Stats, deterministic: bool = True) -> None:
        self.sharded, self.group, self.rank, self.world_size = sharded, group, rank, world_size
        self.scale, self.softcap, self.backend, self.stats = scale, softcap, backend, stats
        self.deterministic = deterministic
        visible = sharded.visible(group)
        self.visible = visible
        # ring distance of each visible pair: q rank r sees the shard of r − s at step s
        reach = [(q - k) % world_size for q in range(world_size) for k in range(world_size) if visible[q][k]]
        self.last_step = max(reach, default=0)
        self._calls = {}

    def calls(self, src: int):
        """This rank's kernel calls against rank ``src``'s shard (built once, reused by the backward)."""
        if src not in self._calls:
            self._calls[src] = self.sharded.calls(src) if self.visible[self.rank][src] else []
        return self._calls[src]


def _merge(out_acc: Tensor, lse_acc: Tensor, out_p: Tensor, lse_p: Tensor) -> None:
    """Merge a partial (out, lse) into the float32 accumulators, in place."""
    top = torch.maximum(lse_acc, lse_p)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w_acc, w_p = torch.exp(lse_acc - top), torch.exp(lse_p - top)
    total = w_acc + w_p
    lse_acc.copy_(top + torch.log(total))  # total == 0 -> -inf
    safe = torch.where(total == 0, torch.ones_like(total), total)
    out_acc.mul_((w_acc / safe).unsqueeze(-1)).add_(out_p.float() * (w_p / safe).unsqueeze(-1))


def _rows(t: Tensor, lo: int, hi: int) -> Tensor:
    return t if (lo == 0 and hi == t.shape[2]) else t[:, :, lo:hi]


def _post_kv(cfg: RingConfig, k: Tensor, v: Tensor, phase: str):
    """Post sending (k, v) to the next rank and receiving the next shard from the previous one."""
    size, rank = cfg.world_size, cfg.rank
    k_next, v_next = torch.empty_like(k), torch.empty_like(v)
    return exchange([(k, (rank + 1) % size), (v, (rank + 1) % size)],
                    [(k_next, (rank - 1) % size), (v_next, (rank - 1) % size)], cfg.group, cfg.stats, phase)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, cfg: RingConfig) -> Tuple[Tensor, Tensor]:
    stats, size, rank = cfg.stats, cfg.world_size, cfg.rank
    out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    computed = 0
    for step in range(cfg.last_step + 1):
        src = (rank - step) % size
        pending = _post_kv(cfg, k_cur, v_cur, "forward") if step < cfg.last_step else None
        start = time.perf_counter()
        calls = cfg.calls(src)
        for call in calls:
            qc, kc, vc = _rows(q, call.q0, call.q1), _rows(k_cur, call.k0, call.k1), _rows(v_cur, call.k0, call.k1)
            stats.record_call("forward", call.pattern, qc, kc)
            out_p, lse_p = dispatch.run(qc, kc, vc, call.pattern, scale=cfg.scale, softcap=cfg.softcap,
                                        alibi_slopes=None, backend=cfg.backend, deterministic=cfg.deterministic)
            _merge(_rows(out_acc, call.q0, call.q1), lse_acc[:, :, call.q0:call.q1], out_p, lse_p)
        computed += bool(calls)
        stats.add("forward", "compute_s", time.perf_counter() - start)
        if pending is not None:
            pending.wait()
            k_cur, v_cur = pending.buffers
    stats.set("forward", "steps", cfg.last_step + 1)
    stats.set("forward", "pairs_computed", computed)
    stats.set("forward", "pairs_skipped", size - computed)
    return out_acc.to(q.dtype), lse_acc


def ring_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  cfg: RingConfig) -> Tuple[Tensor, Tensor, Tensor]:
    stats, size, rank = cfg.stats, cfg.world_size, cfg.rank
    grad_out = grad_out.contiguous()
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_acc = dv_acc = None  # the accumulator of the shard held now (float32)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    grads_pending = None
    computed = 0
    for step in range(cfg.last_step + 1):
        src = (rank - step) % size
        kv_pending = _post_kv(cfg, k_cur, v_cur, "backward") if step < cfg.last_step else None
        start = time.perf_counter()
        calls = cfg.calls(src)
        dk_step = dv_step = None
        for call in calls:
            qc, kc, vc = _rows(q, call.q0, call.q1), _rows(k_cur, call.k0, call.k1), _rows(v_cur, call.k0, call.k1)
            stats.record_call("backward", call.pattern, qc, kc)
            dq_p, dk_p, dv_p = dispatch.run_backward(
                _rows(grad_out, call.q0, call.q1), qc, kc, vc, _rows(out, call.q0, call.q1),
                lse[:, :, call.q0:call.q1], call.pattern, scale=cfg.scale, softcap=cfg.softcap, alibi_slopes=None,
                backend=cfg.backend, deterministic=cfg.deterministic)
            _rows(dq_acc, call.q0, call.q1).add_(dq_p)
            if dk_step is None:
                dk_step = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
                dv_step = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            _rows(dk_step, call.k0, call.k1).add_(dk_p)
            _rows(dv_step, call.k0, call.k1).add_(dv_p)
        computed += bool(calls)
        stats.add("backward", "compute_s", time.perf_counter() - start)
        # the accumulator of this step's shard arrives from the previous rank (nothing at step 0)
        if grads_pending is not None:
            grads_pending.wait()
            dk_acc, dv_acc = grads_pending.buffers
        if dk_step is not None:
            dk_acc = dk_step if dk_acc is None else dk_acc.add_(dk_step)
            dv_acc = dv_step if dv_acc is None else dv_acc.add_(dv_step)
        if dk_acc is None:  # nobody has touched this shard yet: send zeros along
            dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        if step < cfg.last_step:
            grads_pending = _post_grads(cfg, dk_acc, dv_acc, (rank + 1) % size, (rank - 1) % size)
            kv_pending.wait()
            k_cur, v_cur = kv_pending.buffers
    # the accumulator now held is that of rank (rank − last_step)'s shard: send it home
    if cfg.last_step:
        home = _post_grads(cfg, dk_acc, dv_acc, (rank - cfg.last_step) % size, (rank + cfg.last_step) % size)
        home.wait()
        dk_acc, dv_acc = home.buffers
    stats.set("backward", "steps", cfg.last_step + 1)
    stats.set("backward", "pairs_computed", computed)
    stats.set("backward", "pairs_skipped", size - computed)
    return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


def _post_grads(cfg: RingConfig, dk: Tensor, dv: Tensor, to: int, frm: int):
    dk_next, dv_next = torch.empty_like(dk), torch.empty_like(dv)
    return exchange([(dk, to), (dv, to)], [(dk_next, frm), (dv_next, frm)], cfg.group, cfg.stats, "backward")


class RingAttention(torch.autograd.Function):
    """Autograd of the ring: ``apply(q, k, v, cfg) -> (out, lse)``; lse carries no gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cfg: RingConfig):
        out, lse = ring_forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(grad_out, q, k, v, out, lse, ctx.cfg)
        return dq, dk, dv, None


__all__ = ["RingAttention", "RingConfig", "ring_forward", "ring_backward"]
