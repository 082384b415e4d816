"""Who may write what: the Kafka ACLs of one deployment, for its three kinds of principal.

On a cluster without ACLs any client can write a 'blocked' notice for another tenant, a heartbeat
that keeps a partition from going stale, a totals record that freezes a tenant after the next
restart, or a limit. With these ACLs (and ``allow.everyone.if.no.acl.found=false``) the broker
refuses each of them: only aggregators write notices, totals and dead letters, only operators
write limits, and agents write nothing but usage.

Every operation below was found by reading the clients' code and confirmed against a broker with
the standard authorizer (tests/integration/test_acls.py). Why some choices:

- Topic ACLs that grant READ or WRITE are LITERAL, on the exact topic name: a PREFIXED pattern on
  ``<prefix>usage`` would also match ``<prefix>usage.dlq``, and let agents write dead letters.
  DESCRIBE, DESCRIBE_CONFIGS and CREATE, which every topic of the deployment needs alike, are
  PREFIXED on the deployment's prefix.
- The aggregator's consumer group is LITERAL: agents use no group (the notices feed assigns
  partitions itself), and only aggregators and operators (for ``replay``) may use the group.
- An operation another one implies is not granted again: READ, WRITE and ALTER imply DESCRIBE.
- No IDEMPOTENT_WRITE on the cluster: since Kafka 3.0 (KIP-679) WRITE on a topic lets an
  idempotent producer start; a cluster older than that needs ``IDEMPOTENT_WRITE`` on the cluster
  for agents and aggregators.

``--apply`` speaks Kafka's CreateAcls and DescribeAcls requests through aiokafka's protocol
classes, since aiokafka's admin client has no ACL methods.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass
from typing import Literal

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import CreateAclsRequest_v1, DescribeAclsRequest_v1
from aiokafka.protocol.api import Request

from aggregator.errors import AggregatorError
from schemas.topics import TopicLayout
from transport.connection import KafkaConnection

Operation = Literal["READ", "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS"]
ResourceType = Literal["TOPIC", "GROUP"]
Pattern = Literal["LITERAL", "PREFIXED"]

# Kafka's wire codes (org.apache.kafka.common.acl / resource enums).
_OPERATIONS = {"READ": 3, "WRITE": 4, "CREATE": 5, "DESCRIBE": 8, "DESCRIBE_CONFIGS": 10}
_RESOURCES = {"TOPIC": 2, "GROUP": 3}
_PATTERNS = {"LITERAL": 3, "PREFIXED": 4}
_ANY = 1
_ALLOW = 3


class AclError(AggregatorError):
    """The ACLs could not be computed (a bad principal) or were not in force in time. (A broker
    that refuses to create them raises its own error: ``ClusterAuthorizationFailedError`` and the like.)"""


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW rule, from any host."""

    principal: str
    resource_type: ResourceType
    resource_name: str
    pattern: Pattern
    operation: Operation
    why: str = ""

    @property
    def rule(self) -> tuple[str, str, str, str, str]:
        """What the broker stores (without the reason)."""
        return (self.principal, self.resource_type, self.resource_name, self.pattern, self.operation)


@dataclass(frozen=True)
class Principals:
    """``User:<name>`` of each kind of client; one principal may play several parts."""

    agent: str
    aggregator: str
    operator: str

    def __post_init__(self) -> None:
        for part, principal in (("agent", self.agent), ("aggregator", self.aggregator), ("operator", self.operator)):
            kind, _, name = principal.partition(":")
            if not kind or not name or not principal.isprintable() or any(c.isspace() for c in principal):
                raise AclError(f"the {part} principal must look like User:<name>, got {principal!r}")


def deployment_acls(layout: TopicLayout, principals: Principals, group_id: str) -> list[Acl]:
    """Every ACL the deployment with topic prefix ``layout.prefix`` and aggregator group ``group_id`` needs."""
    if not layout.prefix or not group_id:
        raise AclError("a topic prefix and an aggregator group are needed")
    agent, aggregator, operator = principals.agent, principals.aggregator, principals.operator
    checks = "start() and topics create/check: partitions and cleanup policy of all six topics"
    rules: list[tuple[str, ResourceType, str, Pattern, tuple[Operation, ...], str]] = [
        (agent, "TOPIC", layout.usage, "LITERAL", ("WRITE",), "the publisher: one event per call"),
        (agent, "TOPIC", layout.notices, "LITERAL", ("READ",), "the notices feed: every partition, no group"),
        (agent, "TOPIC", layout.limits, "LITERAL", ("READ",), "the middleware follows the limits (DESIGN 10)"),
        (agent, "TOPIC", layout.prefix, "PREFIXED", ("DESCRIBE", "DESCRIBE_CONFIGS"), checks),
        (aggregator, "TOPIC", layout.usage, "LITERAL", ("READ",), "consumes usage; rebuilds its dedup window"),
        (aggregator, "TOPIC", layout.totals, "LITERAL", ("READ", "WRITE"), "its changelog: restore, then write"),
        (aggregator, "TOPIC", layout.notices, "LITERAL", ("READ", "WRITE"),
         "notices and heartbeats; reads them to correct contradicting ones"),
        (aggregator, "TOPIC", layout.limits, "LITERAL", ("READ",), "the limits feed"),
        (aggregator, "TOPIC", layout.dead_letters, "LITERAL", ("WRITE",), "dead letters"),
        (aggregator, "TOPIC", layout.sealed, "LITERAL", ("WRITE",), "sealed totals and adjustments of closed periods"),
        # DESCRIBE is implied by its READ or WRITE on each of its topics.
        (aggregator, "TOPIC", layout.prefix, "PREFIXED", ("DESCRIBE_CONFIGS",), checks),
        (aggregator, "GROUP", group_id, "LITERAL", ("READ",), "joins the group, commits, reads its offsets"),
        (operator, "TOPIC", layout.prefix, "PREFIXED", ("CREATE", "DESCRIBE", "DESCRIBE_CONFIGS"),
         "tokenguard topics create (and check), usage show, verify, replay"),
        (operator, "TOPIC", layout.limits, "LITERAL", ("READ", "WRITE"), "tokenguard limits set/get/list/delete"),
        (operator, "TOPIC", layout.usage, "LITERAL", ("READ",), "tokenguard verify and replay"),
        (operator, "TOPIC", layout.totals, "LITERAL", ("READ", "WRITE"),
         "usage show and verify; replay writes the rebuilt totals"),
        (operator, "TOPIC", layout.dead_letters, "LITERAL", ("READ",), "reading dead letters"),
        (operator, "TOPIC", layout.sealed, "LITERAL", ("READ",), "verify and replay; billing reads closed periods"),
        # READ implies DESCRIBE: verify reads the group's offsets, replay checks it has no members.
        (operator, "GROUP", group_id, "LITERAL", ("READ",), "replay commits the group at the rebuilt end"),
    ]
    acls: dict[tuple[str, str, str, str, str], Acl] = {}
    for principal, resource_type, name, pattern, operations, why in rules:
        for operation in operations:
            acl = Acl(principal, resource_type, name, pattern, operation, why)
            acls.setdefault(acl.rule, acl)
    return list(acls.values())


