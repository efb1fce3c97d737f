"""The audit trail: one JSON line per job event, for the questions a security incident asks.

Which Grid user ran what, in which image (name and sha256), on which node and slot, when, and
how it ended. `state_dir/audit.jsonl` is root-only (0600; etc/logrotate.d/vmimagemanager); the
same line goes to syslog or the journal when one runs (logger "vmimagemanager.audit").
`vmimagemanager history` reads it.

Events: `start` (the prolog's outcome: ready, retry or hold, with the reason; for a VM the slot,
domain, image, sha256, boot and prolog seconds, whether a warm spare served it), `end` (the
epilog: the payload's exit status or signal, the VM's CPU seconds), `spare` (the agent booted a
warm spare, or failed to) and `reconcile` (what a reconcile round cleaned up). Each event also
moves the Prometheus counters (metrics.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .files import UntrustedFileError, append_line, read_untrusted
from .metrics import observe
from .rootenv import clean_environment

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("vmimagemanager.audit")

AUDIT_FILE = "audit.jsonl"
PROXY_MAX_BYTES = 64 * 1024
# The proxy's own name parts: RFC 3820 proxies add CN=<number>, legacy ones CN=proxy or
# CN=limited proxy, to the subject of the certificate that signed them.
PROXY_CN = re.compile(r"(/CN=(\d+|proxy|limited proxy))+$")
# The node's Grid CA directory (IGTF bundle, hashed names): a proxy's identity is verified
# against it (config grid_ca_dir).
DEFAULT_CA_DIR = "/etc/grid-security/certificates"
OPENSSL_TIMEOUT = 10
PEM_MARKER = re.compile(r"-----(BEGIN|END) ([A-Z0-9 ]{1,40})-----")
# How `openssl verify -show_chain` names each certificate: RFC 2253's escapes (',' '+' and the
# like, control and non-ASCII bytes as \HH of UTF-8) in the certificate's order, one line each.
CHAIN_NAMEOPT = "esc_2253,esc_ctrl,esc_msb,utf8,sep_comma_plus"
UNTRUSTED = " (untrusted)"  # what -show_chain appends to a certificate not from the CA directory
SEQUENCE, INTEGER, BIT_STRING, OCTET_STRING, OBJECT_ID = 0x30, 0x02, 0x03, 0x04, 0x06
RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1


@dataclass(frozen=True)
class ProxyIdentity:
    """The Grid identity a job's proxy carries, and whether this node confirmed it.

    subject: the identity in the Grid's /DC=org/CN=Name form, the proxy's own CN parts left out;
    '' when root read no certificate. verified: the proxy file holds the private key of its
    first certificate, and that certificate's chain verifies against the node's CA directory
    (grid_ca_dir); only then is `subject` who ran the job. reason: why it is not verified, or
    why no proxy was read ('' for a job without X509_USER_PROXY).
    """

    subject: str = ""
    verified: bool = False
    reason: str = ""

    def audit_fields(self) -> dict[str, str]:
        """The `start` event's fields: `identity` only for a verified one; a mere claim is
        `identity_unverified`, with `identity_problem` saying why."""
        if self.verified:
            return {"identity": self.subject}
        return {key: value for key, value in (("identity_unverified", self.subject),
                                              ("identity_problem", self.reason)) if value}


def audit_path(cfg: Config) -> Path:
    return cfg.state_dir / AUDIT_FILE


def record(cfg: Config, event: str, job: str = "", **fields: object) -> None:
    """Append one event; a trail that cannot be written is logged, never in the job's way."""
    entry = {"time": round(time.time(), 3), "node": socket.gethostname(), "event": event,
             "job": job, **{k: v for k, v in fields.items() if v not in (None, "", {})}}
    line = json.dumps(entry)
    try:
        # a fresh node's first job may be one without a VM: nothing has made state_dir yet
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        append_line(audit_path(cfg), line, 0o600)
    except OSError as exc:
        log.warning("audit trail %s not written: %s", audit_path(cfg), exc)
    log.info("%s", line)
    observe(cfg, entry)  # the Prometheus counters are a fold of these events


