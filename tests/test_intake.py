"""The message intake (mailrelayd/intake.py) without SMTP: header completion, refusals, and the
promise that a commit, once started, completes and is scheduled even if the caller goes away."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest

from mailrelayd.config import load_config
from mailrelayd.errors import MessageRefused
from mailrelayd.intake import Intake, Origin
from mailrelayd.log import configure_logging
from mailrelayd.smtp.policy import Policy
from mailrelayd.spool.store import NewMessage, Spool
from mailrelayd.users import User
from tests.conftest import base_config, write_config

ALICE = User("alice", "x", ("@example.com",))


class SlowSpool(Spool):
    """A real spool whose commit waits for the test's go-ahead, so it can be caught in flight."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    def start_commit(self, msg: NewMessage):
        async def later() -> None:
            self.started.set()
            await self.go.wait()
            await Spool.start_commit(self, msg)
        return later()


@pytest.fixture
async def env(tmp_path: Path, tls_files: tuple[Path, Path]):
    cfg = load_config(write_config(tmp_path / "cfg", base_config(tls_files)))
    spool = SlowSpool(tmp_path / "spool")
    await spool.open()
    accepted: list[NewMessage] = []
    policy = Policy(cfg, cfg.listeners[1], lambda a: False)  # submission
    intake = Intake(cfg, check_headers=policy.check_headers, signer=None, spool=spool, on_accepted=accepted.append)
    yield intake, spool, accepted
    await spool.close()


def origin(user: User | None = ALICE) -> Origin:
    return Origin(listener="submission", peer_ip="192.0.2.7", helo="client.example", protocol="ESMTPSA",
                  tls="using TLSv1.3", user=user)


async def test_accept_completes_headers_and_commits(env) -> None:
    intake, spool, accepted = env
    spool.go.set()
    qid = await intake.accept(origin(), "a@example.com", ["r@example.net"], b"Subject: hi\r\n\r\nbody\r\n",
                              outbound=True)
    rec = await spool.get(qid)
    assert rec is not None and [m.queue_id for m in accepted] == [qid]
    data = await spool.body(qid)
    assert data is not None
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"Received: from client.example ([192.0.2.7])")
    assert b"with ESMTPSA id " + qid.encode() in head
    assert b"\r\nFrom: <a@example.com>" in head and b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head
    assert body == b"body\r\n"


async def test_refusal_is_message_refused_and_nothing_committed(env) -> None:
    intake, spool, accepted = env
    spool.go.set()
    with pytest.raises(MessageRefused) as ei:
        await intake.accept(origin(), "a@example.com", ["r@example.net"],
                            b"From: ceo@victim.example\r\n\r\nx\r\n", outbound=True)
    assert ei.value.reply.code == 550 and ei.value.reply.enhanced == "5.7.1"
    assert accepted == [] and not spool.started.is_set()


async def test_cancelled_caller_does_not_strand_a_commit(env) -> None:
    """The client resets while we fsync: the commit completes, is scheduled and logged."""
    intake, spool, accepted = env
    caller = asyncio.create_task(intake.accept(origin(), "a@example.com", ["r@example.net"],
                                               b"From: a@example.com\r\n\r\nx\r\n", outbound=True))
    await asyncio.wait_for(spool.started.wait(), 10)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert accepted == []
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    try:
        spool.go.set()
        await asyncio.wait_for(asyncio.gather(*intake.committing), 10)
    finally:
        configure_logging("json", "info", stream=sys.__stderr__)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(accepted) == 1
    assert await spool.get(accepted[0].queue_id) is not None
    assert any(x.get("event") == "message.accepted" and x.get("queue_id") == accepted[0].queue_id for x in lines)
    assert not intake.committing
