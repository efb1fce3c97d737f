"""The Grid identity of a job's proxy: recorded as verified only when the proxy file holds the key
of its first certificate and that certificate's chain verifies against the node's CA directory.

Real openssl throughout: a CA directory with hashed names, user certificates it issued, RFC 3820
proxies signed by them (openssl x509 -req, `openssl ca` for an expired one, grid-proxy-init when
installed), written as real proxy files are: proxy certificate, proxy key, user certificate.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.pki import ALICE, Pki, openssl
from vmimagemanager import audit
from vmimagemanager.audit import ProxyIdentity, proxy_identity
from vmimagemanager.config import parse_config
from vmimagemanager.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """The node's CA directory (`ca_dir`, hashed by openssl rehash) holding the CA "ca", which
    issued Alice's certificate "alice" (proxy "proxy", a proxy of it "proxy2"); a second CA
    "other", not in the directory, issued a certificate with Alice's subject ("other_alice", its
    proxy "other_proxy")."""
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.ca("ca", "/DC=org/DC=test/CN=Test CA")
    pki.ca("other", "/DC=org/DC=test/CN=Test CA")  # same name, another key: not the node's CA
    ca_dir = pki.dir / "certificates"
    ca_dir.mkdir()
    shutil.copy(pki.dir / "ca.pem", ca_dir / "ca.pem")
    openssl("rehash", str(ca_dir), cwd=pki.dir)
    assert [p for p in ca_dir.iterdir() if p.name.endswith(".0")]  # hashed names
    pki.user("alice", ALICE)
    pki.proxy("proxy", "alice")
    pki.proxy("proxy2", "proxy", f"{ALICE}/CN=1701812946", 842210604)
    pki.user("other_alice", ALICE, "other")
    pki.proxy("other_proxy", "other_alice")
    return pki


@pytest.fixture
def ca_dir(pki) -> Path:
    return pki.dir / "certificates"


def identity(path: Path, ca_dir: Path, uid: int | None = None) -> ProxyIdentity:
    return proxy_identity(str(path), os.getuid() if uid is None else uid, ca_dir)


def test_openssl_is_3_0_or_later_and_accepts_rfc3820_proxies(pki, ca_dir):
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    assert version.startswith("OpenSSL 3.")
    verified = subprocess.run(
        ["openssl", "verify", "-CApath", str(ca_dir), "-no-CAfile", "-no-CAstore",
         "-allow_proxy_certs", "-untrusted", "alice.pem", "proxy.pem"],
        cwd=pki.dir, capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    refused = subprocess.run(  # without -allow_proxy_certs a proxy is refused
        ["openssl", "verify", "-CApath", str(ca_dir), "-no-CAfile", "-no-CAstore",
         "-untrusted", "alice.pem", "proxy.pem"], cwd=pki.dir, capture_output=True, text=True)
    assert refused.returncode != 0 and "proxy certificates not allowed" in refused.stderr


def test_a_proxy_from_the_nodes_ca_is_the_verified_identity(pki, ca_dir, tmp_path):
    """Old code: returned a bare string (no verified flag), for any certificate whatever."""
    proxy = pki.proxy_file(tmp_path / "x509up_u5001", "proxy", "alice")
    assert identity(proxy, ca_dir) == ProxyIdentity(ALICE, verified=True)
    assert identity(proxy, ca_dir).audit_fields() == {"identity": ALICE}
    # a proxy of the proxy (delegated to a CE): proxy2, its key, proxy, alice
    delegated = pki.proxy_file(tmp_path / "delegated", "proxy2", "proxy", "alice")
    assert identity(delegated, ca_dir) == ProxyIdentity(ALICE, verified=True)
    # the user's own certificate and key as X509_USER_PROXY: that is Alice too
    assert identity(pki.proxy_file(tmp_path / "eec", "alice"), ca_dir).verified
    # the chain in another order, and a PKCS#1 key ("RSA PRIVATE KEY"), as older tools write
    pkcs1 = subprocess.run(["openssl", "rsa", "-traditional", "-in", "proxy2.key"],
                           cwd=pki.dir, check=True, capture_output=True, text=True).stdout
    assert "BEGIN RSA PRIVATE KEY" in pkcs1
    (tmp_path / "pkcs1").write_text(pki.pem("proxy2") + pkcs1 + pki.pem("alice")
                                    + pki.pem("proxy"))
    assert identity(tmp_path / "pkcs1", ca_dir) == ProxyIdentity(ALICE, verified=True)


@pytest.mark.skipif(shutil.which("grid-proxy-init") is None, reason="globus-proxy-utils")
def test_grid_proxy_init_proxies_verify_and_a_legacy_one_is_a_claim(pki, ca_dir, tmp_path):
    def grid_proxy_init(name: str, *flags: str) -> Path:
        out = tmp_path / name
        subprocess.run(["grid-proxy-init", "-q", "-cert", "alice.pem", "-key", "alice.key",
                        "-out", str(out), "-valid", "1:00", *flags], cwd=pki.dir, check=True,
                       capture_output=True, env={**os.environ, "X509_CERT_DIR": str(ca_dir)})
        return out

    assert identity(grid_proxy_init("rfc", "-rfc"), ca_dir) == ProxyIdentity(ALICE, True)
    assert identity(grid_proxy_init("limited", "-rfc", "-limited"), ca_dir).verified
    legacy = identity(grid_proxy_init("legacy", "-old"), ca_dir)  # CN=proxy, no proxyCertInfo
    assert (legacy.subject, legacy.verified) == (ALICE, False)
    assert "does not verify" in legacy.reason


def test_a_self_signed_certificate_is_only_a_claim(pki, ca_dir, tmp_path):
    """Old code: recorded /DC=org/CN=Somebody Else (and Alice) as the job's identity."""
    pki.self_signed("somebody", "/DC=org/CN=Somebody Else")
    forged = identity(pki.proxy_file(tmp_path / "somebody", "somebody"), ca_dir)
    assert (forged.subject, forged.verified) == ("/DC=org/CN=Somebody Else", False)
    assert "self-signed" in forged.reason
    assert forged.audit_fields() == {"identity_unverified": "/DC=org/CN=Somebody Else",
                                     "identity_problem": forged.reason}
    pki.self_signed("fake_alice", ALICE)  # Alice's very subject, and a proxy-like one
    pki.self_signed("fake_proxy", ALICE + "/CN=123456")
    for name in ("fake_alice", "fake_proxy"):
        claim = identity(pki.proxy_file(tmp_path / name, name), ca_dir)
        assert (claim.subject, claim.verified) == (ALICE, False)
        assert "identity" not in claim.audit_fields()