def kafka_acls_commands(acls: list[Acl], bootstrap_servers: str) -> list[str]:
    """The ACLs as ``kafka-acls.sh`` command lines, one per principal, resource and pattern."""
    grouped: dict[tuple[str, str, str, str], list[Acl]] = {}
    for acl in acls:
        grouped.setdefault((acl.principal, acl.resource_type, acl.resource_name, acl.pattern), []).append(acl)
    lines = []
    for (principal, resource_type, name, pattern), members in grouped.items():
        words = ["kafka-acls.sh", "--bootstrap-server", bootstrap_servers, "--add", "--allow-principal", principal]
        for acl in members:
            words += ["--operation", _camel(acl.operation)]
        words += [f"--{resource_type.lower()}", name, "--resource-pattern-type", pattern.lower()]
        lines.append(shlex.join(words))
    return lines


def _camel(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))


async def apply_acls(connection: KafkaConnection, acls: list[Acl], *, timeout_s: float = 30.0) -> None:
    """Create the ACLs (as a principal allowed to alter them), then wait until the broker enforces them.

    Creating an ACL that exists is a no-op, so this can run again after a partial failure.
    """
    client = AIOKafkaClient(**connection.client_kwargs(), client_id="tokenguard-acls")
    try:
        async with asyncio.timeout(timeout_s):
            await client.bootstrap()
            node = client.get_random_node()
            response = await client.send(node, _CreateAcls(acls))
            for acl, (code, message) in zip(acls, response.creation_responses, strict=True):
                if code != 0:  # the broker's own error (not authorized, security disabled), named
                    raise for_code(code)(f"creating ACL {acl.principal} {acl.operation} {acl.resource_type} "
                                         f"{acl.resource_name!r}: {message or 'refused'}")
            # The broker answers once the controller has the ACLs; it enforces them once its own
            # metadata has them, which DescribeAcls (answered from the broker's authorizer) shows.
            wanted = {acl.rule for acl in acls}
            while not wanted <= await _described(client, node):  # noqa: ASYNC110 - polls the broker
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AclError(f"the ACLs were not all in force within {timeout_s:.0f}s") from None
    finally:
        await client.close()


async def describe_acls(connection: KafkaConnection) -> set[tuple[str, str, str, str, str]]:
    """Every ALLOW rule the broker enforces on topics and groups, as ``Acl.rule`` tuples."""
    client = AIOKafkaClient(**connection.client_kwargs(), client_id="tokenguard-acls")
    try:
        await client.bootstrap()
        return await _described(client, client.get_random_node())
    finally:
        await client.close()


async def _described(client: AIOKafkaClient, node: int) -> set[tuple[str, str, str, str, str]]:
    response = await client.send(node, _DescribeAcls())
    if response.error_code != 0:
        raise for_code(response.error_code)(f"describing ACLs: {response.error_message or 'refused'}")
    names = {code: name for name, code in _OPERATIONS.items()}
    resources = {code: name for name, code in _RESOURCES.items()}
    patterns = {code: name for name, code in _PATTERNS.items()}
    found = set()
    for resource_type, resource_name, pattern, entries in response.resources:
        for principal, _host, operation, permission in entries:
            if permission == _ALLOW and operation in names and resource_type in resources and pattern in patterns:
                found.add((principal, resources[resource_type], resource_name, patterns[pattern], names[operation]))
    return found


class _CreateAcls(Request[CreateAclsRequest_v1]):
    """CreateAcls v1 with many creations (aiokafka's own sends one); v1 has resource patterns and
    is answered by Kafka 2.0 to 4.x."""

    API_KEY = 30

    def __init__(self, acls: list[Acl]) -> None:
        self._creations = [
            (_RESOURCES[a.resource_type], a.resource_name, _PATTERNS[a.pattern], a.principal, "*",
             _OPERATIONS[a.operation], _ALLOW)
            for a in acls
        ]

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class(self._creations)


class _DescribeAcls(Request[DescribeAclsRequest_v1]):
    """DescribeAcls v1, every ACL (aiokafka's own class would pick a v2 it encodes as v1)."""

    API_KEY = 29

    def build(self, request_struct_class: type[DescribeAclsRequest_v1]) -> DescribeAclsRequest_v1:
        return request_struct_class(_ANY, None, _ANY, None, None, _ANY, _ANY)
