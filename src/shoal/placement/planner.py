"""The placement planner: `plan(spec, view, request) -> Placement`, a pure function.

It enumerates candidate placements — which nodes, grouped how into stages — splits the model over
each and prices it with the cost model, then keeps the fastest predicted decode that fits:

* single: one node holds everything.
* pipeline: each node is a stage owning a layer range. A stage's share of the layers is
  proportional to its speed and capped by its free memory, so a fast node with room takes more.
* tensor: one group; each rank holds some KV heads (with their query heads), some MLP columns and
  some vocabulary rows. Splits are uneven where they must be (3 KV heads over 2 ranks) and are then
  evened out with the MLP columns, so every rank reads about its speed's share of the bytes.
* hybrid: tensor groups as pipeline stages; enumerating the partitions lets the cost model put the
  all-reduces on the fast links and the stage hops on the slow ones.
* expert (mixture-of-experts models): one expert group; every rank holds the attention and the
  dense layers whole and a run of the routed experts (by speed, capped by memory) plus a column
  slice of the shared experts; one all-reduce per MoE layer. For these models hybrid means expert
  groups as pipeline stages. Decode reads only the experts a token picks, so a rank's time is its
  expected share of them, and the group waits for the busiest.
* tensor inside an MoE group, as exo runs it (attention heads split, every expert's columns split,
  one all-reduce after attention and one after the MoE): the engine runs it for the families in
  `TENSOR_MOE` (`Part.expert_cols`: models/mixtral.py, models/deepseek.py); a family outside it
  would get it only for `hypothetical` clusters (`shoal place --dry-run --cluster-spec`), priced
  but never chosen by a real placement.

Ranks are numbered stage by stage; rank 0 is the entry: it drives the steps and, with the rest of
its stage's group, holds the embedding and the head (tied weights are one copy), so only hidden
states, never logits, cross the network. A cluster that cannot hold the model is refused with a
`PlacementError` that says how many bytes are missing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

from shoal.cluster.topology import ClusterView
from shoal.engine.device import MLX_GROUP_FAMILIES
from shoal.placement.contract import (
    Placement,
    PlacementError,
    PlacementRequest,
    Prediction,
    ShardPlan,
)
from shoal.placement.cost import (
    CALIBRATION,
    Calibration,
    Link,
    NodeRes,
    RankWork,
    allreduce_time,
    group_compute_time,
    held_as,
    link_between,
    message_time,
    node_resources,
)
from shoal.placement.spec import ModelSpec

DEFAULT_CONTEXT = 2048
MAX_ENUMERATED_NODES = 10  # beyond this, candidate node sets come from a heuristic
MAX_PARTITIONED_NODES = 6  # hybrid: all set partitions up to this many nodes
# MoE families whose groups the engine also splits as tensor groups (models/mixtral.py, Part.expert_cols).
TENSOR_MOE = ("mixtral", "qwen3_moe", "deepseek_v3", "kimi_k2")


# ----------------------------------------------------------------------------------------------- plan
def plan(
    spec: ModelSpec,
    view: ClusterView,
    request: PlacementRequest | None = None,
    reserved: dict[str, int] | None = None,
    cal: Calibration = CALIBRATION,
    hypothetical: bool = False,
) -> Placement:
    """The best placement of `spec` on the cluster `view` for `request`; `reserved` is memory
    already promised to other instances, by node id. A `hypothetical` cluster (a cluster spec, no
    node running) is also priced for strategies the engine cannot run yet (tensor inside an MoE)."""
    request = request or PlacementRequest()
    context = min(request.context or DEFAULT_CONTEXT, spec.max_context)
    offers = {n.id: set(n.profile.collectives) for n in view.nodes if n.profile is not None}
    nodes = held_as(node_resources(view, reserved, cal), spec)
    if request.nodes:
        nodes = _pick(nodes, request.nodes, view)
    if not nodes:
        raise PlacementError("no usable nodes: none is up with a device profile yet")
    group_kind = "expert" if spec.is_moe else "tensor"
    kinds = ["single", "pipeline", group_kind, "hybrid"] if request.strategy == "auto" else [request.strategy]
    tensor_moe = spec.is_moe and (hypothetical or spec.architecture in TENSOR_MOE)
    if tensor_moe and request.strategy == "auto":
        kinds.append("tensor")
    elif spec.is_moe and not tensor_moe and "tensor" in kinds:
        kinds = []  # refused below, with a pointer to expert parallel
    best: Placement | None = None
    best_key: tuple | None = None
    shortfall: _Shortfall | None = None
    for subset in _subsets(nodes, request):
        for kind in kinds:
            for stages in _layouts(subset, kind, spec, request, view, cal, fixed_order=bool(request.nodes)):
                if not hypothetical and not _runnable(stages, spec):
                    continue
                if request.collective != "shoal" and any(
                        len(g) > 1 and not all(request.collective in offers.get(n.id, ()) for n in g) for g in stages):
                    continue  # a group on a transport one of its nodes does not offer
                got = _build(spec, view, stages, kind, context, request.prompt_tokens, cal)
                if isinstance(got, _Shortfall):
                    if shortfall is None or got.missing < shortfall.missing:
                        shortfall = got
                    continue
                # Fastest first; then fewer nodes; then the roomiest (least memory per node).
                key = (-round(got.prediction.decode_tokens_per_s, 6), len(got.shards), max(got.memory_by_node().values()))
                if best_key is None or key < best_key:
                    best, best_key = got, key
    if best is None:
        raise _refusal(spec, nodes, request, context, shortfall, cal)
    return best.model_copy(update={"reason": _reason(best, nodes, request, spec.architecture), "weights": request.weights,
                                   "collective": request.collective})


def plan_each_strategy(
    spec: ModelSpec, view: ClusterView, request: PlacementRequest | None = None,
    reserved: dict[str, int] | None = None, cal: Calibration = CALIBRATION, hypothetical: bool = False,
) -> dict[str, Placement | PlacementError]:
    """The preview: the best plan of every strategy (or why there is none), and auto's choice."""
    request = request or PlacementRequest()
    kinds = ["auto", "pipeline", "expert" if spec.is_moe else "tensor", "hybrid"]
    if spec.is_moe and (hypothetical or spec.architecture in TENSOR_MOE):
        kinds.insert(2, "tensor")
    out: dict[str, Placement | PlacementError] = {}
    for kind in kinds:
        try:
            out[kind] = plan(spec, view, request.model_copy(update={"strategy": kind}), reserved, cal, hypothetical)
        except PlacementError as e:
            out[kind] = e
    return out