def proxy_identity(path: str | None, owner_uid: int,
                   ca_dir: str | os.PathLike = DEFAULT_CA_DIR) -> ProxyIdentity:
    """Who the job's proxy (`X509_USER_PROXY`) says it is, and whether this node can confirm it.

    Verified: the file holds the private key of its first certificate (only the key's holder
    could have put the key's primes there; checked here, in Python) and that certificate's chain,
    RFC 3820 proxies allowed, verifies against `ca_dir` and nothing else (`openssl verify`). The
    identity is then the subject of the chain's end-entity certificate. Otherwise the first
    certificate's subject, without the proxy's own CN parts, is only the proxy's claim.

    Root reads the file on the job's word (the path comes from the job's environment), so only
    a regular file of the job's owner, at most PROXY_MAX_BYTES, read with files.read_untrusted
    (no link at any level, never waiting for a writer); only its certificates go to openssl,
    with root's clean environment, never its key.
    """
    if not path:
        return ProxyIdentity()
    try:
        text = read_untrusted(path, owner_uid, PROXY_MAX_BYTES).decode("ascii", errors="replace")
    except UntrustedFileError as exc:
        return ProxyIdentity(reason=f"proxy not read: {exc}")
    except OSError as exc:
        return ProxyIdentity(reason=f"proxy not read: {exc.strerror or exc}")
    blocks = _pem_blocks(text)
    certs = [(pem, body) for pem, kind, body in blocks if kind == "CERTIFICATE"]
    if not certs:
        return ProxyIdentity(reason="no certificate in the proxy")
    keys = [(kind, body) for _, kind, body in blocks if kind in ("PRIVATE KEY", "RSA PRIVATE KEY")]
    problem = _key_problem(certs[0][1], keys)
    if not problem:
        chain, problem = _verify_chain(certs[0][0], "".join(pem for pem, _ in certs[1:]),
                                       os.fspath(ca_dir))
        if not problem:
            return ProxyIdentity(_slash_form(chain[_end_entity(chain)][0]), verified=True)
    return ProxyIdentity(_claimed_subject(certs[0][0]), verified=False, reason=problem)


def _pem_blocks(text: str) -> list[tuple[str, str, str]]:
    """The PEM blocks of `text`: (the block, its kind, its body), in order. One pass over the
    markers: a file of BEGIN lines without END costs no more than its length."""
    blocks, begin = [], None
    for marker in PEM_MARKER.finditer(text):
        if marker.group(1) == "BEGIN":
            begin = marker
        elif begin is not None and marker.group(2) == begin.group(2):
            blocks.append((text[begin.start():marker.end()] + "\n", begin.group(2),
                           text[begin.end():marker.start()]))
            begin = None
    return blocks


def _claimed_subject(cert_pem: str) -> str:
    """The subject of a certificate that did not verify, without the proxy's own CN parts."""
    try:
        out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "compat"],
                             input=cert_pem, capture_output=True, text=True, errors="replace",
                             timeout=OPENSSL_TIMEOUT, check=True, env=clean_environment()).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return PROXY_CN.sub("", out.strip().removeprefix("subject=").strip())


def _verify_chain(leaf: str, rest: str, ca_dir: str) -> tuple[list[tuple[str, bool]], str]:
    """The chain `openssl verify` built from `leaf` (read on its stdin) and the proxy file's other
    certificates (`rest`, an anonymous memory file it reads as /dev/fd/N) to a CA of `ca_dir`:
    each certificate's name (CHAIN_NAMEOPT), leaf first, and whether it came from the proxy
    file; or, when it does not verify, why. -no-CAfile and -no-CAstore: openssl would otherwise
    also trust the system's web CAs (ca-certificates)."""
    if not os.path.isdir(ca_dir):
        return [], f"no CA directory {ca_dir} on this node"
    args = ["openssl", "verify", "-CApath", ca_dir, "-no-CAfile", "-no-CAstore",
            "-allow_proxy_certs", "-show_chain", "-nameopt", CHAIN_NAMEOPT]
    fds: tuple[int, ...] = ()
    try:
        if rest:
            fds = (os.memfd_create("proxy-chain", os.MFD_CLOEXEC),)
            with open(fds[0], "w", encoding="ascii", closefd=False) as chain_file:
                chain_file.write(rest)
            args += ["-untrusted", f"/dev/fd/{fds[0]}"]
        out = subprocess.run(args, input=leaf, capture_output=True, text=True, errors="replace",
                             timeout=OPENSSL_TIMEOUT, pass_fds=fds, env=clean_environment())
    except (OSError, subprocess.SubprocessError) as exc:
        return [], f"openssl verify did not run: {exc}"
    finally:
        for fd in fds:
            os.close(fd)
    lines = out.stdout.splitlines()
    if out.returncode == 0 and lines[:2] == ["stdin: OK", "Chain:"]:
        chain = []
        for line in lines[2:]:
            name = line.partition(": ")[2]
            untrusted = name.endswith(UNTRUSTED)
            chain.append((name.removesuffix(UNTRUSTED), untrusted))
        if chain:
            return chain, ""
    errors = [m.group(1) for m in re.finditer(r"^error \d+ at \d+ depth lookup: (.+)$",
                                              out.stderr, re.M)]
    why = errors[0] if errors else (out.stderr.strip().splitlines() or ["no chain"])[-1]
    return [], f"chain does not verify against {ca_dir}: {why}"


