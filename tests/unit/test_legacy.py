"""`vmimagemanager config import-legacy`: the original tool's INI configuration, written in its
style, through the real command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vmimagemanager.config import parse_config
from vmimagemanager.errors import VmimError
from vmimagemanager.legacy import convert
from vmimagemanager.shape import Shape

CLI = str(Path(sys.executable).parent / "vmimagemanager")

ORIGINAL = """\
[VmImageManager]
vmimages = /var/lib/vmimagemanager/images
vmextracts = /var/lib/vmimagemanager/extracts
vmconfdir = /etc/xen/vmimagemanager
mount = /mnt/vmimagemanager
bridge = xenbr0
vAlocatedMemory = 1024
LvmVolumeGroup = vg_vmim

[wn042-vm1]
HostName = wn042-vm1.grid.example.org
mac = 00:16:3E:00:00:01
vm_slot_enabled = 1
root = /dev/vg_vmim/vm1_root
swap = /dev/vg_vmim/vm1_swap

[wn042-vm2]
HostName = wn042-vm2.grid.example.org
mac = 00:16:3e:00:00:02
bridge = xenbr1
vAlocatedMemory = 2048
vm_slot_enabled = yes
hostdisk = /dev/sdb
partition = sdb1

[wn042-vm3]
HostName = wn042-vm3.grid.example.org
mac = 00:16:3e:00:00:03
vm_slot_enabled = 0
"""


def test_enabled_slots_keep_their_network_identity_and_memory():
    text, warnings = convert(ORIGINAL, "vmimagemanager.cfg")
    data = yaml.safe_load(text)
    cfg = parse_config(data, "converted.yaml")
    assert [s.name for s in cfg.slots] == ["wn042-vm1", "wn042-vm2"]  # vm3 is disabled
    one, two = cfg.slots
    assert (one.network.bridge, one.network.mac, one.network.hostname) == (
        "xenbr0", "00:16:3e:00:00:01", "wn042-vm1.grid.example.org")
    assert two.network.bridge == "xenbr1"
    # the fixed sizes became the node's budget: one core a slot, their memory and QEMU's
    # (room for TCG's overhead: the overhead is the accelerator's, `auto`)
    assert (cfg.budget.cores, cfg.budget.memory_mib) == (2, 1024 + 2048 + 2 * 384)
    assert data["node"]["vm_overhead_mib"] == "auto"
    assert cfg.job_shape("", 1, None) == Shape(1, 1024)  # the smallest slot's
    assert any("[wn042-vm2] vAlocatedMemory = 2048: a VM has its job's memory" in w
               for w in warnings)
    text_warnings = "\n".join(warnings)
    for key in ("vmimages", "vmextracts", "vmconfdir", "mount", "lvmvolumegroup", "root", "swap",
                "hostdisk", "partition"):
        lines = [w for w in warnings if f" {key}: ignored: " in w]
        assert len(lines) == 1, (key, warnings)  # one line per key and section, saying why
    assert "[wn042-vm3]: slot disabled" in text_warnings
    assert "'vos:'" in text_warnings


def test_the_command_line_prints_yaml_and_one_warning_line_per_key(tmp_path):
    ini = tmp_path / "vmimagemanager.cfg"
    ini.write_text(ORIGINAL)
    r = subprocess.run([CLI, "config", "import-legacy", str(ini)], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "VMIM_CONFIG": "/nonexistent"})
    assert r.returncode == 0, r.stderr
    (tmp_path / "out.yaml").write_text(r.stdout)
    assert len(parse_config(yaml.safe_load(r.stdout), "out.yaml").slots) == 2
    lines = r.stderr.splitlines()
    assert all(line.startswith("vmimagemanager: ") for line in lines), lines
    assert any("LvmVolumeGroup".lower() in line and "qcow2" in line for line in lines), lines


@pytest.mark.parametrize("text, says", [
    ("[other]\nx = 1\n", "no [VmImageManager] section"),
    ("not an ini file\n", "not an INI file"),
    ("[VmImageManager]\nbridge = br0\n[s1]\nHostName = h\nmac = zz:zz\n", "mac"),
    ("[VmImageManager]\nbridge = br0\n[s1]\nmac = 52:54:00:00:00:01\n", "has no hostname"),
    ("[VmImageManager]\n[s1]\nHostName = h\nmac = 52:54:00:00:00:01\n", "bridge"),
    ("[VmImageManager]\nbridge = br0\nvAlocatedMemory = lots\n[s1]\nHostName = h\n"
     "mac = 52:54:00:00:00:01\n", "vAlocatedMemory"),
    ("[VmImageManager]\nbridge = br0\n[../etc]\nHostName = h\nmac = 52:54:00:00:00:01\n",
     "slot name"),
    ("[VmImageManager]\nbridge = br0\n[s1]\nHostName = h\nmac = 52:54:00:00:00:01\n"
     "vm_slot_enabled = maybe\n", "vm_slot_enabled"),
    ("[VmImageManager]\nbridge = br0\n[s1]\nHostName = h\nmac = 52:54:00:00:00:01\n"
     "vm_slot_enabled = 0\n", "no enabled slot"),
])
def test_unusable_configurations_get_one_clear_error(text, says):
    with pytest.raises(VmimError, match=re.escape(says)) as err:
        convert(text, "old.cfg")
    assert "\n" not in str(err.value)
