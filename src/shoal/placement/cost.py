"""The cost model: how long a step takes on a given split, from measured node and link speeds.

Per token and per rank, decode reads every weight byte it holds once, so its compute time is
bytes / the node's measured 4-bit read rate, plus the node's measured fixed cost per layer (Python
and kernel dispatch, which dominates small models; both from engine/probe.py) and FLOPs / the
node's GFLOP/s (negligible at batch 1, what prefill is made of); the reads and per-layer cost are
scaled by what the node's instances measured against their predictions (placement/feedback.py).
Ranks that share a machine (same profile fingerprint) and run at the same time (a tensor group)
share its bandwidth and cores. Messages cost a software overhead (a send, the receiver's wake-up)
plus, on the wire, RTT/2 + bytes / link throughput, each link kind (TCP, RDMA) with its own software
cost; an all-reduce among g ranks is one exchange of partial sums. The constants are in
`Calibration`, measured with scripts/bench_distributed.py on the reference machines (2 cores,
loopback); those of Apple GPUs (device "mlx") are fitted to exo's published M3 Ultra figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.cluster.messages import Accelerator, NodeProfile
from shoal.cluster.topology import ClusterView, NodeView
from shoal.engine.device import CARD_USABLE
from shoal.placement.spec import ModelSpec


@dataclass(frozen=True)
class Calibration:
    """Constants measured with scripts/bench_distributed.py and the bundled model on the reference
    machines (2 vCPUs). Nodes whose profile has the engine's own decode figures (engine/probe.py)
    are priced with those; `read_efficiency` and `layer_overhead_s` serve only nodes without them
    (an AMD EPYC: 15.6 ms/token = 30 layers x 0.40 ms, 0.15 ms of each fixed). On an Intel Xeon
    (probe: 21 us fixed per narrow layer, 26 GB/s of 4-bit reads, one native call a layer) the
    bundled model decodes at ~6 ms/token: 30 layers x 0.15 ms + the head + ~0.6 ms at the entry.
    Pipeline stages on one machine add ~0.5 ms each time a stage's process takes the cores over
    from another, and ~0.3 ms per hop as a stage sees it: the wire itself takes 15-52 us
    (scripts/bench_wire.py), the rest is the receiving stage's step starting cold."""

    read_efficiency: float = 0.38  # weight bytes read per second / the profile's copy bandwidth
    layer_overhead_s: float = 1.5e-4  # per layer per step on one rank (dispatch, norms, RoPE, attention)
    # A model layer's fixed cost / the probe's narrow layer's (attention over a longer context, more
    # rows per kernel call): measured with the bundled model on the reference machine.
    probe_overhead_scale: float = 1.6
    step_overhead_s: float = 6e-4  # per step at the entry: batch building, sampling, detokenizing
    message_overhead_s: float = 2.5e-4  # per message: a sendmsg, the receiver's wake-up, checking its MAC
    # Per message over RDMA (Thunderbolt 5): posted to the NIC from user space, no kernel TCP stack
    # and no thread wake-up; of the order of the link's own ~5 us latency (not fitted).
    rdma_message_overhead_s: float = 5e-6
    # A stage whose process takes the cores over from another one on the same machine starts cold
    # (the OpenMP workers asleep, the last stage's worker still spinning on the core it needs):
    # ~0.5 ms per hand-over on the reference machines, with runner threads pinned.
    colocated_switch_s: float = 5e-4
    # An all-reduce between ranks that share a machine waits for the other rank to get a core
    # (tensor-2 on one 2-core machine: ~0.19 ms per all-reduce, 61 a token).
    colocated_collective_s: float = 1.9e-4
    prefill_efficiency: float = 0.12  # fraction of the profile's GFLOP/s reached by prefill (dequantize + BLAS)
    runner_base_bytes: int = 250 << 20  # resident memory of a runner before weights (python, torch)
    kernel_bytes: int = 90 << 20  # numba's compiled quantized kernels (LLVM included), for quantized models
    activation_bytes: int = 40 << 20  # prefill scratch (dequantized weights) and activations

    def runner_overhead(self, quantized: bool) -> int:
        return self.runner_base_bytes + self.activation_bytes + (self.kernel_bytes if quantized else 0)

    def message_overhead(self, kind: str) -> float:
        """The software cost of one message over a link of `kind` (tcp or rdma)."""
        return self.rdma_message_overhead_s if kind == "rdma" else self.message_overhead_s
    # Nodes computing on a card (engine/device.py's torch backend). Not yet measured on a card
    # (no GPU in this project's CI): the share of the card's bandwidth that decode reads reach with
    # torch's eager ops, and the fixed cost of a layer — ~15 kernel launches at ~10 us each, no CUDA
    # graphs yet. A card whose bandwidth the profile did not measure is priced at a mid-range one's.
    gpu_read_efficiency: float = 0.6
    gpu_layer_overhead_s: float = 1.5e-4
    gpu_bandwidth_gbps_guess: float = 400.0
    device_copy_Bps: float = 12e9  # host <-> card over PCIe, per direction (hidden states in and out)
    # Nodes computing with MLX on an Apple GPU (unified memory, weights held as stored). Fitted to
    # exo's published decode of Qwen3-235B-A22B-4bit and DeepSeek-V3.1-4bit on 1, 2 and 4 M3 Ultra
    # (800 GB/s; tensor parallel over Thunderbolt 5 RDMA): the share of the memory bandwidth that
    # decode's reads reach, and a fixed cost per layer and step (kernel launches, the router's
    # top-k, MLX's graph building), which tensor parallelism does not divide. The pair minimizes
    # the worst error over the six (±12%; table in ARCHITECTURE.md, scripts/plan_moe_dry_run.py --published).
    mlx_read_efficiency: float = 0.7
    mlx_layer_overhead_s: float = 2.5e-4
    default_rtt_s: float = 1e-3  # links not measured yet: a LAN guess
    default_link_Bps: float = 100e6
    loopback_rtt_s: float = 1e-4  # two nodes on one machine
    loopback_Bps: float = 2e9


