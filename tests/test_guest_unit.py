"""The remote command line and the console parsing, checked with a real local shell."""

from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from vmimagemanager.guest import parse_console_host_keys, remote_command

PRINT = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))"
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=40)
names = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,10}\Z")


def run_locally(argv, env, cwd=None, stdin=b""):
    command = remote_command(argv, env, cwd, "/tmp/.vmim-unit-test.pid")
    return subprocess.run(["/bin/sh", "-c", command], input=stdin, capture_output=True)


@settings(max_examples=60, deadline=None)
@given(args=st.lists(text, max_size=4), env=st.dictionaries(names, text, max_size=4))
def test_arguments_and_environment_arrive_unchanged(args, env):
    result = run_locally([sys.executable, "-c", PRINT, *args], env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["argv"] == args
    for key, value in env.items():
        assert seen["env"][key] == value


def test_exit_status_stdin_cwd_and_signals(tmp_path):
    assert run_locally(["sh", "-c", "exit 42"], {}).returncode == 42
    assert run_locally(["sh", "-c", "kill -9 $$"], {}).returncode == 137
    r = run_locally(["sh", "-c", "kill -9 $$"], {})
    assert r.stderr == b""  # no "Killed" chatter in the job's error file
    r = run_locally(["sh", "-c", "pwd; cat"], {}, cwd=str(tmp_path), stdin=b"in\x00put")
    assert r.stdout == f"{tmp_path}\n".encode() + b"in\x00put"
    weird = tmp_path / "a 'b' $c"
    weird.mkdir()
    assert run_locally(["pwd"], {}, cwd=str(weird)).stdout.decode().strip() == str(weird)
    r = run_locally(["true"], {}, cwd=str(tmp_path / "missing"))
    assert r.returncode == 1 and b"cannot enter" in r.stderr


def test_unusable_variable_names_are_not_forwarded():
    r = run_locally(["env"], {"GOOD": "1", "BAD-NAME": "2", "A=B": "3"})
    out = r.stdout.decode()
    assert "GOOD=1" in out and "BAD-NAME" not in out


def test_host_key_block_parsing():
    console = ("booting...\r\n-----BEGIN SSH HOST KEY KEYS-----\r\n"
               "ssh-ed25519 AAAAC3Nza root@s1\r\nnoise\r\n"
               "-----END SSH HOST KEY KEYS-----\r\nssh-rsa AAAAoutside x\n")
    assert parse_console_host_keys(console) == ["ssh-ed25519 AAAAC3Nza"]
    assert parse_console_host_keys("no keys here") == []
