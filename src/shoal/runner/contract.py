"""The daemon <-> runner contract: every message that crosses the runner's pipes, typed.

A runner reads `RunnerConfig` as its first stdin line, then `Command`s (one JSON object a line);
it writes `RunnerEvent`s on stdout. The same types travel inside the signed peer messages
(daemon/messages.py) when a request reaches an entry on another node, so a request is one typed
object from the API node to the runner and back. Each message names itself in `kind`; nothing is
a string-keyed dict.

    daemon -> runner   Submit | Cancel | GetStats | Stop
    runner -> daemon   PortBound -> Loaded -> Ready, then per request Accepted | Refused, Tokens...,
                       Failed; Stats on request; Fatal before dying of an error
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shoal.engine.generate import SequenceStats, TokenEvent
from shoal.engine.grammar import Constraint, Kind
from shoal.engine.sampler import SamplingParams
from shoal.engine.scheduler import MAX_LOGPROBS, RequestRefused
from shoal.placement.contract import Collective, HeldAs, ShardPlan

RequestId = Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]{1,64}$")]
MAX_PROMPT_IDS = 1 << 17
MAX_TEXT = 1 << 20
MAX_STOPS = 16


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -------------------------------------------------------------------------------------- the start
class RunnerConfig(_Msg):
    """The first line a runner reads on stdin."""

    instance_id: str
    model: str
    rank: int
    shards: list[ShardPlan]
    num_layers: int
    context: int
    master_port: int | None  # rank 0 binds its own; the others are told it
    # The placement's wire secret (wire.instance_secret), derived by the runner's own daemon from the
    # cluster key: it crosses only this local pipe, never the network.
    secret: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    threads: int
    timeout_s: float = 120.0  # a collective that waits longer than this fails the instance
    rendezvous_timeout_s: float = 600.0  # loading every rank's weights included
    kv_budget_bytes: int | None = None  # the entry's KV budget (None: half the memory free at start)
    device: Annotated[str, Field(pattern=r"^(cpu|torch-cpu|cuda(:[0-9]+)?|mps|mlx)$")] = "cpu"  # engine/device.py
    weights: HeldAs = "stored"  # how the float matrices are held (placement/contract.HeldAs)
    collective: Collective = "shoal"  # what its group's all-reduces travel on (placement/contract.Collective)
    # Benchmarks only (scripts/bench_wire.py, which writes this config itself): frames between ranks
    # travel in clear and unauthenticated, to measure what the cipher costs. No daemon sets it.
    bench_plaintext_wire: bool = False


# --------------------------------------------------------------------------------- request parts
class Grammar(_Msg):
    """A `Constraint` as it travels: the schema or grammar as text; the entry compiles it."""

    kind: Kind
    text: Annotated[str, Field(max_length=MAX_TEXT)] = ""
    strict: bool = True


class Sampling(_Msg):
    """`SamplingParams` as it travels, with the bounds a request may ask for."""

    max_tokens: Annotated[int, Field(ge=0, le=1 << 24)] = 256
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] = 0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(max_length=MAX_STOPS)] = []
    ignore_eos: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOPS)] = []
    constraint: Grammar | None = None
    skip_special_tokens: bool = True

    def params(self) -> SamplingParams:
        d = self.model_dump()
        c = None if self.constraint is None else Constraint(self.constraint.kind, self.constraint.text, self.constraint.strict)
        return SamplingParams(**{**d, "stop": tuple(d["stop"]), "stop_token_ids": tuple(d["stop_token_ids"]), "constraint": c})

    @classmethod
    def of(cls, p: SamplingParams) -> Sampling:
        return cls(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                   seed=p.seed, stop=list(p.stop), ignore_eos=p.ignore_eos, logprobs=p.logprobs,
                   prompt_logprobs=p.prompt_logprobs, stop_token_ids=list(p.stop_token_ids),
                   skip_special_tokens=p.skip_special_tokens,
                   constraint=None if p.constraint is None else Grammar(kind=p.constraint.kind, text=p.constraint.text,
                                                                        strict=p.constraint.strict))


class ChatTurn(_Msg):
    """One message of a chat, as the model's chat template takes it."""

    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: Annotated[str, Field(max_length=MAX_TEXT)]