CALIBRATION = Calibration()
# A node's measured-decode correction is kept within these, so that one broken measurement (or a
# peer's figure) cannot make a node look 100x faster or push it out of every plan.
CORRECTION_BOUNDS = (0.2, 5.0)


def clamp_correction(c: float) -> float:
    return min(max(c, CORRECTION_BOUNDS[0]), CORRECTION_BOUNDS[1]) if math.isfinite(c) else 1.0


@dataclass(frozen=True)
class NodeRes:
    """A node as the planner sees it: what it offers and how fast it is."""

    id: str
    name: str
    address: str
    host: str  # machine identity: nodes with the same host share cores, memory and bandwidth
    free_bytes: int  # offered memory minus what placed instances already reserved there
    host_free_bytes: int  # the machine's available memory minus the reservations of all its nodes
    read_Bps: float  # weight bytes read per second
    flops: float  # fp32 FLOP/s
    cores: int
    layer_overhead_s: float = 1.5e-4  # fixed cost of one decode layer (dispatch, small ops)
    decode_correction: float = 1.0  # already applied to read_Bps and layer_overhead_s
    device: str = "cpu"  # where its shards compute (engine/device.py)
    is_self: bool = False
    copy_Bps: float = float("inf")  # host <-> device for the hidden states of a step (a card: PCIe)

    @property
    def on_card(self) -> bool:
        return self.device.split(":")[0] in ("cuda", "mps")


@dataclass(frozen=True)
class Link:
    rtt_s: float
    Bps: float
    kind: str = "tcp"  # tcp or rdma: which per-message software cost it pays (Calibration.message_overhead)


