"""VO matching, the starter's view of an SGE job, and what of the environment reaches the guest."""

from __future__ import annotations

import os

import pytest

from vmimagemanager.batch.sge_spool import read_spool_file
from vmimagemanager.batch.sge_starter import job_from_starter
from vmimagemanager.config import parse_config
from vmimagemanager.errors import VmimError
from vmimagemanager.jobs import normalise_task_id
from vmimagemanager.policy import match_vo
from vmimagemanager.runner import guest_environment
from vmimagemanager.shares import is_under


@pytest.fixture
def cfg():
    return parse_config({
        "slots": [{"name": "s1", "network": {"type": "user", "ssh_port": 2201}}],
        "vos": {"ops": {"image": "ops", "users": ["root"]},
                "bin": {"image": "bin-img", "groups": ["bin"]},
                "q": {"image": "q-img", "queues": ["special.q"]}},
    }, "/etc/x.yaml")


def test_vo_by_user_pattern_group_and_queue(cfg):
    assert match_vo(cfg, "root").name == "ops"
    assert match_vo(cfg, "bin").name == "bin"  # primary group bin
    assert match_vo(cfg, "nobody", "special.q").name == "q"
    assert match_vo(cfg, "nobody", "other.q") is None
    with pytest.raises(VmimError, match="is not a user on this host"):
        match_vo(cfg, "no-such-user-xyz")


def test_task_ids():
    assert normalise_task_id("undefined") == "0"
    assert normalise_task_id(None) == "0"
    assert normalise_task_id("3") == "3"
    with pytest.raises(VmimError):
        normalise_task_id("../1")


def test_spool_config_decides_script_or_binary(tmp_path, monkeypatch):
    (tmp_path / "config").write_text("job_owner=atlas001\nhandle_as_binary=1\n"
                                     "shell_path=/bin/csh\nweird line\n")
    assert read_spool_file(str(tmp_path))["handle_as_binary"] == "1"
    monkeypatch.chdir(tmp_path)
    env = {"JOB_ID": "12", "SGE_TASK_ID": "undefined", "USER": "atlas001",
           "SGE_JOB_SPOOL_DIR": str(tmp_path), "SGE_STARTER_SHELL_PATH": "/bin/bash"}
    job = job_from_starter(["/bin/echo", "a b"], env)
    assert (job.label, job.is_script, job.shell, list(job.argv)) == \
        ("12.0", False, "/bin/bash", ["/bin/echo", "a b"])
    (tmp_path / "config").write_text("handle_as_binary=0\n")
    assert job_from_starter(["/spool/job.sh"], env).is_script
    with pytest.raises(VmimError, match="invalid job id"):
        job_from_starter(["x"], {**env, "JOB_ID": "1; rm -rf /"})


def test_guest_environment_drops_host_plumbing_and_maps_tmpdir():
    env = {"JOB_ID": "5", "FOO": "a'b", "LD_PRELOAD": "/x.so", "SSH_AUTH_SOCK": "/s",
           "SGE_STARTER_SHELL_PATH": "/bin/sh", "PWD": "/h", "BASH_FUNC_x%%": "() { :; }",
           "TMPDIR": "/tmp/5.1.vm.q", "TMP": "/tmp/5.1.vm.q",
           "PATH": "/tmp/5.1.vm.q:/usr/bin:/bin", "VMIM_CONFIG": "/evil.yaml"}
    out = guest_environment(env, env["TMPDIR"], "/tmp/vmim-5.0")
    assert out == {"JOB_ID": "5", "FOO": "a'b", "TMPDIR": "/tmp/vmim-5.0",
                   "TMP": "/tmp/vmim-5.0", "PATH": "/tmp/vmim-5.0:/usr/bin:/bin"}


def test_shared_path_containment():
    assert is_under("/home/atlas001/job", ("/home",))
    assert is_under("/home", ("/home",))
    assert not is_under("/homework", ("/home",))
    assert not is_under("/home/../etc", ("/home",))


