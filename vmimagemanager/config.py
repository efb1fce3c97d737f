"""Configuration: one YAML file turned into validated, frozen dataclasses.

Validation happens once, on load, so that every later layer can trust the values. Every problem
is reported as one line naming the file, the key and what was expected: the admin fixes the file
without reading code.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .accel import VM_OVERHEAD_MIB, resolve_domain_type
from .errors import ConfigError
from .shape import MIN_VM_MEMORY_MIB, Budget, Shape

DEFAULT_CONFIG_PATH = "/etc/vmimagemanager/vmimagemanager.yaml"

# Slot and image names become parts of file names and libvirt domain names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
UNIX_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?\Z")


DOMAIN_PREFIX = "vmim-"
DEFAULT_SSH_PORTS = (20000, 29999)


def domain_name(slot_name: str) -> str:
    """libvirt domain name of a slot: carries the slot name so `virsh list` makes sense."""
    return f"{DOMAIN_PREFIX}{slot_name}"


def valid_name(name: str) -> bool:
    """True for a slot or image name that is safe as a file-name component (no '/', no '..')."""
    return bool(NAME_RE.match(name)) and ".." not in name


@dataclass(frozen=True)
class UserNetwork:
    """QEMU user-mode networking with one ssh port forwarded on a loopback address (tests, demo).

    The forward's port is chosen at each boot among those free then (ports.py: any local
    account can bind a loopback port, so a fixed one could be squatted and the slot held
    hostage); `ssh_port`, if configured, is only the first port tried.
    """

    ssh_port: int | None = None
    listen: str = "127.0.0.1"
    kind: str = "user"


@dataclass(frozen=True)
class BridgeNetwork:
    """A site bridge: the guest has a fixed MAC and a host name that resolves to its address."""

    bridge: str
    mac: str
    hostname: str
    ssh_port: int = 22
    kind: str = "bridge"
    # the guest's own address: libvirt's clean-traffic filter lets it send from this one only
    # (else the first one it gets by DHCP)
    ip: str | None = None


@dataclass(frozen=True)
class Slot:
    """A place for one VM on this node: its name and network (port, MAC, host name). Its size
    is the job's (shape.py); `vcpus` and `memory_mib` are the legacy fixed size, which only
    sizes the node's budget of a configuration without `node:`."""

    name: str
    vcpus: int
    memory_mib: int
    network: UserNetwork | BridgeNetwork

    @property
    def domain_name(self) -> str:
        return domain_name(self.name)

    @property
    def guest_hostname(self) -> str:
        if isinstance(self.network, BridgeNetwork):
            return self.network.hostname
        return self.name.replace("_", "-").replace(".", "-")


@dataclass(frozen=True)
class SharedPath:
    """A host directory the guest must see at the same path (home, work: the site's Lustre/NFS)."""

    path: str
    mode: str  # "hypervisor": libvirt <filesystem> 9p share; "guest": the image mounts it itself
    accessmode: str = "passthrough"  # 9p: the host checks each access as the guest's uid
    scope: str = "tree"  # "owner": only the job owner's home directory below `path`
    readonly: bool = False


@dataclass(frozen=True)
class VoRule:
    """How a job is recognised as belonging to a VO, and which image that VO's jobs boot."""

    name: str
    image: str
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    memory_per_core_mib: int | None = None  # a job of the VO that asks for no memory


@dataclass(frozen=True)
class SparePolicy:
    """Warm spares the agent keeps booted on this node (docs/warm-spares.md): how many idle
    ones of each image and shape; a job binds only a spare of exactly its shape."""

    counts: tuple[tuple[str, Shape, int], ...] = ()  # (image, shape, how many idle spares)
    max_age: float = 86400.0  # seconds; an older idle spare is replaced by a fresh one
    interval: float = 5.0  # seconds between two agent rounds

    def count(self, image: str, shape: Shape) -> int:
        return sum(n for name, s, n in self.counts if name == image and s == shape)


@dataclass(frozen=True)
class HealthPolicy:
    """What the node's health checks demand, and when a node that took itself out of
    scheduling puts itself back (docs/troubleshooting.md, "Is the node healthy?")."""

    min_free_mib: int = 1024  # in overlay_dir and in state_dir
    back_after: float = 60.0  # seconds every node check must have passed before it is back
    # seconds a running VM's batch job must have been unknown (in two answers at least)
    # before the agent tears the VM down
    gone_after: float = 60.0


