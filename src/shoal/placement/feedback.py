"""Measured decode speeds fed back into the cost model: a per-node correction of the probe.

The profile prices a node from the engine's probe on small random models (engine/probe.py); the
instances the node then runs say how fast it really decodes. After a request decoded on an instance
this node holds whole (one shard, no other instance here, no other request at the same time), the
measured step time gives the factor that would have made the prediction right: the node's compute
(weight reads and per-layer cost) scaled by one number, the entry's per-step overhead and any
messages left as they are. The factor travels with the node's profile (`decode_correction`) and the
cost model applies it to every plan that uses the node (placement/cost.py).

Why these requests only: concurrent ones share the cores, and a split instance's error is as much
its links' as the node's. Why one factor a node, not one a model: what the probe misses is the
machine's (its kernels, its dispatch), and it then also helps a model that has not run there yet.
The factor is the median of the last few measurements, so one odd request does not swing the next
plan while the first one already sets it, and bounded (cost.CORRECTION_BOUNDS). It is kept in
<home>/decode_correction.json for the profile it was learned against: a profile measured again
starts from 1.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from shoal.cluster.messages import NodeProfile
from shoal.placement.contract import Placement
from shoal.placement.cost import (
    CALIBRATION,
    CORRECTION_BOUNDS,
    Calibration,
    clamp_correction,
)

log = logging.getLogger("shoal.placement")

MIN_TOKENS = 32  # fewer decoded tokens are too short a run to time
KEEP = 5  # measurements the median is taken over


def target_correction(placement: Placement, node_id: str, decode_tps: float,
                      cal: Calibration = CALIBRATION) -> float | None:
    """The correction of `node_id` that would have predicted `decode_tps` for `placement`; None
    unless the placement is that node's alone."""
    if len(placement.shards) != 1 or placement.shards[0].node_id != node_id or not decode_tps > 0:
        return None
    pred = placement.prediction
    fixed = pred.comm_s + cal.step_overhead_s  # not the node's compute: left uncorrected
    compute = pred.step_s - fixed  # as priced, with the correction the plan used
    if compute <= 0:
        return None
    measured = 1 / decode_tps - fixed
    if measured <= 0:
        return CORRECTION_BOUNDS[1]
    return clamp_correction(placement.shards[0].decode_correction * compute / measured)


class DecodeFeedback:
    """This node's recent target corrections, persisted for the profile they were learned against."""

    def __init__(self, path: Path):
        self.path = path
        self._key: tuple[str, float] | None = None
        self._targets: list[float] = []

    @property
    def value(self) -> float:
        return clamp_correction(statistics.median(self._targets)) if self._targets else 1.0

    def load(self, profile: NodeProfile) -> float:
        """The correction stored for `profile` (1.0 if none, or one for another profile)."""
        key = (profile.fingerprint, profile.measured_at)
        if self._key == key:
            return self.value
        self._key, self._targets = key, []
        try:
            got = json.loads(self.path.read_text())
            if (got["fingerprint"], got["measured_at"]) == key:
                self._targets = [clamp_correction(float(t)) for t in got["targets"]][-KEEP:]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: start from 1
        return self.value

    def add(self, profile: NodeProfile, target: float) -> float:
        """Record one measurement's target; the correction to use from now on."""
        self.load(profile)
        self._targets = [*self._targets, clamp_correction(target)][-KEEP:]
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": profile.fingerprint, "measured_at": profile.measured_at,
                                       "targets": self._targets}))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not keep the decode correction in %s: %s", self.path, e)
        return self.value
