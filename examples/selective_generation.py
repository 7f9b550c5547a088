"""Generation in bounded memory: a person marks the tokens that matter, the cache keeps only those.

A tiny Llama built from a ``transformers.LlamaConfig`` (random weights, nothing downloaded)
generates thousands of tokens greedily. Its decode loop runs the model's own layers (embeddings,
norms, q/k/v/o projections, rotary embeddings, MLPs, head) with one ``flashlite.SelectiveKVCache``
per layer instead of a growing KV cache: every step keeps the ``--sinks`` first tokens, the
``--window`` most recent ones and the positions a person marked (``--marks 3,17,42`` or
``--marks-file``), and attends over them with flashlite's top-k kernel. A progress line shows the
cache size and memory as it goes; the end is a plot of KV memory vs tokens generated for a full
cache (what ``transformers`` would hold) and for the selective cache.

    python examples/selective_generation.py                       # 2000 tokens, CPU, < 1 minute
    python examples/selective_generation.py --marks 3,17,42 --tokens 5000 --window 128
    python examples/selective_generation.py --marks-file examples/marks.txt --plot /tmp/memory.png

Before generating, the script checks its manual forward against the transformers model's own
forward on the prompt (same logits), so the loop below is the model, not a look-alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List

import torch

import flashlite
from flashlite import SelectiveKVCache


def parse_marks(text: str) -> List[int]:
    """"3,17,42" or lines of positions (commas/whitespace; ``#`` starts a comment)."""
    marks = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for item in line.replace(",", " ").split():
            try:
                position = int(item)
            except ValueError:
                raise SystemExit(f"marks must be token positions (ints), got {item!r}") from None
            if position < 0:
                raise SystemExit(f"marks must be positions >= 0, got {position}")
            marks.append(position)
    return sorted(set(marks))


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt + args.tokens + 1,
                         attn_implementation="eager")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).eval()


def rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


@torch.no_grad()
def forward(model, caches: List[SelectiveKVCache], tokens: torch.Tensor, start: int, backend) -> torch.Tensor:
    """Logits of ``tokens [B, n]`` at positions ``start …`` with the model's layers and the caches."""
    apply_rope = rotary()
    inner = model.model
    hidden = inner.embed_tokens(tokens)
    position_ids = torch.arange(start, start + tokens.shape[1]).unsqueeze(0)
    cos, sin = inner.rotary_emb(hidden, position_ids)
    for layer, cache in zip(inner.layers, caches):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        cache.append(k, v)  # keys are stored after rotary: positions are baked in
        out = cache.attend(q, scale=attn.scaling, backend=backend)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))


def check_against_transformers(model, prompt: torch.Tensor, backend) -> float:
    """Max |logits difference| between this loop (cache large enough to keep everything) and the model."""
    with torch.no_grad():
        want = model(prompt).logits
    caches = [SelectiveKVCache(window=prompt.shape[1], sinks=0) for _ in model.model.layers]
    got = forward(model, caches, prompt, 0, backend)
    return float((got - want).abs().max())