def preview_json(model: str, spec: ModelSpec, plans: dict[str, Placement | PlacementError]) -> dict:
    """What GET /v1/placement and `shoal place --dry-run` answer: the spec and each strategy's plan or error."""
    out: dict[str, dict] = {}
    for k, p in plans.items():
        out[k] = {"error": str(p), "missing_bytes": p.missing_bytes} if isinstance(p, PlacementError) else p.model_dump(mode="json")
    return {"model": model, "spec": spec.model_dump(), "plans": out}


# --------------------------------------------------------------------------------------- candidates
def _pick(nodes: list[NodeRes], wanted: list[str], view: ClusterView) -> list[NodeRes]:
    out = []
    for w in wanted:
        # An exact id or name first: a short name ("a") can also be the start of a hex node id.
        hits = [n for n in nodes if n.id == w or n.name == w] or [n for n in nodes if n.id.startswith(w)]
        if len(hits) != 1:
            known = view.node(w) or next((n for n in view.nodes if n.name == w or n.id.startswith(w)), None)
            if known is not None and known.status != "up":
                raise PlacementError(f"node {w!r} is {known.status}")
            if known is not None:
                raise PlacementError(f"node {w!r} has no device profile yet")
            raise PlacementError(f"unknown node {w!r}" if not hits else f"node {w!r} is ambiguous")
        if hits[0] in out:
            raise PlacementError(f"node {w!r} is named twice")
        out.append(hits[0])
    return out


def _subsets(nodes: list[NodeRes], request: PlacementRequest) -> Iterator[list[NodeRes]]:
    if request.nodes:
        yield nodes
        return
    sizes = [request.node_count] if request.node_count else range(1, len(nodes) + 1)
    for k in sizes:
        if k > len(nodes):
            continue
        if len(nodes) <= MAX_ENUMERATED_NODES:
            yield from (list(c) for c in itertools.combinations(nodes, k))
        else:  # the k fastest, and the k roomiest
            yield sorted(nodes, key=lambda n: -n.read_Bps)[:k]
            yield sorted(nodes, key=lambda n: -n.free_bytes)[:k]


