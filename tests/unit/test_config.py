"""Configuration validation: every bad input gets its own one-line error."""

from __future__ import annotations

import pytest
import yaml

from tests.support import REPO
from vmimagemanager.config import config_path, load_config, parse_config
from vmimagemanager.errors import ConfigError

SLOT = {"name": "s1", "network": {"type": "user", "ssh_port": 2201}}


def cfg(**overrides):
    data = {"slots": [SLOT], "vos": {"atlas": {"image": "atlas", "groups": ["atlas"]}}}
    data.update(overrides)
    return data


BAD = [
    (cfg(colour="blue"), "(top level).colour: unknown key"),
    (cfg(slots=[]), "slots: expected a non-empty list"),
    (cfg(slots=[{"name": "../x", "network": SLOT["network"]}]), "slots[0].name: expected"),
    (cfg(slots=[SLOT, {"name": "s1", "network": {"type": "user", "ssh_port": 2202}}]),
     "duplicate slot name 's1'"),
    (cfg(slots=[SLOT, {"name": "s2", "network": {"type": "user", "ssh_port": 2201}}]),
     "duplicate slot ssh port"),
    (cfg(slots=[{"name": "b1", "network": {"type": "bridge", "bridge": "br0",
                                           "mac": "52:54:00:00:00:01", "hostname": "vm1"}},
                {"name": "b2", "network": {"type": "bridge", "bridge": "br0",
                                           "mac": "52:54:00:00:00:01", "hostname": "vm2"}}]),
     "duplicate slot mac"),
    (cfg(slots=[{"name": "s1", "network": {"type": "user", "ssh_port": 2201,
                                           "listen": "192.168.122.1"}}]),
     "network.listen: expected a loopback IPv4 address"),
    (cfg(slots=[{"name": "s1", "network": {"type": "user", "ssh_port": 70000}}]),
     "ssh_port: expected a TCP port"),
    (cfg(slots=[{"name": "s1", "network": {"type": "passt"}}]),
     "network.type: expected user or bridge"),
    (cfg(slots=[{"name": "s1", "vcpus": "two", "network": SLOT["network"]}]),
     "slots[0].vcpus: expected a positive integer, got 'two'"),
    (cfg(slots=[{"name": "s1", "vcpus": True, "network": SLOT["network"]}]),
     "slots[0].vcpus: expected a positive integer"),
    (cfg(domain_type="xen"), "domain_type: expected auto, kvm or qemu"),
    (cfg(image_dir="relative/dir"), "image_dir: expected an absolute directory path"),
    (cfg(unmatched="drop"), "unmatched: expected native or reject"),
    (cfg(vos={"atlas": {"image": "atlas"}}), "vos.atlas: expected at least one of groups"),
    (cfg(vos={"atlas": {"image": "../../etc/passwd", "groups": ["atlas"]}}),
     "vos.atlas.image: expected an image name"),
    (cfg(shared_paths=[{"path": "/", "mode": "guest"}]), "shared_paths[0].path: expected"),
    (cfg(shared_paths=[{"path": "/nonexistent-xyz", "mode": "hypervisor"}]),
     "expected an existing directory on this host"),
    (cfg(shared_paths=[{"path": "/tmp", "mode": "hypervisor", "scope": "everyone"}]),
     "shared_paths[0].scope: expected owner or tree"),
    (cfg(shared_paths=[{"path": "/tmp", "mode": "guest", "readonly": "yes"}]),
     "shared_paths[0].readonly: expected true or false"),
    (cfg(shared_paths=[{"path": "/tmp", "mode": "hypervisor", "scope": "tree"}]),
     "shared_paths[0]: a hypervisor share of a whole tree must be 'readonly: true'"),
    (cfg(site_root_key="/nonexistent/key"), "site_root_key: expected an existing private key"),
    (cfg(boot_timeout=-1), "boot_timeout: expected seconds > 0"),
    (cfg(ssh_ports="30000"), "ssh_ports: expected a port range LOW-HIGH"),
    (cfg(ssh_ports="29999-20000"), "ssh_ports: expected a port range LOW-HIGH"),
    (cfg(ssh_ports="80-90"), "ssh_ports: expected a port range LOW-HIGH within 1024-65535"),
    (cfg(ssh_ports=20000), "ssh_ports: expected a port range LOW-HIGH"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_config_names_file_key_and_expectation(data, message):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/etc/x.yaml")
    text = str(info.value)
    assert text.startswith("/etc/x.yaml: ")
    assert message in text
    assert "\n" not in text


def test_good_config_has_defaults():
    c = parse_config(cfg(), "/etc/x.yaml")
    assert c.libvirt_uri == "qemu:///system"
    assert c.domain_type == "auto"
    assert c.slot("s1").domain_name == "vmim-s1"
    assert c.slot("s1").network.ssh_port == 2201  # the first port tried at boot (ports.py)
    assert c.ssh_ports == (20000, 29999)
    assert c.unmatched == "reject"
    with pytest.raises(ConfigError, match="no slot named 'nope'"):
        c.slot("nope")


def test_a_user_slot_needs_no_fixed_port_and_the_node_range_is_configurable():
    """The port of a user-network VM's forward is chosen at boot (ports.py): a configured
    ssh_port is only the first tried, and may be left out; old configurations load as before."""
    c = parse_config(cfg(slots=[{"name": "s1", "network": {"type": "user"}},
                                {"name": "s2", "network": {"type": "user"}}],
                         ssh_ports="21000-21099"), "/etc/x.yaml")
    assert [s.network.ssh_port for s in c.slots] == [None, None]
    assert c.ssh_ports == (21000, 21099)


def test_load_reports_yaml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("slots: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg()))
    assert load_config(str(good)).slots[0].name == "s1"


def test_root_hooks_ignore_vmim_config(monkeypatch):
    monkeypatch.setenv("VMIM_CONFIG", "/home/attacker/evil.yaml")
    assert config_path(None) == "/home/attacker/evil.yaml"
    assert config_path(None, trust_environment=False) == "/etc/vmimagemanager/vmimagemanager.yaml"
    assert config_path("/etc/a.yaml", trust_environment=False) == "/etc/a.yaml"


def test_examples_parse():
    for path in sorted(REPO.glob("examples/**/*.yaml")):
        data = yaml.safe_load(path.read_text())
        parse_config(data, str(path))


def test_vo_groups_come_from_a_yaim_groups_conf(tmp_path):
    groups_conf = REPO / "ce-config" / "groups.conf"
    data = cfg(yaim_groups_conf=str(groups_conf),
               vos={"atlas": {"image": "atlas", "groups": ["atlas"]},
                    "dteam": {"image": "generic"}})
    c = parse_config(data, "/etc/x.yaml")
    rules = {rule.name: rule for rule in c.vos}
    assert rules["atlas"].groups == ("atlas", "atlassgm", "atlasprd")
    assert rules["dteam"].groups == ("dteam",)
    broken = tmp_path / "groups.conf"
    broken.write_text('"/atlas"\n')
    with pytest.raises(ConfigError, match="groups.conf:1: expected FQAN:group:gid:flag"):
        parse_config(cfg(yaim_groups_conf=str(broken)), "/etc/x.yaml")
