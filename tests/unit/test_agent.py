"""The agent's round on libvirt's test driver: what it does with the leases it holds itself.
On real VMs and the real cell: tests/cell/test_spares.py, tests/cell/test_health.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import testdriver
from vmimagemanager.agent import Agent
from vmimagemanager.domain_xml import BootSpec, DomainSpec, build_domain_xml
from vmimagemanager.leases import SPARE_JOB_ID
from vmimagemanager.states import LeaseState


def _tearing_down_spare(life, cfg) -> str:
    """A spare's lease this process holds, left tearing-down (its teardown failed), and the
    overlay it made."""
    lease, _ = life.leases.allocate(["s2"], SPARE_JOB_ID, "a1b2", "", "atlas-wn", "atlas")
    life.leases.transition("s2", LeaseState.FAILED, lease.job_label)
    life.leases.transition("s2", LeaseState.TEARING_DOWN, lease.job_label)
    (cfg.overlay_dir / f"s2.{lease.job_label}.qcow2").write_bytes(b"left")
    return lease.job_label


def test_a_lease_the_agent_holds_and_no_boot_works_on_is_finished_by_its_next_round(test_life):
    """libvirtd restarted while the agent booted a spare: the spare's cleanup failed, and its
    lease stayed tearing-down for as long as the agent lived, since reconcile leaves a lease
    whose holder is alive (seen on the demo cell, issue 31)."""
    life, cfg = test_life
    label = _tearing_down_spare(life, cfg)
    assert life.reconcile() == []  # its holder, this process, is alive
    agent = Agent(life, make_life=lambda: life)
    agent.working[1] = label  # a boot thread of the agent's is still on it
    agent.round()
    assert life.leases.get("s2").state is LeaseState.TEARING_DOWN
    agent.working.clear()  # the boot is over: nobody works on the lease any more
    actions = agent.round()
    assert any(f"release slot s2 (job {label})" in a and "works on it no more" in a
               for a in actions), actions
    assert life.leases.get("s2") is None
    assert not list(cfg.overlay_dir.iterdir())


def test_only_the_agents_own_tearing_down_leases_are_abandoned(test_life):
    life, cfg = test_life
    label = _tearing_down_spare(life, cfg)
    agent = Agent(life, make_life=lambda: life)
    leases = life.leases.all()
    assert agent.abandoned(leases) == {("s2", label)}
    other = [lease.__class__(**{**lease.__dict__, "pid": 1}) for lease in leases]
    assert agent.abandoned(other) == set()  # another live process's (init's) lease
    life.leases.transition("s2", LeaseState.FREE, label)
    job, _ = life.leases.allocate(["s1"], "77", "0", "atlas001", "atlas-wn", "atlas")
    assert agent.abandoned(life.leases.all()) == set()  # preparing: a start under way


class Answers:
    """The batch system's answers to `live_jobs`, one a round (the decision under test is the
    agent's; the real qstat and squeue: tests/cell/test_health.py)."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def live_jobs(self, cfg, job_ids):
        answer = self.answers.pop(0)
        return None if answer is None else answer & job_ids

    def take_out(self, cfg, reason):
        return []

    def put_back(self, cfg):
        return []

    def out_of_service(self, cfg):
        return {}


def _running_vm(life, cfg, job_id: str = "5", slot: str = "s1"):
    """A running lease of `job_id` in `slot` and its domain (libvirt's test driver)."""
    lease, _ = life.leases.allocate([slot], job_id, "0", "atlas001", "atlas-wn", "atlas")
    for state in (LeaseState.BOOTING, LeaseState.RUNNING):
        life.leases.transition(slot, state, lease.job_label)
    life.hv.start(build_domain_xml(DomainSpec(
        slot=cfg.slot(slot), shape=lease.shape, domain_type="test",
        overlay=cfg.overlay_dir / f"{slot}.{lease.job_label}.qcow2",
        seed=cfg.overlay_dir / f"{slot}.{lease.job_label}.seed.iso",
        console_log=cfg.state_dir / f"{slot}.log", boot=BootSpec(Path("/k"), Path("/i"), ""),
        job_label=lease.job_label, image="atlas-wn", owner="atlas001")))
    return lease


@pytest.mark.parametrize("answers, ends", [
    (({"5"}, {"5"}, {"5"}), False),  # its job is known: never
    ((set(), {"5"}, set()), False),  # missing once, then known again: the count starts anew
    ((set(), set()), True),  # two rounds in a row: torn down in the second
    ((set(), None, set()), True),  # a round it did not answer counts neither way
    ((None, None, None), False),  # it never answers: nothing is torn down on an unknown
    ((None, set()), False),
])
def test_a_running_lease_ends_when_its_job_is_unknown_two_rounds_in_a_row(tmp_path, answers,
                                                                           ends):
    life, cfg = testdriver.node_life(tmp_path, health={"gone_after": 0})
    _running_vm(life, cfg)
    agent = Agent(life, make_life=lambda: life, scheduling=Answers(*answers))
    lines = [line for _ in answers for line in agent.round()]
    assert (life.leases.get("s1") is None) is ends, lines
    assert any("the batch system has not known its job for two rounds" in line
               for line in lines) is ends
    assert life.hv.is_running("vmim-s1") is not ends


def test_two_quick_rounds_are_not_enough_nor_is_a_vm_without_a_batch_job(test_life):
    """health.gone_after (60 s): hooks poke the agent into rounds a second apart. An admin's
    `up` VM (job id admin-SLOT) or an image check's has no batch job to ask about."""
    life, cfg = test_life
    _running_vm(life, cfg)
    _running_vm(life, cfg, job_id="admin-s2", slot="s2")
    asked = []

    class Nothing(Answers):
        def live_jobs(self, cfg, job_ids):
            asked.append(job_ids)
            return set()

    agent = Agent(life, make_life=lambda: life, scheduling=Nothing())
    for _ in range(3):
        agent.round()
    assert asked == [{"5"}] * 3
    assert life.leases.get("s1") is not None and life.leases.get("s2") is not None


def test_job_names_of_any_bytes_do_not_upset_reading_qstat():
    """`qsub -N` takes bytes that are not UTF-8 and control characters; qstat -xml prints them
    as they are (gridengine escapes only & < > ' ")."""
    from vmimagemanager.batch.service import job_numbers

    xml = (b"<?xml version='1.0'?>\n<job_info><queue_info><job_list state=\"running\">"
           b"<JB_job_number>41</JB_job_number><JB_name>a\xff\x01b&amp;%lt;x</JB_name>"
           b"</job_list></queue_info><job_info><job_list state=\"pending\">"
           b"<JB_job_number>42</JB_job_number></job_list></job_info></job_info>")
    assert job_numbers(xml) == {"41", "42"}
    assert job_numbers(b"<job_info><JB_job_number>7") is None  # cut short: unknown
    assert job_numbers(b"<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/shadow'>]><x>&e;</x>") \
        in (None, set())