def test_somebodys_real_certificates_without_their_key_are_only_a_claim(pki, ca_dir, tmp_path):
    """Certificates are public (every TLS handshake shows them): only the key proves the job
    holds the credential. Old code: recorded Alice for each of these files."""
    pki.self_signed("mallory", "/DC=org/CN=Mallory")
    for leaf, chain in (("alice", ()), ("proxy", ("alice",)), ("proxy2", ("proxy", "alice"))):
        stolen = pki.proxy_file(tmp_path / leaf, leaf, *chain, key="mallory")
        claim = identity(stolen, ca_dir)
        assert (claim.subject, claim.verified) == (ALICE, False)
        assert "not its certificate's" in claim.reason
    (tmp_path / "nokey").write_text(pki.pem("proxy") + pki.pem("alice"))
    assert identity(tmp_path / "nokey", ca_dir).reason == "no private key in the proxy"
    # keys only in appearance: the certificate's modulus, but no two primes that make it
    modulus = subprocess.run(["openssl", "x509", "-noout", "-modulus", "-in", "proxy.pem"],
                             cwd=pki.dir, check=True, capture_output=True,
                             text=True).stdout.strip().removeprefix("Modulus=")
    for p, q in ((f"0x{modulus}", "1"), ("2", f"0x{int(modulus, 16) // 2:X}")):
        (tmp_path / "fake.conf").write_text(
            "asn1=SEQUENCE:key\n[key]\nversion=INTEGER:0\n"
            f"n=INTEGER:0x{modulus}\ne=INTEGER:65537\nd=INTEGER:1\np=INTEGER:{p}\n"
            f"q=INTEGER:{q}\ndp=INTEGER:1\ndq=INTEGER:1\nqinv=INTEGER:1\n")
        openssl("asn1parse", "-genconf", "fake.conf", "-noout", "-out", "fake.der",
                cwd=tmp_path)
        der = base64.encodebytes((tmp_path / "fake.der").read_bytes()).decode()
        (tmp_path / "fake").write_text(pki.pem("proxy") + "-----BEGIN RSA PRIVATE KEY-----\n"
                                       + der + "-----END RSA PRIVATE KEY-----\n"
                                       + pki.pem("alice"))
        claim = identity(tmp_path / "fake", ca_dir)
        assert (claim.subject, claim.verified) == (ALICE, False)
        assert "not its certificate's" in claim.reason
    # the proxy's key given to another certificate of the file: still not the leaf's
    (tmp_path / "swapped").write_text(pki.pem("alice") + pki.key("proxy") + pki.pem("proxy"))
    assert not identity(tmp_path / "swapped", ca_dir).verified


