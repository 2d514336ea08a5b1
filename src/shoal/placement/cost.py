"""The cost model: how long a step takes on a given split, from measured node and link speeds.

Per token and per rank, decode reads every weight byte it holds once, so its compute time is
bytes / the node's memory bandwidth, plus a fixed per-layer cost (Python and kernel dispatch, which
dominates small models) and FLOPs / the node's GFLOP/s (negligible at batch 1, what prefill is made
of). Ranks that share a machine (same profile fingerprint) and run at the same time (a tensor group)
share its bandwidth and cores. Messages cost a software overhead (gloo's, per message) plus, on the
wire, RTT/2 + bytes / link throughput; an all-reduce among g ranks is 2(g-1) such steps carrying
2(g-1)/g of the tensor (a ring). The constants are in `Calibration`, measured on the reference
machine (2 cores, loopback) with scripts/bench_distributed.py; README numbers come from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.cluster.topology import ClusterView, NodeView


@dataclass(frozen=True)
class Calibration:
    """Constants measured on the reference machine (2 vCPUs; a quiet profile reads ~28 GB/s copy and
    ~390 GFLOP/s) with scripts/bench_distributed.py and the bundled model: whole-model decode
    15.6 ms/token = 30 layers x 0.40 ms (0.15 ms of each fixed: a 4-layer toy model runs at 0.16 ms
    per layer) + the head + 0.6 ms at the entry; pipeline stages on one machine add ~0.75 ms each
    time a stage's process takes the cores over from another, and ~0.3 ms per hop."""

    read_efficiency: float = 0.38  # weight bytes read per second / the profile's copy bandwidth
    layer_overhead_s: float = 1.5e-4  # per layer per step on one rank (dispatch, norms, RoPE, attention)
    step_overhead_s: float = 6e-4  # per step at the entry: batch building, sampling, detokenizing
    message_overhead_s: float = 2.5e-4  # per point-to-point message: gloo and two thread wake-ups
    # A stage whose process takes the cores over from another one on the same machine starts cold
    # (caches, the OpenMP workers asleep): ~0.75 ms per hand-over on the reference machine.
    colocated_switch_s: float = 7.5e-4
    # An all-reduce between ranks that share a machine waits for the other rank to get a core.
    colocated_collective_s: float = 8e-4
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
DIRECT_ALLREDUCE_BYTES = 1 << 18  # the runner's TensorGroup exchanges tensors up to this directly


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
                read_Bps=p.memory_bandwidth_gbps * 1e9 * cal.read_efficiency,
                flops=p.gflops_fp32 * 1e9,
                cores=max(1, p.cpu_cores_physical or p.cpu_cores_logical),
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
    """An all-reduce among g ranks: small tensors are exchanged directly (one message round),
    large ones go round a ring (2(g-1) steps carrying 2(g-1)/g of the tensor), over the slowest
    of their links. Ranks on one machine wait for each other to be scheduled instead."""
    if g <= 1:
        return 0.0
    if colocated:
        return cal.colocated_collective_s + 2 * nbytes / cal.loopback_Bps
    if nbytes <= DIRECT_ALLREDUCE_BYTES:
        slow = min(links, key=lambda lk: lk.Bps) if links else Link(0.0, float("inf"))
        worst_rtt = max((lk.rtt_s for lk in links), default=0.0)
        return (g - 1) * cal.message_overhead_s + worst_rtt / 2 + (g - 1) * nbytes / slow.Bps
    slow = min(links, key=lambda lk: lk.Bps) if links else Link(0.0, float("inf"))
    worst_rtt = max((lk.rtt_s for lk in links), default=0.0)
    steps = 2 * (g - 1)
    return steps * (cal.message_overhead_s + worst_rtt / 2) + steps / g * nbytes / slow.Bps


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
        overhead = max(w.layers for w in ranks) * cal.layer_overhead_s * max(1.0, share / node.cores)
        worst = max(worst, max(read, flops) + overhead)
    return worst