def node_resources(
    view: ClusterView, reserved: dict[str, int] | None = None, cal: Calibration = CALIBRATION
) -> list[NodeRes]:
    """The up nodes with a profile, their free memory net of `reserved` bytes per node id."""
    reserved = reserved or {}
    nodes = [n for n in view.up_nodes() if n.profile is not None]
    hosts: dict[str, list[NodeView]] = {}
    for n in nodes:
        hosts.setdefault(_host(n), []).append(n)
    out = []
    for n in nodes:
        p = n.profile
        assert p is not None
        host = _host(n)
        # The engine's measured decode speed where the profile has it (engine/probe.py), else the
        # copy bandwidth scaled by what the kernels reached of it on the reference machine.
        read_Bps = p.q4_read_gbps * 1e9 if p.q4_read_gbps else p.memory_bandwidth_gbps * 1e9 * cal.read_efficiency
        overhead = p.layer_overhead_us * 1e-6 * cal.probe_overhead_scale if p.layer_overhead_us else cal.layer_overhead_s
        # What the node's instances measured against what was predicted (placement/feedback.py):
        # its reads and per-layer cost c times as fast as priced.
        c = clamp_correction(p.decode_correction)
        host_avail = max(m.memory_available_bytes for m in hosts[host])
        host_reserved = sum(reserved.get(m.id, 0) for m in hosts[host])
        card = device_accelerator(p)
        if p.device == "mlx":
            # An Apple GPU: unified memory, so it offers the machine's memory like a CPU node, and
            # decode reads at its (GPU) bandwidth; the engine's probe figures are the CPU kernels'.
            bw = (_apple_gpu(p).memory_bandwidth_gbps or p.memory_bandwidth_gbps) * 1e9 * cal.mlx_read_efficiency
            out.append(NodeRes(
                id=n.id, name=n.name, address=n.address, host=host,
                free_bytes=max(0, n.memory_offered_bytes - reserved.get(n.id, 0)),
                host_free_bytes=max(0, host_avail - host_reserved), read_Bps=bw * c,
                flops=(_apple_gpu(p).gflops_fp32 or p.gflops_fp32) * 1e9, cores=64,
                layer_overhead_s=cal.mlx_layer_overhead_s / c, decode_correction=c, device=p.device, is_self=n.is_self))
            continue
        if card is not None:
            # The card is the node's device: its memory is what it offers, its bandwidth what
            # decode reads at, and it shares neither with the machine's CPU nodes.
            free = max(0, int(card.memory_total_bytes * CARD_USABLE) - reserved.get(n.id, 0))
            bw = (card.memory_bandwidth_gbps or cal.gpu_bandwidth_gbps_guess) * 1e9 * cal.gpu_read_efficiency
            out.append(NodeRes(
                id=n.id, name=n.name, address=n.address, host=f"{host}/{p.device}", free_bytes=free, host_free_bytes=free,
                read_Bps=bw * c, flops=(card.gflops_fp32 or p.gflops_fp32) * 1e9, cores=64,
                layer_overhead_s=cal.gpu_layer_overhead_s / c, decode_correction=c, device=p.device, is_self=n.is_self,
                copy_Bps=cal.device_copy_Bps))
            continue
        out.append(
            NodeRes(
                id=n.id,
                name=n.name,
                address=n.address,
                host=host,
                free_bytes=max(0, n.memory_offered_bytes - reserved.get(n.id, 0)),
                host_free_bytes=max(0, host_avail - host_reserved),
                read_Bps=read_Bps * c,
                flops=p.gflops_fp32 * 1e9,
                cores=max(1, p.cpu_cores_physical or p.cpu_cores_logical),
                layer_overhead_s=overhead / c,
                decode_correction=c,
                device=p.device,
                is_self=n.is_self,
            )
        )
    return out




def device_accelerator(p: NodeProfile) -> Accelerator | None:
    """The card a node's shards compute on (its profile's accelerator for `device`), or None."""
    kind, _, index = p.device.partition(":")
    if kind not in ("cuda", "mps"):
        return None
    cards = [a for a in p.accelerators if a.kind == kind]
    i = int(index) if index.isdigit() else 0
    return cards[i] if i < len(cards) else None


def _apple_gpu(p: NodeProfile) -> Accelerator:
    """The profile's Apple GPU (an accelerator of kind mlx or mps), or an empty one."""
    return next((a for a in p.accelerators if a.kind in ("mlx", "mps")), Accelerator(kind="mlx", name="", memory_total_bytes=0))


def held_as(nodes: list[NodeRes], spec: ModelSpec) -> list[NodeRes]:
    """Nodes as they would hold `spec`: the torch backend holds weights in its device's dtype
    (engine/device.py: bf16 on a card, float32 on torch-cpu; quantized weights dequantized), and
    MLX holds them as stored (4-bit stays 4-bit with its bf16 scales, bf16 stays bf16), where the
    spec counts them as the numba engine holds them. A node holding the weights x times larger has
    1/x of the room and reads 1/x of the weights per second."""
    import dataclasses

    per_param = spec.embed_bytes / max(1, spec.vocab_size * spec.hidden_size)  # the spec's bytes per weight
    as_stored = spec.stored_bytes / spec.weight_bytes if spec.stored_bytes else min(1.0, 2.0 / per_param)
    out = []
    for n in nodes:
        held = 2.0 if n.on_card else 4.0 if n.device == "torch-cpu" else per_param * as_stored if n.device == "mlx" else per_param
        x = held / per_param
        out.append(n if abs(x - 1.0) < 1e-6 else dataclasses.replace(
            n, free_bytes=int(n.free_bytes / x), host_free_bytes=int(n.host_free_bytes / x), read_Bps=n.read_Bps / x))
    return out


