"""Kafka ACLs for real: a broker of its own with SASL PLAIN and the standard authorizer (nothing
allowed without an ACL), the ACLs ``tokenguard acls`` prints, and the fleet run with three
principals. The totals come out right, and every forgery of a control record by an agent is
refused by the broker itself.

Real-broker test: it starts (and stops) its own broker with the local launcher, whatever
``KAFKA_BOOTSTRAP_SERVERS`` says, since it needs listeners and settings no shared broker has.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError
from pydantic import SecretStr

import localkafka
from aggregator import AggregatorConfig, AggregatorService
from aggregator.acls import Principals, apply_acls, deployment_acls, describe_acls
from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig
from schemas.limits import QuotaLimit
from schemas.notices import Heartbeat, QuotaNotice
from schemas.topics import TopicLayout
from schemas.totals import TotalsRecord
from schemas.wire import encode, heartbeat_key, limit_key, tenant_period_key
from tests.helpers import call_usage, eventually, free_port, run_python
from transport.admin import close_consumer, start_consumer
from transport.reading import read_ranges

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

USERS = {name: f"{name}-pw-{uuid.uuid4().hex[:8]}" for name in ("admin", "agent", "aggregator", "operator")}
PRINCIPALS = Principals(agent="User:agent", aggregator="User:aggregator", operator="User:operator")


def _launcher_can_run() -> bool:
    return shutil.which("java") is not None and (
        (localkafka.launcher.lib_dir() / ".complete").exists() or shutil.which("mvn") is not None
    )


@dataclass(frozen=True)
class AclBroker:
    sasl_port: int
    plaintext_port: int

    def connection(self, user: str, password: str | None = None) -> KafkaConnection:
        return KafkaConnection(
            bootstrap_servers=f"127.0.0.1:{self.sasl_port}", security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
            sasl_username=user, sasl_password=SecretStr(password or USERS[user]),
        )

    def env(self, user: str) -> dict[str, str]:
        """The environment of a ``tokenguard`` process connecting as ``user``."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{self.sasl_port}", "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": USERS[user],
        }


@pytest.fixture(scope="module")
async def acl_broker() -> AsyncIterator[AclBroker]:
    if not _launcher_can_run():
        pytest.skip("starts its own authorizing broker: needs java (and mvn once, or the cached jars)")
    sasl_port = free_port()
    listener = localkafka.SaslPlainListener(
        sasl_port, tuple(USERS.items()), authorize=True, super_users=("User:admin",)
    )
    broker = await asyncio.to_thread(localkafka.start, None, sasl=listener)
    try:
        yield AclBroker(sasl_port, broker.port)
    finally:
        await asyncio.to_thread(localkafka.stop, broker.port)


