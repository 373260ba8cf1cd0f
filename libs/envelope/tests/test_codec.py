from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest
from envelope import codec
from envelope.codec import InvalidFrame, MalformedEnvelope, RelayedEvent, UnsupportedSchemaVersion
from envelope.models import (
    ActivityEvent,
    BoardEventEnvelope,
    BoardMessage,
    EventFrame,
    RefreshRequest,
    ResumeRequest,
    is_board_id,
)
from pydantic import ValidationError


def envelope(**changes: object) -> BoardEventEnvelope:
    fields: dict[str, object] = {
        "event_id": uuid.uuid4(),
        "correlation_id": "c-1",
        "board_id": "demo",
        "type": "note.created",
        "payload": {"text": "hi", "n": 2**63 - 1},
        "sender": "s",
        "occurred_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    fields.update(changes)
    return BoardEventEnvelope.model_validate(fields)


def test_a_board_message_is_parsed() -> None:
    frame = codec.decode_client_frame(
        b'{"type":"card.moved","payload":{"to":"done"},"id":"a:1"}', 100
    )
    assert frame == BoardMessage(type="card.moved", payload={"to": "done"}, id="a:1")


def test_a_resume_request_is_parsed() -> None:
    assert codec.decode_client_frame('{"kind":"resume","after":7}', 100) == ResumeRequest(
        kind="resume", after=7
    )


def test_a_refresh_request_is_parsed() -> None:
    assert codec.decode_client_frame('{"kind":"refresh","token":"a.b.c"}', 100) == RefreshRequest(
        kind="refresh", token="a.b.c"
    )


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ("not json", "not valid JSON"),
        ('{"kind":"refresh"}', "Field 'token'"),
        ('{"kind":"refresh","token":""}', "Field 'token'"),
        ('{"kind":"refresh","token":7}', "Field 'token'"),
        ("[1,2]", "JSON object"),
        ('{"payload":{}}', "Field 'type'"),
        ('{"type":"Bad Type","payload":{}}', "Field 'type'"),
        ('{"type":"x","payload":[]}', "Field 'payload'"),
        ('{"type":"x","payload":{},"id":"has space"}', "Field 'id'"),
        ('{"type":"' + "x" * 65 + '","payload":{}}', "Field 'type'"),
        ('{"kind":"resume","after":-1}', "Field 'after'"),
    ],
)
def test_invalid_frames_say_what_is_wrong(raw: str, where: str) -> None:
    with pytest.raises(InvalidFrame) as refused:
        codec.decode_client_frame(raw, 100)
    assert refused.value.code == "invalid_message"
    assert where in refused.value.message


def test_a_payload_over_the_limit_is_refused_with_its_own_code() -> None:
    raw = orjson.dumps({"type": "x", "payload": {"text": "y" * 200}, "id": "big"})
    with pytest.raises(InvalidFrame) as refused:
        codec.decode_client_frame(raw, 100)
    assert refused.value.code == "payload_too_large"
    assert refused.value.correlation_id == "big"


def test_numbers_beyond_64_bits_are_read_as_doubles_as_javascript_does() -> None:
    frame = codec.decode_client_frame(
        '{"type":"x","payload":{"n":123456789012345678901234567890}}', 100
    )
    assert isinstance(frame, BoardMessage) and frame.payload["n"] == 1.2345678901234568e29


def test_unknown_fields_are_ignored() -> None:
    frame = codec.decode_client_frame('{"type":"x","payload":{},"future":"field"}', 100)
    assert isinstance(frame, BoardMessage)


def test_envelope_round_trip_keeps_big_numbers() -> None:
    original = envelope()
    assert codec.decode_envelope(codec.dumps(original)) == original


@pytest.mark.parametrize("version", ["1", "1.0", "1.7"])
def test_same_major_is_accepted(version: str) -> None:
    body = orjson.loads(codec.dumps(envelope()))
    body["schema_version"] = version
    body["added_in_a_minor"] = {"x": 1}
    assert codec.decode_envelope(orjson.dumps(body)).board_id == "demo"


@pytest.mark.parametrize("version", ["2", "0", "", "2.0"])
def test_unknown_major_is_refused(version: str) -> None:
    body = orjson.loads(codec.dumps(envelope()))
    body["schema_version"] = version
    with pytest.raises(UnsupportedSchemaVersion, match="not supported"):
        codec.decode_envelope(orjson.dumps(body))


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"schema_version":"1"}'])
def test_malformed_envelopes_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedEnvelope):
        codec.decode_envelope(body)


def test_the_relay_body_with_its_sequence_is_a_valid_activity_event() -> None:
    published = datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
    body = codec.activity_body(envelope(), published)
    event = ActivityEvent.model_validate_json(codec.with_sequence(body, 42, "1700000000000"))
    assert event.sequence == 42 and event.published_at == published
    assert event.payload["n"] == 2**63 - 1


def test_the_event_frame_is_the_event_plus_kind_and_connections() -> None:
    body = codec.with_sequence(codec.activity_body(envelope(), datetime.now(UTC)), 3, "7")
    frame = EventFrame.model_validate_json(codec.event_frame(body, 5))
    assert (frame.kind, frame.active_connections, frame.sequence) == ("event", 5, 3)


def test_relay_frames_round_trip() -> None:
    relayed = RelayedEvent("1700000000000-3", "board.x_1", 9, b'{"sequence":9}')
    assert RelayedEvent.from_frame(relayed.to_frame()) == relayed


@pytest.mark.parametrize(
    "text", ["x\n", "x\r", "\nx", "x\x00", "x²", "é", "٣", "", "x" * 65, "a b", "a/b"]
)
def test_is_board_id_refuses_what_the_contract_refuses(text: str) -> None:
    # `re.match` with `$` would accept the first: a trailing newline.
    assert not is_board_id(text)
    with pytest.raises(ValidationError):  # and the worker's model refuses the same
        envelope(board_id=text)


@pytest.mark.parametrize("text", ["a", "Az09_.-", "a..b", "y" * 64])
def test_is_board_id_accepts_the_contract_alphabet(text: str) -> None:
    assert is_board_id(text)


@pytest.mark.parametrize("depth", [252, 253, 254, 255])
def test_a_payload_is_accepted_only_as_deep_as_the_envelope_can_carry_it(depth: int) -> None:
    frame = '{"type":"x","payload":' + '{"a":' * depth + "1" + "}" * depth + "}"
    if depth > codec.MAX_PAYLOAD_DEPTH:
        with pytest.raises(InvalidFrame, match="nested too deeply"):
            codec.decode_client_frame(frame, 100_000)
        return
    message = codec.decode_client_frame(frame, 100_000)
    assert isinstance(message, BoardMessage)
    codec.dumps(envelope(payload=message.payload))  # the ingress can publish what it accepted
