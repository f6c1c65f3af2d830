"""The INT8 recipe, chosen on `val`: the range method, then, when full INT8 misses the margin, mixed precision from
layer sensitivity. Nothing here sees the `test` pairs the gate decides on.

- **The margin**: INT8 top-1 agreement with FP32 on val, Wilson lower bound >= MARGIN (99.3 %; the gate asks
  99 % on test), and, given the gate's held-out size, a predicted chance >= PASS_PROBABILITY that the gate's
  own bound passes there (evaluation.stats.predicted_pass: val and test each have their sampling noise). At
  2000 val and 2000 held-out pairs both allow 6 val disagreements (a 91 % chance); against a gate on 1000
  held-out pairs, only 1. Both reduce to a most val disagreements allowed. A val set too small to show it even at
  100 % is asked for full agreement instead, and the recipe says so.
- **Why 97 %**: a fresh set of the same size as the gate's is judged by the gate's own rule, so the predicted
  chance is also each shipped model's chance of holding its 99 % bound on data nobody looked at. Over six models,
  at least five hold it with probability p^6 + 6 p^5 (1 - p): 89 % at p = 0.90, 98.8 % at p = 0.97. At 2000 val
  and 2000 gate pairs p = 0.97 allows 4 val disagreements (0.90 allowed 6).
- **Confirmation**: the search stops at the first recipe whose val score meets the target, so that score is
  biased upward (the winner of several tries; seen: 5 of 2000 val pairs differed, 12 of 2000 on a fresh set). The
  recipe it stops at is scored again on `confirm`, pairs the search never saw, against the same target; a recipe
  that misses there counts as missing, and the search goes on. Each later confirmation reuses those pairs (a much
  smaller bias: it happens only after a miss, and the report lists every confirmation tried); the gate's
  held-out set is never used.
- **No confirmation set** (val too small to halve, or too small to show the margin at all): the gate's held-out
  set is the recipe's confirmation, looked at once after the search: it must show what val would have had to, the
  count that gives a 97 % chance that a fresh set of its size holds the gate's floor (4 of 2000), not merely the
  floor (11 of 2000). Val then steers the search (its target, else the float set closest to FP32 by KL within the
  budget) but does not refuse by itself (`steer_only`): the gate's check at that count is the guarantee, and it
  is looked at once. Seen: 152 val pairs with one near-tie pair refused a model that differed on 1 of 2000
  held-out pairs; 600 val pairs, which can show the margin only at 0 differing, refused a zoo model for 1 of 600
  (its full INT8 differed on 2 of 2000 held-out pairs). A val set too small to show the margin at all asks for full
  agreement.
- **The range method**: each of calibration.ranges.METHODS, from the one histogram pass; the best val agreement
  wins (ties: the lower KL divergence from FP32).
- **Sensitivity**: each block of the network (a module: `/model/stages.3/...` in a torch export) quantized alone,
  the rest float, ranked by its mean KL divergence from FP32 on val; within a block, each layer alone the same
  way. The most sensitive units are tried float in that order until the margin holds; a unit stays float
  only if it brings INT8 closer to FP32 on val (a lower KL), else it goes back to INT8.
- **Worth it**: at least MIN_INT8_SHARE of the conv/matmul layers still quantized, counted in the ONNX during the
  search; calibration confirms it on the TensorRT-RTX engine census. Below that, no INT8.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.accuracy import GATE
from calibration.data import Pair
from calibration.qdq import quantize_qdq
from calibration.sessions import cpu_session
from edge_pfm.bundle import MODALITIES
from edge_pfm.decision import softmax
from edge_pfm.preprocess import model_pixels, normalise
from evaluation.stats import max_failures, predicted_pass, wilson
from export.quant_scheme import QUANTIZABLE_OPS, input_layers, name_nodes

MARGIN = 0.993
PASS_PROBABILITY = 0.97  # the chance val must predict that the gate's held-out set passes (module docstring)
GATE_FLOOR = GATE["int8_top1_agreement"]  # the gate's agreement floor on its held-out set
MIN_INT8_SHARE = 0.80
SENSITIVITY_PAIRS = 256  # ranking needs a continuous score, not many pairs
CACHE_MB = 256  # val feeds kept in memory up to this; a larger val set is re-read for every trial


@dataclass(frozen=True)
class ValScore:
    """One model's agreement with FP32 on val."""

    agree: int
    n: int
    kl: float  # mean KL(FP32 || model) of the class probabilities

    @property
    def agreement(self) -> float:
        return self.agree / self.n if self.n else float("nan")

    @property
    def lower(self) -> float:
        return wilson(self.agree, self.n)[0]

    def to_dict(self) -> dict:
        return {"samples": self.n, "agreement": self.agreement, "disagreements": self.n - self.agree,
                "agreement_ci95": list(wilson(self.agree, self.n)), "mean_kl": self.kl}


