"""The wire protocol's one close table, and both clients' retry policies against it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from asgi_events import protocol
from asgi_events.protocol import CLOSES, Action, ResumePoint, client_action, codes_for

ROOT = Path(__file__).resolve().parent.parent
JS_CLIENT = ROOT / "src" / "asgi_events" / "static" / "asgi-events.js"


@pytest.mark.parametrize("row", CLOSES, ids=lambda row: f"{row.code}-{row.reason or 'none'}")
def test_every_row_of_the_close_table_is_what_a_client_does(row: protocol.Close) -> None:
    assert client_action(row.code, row.reason) is row.action


def test_codes_and_reasons_not_in_the_table_give_up() -> None:
    assert client_action(1008, "Something else") is Action.GIVE_UP
    assert client_action(4999, "") is Action.GIVE_UP
    assert client_action(1011, "any reason") is Action.RETRY  # every 1011 row retries


def test_refusals_have_an_http_status_and_a_kind() -> None:
    for row in CLOSES:
        assert (row.status is None) == (row.refusal is None), row


def test_the_js_client_retries_exactly_the_table_s_retry_codes() -> None:
    source = JS_CLIENT.read_text()
    found = re.search(r"const RETRY = new Set\(\[([\d,\s]*)\]\)", source)
    assert found is not None, "the JS client's RETRY set is not where this test looks"
    js_retry = {int(code) for code in found.group(1).split(",") if code.strip()}
    assert js_retry == set(codes_for(Action.RETRY))


def test_the_js_client_refreshes_the_token_exactly_where_the_table_says() -> None:
    source = JS_CLIENT.read_text()
    found = re.search(r"const isAuth = \(code, reason\) =>(.*);", source)
    assert found is not None, "the JS client's isAuth is not where this test looks"
    body = found.group(1)
    js_codes = {int(code) for code in re.findall(r"code === (\d+)", body)}
    js_reasons = set(re.findall(r'reason === "([^"]*)"', body))
    refresh = [row for row in CLOSES if row.action is Action.REFRESH]
    assert js_codes == {row.code for row in refresh}
    # A code that also means something else (1008) is told apart by its reason.
    mixed = {row.reason for row in refresh if client_action(row.code, "") is not Action.REFRESH}
    assert js_reasons == mixed


def test_the_docs_list_every_close_the_server_sends() -> None:
    docs = (ROOT / "docs" / "protocol.md").read_text()
    for row in CLOSES:
        # An origin refusal is always an HTTP 403 in the handshake, never a close frame.
        if row.reason and row is not protocol.ORIGIN_REFUSED:
            assert re.search(rf"\| {row.code} \| `{re.escape(row.reason)}` \|", docs), row


@pytest.mark.parametrize(
    ("last_id", "last_ts", "expected"),
    [
        (None, None, None),
        ("", "", None),
        ("ab.12", None, ResumePoint("ab", "12")),
        ("a.b.0-1", "2020-01-01T00:00:00Z", ResumePoint("a.b", "0-1")),
        ("nodot", None, ResumePoint(invalid=True)),
        ("ab.", None, ResumePoint(invalid=True)),
        (None, "yesterday", ResumePoint(invalid=True)),
    ],
)
def test_a_resume_point_is_parsed_once_for_every_backend(
    last_id: str | None, last_ts: str | None, expected: ResumePoint | None
) -> None:
    assert ResumePoint.parse(last_id, last_ts) == expected


def test_a_resume_point_by_time_is_an_aware_datetime() -> None:
    point = ResumePoint.parse(None, "2020-01-01T00:00:00")
    assert point is not None and point.since is not None
    assert point.since.utcoffset() is not None


def test_the_js_client_offers_the_table_s_subprotocols_batch_first() -> None:
    source = JS_CLIENT.read_text()
    constants = dict(re.findall(r'^const (V1|BATCH|TOKEN_PREFIX) = "([^"]*)";', source, re.M))
    assert constants == {
        "V1": protocol.SUBPROTOCOL,
        "BATCH": protocol.BATCH_SUBPROTOCOL,
        "TOKEN_PREFIX": protocol.TOKEN_PROTOCOL_PREFIX,
    }
    # In the server's order of preference, and plain v1 alone with `batch: false`.
    assert protocol.SUBPROTOCOLS == (protocol.BATCH_SUBPROTOCOL, protocol.SUBPROTOCOL)
    offer = re.search(r"const protocols = this\.options\.batch === false \? (.*);", source)
    assert offer is not None, "the JS client's offer is not where this test looks"
    assert offer.group(1) == "[V1] : [BATCH, V1]"
