"""``flashlite heads``: record what every head of a transformers model does over a text file (or
random tokens) and write a table, PNGs and a JSON.

```
flashlite heads ./my-model --text corpus.txt --out heads_out            # a local model directory
flashlite heads llama --set num_hidden_layers=4 --random-tokens         # a config, random weights
```
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

# A tiny model for a config name (only the keys the config class takes are used; --set overrides).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 4096,
        "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 4096}


class UsageError(ValueError):
    """A command-line argument that cannot be used (the message names it)."""


def parser(prog: str = "flashlite heads") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Per-head attention statistics of a transformers model: "
                                "a table, layer x head heatmaps, pooled maps and a JSON (flashlite.heads).")
    p.add_argument("model", metavar="MODEL",
                   help="a local model directory (from_pretrained), or a config name for random weights: a model "
                        "type ('llama', 'qwen2', ...) or a config class ('LlamaConfig'); tiny by default, see --set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config value for a config name (repeatable; VALUE parsed as JSON, else a string)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", help="a text file (the model's tokenizer when it has one, else "
                                                       "UTF-8 bytes modulo the vocabulary)")
    source.add_argument("--random-tokens", action="store_true", help="uniform random token ids (the default)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per batch (default 2)")
    p.add_argument("--batches", type=int, default=4, help="batches to run at most (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--out", default="heads_out", help="output directory (default heads_out)")
    p.add_argument("--sink-tokens", type=int, default=4, help="leading keys counted as sinks (default 4)")
    p.add_argument("--grid", type=int, default=32, help="pooled map size, grid x grid (default 32)")
    p.add_argument("--no-maps", action="store_true", help="skip the pooled maps (no redundant pairs, no map PNG)")
    p.add_argument("--importance", action="store_true",
                   help="also head importance |dL/dgate| with the language-modelling loss (a backward per batch)")
    p.add_argument("--heads", metavar="L.H,...", help="heads whose pooled maps to draw (default: chosen by flags)")
    p.add_argument("--stats", metavar="NAME,...", help="statistics to draw as heatmaps (default: all of "
                   "entropy, norm_entropy, max_prob, mean_distance, sink_mass, local_share, keys, output_norm, "
                   "output_variation, "
                   "importance)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")
    return value


def _parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    values: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def _config_class(name: str):
    import transformers

    cls = getattr(transformers, name, None) if name.endswith("Config") else None
    if cls is not None:
        return cls
    try:
        from transformers import AutoConfig

        return type(AutoConfig.for_model(name.lower()))
    except (ValueError, KeyError) as exc:
        raise UsageError(f"MODEL: {name!r} is neither a local model directory nor a transformers config name "
                         f"(a model type such as 'llama', or a class such as 'LlamaConfig')") from exc


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise UsageError("MODEL: flashlite heads needs transformers: pip install 'flashlite[transformers]'") from exc
    return transformers


def load_config(model: str, overrides: Dict[str, Any]):
    """(config, how it was made) - checked before any weight is made: a local model directory's
    own config, or a config name's tiny config with ``overrides`` (unknown keys rejected)."""
    _transformers()
    if os.path.exists(model):
        if overrides:
            raise UsageError("--set: only for a config name (a local model keeps its own config)")
        if not os.path.isdir(model):
            raise UsageError(f"MODEL: {model!r} is a file; give the model's directory")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, local_files_only=True), f"{model} (pretrained)"
    cls = _config_class(model)
    accepted = set(inspect.signature(cls.__init__).parameters)
    default = cls()
    unknown = [key for key in overrides
               if key not in accepted and (not hasattr(default, key) or callable(getattr(default, key)))]
    if unknown:
        raise UsageError(f"--set: {cls.__name__} has no {', '.join(map(repr, unknown))}")
    kwargs = {key: value for key, value in TINY.items() if key in accepted}
    kwargs.update(overrides)
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--set: {cls.__name__} rejected {kwargs}: {exc}") from exc
    return config, f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in kwargs.items())}), random"


def load_model(model: str, overrides: Dict[str, Any], dtype: torch.dtype, device: str, seed: int, config=None):
    """(model on "fl_attention", tokenizer or None, how it was made); ``config``: a
    :func:`load_config` result to use (else made here)."""
    transformers = _transformers()
    from transformers import AutoModelForCausalLM

    from ..integrations.transformers import MAIN_NAME, register

    config, made = load_config(model, overrides) if config is None else config
    register()
    # transformers 5 names it dtype; 4.x torch_dtype
    typed = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
    if os.path.exists(model):
        net = AutoModelForCausalLM.from_pretrained(model, attn_implementation=MAIN_NAME, local_files_only=True,
                                                   **typed)
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        except Exception:  # no tokenizer files: bytes modulo the vocabulary
            tokenizer = None
        return net.to(device).eval(), tokenizer, made
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config, attn_implementation=MAIN_NAME, **typed)
    return net.to(device).eval(), None, made