class ValSet:
    """The val pairs as model pixels (edge_pfm.preprocess.model_pixels: uint8, a quarter of the float input), with
    FP32's class probabilities computed once and each pair's content digest. `chunks()` yields the pairs in
    chunks, the same ones each call (a lazy dataset, or seeded synthetic rendering). The pixels are kept in memory
    when they fit CACHE_MB, else read again for every model run."""

    def __init__(self, chunks: Callable[[], Iterable[list[Pair]]], n: int, specs: dict, input_names: dict,
                 fp32: str | Path, source: str = "", digest: Callable[[Pair], str] | None = None):
        self.chunks, self.n, self.specs, self.names, self.source = chunks, n, specs, input_names, source
        self.digests: set[str] = set()
        per_pair = sum(int(np.prod(s.input_shape)) for s in specs.values())
        keep = per_pair * n <= CACHE_MB * 2**20
        cached = []
        for pair_chunk in chunks():
            if digest is not None:
                self.digests.update(digest(pair) for pair in pair_chunk)
            if keep:
                cached.append(self._pixels(pair_chunk))
        self._cached = cached if keep else None
        self.reference = np.concatenate([softmax(o) for o in self._run(str(fp32), n)])

    def __len__(self) -> int:
        return self.n

    def _pixels(self, chunk: list[Pair]) -> dict[str, np.ndarray]:
        return {self.names[m]: np.stack([model_pixels(p[k], self.specs[m])[0] for p in chunk])
                for k, m in enumerate(MODALITIES)}

    def _read(self):
        if self._cached is not None:
            yield from self._cached
        else:
            for pair_chunk in self.chunks():
                yield self._pixels(pair_chunk)

    def _run(self, model, n: int) -> list[np.ndarray]:
        sess = cpu_session(model)
        output = sess.get_outputs()[0].name
        inputs = {self.names[m]: m for m in MODALITIES}
        out, seen = [], 0
        for pixels in self._read():
            if seen >= n:
                break
            feed = {name: normalise(px, self.specs[inputs[name]]) for name, px in pixels.items()}
            out.append(sess.run([output], feed)[0])
            seen += len(out[-1])
        return out

    def score(self, model, pairs: int | None = None) -> ValScore:
        """`model` (an onnx.ModelProto or path) against FP32 on the first `pairs` val pairs (default all)."""
        n = len(self) if pairs is None else min(pairs, len(self))
        p = np.concatenate([softmax(o) for o in self._run(model, n)])[:n]
        ref = self.reference[:n]
        kl = float(np.mean(np.sum(ref * (np.log(np.clip(ref, 1e-12, None)) - np.log(np.clip(p, 1e-12, None))), 1)))
        return ValScore(int((p.argmax(1) == ref.argmax(1)).sum()), n, kl)


def quantizable_layers(model, op_types: tuple[str, ...], with_input_layers: bool = False) -> list[str]:
    """The conv/matmul/gemm nodes the Q/DQ model quantizes, graph order: each input's first layer only
    `with_input_layers` (the weights take GPTQ's levels: export.quant_scheme)."""
    first = set() if with_input_layers else set(input_layers(model))
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name not in first]


def layer_block(name: str) -> str:
    """A layer's block: the first two levels of its module path (`/model/stages.3/mlp/mlp.0_1/Conv` ->
    `model/stages.3`; torch's `_1` suffix of a module's second call dropped, so a backbone shared by both
    inputs is one block). A name without a module path is a block of its own."""
    parts = [re.sub(r"_\d+$", "", p) for p in name.strip("/").split("/")[:-1]]
    return "/".join(parts[:2]) if len(parts) >= 2 else name


