"""Test certificates made by the real openssl: a CA, user certificates it issued, RFC 3820
proxies signed by them, and proxy files written as grid-proxy-init writes them."""

from __future__ import annotations

import subprocess
from pathlib import Path

ALICE = "/DC=org/DC=test/CN=Alice Example"
PROXY_EXT = ("proxyCertInfo=critical,language:id-ppl-inheritAll\n"
             "keyUsage=critical,digitalSignature,keyEncipherment\n")
USER_EXT = ("basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n")
CA_CONF = """[ca]
default_ca = signer
[signer]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
unique_subject = no
[any]
[proxy]
proxyCertInfo = critical,language:id-ppl-inheritAll
keyUsage = critical,digitalSignature,keyEncipherment
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class Pki:
    """Certificates made by openssl in one directory; each is `name`.pem with `name`.key."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        self.serial = 100

    def pem(self, name: str) -> str:
        return (self.dir / f"{name}.pem").read_text()

    def key(self, name: str) -> str:
        return (self.dir / f"{name}.key").read_text()

    def ca(self, name: str, subject: str) -> None:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=self.dir)

    def self_signed(self, name: str, subject: str) -> None:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", subject,
                "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=self.dir)

    def signed(self, name: str, subject: str, issuer: str, extensions: str,
               *extra: str) -> None:
        """`name`, issued by `issuer` (its key signs), valid for a day."""
        self.serial += 1
        (self.dir / f"{name}.ext").write_text(extensions)
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject, *extra,
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=self.dir)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.pem", "-CAkey",
                f"{issuer}.key", "-set_serial", str(self.serial), "-days", "1",
                "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=self.dir)

    def user(self, name: str, subject: str, ca: str = "ca", *extra: str) -> None:
        self.signed(name, subject, ca, USER_EXT, *extra)

    def proxy(self, name: str, issuer: str, issuer_subject: str = ALICE,
              number: int = 1701812946, *extra: str) -> None:
        """An RFC 3820 proxy: the issuer's subject plus CN=<number>, proxyCertInfo critical."""
        self.signed(name, f"{issuer_subject}/CN={number}", issuer, PROXY_EXT, *extra)

    def expired_proxy(self, name: str, issuer: str) -> None:
        """A proxy of `issuer` that was valid for one day in January 2025 (`openssl ca`)."""
        db = self.dir / f"{name}.db"
        db.mkdir()
        (db / "ca.cnf").write_text(CA_CONF)
        (db / "index.txt").write_text("")
        (db / "serial").write_text("1000\n")
        subject = ALICE + "/CN=4242"
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                "-keyout", f"../{name}.key", "-out", f"../{name}.csr", cwd=db)
        openssl("ca", "-batch", "-config", "ca.cnf", "-cert", f"../{issuer}.pem", "-keyfile",
                f"../{issuer}.key", "-in", f"../{name}.csr", "-out", f"../{name}.pem",
                "-startdate", "20250101000000Z", "-enddate", "20250102000000Z",
                "-extensions", "proxy", "-preserveDN", "-notext", cwd=db)

    def proxy_file(self, path: Path, leaf: str, *chain: str, key: str | None = None) -> Path:
        """A proxy file as grid-proxy-init writes it: the leaf certificate, its key (or
        `key`'s), then the rest of the chain; the job owner's, 0600."""
        path.write_text(self.pem(leaf) + self.key(key or leaf)
                        + "".join(self.pem(c) for c in chain))
        path.chmod(0o600)
        return path