def _end_entity(chain: list[tuple[str, bool]]) -> int:
    """Where the end-entity certificate is in a verified `chain`: below it come its proxies,
    each from the proxy file and named after its issuer plus one CN (openssl checked that of
    every RFC 3820 proxy). A certificate from the CA directory ends the walk: a user whose name
    extends their CA's is taken for a proxy only when the proxy file itself carries the CA."""
    k = 0
    while k + 1 < len(chain) and chain[k][1] and chain[k + 1][1]:
        name, issuer = chain[k][0], chain[k + 1][0]
        parts = _name_parts(name)
        if not (name.startswith(issuer + ",CN=") and parts[:-1] == _name_parts(issuer)
                and parts[-1][:2] == (",", "CN")):
            break
        k += 1
    return k


def _name_parts(name: str) -> list[tuple[str, str, bytes]]:
    """The parts of a CHAIN_NAMEOPT name, in order: (',' or '+' before it: a new RDN or another
    value of the same one, attribute, value unescaped to its bytes, UTF-8)."""
    parts: list[tuple[str, bytearray]] = [(",", bytearray())]
    i = 0
    while i < len(name):
        char = name[i]
        if char == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", name[i + 1:i + 3]):
            parts[-1][1].append(int(name[i + 1:i + 3], 16))  # esc_ctrl, esc_msb: \HH
            i += 3
            continue
        if char == "\\" and i + 1 < len(name):  # esc_2253: \, \+ \" \\ \< \> \; \# \<space>
            char, i = name[i + 1], i + 1
        elif char in ",+":
            parts.append((char, bytearray()))
            i += 1
            continue
        parts[-1][1].extend(char.encode())
        i += 1
    result = []
    for separator, part in parts:
        key, _, value = bytes(part).partition(b"=")
        result.append((separator, key.decode(errors="replace"), value))
    return result


def _slash_form(name: str) -> str:
    """A CHAIN_NAMEOPT name as `openssl x509 -subject -nameopt compat` (X509_NAME_oneline)
    prints it, the Grid's /DC=org/CN=Name: '+' between the values of one RDN, '/' and '+' in a
    value escaped with a backslash, bytes outside printable ASCII as \\xHH."""
    return "".join(("/" if separator == "," else "+") + key + "="
                   + "".join(f"\\x{b:02X}" if not 0x20 <= b <= 0x7E
                             else "\\" + chr(b) if chr(b) in "/+" else chr(b) for b in value)
                   for separator, key, value in _name_parts(name))


def _key_problem(cert: str, keys: list[tuple[str, str]]) -> str:
    """'' when one of the proxy file's private keys (PEM kind and body) is the key of the
    certificate (PEM body `cert`), else why not. An RSA key's primes must multiply to the
    certificate's modulus: a copy of somebody's certificate, which anyone may have, does not
    carry them. The key stays in this process (no openssl, no file). Proxies carry RSA keys
    (grid-proxy-init, voms-proxy-init, arcproxy); another kind of key is a problem named as
    such. Whatever the file holds, this returns (a malformed structure is a reason, never an
    exception in the prolog)."""
    if not keys:
        return "no private key in the proxy"
    try:
        modulus, exponent = _rsa_public_key(_pem_der(cert))
    except (ValueError, IndexError) as exc:
        return f"certificate not read: {exc}"
    for kind, body in keys:
        try:
            n, e, p, q = _rsa_private_key(kind, _pem_der(body))
        except (ValueError, IndexError):
            continue
        if (n, e) == (modulus, exponent) and p > 1 and q > 1 and p * q == n:
            return ""
    return "the private key in the proxy is not its certificate's (or not an RSA key)"


