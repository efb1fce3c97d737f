"""Waking the agent: a hook's poke starts its next round at once, and never blocks or fails the
hook, with or without an agent listening."""

from __future__ import annotations

import os
import time

from vmimagemanager.agentwake import listen, poke, wait, wake_path
from vmimagemanager.config import parse_config


def _cfg(tmp_path):
    return parse_config({"state_dir": str(tmp_path), "slots": [
        {"name": "w1", "network": {"type": "user", "ssh_port": 30601}}]}, "c.yaml")


def test_a_poke_wakes_the_listening_agent_at_once(tmp_path):
    cfg = _cfg(tmp_path)
    fd = listen(cfg)
    try:
        started = time.monotonic()
        assert wait(fd, 0.3) is False  # nobody poked: the whole interval
        assert time.monotonic() - started >= 0.3
        poke(cfg)
        poke(cfg)
        started = time.monotonic()
        assert wait(fd, 5) is True
        assert time.monotonic() - started < 1
        assert wait(fd, 0.1) is False  # both pokes were read: no second wake-up for them
        for _ in range(70_000):  # more pokes than the FIFO holds: the hook never blocks
            poke(cfg)
        assert wait(fd, 0) is True
    finally:
        os.close(fd)


def test_a_poke_without_an_agent_does_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    poke(cfg)  # no FIFO yet
    assert not wake_path(cfg).exists()
    os.close(listen(cfg))
    poke(cfg)  # a FIFO nobody reads (the agent stopped): no error, no block
    # something else at the path: never written to, and the agent makes its FIFO again
    wake_path(cfg).unlink()
    wake_path(cfg).write_text("")
    poke(cfg)
    assert wake_path(cfg).read_text() == ""
    fd = listen(cfg)
    try:
        poke(cfg)
        assert wait(fd, 5) is True
    finally:
        os.close(fd)