@dataclass(frozen=True)
class Config:
    path: str
    libvirt_uri: str
    domain_type: str
    image_dir: Path
    overlay_dir: Path
    state_dir: Path
    run_dir: Path
    boot_timeout: float
    shutdown_timeout: float
    max_boot_attempts: int
    slots: tuple[Slot, ...]
    vos: tuple[VoRule, ...]
    unmatched: str
    budget: Budget = Budget(cores=1, memory_mib=512, vm_overhead_mib=0)
    # a job that asks for no memory gets this much per core (a VO's own value first)
    memory_per_core_mib: int = 512
    shared_paths: tuple[SharedPath, ...] = ()
    site_root_key: Path | None = None
    scratch_dir: str = "/tmp"
    # The Grid CA directory (hashed names, as the IGTF bundle installs it) a job's proxy must
    # verify against for its identity to be recorded as verified (audit.proxy_identity).
    grid_ca_dir: Path = Path("/etc/grid-security/certificates")
    # A job whose VM failed to start max_boot_attempts times: "hold" (waits for an admin) or
    # "fail" (ends with exit 1 and the reason in its error file: what a Grid user behind a CE
    # sees and can act on; a held job looks pending to them for ever).
    on_boot_failure: str = "hold"
    spares: SparePolicy = SparePolicy()
    # Start a VM without an idle spare from a memory snapshot of its image and shape, and
    # restore spares from one too (docs/snapshots.md); the agent makes them.
    snapshot_starts: bool = False
    metrics_dir: Path | None = None  # node_exporter's textfile directory (metrics.py)
    # Loopback ports a user-network VM's ssh forward may get at boot (ports.py); below Linux's
    # ephemeral range (32768-60999), so outgoing connections do not take them.
    ssh_ports: tuple[int, int] = DEFAULT_SSH_PORTS
    health: HealthPolicy = HealthPolicy()

    def slot(self, name: str) -> Slot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        known = ", ".join(s.name for s in self.slots) or "none"
        raise ConfigError(f"{self.path}: no slot named {name!r} (configured slots: {known})")

    @property
    def leases_db(self) -> Path:
        return self.state_dir / "leases.sqlite"

    def default_memory(self, vo: str, cores: int) -> int:
        """The memory of a job of `vo` that asked for none: its cores times the VO's (else the
        node's) memory per core."""
        rule = next((r for r in self.vos if r.name == vo), None)
        per_core = (rule.memory_per_core_mib if rule is not None else None) or \
            self.memory_per_core_mib
        return cores * per_core

    def job_shape(self, vo: str, cores: int, memory_mib: int | None) -> Shape:
        """The VM of a job of `vo` granted `cores` and `memory_mib` (None: it asked for no
        memory), never below a bootable minimum."""
        memory = memory_mib if memory_mib is not None else self.default_memory(vo, cores)
        return Shape(cores=max(1, cores), memory_mib=max(MIN_VM_MEMORY_MIB, memory))


TOP_KEYS = {
    "libvirt_uri", "domain_type", "image_dir", "overlay_dir", "state_dir", "run_dir",
    "grid_ca_dir",
    "boot_timeout", "shutdown_timeout", "max_boot_attempts", "slot_defaults", "slots", "vos",
    "unmatched", "shared_paths", "site_root_key", "scratch_dir", "yaim_groups_conf", "spares",
    "snapshot_starts",
    "on_boot_failure", "metrics_dir", "ssh_ports", "node", "job_defaults", "health",
}
DEFAULT_HOST_RESERVE_MIB = 2048


