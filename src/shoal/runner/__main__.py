"""`python -m shoal.runner`: one rank of one instance, started and supervised by its node's daemon.

The daemon writes a `RunnerConfig` as the first line of stdin (never on the command line: it holds
the instance's secret), then commands; the runner answers with events on stdout — both typed in
contract.py: `PortBound` (rank 0), `Loaded`, `Ready`, then per request `Accepted` or `Refused`,
`Tokens`, `Failed`, and `Fatal` before dying of an error. Logs go to stderr.

Life: bind (rank 0) -> load this rank's weights -> rendezvous and form the groups -> ready -> steps
(rank 0 serves requests; the others follow its step messages) -> stop when the entry says so, or when
stdin closes (the daemon is gone).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time

from shoal.config import parse_hostport
from shoal.runner.contract import (
    COMMAND,
    Fatal,
    GetStats,
    Loaded,
    PortBound,
    Ready,
    RunnerConfig,
    StageStats,
)


def _host(address: str) -> str:
    host, _ = parse_hostport(address)
    if host in ("0.0.0.0", "::", ""):
        import socket

        host = socket.gethostbyname(socket.gethostname())
    return host


def _follower_commands(out, worker) -> None:
    """Followers answer only `GetStats`; the end of input means the daemon is gone."""
    from pydantic import ValidationError

    for line in sys.stdin:
        try:
            if isinstance(COMMAND.validate_json(line), GetStats):
                out(StageStats(**worker.stats()))
        except ValidationError:
            pass
    from shoal.runner.timeline import TIMELINE

    TIMELINE.flush()
    os._exit(0)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("shoal.runner")
    from shoal.runner.entry import DistributedModel, Output, serve_entry, start_reader
    from shoal.runner.timeline import TIMELINE

    out = Output(sys.stdout)
    sys.stdout = sys.stderr  # stray prints must not corrupt the event stream
    cfg = RunnerConfig.model_validate_json(sys.stdin.readline())
    try:
        import psutil
        import torch.distributed as dist

        from shoal.engine import threads
        from shoal.runner.protocol import bind_listener
        from shoal.engine.device import Device
        from shoal.runner.stage import StageWorker, join_groups, load_stage

        threads.configure(cfg.threads)
        me = cfg.shards[cfg.rank]
        # Pipeline stages take turns on a machine, so each can have the cores to itself; the ranks
        # of a tensor group compute at the same time, and pinned alike they would crowd one core.
        if me.tp_size == 1 and threads.pin():
            log.info("threads pinned: the main thread and each OpenMP worker to a core of its own")
        host = _host(me.address)
        t0 = time.perf_counter()
        if cfg.rank == 0:
            sock = bind_listener(host)
            port = sock.getsockname()[1]
            store = dist.TCPStore(host, port, len(cfg.shards), True, _td(cfg.rendezvous_timeout_s),
                                  wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=True)
            out(PortBound(port=port))
        stage = load_stage(cfg.model, me, cfg.num_layers, with_tokenizer=cfg.rank == 0, device=Device(cfg.device),
                           weights=cfg.weights)
        rss = psutil.Process().memory_info().rss
        out(Loaded(seconds=round(time.perf_counter() - t0, 3), rss=rss))
        log.info("rank %d loaded layers %s (tp %d/%d) on %s, weights %s, in %.1f s, rss %.0f MiB", cfg.rank, me.layers,
                 me.tp_rank, me.tp_size, cfg.device, cfg.weights, time.perf_counter() - t0, rss / 2**20)
        if cfg.rank != 0:
            assert cfg.master_port is not None
            store = dist.TCPStore(_host(cfg.shards[0].address), cfg.master_port, len(cfg.shards), False,
                                  _td(cfg.rendezvous_timeout_s), use_libuv=True)
        comm, tp = join_groups(store, bytes.fromhex(cfg.secret), cfg.rank, cfg.shards, host, cfg.timeout_s,
                               stage.args.hidden_size, cfg.rendezvous_timeout_s, cfg.bench_plaintext_wire, cfg.collective)
        if me.tp_size > 1:
            log.info("rank %d sums over its group on %s", cfg.rank, cfg.collective)
        worker = StageWorker(stage.model, comm, tp, cfg.shards)
        if cfg.rank == 0:
            scheduler = entry_scheduler(cfg, DistributedModel(worker), stage)
        out(Ready(rss=psutil.Process().memory_info().rss))
        if cfg.rank == 0:
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            start_reader(inbox)
            serve_entry(scheduler, scheduler.gen.model, stage.tokenizer, inbox, out)
        else:
            threading.Thread(target=_follower_commands, args=(out, worker), daemon=True).start()
            worker.follow()
        return 0
    except Exception as e:  # noqa: BLE001 - one line for the daemon, the traceback for the log
        log.exception("runner rank %d failed", cfg.rank)
        out(Fatal(message=f"{type(e).__name__}: {e}"[:500]))
        return 1
    finally:
        TIMELINE.flush()


def entry_scheduler(cfg: RunnerConfig, model, stage):
    """The entry's scheduler: the same policy as a model in one process, with the instance's KV
    cost per token (every rank's layers, as the plan counted them) against the entry's budget."""
    from shoal.engine.scheduler import Scheduler, SchedulerLimits
    from shoal.runner.wire import WireError

    context = min(cfg.context, stage.args.max_context)
    kv_per_token = sum(s.kv_bytes for s in cfg.shards) // max(1, cfg.context)
    return Scheduler(model, stage.tokenizer, context, stage.args.vocab_size, kv_per_token,
                     SchedulerLimits(kv_budget_bytes=cfg.kv_budget_bytes), name=cfg.model, fatal=(WireError,),
                     prefix_keeper=model)


def _td(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # no helper thread (stdin reader, wire sender) may keep a finished runner alive