@dataclass
class Recipe:
    """What the INT8 model is made of, and the val evidence for it."""

    kind: str  # "ptq" (every scheme node in INT8), "mixed" (float_layers kept float) or "refused"
    method: str
    float_layers: list[str]  # conv/matmul layers and residual Adds kept float, beyond each input's first layer
    val: ValScore | None
    target: str  # what val was asked to show
    layers: int  # conv/matmul/gemm nodes in the graph
    quantized: int  # of them quantized
    reason: str = ""
    methods: dict[str, dict] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)  # block or layer -> mean KL, quantized alone
    confirm: ValScore | None = None  # the chosen recipe on pairs the search did not see
    confirmations: list[dict] = field(default_factory=list)  # every confirmation tried, in order
    gate_confirms: bool = False  # no pairs could confirm it: the gate's held-out set must show the val target
    trials: int = 0
    seconds: float = 0.0  # logged, not recorded: reports stay byte-identical from run to run

    @property
    def onnx_int8_share(self) -> float:
        return self.quantized / self.layers if self.layers else 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "method": self.method, "float_layers": self.float_layers,
                "val": self.val.to_dict() if self.val else None, "target": self.target, "reason": self.reason,
                "onnx_conv_matmul": {"layers": self.layers, "quantized": self.quantized,
                                     "share": round(self.onnx_int8_share, 4)},
                "confirm": self.confirm.to_dict() if self.confirm else None, "confirmations": self.confirmations,
                "gate_confirms": self.gate_confirms,
                "methods": self.methods, "sensitivity": self.sensitivity, "trials": self.trials}


def allowed_disagreements(n: int, margin: float = MARGIN, gate_pairs: int | None = None,
                          gate_floor: float = GATE_FLOOR) -> int:
    """The most of n val pairs that may disagree with FP32 (module docstring: the margin); -1: not even none."""
    allowed = max_failures(n, margin)
    if gate_pairs:
        while allowed >= 0 and predicted_pass(n - allowed, n, gate_pairs, gate_floor) < PASS_PROBABILITY:
            allowed -= 1
    return allowed


def score_confirmation(confirm: ValSet, model, what: str, margin: float = MARGIN, gate_pairs: int | None = None,
                       gate_floor: float = GATE_FLOOR, log: Callable[[str], None] = lambda m: None
                       ) -> tuple[ValScore, dict]:
    """`model` on the confirmation pairs, against the val target for their size -> (its score, the report's record
    of the confirmation: what was confirmed, the score, and whether it met the target)."""
    meets, target = margin_target(len(confirm), margin, gate_pairs, gate_floor)
    c = confirm.score(model)
    ok = meets(c)
    log(f"      confirmation of {what} on {c.n} unseen pairs ({confirm.source}): {c.agreement:.2%} "
        f"({c.n - c.agree} differ): {'met' if ok else 'MISSED'} ({target})")
    return c, {"recipe": what, **c.to_dict(), "met": ok}


def confirming_count(n: int, margin: float = MARGIN, gate_floor: float = GATE_FLOOR) -> int:
    """The most of the gate's n pairs that may differ when they confirm the recipe (no confirmation set): what a
    val set of n pairs would have had to show against a fresh set of n (module docstring); -1: none can."""
    return allowed_disagreements(n, margin, n, gate_floor)


FULL_AGREEMENT = "every val pair agreeing"  # the target of a val set too small for the margin


def margin_target(n: int, margin: float = MARGIN, gate_pairs: int | None = None,
                  gate_floor: float = GATE_FLOOR) -> tuple[Callable[[ValScore], bool], str]:
    """(does a val score of n pairs meet the target, the target in words). `gate_pairs`: the held-out pairs the
    gate decides on (None: the lower bound alone)."""
    allowed = allowed_disagreements(n, margin, gate_pairs, gate_floor)
    gate_words = (f" and a >= {PASS_PROBABILITY:.0%} predicted chance that the gate's {gate_pairs} held-out pairs "
                  f"show >= {gate_floor:.0%}" if gate_pairs else "")
    if allowed >= 0:
        return (lambda s: s.n - s.agree <= allowed), (
            f"val agreement 95 % lower bound >= {margin:.1%}{gate_words}: at most {allowed} of {n} val pairs differ")
    need = _pairs_for(margin, gate_pairs, gate_floor)
    why = f"that needs >= {need}" if need else "no val set can: the gate's held-out set is too small for its floor"
    return (lambda s: s.agree == s.n), (f"{FULL_AGREEMENT}: {n} val pairs cannot show a {margin:.1%} lower "
                                        f"bound{gate_words} ({why})")


