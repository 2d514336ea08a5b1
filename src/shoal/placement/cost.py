"""The cost model: how long a step takes on a given split, from measured node and link speeds.

Per token and per rank, decode reads every weight byte it holds once, so its compute time is
bytes / the node's measured 4-bit read rate, plus the node's measured fixed cost per layer (Python
and kernel dispatch, which dominates small models; both from engine/probe.py) and FLOPs / the
node's GFLOP/s (negligible at batch 1, what prefill is made of). Ranks that share a machine (same
profile fingerprint) and run at the same time (a tensor group) share its bandwidth and cores.
Messages cost a software overhead (a send, the receiver's wake-up) plus, on the wire, RTT/2 +
bytes / link throughput; an all-reduce among g ranks is one exchange of partial sums. The
constants are in `Calibration`, measured with scripts/bench_distributed.py on the reference
machines (2 cores, loopback).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.cluster.topology import ClusterView, NodeView


@dataclass(frozen=True)
class Calibration:
    """Constants measured with scripts/bench_distributed.py and the bundled model on the reference
    machines (2 vCPUs). Nodes whose profile has the engine's own decode figures (engine/probe.py)
    are priced with those; `read_efficiency` and `layer_overhead_s` serve only nodes without them
    (an AMD EPYC: 15.6 ms/token = 30 layers x 0.40 ms, 0.15 ms of each fixed). On an Intel Xeon
    (probe: 66 us fixed per narrow layer, 22 GB/s of 4-bit reads) the bundled model decodes at
    ~8.5 ms/token: 30 layers x 0.24 ms + the head + ~0.6 ms at the entry. Pipeline stages on one
    machine add ~0.5 ms each time a stage's process takes the cores over from another, and
    ~0.3 ms per hop (a thread wake-up at each end dominates on loopback)."""

    read_efficiency: float = 0.38  # weight bytes read per second / the profile's copy bandwidth
    layer_overhead_s: float = 1.5e-4  # per layer per step on one rank (dispatch, norms, RoPE, attention)
    # A model layer's fixed cost / the probe's narrow layer's (attention over a longer context, more
    # rows per kernel call): measured with the bundled model on the reference machine.
    probe_overhead_scale: float = 1.6
    step_overhead_s: float = 6e-4  # per step at the entry: batch building, sampling, detokenizing
    message_overhead_s: float = 2.5e-4  # per message: a sendmsg, the receiver's wake-up, checking its MAC
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
    default_rtt_s: float = 1e-3  # links not measured yet: a LAN guess
    default_link_Bps: float = 100e6
    loopback_rtt_s: float = 1e-4  # two nodes on one machine
    loopback_Bps: float = 2e9


CALIBRATION = Calibration()


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
    device: str = "cpu"
    is_self: bool = False


@dataclass(frozen=True)
class Link:
    rtt_s: float
    Bps: float


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
        host_avail = max(m.memory_available_bytes for m in hosts[host])
        host_reserved = sum(reserved.get(m.id, 0) for m in hosts[host])
        out.append(
            NodeRes(
                id=n.id,
                name=n.name,
                address=n.address,
                host=host,
                free_bytes=max(0, n.memory_offered_bytes - reserved.get(n.id, 0)),
                host_free_bytes=max(0, host_avail - host_reserved),
                read_Bps=read_Bps,
                flops=p.gflops_fp32 * 1e9,
                cores=max(1, p.cpu_cores_physical or p.cpu_cores_logical),
                layer_overhead_s=overhead,
                is_self=n.is_self,
            )
        )
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
    return Link(lk.rtt_ms / 1e3, max(bw, 1.0))


# -- the pieces of a step ---------------------------------------------------------------------------
def message_time(link: Link, nbytes: float, cal: Calibration = CALIBRATION) -> float:
    """One point-to-point message."""
    return cal.message_overhead_s + link.rtt_s / 2 + nbytes / link.Bps


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
    return (g - 1) * cal.message_overhead_s + worst_rtt / 2 + (g - 1) * nbytes / slow.Bps


@dataclass(frozen=True)
class RankWork:
    """What one rank does per step: weight bytes it reads, FLOPs per token, layers it runs."""

    node: NodeRes
    weight_bytes: float
    flops_per_token: float
    layers: int


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
        worst = max(worst, max(read, flops) + overhead)
    return worst
