"""Every served token reads every token, itself included, from the stored codes, so however vLLM schedules
a request it computes what the request computes alone: a batch of different lengths whose prompts are
prefilled in chunks cut elsewhere than alone, a crowd that does not fit the pool (vLLM preempts requests,
frees their pages and recomputes them later as multi-token chunks, prompt and generated tokens together),
and prefix-cache hits after which the prompt's remaining chunks start elsewhere. paged-int4, float32,
greedy decoding, a 14-block pool of 32-token pages, 64 tokens per step, the model's matrix products one
row at a time (see the `scheduling_run` fixture). Tokens and logprobs agree exactly.
"""

from __future__ import annotations

from conftest import BLOCK, CROWD


def assert_same(alone: dict, scheduled: dict, what) -> None:
    assert scheduled["tokens"] == alone["tokens"], what
    gap = max(abs(a - b) for a, b in zip(alone["logprobs"], scheduled["logprobs"]))
    assert scheduled["logprobs"] == alone["logprobs"], (what, gap)


def test_a_batch_of_different_lengths_gives_each_request_its_own_tokens(scheduling_run):
    solo, together = scheduling_run[0], scheduling_run[1]
    assert together["preemptions"] == 0
    for i, (alone, batched) in enumerate(zip(solo["results"], together["results"])):
        assert_same(alone, batched, i)


def test_preempted_and_recomputed_requests_give_the_tokens_they_give_alone(scheduling_run):
    solo, crowd = scheduling_run[2], scheduling_run[3]
    assert solo["preemptions"] == 0 and crowd["preemptions"] > 0
    assert [len(r["tokens"]) for r in crowd["results"]] == [32] * len(CROWD)
    for i, (alone, crowded) in enumerate(zip(solo["results"], crowd["results"])):
        assert_same(alone, crowded, i)


def test_prefix_cache_hits_with_chunks_cut_elsewhere_give_the_tokens_of_the_request_alone(scheduling_run):
    """B alone is prefilled as chunks 0-64, 64-100; after A (sharing one block) as 32-96, 96-100 from a hit
    on A's page; B again as 96-100 from a hit on its own three pages."""
    prefix = scheduling_run[4]
    assert prefix["cold"]["cached"] == 0 and prefix["after_a"]["cached"] == BLOCK
    assert prefix["again"]["cached"] == 3 * BLOCK
    for run in ("after_a", "again"):
        assert_same(prefix["cold"], prefix[run], run)
