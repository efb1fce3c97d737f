"""The hypervisor behind a narrow interface, and its libvirt implementation.

libvirt is the source of truth for what runs: nothing here caches domain state. Domains are
transient (createXML): once destroyed they leave no definition behind, so a crashed node never
accumulates stale domains.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import time
from xml.etree import ElementTree

from .config import DOMAIN_PREFIX
from .domain_meta import VMIM_NS
from .errors import BootError, HypervisorUnavailable

log = logging.getLogger("vmimagemanager.hypervisor")


class Hypervisor(abc.ABC):
    """What the life cycle needs from a hypervisor; every call reads live state."""

    @abc.abstractmethod
    def connect(self) -> None:
        """Make sure the hypervisor answers (HypervisorUnavailable if not)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of the connection (a thread's own, say); the next call connects again."""

    @abc.abstractmethod
    def start(self, domain_xml: str) -> None: ...

    @abc.abstractmethod
    def destroy(self, name: str) -> bool:
        """Stop a domain at once; False if it was not running (not an error)."""

    @abc.abstractmethod
    def shutdown(self, name: str, timeout: float) -> bool:
        """Ask the guest to power off; destroy it after `timeout`. True if it shut down itself."""

    @abc.abstractmethod
    def is_running(self, name: str) -> bool: ...

    @abc.abstractmethod
    def domain_names(self) -> list[str]:
        """Names of running vmimagemanager domains (prefix vmim-)."""

    @abc.abstractmethod
    def usage(self, name: str) -> dict[str, float] | None:
        """CPU seconds and peak memory of a running domain; None if it is not running."""

    @abc.abstractmethod
    def domain_xml(self, name: str) -> str | None:
        """The running domain's XML, None if it is not running."""

    @abc.abstractmethod
    def set_lease_metadata(self, name: str, element: str) -> None:
        """Replace the running domain's vmimagemanager lease element (a warm spare's binding)."""

    @abc.abstractmethod
    def process_id(self, name: str) -> int:
        """The pid of the process that runs the domain (QEMU), to enter its mount namespace."""

    @abc.abstractmethod
    def cpu_weight(self, name: str) -> int | None:
        """The running domain's CPU weight against the node's other domains (libvirt's
        cpu_shares: relative, the host's default unless set); None where the host gives libvirt
        no CPU controller."""

    @abc.abstractmethod
    def set_cpu_weight(self, name: str, weight: int) -> None:
        """Change the running domain's CPU weight (a warm spare's, see spares.py)."""

    @abc.abstractmethod
    def qemu_ids(self, domain_type: str) -> tuple[int, int] | None:
        """The uid and gid QEMU runs as for `domain_type` (None: the hypervisor does not say)."""

    @abc.abstractmethod
    def attach_device(self, name: str, device_xml: str) -> None:
        """Hot-plug a device into the running domain (a spare's owner home, at bind)."""

    @abc.abstractmethod
    def save(self, name: str, path: str) -> str:
        """Save the running domain's memory and device state to `path` (the domain is gone
        afterwards); returns its XML as the hypervisor gave it just before, the one a restore
        must describe (secure and migratable)."""

    @abc.abstractmethod
    def restore(self, path: str) -> None:
        """Start, running, the domain a saved state's file describes (savefile.write_head)."""


class LibvirtHypervisor(Hypervisor):
    """Connects on first use: an epilog with no VM to end never waits for libvirtd."""

    def __init__(self, uri: str):
        self.uri = uri
        self._libvirt = None
        self._connection = None

    @property
    def _conn(self):
        if self._connection is None:
            import libvirt  # lazy: only a process that talks to libvirtd loads it (not a
            # prolog for a job without a VM, not the CLI's reports)

            self._libvirt = libvirt
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
            try:
                self._connection = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(
                    f"libvirtd is not answering at {self.uri} "
                    f"({exc.get_error_message()}); start it (harness/libvirt-up.sh, or "
                    "'systemctl start libvirtd')") from None
        return self._connection

    def _unavailable(self, exc) -> HypervisorUnavailable | None:
        """The connection to libvirtd broke (daemon stopped or restarted) rather than the call
        failing on its own: reported as such, never as 'no such domain'."""
        lv = self._libvirt
        if exc.get_error_code() in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC,
                                    lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_INVALID_CONN):
            self._connection = None  # the next call connects again
            return HypervisorUnavailable(f"libvirtd stopped answering at {self.uri} "
                                         f"({exc.get_error_message()})")
        return None

    def connect(self) -> None:
        self._conn  # noqa: B018 - connects, or raises HypervisorUnavailable

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _lookup(self, name: str):
        conn = self._conn
        try:
            return conn.lookupByName(name)
        except self._libvirt.libvirtError as exc:
            if exc.get_error_code() == self._libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._unavailable(exc) or exc from None

    def start(self, domain_xml: str) -> None:
        conn = self._conn
        try:
            conn.createXML(domain_xml, 0)
        except self._libvirt.libvirtError as exc:
            raise self._unavailable(exc) or BootError(f"libvirt refused to start the domain: "
                            f"{exc.get_error_message()}") from None

    def destroy(self, name: str) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            dom.destroy()
        except self._libvirt.libvirtError as exc:
            if exc.get_error_code() in (self._libvirt.VIR_ERR_NO_DOMAIN,
                                        self._libvirt.VIR_ERR_OPERATION_INVALID):
                return False
            raise self._unavailable(exc) or exc from None
        log.info("domain %s destroyed", name)
        return True

    def shutdown(self, name: str, timeout: float) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        with contextlib.suppress(self._libvirt.libvirtError):
            dom.shutdown()  # a guest without ACPI support is destroyed after the timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running(name):
                return True
            time.sleep(0.5)
        log.warning("domain %s did not shut down within %.0f s; destroying it", name, timeout)
        self.destroy(name)
        return False

    def is_running(self, name: str) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            return bool(dom.isActive())
        except self._libvirt.libvirtError as exc:
            if exc.get_error_code() == self._libvirt.VIR_ERR_NO_DOMAIN:
                return False  # it went away between the lookup and the question
            raise self._unavailable(exc) or exc from None

    def domain_names(self) -> list[str]:
        conn = self._conn
        try:
            domains = conn.listAllDomains(self._libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            return sorted(d.name() for d in domains if d.name().startswith(DOMAIN_PREFIX))
        except self._libvirt.libvirtError as exc:
            raise self._unavailable(exc) or exc from None

    def usage(self, name: str) -> dict[str, float] | None:
        """CPU seconds of the whole QEMU process (vCPUs and emulator threads) and its peak
        resident memory, read just before the domain is destroyed."""
        dom = self._lookup(name)
        if dom is None:
            return None
        try:
            cpu = dom.getCPUStats(True)[0]
            memory = dom.memoryStats()
        except self._libvirt.libvirtError as exc:
            if exc.get_error_code() in (self._libvirt.VIR_ERR_NO_DOMAIN,
                                        self._libvirt.VIR_ERR_OPERATION_INVALID):
                return None
            raise self._unavailable(exc) or exc from None
        usage = {"cpu_seconds": cpu["cpu_time"] / 1e9,
                 "user_seconds": cpu.get("user_time", 0) / 1e9,
                 "system_seconds": cpu.get("system_time", 0) / 1e9,
                 "rss_kib": float(memory.get("rss", 0))}
        try:  # the QEMU process's peak
            with open(f"/proc/{self.process_id(name)}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        usage["peak_rss_kib"] = float(line.split()[1])
        except (OSError, ValueError, BootError):
            pass
        return usage

    def _running(self, name: str):
        """The domain, which must be running (BootError if it is not)."""
        dom = self._lookup(name)
        if dom is None:
            raise BootError(f"domain {name} is not running")
        return dom

    def set_lease_metadata(self, name: str, element: str) -> None:
        dom = self._running(name)
        lv = self._libvirt
        try:
            dom.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, element, "vmim", VMIM_NS,
                            lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as exc:
            raise self._unavailable(exc) or BootError(
                f"libvirt refused to update domain {name}: {exc.get_error_message()}") from None

    def qemu_ids(self, domain_type: str) -> tuple[int, int] | None:
        """From libvirt's capabilities: the DAC security model's base label, `+UID:+GID`."""
        try:
            caps = ElementTree.fromstring(self._conn.getCapabilities())
        except self._libvirt.libvirtError as exc:
            raise self._unavailable(exc) or exc from None
        for model in caps.iterfind("host/secmodel"):
            if model.findtext("model") != "dac":
                continue
            for label in model.iterfind("baselabel"):
                if label.get("type") == domain_type and label.text:
                    found = re.fullmatch(r"\+?(\d+):\+?(\d+)", label.text.strip())
                    if found:
                        return int(found.group(1)), int(found.group(2))
        return None

    def attach_device(self, name: str, device_xml: str) -> None:
        dom = self._running(name)
        lv = self._libvirt
        try:
            dom.attachDeviceFlags(device_xml, lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as exc:
            raise self._unavailable(exc) or BootError(
                f"libvirt refused a device for {name}: {exc.get_error_message()}") from None

    def process_id(self, name: str) -> int:
        """qemu:///system keeps each running domain's QEMU pid in /run/libvirt/qemu/NAME.pid."""
        try:
            with open(f"/run/libvirt/qemu/{name}.pid", encoding="ascii") as fh:
                return int(fh.read().strip())
        except (OSError, ValueError) as exc:
            raise BootError(f"no QEMU pid for domain {name} ({exc})") from None

    def domain_xml(self, name: str) -> str | None:
        """The running domain's XML; None if it is not running (any more)."""
        dom = self._lookup(name)
        if dom is None:
            return None
        try:
            return dom.XMLDesc(0)
        except self._libvirt.libvirtError as exc:
            if exc.get_error_code() == self._libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._unavailable(exc) or exc from None

    def cpu_weight(self, name: str) -> int | None:
        dom = self._running(name)
        lv = self._libvirt
        try:
            weight = dom.schedulerParameters().get("cpu_shares")
        except lv.libvirtError as exc:
            if exc.get_error_code() in (lv.VIR_ERR_OPERATION_INVALID, lv.VIR_ERR_NO_SUPPORT,
                                        lv.VIR_ERR_OPERATION_UNSUPPORTED):
                return None  # no CPU controller for libvirt on this host
            raise self._unavailable(exc) or BootError(
                f"libvirt cannot read the CPU weight of {name}: {exc.get_error_message()}"
            ) from None
        return None if weight is None else int(weight)

    def set_cpu_weight(self, name: str, weight: int) -> None:
        dom = self._running(name)
        lv = self._libvirt
        try:
            dom.setSchedulerParametersFlags({"cpu_shares": weight}, lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as exc:
            raise self._unavailable(exc) or BootError(
                f"libvirt refused to set the CPU weight of {name}: {exc.get_error_message()}"
            ) from None

    def save(self, name: str, path: str) -> str:
        dom = self._running(name)
        lv = self._libvirt
        try:
            xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE | lv.VIR_DOMAIN_XML_MIGRATABLE)
            dom.save(path)
        except lv.libvirtError as exc:
            raise self._unavailable(exc) or BootError(
                f"libvirt could not save {name}: {exc.get_error_message()}") from None
        return xml

    def restore(self, path: str) -> None:
        conn = self._conn
        lv = self._libvirt
        try:
            conn.restoreFlags(path, None, lv.VIR_DOMAIN_SAVE_RUNNING)
        except lv.libvirtError as exc:
            raise self._unavailable(exc) or BootError(
                f"libvirt refused to restore the saved state: {exc.get_error_message()}"
            ) from None