def test_an_expired_proxy_is_only_a_claim(pki, ca_dir, tmp_path):
    """Old code: recorded Alice."""
    pki.expired_proxy("expired", "alice")
    claim = identity(pki.proxy_file(tmp_path / "expired", "expired", "alice"), ca_dir)
    assert (claim.subject, claim.verified) == (ALICE, False)
    assert "certificate has expired" in claim.reason


def test_a_chain_to_another_ca_is_only_a_claim(pki, ca_dir, tmp_path):
    """A CA of the same name but not in the node's directory; old code: recorded Alice."""
    proxy = pki.proxy_file(tmp_path / "other", "other_proxy", "other_alice")
    claim = identity(proxy, ca_dir)
    assert (claim.subject, claim.verified) == (ALICE, False)
    assert "does not verify against" in claim.reason
    # the proxy file bringing its own CA along does not make it trusted
    with_ca = pki.proxy_file(tmp_path / "with_ca", "other_proxy", "other_alice", "other")
    assert not identity(with_ca, ca_dir).verified
    # a node without the CA directory verifies nothing, and says so
    missing = identity(pki.proxy_file(tmp_path / "good", "proxy", "alice"), tmp_path / "none")
    assert (missing.subject, missing.verified) == (ALICE, False)
    assert missing.reason == f"no CA directory {tmp_path / 'none'} on this node"


@pytest.mark.skipif(not os.path.exists("/etc/ssl/certs/ca-certificates.crt"),
                    reason="no system trust store to leave out")
