"""One usage type: ``UsageEvent`` declares the fields; ``UsageDraft`` (the wire draft) and
``CallUsage`` (what the middleware read) are generated from it, and the store's draft carries
every field to the wire. A field added to the model that the encoding would miss fails here."""

from __future__ import annotations

import dataclasses
import typing
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from producer.config import ProducerConfig
from producer.kafka_store import KafkaQuotaStore
from producer.store import CALL_FIELDS, STORE_FIELDS, STORE_OWN, CallUsage, draft_of
from schemas.errors import DecodeError
from schemas.usage import FIXED_FIELDS, USAGE_FIELDS, UsageEvent, plain_class
from schemas.wire import UsageDraft, decode_usage, encode, encode_usage

# Every field away from its default, so that losing any of them on the way shows.
RICH = UsageEvent(
    event_id="rich-event-0001", tenant_id="acme", period_key="2026-04", model="gpt-test",
    input_tokens=11, output_tokens=22, total_tokens=40, cache_creation_input_tokens=3,
    cache_read_input_tokens=4, reasoning_output_tokens=5, quota_tokens=1_000,
    event_time=datetime(2026, 4, 14, 1, 2, 3, 456789, tzinfo=UTC), streaming=True, estimated=True,
    instance_id="host-1", attributes={"region": "eu"},
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7",
)


def call_of(event: UsageEvent) -> typing.Any:
    """The ``CallUsage`` the middleware would have read for ``event``."""
    return CallUsage(**{name: getattr(event, name) for name in CALL_FIELDS})


def test_the_example_sets_every_field_the_writer_chooses() -> None:
    for name, info in UsageEvent.model_fields.items():
        if name in FIXED_FIELDS:
            continue
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            assert getattr(RICH, name) != default, (
                f"set {name} in RICH to something other than its default: "
                "a field at its default cannot show that the encoding carries it"
            )


def test_the_draft_is_the_contract_field_for_field() -> None:
    assert [field.name for field in dataclasses.fields(UsageDraft)] == list(USAGE_FIELDS)
    hints = typing.get_type_hints(UsageEvent)
    assert {field.name: field.type for field in dataclasses.fields(UsageDraft)} == hints


def test_call_usage_is_the_contract_less_what_a_store_adds() -> None:
    assert set(USAGE_FIELDS) > STORE_FIELDS
    assert set(STORE_OWN) | FIXED_FIELDS == STORE_FIELDS
    assert [field.name for field in dataclasses.fields(CallUsage)] == [n for n in USAGE_FIELDS if n not in STORE_FIELDS]
    for field in dataclasses.fields(CallUsage):
        info = UsageEvent.model_fields[field.name]
        if info.is_required():
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        else:
            assert field.default == info.default or field.default_factory is info.default_factory


def test_the_store_puts_every_field_on_the_wire(tmp_path: Path) -> None:
    store = KafkaQuotaStore(ProducerConfig(instance_id=RICH.instance_id, spool_dir=tmp_path), attributes=RICH.attributes)
    draft = store.draft(call_of(RICH))
    assert type(draft) is UsageDraft
    data = encode_usage(draft)
    assert decode_usage(data) == RICH.model_copy(update={"event_id": draft.event_id})
    assert data == encode(decode_usage(data)), "the draft's bytes are the model's own encoding"


def test_draft_of_puts_each_value_in_its_field() -> None:
    draft = draft_of(call_of(RICH), RICH.event_id, RICH.instance_id, RICH.attributes)
    assert {name: getattr(draft, name) for name in USAGE_FIELDS} == dict(RICH)


@pytest.mark.parametrize("name", sorted(set(USAGE_FIELDS) - FIXED_FIELDS))
def test_a_field_lost_on_the_wire_would_be_noticed(name: str) -> None:
    """The checks above can fail: drop any one field from the encoded draft, and the decoded
    event is refused or differs from the example."""
    data = orjson.loads(encode_usage(draft_of(call_of(RICH), RICH.event_id, RICH.instance_id, RICH.attributes)))
    del data[name]
    try:
        decoded = decode_usage(orjson.dumps(data))
    except DecodeError:
        return
    assert decoded != RICH


def test_a_field_added_to_the_contract_reaches_both_derived_forms() -> None:
    """What happens when the model grows: the generated forms follow without an edit."""

    class Grown(UsageEvent):
        cost_microdollars: int | None = None

    fields = tuple(Grown.model_fields)
    assert fields[-1] == "cost_microdollars"
    draft = plain_class("Draft", fields, module=__name__, doc="", positional=True, model=Grown)
    call = plain_class("Call", fields[2:], module=__name__, doc="", positional=False, model=Grown)
    assert [f.name for f in dataclasses.fields(draft)] == list(fields)
    assert "cost_microdollars" in {f.name for f in dataclasses.fields(call)}
    values = {name: getattr(RICH, name) for name in USAGE_FIELDS} | {"cost_microdollars": 7}
    values.pop("schema_version")
    assert Grown.model_validate_json(orjson.dumps(draft(**values), option=orjson.OPT_UTC_Z)).cost_microdollars == 7


def test_plain_class_refuses_names_the_contract_does_not_have() -> None:
    with pytest.raises(ValueError, match="not fields of UsageEvent"):
        plain_class("Nope", ("tenant_id", "tennant_id"), module=__name__, doc="", positional=False)
