"""Packed prefill (offline runs): prompts split into rows of `prefill_segment` tokens, charged to the
step budget in whole rows, every prompt prefilled before decoding; and the batch tool's KV cache
sized to what its rows need at once."""

import pytest

from kunjax.control.pages import PageAllocator
from kunjax.control.request import Request, SamplingParams
from kunjax.control.scheduler import Scheduler, SchedulerConfig
from kunjax.runtime.engine import OFFLINE_MIN_POOL, offline_kv_pages


def _segments(step):
    return [(r.request.request_id, r.start, r.n, r.samples) for r in step.rows]


def test_prompts_split_into_rows_charged_in_whole_rows():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, prefill_segment=8,
                                      prefill_first=True), PageAllocator(64), page_size=4, max_model_len=128)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    reqs = [Request(f"r{i}", list(range(3, 3 + n)), params) for i, n in enumerate((5, 13, 20))]
    for r in reqs:
        sched.add(r)
    step = sched.schedule()
    # 5 tokens cost a row of 8, 13 cost two: 8 tokens of the budget are left for the third prompt.
    assert step.prefill and _segments(step) == [("r0", 0, 5, True), ("r1", 0, 8, False), ("r1", 8, 5, True),
                                                ("r2", 0, 8, False)]
    sched.postprocess(step, [0] * len(step.rows), ())
    assert [r.num_computed for r in reqs] == [5, 13, 8] and [len(r.output_token_ids) for r in reqs] == [1, 1, 0]
    # prefill_first: the rest of r2 comes before any decode step, although r0 and r1 could decode.
    step = sched.schedule()
    assert step.prefill and _segments(step) == [("r2", 8, 8, False), ("r2", 16, 4, True)]
    sched.postprocess(step, [0, 0], ())
    step = sched.schedule()
    assert not step.prefill and [r.request.request_id for r in step.rows] == ["r0", "r1", "r2"]


def test_alternation_and_one_row_per_prompt_without_segments():
    """The serving default is unchanged: one row per prompt, prefill and decode alternate."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_prefill_rows=4),
                      PageAllocator(64), page_size=4, max_model_len=128)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    reqs = [Request(f"r{i}", list(range(3, 3 + n)), params) for i, n in enumerate((5, 13))]
    for r in reqs:
        sched.add(r)
    step = sched.schedule()
    assert _segments(step) == [("r0", 0, 5, True), ("r1", 0, 11, False)]
    sched.postprocess(step, [0, 0], ())
    assert not sched.schedule().prefill  # r0 decodes before r1's last chunk


def test_offline_kv_pages_holds_the_longest_runnable_at_once_in_a_shared_pool_size():
    # pages of 4 tokens: 10 -> 3, 4 -> 1, 17 -> 5, 8 -> 2; two run at once: the two longest + null page
    # (9 pages), rounded up to a power of two of at least OFFLINE_MIN_POOL
    assert offline_kv_pages([10, 4, 17, 8], max_running=2, page_size=4) == max(16, OFFLINE_MIN_POOL)
    lengths = [130] * 40  # 33 pages each
    assert offline_kv_pages(lengths, max_running=8, page_size=4) == 512  # 1 + 264 pages
    assert offline_kv_pages(lengths, max_running=15, page_size=4) == 512  # 1 + 495: the same executables
    assert offline_kv_pages(lengths, max_running=16, page_size=4) == 1024  # 1 + 528 does not fit 512
    assert offline_kv_pages([], max_running=8, page_size=4) == OFFLINE_MIN_POOL


def test_offline_rows_never_exceed_the_step_budget():
    """A token budget below the offline row length (32) used to leave every prefill unscheduled and
    LLMEngine.generate spinning for ever (tests/test_sharding.py's budget of 16)."""
    from kunjax.control.scheduler import SchedulerConfig
    from kunjax.runtime.engine import offline_scheduler_config

    assert offline_scheduler_config(SchedulerConfig(max_num_batched_tokens=16)).prefill_segment == 16
    assert offline_scheduler_config(SchedulerConfig(max_num_batched_tokens=512)).prefill_segment == 32
    with pytest.raises(ValueError, match="prefill_segment"):
        SchedulerConfig(max_num_batched_tokens=16, prefill_segment=32)
