"""Find an induction head with ``flashlite.heads``, flag the dead heads, prune them.

A small attention-only transformer (2 layers of ``flashlite.nn.MultiheadAttention``, 8 heads
each, no MLPs) is trained on the CPU for 600 steps (about 20 s on one thread) on blocks of 4 to
16 distinct random tokens tiled to 32 tokens. The first block is unpredictable; every later
token is predictable by *induction*: find the previous occurrence of the current token and copy
the token that followed it (the period varies, so attending a fixed distance back does not
work). Two-layer attention-only models learn this with a previous-token head in layer 0 and an
induction head in layer 1 (Olsson et al. 2022, "In-context learning and induction heads").

``flashlite.heads`` then records every head over held-out sequences (a block of ``PERIOD = 10``
tokens, twice), aggregating over the second block:

* an induction head has low entropy and attends ``PERIOD - 1`` positions back (the token after
  the previous occurrence of the current token): ``mean_distance ≈ 9``, and its pooled map shows
  the stripe one block below the diagonal;
* a previous-token head puts its map's mass on the first sub-diagonal;
* heads the task did not need are flagged ``dead`` (near-uniform or constant output);
  ``flashlite.heads.prune`` masks them (they do no attention work any more) and the loss is
  compared before and after - and after pruning the induction heads too.

Run: ``python examples/head_analysis.py [--steps 600] [--out head_analysis_out]``; it prints the
table and the losses and writes the pictures and ``heads.json`` into ``--out``. ``train(steps)``
and the helpers are importable (``tests/test_heads.py`` runs a short fixed-seed training).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flashlite
from flashlite import heads as flheads

VOCAB = 64
SEQ_LEN = 32        # training sequences: a block of 4..16 distinct tokens, tiled to 32 tokens
PERIODS = (4, 16)
PERIOD = 10         # the analysis: a block of 10 tokens, twice


class AttentionOnly(nn.Module):
    """Token + position embeddings, ``layers`` pre-norm residual attention blocks (flashlite
    ``MultiheadAttention``, causal), a final norm and the unembedding. No MLPs."""

    def __init__(self, vocab: int = VOCAB, d_model: int = 64, num_heads: int = 8, layers: int = 2,
                 max_len: int = SEQ_LEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        self.attn = nn.ModuleList(flashlite.nn.MultiheadAttention(d_model, num_heads, bias=False, batch_first=True)
                                  for _ in range(layers))
        self.norm_out = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for norm, attn in zip(self.norms, self.attn):
            h = norm(x)
            x = x + attn(h, h, h, need_weights=False, is_causal=True)[0]
        return self.unembed(self.norm_out(x))


def repeated_tokens(batch: int, generator: torch.Generator, period: Optional[int] = None, length: int = SEQ_LEN,
                    vocab: int = VOCAB) -> Tuple[Tensor, Tensor]:
    """``(tokens [batch, length], periods [batch])``: each row a block of ``period`` distinct random
    tokens (``period`` None: drawn per row from ``PERIODS``) tiled to ``length`` tokens. A varying
    period keeps the model from a positional shortcut: it must find the previous occurrence."""
    if period is None:
        periods = torch.randint(PERIODS[0], PERIODS[1] + 1, (batch,), generator=generator)
    else:
        periods = torch.full((batch,), period)
    blocks = torch.rand(batch, vocab, generator=generator).argsort(dim=1)  # distinct tokens per row
    tokens = blocks.gather(1, torch.arange(length)[None, :] % periods[:, None])
    return tokens, periods


def loss_on_repeats(model: nn.Module, tokens: Tensor, periods: Tensor) -> Tensor:
    """Next-token cross-entropy over the predictable targets (those after each row's first block)."""
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    predictable = torch.arange(1, tokens.shape[1])[None, :] >= periods[:, None]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (loss * predictable.reshape(-1)).sum() / predictable.sum()


def train(steps: int = 600, *, seed: int = 0, batch: int = 32, lr: float = 1e-2, weight_decay: float = 0.1,
          num_heads: int = 8, d_model: int = 64, threads: Optional[int] = 1,
          log_every: int = 0) -> Tuple[AttentionOnly, List[float]]:
    """Train the attention-only model on repeated random blocks of varying period; returns the model
    (eval mode) and the loss of every step. ``threads``: torch's CPU threads while training (1 is
    fastest for these tiny matrices on a busy machine); restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = AttentionOnly(d_model=d_model, num_heads=num_heads)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        model.train()
        for step in range(steps):
            loss = loss_on_repeats(model, *repeated_tokens(batch, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1:5d}  loss {losses[-1]:.3f}", file=sys.stderr)
    finally:
        torch.set_num_threads(previous)
    return model.eval(), losses


def analyze(model: nn.Module, *, seed: int = 1, batches: int = 4, batch: int = 32, period: int = PERIOD,
            progress: bool = False) -> flheads.HeadReport:
    """Record every head over held-out repeated sequences (queries after the first block), with
    importance by gates."""
    generator = torch.Generator().manual_seed(seed)
    data = [repeated_tokens(batch, generator, period, length=2 * period) for _ in range(batches)]
    # The model reads tokens[:, :-1]: 2·period − 1 positions; a grid of that size keeps the maps exact.
    return flheads.analyze(model, data, importance=True, loss_fn=lambda m, batch: loss_on_repeats(m, *batch),
                           queries=slice(period, None), grid=2 * period - 1, sink_tokens=1, progress=progress)


def find_induction_heads(report: flheads.HeadReport, period: int = PERIOD, *, tolerance: float = 1.0,
                         max_norm_entropy: float = 0.3) -> List[flheads.Head]:
    """Heads that attend ``period - 1`` positions back (within ``tolerance``) with low entropy
    (``norm_entropy <= max_norm_entropy``), most focused first."""
    found = []
    for h, _ in report.rank("norm_entropy", descending=False):
        distance, spread = report.value("mean_distance", h), report.value("norm_entropy", h)
        if abs(distance - (period - 1)) <= tolerance and spread <= max_norm_entropy:
            found.append(h)
    return found


def previous_token_heads(report: flheads.HeadReport, *, min_mass: float = 0.5) -> List[flheads.Head]:
    """Heads whose pooled map (exact here: one cell per position) puts at least ``min_mass`` of a
    query's attention on the previous token, on average over the queries; the strongest first."""
    scores = []
    for h in report.all_heads():
        cells = report.maps[h.layer, h.head]
        mass = float(cells.diagonal(offset=-1).mean())
        if mass >= min_mass:
            scores.append((mass, h))
    return [h for _, h in sorted(scores, key=lambda item: -item[0])]


@torch.no_grad()
def held_out_loss(model: nn.Module, *, seed: int = 2, batch: int = 256, period: int = PERIOD) -> float:
    data = repeated_tokens(batch, torch.Generator().manual_seed(seed), period, length=2 * period)
    return float(loss_on_repeats(model, *data))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600, about 20 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="head_analysis_out", help="directory for the PNGs and heads.json")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, losses = train(args.steps, seed=args.seed, log_every=100)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; last loss {losses[-1]:.3f} "
          f"(chance on the repeats: ln {VOCAB} = {math.log(VOCAB):.2f})")

    report = analyze(model, progress=True)
    print(report.table())
    induction = find_induction_heads(report)
    previous = previous_token_heads(report)
    flags = report.flags()
    print(f"\ninduction heads (mean_distance ≈ {PERIOD - 1}, low entropy): {[str(h) for h in induction]}")
    print(f"previous-token heads (pooled map's first sub-diagonal): {[str(h) for h in previous]}")
    print(f"local heads (most queries look within {report.meta['local_radius']:g} positions): "
          f"{[str(h) for h in flags['local']]}")
    print(f"dead heads: {[str(h) for h in flags['dead']]}")

    os.makedirs(args.out, exist_ok=True)
    report.save_json(os.path.join(args.out, "heads.json"))
    shown = (induction[:4] + previous[:2] + flags["dead"][:2]) or None
    paths = report.plot(args.out, heads=shown)
    print(f"pictures: {', '.join(paths)}")

    before = held_out_loss(model)
    flheads.prune(model, flags["dead"])
    after = held_out_loss(model)
    print(f"\nloss on the repeats: {before:.3f} before pruning, {after:.3f} with the {len(flags['dead'])} dead heads "
          f"pruned (they do no attention work now)")
    if induction:
        flheads.prune(model, induction)
        print(f"and {held_out_loss(model):.3f} with the {len(induction)} induction heads pruned too "
              f"(chance: ln {VOCAB} = {math.log(VOCAB):.2f})")
    flheads.unprune(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
