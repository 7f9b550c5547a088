"""torch.distributed plumbing shared by the ring and Ulysses: the group's rank and size, the
checks that every rank called with matching tensors, point-to-point exchanges, and the per-rank
statistics of the last call.

Everything here works with any process group: gloo (CPU tensors) and NCCL (CUDA tensors).
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("group: torch.distributed is not available in this build of PyTorch")
    return dist


def group_rank_world(group) -> Tuple[int, int]:
    """(this process's rank in ``group``, the group's size); ValueError naming ``group`` when there
    is no usable group."""
    dist = _dist()
    if not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group (e.g. under torchrun) first")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be a torch.distributed ProcessGroup or None (the world), got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return rank, dist.get_world_size(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (what P2P ops take)."""
    dist = _dist()
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def check_device(group, device: torch.device) -> None:
    """A group whose backend cannot carry tensors on ``device`` (NCCL with CPU tensors)."""
    dist = _dist()
    try:
        backend = str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):  # pragma: no cover - a group without a named backend
        return
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"group: an NCCL group carries CUDA tensors only; q_l is on {device} "
                         f"(use a gloo group for CPU tensors)")


def check_same_everywhere(group, device: torch.device, fields: Sequence[Tuple[str, int, str]]) -> None:
    """One all-reduce: every rank must pass the same value for each ``(argument, value, what)``;
    otherwise every rank raises ValueError naming the first argument that differs (so no rank is
    left waiting in a later collective)."""
    dist = _dist()
    values = [int(v) for _, v, _ in fields]
    t = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    high, low = t[: len(values)].tolist(), [-x for x in t[len(values):].tolist()]
    for (name, _, what), lo, hi in zip(fields, low, high):
        if lo != hi:
            raise ValueError(f"{name}: {what} differs across the ranks of the group (from {lo} to {hi}); "
                             f"every rank must pass the same")


class Exchange:
    """Posted point-to-point transfers (``batch_isend_irecv``); ``wait()`` blocks until they land and
    adds the time blocked to the statistics; ``buffers`` are the receive buffers, in order."""

    def __init__(self, requests, buffers: Tuple[Tensor, ...], stats: "Stats", phase: str) -> None:
        self.requests, self.buffers, self.stats, self.phase = requests, buffers, stats, phase

    def wait(self) -> None:
        start = time.perf_counter()
        for request in self.requests:
            request.wait()
        self.stats.add(self.phase, "comm_wait_s", time.perf_counter() - start)


def exchange(sends: Sequence[Tuple[Tensor, int]], recvs: Sequence[Tuple[Tensor, int]], group,
             stats: "Stats", phase: str) -> Exchange:
    """Post sends of ``(tensor, group rank)`` and receives into ``(buffer, group rank)``, all in one
    ``batch_isend_irecv`` (NCCL fuses them into one group call), and return at once."""
    dist = _dist()
    ops = [dist.P2POp(dist.isend, t, global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, global_rank(group, peer), group) for t, peer in recvs]
    stats.add(phase, "bytes_sent", sum(t.numel() * t.element_size() for t, _ in sends))
    return Exchange(dist.batch_isend_irecv(ops) if ops else [], tuple(t for t, _ in recvs), stats, phase)


# -- statistics ---------------------------------------------------------------------------------


class Stats:
    """What one rank did in one call (forward, then its backward once it runs).

    Per phase (``"forward"``, ``"backward"``): ``steps`` (ring steps; 1 for Ulysses),
    ``pairs_computed`` / ``pairs_skipped`` (shard pairs (this rank's queries, one rank's keys) with
    and without kernel work), ``calls`` (kernel launches), ``bytes_sent``, ``compute_s`` (host
    time in kernels and merges) and ``comm_wait_s`` (host time blocked on transfers; on CUDA
    both are host-side, the kernels and NCCL run asynchronously). ``tiles`` (64×64 key tiles the
    schedules visit, or ``block_size`` tiles for smaller blocks, summed over batch and heads) and
    ``gathered`` (top-k keys gathered) are counted when ``last_stats()`` is read, from the calls
    recorded, so they cost nothing on the hot path.
    """

    def __init__(self, method: str, layout: str, rank: int, world_size: int) -> None:
        self.info: Dict[str, object] = {"method": method, "layout": layout, "rank": rank, "world_size": world_size}
        self.phases: Dict[str, Dict[str, float]] = {}
        self.calls: Dict[str, List[tuple]] = {}

    def add(self, phase: str, key: str, value) -> None:
        d = self.phases.setdefault(phase, {})
        d[key] = d.get(key, 0) + value

    def set(self, phase: str, key: str, value) -> None:
        self.phases.setdefault(phase, {})[key] = value

    def record_call(self, phase: str, pattern, q: Tensor, k: Tensor) -> None:
        """A kernel call: (pattern, B, Hq, Nq, Nk), counted lazily."""
        self.calls.setdefault(phase, []).append((pattern, q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        self.add(phase, "calls", 1)

    def snapshot(self) -> Dict[str, object]:
        out: Dict[str, object] = dict(self.info)
        for phase, values in self.phases.items():
            d = dict(values)
            tiles, gathered = count_work(self.calls.get(phase, ()))
            d["tiles"], d["gathered"] = tiles, gathered
            out[phase] = d
        return out


STAT_TILE = 64


def count_work(calls) -> Tuple[int, int]:
    """(tiles visited by the tile-engine calls, keys gathered by the top-k calls)."""
    tiles = gathered = 0
    for pattern, batch, heads, nq, nk in calls:
        if pattern.engine == "gather":
            rows = pattern.row_indices(nq)
            valid = rows >= 0
            if pattern.causal:
                valid &= rows <= torch.arange(nq, device=rows.device).view(1, 1, -1, 1) + (nk - nq)
            scale = batch // rows.shape[0] * (heads // rows.shape[1])
            gathered += int(valid.sum()) * scale
            continue
        tile = min(STAT_TILE, getattr(pattern, "block_size", STAT_TILE))
        sched = pattern.schedule(nq, nk, tile, tile, "cpu")
        counts = sched.kv_count
        tiles += int(counts.sum()) * (batch // counts.shape[0]) * (heads // counts.shape[1])
    return tiles, gathered


_last = threading.local()


def set_last(stats: Stats) -> None:
    _last.stats = stats


def last_stats() -> Optional[Dict[str, object]]:
    """What this rank did in its most recent ``context_parallel_attention`` call (and that call's
    backward, once run), as a dict: see ``Stats``. None before the first call."""
    stats = getattr(_last, "stats", None)
    return None if stats is None else stats.snapshot()


__all__ = ["group_rank_world", "global_rank", "check_device", "check_same_everywhere", "exchange", "Exchange",
           "Stats", "last_stats", "set_last", "count_work", "STAT_TILE"]
