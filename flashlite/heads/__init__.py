"""``flashlite.heads``: what each attention head does, which heads are dead, and pruning them.

```python
import flashlite
with flashlite.heads.record(model) as rec:          # any number of batches
    for batch in batches:
        model(batch)
report = rec.report()
print(report.table())                              # one row per (layer, head), with flags
report.save_json("heads.json"); report.plot("heads_png/")
scores = flashlite.heads.importance(model, batches, loss_fn)   # |dL/dgate_h| (Michel et al. 2019)
flashlite.heads.prune(model, report.flags()["dead"])           # pruned heads do no attention work
```

What is recorded. While ``record(model)`` is active, every attention call of ``model`` that runs
on flashlite - transformers models on the ``"fl_attention"`` / ``"fl_topk"`` implementations
(``flashlite.integrations.transformers``), ``flashlite.nn`` modules (``Attention`` and its
subclasses, ``MultiheadAttention``) - runs :func:`flashlite.attention_stats` in place of
``flashlite.attention`` (the same kernel pass plus running sums; the output is the same) and
adds, per layer and head, sums over the batch and the queries (memory O(layers·heads), plus
``grid²`` per head for the pooled maps). The statistics of a report, per (layer, head):

* ``entropy``: mean over queries of ``−Σ_j P_ij ln P_ij`` (nats), queries that see at least one key;
* ``norm_entropy``: mean of ``entropy_i / ln(keys_i)`` over queries that see at least 2 keys
  (1 = uniform over the visible keys, 0 = one key);
* ``max_prob``: mean of ``max_j P_ij``;
* ``mean_distance``: mean of ``Σ_j P_ij·|p(i) − j|`` (``p(i) = i + Nk − Nq``, the query's own
  position among the keys): ≈ 1 for a previous-token head, ≈ the period − 1 for an induction
  head on a sequence repeated with that period;
* ``sink_mass``: mean mass on the first ``sink_tokens`` keys, over queries that see more than
  ``sink_tokens`` keys;
* ``local_share``: the share of queries (that see a key) whose ``Σ_j P_ij·|p(i) − j|`` is at most
  ``local_radius`` positions (``record(local_radius=2.5)``);
* ``keys``: mean number of keys a query sees;
* ``output_norm``: mean ``‖o_i‖`` of the head's output (before the output projection);
* ``output_variation``: ``Σ Var_tokens(o) / Σ E_tokens‖o‖²`` within each call (0 = the head
  outputs the same vector at every token);
* ``importance`` (when given): mean over examples of ``|∂L/∂ξ_h|``, ``ξ_h`` a gate multiplying
  the head's output (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

Flags (:class:`Criteria`, all thresholds adjustable):

* ``dead``: near-uniform (``norm_entropy >= uniform``, default 0.9) or constant output
  (``output_variation <= constant``, default 0.01): the head mixes everything equally or adds
  the same vector everywhere, so its information is at most a bias;
* ``sink``: sink-only, ``sink_mass >= sink`` (default 0.8): the head parks its mass on the first
  tokens (often a no-op, see Xiao et al. 2023, "attention sinks");
* ``local``: positional / local, ``local_share >= local`` (default 0.5: at least half of the
  queries look within ``local_radius`` positions on average) and not dead;
* redundant pairs (:meth:`HeadReport.redundant_pairs`): two heads (neither dead) whose pooled
  maps (the query × key plane, ``grid × grid`` cells, mean over the batch) have cosine similarity
  ``>= redundant`` (default 0.95). Similar maps read the same tokens; whether they write the same
  thing depends on their value/output weights, so check importance before pruning both.

Not recorded: packed (varlen) sequences, context-parallel modules, calls outside ``model``.
Recording is eager (not inside ``torch.compile``) and process-wide (one recorder at a time).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _hook

STATS = ("entropy", "norm_entropy", "max_prob", "mean_distance", "sink_mass", "local_share", "keys", "output_norm",
         "output_variation")
FLAGS = ("dead", "sink", "local")

# Rows of a layer's running sums (float64 [len(_ROWS), heads]).
_ROWS = ("entropy", "max_prob", "mean_distance", "keys", "norm_entropy", "sink_mass", "n_seen", "n_multi",
         "n_sink", "out_norm", "out_sq", "out_var", "n_tokens", "n_local")
_R = {name: i for i, name in enumerate(_ROWS)}


class Head(NamedTuple):
    """One head: ``layer`` (index into the report's layers), ``head``, and the layer's module name."""

    layer: int
    head: int
    name: str

    def __str__(self) -> str:
        return f"L{self.layer}.H{self.head}"


def _display(name: str) -> str:
    return name or "(model)"


@dataclass(frozen=True)
class Criteria:
    """The thresholds of the flags (module docstring): ``dead`` if ``norm_entropy >= uniform`` or
    ``output_variation <= constant``; ``sink`` if ``sink_mass >= sink``; ``local`` if
    ``local_share >= local`` (and not dead); a redundant pair if the cosine similarity of the
    pooled maps ``>= redundant`` (neither head dead)."""

    uniform: float = 0.9
    constant: float = 0.01
    sink: float = 0.8
    local: float = 0.5
    redundant: float = 0.95


class _Stats(NamedTuple):
    entropy: Tensor
    max_prob: Tensor
    mean_distance: Tensor
    sink_mass: Tensor
    keys: Tensor
    lse: Optional[Tensor] = None


def stats_from_probabilities(probs: Tensor, sink_tokens: int = 4) -> _Stats:
    """The statistics of :func:`flashlite.attention_stats` from materialized probabilities
    ``[B, H, Nq, Nk]`` (the slow path; also an oracle). A key counts as seen where ``P > 0``."""
    probs = probs.float()
    seqlen_q, seqlen_k = probs.shape[-2:]
    pos = torch.arange(seqlen_q, device=probs.device)[:, None] + (seqlen_k - seqlen_q)
    distance = (pos - torch.arange(seqlen_k, device=probs.device)[None, :]).abs().float()
    plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-38)), torch.zeros_like(probs))
    return _Stats(-plogp.sum(-1), probs.amax(-1), (probs * distance).sum(-1), probs[..., :sink_tokens].sum(-1),
                  (probs > 0).sum(-1).float())


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------
class _LayerSums:
    """Running sums of one layer: O(heads) numbers, plus ``grid²`` per head for the pooled maps."""

    def __init__(self, heads: int, device: torch.device, grid: Optional[int]) -> None:
        self.heads = heads
        self.sums = torch.zeros(len(_ROWS), heads, dtype=torch.float64, device=device)
        self.maps = torch.zeros(heads, grid, grid, dtype=torch.float32, device=device) if grid else None
        self.map_count = 0
        self.calls = 0


class Recorder:
    """Collects per-layer, per-head sums while :func:`record` is active; :meth:`report` turns them
    into a :class:`HeadReport`. Made by :func:`record`."""

    def __init__(self, model: nn.Module, *, sink_tokens: int = 4, maps: bool = True, grid: int = 32,
                 queries: Optional[slice] = None, local_radius: float = 2.5) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be an int >= 1, got {grid!r}")
        if queries is not None and not isinstance(queries, slice):
            raise TypeError(f"queries must be a slice of query positions or None, got {type(queries).__name__}")
        if isinstance(local_radius, bool) or not isinstance(local_radius, (int, float)) or local_radius < 0:
            raise ValueError(f"local_radius must be a number >= 0, got {local_radius!r}")
        self.model = model
        self.local_radius = float(local_radius)
        self.sink_tokens = sink_tokens
        self.grid = grid if maps else None
        self.queries = queries if queries is not None else slice(None)
        self._names: Dict[int, Tuple[int, str]] = {}
        for order, (name, module) in enumerate(model.named_modules()):
            self._names.setdefault(id(module), (order, name))
        self._layers: Dict[int, _LayerSums] = {}
        self.skipped: Dict[str, int] = {}

    def owns(self, layer) -> bool:
        """True if ``layer`` is a module of the recorded model."""
        return id(layer) in self._names

    def skip(self, layer, reason: str) -> None:
        """Count a call of ``layer`` that could not be recorded."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, layer, stats, out: Tensor, pooled: Callable[[Tuple[int, int]], Tensor], seqlen_k: int) -> None:
        """Add one call's statistics (``[B, Hq, Nq]`` each), output ``[B, Hq, Nq, D]`` and, when
        maps are recorded, ``pooled(block)`` (``flashlite.attention_map`` for this call)."""
        heads = stats.entropy.shape[1]
        acc = self._layers.get(id(layer))
        if acc is None:
            acc = self._layers[id(layer)] = _LayerSums(heads, stats.entropy.device, self.grid)
        elif acc.heads != heads:
            raise ValueError(f"{self._names[id(layer)][1]}: called with {heads} heads after {acc.heads}")
        f64 = torch.float64
        with torch.no_grad():
            sel = self.queries
            entropy, max_prob, distance, sink, keys = (t.detach()[..., sel].to(f64) for t in tuple(stats)[:5])
            seen, multi, sinkq = keys >= 1, keys >= 2, keys > self.sink_tokens
            norm = entropy / torch.log(keys.clamp(min=2.0))

            def total(x: Tensor, where: Tensor) -> Tensor:
                return torch.where(where, x, torch.zeros_like(x)).sum(dim=(0, 2))

            o = out.detach()[:, :, sel].to(f64)
            tokens = o.shape[0] * o.shape[2]
            if tokens:
                out_rows = (o.norm(dim=-1).sum(dim=(0, 2)), o.pow(2).sum(-1).sum(dim=(0, 2)),
                            o.var(dim=(0, 2), unbiased=False).sum(-1) * tokens)
            else:
                out_rows = (keys.new_zeros(heads),) * 3
            acc.sums += torch.stack([
                total(entropy, seen), total(max_prob, seen), total(distance, seen), total(keys, seen),
                total(norm, multi), total(sink, sinkq), seen.sum(dim=(0, 2)).to(f64), multi.sum(dim=(0, 2)).to(f64),
                sinkq.sum(dim=(0, 2)).to(f64), *out_rows, keys.new_full((heads,), float(tokens)),
                (seen & (distance <= self.local_radius)).sum(dim=(0, 2)).to(f64),
            ])
            acc.calls += 1
            if acc.maps is not None:
                seqlen_q = stats.entropy.shape[2]
                grid = self.grid
                block = (max(1, -(-seqlen_q // grid)), max(1, -(-seqlen_k // grid)))
                cells = pooled(block).detach().float()
                if tuple(cells.shape[-2:]) != (grid, grid):
                    cells = F.interpolate(cells, size=(grid, grid), mode="nearest")
                cells = cells / cells.sum(-1, keepdim=True).clamp_min(1e-12)  # each row: where its mass goes
                acc.maps += cells.sum(0).to(acc.maps.device)
                acc.map_count += cells.shape[0]

    def report(self, criteria: Optional[Criteria] = None, importance: Optional["Importance"] = None) -> "HeadReport":
        """The :class:`HeadReport` of everything recorded so far (raises if nothing was)."""
        if not self._layers:
            raise RuntimeError(
                "record(): no attention call of the model was recorded. flashlite.heads sees transformers models "
                "on attn_implementation='fl_attention' (flashlite.integrations.transformers.register(); "
                "model.set_attn_implementation('fl_attention')) and flashlite.nn modules; run the model inside "
                "the `with record(model):` block" + (f" (skipped calls: {self.skipped})" if self.skipped else ""))
        ids = sorted(self._layers, key=lambda i: self._names[i][0])
        names = [self._names[i][1] for i in ids]
        heads = [self._layers[i].heads for i in ids]
        width = max(heads)
        stats = {name: torch.full((len(ids), width), float("nan"), dtype=torch.float64) for name in STATS}
        maps = None
        if self.grid:
            maps = torch.full((len(ids), width, self.grid, self.grid), float("nan"))
        for row, i in enumerate(ids):
            acc = self._layers[i]
            s = acc.sums.cpu()
            h = acc.heads

            def mean(value: str, count: str) -> Tensor:
                n = s[_R[count]]
                return torch.where(n > 0, s[_R[value]] / n.clamp_min(1), torch.full_like(n, float("nan")))

            stats["entropy"][row, :h] = mean("entropy", "n_seen")
            stats["max_prob"][row, :h] = mean("max_prob", "n_seen")
            stats["mean_distance"][row, :h] = mean("mean_distance", "n_seen")
            stats["keys"][row, :h] = mean("keys", "n_seen")
            stats["norm_entropy"][row, :h] = mean("norm_entropy", "n_multi")
            stats["sink_mass"][row, :h] = mean("sink_mass", "n_sink")
            stats["local_share"][row, :h] = mean("n_local", "n_seen")
            stats["output_norm"][row, :h] = mean("out_norm", "n_tokens")
            sq = s[_R["out_sq"]]
            stats["output_variation"][row, :h] = torch.where(sq > 0, s[_R["out_var"]] / sq.clamp_min(1e-300),
                                                             torch.full_like(sq, float("nan")))
            if maps is not None and acc.map_count:
                maps[row, :h] = (acc.maps / acc.map_count).cpu()
        calls = {name: self._layers[i].calls for name, i in zip(names, ids)}
        meta = {"sink_tokens": self.sink_tokens, "local_radius": self.local_radius, "grid": self.grid,
                "calls": calls, "skipped": dict(self.skipped),
                "queries": [self.queries.start, self.queries.stop, self.queries.step]}
        report = HeadReport(names, heads, stats, maps, criteria or Criteria(), meta)
        if importance is not None:
            report.add_importance(importance)
        return report


def _check_implementation(model: nn.Module) -> None:
    """A transformers model on another attention implementation records nothing: say so now."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if not isinstance(implementation, str):
        return
    from ..integrations.transformers import MAIN_NAME, TOPK_NAME

    if implementation not in (MAIN_NAME, TOPK_NAME):
        raise ValueError(f"model: its attention implementation is {implementation!r}; flashlite.heads records "
                         f"{MAIN_NAME!r} (or {TOPK_NAME!r}): call flashlite.integrations.transformers.register() "
                         f"and model.set_attn_implementation({MAIN_NAME!r})")


@contextlib.contextmanager
def record(model: nn.Module, *, sink_tokens: int = 4, maps: bool = True, grid: int = 32,
           queries: Optional[slice] = None, local_radius: float = 2.5) -> Iterator[Recorder]:
    """Record per-layer, per-head statistics of ``model``'s attention while the block runs.

    Args:
        model: a transformers model on ``"fl_attention"`` (or ``"fl_topk"``), or any module built
            from ``flashlite.nn`` attention modules. Only calls of its own modules are recorded.
        sink_tokens: the leading keys whose mass is ``sink_mass``.
        maps: also record each head's pooled map (``flashlite.attention_map``, one extra pass per
            call) - needed for redundant pairs and the map pictures.
        grid: the pooled maps' size, ``grid × grid`` cells over the (query, key) plane (the
            pooled blocks are ``ceil(N / grid)`` positions; shorter sequences are repeated up to
            the grid); each row is normalized to sum 1, then averaged over the batch and calls.
        queries: a slice of query positions to aggregate over (e.g. ``slice(period, None)``: only
            the repeated part of a sequence); the maps always cover every query.
        local_radius: ``local_share`` counts the queries whose mean distance is at most this
            (2.5: within two positions; the half keeps sharp heads, whose mean distances sit
            near whole numbers, off the boundary).

    Yields the :class:`Recorder`; call ``.report()`` on it (inside or after the block).
    """
    _check_implementation(model)
    recorder = Recorder(model, sink_tokens=sink_tokens, maps=maps, grid=grid, queries=queries,
                        local_radius=local_radius)
    if _hook._recorder is not None:
        raise RuntimeError("record(): another flashlite.heads recorder is active (one at a time)")
    _hook._recorder = recorder
    try:
        yield recorder
    finally:
        _hook._recorder = None


# ---------------------------------------------------------------------------------------------
# Importance (gates)
# ---------------------------------------------------------------------------------------------
class Importance(NamedTuple):
    """Head importance: ``scores [layers, max heads]`` float64 (NaN beyond a layer's heads), the
    mean over examples of ``|∂L/∂ξ_h|``; ``layers`` are module names, ``heads`` their head counts."""

    layers: List[str]
    heads: List[int]
    scores: Tensor


class _Gates:
    """A float gate ``ξ [B, Hq]`` of ones (requires grad) for every call of the model's attention
    layers; ``_hook.layer_mask`` multiplies it into the call's head mask."""

    def __init__(self, model: nn.Module) -> None:
        self._names: Dict[int, Tuple[int, str]] = {}
        for order, (name, module) in enumerate(model.named_modules()):
            self._names.setdefault(id(module), (order, name))
        self.current: List[Tuple[int, Tensor]] = []
        self.scores: Dict[int, Tensor] = {}
        self.examples: Dict[int, int] = {}

    def gate(self, layer, q: Tensor) -> Optional[Tensor]:
        if id(layer) not in self._names:
            return None
        gate = torch.ones(q.shape[0], q.shape[1], device=q.device, dtype=torch.float32, requires_grad=True)
        self.current.append((id(layer), gate))
        return gate

    def backward(self, loss) -> None:
        """Add ``|∂loss/∂ξ|`` of this pass's gates (``torch.autograd.grad``: parameters' ``.grad`` untouched)."""
        current, self.current = self.current, []
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got "
                            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
        if not current:
            return
        if not loss.requires_grad:
            raise ValueError("loss_fn: the loss does not depend on the attention gates (ran under torch.no_grad(), "
                             "or the model's attention is not on flashlite?)")
        grads = torch.autograd.grad(loss, [g for _, g in current], allow_unused=True)
        for (lid, gate), grad in zip(current, grads):
            score = grad.detach().abs().sum(0).to(torch.float64) if grad is not None \
                else torch.zeros(gate.shape[1], dtype=torch.float64, device=gate.device)
            self.scores[lid] = self.scores[lid] + score if lid in self.scores else score
            self.examples[lid] = self.examples.get(lid, 0) + gate.shape[0]

    def result(self) -> Importance:
        if not self.scores:
            raise RuntimeError("importance(): no attention call of the model went through flashlite (transformers "
                               "models need attn_implementation='fl_attention'; or build it from flashlite.nn)")
        ids = sorted(self.scores, key=lambda i: self._names[i][0])
        heads = [self.scores[i].numel() for i in ids]
        scores = torch.full((len(ids), max(heads)), float("nan"), dtype=torch.float64)
        for row, i in enumerate(ids):
            scores[row, :heads[row]] = self.scores[i].cpu() / self.examples[i]
        return Importance([self._names[i][1] for i in ids], heads, scores)


@contextlib.contextmanager
def _gating(model: nn.Module) -> Iterator[_Gates]:
    gates = _Gates(model)
    if _hook._gates is not None:
        raise RuntimeError("importance(): another importance computation is active (one at a time)")
    _hook._gates = gates
    try:
        yield gates
    finally:
        _hook._gates = None


def default_loss(model: nn.Module, batch) -> Tensor:
    """The loss ``importance`` uses without ``loss_fn``: a mapping -> ``model(**batch)``; a tensor of
    token ids on a transformers model (it has a ``config``) -> ``model(input_ids=batch,
    labels=batch)`` (the language-modelling loss); else ``model(batch)``. The result's ``.loss``
    (or ``["loss"]``) if it has one, else the result itself."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, Tensor) and getattr(model, "config", None) is not None:
        out = model(input_ids=batch, labels=batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    return getattr(out, "loss", out)


def _forward(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def importance(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, *,
               progress: bool = False) -> Importance:
    """Head importance by gates (Michel et al. 2019): every attention call of ``model`` gets a float
    head mask ``ξ [B, Hq]`` of ones (``head_mask=`` of the kernel call: it multiplies each head's
    output, so the model's output is unchanged); per batch ``L = loss_fn(model, batch)`` and
    ``|∂L/∂ξ_{b,h}|`` is summed over the examples ``b``; the result is the mean per example.

    ``loss_fn(model, batch) -> scalar tensor`` (default :func:`default_loss`). Gradients come from
    ``torch.autograd.grad`` (the parameters' ``.grad`` are untouched). Dropout stays as the model's
    mode says: call ``model.eval()`` first for deterministic scores. Heads already masked by
    :func:`prune` keep their mask (a bool-masked head scores 0).
    """
    loss_fn = default_loss if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model, batch) -> loss, got {type(loss_fn).__name__}")
    with _gating(model) as gates:
        for batch in _progress(batches, "importance", progress):
            gates.backward(loss_fn(model, batch))
    return gates.result()


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _finite(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


class HeadReport:
    """Per-(layer, head) statistics, flags, rankings, pictures. ``stats[name]`` is float64
    ``[layers, max heads]`` (NaN: no data, or beyond a layer's heads); ``maps`` float32
    ``[layers, max heads, grid, grid]`` or None; ``layers`` are module names."""

    def __init__(self, layers: List[str], heads: List[int], stats: Dict[str, Tensor], maps: Optional[Tensor],
                 criteria: Criteria, meta: Dict[str, Any]) -> None:
        self.layers = list(layers)
        self.heads = list(heads)
        self.stats = stats
        self.maps = maps
        self.criteria = criteria
        self.meta = meta

    # -- access ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self.stats[name]

    def all_heads(self) -> List[Head]:
        return [Head(layer, head, name) for layer, (name, count) in enumerate(zip(self.layers, self.heads))
                for head in range(count)]

    def head(self, layer: int, head: int) -> Head:
        return Head(layer, head, self.layers[layer])

    def value(self, stat: str, head: Head) -> float:
        return float(self.stats[stat][head.layer, head.head])

    def add_importance(self, importance: Importance) -> None:
        """Attach :func:`importance` scores (matched by layer name) as the ``importance`` statistic."""
        scores = torch.full_like(self.stats["entropy"], float("nan"))
        rows = {name: row for row, name in enumerate(importance.layers)}
        for layer, name in enumerate(self.layers):
            if name in rows:
                count = min(self.heads[layer], importance.heads[rows[name]])
                scores[layer, :count] = importance.scores[rows[name], :count]
        self.stats["importance"] = scores

    # -- flags and rankings ---------------------------------------------------------------------
    def flags(self, criteria: Optional[Criteria] = None) -> Dict[str, List[Head]]:
        """``{"dead": [...], "sink": [...], "local": [...]}`` by the documented :class:`Criteria`."""
        c = criteria or self.criteria
        out: Dict[str, List[Head]] = {name: [] for name in FLAGS}
        for h in self.all_heads():
            for name in self.head_flags(h, c):
                out[name].append(h)
        return out

    def head_flags(self, head: Head, criteria: Optional[Criteria] = None) -> List[str]:
        """The flags of one head (comparisons with NaN are false: no data, no flag)."""
        c = criteria or self.criteria
        value = {name: self.value(name, head) for name in STATS}
        found = []
        dead = value["norm_entropy"] >= c.uniform or value["output_variation"] <= c.constant
        if dead:
            found.append("dead")
        if value["sink_mass"] >= c.sink:
            found.append("sink")
        if not dead and value["local_share"] >= c.local:
            found.append("local")
        return found

    def similarity(self) -> Optional[Tensor]:
        """Cosine similarity of the pooled maps, ``[L·H, L·H]`` over :meth:`all_heads` (None without maps)."""
        if self.maps is None:
            return None
        flat = torch.stack([self.maps[h.layer, h.head].reshape(-1) for h in self.all_heads()]).double()
        flat = torch.nan_to_num(flat, nan=0.0)
        return F.normalize(flat, dim=1) @ F.normalize(flat, dim=1).T

    def redundant_pairs(self, criteria: Optional[Criteria] = None) -> List[Tuple[Head, Head, float]]:
        """Pairs of heads (neither dead, both with data) whose pooled maps have cosine similarity
        ``>= criteria.redundant``, most similar first. Empty without maps."""
        c = criteria or self.criteria
        sim = self.similarity()
        if sim is None:
            return []
        heads = self.all_heads()
        live = [not math.isnan(self.value("entropy", h)) and "dead" not in self.head_flags(h, c) for h in heads]
        pairs = []
        for a in range(len(heads)):
            for b in range(a + 1, len(heads)):
                if live[a] and live[b] and float(sim[a, b]) >= c.redundant:
                    pairs.append((heads[a], heads[b], float(sim[a, b])))
        return sorted(pairs, key=lambda p: -p[2])

    def rank(self, stat: str = "importance", descending: bool = True) -> List[Tuple[Head, float]]:
        """Heads ordered by ``stat`` (NaN last): e.g. ``rank("importance")`` (most important first),
        ``rank("entropy", descending=False)`` (most focused first)."""
        if stat not in self.stats:
            raise KeyError(f"stat must be one of {sorted(self.stats)}, got {stat!r}")
        rows = [(h, self.value(stat, h)) for h in self.all_heads()]
        known = sorted([r for r in rows if not math.isnan(r[1])], key=lambda r: r[1], reverse=descending)
        return known + [r for r in rows if math.isnan(r[1])]

    def prune(self, model: nn.Module, heads: Iterable) -> Dict[str, Tensor]:
        """:func:`prune` with this report's head counts (needed for plain ``flashlite.nn.Attention`` layers)."""
        return prune(model, heads, num_heads=dict(zip(self.layers, self.heads)))

    # -- output ---------------------------------------------------------------------------------
    def table(self, columns: Optional[Sequence[str]] = None, heads: Optional[Iterable[Head]] = None) -> str:
        """A plain-text table, one row per head, with its flags."""
        columns = list(columns) if columns is not None else [
            s for s in ("entropy", "norm_entropy", "max_prob", "mean_distance", "sink_mass", "local_share",
                        "output_variation", "importance") if s in self.stats]
        short = {"entropy": "entropy", "norm_entropy": "uniform", "max_prob": "max_p", "mean_distance": "distance",
                 "sink_mass": "sink", "local_share": "local", "keys": "keys", "output_norm": "out_norm",
                 "output_variation": "out_var", "importance": "importance"}
        width = max([len("layer")] + [len(_display(n)) for n in self.layers])
        header = f"{'#':>3} {'layer':<{width}} {'head':>4} " + " ".join(f"{short.get(c, c):>10}" for c in columns) \
            + "  flags"
        lines = [header, "-" * len(header)]
        for h in (self.all_heads() if heads is None else heads):
            cells = []
            for c in columns:
                v = self.value(c, h)
                cells.append(f"{'-':>10}" if math.isnan(v) else f"{v:>10.4g}")
            flags = ",".join(self.head_flags(h))
            lines.append(f"{h.layer:>3} {_display(h.name):<{width}} {h.head:>4} " + " ".join(cells) + f"  {flags}")
        pairs = self.redundant_pairs()
        if pairs:
            lines.append("redundant pairs (pooled-map cosine >= %g): " % self.criteria.redundant
                         + ", ".join(f"{a}~{b} ({s:.3f})" for a, b, s in pairs[:20])
                         + (f" ... ({len(pairs)} in all)" if len(pairs) > 20 else ""))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: layers, one record per head (statistics and flags), flags, redundant
        pairs, criteria and what was recorded (NaN written as null)."""
        heads = []
        for h in self.all_heads():
            row: Dict[str, Any] = {"layer": h.layer, "name": h.name, "head": h.head}
            row.update({s: _finite(self.value(s, h)) for s in self.stats})
            row["flags"] = self.head_flags(h)
            heads.append(row)
        return {
            "layers": [{"index": i, "name": n, "heads": c} for i, (n, c) in enumerate(zip(self.layers, self.heads))],
            "heads": heads,
            "flags": {name: [[h.layer, h.head] for h in hs] for name, hs in self.flags().items()},
            "redundant_pairs": [{"a": [a.layer, a.head], "b": [b.layer, b.head], "similarity": s}
                                for a, b, s in self.redundant_pairs()],
            "criteria": asdict(self.criteria),
            "meta": self.meta,
        }

    def save_json(self, path: Union[str, os.PathLike]) -> str:
        """Write :meth:`to_dict` as JSON; returns the path."""
        path = os.fspath(path)
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    def choose_heads(self, count: int = 8) -> List[Head]:
        """Heads worth a picture: the most focused (lowest ``norm_entropy``) of those not flagged
        dead, then the sink and local heads. Only heads with data (a pruned head, which saw no key,
        has none). When no head qualifies (random weights: every head near-uniform, so dead), the
        lowest-``norm_entropy`` heads with data, dead or not; empty only when no head has data."""
        flags = self.flags()
        has_data = [h for h in self.all_heads() if not math.isnan(self.value("entropy", h))]
        order = [h for h, _ in self.rank("norm_entropy", descending=False) if h in has_data]
        chosen = [h for h in order if h not in flags["dead"]][:count]
        for h in flags["sink"] + flags["local"]:
            if h in has_data and h not in chosen and len(chosen) < count:
                chosen.append(h)
        return chosen or order[:count]

    def plot(self, directory: Union[str, os.PathLike], heads: Optional[Sequence] = None, prefix: str = "heads",
             stats: Optional[Sequence[str]] = None) -> List[str]:
        """PNGs (matplotlib, Agg): a layer × head heatmap per statistic (``<prefix>_<stat>.png``) and
        the pooled maps of ``heads`` (``<prefix>_maps.png``; default :meth:`choose_heads`). ``heads``
        items: :class:`Head` or ``(layer, head)``. Returns the paths written."""
        from .plots import heatmaps, map_grid

        os.makedirs(directory, exist_ok=True)
        paths = heatmaps(self, os.fspath(directory), prefix, stats)
        if self.maps is not None:
            chosen = self.choose_heads() if heads is None else [
                h if isinstance(h, Head) else self.head(int(h[0]), int(h[1])) for h in heads]
            if chosen:
                paths.append(map_grid(self, chosen, os.path.join(os.fspath(directory), f"{prefix}_maps.png")))
        return paths


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------
def _is_attention_layer(module: nn.Module) -> bool:
    from ..nn.mha import MultiheadAttention
    from ..nn.modules import Attention

    if isinstance(module, (Attention, MultiheadAttention)):
        return True
    # transformers attention layers: the module the attention interface is called with.
    return (type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")
            and hasattr(module, "config") and hasattr(module, "head_dim"))


def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the model's attention layers, in module order: ``flashlite.nn``
    attention modules and transformers attention layers (``*Attention`` modules with a
    ``layer_idx``). An int layer in :func:`prune` indexes this list."""
    return [(name, m) for name, m in model.named_modules() if _is_attention_layer(m)]


def _num_heads(module: nn.Module, name: str, num_heads) -> int:
    if isinstance(num_heads, Mapping) and name in num_heads:
        return int(num_heads[name])
    if isinstance(num_heads, int) and not isinstance(num_heads, bool):
        return num_heads
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    config = getattr(module, "config", None)
    value = getattr(config, "num_attention_heads", None)
    if isinstance(value, int):
        return value
    raise ValueError(f"num_heads: the head count of layer {name!r} ({type(module).__name__}) is not known; pass "
                     f"num_heads=<int> or {{{name!r}: <int>}} (or use HeadReport.prune)")


def _set_mask(module: nn.Module, name: str, mask: Optional[Tensor]) -> None:
    if "head_mask" in module._buffers:
        module._buffers["head_mask"] = mask
        return
    if mask is None:
        return
    if hasattr(module, "head_mask"):
        if getattr(module, "head_mask") is not None:
            raise ValueError(f"heads: layer {name!r} has its own head_mask attribute; not replacing it")
        delattr(module, "head_mask")
    module.register_buffer("head_mask", mask, persistent=False)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def prune(model: nn.Module, heads, *, num_heads: Union[None, int, Mapping[str, int]] = None) -> Dict[str, Tensor]:
    """Mask heads so that they do no attention work (``head_mask`` of the kernel call: bool, a
    False head visits no tile, outputs zeros and gets zero gradients).

    ``heads``: an iterable of :class:`Head` (as :meth:`HeadReport.flags` gives), ``(layer, head)``
    pairs - ``layer`` a module name, a module, or an int index into :func:`attention_layers` - or a
    mapping ``layer -> heads``. Masks add up over calls; :func:`unprune` removes them. The mask is
    the layer's non-persistent ``head_mask`` buffer (moves with ``.to()``, not in the state_dict).
    The projections keep their weights (the q/k/v and output projections still run); only the
    attention itself is skipped. ``num_heads``: the head count for layers that do not carry it
    (plain ``flashlite.nn.Attention``): an int, or a mapping name -> int.
    Returns ``{layer name: bool mask [Hq]}`` of the layers changed.
    """
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items()}
    layers = None
    items = heads.items() if isinstance(heads, Mapping) else None
    pairs: List[Tuple[Any, int]] = []
    if items is not None:
        for layer, hs in items:
            hs = [hs] if isinstance(hs, int) else hs
            pairs += [(layer, h) for h in hs]
    else:
        for item in heads:
            if isinstance(item, Head):
                pairs.append((item.name, item.head))
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                raise TypeError(f"heads: each item must be a Head or a (layer, head) pair, got {item!r}")
    chosen: Dict[str, List[int]] = {}
    for layer, head in pairs:
        if isinstance(layer, str):
            if layer not in named:
                raise ValueError(f"heads: the model has no module named {layer!r}")
            name = layer
        elif isinstance(layer, nn.Module):
            if id(layer) not in names:
                raise ValueError(f"heads: {type(layer).__name__} is not a module of the model")
            name = names[id(layer)]
        elif isinstance(layer, int) and not isinstance(layer, bool):
            layers = attention_layers(model) if layers is None else layers
            if not 0 <= layer < len(layers):
                raise ValueError(f"heads: layer index {layer} out of range: the model has {len(layers)} attention "
                                 f"layers")
            name = layers[layer][0]
        else:
            raise TypeError(f"heads: a layer must be a module name, a module or an int, got {layer!r}")
        if isinstance(head, bool) or not isinstance(head, int):
            raise TypeError(f"heads: a head must be an int, got {head!r}")
        chosen.setdefault(name, []).append(head)
    # Validate every entry (and build every mask) first, then apply: an error leaves the model as it was.
    masks: Dict[str, Tensor] = {}
    for name, hs in chosen.items():
        module = named[name]
        count = _num_heads(module, name, num_heads)
        bad = [h for h in hs if not 0 <= h < count]
        if bad:
            raise ValueError(f"heads: layer {name!r} has {count} heads; no head {bad}")
        old = getattr(module, "head_mask", None)
        if isinstance(old, Tensor) and old.dtype == torch.bool and tuple(old.shape) == (count,):
            mask = old.clone()
        else:
            if "head_mask" not in module._buffers and old is not None:
                raise ValueError(f"heads: layer {name!r} has its own head_mask attribute; not replacing it")
            mask = torch.ones(count, dtype=torch.bool, device=_module_device(module))
        mask[hs] = False
        masks[name] = mask
    for name, mask in masks.items():
        _set_mask(named[name], name, mask)
    return masks


def unprune(model: nn.Module) -> None:
    """Remove every head mask :func:`prune` set on ``model``'s modules."""
    for name, module in model.named_modules():
        if "head_mask" in module._buffers:
            module._buffers["head_mask"] = None


# ---------------------------------------------------------------------------------------------
# One call: record (and importance) over batches, with a progress bar
# ---------------------------------------------------------------------------------------------
class _Progress:
    """A plain progress bar on stderr: ``label [#####.....] 5/10  3.2s``."""

    def __init__(self, total: Optional[int], label: str, stream=None, width: int = 30) -> None:
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if self.total:
            filled = int(self.width * self.done / self.total)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}  {elapsed:.1f}s")
        else:
            self.stream.write(f"\r{self.label} {self.done}  {elapsed:.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.done:
            self.stream.write("\n")
            self.stream.flush()


def _progress(batches: Iterable, label: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from batches
        return
    bar = _Progress(len(batches) if hasattr(batches, "__len__") else None, label)
    try:
        for batch in batches:
            yield batch
            bar.step()
    finally:
        bar.close()


def analyze(model: nn.Module, batches: Iterable, *, importance: bool = False, loss_fn: Optional[Callable] = None,
            progress: bool = False, criteria: Optional[Criteria] = None, **record_kw) -> HeadReport:
    """Record ``model`` over ``batches`` and return the :class:`HeadReport`; with
    ``importance=True`` each batch's forward also carries the gates and ``loss_fn`` (default
    :func:`default_loss`) is differentiated, so one pass gives both. Without importance the
    batches run under ``torch.no_grad()``: a mapping as ``model(**batch)``, a tuple as
    ``model(*batch)``, else ``model(batch)``. ``record_kw``: as :func:`record`."""
    loss_fn = default_loss if loss_fn is None else loss_fn
    with record(model, **record_kw) as recorder:
        if importance:
            with _gating(model) as gates:
                for batch in _progress(batches, "heads", progress):
                    gates.backward(loss_fn(model, batch))
            scores: Optional[Importance] = gates.result()
        else:
            with torch.no_grad():
                for batch in _progress(batches, "heads", progress):
                    _forward(model, batch)
            scores = None
    return recorder.report(criteria, importance=scores)


__all__ = ["record", "Recorder", "HeadReport", "Head", "Criteria", "Importance", "importance", "prune", "unprune",
           "attention_layers", "analyze", "default_loss", "stats_from_probabilities", "STATS", "FLAGS"]
