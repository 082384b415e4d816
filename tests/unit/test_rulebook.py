"""The rule book (``schemas.rulebook``): overriding defaults, deleting, matching calls to rules, and
what each measure adds to a rule's counter (cost exactly as ``PriceTable.cost`` prices it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.policy import QuotaRule, counter_key, parse_counter_key
from schemas.prices import ModelPrice, PriceTable
from schemas.rulebook import CompiledRule, RuleBook, known_or_rest

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 3, 14, 12, tzinfo=UTC)


class Usage(NamedTuple):
    model: str | None = "gpt-4o"
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int = 0
    cache_read_input_tokens: int | None = None
    reasoning_output_tokens: int | None = None


def rule(name: str = "daily", tenant: str | None = None, limit: int = 1000, **fields: Any) -> QuotaRule:
    return QuotaRule(name=name, tenant_id=tenant, limit=limit, effective_from=fields.pop("effective_from", T0),
                     updated_at=T0, **fields)


def price(model: str, currency: str = "EUR", at: datetime = T0, **fields: int) -> ModelPrice:
    fields.setdefault("input_per_mtok", 2_500_000)
    fields.setdefault("output_per_mtok", 10_000_000)
    return ModelPrice(model=model, currency=currency, effective_from=at, updated_at=at, **fields)


def amount(r: QuotaRule, usage: Usage, prices: PriceTable | None = None, when: datetime = NOW) -> int | None:
    return CompiledRule(r).amount(usage, prices, when)


# --- overriding, deleting, governing --------------------------------------------------------


def test_tenant_rule_overrides_the_default_of_the_same_name() -> None:
    book = RuleBook()
    book.set(rule("daily", None, 100_000, window="day"))
    book.set(rule("monthly", None, 1_000_000))
    book.set(rule("daily", "bigco", 1_000_000, window="day"))
    bigco = {r.name: r.limit for r in book.for_tenant("bigco")}
    assert bigco == {"daily": 1_000_000, "monthly": 1_000_000}
    assert len(book.for_tenant("bigco")) == 2
    assert {r.name: r.limit for r in book.for_tenant("small")} == {"daily": 100_000, "monthly": 1_000_000}
    assert book.governing("bigco", "daily").limit == 1_000_000  # type: ignore[union-attr]
    assert book.governing("small", "daily").limit == 100_000  # type: ignore[union-attr]
    assert book.governing("small", "nope") is None
    assert len(book) == 3


def test_setting_a_rule_again_replaces_it() -> None:
    book = RuleBook()
    book.set(rule("daily", "acme", 10))
    book.set(rule("daily", "acme", 20))
    book.set(rule("daily", None, 30))
    book.set(rule("daily", None, 40))
    assert [r.limit for r in book.for_tenant("acme")] == [20]
    assert [r.limit for r in book.for_tenant("other")] == [40]
    assert len(book) == 2


def test_delete_tenant_rule_falls_back_to_the_default() -> None:
    book = RuleBook()
    book.set(rule("daily", None, 100))
    book.set(rule("daily", "acme", 500))
    book.set(rule("hourly", "acme", 50, window="hour"))
    book.delete("acme", "daily")
    assert {r.name: r.limit for r in book.for_tenant("acme")} == {"daily": 100, "hourly": 50}
    book.delete("acme", "hourly")
    assert "acme" not in book.per_tenant
    book.delete(None, "daily")
    assert book.for_tenant("acme") == ()
    book.delete(None, "absent")
    book.delete("nobody", "absent")
    assert len(book) == 0


def test_defaults_apply_to_every_tenant_each_its_own() -> None:
    book = RuleBook()
    book.set(rule("daily", None, 100, window="day"))
    when = NOW
    a = book.counters("a", Usage(total_tokens=5), {}, when)
    b = book.counters("b", Usage(total_tokens=7), {}, when)
    assert len(a) == 1 and a[0][1] == 5
    assert b == [(a[0][0], 7)]  # same counter key: the tenant is the other half of the key


# --- matching -------------------------------------------------------------------------------


def test_matching_by_model_attributes_and_effective_from() -> None:
    book = RuleBook()
    book.set(rule("all", "acme"))
    book.set(rule("gpt", "acme", model="gpt-4o"))
    book.set(rule("team", "acme", attributes={"team": "a", "env": "prod"}))
    book.set(rule("later", "acme", effective_from=NOW + timedelta(seconds=1)))
    ts = NOW.timestamp()

    def names(model: str | None, attributes: dict[str, str], at: float = ts) -> set[str]:
        return {r.name for r in book.matching("acme", model, attributes, at)}

    assert names("gpt-4o", {}) == {"all", "gpt"}
    assert names("gpt-4o-mini", {}) == {"all"}
    assert names(None, {}) == {"all"}  # a model selector does not match an unknown model
    assert names("x", {"team": "a", "env": "prod", "more": "1"}) == {"all", "team"}
    assert names("x", {"team": "a"}) == {"all"}
    assert names("x", {"team": "b", "env": "prod"}) == {"all"}
    assert names("x", {}, ts + 1) == {"all", "later"}  # exactly at effective_from
    assert names("x", {}, ts + 0.999) == {"all"}
    assert book.matching("nobody", "gpt-4o", {}, ts) == []


def test_counters_keys_name_rule_basis_and_window() -> None:
    book = RuleBook()
    r = rule("daily", "acme", window="day", timezone="Europe/Paris")
    book.set(r)
    found = book.counters("acme", Usage(total_tokens=42), {}, datetime(2026, 3, 28, 23, 30, tzinfo=UTC))
    assert found == [(counter_key("daily", r.basis, "2026-03-29"), 42)]
    assert parse_counter_key(found[0][0]) == ("daily", r.basis, "2026-03-29")


def test_rate_rule_counter_key() -> None:
    book = RuleBook()
    r = rule("burst", "acme", window="rate", window_seconds=60, measure="requests")
    book.set(r)
    when = datetime.fromtimestamp(1_800_000_059, UTC)
    assert book.counters("acme", Usage(total_tokens=9), {}, when) == [(counter_key("burst", r.basis, "60s@1800000000"), 1)]


# --- measures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("measure", "usage", "expected"),
    [
        ("total_tokens", Usage(input_tokens=10, output_tokens=20, total_tokens=30), 30),
        ("requests", Usage(total_tokens=30), 1),
        ("requests", Usage(total_tokens=0), 1),
        ("input_tokens", Usage(input_tokens=10, output_tokens=20, total_tokens=30), 10),
        ("output_tokens", Usage(input_tokens=10, output_tokens=20, total_tokens=30), 20),
        # the provider gave only a total: all of it may be either kind
        ("input_tokens", Usage(total_tokens=30), 30),
        ("output_tokens", Usage(total_tokens=30), 30),
        # one side known: the rest of the total
        ("input_tokens", Usage(output_tokens=12, total_tokens=30), 18),
        ("output_tokens", Usage(input_tokens=12, total_tokens=30), 18),
        ("output_tokens", Usage(input_tokens=50, total_tokens=30), 0),  # never below 0
    ],
)
def test_token_measures(measure: str, usage: Usage, expected: int) -> None:
    assert amount(rule(measure=measure), usage) == expected


@pytest.mark.parametrize(
    ("weights", "usage", "expected"),
    [
        ((1.5, 3.0), Usage(input_tokens=10, output_tokens=20, total_tokens=30), 75),
        ((0.001, 0.0), Usage(input_tokens=1, output_tokens=0, total_tokens=1), 1),  # rounded up
        ((0.5, 0.5), Usage(input_tokens=1, output_tokens=2, total_tokens=3), 2),  # 1.5 -> 2
        ((0.333, 0.0), Usage(input_tokens=3, output_tokens=0, total_tokens=3), 1),  # 0.999 -> 1
        ((0.25, 4.0), Usage(input_tokens=4, output_tokens=0, total_tokens=4), 1),
        ((1.5, 3.0), Usage(total_tokens=10), 30),  # only a total: all of it at the dearer weight
        ((1.5, 3.0), Usage(input_tokens=4, total_tokens=10), 6 + 18),
        ((0.0, 0.0), Usage(input_tokens=4, output_tokens=6, total_tokens=10), 0),
        ((1000, 1000), Usage(input_tokens=100_000_000, output_tokens=0, total_tokens=100_000_000), 100_000_000_000),
    ],
)
def test_weighted_tokens(weights: tuple[float, float], usage: Usage, expected: int) -> None:
    r = rule(measure="weighted_tokens", input_weight=weights[0], output_weight=weights[1])
    assert amount(r, usage) == expected


@settings(max_examples=200)
@given(inp=st.integers(0, 10**8), out=st.integers(0, 10**8),
       wi=st.integers(0, 1_000_000), wo=st.integers(0, 1_000_000))
def test_weighted_tokens_exact_ceiling(inp: int, out: int, wi: int, wo: int) -> None:
    r = rule(measure="weighted_tokens", input_weight=wi / 1000, output_weight=wo / 1000)
    got = amount(r, Usage(input_tokens=inp, output_tokens=out, total_tokens=inp + out))
    assert got == -(-(inp * wi + out * wo) // 1000)


def test_known_or_rest() -> None:
    assert known_or_rest(5, None, 100) == 5
    assert known_or_rest(None, 30, 100) == 70
    assert known_or_rest(None, None, 100) == 100
    assert known_or_rest(None, 130, 100) == 0


# --- cost -------------------------------------------------------------------------------------


def prices(*versions: ModelPrice) -> PriceTable:
    table = PriceTable()
    for version in versions:
        table.set(version)
    return table


def cost_rule(currency: str = "EUR", unknown: str = "default") -> QuotaRule:
    return rule("budget", measure="cost", currency=currency, unknown_model=unknown)


@pytest.mark.parametrize(
    "usage",
    [
        Usage(input_tokens=1000, output_tokens=500, total_tokens=1500),
        Usage(input_tokens=1, output_tokens=0, total_tokens=1),
        Usage(total_tokens=777),
        Usage(input_tokens=1000, output_tokens=500, total_tokens=1500, cache_read_input_tokens=400,
              reasoning_output_tokens=100),
        Usage(input_tokens=None, output_tokens=3, total_tokens=10),
    ],
)
def test_cost_is_exactly_price_table_cost(usage: Usage) -> None:
    table = prices(price("gpt-4o", cached_input_per_mtok=1_250_000, reasoning_per_mtok=20_000_000))
    expected = table.cost(usage.model, NOW, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                          total_tokens=usage.total_tokens, cached_input_tokens=usage.cache_read_input_tokens,
                          reasoning_tokens=usage.reasoning_output_tokens)
    assert expected.priced == "exact"
    assert amount(cost_rule(), usage, table) == expected.micros
    assert isinstance(expected.micros, int)


def test_cost_figures_by_hand() -> None:
    table = prices(price("gpt-4o"))
    # 1000 * 2.5 EUR/Mtok + 500 * 10 EUR/Mtok = 0.0025 + 0.005 EUR = 7500 micro-EUR
    assert amount(cost_rule(), Usage(input_tokens=1000, output_tokens=500, total_tokens=1500), table) == 7500
    # 1 input token: 2.5 micro-EUR, rounded up once
    assert amount(cost_rule(), Usage(input_tokens=1, output_tokens=0, total_tokens=1), table) == 3


def test_cost_at_the_price_in_force_when_the_call_was_made() -> None:
    table = prices(price("gpt-4o"), price("gpt-4o", at=NOW, input_per_mtok=5_000_000))
    usage = Usage(input_tokens=1000, output_tokens=0, total_tokens=1000)
    assert amount(cost_rule(), usage, table, NOW - timedelta(microseconds=1)) == 2500
    assert amount(cost_rule(), usage, table, NOW) == 5000


@pytest.mark.parametrize(
    ("table", "currency", "unknown", "expected"),
    [
        (prices(), "EUR", "default", 0),  # nothing priced: 0
        (prices(), "EUR", "refuse", None),
        (prices(price("other")), "EUR", "default", 0),
        (prices(price("other")), "EUR", "refuse", None),
        (prices(price("*")), "EUR", "default", 7500),  # priced at the default
        (prices(price("*")), "EUR", "refuse", None),  # the default is not good enough
        (prices(price("gpt-4o", "USD")), "EUR", "default", 0),  # another currency: not counted
        (prices(price("gpt-4o", "USD")), "EUR", "refuse", None),
        (prices(price("gpt-4o", "USD")), "USD", "refuse", 7500),
        (prices(price("gpt-4o"), price("*", "USD")), "EUR", "refuse", 7500),  # own price wins over the default
    ],
)
def test_cost_unpriced_default_and_currency(table: PriceTable, currency: str, unknown: str, expected: int | None) -> None:
    usage = Usage(input_tokens=1000, output_tokens=500, total_tokens=1500)
    assert amount(cost_rule(currency, unknown), usage, table) == expected


def test_cost_of_a_call_without_a_model_only_at_the_default() -> None:
    usage = Usage(model=None, input_tokens=1000, output_tokens=500, total_tokens=1500)
    assert amount(cost_rule(), usage, prices(price("gpt-4o"))) == 0
    assert amount(cost_rule(), usage, prices(price("gpt-4o"), price("*"))) == 7500


def test_cost_without_a_price_table() -> None:
    usage = Usage(input_tokens=1000, output_tokens=500, total_tokens=1500)
    assert amount(cost_rule(), usage, None) == 0
    assert amount(cost_rule(unknown="refuse"), usage, None) is None


def test_counters_count_an_unpriceable_call_as_zero() -> None:
    book = RuleBook(prices(price("gpt-4o", "USD")))
    book.set(cost_rule(unknown="refuse"))
    book.set(rule("tokens"))
    found = dict(book.counters("acme", Usage(input_tokens=10, output_tokens=5, total_tokens=15), {}, NOW))
    assert sorted(found.values()) == [0, 15]


# --- thresholds -------------------------------------------------------------------------------


def test_level_counts_thresholds_reached() -> None:
    compiled = CompiledRule(rule(limit=1000, thresholds=(0.5, 0.8, 0.9)))
    assert [compiled.level(used) for used in (0, 499, 500, 799, 800, 899, 900, 5000)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_level_reaches_a_threshold_exactly() -> None:
    assert CompiledRule(rule(limit=10, thresholds=(0.7,))).level(7) == 1
    assert CompiledRule(rule(limit=100, thresholds=(0.07,))).level(7) == 1
