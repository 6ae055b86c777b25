"""Requests scheduled together give what each gives alone: a batch of different lengths, and a crowd
that does not fit the pool (vLLM preempts requests, frees their pages, recomputes them later, and
hands freed pages to others). paged-int4, greedy decoding, a 14-block pool of 32-token pages.
"""

from __future__ import annotations

import pytest
from conftest import CROWD


def test_a_batch_of_different_lengths_gives_each_request_its_own_tokens(scheduling_run):
    solo, together = scheduling_run[0], scheduling_run[1]
    assert together["preemptions"] == 0
    for i, (alone, batched) in enumerate(zip(solo["results"], together["results"])):
        assert batched["tokens"] == alone["tokens"], i
        assert max(abs(a - b) for a, b in zip(alone["logprobs"], batched["logprobs"])) < 1e-3, i


def test_the_crowd_is_preempted_and_every_request_completes(scheduling_run):
    solo, crowd = scheduling_run[2], scheduling_run[3]
    assert solo["preemptions"] == 0 and crowd["preemptions"] > 0
    assert [len(r["tokens"]) for r in crowd["results"]] == [32] * len(CROWD)
    exact = [i for i, (a, c) in enumerate(zip(solo["results"], crowd["results"])) if a["logprobs"] == c["logprobs"]]
    assert len(exact) >= len(CROWD) // 2, exact  # the requests never preempted compute exactly what they do alone


@pytest.mark.xfail(strict=True, reason="the serving protocol: a recomputed request re-prefills its generated tokens "
                   "as one chunk that attends to itself in full precision, where each first read its predecessors' "
                   "codes; with paged-int4 two of six requests then take another greedy path (measured)")
def test_preempted_and_recomputed_requests_give_the_tokens_they_give_alone(scheduling_run):
    solo, crowd = scheduling_run[2], scheduling_run[3]
    for i, (alone, crowded) in enumerate(zip(solo["results"], crowd["results"])):
        assert crowded["tokens"] == alone["tokens"], i
