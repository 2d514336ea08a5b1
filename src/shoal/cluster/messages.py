"""Every message that travels between nodes, as pydantic models serialised to JSON (and then
sealed by the peer channel, cluster/peer.py).

Models are strict about shape (unknown fields refused, strings and lists bounded) because they are
parsed from the network; a body that does not validate is refused with 400 before any handler
sees it. Body size limits per endpoint live here too, next to the messages they bound (they count
plaintext; the sealed body is `auth.SEAL_OVERHEAD` bytes longer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_BODY_BYTES = 1 << 20  # gossip of a large cluster stays far below this
MAX_PROBE_BYTES = 16 << 20  # bulk throughput probes

NodeId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
PublicKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # raw Ed25519 public key, hex
Signature = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]  # Ed25519 signature, hex
ShortStr = Annotated[str, Field(max_length=256)]
NonNeg = Annotated[int, Field(ge=0)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- device profile ------------------------------------------------------------------------------
class Accelerator(Message):
    kind: Annotated[str, Field(max_length=16)]  # "cuda" or "mps"
    name: ShortStr
    memory_total_bytes: NonNeg
    gflops_fp32: float | None = None  # measured matmul throughput on this device
    memory_bandwidth_gbps: float | None = None  # measured device copy bandwidth, bytes read + written / s / 1e9


class NodeProfile(Message):
    """What a node measured about itself at start (cached in <home>/profile.json)."""

    os: ShortStr
    hostname: ShortStr
    cpu_model: ShortStr
    cpu_cores_logical: NonNeg
    cpu_cores_physical: NonNeg | None = None
    ram_total_bytes: NonNeg
    accelerators: Annotated[list[Accelerator], Field(max_length=64)] = []
    gflops_fp32: float  # CPU fp32 matmul throughput
    memory_bandwidth_gbps: float  # CPU copy bandwidth, bytes read + written per second / 1e9
    measured_with: Annotated[str, Field(max_length=32)]  # "torch 2.x" or "numpy 2.x"
    # The engine's own decode, measured with its kernels (engine/probe.py); None where it could not run.
    layer_overhead_us: float | None = None  # fixed cost of one decode layer (dispatch, small ops)
    q4_read_gbps: float | None = None  # 4-bit weights streamed per second by the decode kernels
    measured_at: float  # unix time
    measure_seconds: float
    fingerprint: Annotated[str, Field(max_length=128)]  # machine identity the cache is valid for
    # False: measured under load or with absurd figures (profile.py): used, never cached. True by
    # default so that caches and peers from before the check stay readable.
    reliable: bool = True
    # Measured decode speed / the cost model's prediction on this node, learned from the instances it
    # ran (placement/feedback.py); not measured at start, so 1.0 in a fresh profile.
    decode_correction: float = 1.0
    # Where this node's shards compute (`shoal node --device`, engine/device.py): cpu (the numba
    # engine), torch-cpu, cuda, cuda:N or mps. A setting, not a measurement: filled in at start.
    device: Annotated[str, Field(max_length=16)] = "cpu"
    # The transports beside shoal's own its groups may sum over (placement/contract.Collective): an
    # MLX node's mlx-ring.
    collectives: Annotated[list[Annotated[str, Field(max_length=16)]], Field(max_length=8)] = []


# -- membership ------------------------------------------------------------------------------------
class MemberRecord(Message):
    """One node as gossip carries it. Versions order as (incarnation, heartbeat): incarnation
    changes on every restart, heartbeat grows while the node runs.

    Signed by the node itself (every field but `age_s` and the signature; membership.py
    `record_bytes`), and its id is derived from `public_key`: relaying nodes cannot alter it, and
    nobody can make one for another node's id."""

    node_id: NodeId
    public_key: PublicKey
    name: ShortStr
    host: ShortStr  # "" = not known yet (a node bound to every interface, before a peer told it)
    port: Annotated[int, Field(ge=1, le=65535)]
    incarnation: NonNeg
    heartbeat: NonNeg
    # Seconds since the sender last saw this heartbeat advance: lets a receiver date a record
    # without synchronised clocks (a long-silent node arrives as down, not as freshly up).
    age_s: Annotated[float, Field(ge=0.0)] = 0.0
    memory_available_bytes: NonNeg = 0
    memory_offered_bytes: NonNeg = 0
    profile: NodeProfile | None = None
    version: Annotated[str, Field(max_length=32)] = ""
    signature: Signature


class LinkRecord(Message):
    """A measured link. Measured by the pair's lower node id, so each pair has one author."""

    a: NodeId
    b: NodeId
    rtt_ms: Annotated[float, Field(ge=0.0)]
    bandwidth_mbps: Annotated[float, Field(ge=0.0)] | None = None
    measured_at: float  # unix time on the measuring node
    probe_bytes: NonNeg = 0
    # What the link carries the data plane over (placement/cost.py prices each kind); "tcp" by
    # default, so records from peers that predate it stay readable.
    kind: Literal["tcp", "rdma"] = "tcp"


class Gossip(Message):
    """Push-pull anti-entropy: a node's view of the cluster; the reply is the receiver's."""

    sender: NodeId
    members: Annotated[list[MemberRecord], Field(max_length=1024)]
    links: Annotated[list[LinkRecord], Field(max_length=8192)] = []
    observed_host: ShortStr = ""  # in a reply: the address the request came from


class Hello(Gossip):
    """First contact with an address (a seed or a discovered service) whose id we may not know:
    carries only the sender's own record; the table comes back in the (sealed) reply."""


class HelloReply(Gossip):
    observed_host: ShortStr  # the address the receiver saw the hello come from


class Leave(Message):
    """A node going away, signed by it (membership.py `leave_bytes`): no other node can make
    the cluster drop it."""

    sender: NodeId
    incarnation: NonNeg
    signature: Signature


class Ack(Message):
    ok: bool = True


class Ping(Message):
    seq: NonNeg = 0


class Pong(Message):
    seq: NonNeg = 0


class ProbeReply(Message):
    received_bytes: NonNeg


class Refusal(Message):
    """Body of every refused request (4xx) on /peer/*."""

    error: ShortStr