def _pairs_for(margin: float, gate_pairs: int | None = None, gate_floor: float = GATE_FLOOR) -> int | None:
    """The fewest val pairs that can meet the margin at full agreement (None: none can)."""
    n = 1
    while allowed_disagreements(n, margin, gate_pairs, gate_floor) < 0:
        n *= 2
        if n > 1 << 20:
            return None
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if allowed_disagreements(mid, margin, gate_pairs, gate_floor) < 0 else (lo, mid)
    return hi


def choose_recipe(fp32: str | Path, ranges: dict[str, dict[str, float]], op_types: tuple[str, ...], val: ValSet,
                  methods: Sequence[str] | None = None, margin: float = MARGIN, min_share: float = MIN_INT8_SHARE,
                  log: Callable[[str], None] = lambda m: None, gate_pairs: int | None = None,
                  gate_floor: float = GATE_FLOOR, fixed_float: Sequence[str] = (), confirm: ValSet | None = None,
                  census: Callable[[object], tuple[int, int] | None] | None = None, rounding=None,
                  steer_only: bool = False) -> Recipe:
    """The range method and the nodes kept float (module docstring). `ranges`: {method: amax}; `methods`: the
    ones to choose among (default all in `ranges`); `gate_pairs`, `gate_floor`: the held-out set the gate will
    decide on, and its agreement floor (margin_target); `fixed_float`: nodes float whatever the search finds (those
    reading a non-finite tensor: calibration.ranges), not counted as the search's; `confirm`: pairs the search never
    sees, on which the recipe it stops at must meet the target too (module docstring); `census`: a Q/DQ model ->
    (Int8, all) conv/matmul layers of its engine (TensorRT-RTX), or None where no engine can be built: the float
    budget is then counted as the verdict counts it (an engine fuses and splits layers: seen, 16 ONNX conv/matmul
    nodes with 81 % in Int8 built 14 engine layers with 79 %, and the recipe the search stopped at was refused);
    `rounding` (calibration.weight_rounding.WeightRounding): every Q/DQ model the search builds takes its weights'
    GPTQ levels, as the one written will; `steer_only`: there is no confirmation set and the gate's held-out set
    will confirm the recipe (module docstring): a search that misses the target returns the closest recipe it
    found instead of refusing.

    The search's units are each block's conv/matmul layers and each block's residual Adds (export.quant_scheme:
    quantized for TensorRT's fusions; keeping them float costs no conv/matmul Int8). Units are ranked by their
    KL divergence when quantized alone, on the first SENSITIVITY_PAIRS val pairs, and tried float in that order
    until the target holds on all of val. Within a block of several layers (each ranked alone), its most
    sensitive layer float alone is tried first (INT8 errors are not monotone: one float layer can hold the
    target where its whole block misses it), then the whole block, which, if it holds, is cut down to its most
    sensitive layers that still hold it (a binary search over the ranked layers). A unit that misses stays
    float for the units after it only if it lowered the val KL divergence from FP32 (the closer of its two
    tries); otherwise it goes back to INT8 and costs no Int8 share (seen: a block float that flipped more
    pairs than full INT8 used up the float budget, and the search was refused). The ranking's trial models are derived
    from the full Q/DQ model (calibration.qdq.unquantize, milliseconds); every check of the target runs the
    model quantize_qdq writes (measured: a derived model and the written one differed by 3 of 2000 flips)."""
    import onnx

    from calibration.qdq import unquantize
    from export.quant_scheme import residual_adds

    t0 = time.perf_counter()
    graph = name_nodes(onnx.load(str(fp32)))
    all_layers = [n.name for n in graph.graph.node if n.op_type in QUANTIZABLE_OPS]
    layers = quantizable_layers(graph, op_types, rounding is not None)
    adds = residual_adds(graph)
    meets, target = margin_target(len(val), margin, gate_pairs, gate_floor)
    trials = 0
    confirmations: list[dict] = []
    last_confirm: list[ValScore] = []

    def confirmed(model, what: str) -> bool:  # the recipe the search stops at, on pairs it never saw
        if confirm is None:
            return True
        c, record = score_confirmation(confirm, model, what, margin, gate_pairs, gate_floor, log)
        confirmations.append(record)
        last_confirm[:] = [c]
        return record["met"]

    fixed = tuple(fixed_float)

    def recipe(kind: str, method: str, float_nodes: list[str], s: ValScore | None, reason: str = "", **kw) -> Recipe:
        floats = [n for n in dict.fromkeys([*float_nodes, *fixed]) if n in set(layers)]
        return Recipe(kind, method, float_nodes, s, target, len(all_layers), len(layers) - len(floats), reason,
                      trials=trials, seconds=time.perf_counter() - t0,
                      confirm=last_confirm[0] if last_confirm and kind != "refused" else None,
                      confirmations=confirmations, gate_confirms=confirm is None and kind != "refused", **kw)

    methods = list(methods or ranges)
    full = {m: quantize_qdq(fp32, ranges[m], None, op_types=op_types, float_nodes=fixed, rounding=rounding)
            for m in methods}
    by_method = {m: val.score(q) for m, q in full.items()}
    trials += len(methods)
    method = max(methods, key=lambda m: (by_method[m].agree, -by_method[m].kl))
    summary = {m: s.to_dict() for m, s in by_method.items()}
    for m, s in by_method.items():
        log(f"      {m:10s} full INT8: val agreement {s.agreement:.2%} ({s.n - s.agree} of {s.n} differ, lower "
            f"bound {s.lower:.2%}), KL {s.kl:.2e}")
    best = by_method[method]
    if meets(best) and confirmed(full[method], f"full INT8 ({method})"):
        return recipe("ptq", method, [], best, methods=summary)
    log(f"      {method} misses the target ({target}{' or its confirmation' if meets(best) else ''}): layer "
        "sensitivity")
    qmodel = full[method]
    layers = [n for n in layers if n not in fixed]  # the search's own: what it may keep float
    adds = [n for n in adds if n not in fixed]
    quantized = layers + adds
    sub = min(SENSITIVITY_PAIRS, len(val))

    def alone(group: Sequence[str]) -> float:  # `group` quantized, every other node float: a fast trial model
        nonlocal trials
        trials += 1
        keep = set(group)
        return val.score(unquantize(qmodel, graph, [n for n in quantized if n not in keep]), sub).kl

    def build(float_nodes: Sequence[str]):  # the model quantize_qdq writes
        return quantize_qdq(fp32, ranges[method], None, op_types=op_types, float_nodes=fixed + tuple(float_nodes),
                            rounding=rounding)

    def score(float_nodes: Sequence[str]) -> ValScore:  # on all of val
        nonlocal trials
        trials += 1
        return val.score(build(float_nodes))

    units: dict[str, list[str]] = {}
    for name in layers:
        units.setdefault(layer_block(name), []).append(name)
    for name in adds:
        units.setdefault(f"{layer_block(name)} residual adds", []).append(name)
    sensitivity = {u: alone(members) for u, members in units.items()}
    max_float = len(layers) - int(np.ceil(min_share * len(all_layers)))
    engine = census(qmodel) if census is not None else None
    counted_layers = f"{engine[1]} engine" if engine else str(len(all_layers))  # as the budget was counted
    if engine is not None:  # each layer kept float costs (at least) one engine Int8 layer
        int8_engine, all_engine = engine
        max_float = min(max_float, int8_engine - int(np.ceil(min_share * all_engine)))
        log(f"      float budget {max(max_float, 0)} conv/matmul layer(s): full INT8 builds {int8_engine} of "
            f"{all_engine} conv/matmul engine layers in Int8 (TensorRT-RTX census), {min_share:.0%} must stay")
    layer_set = set(layers)
    float_nodes: list[str] = []
    s = best  # the float set so far and its score: a unit joins it only if it brings INT8 closer to FP32
    for unit in sorted(units, key=lambda u: -sensitivity[u]):
        members = units[unit]
        room = max_float - sum(n in layer_set for n in float_nodes)
        layers_only = len(members) > 1 and all(n in layer_set for n in members)
        if layers_only or (any(n in layer_set for n in members) and len(members) > room):
            if room <= 0:
                continue  # no conv/matmul may stay float any more; residual adds still may
            ranked = {n: alone([n]) for n in members}
            sensitivity.update(ranked)
            members = sorted(members, key=lambda n: -ranked[n])[:room]
        # the block's most sensitive layer alone first: INT8 errors do not add up monotonically, and one float
        # layer can hold the target where its whole block float misses it (seen: 93.25 % vs 92.50 %)
        tries = [members[:1], members] if layers_only and len(members) > 1 else [members]
        closest: tuple[list[str], ValScore] | None = None
        for tried in tries:
            t = score(float_nodes + tried)
            what = tried[0] if len(tried) == 1 and len(members) > 1 else f"{unit} ({len(tried)} node(s))"
            log(f"      + {what} float: val agreement {t.agreement:.2%} ({t.n - t.agree} differ), KL {t.kl:.2e}")
            if meets(t):
                if len(tried) > 1 and all(n in layer_set for n in tried):  # the fewest of this block's layers
                    tried, t = _shortest_prefix(tried, t, lambda k, base=float_nodes, order=tried: score(base + order[:k]),
                                                meets)
                if confirmed(build(float_nodes + tried), f"{len(float_nodes + tried)} node(s) float"):
                    return recipe("mixed", method, float_nodes + tried, t, methods=summary, sensitivity=sensitivity)
            if closest is None or t.kl < closest[1].kl:
                closest = (tried, t)
        if closest[1].kl < s.kl:  # closer to FP32 on val: it stays float, and the search goes on from there
            float_nodes, s = float_nodes + closest[0], closest[1]
        else:  # no closer: these stay INT8 (seen: a whole block float flipped more pairs than one of its layers)
            log(f"        no closer to FP32 than KL {s.kl:.2e}: {unit} stays INT8")
    n_float = sum(n in layer_set for n in float_nodes)
    if target.startswith(FULL_AGREEMENT) or steer_only:  # val steered; the gate's set confirms
        why = "cannot show the margin" if target.startswith(FULL_AGREEMENT) else "have no confirmation set"
        log(f"      {len(val)} val pairs {why}: the closest recipe found ({len(float_nodes)} node(s) "
            "float) goes to the gate, whose held-out set must show the val target")
        return recipe("mixed" if float_nodes else "ptq", method, float_nodes, s, methods=summary,
                      sensitivity=sensitivity)
    return recipe("refused", method, float_nodes, s,
                  f"{target} failed with {n_float} conv/matmul layers and {len(float_nodes) - n_float} residual Adds "
                  f"float, the most that leaves {min_share:.0%} of the {counted_layers} conv/matmul layers in INT8 "
                  f"(val agreement {s.agreement:.2%})", methods=summary, sensitivity=sensitivity)


