"""The activity cursor: one stream id per part of the activity stream, in part order."""

from __future__ import annotations

from envelope.cursors import activity_cursor, parse_activity_cursor, parse_stream_id
from envelope.topology import ACTIVITY_PARTS


def test_an_activity_cursor_is_the_vector_of_the_parts_last_ids() -> None:
    ids = tuple(f"17000000000{p:02d}-{p}" for p in range(ACTIVITY_PARTS))
    assert parse_activity_cursor(activity_cursor(ids)) == ids
    zero = ("0-0",) * ACTIVITY_PARTS
    assert activity_cursor(zero) == ",".join(["0"] * ACTIVITY_PARTS)
    assert parse_activity_cursor(",".join(["0"] * ACTIVITY_PARTS)) == zero
    mixed = ["5", *["0"] * (ACTIVITY_PARTS - 1)]
    assert parse_activity_cursor(",".join(mixed)) == ("5-0", *zero[1:])


def test_any_other_shape_is_no_cursor() -> None:
    rest = ",0" * (ACTIVITY_PARTS - 1)
    for invalid in (
        "1700000000000-3",  # one stream id: the cursor from before the split
        ",".join(["0"] * (ACTIVITY_PARTS - 1)),
        ",".join(["0"] * (ACTIVITY_PARTS + 1)),
        f"0-{2**64}{rest}",
        f"x{rest}",
        f" 1{rest}",
        f"1-2-3{rest}",
        "",
    ):
        assert parse_activity_cursor(invalid) is None, invalid
    assert parse_activity_cursor(None) is None


def test_a_stream_id_as_redis_takes_it() -> None:
    assert parse_stream_id("0") == "0-0"
    top = f"{2**64 - 1}-{2**64 - 1}"
    assert parse_stream_id(top) == top
    for invalid in ("0-99999999999999999999", str(2**64), "1-", "-1", "1-²", ""):
        assert parse_stream_id(invalid) is None, invalid