def test_the_systems_web_cas_are_not_trusted(ca_dir):
    """Without -no-CAfile, openssl verify trusts /etc/ssl/certs too (any web CA's client
    certificate would verify)."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_text()
    root = bundle[bundle.index("-----BEGIN CERTIFICATE-----"):]
    root = root[:root.index("-----END CERTIFICATE-----") + 25] + "\n"
    assert subprocess.run(["openssl", "verify", "-CApath", str(ca_dir)], input=root,
                          capture_output=True, text=True).returncode == 0  # the trap
    chain, problem = audit._verify_chain(root, "", str(ca_dir))
    assert chain == [] and "self-signed" in problem


def test_root_reads_no_link_fifo_or_other_users_file_and_never_waits(pki, ca_dir, tmp_path):
    """Regression guard: the old code refused these too."""
    proxy = pki.proxy_file(tmp_path / "x509up", "proxy", "alice")
    link = tmp_path / "link"
    link.symlink_to(proxy)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    results: dict[str, ProxyIdentity] = {}

    def read_all() -> None:
        results["link"] = identity(link, ca_dir)
        results["fifo"] = identity(fifo, ca_dir)  # no writer: opening it must not wait
        results["dir"] = identity(tmp_path, ca_dir)
        results["other uid"] = identity(proxy, ca_dir, os.getuid() + 1)
        if os.geteuid() == 0:  # the file really another user's
            theirs = pki.proxy_file(tmp_path / "theirs", "proxy", "alice")
            os.chown(theirs, 54321, 54321)
            results["chowned"] = identity(theirs, ca_dir)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "proxy_identity hung"
    assert len(results) >= 4
    for what, result in results.items():
        assert (result.subject, result.verified) == ("", False), what
        assert result.reason.startswith("proxy not read"), what
        assert result.audit_fields() == {"identity_problem": result.reason}
    assert identity(proxy, ca_dir).verified  # the file itself is fine
    assert proxy_identity(None, os.getuid(), ca_dir) == ProxyIdentity()
    assert ProxyIdentity().audit_fields() == {}  # a job without a proxy: nothing to say


def test_a_malformed_proxy_is_a_reason_never_an_exception_nor_a_stall(pki, ca_dir, tmp_path):
    """Root parses the job's file: cut or damaged anywhere, it is at most a claim. 64 KiB of
    BEGIN lines without END: the old pattern took seconds of root's CPU over them."""
    good = pki.proxy_file(tmp_path / "good", "proxy", "alice").read_bytes()
    cut = tmp_path / "cut"
    for end in range(0, len(good), len(good) // 40):
        cut.write_bytes(good[:end])
        assert not identity(cut, ca_dir).verified
    key_at = good.index(b"-----BEGIN PRIVATE KEY-----") + 40
    for at in (40, 80, 200, 300, key_at, key_at + 10, key_at + 100):  # base64 bodies damaged
        cut.write_bytes(good[:at] + (b"A" if good[at:at + 1] != b"A" else b"B") + good[at + 1:])
        assert not identity(cut, ca_dir).verified, at
    cut.write_text("-----BEGIN CERTIFICATE-----" * 2400)
    started = time.monotonic()
    assert identity(cut, ca_dir).reason == "no certificate in the proxy"
    assert time.monotonic() - started < 0.5


def test_openssl_runs_with_roots_clean_environment(pki, ca_dir, tmp_path, monkeypatch):
    """The job's environment chose OPENSSL_CONF (a provider module openssl would load, here a
    missing one: openssl fails) and PATH (an `openssl` of the job's owner, which would leave a
    marker): neither reaches what root runs. Old code: ran the job's `openssl` (the marker), or
    with its real openssl failed on the configuration and recorded nothing."""
    proxy = pki.proxy_file(tmp_path / "x509up", "proxy", "alice")
    pki.self_signed("claim", "/DC=org/CN=Claimant")  # for the other openssl run: x509 -subject
    conf = tmp_path / "evil.cnf"
    conf.write_text("openssl_conf = init\n[init]\nproviders = provs\n[provs]\nevil = evil_sect\n"
                    f"[evil_sect]\nmodule = {tmp_path}/evil.so\nactivate = 1\n")
    failing = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=pki.pem("alice"),
                             capture_output=True, text=True, env={**os.environ,
                                                                  "OPENSSL_CONF": str(conf)})
    assert failing.returncode != 0  # the configuration does break openssl
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "marker"
    fake = bin_dir / "openssl"
    fake.write_text(f"#!/bin/sh\nenv > {marker}\nexec /usr/bin/openssl \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("OPENSSL_CONF", str(conf))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert identity(proxy, ca_dir) == ProxyIdentity(ALICE, verified=True)
    claim = identity(pki.proxy_file(tmp_path / "claim", "claim"), ca_dir)
    assert (claim.subject, claim.verified) == ("/DC=org/CN=Claimant", False)
    assert not marker.exists()


def test_the_identity_is_written_as_openssl_writes_it(pki, ca_dir, tmp_path):
    """Escaped characters, a multi-valued RDN, UTF-8: the verified identity is exactly what
    `openssl x509 -subject -nameopt compat` prints for the user's certificate."""
    subject = ('/DC=org/DC=test/O=Example, Inc.+OU=R\\+D/CN=J\u00f3se "Joe" <j>; x\\/y=1'
               "/CN=#2 \\\\ back")
    pki.user("tricky", subject, "ca", "-utf8")
    pki.proxy("tricky_proxy", "tricky", subject, 7, "-utf8")
    printed = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "compat",
                              "-in", "tricky.pem"], cwd=pki.dir, check=True, capture_output=True,
                             text=True).stdout.strip().removeprefix("subject=")
    assert "\\xC3\\xB3" in printed and "Example, Inc." in printed
    proxy = pki.proxy_file(tmp_path / "x509up", "tricky_proxy", "tricky")
    assert identity(proxy, ca_dir) == ProxyIdentity(printed, verified=True)


