"""Exceptions shared by every layer.

Each error carries one line that tells an admin or user what went wrong and what to do, because
these messages end up in SGE job error files, syslog and CLI output where nobody reads tracebacks.

Two families decide what happens to a job whose VM cannot start (vmimagemanager.flow):
RetryLater errors are the node's passing trouble (the job goes back to the queue, here or on
another node); the others need an admin (the job is held with the reason).
"""


class VmimError(Exception):
    """Base class: str(error) is the one-line message shown to the admin or user."""


class RetryLater(VmimError):
    """Transient trouble on this node: put the job back in the queue, it will run later."""


class ConfigError(VmimError):
    """The configuration file is missing, unreadable or invalid."""


class NoFreeSlot(RetryLater):
    """Every slot on this node is leased; the job should be retried later."""


class HypervisorUnavailable(RetryLater):
    """libvirtd does not answer; jobs wait until it is back."""


class LeaseDbBusy(RetryLater):
    """Another process held the leases database's write lock for longer than we wait."""


class NoSpace(RetryLater):
    """A directory we write per-job files to is full."""


class NoFreePort(RetryLater):
    """No loopback port could be had for a user-network VM's ssh forward (ports.py): other
    processes hold them, or won every race for one."""


class JobTooBig(VmimError):
    """A job asks for more cores or memory than this node ever gives its VMs: it would wait
    for ever, so it is held with the reason."""


class LeaseDbBroken(VmimError):
    """The leases database cannot be read (corrupt, wrong file, unreadable)."""


class ImageError(VmimError):
    """An image is missing, invalid, changed since import, or in use."""


class LeaseError(VmimError):
    """A lease is missing or in a state that does not allow the operation."""


class BootError(VmimError):
    """A VM did not come up (domain start failed or ssh never answered)."""


class GuestError(VmimError):
    """Running something inside the guest failed (not the payload's own exit status)."""


class TeardownIncomplete(VmimError):
    """A VM's teardown could not finish; its lease stays for the next reconcile to finish."""
