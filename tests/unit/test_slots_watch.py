"""`vmimagemanager slots --watch`: the live view an admin keeps open on a node."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.support import testdriver
from vmimagemanager.config import load_config
from vmimagemanager.leases import LeaseStore
from vmimagemanager.states import LeaseState


def test_the_watched_table_follows_the_slots_and_ctrl_c_ends_it_cleanly(tmp_path):
    path = testdriver.write_node_config(tmp_path / "vmimagemanager.yaml", slots=2, prefix="w",
                                        first_port=30011,
                                        vos={"atlas": {"image": "atlas", "groups": ["atlas"]}})
    cfg = load_config(str(path))
    cfg.state_dir.mkdir(parents=True)
    leases = LeaseStore(cfg.leases_db)
    leases.allocate(["w1"], "77", "0", "atlas001", "atlas", "atlas")
    watch = subprocess.Popen([sys.executable, "-m", "vmimagemanager.cli", "--config", str(path),
                              "slots", "--watch", "0.2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    leases.transition("w1", LeaseState.BOOTING, "77.0")  # another process moves the job on
    time.sleep(1.5)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    frames = [f for f in out.split("vmimagemanager slots on ") if f.strip()]
    assert len(frames) >= 4, out
    assert "(1 free, 1 preparing; every 0.2 s, Ctrl-C ends)" in frames[0], frames[0]
    assert "(1 booting, 1 free; every 0.2 s, Ctrl-C ends)" in frames[-1], frames[-1]
    row = next(line for line in frames[-1].splitlines() if line.startswith("w1 "))
    assert "booting" in row and "77.0" in row and "atlas001" in row
    assert "\033[2J" not in out  # not a terminal: frames follow each other, no clearing
