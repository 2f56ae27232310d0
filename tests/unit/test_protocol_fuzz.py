"""Property tests of the frame decoder: whatever the bytes, `decode_frame` returns a message or
raises `ProtocolError`, never anything else (one stray exception once stopped both daemons).

CI runs the short profile; for a long run by hand::

    SWARMX_FUZZ_EXAMPLES=200000 .venv/bin/pytest tests/unit/test_protocol_fuzz.py --timeout 0
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmx.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, Envelope, ProtocolError, decode_frame
from tests.support.fuzz import PROFILE, outcome

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(
            st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1), inner, max_size=6
        )
    ),
    max_leaves=40,
)
types = st.sampled_from(sorted(MESSAGE_TYPES)) | values


REASONS = {"garbage", "oversized", "version", "unknown_type", "schema"}


def _decodes_or_refuses(data: bytes) -> None:
    try:
        result: Envelope | str = decode_frame(data)
    except ProtocolError as exc:
        result = exc.reason
    if isinstance(result, str):
        assert result in REASONS
        outcome(f"refused: {result}")
    else:
        assert result.type in MESSAGE_TYPES
        outcome("decoded")


@PROFILE
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _decodes_or_refuses(data)


@PROFILE
@given(
    head=st.fixed_dictionaries(
        {"v": st.just(PROTOCOL_VERSION) | values, "type": types, "sender": values},
        optional={"seq": values, "ts": values, "body": values},
    )
)
def test_malformed_envelopes(head):
    envelope = head
    try:
        data = msgpack.packb(envelope, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    _decodes_or_refuses(data)


@PROFILE
@given(
    type_=st.sampled_from(sorted(MESSAGE_TYPES)),
    body=st.dictionaries(st.text(max_size=30), values, max_size=12),
)
def test_every_message_type_with_random_fields(type_, body):
    envelope = {
        "v": PROTOCOL_VERSION,
        "type": type_,
        "sender": "n",
        "seq": 1,
        "ts": 1.0,
        "body": body,
    }
    _decodes_or_refuses(msgpack.packb(envelope, use_bin_type=True))


@PROFILE
@given(st.data())
def test_truncated_and_flipped_valid_frames(data):
    from swarmx.protocol import encode_frame
    from tests.unit.test_protocol import SAMPLES

    frame = bytearray(encode_frame("n", 1, 1.0, data.draw(st.sampled_from(SAMPLES))))
    cut = data.draw(st.integers(0, len(frame)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(frame) - 1), st.integers(0, 255)), max_size=8)
    )
    for at, value in flips:
        frame[at] = value
    _decodes_or_refuses(bytes(frame[:cut] if data.draw(st.booleans()) else frame))


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_nesting_at_any_depth(depth):
    _decodes_or_refuses(
        b"\x86\xa1v\x01\xa4type\xa9heartbeat\xa6sender\xa1n\xa3seq\x01\xa2ts\x00\xa4body"
        + b"\x91" * depth
        + b"\x00"
    )