def _host(n: NodeView) -> str:
    return n.profile.fingerprint if n.profile is not None and n.profile.fingerprint else n.id


def link_between(view: ClusterView, a: NodeRes, b: NodeRes, cal: Calibration = CALIBRATION) -> Link:
    """The measured link, or a guess: loopback speed on one machine, a LAN guess otherwise."""
    if a.id == b.id:
        return Link(0.0, float("inf"))
    lk = view.link(a.id, b.id)
    if a.host == b.host:
        # Probes over HTTP overstate a loopback round trip several times; the kernel's is ~0.1 ms.
        rtt = cal.loopback_rtt_s if lk is None else min(lk.rtt_ms / 1e3, cal.loopback_rtt_s)
        bw = cal.loopback_Bps if lk is None or lk.bandwidth_mbps is None else max(lk.bandwidth_mbps * 1e6 / 8, cal.loopback_Bps)
        return Link(rtt, bw)
    if lk is None:
        return Link(cal.default_rtt_s, cal.default_link_Bps)
    bw = cal.default_link_Bps if lk.bandwidth_mbps is None else lk.bandwidth_mbps * 1e6 / 8
    return Link(lk.rtt_ms / 1e3, max(bw, 1.0), lk.kind)


# -- the pieces of a step ---------------------------------------------------------------------------
def message_time(link: Link, nbytes: float, cal: Calibration = CALIBRATION) -> float:
    """One point-to-point message."""
    return cal.message_overhead(link.kind) + link.rtt_s / 2 + nbytes / link.Bps


def allreduce_time(links: list[Link], g: int, nbytes: float, cal: Calibration = CALIBRATION,
                   colocated: bool = False) -> float:
    """An all-reduce among g ranks, as the runner's TensorGroup does it: every rank sends its
    partial sum to the g-1 others (one after another over its link) and receives theirs, over the
    slowest of their links. Ranks on one machine wait for each other to be scheduled instead."""
    if g <= 1:
        return 0.0
    if colocated:
        return cal.colocated_collective_s + 2 * nbytes / cal.loopback_Bps
    slow = min(links, key=lambda lk: lk.Bps) if links else Link(0.0, float("inf"))
    worst_rtt = max((lk.rtt_s for lk in links), default=0.0)
    overhead = max((cal.message_overhead(lk.kind) for lk in links), default=cal.message_overhead_s)
    return (g - 1) * overhead + worst_rtt / 2 + (g - 1) * nbytes / slow.Bps


@dataclass(frozen=True)
class RankWork:
    """What one rank does per step: weight bytes it reads, FLOPs per token, layers it runs."""

    node: NodeRes
    weight_bytes: float
    flops_per_token: float
    layers: int
    hidden: int = 0  # the model's hidden size: what a step's rows carry between host and device


def group_compute_time(work: list[RankWork], tokens: int, prefill: bool, cal: Calibration = CALIBRATION) -> float:
    """The slowest rank of ranks that run at the same time (a tensor group), `tokens` rows each.

    Ranks sharing a machine split its bandwidth and cores."""
    by_host: dict[str, list[RankWork]] = {}
    for w in work:
        by_host.setdefault(w.node.host, []).append(w)
    worst = 0.0
    for ranks in by_host.values():
        node = ranks[0].node
        share = len(ranks)
        read = sum(w.weight_bytes for w in ranks) / node.read_Bps
        flops = sum(w.flops_per_token for w in ranks) * tokens / (node.flops * (cal.prefill_efficiency if prefill else 1.0))
        # Python overhead runs on one core per rank: ranks beyond the core count wait their turn.
        overhead = max(w.layers for w in ranks) * node.layer_overhead_s * max(1.0, share / node.cores)
        # A card's stage copies its step's hidden states in from the host and out again (float32).
        copy = 2 * tokens * _hidden(ranks) * 4 / node.copy_Bps if node.on_card else 0.0
        worst = max(worst, max(read, flops) + overhead + copy)
    return worst


def _hidden(ranks: list[RankWork]) -> float:
    return max((w.hidden for w in ranks), default=0)
