"""VO matching, the starter's view of an SGE job, and what of the environment reaches the guest."""

from __future__ import annotations

import pytest

from vmimagemanager.batch.sge import job_from_starter, read_spool_file
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


def test_root_hooks_trust_only_execds_spool_directory_of_the_job(tmp_path, monkeypatch):
    """`qsub -v SGE_JOB_SPOOL_DIR=...` reaches the root hooks: a directory of the job's owner,
    or of another job, is not read."""
    import os
    import pwd

    from vmimagemanager.batch.sge import trusted_spool_dir

    me = pwd.getpwuid(os.getuid()).pw_name
    other = next(p.pw_name for p in pwd.getpwall() if p.pw_uid != os.getuid())
    spool = tmp_path / "active_jobs" / "42.1"
    spool.mkdir(parents=True)
    assert trusted_spool_dir(str(spool), "42", other) == str(spool)
    assert trusted_spool_dir(str(spool), "43", other) is None  # another job's
    assert trusted_spool_dir(str(spool), "42", me) is None  # the job owner's: the user made it
    assert trusted_spool_dir(str(tmp_path), "42", other) is None  # not below active_jobs
