"""Another local account on a loopback port: what any pool account may do to a VM's ssh
forward."""

from __future__ import annotations

import subprocess

SQUATTER = "atlas002"
SQUAT = ("import socket, sys, time\n"
         "s = socket.socket()\n"
         "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
         "s.listen()\n"
         "print('bound', flush=True)\n"
         "time.sleep(3600)\n")


def squat_as(user: str, port: int) -> subprocess.Popen:
    """A process of `user` listening on 127.0.0.1:port (what any local account may do)."""
    proc = subprocess.Popen(["runuser", "-u", user, "--", "python3", "-c", SQUAT, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "bound":
        proc.kill()
        raise AssertionError(f"squatter on port {port} did not bind: {proc.stderr.read()}")
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()
