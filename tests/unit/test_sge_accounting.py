"""The accounting line the epilog writes: gridengine's format, as APEL's SGE parser reads it."""

from __future__ import annotations

import os
import pwd

from pytest import approx

from vmimagemanager.batch.sge_accounting import FIELDS, record_line
from vmimagemanager.files import append_line
from vmimagemanager.jobs import Job

ME = pwd.getpwuid(os.getuid()).pw_name
JOB = Job(job_id="42", task_id="3", owner=ME, queue="vm.q")
CONFIG = {"queue": "vm.q", "host": "wn1", "job_name": "a:b\nc", "account": "sge",
          "priority": "0", "submission_time": "1795690000"}
USAGE = {"start_time": "1795690010", "end_time": "1795690030", "exit_status": "3",
         "ru_wallclock": "20", "ru_utime": "0.10", "ru_stime": "0.05", "ru_maxrss": "42000"}
VM = {"cpu_seconds": 12.5, "user_seconds": 11.0, "system_seconds": 1.2, "rss_kib": 200000.0,
      "peak_rss_kib": 250000.0}


def test_one_line_of_45_fields_with_the_vm_in_cpu_and_memory():
    line = record_line(JOB, "wn1", CONFIG, USAGE, VM)
    values = line.split(":")
    assert "\n" not in line and len(values) == len(FIELDS) == 45
    assert values[4] == "a_b c"  # the user's job name can neither add a field nor a line
    # The fields APEL's SGE parser reads (apel/parsers/sge.py), by position:
    assert values[1] == "wn1" and values[3] == ME and values[5] == "42"
    assert (values[9], values[10], values[13]) == ("1795690010", "1795690030", "20")
    assert float(values[36]) == approx(0.10 + 0.05 + 12.5)  # VM CPU + the host side's
    assert float(values[42]) == approx(250000.0 * 1024)  # QEMU's peak resident memory, bytes
    assert float(values[37]) == approx(250000.0 / (1 << 20) * 20, abs=1e-5)  # GB*s
    assert values[12] == "3" and values[35] == "3" and values[34] == "1"
    assert float(values[14]) == approx(0.10 + 11.0) and float(values[15]) == approx(0.05 + 1.2)


def test_records_are_appended_whole(tmp_path):
    path = tmp_path / "accounting"
    for _ in range(3):
        append_line(path, record_line(JOB, "wn1", CONFIG, USAGE, VM), 0o640)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(len(line.split(":")) == 45 for line in lines)
    assert path.stat().st_mode & 0o777 == 0o640
