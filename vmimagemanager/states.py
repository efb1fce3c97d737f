"""The lease life cycle as an explicit state machine.

    free -> preparing -> booting -> running -> tearing-down -> free
               |            |          |            ^
               |            |          +--> failed -+   (every state but free may fail or be
               |            v                  ^         torn down)
               |          spare -> binding ----+
               |                       |
               |                       +--> running

A warm spare (vmimagemanager agent) is booted ahead of any job: booting -> spare, and a prolog
later binds it to its job (spare -> binding -> running) instead of booting one.

"free" is not stored: a free slot is a slot without a lease row. Every transition is checked
here and logged by the lease store with the job and slot, so an admin can follow one job's VM
through syslog, and `reconcile` can tell a crashed step (preparing/booting whose process is
gone) from a healthy one.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import LeaseError


class LeaseState(StrEnum):
    FREE = "free"
    PREPARING = "preparing"  # slot taken; overlay, keys and seed being made
    BOOTING = "booting"  # domain started; waiting for ssh
    RUNNING = "running"  # ssh answered; the job may use the VM
    SPARE = "spare"  # booted ahead of any job, holds only the admin key; waits for a job
    BINDING = "binding"  # a job claimed the spare; its key and home are being put in
    TEARING_DOWN = "tearing-down"  # domain being destroyed, files removed
    FAILED = "failed"  # a step failed; cleanup still owed

    def __str__(self) -> str:
        return self.value


ALLOWED: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.FREE: frozenset({LeaseState.PREPARING}),
    LeaseState.PREPARING: frozenset({LeaseState.BOOTING, LeaseState.FAILED,
                                     LeaseState.TEARING_DOWN}),
    LeaseState.BOOTING: frozenset({LeaseState.RUNNING, LeaseState.SPARE, LeaseState.FAILED,
                                   LeaseState.TEARING_DOWN}),
    LeaseState.SPARE: frozenset({LeaseState.BINDING, LeaseState.FAILED,
                                 LeaseState.TEARING_DOWN}),
    LeaseState.BINDING: frozenset({LeaseState.RUNNING, LeaseState.FAILED,
                                   LeaseState.TEARING_DOWN}),
    LeaseState.RUNNING: frozenset({LeaseState.TEARING_DOWN, LeaseState.FAILED}),
    LeaseState.FAILED: frozenset({LeaseState.TEARING_DOWN}),
    LeaseState.TEARING_DOWN: frozenset({LeaseState.FREE, LeaseState.TEARING_DOWN}),
}


# A lease rebuilt from a running domain (node/rebuild.py) comes into being in the state the
# domain shows: a job's VM or an idle spare; nothing else can be told from libvirt.
ADOPTABLE = frozenset({LeaseState.RUNNING, LeaseState.SPARE})


def check_transition(current: LeaseState, target: LeaseState, what: str) -> None:
    if target not in ALLOWED[current]:
        raise LeaseError(f"{what}: cannot go from {current} to {target}")


def check_adoption(target: LeaseState, what: str) -> None:
    if target not in ADOPTABLE:
        raise LeaseError(f"{what}: a lease rebuilt from a running domain cannot be {target}")