def _layouts(
    subset: list[NodeRes], kind: str, spec: ModelSpec, request: PlacementRequest, view: ClusterView,
    cal: Calibration, fixed_order: bool,
) -> Iterator[list[list[NodeRes]]]:
    """Ordered stages (each a tensor group, entry rank first) of one strategy over `subset`."""
    n = len(subset)
    tp = request.tp_size
    if kind == "single":
        if n == 1:
            yield [subset]
    elif kind == "pipeline":
        if n >= 2 and (tp in (None, 1)):
            yield [[x] for x in (subset if fixed_order else _chain(subset, view, cal))]
    elif kind == "tensor":  # (for an MoE, plan() asks only for hypothetical clusters)
        if 2 <= n <= spec.num_kv_heads and tp in (None, n):
            yield [subset if fixed_order else _entry_first(subset)]
    elif kind == "expert" and spec.moe is not None:
        if 2 <= n <= spec.moe.num_experts and tp in (None, n):
            yield [subset if fixed_order else _entry_first(subset)]
    elif kind == "hybrid":
        if n < 3:
            return
        widest = spec.moe.num_experts if spec.moe is not None else spec.num_kv_heads
        for groups in _partitions(subset, view, cal):
            if len(groups) < 2 or max(len(g) for g in groups) < 2 or max(len(g) for g in groups) > widest:
                continue
            if tp is not None and any(len(g) != tp for g in groups):
                continue
            if fixed_order:  # stages in the order the nodes were named
                groups = sorted(groups, key=lambda g: subset.index(g[0]))
                yield groups
            else:
                yield _chain_groups([_entry_first(g) for g in groups], view, cal)


def _runnable(stages: list[list[NodeRes]], spec: ModelSpec) -> bool:
    """Whether every group's ranks can run their share: an MLX node joins the groups of the families
    its backend cuts (engine/mlx_backend.py); in any other group it would refuse to load, so such
    layouts are never offered (it still holds whole stages of any model)."""
    mlx_joins = spec.architecture in MLX_GROUP_FAMILIES
    return all(mlx_joins or len(g) == 1 or all(n.device != "mlx" for n in g) for g in stages)


def _entry_first(nodes: list[NodeRes]) -> list[NodeRes]:
    """This node first when it takes part (its API then talks to its own runner), else the fastest."""
    return sorted(nodes, key=lambda x: (not x.is_self, -x.read_Bps, x.name))


def _chain(nodes: list[NodeRes], view: ClusterView, cal: Calibration) -> list[NodeRes]:
    """Entry first, then each next stage the nearest (lowest RTT) to the last."""
    return [g[0] for g in _chain_groups([[n] for n in nodes], view, cal)]


def _chain_groups(groups: list[list[NodeRes]], view: ClusterView, cal: Calibration) -> list[list[NodeRes]]:
    rest = sorted(groups, key=lambda g: (not any(x.is_self for x in g), -sum(x.read_Bps for x in g), g[0].name))
    out = [rest.pop(0)]
    while rest:
        last = out[-1][0]
        nxt = min(rest, key=lambda g: (link_between(view, last, g[0], cal).rtt_s, g[0].name))
        rest.remove(nxt)
        out.append(nxt)
    return out


def _partitions(nodes: list[NodeRes], view: ClusterView, cal: Calibration) -> Iterator[list[list[NodeRes]]]:
    """All set partitions of a small node set; for a large one, the groups of fast links."""
    if len(nodes) <= MAX_PARTITIONED_NODES:
        yield from _set_partitions(nodes)
        return
    groups: list[list[NodeRes]] = []
    for n in sorted(nodes, key=lambda x: x.name):
        for g in groups:
            if all(link_between(view, n, m, cal).rtt_s <= 2 * cal.loopback_rtt_s + 5e-4 for m in g):
                g.append(n)
                break
        else:
            groups.append([n])
    yield groups