async def tokenguard(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``tokenguard <args>`` as a process with ``env``: (exit code, stdout, stderr)."""
    return await run_python("-m", "aggregator.cli", *args, env=env)


def printed_rules(out: str) -> set[tuple[str, str, str, str, str]]:
    """The ACLs the kafka-acls.sh lines say, as ``Acl.rule`` tuples."""
    rules = set()
    for line in out.splitlines():
        if not line.startswith("kafka-acls.sh"):
            continue
        words = shlex.split(line)
        principal = words[words.index("--allow-principal") + 1]
        kind = next(word for word in words if word in ("--topic", "--group"))
        name, pattern = words[words.index(kind) + 1], words[words.index("--resource-pattern-type") + 1].upper()
        for index, word in enumerate(words):
            if word == "--operation":
                operation = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(words[index + 1])).upper()
                rules.add((principal, kind[2:].upper(), name, pattern, operation))
    return rules


def deployment(prefix: str) -> tuple[TopicLayout, str]:
    return TopicLayout(prefix=prefix, partitions=2), f"{prefix}aggregators"


async def test_tokenguard_acls_applies_exactly_what_it_prints(acl_broker: AclBroker) -> None:
    layout, group = deployment(f"p{uuid.uuid4().hex[:6]}.")
    args = ("acls", "--prefix", layout.prefix, "--group", group, "--agent", PRINCIPALS.agent,
            "--aggregator", PRINCIPALS.aggregator, "--operator", PRINCIPALS.operator, "--apply")
    code, out, err = await tokenguard(acl_broker.env("operator"), *args)
    assert code == 3 and "ClusterAuthorizationFailedError" in err and err.count("\n") == 1, (
        "only a principal allowed to alter ACLs may apply them", code, out, err)
    code, out, err = await tokenguard(acl_broker.env("admin"), *args)
    assert code == 0 and "applied" in out, (code, out, err)
    printed = printed_rules(out)
    assert printed == {acl.rule for acl in deployment_acls(layout, PRINCIPALS, group)}
    in_force = {rule for rule in await describe_acls(acl_broker.connection("admin")) if layout.prefix in rule[2] or rule[2] == group}
    assert in_force == printed
    code, out, _ = await tokenguard(acl_broker.env("admin"), *args)
    assert code == 0, "applying again is a no-op"


async def refused(
    what: str, attempt: Callable[[], Awaitable[object]], error: type[Exception] = TopicAuthorizationFailedError
) -> None:
    """``attempt`` fails with the broker's authorization error (any other error fails the test too)."""
    try:
        await asyncio.wait_for(attempt(), 30)
    except error:
        return
    pytest.fail(f"the broker let {what}")


async def produce(
    connection: KafkaConnection, topic: str, key: bytes, value: bytes, partition: int | None = None, *, idempotent: bool = True
) -> None:
    """One record, from a producer like ours (idempotent: it needs WRITE on some topic to start)."""
    producer = AIOKafkaProducer(**connection.client_kwargs(), enable_idempotence=idempotent, acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def consume(connection: KafkaConnection, topic: str, group_id: str | None = None) -> None:
    consumer = AIOKafkaConsumer(**connection.client_kwargs(), group_id=group_id, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await start_consumer(consumer)
    try:
        if group_id is None:
            consumer.assign([TopicPartition(topic, 0)])
        else:
            consumer.subscribe([topic])
        await consumer.getone()
    finally:
        await close_consumer(consumer)


def forgeries(layout: TopicLayout) -> list[tuple[str, str, bytes, bytes]]:
    """(what, topic, key, value): each control record an agent must not be able to write."""
    now = datetime.now(UTC)
    notice = QuotaNotice(tenant_id="zed", period_key="2026-11", state="exceeded", used_tokens=10**9, limit_tokens=1,
                         usage_partition=0, usage_offset=2**62, aggregator_id="forger", emitted_at=now)
    return [
        ("'blocked' notice for another tenant", layout.notices, tenant_period_key("zed", "2026-11"), encode(notice)),
        ("'ok' notice that outranks every later one", layout.notices, tenant_period_key("acme", "2026-11"),
         encode(notice.model_copy(update={"tenant_id": "acme", "state": "ok", "used_tokens": 0}))),
        ("heartbeat from the far future", layout.notices, heartbeat_key(0),
         encode(Heartbeat(usage_partition=0, usage_offset=2**62, aggregator_id="forger", emitted_at=now.replace(year=9999)))),
        ("totals record that freezes a tenant", layout.totals, tenant_period_key("acme", "2026-11"),
         encode(TotalsRecord(tenant_id="acme", period_key="2026-11", used_tokens=0, event_count=0, limit_tokens=10**12,
                             state="ok", usage_partition=0, applied_offset=2**62, updated_at=now))),
        ("limit of its own", layout.limits, limit_key("acme"), encode(QuotaLimit(tenant_id="acme", limit_tokens=10**15,
                                                                                 updated_at=now))),
        ("dead letter", layout.dead_letters, b"acme", b"not usage"),
    ]


async def test_fleet_with_three_principals_counts_right_and_the_broker_refuses_each_forgery(
    acl_broker: AclBroker, tmp_path: Path
) -> None:
    layout, group = deployment(f"f{uuid.uuid4().hex[:6]}.")
    await apply_acls(acl_broker.connection("admin"), deployment_acls(layout, PRINCIPALS, group))
    flags = ("--prefix", layout.prefix, "--group", group)
    operator, agent = acl_broker.env("operator"), acl_broker.connection("agent")

    # The operator creates the topics and sets a limit. Agents carry a quota of 10**6, so what
    # blocks acme below is the operator's limit, read by the aggregator.
    for command in (("topics", "create", "--partitions", "2"), ("limits", "set", "acme", "--tokens", "1000"),
                    ("limits", "list")):
        code, out, err = await tokenguard(operator, *command, *flags)
        assert code == 0, (command, out, err)
    assert "acme: 1,000 tokens" in out

    aggregator_config = AggregatorConfig(connection=acl_broker.connection("aggregator"), topics=layout, group_id=group,
                                         aggregator_id="acl-aggregator", heartbeat_interval_s=0.2)
    producer_config = ProducerConfig(connection=agent, topics=layout, spool_dir=tmp_path / "spool", instance_id="acl-agent")
    async with KafkaQuotaStore(producer_config) as store:
        async with AggregatorService(aggregator_config) as aggregator:
            await asyncio.wait_for(aggregator.assigned.wait(), 30)
            for tenant, tokens in (("acme", 600), ("acme", 600), ("zed", 10)):
                store.record(call_usage(tenant, tokens, period="2026-11", quota=10**6))
            await produce(agent, layout.usage, b"zed", b"not an event")  # an agent may write junk usage...
            await eventually(lambda: aggregator.stats.events == 3 and aggregator.stats.dead_letters == 1, 30,
                             "usage counted and the junk dead-lettered")  # ...which the aggregator dead-letters
            await store.feed.wait_until(
                lambda s: (n := s.notice("acme", "2026-11")) is not None and n.state == "exceeded", 30)
            assert not store.check("acme", "2026-11", 10**6).allowed, "the agent reads the aggregator's notice"
            # The operator reads what an operator needs: usage, totals, the group's offsets, dead letters.
            code, out, err = await tokenguard(operator, "verify", "--wait-s", "30", *flags)
            assert code == 0 and "differences: 0" in out, (out, err)
            letters = [r.value async for batch in read_ranges(acl_broker.connection("operator"), layout.dead_letters,
                                                               {0: (None, None)}) for r in batch]
            assert letters == [b"not an event"]

            for what, topic, key, value in forgeries(layout):
                await refused(f"an agent write a {what} to {topic}", partial(produce, agent, topic, key, value, partition=0))
            # Nor may an agent read other tenants' usage or join the aggregators' group, and an
            # operator (trusted with limits) cannot speak for the aggregator either.
            await refused("an agent read the usage topic", partial(consume, agent, layout.usage))
            await refused("an agent join the aggregators' group", partial(consume, agent, layout.usage, group),
                          GroupAuthorizationFailedError)
            await refused("an operator write a notice", partial(produce, acl_broker.connection("operator"),
                                                                layout.notices, b"k", b"{}", partition=0))
            await refused("an aggregator write a limit", partial(produce, acl_broker.connection("aggregator"),
                                                                 layout.limits, limit_key("acme"), b"{}"))

        # A restarted aggregator restores its totals from the changelog, and nothing forged landed.
        async with AggregatorService(aggregator_config) as aggregator:
            await asyncio.wait_for(aggregator.assigned.wait(), 30)
            store.record(call_usage("zed", 5, period="2026-11", quota=10**6))
            await eventually(lambda: aggregator.stats.events == 1, 30, "later usage counted after the restart")
            await asyncio.sleep(0.5)
            assert store.check("zed", "2026-11", 10**6).allowed and not store.check("acme", "2026-11", 10**6).allowed

    code, out, err = await tokenguard(operator, "usage", "show", "--json", *flags)
    assert code == 0, (out, err)
    totals = {(row["tenant_id"], row["used_tokens"], row["state"]) for row in map(json.loads, out.splitlines())}
    assert totals == {("acme", 1200, "exceeded"), ("zed", 15, "ok")}
    # With the aggregators stopped, the operator may rebuild their totals and commit their group.
    code, out, err = await tokenguard(operator, "replay", *flags)
    assert code == 0 and "rebuilt 2 tenant-periods" in out, (out, err)
    code, out, err = await tokenguard(operator, "verify", "--wait-s", "10", *flags)
    assert code == 0 and "differences: 0" in out, (out, err)


async def test_anonymous_clients_and_wrong_passwords_get_nothing(acl_broker: AclBroker) -> None:
    """The launcher's PLAINTEXT listener (its readiness check) lets clients in as User:ANONYMOUS,
    which no ACL names; a wrong password does not get in at all."""
    layout, _ = deployment(f"a{uuid.uuid4().hex[:6]}.")
    anonymous = KafkaConnection(bootstrap_servers=f"127.0.0.1:{acl_broker.plaintext_port}")
    code, _, err = await tokenguard({"KAFKA_BOOTSTRAP_SERVERS": anonymous.bootstrap_servers},
                                    "topics", "create", "--prefix", layout.prefix)
    assert code == 1 and "Authorization failed" in err and err.count("\n") == 1, err
    await refused("an anonymous client write a notice",
                  partial(produce, anonymous, f"{layout.prefix}notices", b"k", b"{}", idempotent=False))
    code, _, err = await tokenguard({**acl_broker.env("agent"), "KAFKA_SASL_PASSWORD": "wrong"}, "usage", "show",
                                    "--prefix", layout.prefix, "--connect-timeout", "5")
    assert code == 3 and err.count("\n") == 1 and USERS["agent"] not in err, err
