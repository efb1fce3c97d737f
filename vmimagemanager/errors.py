"""Exceptions shared by every layer.

Each error carries one line that tells an admin or user what went wrong and what to do, because
these messages end up in SGE job error files, syslog and CLI output where nobody reads tracebacks.
"""


class VmimError(Exception):
    """Base class: str(error) is the one-line message shown to the admin or user."""


class ConfigError(VmimError):
    """The configuration file is missing, unreadable or invalid."""


class NoFreeSlot(VmimError):
    """Every slot on this node is leased; the job should be retried later."""


class ImageError(VmimError):
    """An image is missing, invalid, or in use."""


class LeaseError(VmimError):
    """A lease is missing or in a state that does not allow the operation."""


class BootError(VmimError):
    """A VM did not come up (domain start failed or ssh never answered)."""


class GuestError(VmimError):
    """Running something inside the guest failed (not the payload's own exit status)."""