def _set_partitions(items: list) -> Iterator[list[list]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


# ------------------------------------------------------------------------------------------ building
class _Shortfall:
    def __init__(self, missing: int, why: str):
        self.missing, self.why = missing, why


def apportion(total: int, weights: list[float], unit: int = 1, minimum: int = 1) -> list[int]:
    """Split `total` into len(weights) integer parts proportional to weights, each a multiple of
    `unit` (the last part takes any remainder of total % unit) and at least `minimum` units."""
    units, rem = divmod(total, unit)
    k = len(weights)
    if units < k * minimum:
        raise ValueError(f"cannot split {total} into {k} parts of at least {minimum * unit}")
    wsum = sum(weights)
    ideal = [max(minimum, units * w / wsum) for w in weights]
    parts = [max(minimum, math.floor(x)) for x in ideal]
    while sum(parts) > units:  # the minimums overshot: take from the most over its ideal
        i = max((j for j in range(k) if parts[j] > minimum), key=lambda j: parts[j] - ideal[j])
        parts[i] -= 1
    order = sorted(range(k), key=lambda j: parts[j] - ideal[j])  # largest remainder first
    for j in itertools.islice(itertools.cycle(order), units - sum(parts)):
        parts[j] += 1
    out = [p * unit for p in parts]
    out[-1] += rem
    return out


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    starts = list(itertools.accumulate([0, *sizes]))
    return [(starts[i], starts[i + 1]) for i in range(len(sizes))]


class _Group:
    """One stage's group: how each rank's share of a layer (and of the head) is cut — KV heads and
    MLP columns in a tensor group, routed experts and shared-expert columns in an expert group."""

    def __init__(self, spec: ModelSpec, nodes: list[NodeRes], entry: bool, context: int, layers_hint: float,
                 kind: str = "pipeline"):
        self.nodes = nodes
        g = len(nodes)
        speed = [n.read_Bps for n in nodes]
        self.experts: list[tuple[int, int] | None] = [None] * g
        self.shared: list[tuple[int, int] | None] = [None] * g
        self.expert_cols: list[tuple[int, int] | None] = [None] * g
        self.vocab: list[tuple[int, int] | None] = [None] * g
        if entry:
            self.vocab = _ranges(apportion(spec.vocab_size, speed)) if g > 1 else [(0, spec.vocab_size)]
        self.fixed_bytes = [0] * g
        self.head_bytes = [0.0] * g
        for i, v in enumerate(self.vocab):
            if v is not None:
                frac = (v[1] - v[0]) / spec.vocab_size
                self.fixed_bytes[i] = int(frac * (spec.embed_bytes + (0 if spec.tied else spec.head_bytes)))
                self.head_bytes[i] = frac * spec.head_bytes
        if spec.moe is not None and kind == "tensor":
            self._split_tensor_moe(spec, context)
            return
        if spec.moe is not None:
            self._split_experts(spec, context, layers_hint)
            return
        self.allreduces_per_layer = 2.0 if g > 1 else 0.0  # attention's and the MLP's
        self.kv = _ranges(apportion(spec.num_kv_heads, speed)) if g > 1 else [(0, spec.num_kv_heads)]
        # Even out the bytes per rank with the MLP columns: a rank with an extra head gets fewer.
        if g > 1:
            target = [spec.layer_bytes * s / sum(speed) for s in speed]
            per_col = spec.mlp_bytes / spec.intermediate_size
            want = [max(1.0, (t - spec.attn_bytes * (b - a) / spec.num_kv_heads) / per_col) for t, (a, b) in zip(target, self.kv)]
            unit = spec.quant_group if spec.intermediate_size >= g * spec.quant_group else 1
            self.ffn = _ranges(apportion(spec.intermediate_size, want, unit=unit))
        else:
            self.ffn = [(0, spec.intermediate_size)]
        self.layer_bytes = [
            spec.norm_bytes
            + spec.attn_bytes * (b - a) / spec.num_kv_heads
            + spec.mlp_bytes * (f1 - f0) / spec.intermediate_size
            for (a, b), (f0, f1) in zip(self.kv, self.ffn)
        ]
        self.layer_read = list(self.layer_bytes)  # decode reads every weight held
        self.layer_flops = [
            2 * (spec.attn_params * (b - a) / spec.num_kv_heads + spec.mlp_params * (f1 - f0) / spec.intermediate_size)
            for (a, b), (f0, f1) in zip(self.kv, self.ffn)
        ]
        self.layer_kv = [2 * (b - a) * spec.head_dim * 4 * context for a, b in self.kv]

    def _split_experts(self, spec: ModelSpec, context: int, layers_hint: float) -> None:
        """Expert group: attention, norms, dense MLPs and routers whole on every rank (and so its
        cache); the routed experts in runs proportional to speed, capped by what fits in memory if
        the stage gets `layers_hint` layers; the shared experts' columns likewise by speed."""
        moe = spec.moe
        assert moe is not None
        g = len(self.nodes)
        E = moe.num_experts
        speed = [n.read_Bps for n in self.nodes]
        whole = spec.norm_bytes + spec.attn_bytes + spec.mlp_bytes
        kv = spec.kv_bytes_per_token_layer * context
        self.kv = [(0, spec.num_kv_heads)] * g
        self.ffn = [(0, spec.intermediate_size)] * g
        self.allreduces_per_layer = moe.moe_layers / spec.num_layers if g > 1 else 0.0
        if g > 1:
            per_expert = max(1.0, layers_hint * moe.expert_bytes * moe.moe_layers / spec.num_layers)
            caps = [max(1, int((n.free_bytes - self.fixed_bytes[i] - layers_hint * (whole + spec.shared_bytes + kv)) // per_expert))
                    for i, n in enumerate(self.nodes)]
            counts = _water_fill(E, speed, caps) if sum(caps) >= E else apportion(E, speed)
            self.experts = list(_ranges(counts))
            unit = spec.quant_group if moe.shared_size >= g * spec.quant_group else 1
            self.shared = list(_ranges(apportion(moe.shared_size, speed, unit=unit, minimum=0))) if moe.shared_size else [(0, 0)] * g
        else:
            self.experts, self.shared = [(0, E)], [(0, moe.shared_size)]
        moe_frac = moe.moe_layers / spec.num_layers
        # The busiest rank of a decode step: k of E experts picked uniformly, c of them here, is
        # hypergeometric; the group waits for the largest, ~ mean + std * sqrt(2 ln g) (capped at k).
        k = moe.experts_per_token
        spread = math.sqrt(2 * math.log(g)) if g > 1 else 0.0
        self.layer_bytes, self.layer_read, self.layer_flops = [], [], []
        routed_active = moe.moe_layers * (k * moe.expert_params + moe.shared_params)
        dense_params = (moe.active_params - spec.vocab_size * spec.hidden_size - routed_active) / spec.num_layers
        for (e0, e1), (s0, s1) in zip(self.experts, self.shared):  # type: ignore[misc]
            c = e1 - e0
            sfrac = (s1 - s0) / moe.shared_size if moe.shared_size else 0.0
            mean = k * c / E
            var = k * (c / E) * (1 - c / E) * (E - k) / max(E - 1, 1)
            load = min(float(k), float(c), mean + math.sqrt(var) * spread)
            self.layer_bytes.append(whole + spec.shared_bytes * sfrac + spec.routed_bytes * c / E)
            self.layer_read.append(whole + spec.shared_bytes * sfrac + moe_frac * load * moe.expert_bytes)
            self.layer_flops.append(2 * (dense_params + moe_frac * (moe.shared_params * sfrac + load * moe.expert_params)))
        self.layer_kv = [kv] * g

    def _split_tensor_moe(self, spec: ModelSpec, context: int) -> None:
        """Tensor parallel inside an MoE group, as exo (mlx-lm's `shard`) runs it: query and KV heads
        split, and the columns of every routed expert, of the shared experts and of the dense MLPs,
        all by speed; the routers whole. Every rank reads its share of each expert a token picks,
        so no rank waits on an unlucky draw; two all-reduces per layer."""
        moe = spec.moe
        assert moe is not None
        g = len(self.nodes)
        speed = [n.read_Bps for n in self.nodes]
        width = max(1, moe.expert_params // (3 * spec.hidden_size))  # an expert's intermediate size
        self.kv = _ranges(apportion(spec.num_kv_heads, speed)) if g > 1 else [(0, spec.num_kv_heads)]
        self.expert_cols = list(_ranges(apportion(width, speed))) if g > 1 else [(0, width)]
        self.experts = [(0, moe.num_experts)] * g
        self.ffn = [(round(a * spec.intermediate_size / width), round(b * spec.intermediate_size / width)) for a, b in self.expert_cols]
        self.shared = [(round(a * moe.shared_size / width), round(b * moe.shared_size / width)) for a, b in self.expert_cols]
        self.allreduces_per_layer = 2.0 if g > 1 else 0.0
        moe_frac = moe.moe_layers / spec.num_layers
        k = moe.experts_per_token
        routed_active = moe.moe_layers * (k * moe.expert_params + moe.shared_params)
        dense_params = (moe.active_params - spec.vocab_size * spec.hidden_size - routed_active) / spec.num_layers
        kv = spec.kv_bytes_per_token_layer * context
        self.layer_bytes, self.layer_read, self.layer_flops, self.layer_kv = [], [], [], []
        for (a, b), (c0, c1) in zip(self.kv, self.expert_cols):  # type: ignore[misc]
            hf, cf = (b - a) / spec.num_kv_heads, (c1 - c0) / width  # this rank's share of the heads and columns
            common = spec.norm_bytes + spec.attn_bytes * hf + (spec.mlp_bytes + spec.shared_bytes) * cf
            self.layer_bytes.append(common + spec.routed_bytes * cf)
            self.layer_read.append(common + moe_frac * k * moe.expert_bytes * cf)
            self.layer_flops.append(2 * (dense_params * hf + moe_frac * (moe.shared_params + k * moe.expert_params) * cf))
            self.layer_kv.append(kv if moe.cache_values else kv * hf)  # MLA's latent cache is not per head

    def layer_cap(self, overhead: int) -> tuple[int, int]:
        """(layers that fit on every rank, bytes missing for a single layer on the tightest rank)."""
        caps, missing = [], 0
        for i, n in enumerate(self.nodes):
            room = n.free_bytes - overhead - self.fixed_bytes[i]
            per = self.layer_bytes[i] + self.layer_kv[i]
            caps.append(max(0, int(room // per)))
            missing = max(missing, int(per - room), 0)
        return min(caps), missing


def _build(
    spec: ModelSpec, view: ClusterView, stages: list[list[NodeRes]], kind: str, context: int, prompt: int,
    cal: Calibration,
) -> Placement | _Shortfall:
    overhead = cal.runner_overhead(spec.quant_group > 1)
    hint = spec.num_layers / len(stages)
    groups = [_Group(spec, nodes, i == 0, context, hint, kind) for i, nodes in enumerate(stages)]
    links = [[link_between(view, a, b, cal) for a, b in itertools.combinations(g.nodes, 2)] for g in groups]
    H = spec.hidden_size * 4

    def per_layer_time(i: int) -> float:
        g = groups[i]
        work = [RankWork(n, g.layer_read[r], g.layer_flops[r], 1) for r, n in enumerate(g.nodes)]
        colocated = len({n.host for n in g.nodes}) == 1
        return group_compute_time(work, 1, False, cal) + g.allreduces_per_layer * allreduce_time(links[i], len(g.nodes), H, cal, colocated)

    # Layers: proportional to each stage's speed, capped by its memory, at least one each.
    caps, too_small = zip(*(g.layer_cap(overhead) for g in groups))
    if any(c < 1 for c in caps):
        i = min(range(len(caps)), key=lambda j: caps[j])
        names = ", ".join(n.name for n in groups[i].nodes)
        return _Shortfall(too_small[i], f"{names} cannot hold even one layer ({_gib(too_small[i])} short)")
    L = spec.num_layers
    if sum(caps) < L:
        per_layer = sum(sum(g.layer_bytes) + sum(g.layer_kv) for g in groups) / len(groups)
        missing = int((L - sum(caps)) * per_layer)
        return _Shortfall(missing, f"the stages hold {sum(caps)} of {L} layers")
    if len(groups) > L:
        return _Shortfall(0, f"{len(groups)} stages for {L} layers")
    counts = _water_fill(L, [1 / per_layer_time(i) for i in range(len(groups))], list(caps))
    layer_ranges = _ranges(counts)

    # Machines hosting several ranks must hold all of them.
    by_host: dict[str, int] = {}
    host_free: dict[str, int] = {}
    shards: list[ShardPlan] = []
    for s, (g, (l0, l1)) in enumerate(zip(groups, layer_ranges)):
        for r, n in enumerate(g.nodes):
            same_host = sum(1 for m in g.nodes if m.host == n.host)
            weight = int(g.fixed_bytes[r] + (l1 - l0) * g.layer_bytes[r])
            kv = (l1 - l0) * g.layer_kv[r]
            shards.append(
                ShardPlan(
                    node_id=n.id, node_name=n.name, address=n.address, rank=len(shards), stage=s, layers=(l0, l1),
                    tp_rank=r, tp_size=len(g.nodes), kv_heads=g.kv[r], ffn=g.ffn[r], vocab=g.vocab[r],
                    experts=g.experts[r], shared=g.shared[r], expert_cols=g.expert_cols[r],
                    weight_bytes=weight, kv_bytes=kv, overhead_bytes=overhead,
                    threads=max(1, n.cores // same_host), device=n.device, decode_correction=n.decode_correction,
                )
            )
            by_host[n.host] = by_host.get(n.host, 0) + shards[-1].memory_bytes
            host_free[n.host] = n.host_free_bytes
    for host, need in by_host.items():
        if need > host_free[host]:
            return _Shortfall(need - host_free[host], f"a machine hosting several of its nodes lacks {_gib(need - host_free[host])}")

    prediction = _predict(spec, view, groups, links, counts, prompt, cal)
    return Placement(model=spec.name, strategy=kind, context=context, shards=shards,
                     prediction=prediction, reason="")


def _water_fill(total: int, speed: list[float], caps: list[int]) -> list[int]:
    """Integer parts proportional to speed, each within [1, cap], summing to total (which the
    caller made possible: sum(caps) >= total >= len(caps))."""
    k = len(speed)
    share = [0.0] * k
    free, left = set(range(k)), float(total)
    while free:
        wsum = sum(speed[i] for i in free)
        over = [i for i in free if left * speed[i] / wsum > caps[i]]
        if not over:
            for i in free:
                share[i] = left * speed[i] / wsum
            break
        for i in over:
            share[i] = caps[i]
            free.discard(i)
            left -= caps[i]
    parts = [min(caps[i], max(1, math.floor(share[i]))) for i in range(k)]
    while sum(parts) < total:
        parts[max((j for j in range(k) if parts[j] < caps[j]), key=lambda j: share[j] - parts[j])] += 1
    while sum(parts) > total:
        parts[max((j for j in range(k) if parts[j] > 1), key=lambda j: parts[j] - share[j])] -= 1
    return parts


def _predict(
    spec: ModelSpec, view: ClusterView, groups: list[_Group], links: list[list[Link]], counts: list[int],
    prompt: int, cal: Calibration,
) -> Prediction:
    H = spec.hidden_size * 4
    entry = groups[0].nodes[0]
    one_host = [len({n.host for n in g.nodes}) == 1 for g in groups]

    def shares_host(a: _Group, b: _Group) -> bool:
        return bool({n.host for n in a.nodes} & {n.host for n in b.nodes})

    def step(tokens: int, prefill: bool) -> tuple[float, float]:
        compute = comm = 0.0
        g0 = groups[0]
        # The entry sends the step message to the other ranks of its stage.
        comm += sum(message_time(link_between(view, entry, m, cal), 2048, cal) for m in g0.nodes[1:])
        for i, (g, n_layers) in enumerate(zip(groups, counts)):
            work = [RankWork(n, g.layer_read[r] * n_layers, g.layer_flops[r] * n_layers, n_layers, spec.hidden_size)
                    for r, n in enumerate(g.nodes)]
            compute += group_compute_time(work, tokens, prefill, cal)
            comm += g.allreduces_per_layer * n_layers * allreduce_time(links[i], len(g.nodes), H * tokens, cal, one_host[i] and len(g.nodes) > 1)
            nxt = groups[i + 1] if i + 1 < len(groups) else (g0 if len(groups) > 1 else None)
            if nxt is None:
                continue
            # Hidden states (or, from the last stage, the rows for the head) to every rank of the next
            # stage; a stage that takes the cores over from another process on its machine starts cold.
            rows = tokens if nxt is not g0 else 1
            comm += sum(message_time(link_between(view, g.nodes[0], m, cal), H * rows + 2048, cal) for m in nxt.nodes)
            if shares_host(g, nxt):
                compute += cal.colocated_switch_s  # (it shows as slower compute, not as messages)
        # The head, one row per sequence, on the entry group; the slices' logits gathered at rank 0.
        head = [RankWork(n, g0.head_bytes[r], 2 * spec.hidden_size * spec.vocab_size * g0.head_bytes[r] / max(spec.head_bytes, 1), 0)
                for r, n in enumerate(g0.nodes)]
        compute += group_compute_time(head, 1, False, cal)
        if len(g0.nodes) > 1:
            comm += allreduce_time(links[0], len(g0.nodes), H * tokens, cal, one_host[0])  # the embedding's all-reduce
            comm += sum(message_time(link_between(view, entry, m, cal), 4 * (v[1] - v[0]), cal)
                        for m, v in zip(g0.nodes[1:], g0.vocab[1:]) if v is not None)
        return compute + comm + cal.step_overhead_s, comm

    decode, comm = step(1, False)
    ttft, _ = step(prompt, True)
    return Prediction(decode_tokens_per_s=1 / decode, ttft_s=ttft, prompt_tokens=prompt, step_s=decode, comm_s=comm)


# ---------------------------------------------------------------------------------------- explaining
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.0f} MiB"


def _reason(p: Placement, nodes: list[NodeRes], request: PlacementRequest, architecture: str) -> str:
    pred = p.prediction
    speed = f"predicted {pred.decode_tokens_per_s:.1f} tok/s decode, TTFT {pred.ttft_s * 1000:.0f} ms for {pred.prompt_tokens} tokens"
    corrected = {s.node_name: s.decode_correction for s in p.shards if abs(s.decode_correction - 1) >= 0.01}
    if corrected:
        speed += " (measured decodes set " + ", ".join(f"{n}'s speed x{c:.2f}" for n, c in corrected.items()) + ")"
    names = [s.node_name for s in p.shards]
    if p.strategy == "single":
        why = f"fits on {names[0]} alone, no network hops"
    elif p.strategy == "pipeline":
        split = ", ".join(f"{s.node_name} {s.layers[1] - s.layers[0]}" for s in p.shards)
        why = f"layers split by speed and memory ({split})"
    elif p.strategy == "expert" or (p.strategy == "hybrid" and p.shards[0].experts is not None):
        groups = " | ".join(
            "+".join(f"{s.node_name} experts {s.experts[0]}-{s.experts[1] - 1}" for s in st if s.experts)
            + f" layers {st[0].layers[0]}-{st[0].layers[1]}" for st in p.stages)
        why = f"routed experts split by speed and memory, attention on every rank ({groups})"
    elif p.strategy == "tensor" and p.shards[0].expert_cols is not None:
        heads = ", ".join(f"{s.node_name} {s.kv_heads[1] - s.kv_heads[0]} kv heads/expert cols {s.expert_cols[0]}-{s.expert_cols[1]}"
                          for s in p.shards if s.expert_cols)
        why = f"one tensor group inside the MoE as exo runs it ({heads})"
        if architecture not in TENSOR_MOE:
            why += ("; priced only: the engine does not run tensor parallel inside this family's MoE groups yet, so a "
                    "real placement uses expert instead")
    elif p.strategy == "tensor":
        heads = ", ".join(f"{s.node_name} {s.kv_heads[1] - s.kv_heads[0]} kv heads/{s.ffn[1] - s.ffn[0]} mlp cols" for s in p.shards)
        why = f"one tensor group ({heads})"
    else:
        groups = " | ".join("+".join(s.node_name for s in st) + f" layers {st[0].layers[0]}-{st[0].layers[1]}" for st in p.stages)
        why = f"tensor groups on fast links, pipeline between ({groups})"
    chosen = "asked for" if request.strategy != "auto" else f"best of the strategies that fit {len(nodes)} usable nodes"
    return f"{p.strategy} ({chosen}): {why}; {speed}"


def _refusal(
    spec: ModelSpec, nodes: list[NodeRes], request: PlacementRequest, context: int, shortfall: _Shortfall | None,
    cal: Calibration,
) -> PlacementError:
    weights = spec.weight_bytes
    kv = spec.num_layers * spec.kv_bytes_per_token_layer * context
    overhead = cal.runner_overhead(spec.quant_group > 1)
    offered = sum(n.free_bytes for n in nodes)
    need_all = weights + kv + overhead * len(nodes)
    if shortfall is None:
        what = request.strategy if request.strategy != "auto" else "any strategy"
        hint = ""
        mlx = any(n.device == "mlx" for n in nodes)
        if request.collective != "shoal" and request.strategy in ("tensor", "expert", "hybrid"):
            hint = f" (collective {request.collective}: every node of a group must offer it, as MLX nodes offer mlx-ring)"
        elif mlx and spec.architecture not in MLX_GROUP_FAMILIES and request.strategy in ("tensor", "expert", "hybrid"):
            hint = (f" (an MLX node joins the groups of {', '.join(MLX_GROUP_FAMILIES)} models only; it holds whole "
                    "stages of this one: use strategy pipeline, or group the CPU and CUDA nodes)")
        elif request.strategy == "tensor" and spec.is_moe:
            hint = " (tensor parallel is not built for mixture-of-experts models: use strategy expert)"
        elif request.strategy == "expert" and not spec.is_moe:
            hint = " (expert parallel is for mixture-of-experts models)"
        elif request.strategy == "expert":
            hint = " (an expert group needs at least 2 nodes)"
        elif request.strategy == "tensor":
            hint = f" (a tensor group needs 2 to {spec.num_kv_heads} nodes: one KV head each at least)"
        elif request.strategy == "hybrid":
            hint = " (hybrid needs at least 3 nodes: a tensor group of 2 and another stage)"
        elif request.strategy == "pipeline":
            hint = " (pipeline needs at least 2 nodes)"
        return PlacementError(f"no {what} placement of {spec.name} on {len(nodes)} usable node(s){hint}")
    missing = max(shortfall.missing, need_all - offered)
    return PlacementError(
        f"cannot place {spec.name}: it needs {_gib(weights)} of weights + {_gib(kv)} of KV cache for {context} tokens "
        f"+ {_gib(overhead)} per runner, and the {len(nodes)} usable node(s) offer {_gib(offered)}; "
        f"{_gib(missing)} missing ({shortfall.why})",
        missing_bytes=max(missing, 1),
    )
