"""The host port a user-network VM's ssh forward listens on: chosen at each boot, never fixed.

A guest on QEMU user networking is reached through `hostfwd=tcp:127.0.0.1:PORT-:22`. Any local
account may bind 127.0.0.1:PORT, so a port fixed in the configuration could be taken by another
user before QEMU starts: QEMU then refuses to start ("Could not set up host forwarding rule"),
every boot in that slot fails the same way and its jobs end up held. So the port is chosen when
the VM boots, among those free at that moment (the slot's configured `ssh_port` first, then the
node's `ssh_ports` range in random order), and a start that fails because someone bound the port
in between is retried on another port; it is never counted as a failed boot. When no port can be
had (somebody holds the whole range), the job is put back in the queue (NoFreePort is a
RetryLater), never held. A squatter can therefore no longer hold a slot hostage.

The chosen port lives in the running domain's lease metadata (`ssh_port`, domain_xml.py) and is
read from libvirt whenever something logs in (Node.ssh_address): the hypervisor's state is
read from libvirt, never from a cache, and a VM's forward cannot change while it runs. The job's
context carries it to the starter. A squatter who binds a port after its VM is gone and answers
the next login there gets nowhere either: every login pins the host key the guest printed on its
serial console at boot, so a server that is not the job's VM is refused (HostKeyMismatch).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

from .errors import NoFreePort

PROBES = 64  # free-port probes per choice (a probe is one bind on loopback: microseconds)
# QEMU starts per boot whose forward lost the race for its port before the job is put back in
# the queue: a squatter must win the race every time, against a port it cannot predict.
START_ATTEMPTS = 5


def candidates(first: int | None, ports: tuple[int, int]) -> Iterator[int]:
    """The slot's configured port (if any), then up to PROBES ports of the node's range, in an
    order nobody can predict (so nobody can bind the next one ahead of us)."""
    if first:
        yield first
    low, high = ports
    yield from random.SystemRandom().sample(range(low, high + 1), min(PROBES, high - low + 1))


def is_free(listen: str, port: int) -> bool:
    """Could QEMU's forward bind `listen:port` now? The probe binds and listens the way QEMU's
    slirp does (SO_REUSEADDR), so it fails exactly where QEMU would: a socket listening there
    (on that address or the wildcard), or one bound there without SO_REUSEADDR."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listen, port))
            probe.listen(1)
        except OSError:
            return False
    return True


def choose(listen: str, first: int | None, ports: tuple[int, int],
           exclude: frozenset[int] = frozenset()) -> int:
    """A port free on `listen` right now (not one of `exclude`: those lost a race already)."""
    tried = list(candidates(first, ports))
    for port in tried:
        if port not in exclude and is_free(listen, port):
            return port
    raise NoFreePort(f"no free port for a VM's ssh forward on {listen} ({len(tried)} tried, of "
                     f"the slot's ssh_port and ssh_ports {ports[0]}-{ports[1]}): other "
                     "processes hold them; the job is retried later")


def lost_race(error: str, listen: str, port: int) -> bool:
    """Did a VM's start fail because its forward could not bind `port`? QEMU says so ("Could
    not set up host forwarding rule"); a port that is busy now says so too."""
    return "could not set up host forwarding rule" in error.lower() or not is_free(listen, port)