def _pem_der(body: str) -> bytes:
    """The DER bytes of a PEM body; encrypted keys and any other header lines are refused."""
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64 DER (an encrypted key?)") from exc


def _rsa_public_key(cert: bytes) -> tuple[int, int]:
    """(modulus, public exponent) of an X.509 certificate's RSA key."""
    tbs = _der_items(cert, *_der_content(cert, 0, len(cert), SEQUENCE))[0]
    fields = _der_items(cert, tbs[1], tbs[2])
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if len(fields) < 6 or fields[5][0] != SEQUENCE:
        raise ValueError("no subjectPublicKeyInfo")
    algorithm, bits = _der_items(cert, fields[5][1], fields[5][2])[:2]
    _check_rsa(cert, algorithm)
    if bits[0] != BIT_STRING or bits[1] >= bits[2] or cert[bits[1]] != 0:
        raise ValueError("bad subjectPublicKey")
    n, e = _der_items(cert, *_der_content(cert, bits[1] + 1, bits[2], SEQUENCE))[:2]
    return _der_int(cert, n), _der_int(cert, e)


def _rsa_private_key(kind: str, key: bytes) -> tuple[int, int, int, int]:
    """(modulus, public exponent, prime 1, prime 2) of a PKCS#1 ('RSA PRIVATE KEY') or
    unencrypted PKCS#8 ('PRIVATE KEY') RSA key."""
    items = _der_items(key, *_der_content(key, 0, len(key), SEQUENCE))
    if kind == "PRIVATE KEY":  # version, algorithm, OCTET STRING holding the PKCS#1 key
        if len(items) < 3 or items[2][0] != OCTET_STRING:
            raise ValueError("not a PKCS#8 key")
        _check_rsa(key, items[1])
        items = _der_items(key, *_der_content(key, items[2][1], items[2][2], SEQUENCE))
    # version, modulus, publicExponent, privateExponent, prime1, prime2, ...
    if len(items) < 6:
        raise ValueError("not an RSA key")
    n, e, _, p, q = (_der_int(key, item) for item in items[1:6])
    return n, e, p, q


def _check_rsa(der: bytes, algorithm: tuple[int, int, int]) -> None:
    oid = _der_items(der, algorithm[1], algorithm[2])[:1] if algorithm[0] == SEQUENCE else []
    if not oid or oid[0][0] != OBJECT_ID or der[oid[0][1]:oid[0][2]] != RSA_ENCRYPTION:
        raise ValueError("not an RSA key")


def _der_content(der: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    """Where the content of the single `tag` element that fills der[pos:end] is."""
    found, start, stop = _der_element(der, pos, end)
    if found != tag or stop != end:
        raise ValueError(f"expected DER tag {tag:#x}")
    return start, stop


def _der_items(der: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element in der[pos:end]."""
    items = []
    while pos < end:
        items.append(_der_element(der, pos, end))
        pos = items[-1][2]
    return items


def _der_element(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    if pos + 2 > end or der[pos] & 0x1F == 0x1F:  # no multi-byte tags in these structures
        raise ValueError("truncated DER")
    tag, length, pos = der[pos], der[pos + 1], pos + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 3 or pos + size > end:
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(der[pos:pos + size], "big"), pos + size
    if pos + length > end:
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _der_int(der: bytes, item: tuple[int, int, int]) -> int:
    if item[0] != INTEGER or item[1] == item[2]:
        raise ValueError("expected an INTEGER")
    return int.from_bytes(der[item[1]:item[2]], "big", signed=True)


def read_history(cfg: Config, job: str | None = None, user: str | None = None) -> list[dict]:
    """The trail's events, oldest first (the rotated file `audit.jsonl.1` included), optionally
    of one job (ID or ID.TASK) or one owner."""
    events = []
    for path in (audit_path(cfg).with_name(f"{AUDIT_FILE}.1"), audit_path(cfg)):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a full disk: skip it, keep the rest
                continue
            label = str(entry.get("job", ""))
            if job and label != job and label.split(".")[0] != job:
                continue
            if user and entry.get("owner") != user:
                continue
            events.append(entry)
    return events


def vm_starts(cfg: Config) -> dict[str, dict]:
    """Job label -> its last `start` event that started a VM (slot, image, spare, phases,
    prolog seconds): what benchmarks and tests read of a job's start."""
    return {e["job"]: e for e in read_history(cfg)
            if e["event"] == "start" and e.get("mode") == "vm"}