class _Checker:
    """Small helpers that turn a wrong value into a ConfigError naming file and key."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, expected: str, got: Any = None) -> ConfigError:
        suffix = "" if got is None else f", got {got!r}"
        return ConfigError(f"{self.path}: {key}: expected {expected}{suffix}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping", value)
        for k in value:
            if k not in allowed:
                raise ConfigError(f"{self.path}: {key}.{k}: unknown key "
                                  f"(allowed: {', '.join(sorted(allowed))})")
        return value

    def typed(self, value: Any, key: str, kind: type, what: str,
              check: Callable[[Any], bool] | None = None) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(key, what, value)
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (check is not None and not check(value)):
            raise self.fail(key, what, value)
        return value

    def string_list(self, value: Any, key: str, check: Callable[[str], bool] | None = None,
                    what: str = "a list of strings") -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(key, what, value)
        return tuple(self.typed(v, f"{key}[{i}]", str, what, check) for i, v in enumerate(value))

    def directory(self, value: Any, key: str) -> Path:
        text = self.typed(value, key, str, "an absolute directory path", os.path.isabs)
        return Path(text)


def _parse_network(c: _Checker, raw: Any, key: str) -> UserNetwork | BridgeNetwork:
    if not isinstance(raw, dict) or "type" not in raw:
        raise c.fail(key, "a mapping with type: user or type: bridge", raw)
    kind = raw["type"]
    port_ok = lambda p: 1 <= p <= 65535  # noqa: E731
    if kind == "user":
        c.mapping(raw, key, {"type", "ssh_port", "listen"})
        port = raw.get("ssh_port")  # optional: only the first port tried (ports.py)
        if port is not None:
            port = c.typed(port, f"{key}.ssh_port", int, "a TCP port 1-65535", port_ok)
        listen = c.typed(raw.get("listen", "127.0.0.1"), f"{key}.listen", str,
                         "a loopback IPv4 address (127.0.0.0/8)", _is_loopback)
        return UserNetwork(ssh_port=port, listen=listen)
    if kind == "bridge":
        c.mapping(raw, key, {"type", "bridge", "mac", "hostname", "ssh_port", "ip"})
        bridge = c.typed(raw.get("bridge"), f"{key}.bridge", str, "a bridge device name",
                         lambda b: bool(re.match(r"^[A-Za-z0-9_.-]{1,15}$", b)))
        mac = c.typed(raw.get("mac"), f"{key}.mac", str, "a MAC like 52:54:00:12:34:56",
                      lambda m: bool(MAC_RE.match(m.lower())))
        host = c.typed(raw.get("hostname"), f"{key}.hostname", str, "a DNS host name",
                       lambda h: bool(HOSTNAME_RE.match(h)))
        port = c.typed(raw.get("ssh_port", 22), f"{key}.ssh_port", int, "a TCP port", port_ok)
        ip = raw.get("ip")
        if ip is not None:
            ip = c.typed(ip, f"{key}.ip", str, "the guest's IPv4 or IPv6 address", _is_address)
        return BridgeNetwork(bridge=bridge, mac=mac.lower(), hostname=host, ssh_port=port,
                             ip=ip)
    raise c.fail(f"{key}.type", "user or bridge", kind)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def _parse_slots(c: _Checker, raw: Any, defaults: dict[str, Any],
                 sized_by_node: bool = False) -> tuple[Slot, ...]:
    if not isinstance(raw, list) or not raw:
        raise c.fail("slots", "a non-empty list of slots", raw)
    slots: list[Slot] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(raw):
        key = f"slots[{i}]"
        if sized_by_node and isinstance(item, dict) and ({"vcpus", "memory_mib"} & set(item)):
            raise ConfigError(f"{c.path}: {key}: with node: a slot is a place for a VM, sized "
                              "by its job; remove its vcpus and memory_mib")
        c.mapping(item, key, {"name", "vcpus", "memory_mib", "network"})
        name = c.typed(item.get("name"), f"{key}.name", str,
                       "a name of letters, digits, '_', '.', '-'", valid_name)
        vcpus = c.typed(item.get("vcpus", defaults.get("vcpus", 1)), f"{key}.vcpus", int,
                        "a positive integer", lambda v: v > 0)
        memory = c.typed(item.get("memory_mib", defaults.get("memory_mib", 512)),
                         f"{key}.memory_mib", int, "an integer >= 64", lambda v: v >= 64)
        network = _parse_network(c, item.get("network"), f"{key}.network")
        for what, value in (("name", name), ("ssh port", _port_key(network)),
                            ("mac", getattr(network, "mac", None))):
            if value is None:
                continue
            tag = f"{what}:{value}"
            if tag in seen:
                raise ConfigError(f"{c.path}: {key}: duplicate slot {what} {value!r} "
                                  f"(also used by {seen[tag]}); each slot needs its own")
            seen[tag] = key
        slots.append(Slot(name=name, vcpus=vcpus, memory_mib=memory, network=network))
    return tuple(slots)


def _port_key(network: UserNetwork | BridgeNetwork) -> str | None:
    if isinstance(network, UserNetwork) and network.ssh_port is not None:
        return f"{network.listen}:{network.ssh_port}"
    return None


def _parse_port_range(c: _Checker, raw: Any) -> tuple[int, int]:
    """`ssh_ports: LOW-HIGH`: unprivileged ports (QEMU may run as an unprivileged user)."""
    if raw is None:
        return DEFAULT_SSH_PORTS
    what = "a port range LOW-HIGH within 1024-65535, such as 20000-29999"
    text = c.typed(raw, "ssh_ports", str, what)
    match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
    if match is None:
        raise c.fail("ssh_ports", what, raw)
    low, high = int(match.group(1)), int(match.group(2))
    if not 1024 <= low <= high <= 65535:
        raise c.fail("ssh_ports", what, raw)
    return low, high


def read_yaim_groups_conf(path: str) -> dict[str, list[str]]:
    """VO -> unix groups from a YAIM groups.conf ("FQAN:group:gid:flag:[VO]" lines).

    The VO is the last field when given, else the first component of the FQAN
    ("/atlas/ROLE=lcgadmin" or "/VO=atlas/GROUP=/atlas/..." both give atlas). The site keeps
    one source of truth for which pool-account groups belong to which VO.
    """
    result: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split(":")
            if len(fields) < 2 or not fields[1]:
                raise ConfigError(f"{path}:{number}: expected FQAN:group:gid:flag:[VO], "
                                  f"got {line!r}")
            fqan, group = fields[0].strip('"'), fields[1]
            vo = fields[4] if len(fields) > 4 and fields[4] else ""
            if not vo:
                first = fqan.strip("/").split("/")[0]
                vo = first.removeprefix("VO=")
            if vo and group not in result.setdefault(vo, []):
                result[vo].append(group)
    return result


def _parse_vos(c: _Checker, raw: Any, yaim_groups: dict[str, list[str]] | None = None
               ) -> tuple[VoRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise c.fail("vos", "a mapping of VO name to {image, groups, users, queues}", raw)
    rules = []
    for vo, item in raw.items():
        key = f"vos.{vo}"
        if not isinstance(vo, str) or not valid_name(vo):
            raise c.fail("vos", "VO names made of letters, digits, '_', '.', '-'", vo)
        c.mapping(item, key, {"image", "groups", "users", "queues", "memory_per_core_mib"})
        image = c.typed(item.get("image"), f"{key}.image", str, "an image name", valid_name)
        per_core = item.get("memory_per_core_mib")
        if per_core is not None:
            per_core = c.typed(per_core, f"{key}.memory_per_core_mib", int, "MiB >= 64",
                               lambda v: v >= 64)
        rule = VoRule(
            memory_per_core_mib=per_core,
            name=vo, image=image,
            groups=c.string_list(item.get("groups"), f"{key}.groups")
            + tuple(g for g in (yaim_groups or {}).get(vo, [])
                    if g not in (item.get("groups") or [])),
            users=c.string_list(item.get("users"), f"{key}.users"),
            queues=c.string_list(item.get("queues"), f"{key}.queues"),
        )
        if not (rule.groups or rule.users or rule.queues):
            raise c.fail(key, "at least one of groups, users, queues to recognise the VO's jobs")
        rules.append(rule)
    return tuple(rules)


def _parse_shared(c: _Checker, raw: Any) -> tuple[SharedPath, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise c.fail("shared_paths", "a list of {path, mode}", raw)
    result = []
    for i, item in enumerate(raw):
        key = f"shared_paths[{i}]"
        c.mapping(item, key, {"path", "mode", "accessmode", "scope", "readonly"})
        path = c.typed(item.get("path"), f"{key}.path", str, "an absolute path",
                       lambda p: os.path.isabs(p) and ".." not in p.split("/") and p != "/")
        mode = c.typed(item.get("mode", "guest"), f"{key}.mode", str, "hypervisor or guest",
                       lambda m: m in ("hypervisor", "guest"))
        access = c.typed(item.get("accessmode", "passthrough"), f"{key}.accessmode", str,
                         "passthrough, mapped or squash",
                         lambda a: a in ("passthrough", "mapped", "squash"))
        # Safe default: a hypervisor share exports only the job owner's own home directory.
        scope = c.typed(item.get("scope", "owner" if mode == "hypervisor" else "tree"),
                        f"{key}.scope", str, "owner or tree", lambda v: v in ("owner", "tree"))
        readonly = c.typed(item.get("readonly", False), f"{key}.readonly", bool, "true or false")
        if mode == "hypervisor" and not os.path.isdir(path):
            raise c.fail(f"{key}.path", "an existing directory on this host", path)
        if mode == "hypervisor" and scope == "tree" and not readonly:
            raise ConfigError(f"{c.path}: {key}: a hypervisor share of a whole tree must be "
                              "'readonly: true' (QEMU runs unprivileged and would write as its "
                              "own user); give each job its owner's home with 'scope: owner', "
                              "or let the image mount it ('mode: guest')")
        result.append(SharedPath(path=path.rstrip("/"), mode=mode, accessmode=access,
                                 scope=scope, readonly=readonly))
    return tuple(result)


def _parse_spare_shapes(c: _Checker, key: str, raw: Any, default: Shape
                        ) -> list[tuple[Shape, int]]:
    """`N` (N spares of the default shape) or a list of {cores, memory_mib, count}."""
    if not isinstance(raw, list):
        return [(default, c.typed(raw, key, int, "a number of spares >= 0, or a list of "
                                  "{cores, memory_mib, count}", lambda v: v >= 0))]
    shapes = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        c.mapping(item, where, {"cores", "memory_mib", "count"})
        cores = c.typed(item.get("cores", 1), f"{where}.cores", int, "cores >= 1",
                        lambda v: v >= 1)
        memory = c.typed(item.get("memory_mib", default.memory_mib * cores),
                         f"{where}.memory_mib", int, f"MiB >= {MIN_VM_MEMORY_MIB}",
                         lambda v: v >= MIN_VM_MEMORY_MIB)
        shapes.append((Shape(cores, memory), c.typed(item.get("count", 1), f"{where}.count",
                                                     int, "a number >= 0", lambda v: v >= 0)))
    return shapes


def _parse_spares(c: _Checker, raw: Any, vos: tuple[VoRule, ...], places: int,
                  budget: Budget, per_core: int) -> SparePolicy:
    if raw is None:
        return SparePolicy()
    raw = c.mapping(raw, "spares", {"vos", "images", "max_age", "interval"})
    counts: dict[tuple[str, Shape], int] = {}
    by_vo = {rule.name: rule for rule in vos}
    per_vo = c.mapping(raw.get("vos") or {}, "spares.vos", set(by_vo))
    per_image = raw.get("images") or {}
    if not isinstance(per_image, dict):
        raise c.fail("spares.images", "a mapping of image name to count", per_image)
    wanted = [(f"spares.vos.{vo}", by_vo[vo].image,
               by_vo[vo].memory_per_core_mib or per_core, n) for vo, n in per_vo.items()]
    wanted += [(f"spares.images.{name}", c.typed(name, f"spares.images.{name}", str,
                                                 "an image name", valid_name), per_core, n)
               for name, n in per_image.items()]
    for key, image, memory, raw_count in wanted:
        default = Shape(1, max(MIN_VM_MEMORY_MIB, memory))
        for shape, count in _parse_spare_shapes(c, key, raw_count, default):
            if budget.never_fits(shape):
                raise c.fail(key, "spares that fit the node's budget (node.cores, "
                             "node.memory_mib)", f"{shape}")
            counts[(image, shape)] = counts.get((image, shape), 0) + count
    total = sum(counts.values())
    if total > places:
        raise c.fail("spares", f"at most as many spares as VM places ({places}): spares "
                     "take places as jobs do", total)
    cores, memory = budget.used(s for (_, s), n in counts.items() for _ in range(n))
    if cores > budget.cores or memory > budget.memory_mib:
        raise c.fail("spares", f"spares that fit the node's budget together ({budget.cores} "
                     f"cores, {budget.memory_mib} MiB with QEMU's overhead)",
                     f"{cores} cores, {memory} MiB")
    positive = lambda v: v > 0  # noqa: E731
    return SparePolicy(
        counts=tuple(sorted((i, s, n) for (i, s), n in counts.items() if n)),
        max_age=c.typed(raw.get("max_age", 86400), "spares.max_age", float, "seconds > 0",
                        positive),
        interval=c.typed(raw.get("interval", 5), "spares.interval", float, "seconds > 0",
                         positive))


def _host_memory_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise ConfigError("/proc/meminfo has no MemTotal")


def _parse_budget(c: _Checker, raw: Any, slots: tuple[Slot, ...], domain_type: str) -> Budget:
    """`node:`: the cores and memory VMs may use on this node in all. Without it (a
    configuration of fixed-size slots), the budget is what the slots' sizes add up to: every
    slot can hold a VM of its old size at once. QEMU's overhead per VM (`auto`, the default)
    is the one of the accelerator `domain_type` gives on this host."""
    if raw is None:
        return Budget(cores=sum(s.vcpus for s in slots),
                      memory_mib=sum(s.memory_mib for s in slots), vm_overhead_mib=0)
    raw = c.mapping(raw, "node", {"cores", "memory_mib", "host_reserve_mib",
                                  "vm_overhead_mib"})
    overhead = raw.get("vm_overhead_mib", "auto")
    overhead = VM_OVERHEAD_MIB[resolve_domain_type(domain_type)] if overhead == "auto" else (
        c.typed(overhead, "node.vm_overhead_mib", int, "MiB >= 0, or auto", lambda v: v >= 0))
    reserve = c.typed(raw.get("host_reserve_mib", DEFAULT_HOST_RESERVE_MIB),
                      "node.host_reserve_mib", int, "MiB >= 0", lambda v: v >= 0)
    cores = raw.get("cores", "auto")
    cores = (os.cpu_count() or 1) if cores == "auto" else c.typed(
        cores, "node.cores", int, "a number of cores >= 1, or auto", lambda v: v >= 1)
    memory = raw.get("memory_mib", "auto")
    if memory == "auto":
        memory = _host_memory_mib() - reserve
        if memory < MIN_VM_MEMORY_MIB + overhead:
            raise c.fail("node.host_reserve_mib", "less than this host's memory "
                         f"({memory + reserve} MiB) by at least one VM's", reserve)
    else:
        memory = c.typed(memory, "node.memory_mib", int, "MiB for all VMs together, or auto",
                         lambda v: v >= MIN_VM_MEMORY_MIB + overhead)
    return Budget(cores=cores, memory_mib=memory, vm_overhead_mib=overhead)


def _parse_per_core(c: _Checker, raw: Any, slots: tuple[Slot, ...]) -> int:
    """`job_defaults.memory_per_core_mib`, else (a configuration of fixed-size slots) the
    smallest memory per vCPU of its slots: a job that asks for none gets no more than a slot
    gave it before, and every slot's share of the budget still holds one such VM."""
    raw = c.mapping(raw or {}, "job_defaults", {"memory_per_core_mib"})
    legacy = min(max(64, s.memory_mib // s.vcpus) for s in slots)
    return c.typed(raw.get("memory_per_core_mib", legacy),
                   "job_defaults.memory_per_core_mib", int, "MiB >= 64", lambda v: v >= 64)


def _parse_health(c: _Checker, raw: Any) -> HealthPolicy:
    raw = c.mapping(raw or {}, "health", {"min_free_mib", "back_after", "gone_after"})
    return HealthPolicy(
        min_free_mib=c.typed(raw.get("min_free_mib", 1024), "health.min_free_mib", int,
                             "MiB >= 0", lambda v: v >= 0),
        back_after=c.typed(raw.get("back_after", 60), "health.back_after", float,
                           "seconds >= 0", lambda v: v >= 0),
        gone_after=c.typed(raw.get("gone_after", 60), "health.gone_after", float,
                           "seconds >= 0", lambda v: v >= 0))


def _parse_places_and_budget(c: _Checker, data: dict[str, Any], domain_type: str
                             ) -> tuple[tuple[Slot, ...], Budget, int]:
    """The VM places, the node's budget and the memory per core of a job that asks for none:
    from `node:` and `job_defaults:`, or (an earlier version's configuration) the slots' sizes
    and `slot_defaults`."""
    defaults = c.mapping(data.get("slot_defaults") or {}, "slot_defaults",
                         {"vcpus", "memory_mib"})
    if data.get("node") is not None and defaults:
        raise ConfigError(f"{c.path}: slot_defaults: with node: a VM's size is its job's; give "
                          "a job that asks for no memory job_defaults.memory_per_core_mib")
    slots = _parse_slots(c, data.get("slots"), defaults, data.get("node") is not None)
    return (slots, _parse_budget(c, data.get("node"), slots, domain_type),
            _parse_per_core(c, data.get("job_defaults"), slots))


def parse_config(data: Any, path: str) -> Config:
    """Validate the parsed YAML document `data` (from file `path`) and build a Config."""
    c = _Checker(path)
    data = c.mapping(data if data is not None else {}, "(top level)", TOP_KEYS)
    domain_type = c.typed(data.get("domain_type", "auto"), "domain_type", str,
                          "auto, kvm or qemu", lambda v: v in ("auto", "kvm", "qemu"))
    unmatched = c.typed(data.get("unmatched", "reject"), "unmatched", str, "native or reject",
                        lambda v: v in ("native", "reject"))
    positive = lambda v: v > 0  # noqa: E731
    root_key = data.get("site_root_key")
    if root_key is not None:
        root_key = Path(c.typed(root_key, "site_root_key", str, "an absolute file path",
                                os.path.isabs))
        if not root_key.is_file():
            raise c.fail("site_root_key", "an existing private key file", str(root_key))
    yaim_groups = None
    if data.get("yaim_groups_conf") is not None:
        groups_conf = c.typed(data["yaim_groups_conf"], "yaim_groups_conf", str,
                              "an absolute path to a YAIM groups.conf", os.path.isabs)
        try:
            yaim_groups = read_yaim_groups_conf(groups_conf)
        except OSError as exc:
            raise c.fail("yaim_groups_conf", "a readable YAIM groups.conf",
                         f"{groups_conf} ({exc.strerror})") from None
    vos = _parse_vos(c, data.get("vos"), yaim_groups)
    slots, budget, per_core = _parse_places_and_budget(c, data, domain_type)
    return Config(
        path=path,
        libvirt_uri=c.typed(data.get("libvirt_uri", "qemu:///system"), "libvirt_uri", str,
                            "a libvirt URI such as qemu:///system", lambda u: ":" in u),
        domain_type=domain_type,
        image_dir=c.directory(data.get("image_dir", "/var/lib/vmimagemanager/images"),
                              "image_dir"),
        overlay_dir=c.directory(data.get("overlay_dir", "/var/lib/vmimagemanager/overlays"),
                                "overlay_dir"),
        state_dir=c.directory(data.get("state_dir", "/var/lib/vmimagemanager/state"),
                              "state_dir"),
        run_dir=c.directory(data.get("run_dir", "/run/vmimagemanager"), "run_dir"),
        boot_timeout=c.typed(data.get("boot_timeout", 180), "boot_timeout", float,
                             "seconds > 0", positive),
        shutdown_timeout=c.typed(data.get("shutdown_timeout", 30), "shutdown_timeout", float,
                                 "seconds > 0", positive),
        max_boot_attempts=c.typed(data.get("max_boot_attempts", 3), "max_boot_attempts", int,
                                  "an integer >= 1", lambda v: v >= 1),
        on_boot_failure=c.typed(data.get("on_boot_failure", "hold"), "on_boot_failure", str,
                                "hold or fail", lambda v: v in ("hold", "fail")),
        slots=slots,
        vos=vos,
        unmatched=unmatched,
        budget=budget,
        memory_per_core_mib=per_core,
        shared_paths=_parse_shared(c, data.get("shared_paths")),
        site_root_key=root_key,
        scratch_dir=c.typed(data.get("scratch_dir", "/tmp"), "scratch_dir", str,
                            "an absolute path in the guest", os.path.isabs),
        grid_ca_dir=c.directory(data.get("grid_ca_dir", "/etc/grid-security/certificates"),
                                "grid_ca_dir"),
        spares=_parse_spares(c, data.get("spares"), vos, len(slots), budget, per_core),
        snapshot_starts=c.typed(data.get("snapshot_starts", False), "snapshot_starts", bool,
                                "true or false"),
        metrics_dir=(c.directory(data["metrics_dir"], "metrics_dir")
                     if data.get("metrics_dir") is not None else None),
        ssh_ports=_parse_port_range(c, data.get("ssh_ports")),
        health=_parse_health(c, data.get("health")),
    )


def config_path(explicit: str | None = None, *, trust_environment: bool = True) -> str:
    """Which file to load: --config, then $VMIM_CONFIG, then the default.

    Root hooks run with the job's (user-controlled) environment, so they pass
    trust_environment=False: a job must never choose the configuration root acts on.
    """
    if explicit:
        return explicit
    if trust_environment and os.environ.get("VMIM_CONFIG"):
        return os.environ["VMIM_CONFIG"]
    return DEFAULT_CONFIG_PATH


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found; create it (see "
                          "examples/) or pass --config") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    return parse_config(data, path)