def test_a_script_that_sources_the_cell_settings_needs_them_in_the_guest(tmp_path):
    """GRAM-written scripts source $SGE_ROOT/$SGE_CELL/common/settings.sh; the starter checks it."""
    env = {"JOB_ID": "7", "SGE_TASK_ID": "undefined", "USER": "atlas001",
           "SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
    gram = tmp_path / "gram.sh"
    gram.write_text("#!/bin/bash\n#$ -S /bin/bash\n. /var/lib/gridengine/default/common/"
                    "settings.sh\ncd /home/atlas001\n/bin/true\n")
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\necho hello\n")
    assert job_from_starter([str(gram)], env).guest_files == (
        "/var/lib/gridengine/default/common/settings.sh",)
    assert job_from_starter([str(plain)], env).guest_files == ()
    assert job_from_starter([str(gram)], {**env, "SGE_ROOT": ""}).guest_files == ()


def test_root_hooks_trust_only_execds_spool_directory_of_the_job(tmp_path):
    """`qsub -v SGE_JOB_SPOOL_DIR=...` reaches the root hooks: only execd's own directory of
    this job, `<execd_spool_dir>/<host>/active_jobs/<job>.<task>`, is trusted. A directory of
    that name another account made (a second pool account of the same person) passed the old
    check, and its `usage` and `config` forged the job's accounting record."""
    import pwd

    from vmimagemanager.batch.sge_spool import trusted_spool_dir
    from vmimagemanager.jobs import Job

    me = pwd.getpwuid(os.getuid()).pw_name
    other = next(p.pw_name for p in pwd.getpwall() if p.pw_uid != os.getuid())
    execd = tmp_path / "execd"
    spool = execd / "node1" / "active_jobs" / "42.1"
    spool.mkdir(parents=True)
    (execd / "node1" / "active_jobs" / "42.3").mkdir()
    job = Job(job_id="42", task_id="0", owner=other)
    assert trusted_spool_dir(str(spool), job, "node1", [str(execd)]) == str(spool)
    assert trusted_spool_dir(str(spool), job, "node1.example.org", [str(execd)]) == str(spool)
    array_task = Job(job_id="42", task_id="3", owner=other)
    assert trusted_spool_dir(str(execd / "node1/active_jobs/42.3"), array_task, "node1",
                             [str(execd)]) == str(execd / "node1/active_jobs/42.3")
    refused = [
        (str(spool), Job(job_id="43", task_id="0", owner=other), "node1", [str(execd)]),
        (str(execd / "node1/active_jobs/42.3"), job, "node1", [str(execd)]),  # another task
        (str(spool), job, "node2", [str(execd)]),  # another host's
        (str(spool), job, "node1", []),  # a wrapper from before install-queue passed the dir
        (str(spool), job, "../execd/node1", [str(execd)]),
        (str(spool), Job(job_id="42", task_id="0", owner=me), "node1", [str(execd)]),  # owner's
    ]
    for args in refused:
        assert trusted_spool_dir(*args) is None, args
    # the same name below a directory that is not execd's: another account's forgery
    forged = tmp_path / "elsewhere" / "node1" / "active_jobs" / "42.1"
    forged.mkdir(parents=True)
    assert trusted_spool_dir(str(forged), job, "node1", [str(execd)]) is None
    link = tmp_path / "link"
    link.symlink_to(forged)
    assert trusted_spool_dir(str(link), job, "node1", [str(execd)]) is None


@pytest.mark.parametrize("bad", ["42\n", "4 2", "-1", "", "4" * 21])
def test_a_job_or_task_id_that_is_not_all_digits_is_refused(bad):
    """`$` matches before a final newline: ids and labels name files, so the whole string must
    match (re.fullmatch)."""
    from vmimagemanager.jobs import check_job_id

    with pytest.raises(VmimError):
        check_job_id(bad)
    if bad:
        with pytest.raises(VmimError):
            normalise_task_id(bad)


@pytest.mark.parametrize("bad", ["42.0\n", "42\n.0", "../x.0", "42", "a/b.0"])
def test_a_label_that_could_leave_its_directory_or_end_a_line_is_refused(bad):
    from vmimagemanager.jobs import check_label

    with pytest.raises(VmimError):
        check_label(bad)
