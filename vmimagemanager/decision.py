"""The admission's answer for a job (flow.start_job): go on, retry later, or hold for an admin.

Its own module so that an adapter maps outcomes to its batch system's conventions by a table
(batch/sge.py PROLOG_OUTCOMES, batch/slurm.py PROLOG_ACTIONS) without loading the admission
and its life cycle: the epilog and the starter never decide anything.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    READY = "ready"  # VM up (or a native/reject context written): run the job
    RETRY = "retry"  # passing trouble on this node: put the job back in the queue
    HOLD = "hold"  # needs an admin: keep the job, with the reason, until released


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str = ""  # one line for the job's error file; empty when READY
    facts: dict = field(default_factory=dict, compare=False)  # for the audit trail

    @classmethod
    def retry(cls, reason: str) -> Decision:
        return cls(Outcome.RETRY, reason)

    @classmethod
    def hold(cls, reason: str) -> Decision:
        return cls(Outcome.HOLD, reason)