def _check_heads(chosen: Optional[list], layers: Optional[int], heads: Optional[Sequence[int]]) -> None:
    """``--heads`` against the layer count and the heads per layer (unknown ones: not checked)."""
    if chosen is None or layers is None:
        return
    bad = [f"{l}.{h}" for l, h in chosen
           if not (0 <= l < layers and (heads is None or 0 <= h < heads[l]))]
    if bad:
        raise UsageError(f"--heads: no head {', '.join(bad)} (layers 0..{layers - 1}"
                         + (f", heads per layer {list(heads)})" if heads is not None else ")"))


def _config_heads(config):
    """(attention layers, [heads per layer]) from a transformers config, or (None, None)."""
    layers = getattr(config, "num_hidden_layers", None)
    count = getattr(config, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(count, int):
        return None, None
    return layers, [count] * layers


def make_batches(args, vocab: int, tokenizer, device: str) -> List[torch.Tensor]:
    """The token batches ``[batch_size, seq_len]``: from --text (tokenizer, else UTF-8 bytes
    modulo ``vocab``) or random."""
    if args.text is None:
        generator = torch.Generator().manual_seed(args.seed)
        return [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
                for _ in range(args.batches)]
    if not os.path.isfile(args.text):
        raise UsageError(f"--text: no such file: {args.text!r}")
    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    else:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab
    per_batch = args.batch_size * args.seq_len
    count = min(args.batches, ids.numel() // per_batch)
    if count == 0:
        raise UsageError(f"--text: {args.text!r} has {ids.numel()} tokens, fewer than one batch "
                         f"(--batch-size {args.batch_size} x --seq-len {args.seq_len})")
    return [ids[i * per_batch:(i + 1) * per_batch].view(args.batch_size, args.seq_len).to(device)
            for i in range(count)]


def _parse_heads(spec: Optional[str]) -> Optional[list]:
    """``--heads`` as ``[(layer, head), ...]`` (checked against the config before the run)."""
    if not spec:
        return None
    chosen = []
    for item in spec.split(","):
        layer, sep, head = item.strip().upper().lstrip("L").partition(".")
        try:
            chosen.append((int(layer), int(head.lstrip("H"))))
        except ValueError as exc:
            raise UsageError(f"--heads: expected L.H items such as 0.3 or L0.H3, got {item!r}") from exc
    return chosen


def main(argv: Optional[Sequence[str]] = None, prog: str = "flashlite heads") -> int:
    args = parser(prog).parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from . import analyze

    for name in ("seq_len", "batch_size", "batches", "grid"):
        _positive(getattr(args, name), "--" + name.replace("_", "-"))
    if args.sink_tokens < 0:
        raise UsageError(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
    dtype = getattr(torch, args.dtype)
    chosen = _parse_heads(args.heads)
    if args.text is not None and not os.path.isfile(args.text):
        raise UsageError(f"--text: no such file: {args.text!r}")
    stats = None
    if args.stats:
        from . import STATS

        stats = [name.strip() for name in args.stats.split(",") if name.strip()]
        unknown = [name for name in stats if name not in STATS + ("importance",)]
        if unknown:
            raise UsageError(f"--stats: unknown {unknown}; choose from {', '.join(STATS + ('importance',))}")
        if "importance" in stats and not args.importance:
            raise UsageError("--stats importance: needs --importance (importance is only measured with it)")
    overrides = _parse_overrides(args.overrides)
    config = load_config(args.model, overrides)  # every argument is checked before the model is made and run
    _check_heads(chosen, *_config_heads(config[0]))
    model, tokenizer, made = load_model(args.model, overrides, dtype, args.device, args.seed, config=config)
    vocab = int(model.get_input_embeddings().num_embeddings)
    batches = make_batches(args, vocab, tokenizer, args.device)
    print(f"model: {made}", file=sys.stderr)
    report = analyze(model, batches, importance=args.importance, progress=not args.no_progress,
                     sink_tokens=args.sink_tokens, grid=args.grid, maps=not args.no_maps)
    report.meta["model"] = made
    report.meta["tokens"] = {"source": args.text or "random", "batches": len(batches),
                             "batch_size": args.batch_size, "seq_len": args.seq_len}
    print(report.table())
    flags = report.flags()
    for name, found in flags.items():
        print(f"{name}: {len(found)} head(s) {' '.join(str(h) for h in found)}".rstrip())
    _check_heads(chosen, len(report.layers), report.heads)  # the recorded layers (checked before writing)
    os.makedirs(args.out, exist_ok=True)
    paths = [report.save_json(os.path.join(args.out, "heads.json"))]
    if not args.no_plots:
        paths += report.plot(args.out, heads=chosen, stats=stats)
    print("wrote " + ", ".join(paths))
    return 0


__all__ = ["main", "parser", "load_model", "make_batches"]
