"""The client's test of whether a reply answers the request it came back for (serving.client
``answers`` and ``PackedReply.from_message``); the end-to-end cases, through a proxy that answers
with an empty message, are in tests/integration/test_reply_checks.py."""

from __future__ import annotations

import numpy as np
import pytest

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.client import PackedReply, ReplyMismatch, answers


def step(session_id: str = "s1", index: int | None = 3) -> pb.StepRequest:
    r = pb.StepRequest(session_id=session_id)
    if index is not None:
        r.step_index = index
    return r


@pytest.mark.parametrize(
    ("request_", "reply", "ok"),
    [
        (step(), pb.StepResponse(session_id="s1", step_index=3), True),
        (step(), pb.StepResponse(), False),  # the empty message nginx handed a client
        (step(), pb.StepResponse(session_id="s2", step_index=3), False),
        (step(), pb.StepResponse(session_id="s1", step_index=2), False),
        (step(index=None), pb.StepResponse(session_id="s1", step_index=7), True),  # "the next one"
        (step(session_id=""), pb.StepResponse(session_id="s1", step_index=3), True),  # its stream's
        (step(session_id="", index=0), pb.StepResponse(), False),  # names no session: never a reply
    ],
)
def test_a_reply_answers_a_step_only_with_its_session_and_index(
    request_: pb.StepRequest, reply: pb.StepResponse, ok: bool
) -> None:
    assert answers(request_, reply) is ok


def packed(indexes: list[int], failed: tuple[int, ...] = ()) -> pb.PackedResults:
    r = pb.PackedResults(step_indexes=indexes, raw=np.zeros(len(indexes) * 2, "<f4").tobytes())
    for position in failed:
        r.errors.add(position=position)
    return r


def test_a_packed_reply_of_the_block_sent_is_read() -> None:
    r = PackedReply.from_message(packed([4, 0, 4], failed=(1,)), 3, 1, [4, 4, 4])
    assert r.step_indexes.tolist() == [4, 0, 4] and list(r.errors) == [1] and r.y.shape == (3, 1, 2)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (
            pb.PackedResults(),
            r"block of 3 sessions at step_indexes \[4, 4, 4\] got a reply of 0 entries",
        ),
        (packed([4, 4]), "got a reply of 2 entries at"),
        (packed([4, 5, 4]), r"got a reply of 3 entries at \[4, 5, 4\]"),
    ],
)
def test_a_packed_reply_that_is_not_the_blocks_raises_reply_mismatch(
    reply: pb.PackedResults, match: str
) -> None:
    with pytest.raises(ReplyMismatch, match=match):
        PackedReply.from_message(reply, 3, 1, [4, 4, 4])


def test_a_block_sent_without_indexes_is_checked_by_its_count_only() -> None:
    assert PackedReply.from_message(packed([9, 2]), 2, 1).step_indexes.tolist() == [9, 2]
    with pytest.raises(ReplyMismatch):
        PackedReply.from_message(pb.PackedResults(), 2, 1)