class Failure(_Msg):
    """Why a request was refused or ended, with the HTTP status a client should see."""

    status: Annotated[int, Field(ge=400, le=599)]
    message: Annotated[str, Field(max_length=2048)]
    code: str | None = None
    param: str | None = None
    retry_after: Annotated[float, Field(ge=0.0)] | None = None

    @classmethod
    def of(cls, e: RequestRefused) -> Failure:
        return cls(status=e.status, message=e.message[:2048], code=e.code, param=e.param, retry_after=e.retry_after)

    def error(self) -> RequestRefused:
        return RequestRefused(self.status, self.message, self.code, self.param, self.retry_after)


class SeqStats(_Msg):
    prompt_tokens: int
    cached_tokens: int = 0
    generation_tokens: int
    ttft_s: float | None = None
    prefill_tps: float = 0.0
    decode_tps: float = 0.0

    @classmethod
    def of(cls, s: SequenceStats) -> SeqStats:
        return cls(prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens, generation_tokens=s.generation_tokens,
                   ttft_s=s.ttft_s, prefill_tps=s.prefill_tps, decode_tps=s.decode_tps)


TopLogprobs = list[tuple[int, float]]


class Token(_Msg):
    """One `TokenEvent` as it travels (no uid: the request id says whose it is)."""

    token: int | None
    text: str
    finish: Literal["stop", "length", "cancelled"] | None = None
    logprob: float | None = None
    top: TopLogprobs | None = None
    prompt_logprobs: list[tuple[int, float, TopLogprobs]] | None = None

    @classmethod
    def of(cls, ev: TokenEvent) -> Token:
        return cls(token=ev.token, text=ev.text, finish=ev.finish_reason, logprob=ev.logprob, top=ev.top_logprobs,
                   prompt_logprobs=ev.prompt_logprobs)

    def event(self) -> TokenEvent:
        return TokenEvent(0, self.token, self.text, self.finish, self.logprob, self.top, self.prompt_logprobs)


# ----------------------------------------------------------------------------- daemon -> runner
class Submit(_Msg):
    """A request for the entry: exactly one of token ids, text or chat messages."""

    kind: Literal["submit"] = "submit"
    rid: RequestId
    prompt_ids: Annotated[list[int], Field(max_length=MAX_PROMPT_IDS)] | None = None
    text: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    messages: Annotated[list[ChatTurn], Field(min_length=1, max_length=4096)] | None = None
    params: Sampling = Sampling()
    # Tokens the request already generated on another placement: generation resumes after them.
    resume_ids: Annotated[list[int], Field(max_length=MAX_PROMPT_IDS)] = []

    def model_post_init(self, _context: object) -> None:
        given = sum(x is not None for x in (self.prompt_ids, self.text, self.messages))
        if given != 1:
            raise ValueError("give exactly one of prompt_ids, text and messages")


class Cancel(_Msg):
    kind: Literal["cancel"] = "cancel"
    rid: RequestId


class GetStats(_Msg):
    kind: Literal["stats"] = "stats"


class Stop(_Msg):
    kind: Literal["stop"] = "stop"


Command = Annotated[Submit | Cancel | GetStats | Stop, Field(discriminator="kind")]
COMMAND = TypeAdapter(Command)


# ----------------------------------------------------------------------------- runner -> daemon
class PortBound(_Msg):
    kind: Literal["port"] = "port"
    port: int


class Loaded(_Msg):
    kind: Literal["loaded"] = "loaded"
    seconds: float
    rss: int


class Ready(_Msg):
    kind: Literal["ready"] = "ready"
    rss: int


class Accepted(_Msg):
    kind: Literal["accepted"] = "accepted"
    rid: RequestId
    prompt_ids: list[int]  # as the entry tokenized it: what a replay elsewhere would prefill


class Refused(_Msg):
    kind: Literal["refused"] = "refused"
    rid: RequestId
    error: Failure


class Tokens(_Msg):
    kind: Literal["tokens"] = "tokens"
    rid: RequestId
    tokens: list[Token]
    stats: SeqStats | None = None  # with the last one


class Failed(_Msg):
    kind: Literal["failed"] = "failed"
    rid: RequestId
    error: Failure


class StageStats(_Msg):
    kind: Literal["stats"] = "stats"
    steps: int = 0
    tokens: int = 0
    step_s: float = 0.0
    wait_s: float = 0.0
    allreduce_s: float = 0.0
    compute_s: float = 0.0


class Fatal(_Msg):
    kind: Literal["fatal"] = "fatal"
    message: str


RunnerEvent = Annotated[PortBound | Loaded | Ready | Accepted | Refused | Tokens | Failed | StageStats | Fatal,
                        Field(discriminator="kind")]
RUNNER_EVENT = TypeAdapter(RunnerEvent)