class Progress:
    """A one-line progress bar (no tqdm)."""

    def __init__(self, total: int, width: int = 28, every: int = 50) -> None:
        self.total, self.width, self.every, self.start = total, width, every, time.time()

    def update(self, done: int, text: str) -> None:
        if done % self.every and done != self.total:
            return
        filled = int(self.width * done / self.total)
        rate = done / max(time.time() - self.start, 1e-9)
        line = f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} tokens  {text}  {rate:.0f} tok/s"
        sys.stderr.write(line)
        sys.stderr.flush()
        if done == self.total:
            sys.stderr.write("\n")


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def plot(path: Path, history: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = history["generated"]
    ax.plot(steps, [mib(b) for b in history["full_bytes"]],
            label="full KV cache (all tokens; tokens x bytes per token)")
    ax.plot(steps, [mib(b) for b in history["allocated_bytes"]], label="SelectiveKVCache (allocated)")
    ax.plot(steps, [mib(b) for b in history["retained_bytes"]], "--", label="SelectiveKVCache (retained)")
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("KV memory (MiB, all layers)")
    ax.set_title(f"window={args.window}, sinks={args.sinks}, marks={len(history['marks'])}, "
                 f"layers={args.layers}, kv_heads={args.kv_heads}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="tokens to generate")
    parser.add_argument("--prompt", type=int, default=32, help="random prompt length")
    parser.add_argument("--window", type=int, default=64, help="recent tokens kept")
    parser.add_argument("--sinks", type=int, default=4, help="leading tokens kept")
    parser.add_argument("--capacity", type=int, default=None, help="hard cap on tokens per cache")
    parser.add_argument("--marks", default="", help='positions to keep, e.g. "3,17,42" (prompt + generated)')
    parser.add_argument("--marks-file", type=Path, default=None, help="file of positions (commas/lines, # comments)")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("selective_memory.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the memory history as JSON")
    parser.add_argument("--backend", default=None, help="flashlite backend (default: auto)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (a tiny model decodes fastest on one; 0 = PyTorch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.tokens < 1 or args.prompt < 1:
        parser.error("--tokens and --prompt must be >= 1")

    marks = parse_marks(args.marks)
    if args.marks_file is not None:
        marks = sorted(set(marks) | set(parse_marks(args.marks_file.read_text())))
    model = build_model(args)
    torch.manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt))

    diff = check_against_transformers(model, prompt, args.backend)
    print(f"manual forward vs transformers on the prompt: max |logit diff| = {diff:.2e}")
    if diff > 1e-3:
        print("the manual loop does not match the model", file=sys.stderr)
        return 1

    caches = [SelectiveKVCache(window=args.window, sinks=args.sinks, capacity=args.capacity)
              for _ in model.model.layers]
    for cache in caches:
        cache.mark(marks)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    bytes_per_token = (2 * args.batch * args.kv_heads * head_dim * torch.get_default_dtype().itemsize * args.layers)
    print(f"model: {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), head_dim {head_dim}; "
          f"KV bytes per token (all layers): {bytes_per_token}")
    print(f"keeping: sinks={args.sinks}, window={args.window}, capacity={args.capacity}, marks={marks}")
    print(f"attention backend: {args.backend or 'auto'}")

    history = {"generated": [], "full_bytes": [], "allocated_bytes": [], "retained_bytes": [], "retained_tokens": [],
               "marks": marks}
    logits = forward(model, caches, prompt, 0, args.backend)
    token = logits[:, -1].argmax(-1, keepdim=True)
    generated = [token]
    progress = Progress(args.tokens)
    peak_retained = 0
    for step in range(1, args.tokens + 1):
        position = args.prompt + step - 1
        logits = forward(model, caches, token, position, args.backend)
        token = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
        retained = len(caches[0])
        peak_retained = max(peak_retained, retained)
        allocated = sum(c.memory_bytes for c in caches)
        kept_bytes = sum(c.retained_bytes for c in caches)
        full = (position + 1) * bytes_per_token
        history["generated"].append(step)
        history["full_bytes"].append(full)
        history["allocated_bytes"].append(allocated)
        history["retained_bytes"].append(kept_bytes)
        history["retained_tokens"].append(retained)
        progress.update(step, f"cache {retained} tok ({caches[0].slots} slots) {mib(allocated):.3f} MiB "
                              f"vs full {mib(full):.3f} MiB")

    total = caches[0].total
    marked_kept = [p for p in marks if p < total and p in set(caches[0].positions.tolist())]
    bound = args.sinks + len([p for p in marks if p < total]) + args.window
    if args.capacity is not None:
        bound = min(bound, args.capacity)
    print(f"generated {args.tokens} tokens ({total} positions with the prompt); retained per layer: "
          f"{len(caches[0])} (peak {peak_retained}, bound {bound}); marks still held: {marked_kept}")
    print(f"KV memory: selective {mib(history['allocated_bytes'][-1]):.3f} MiB allocated vs full "
          f"{mib(history['full_bytes'][-1]):.3f} MiB "
          f"({history['full_bytes'][-1] / history['allocated_bytes'][-1]:.1f}x)")
    print("last tokens:", torch.cat(generated, 1)[0, -16:].tolist())
    plot(args.plot, history, args)
    print(f"plot: {args.plot}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = dict(vars(args), plot=str(args.plot), json=str(args.json), marks_file=str(args.marks_file),
                       peak_retained=peak_retained, bound=bound, history=history)
        args.json.write_text(json.dumps(summary, default=str))
    return 0 if peak_retained <= bound else 1


if __name__ == "__main__":
    raise SystemExit(main())