def judge_fixed(kind: str, method: str, qmodel, layers: int, quantized: int, val: ValSet, why: str,
                confirm: ValSet | None = None, margin: float = MARGIN, gate_pairs: int | None = None,
                gate_floor: float = GATE_FLOOR, log: Callable[[str], None] = lambda m: None) -> Recipe:
    """A recipe nothing was chosen for (QAT's ranges: trained, not searched), held to the search's own target on val
    and on the confirmation pairs: without it such a model went to the gate alone, and one that passed there with 11
    of 2000 differing showed 17 of 2000 on a fresh set. No search ran, so val is not biased for it; confirmation
    is still asked for, so every shipped recipe has met the target on two sets. -> `kind`, or "refused"."""
    t0 = time.perf_counter()
    meets, target = margin_target(len(val), margin, gate_pairs, gate_floor)
    s = val.score(qmodel)
    log(f"      {why}: val agreement {s.agreement:.2%} ({s.n - s.agree} of {s.n} differ): "
        f"{'met' if meets(s) else 'MISSED'} ({target})")
    c, confirmations = None, []
    if meets(s) and confirm is not None:
        c, record = score_confirmation(confirm, qmodel, why, margin, gate_pairs, gate_floor, log)
        confirmations.append(record)
    ok = meets(s) and all(x["met"] for x in confirmations)
    reason = "" if ok else (f"{why}: {target} failed on val ({s.n - s.agree} differ)" if not meets(s) else
                            f"{why}: the target failed on the {c.n} confirmation pairs ({c.n - c.agree} differ)")
    return Recipe(kind if ok else "refused", method, [], s, target, layers, quantized, reason,
                  confirm=c, confirmations=confirmations, gate_confirms=ok and confirm is None,
                  trials=1 + len(confirmations), seconds=time.perf_counter() - t0)


def _shortest_prefix(order: list[str], holds: ValScore, score_prefix: Callable[[int], ValScore],
                     meets: Callable[[ValScore], bool]) -> tuple[list[str], ValScore]:
    """The shortest prefix of `order` (ranked, most sensitive first) that still meets the target, by a binary
    search: the whole of it holds (`holds`), its first layer alone was tried and misses."""
    lo, hi, best = 1, len(order), holds
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        t = score_prefix(mid)
        if meets(t):
            hi, best = mid, t
        else:
            lo = mid
    return order[:hi], best
