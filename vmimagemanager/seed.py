"""Contextualisation: ephemeral ssh keys and a NoCloud seed disk.

Every boot gets a small ISO9660 volume labelled `cidata` holding `meta-data` and `user-data`, the
NoCloud convention, so a real cloud-init image and our busybox test guests read the same thing:
the host name, and the public keys allowed to log in (the job's ephemeral key for the pool account,
an admin key for root). No image is rebuilt to change who may log in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import NoSpace, VmimError


@dataclass(frozen=True)
class KeyPair:
    private_openssh: bytes
    public_line: str  # "ssh-ed25519 AAAA... comment"


def generate_keypair(comment: str) -> KeyPair:
    """A fresh Ed25519 key pair, made by OpenSSH's ssh-keygen in a private temporary directory
    (a crypto library cost the prolog 50 ms of start-up; the ssh client is OpenSSH anyway)."""
    with tempfile.TemporaryDirectory(prefix="vmim-key-") as tmp:  # 0700
        path = os.path.join(tmp, "key")
        r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                            "-f", path], stdin=subprocess.DEVNULL, capture_output=True)
        if r.returncode != 0:
            raise VmimError(f"ssh-keygen could not make a key: "
                            f"{r.stderr.decode('utf-8', 'replace').strip()}")
        with open(path, "rb") as private, open(path + ".pub") as public:
            return KeyPair(private.read(), public.read().strip())


def public_key_line(private_key: Path) -> str:
    """The public half of an OpenSSH private key file ("type base64"); VmimError if unusable."""
    r = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(private_key)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    parts = r.stdout.split()
    if r.returncode != 0 or len(parts) < 2:
        raise VmimError(f"{private_key}: not a usable unencrypted ssh private key "
                        f"({r.stderr.strip() or 'no public key'})")
    return f"{parts[0]} {parts[1]}"


@dataclass(frozen=True)
class SeedData:
    instance_id: str
    hostname: str
    authorized_keys: dict[str, list[str]]  # user -> public key lines
    mounts: list[list[str]] = field(default_factory=list)  # cloud-init `mounts` entries


def render_user_data(seed: SeedData) -> str:
    users = [{"name": user, "ssh_authorized_keys": list(keys)}
             for user, keys in seed.authorized_keys.items()]
    doc: dict[str, object] = {"hostname": seed.hostname, "users": users, "ssh_pwauth": False}
    if "root" in seed.authorized_keys:
        doc["disable_root"] = False
    if seed.mounts:
        doc["mounts"] = seed.mounts
    # width: never fold a long key line; simple guest parsers read one key per line.
    return "#cloud-config\n" + yaml.safe_dump(doc, default_flow_style=False, sort_keys=False,
                                               width=1 << 20)


def render_meta_data(seed: SeedData) -> str:
    return yaml.safe_dump({"instance-id": seed.instance_id, "local-hostname": seed.hostname},
                          default_flow_style=False, sort_keys=False)


def build_seed(path: Path, seed: SeedData) -> None:
    """Write the NoCloud seed ISO to `path` (root-only: it names the keys allowed in)."""
    tool = shutil.which("genisoimage") or shutil.which("mkisofs")
    if tool is None:
        raise VmimError("genisoimage is not installed; install it (apt-get install genisoimage)")
    with tempfile.TemporaryDirectory(prefix="vmim-seed-") as tmp:
        Path(tmp, "meta-data").write_text(render_meta_data(seed))
        Path(tmp, "user-data").write_text(render_user_data(seed))
        part = path.with_name(f".{path.name}.part")
        try:
            subprocess.run([tool, "-quiet", "-output", str(part), "-volid", "cidata",
                            "-joliet", "-rock", str(Path(tmp, "meta-data")),
                            str(Path(tmp, "user-data"))],
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            part.unlink(missing_ok=True)
            if "No space left" in exc.stderr:
                raise NoSpace(f"no space left in {path.parent} for the job's seed disk: free "
                              "space there (overlay_dir)") from None
            raise VmimError(f"building the seed disk {path} failed: {exc.stderr.strip()}") from None
        os.chmod(part, 0o600)
        part.rename(path)