def test_grid_ca_dir_is_configurable_and_must_be_absolute(tmp_path):
    base = {"slots": [{"name": "s1", "network": {"type": "user", "ssh_port": 2201}}]}
    assert parse_config(base, "c.yaml").grid_ca_dir == Path("/etc/grid-security/certificates")
    assert audit.DEFAULT_CA_DIR == "/etc/grid-security/certificates"
    mine = parse_config({**base, "grid_ca_dir": str(tmp_path)}, "c.yaml")
    assert mine.grid_ca_dir == tmp_path
    with pytest.raises(ConfigError, match="grid_ca_dir: expected an absolute directory path"):
        parse_config({**base, "grid_ca_dir": "certificates"}, "c.yaml")


def test_the_start_event_records_only_a_verified_identity(pki, ca_dir, tmp_path):
    """flow._audit_start with the node's grid_ca_dir: a verified identity is `identity`, a
    claim only `identity_unverified` with `identity_problem`."""
    from vmimagemanager.audit import read_history
    from vmimagemanager.decision import Outcome
    from vmimagemanager.flow import start_job
    from vmimagemanager.jobs import Job

    me = pwd.getpwuid(os.getuid()).pw_name
    cfg = parse_config({
        "state_dir": str(tmp_path / "s"), "run_dir": str(tmp_path / "r"),
        "grid_ca_dir": str(ca_dir), "unmatched": "reject",
        "slots": [{"name": "s1", "network": {"type": "user", "ssh_port": 30001}}]},
        str(tmp_path / "c.yaml"))
    good = pki.proxy_file(tmp_path / "good", "proxy", "alice")
    pki.self_signed("forged", "/DC=org/CN=Somebody Else")
    forged = pki.proxy_file(tmp_path / "forged", "forged")

    def never(_cfg):
        raise AssertionError("a job of no VO boots no VM")

    for number, path in (("1", good), ("2", forged), ("3", None)):
        job = Job(job_id=number, task_id="0", owner=me, queue="q",
                  env={"X509_USER_PROXY": str(path)} if path else {})
        assert start_job(cfg, job, make_life=never).outcome is Outcome.READY
    verified, claim, none = read_history(cfg)
    assert verified["identity"] == ALICE and "identity_unverified" not in verified
    assert "identity" not in claim and claim["identity_unverified"] == "/DC=org/CN=Somebody Else"
    assert "self-signed" in claim["identity_problem"]
    assert not {"identity", "identity_unverified", "identity_problem"} & set(none)


def test_a_proxy_reached_through_a_linked_directory_is_not_read(pki, ca_dir, tmp_path):
    """No link at any level of the path, not only its last part (files.read_untrusted)."""
    real = tmp_path / "real"
    real.mkdir()
    pki.proxy_file(real / "x509up", "proxy", "alice")
    (tmp_path / "via").symlink_to(real)
    assert identity(real / "x509up", ca_dir).verified
    result = identity(tmp_path / "via" / "x509up", ca_dir)
    assert not result.verified and result.reason.startswith("proxy not read"), result
