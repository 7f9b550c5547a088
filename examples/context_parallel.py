"""A transformer block over one sequence sharded across 4 processes, checked against one process.

    torchrun --nproc-per-node 4 examples/context_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 4 examples/context_parallel.py --tokens 8192 --method ulysses

Each rank holds N/4 tokens (zigzag layout: chunks r and 7−r of 8, so causal work is even) and
the block's weights (replicated, as in data parallelism). The block is pre-norm causal attention
plus an MLP; only attention needs the other ranks' tokens, and gets them from
``flashlite.distributed.context_parallel_attention``. The script checks the sharded forward and
the weight gradients (all-reduced over the ranks) against the same block run on the whole
sequence in one process, and prints per rank: peak memory, time, and the attention's compute
vs communication (``fld.last_stats()``). On GPUs the same script runs with NCCL
(``--device cuda``; one GPU per rank).
"""
import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
from torch import nn

import flashlite
from flashlite import distributed as fld


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP. ``group`` set: the sequence is sharded over it."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, *, sharded: bool = False, layout: str = "zigzag", method: str = "ring", backend=None):
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if sharded:  # this rank's n tokens; the pattern is over the whole sequence
            a = fld.context_parallel_attention(q, k, v, flashlite.Full(causal=True), layout=layout, method=method,
                                               backend=backend)
        else:
            a = flashlite.attention(q, k, v, flashlite.Full(causal=True), backend=backend)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="global sequence length")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--method", choices=("ring", "ulysses"), default="ring")
    parser.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same weights and input on every rank
    block = Block(args.dim, args.heads).to(device)
    x = torch.randn(1, args.tokens, args.dim, device=device)

    # --- sharded: each rank runs its n = N/P tokens ------------------------------------------
    x_local = fld.shard(x, dim=1, layout=args.layout)
    dist.barrier()
    start = time.perf_counter()
    y_local = block(x_local, sharded=True, layout=args.layout, method=args.method)
    fwd_stats = fld.last_stats()
    (y_local * y_local).mean().mul(1 / world).backward()  # the mean over all N tokens, as one process takes it
    for p in block.parameters():  # weights are replicated: sum the ranks' contributions
        dist.all_reduce(p.grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    stats = fld.last_stats()  # the same call's record, its backward added
    grads = [p.grad.clone() for p in block.parameters()]
    mem = peak_mb(device)

    # --- one process, the whole sequence (rank 0 alone, the others wait; then broadcast) -------
    block.zero_grad(set_to_none=False)
    single_s = 0.0
    y = torch.empty_like(x)
    if rank == 0:
        start = time.perf_counter()
        y = block(x)
        (y * y).mean().backward()
        single_s = time.perf_counter() - start
        y = y.detach()
    for t in [y] + [p.grad for p in block.parameters()]:
        dist.broadcast(t, 0)
    err_out = (fld.shard(y, dim=1, layout=args.layout) - y_local.detach()).abs().max().item()
    err_grad = max((g - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-12)
                   for g, p in zip(grads, block.parameters()))

    fwd, bwd = stats["forward"], stats.get("backward", {})
    # attention's own tensors (q, k, v, out; the ring adds the next K/V shard in flight)
    per_token = 4 * args.dim * x.element_size()
    attn_mb = x_local.shape[1] * (per_token + (2 * args.dim * x.element_size() if args.method == "ring" else 0)) / 2**20
    row = dict(rank=rank, tokens=x_local.shape[1], peak_mb=mem, attn_mb=attn_mb, step_s=elapsed, single_s=single_s,
               fwd_compute_s=fwd["compute_s"], fwd_wait_s=fwd.get("comm_wait_s", 0.0),
               bwd_compute_s=bwd.get("compute_s", 0.0), bwd_wait_s=bwd.get("comm_wait_s", 0.0),
               sent_mb=(fwd.get("bytes_sent", 0) + bwd.get("bytes_sent", 0)) / 2**20,
               pairs=f"{fwd['pairs_computed']}/{world}", tiles=fwd["tiles"], err_out=err_out, err_grad=err_grad)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print(f"{args.tokens} tokens over {world} ranks ({args.layout}, {args.method}), dim {args.dim}, "
              f"{args.heads} heads, backend {flashlite.last_backend()}, {dist.get_backend()}")
        print("rank  tokens  peak MB  attn MB  step s  | attention fwd: compute s  wait s | bwd: compute s  wait s "
              "| sent MB  pairs  tiles | max err out  grad (rel)")
        for r in rows:
            print(f"{r['rank']:>4}  {r['tokens']:>6}  {r['peak_mb']:>7.0f}  {r['attn_mb']:>7.1f}  {r['step_s']:>6.2f}  |"
                  f"            {r['fwd_compute_s']:>9.3f}  {r['fwd_wait_s']:>6.3f} |"
                  f"      {r['bwd_compute_s']:>9.3f}  {r['bwd_wait_s']:>6.3f} |"
                  f" {r['sent_mb']:>7.1f}  {r['pairs']:>5}  {r['tiles']:>5} |"
                  f"    {r['err_out']:.1e}  {r['err_grad']:.1e}")
        print(f"peak MB: the process's peak RSS (torch included); attn MB: q, k, v, out of this rank "
              f"(one process: {args.tokens * per_token / 2**20:.1f} MB)")
        print(f"one process, whole sequence (forward + backward): {rows[0]['single_s']:.2f} s; "
              f"tiles per rank max/min {max(r['tiles'] for r in rows) / max(min(r['tiles'] for r in rows), 1):.3f}")
        worst_out, worst_grad = max(r["err_out"] for r in rows), max(r["err_grad"] for r in rows)
        assert worst_out < 1e-4 and worst_grad < 1e-4, (worst_out, worst_grad)
        print("sharded block matches the single-process block (outputs and weight gradients)")
    del fwd_stats
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
