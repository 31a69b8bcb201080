"""The node's scheduler alone: no tensors, just which jobs run together and in what order."""
from potluck.node.scheduler import Job, JobKind, Scheduler


def decode(i, group="a"):
    return Job(i, JobKind.DECODE, 1, group)


def run_all(scheduler):
    """Every batch until nothing waits: [(kind, job ids, begin, end)]."""
    ran = []
    while (batch := scheduler.schedule()) is not None:
        ran.append((batch.kind.value, [j.id for j in batch.jobs], batch.begin, batch.end))
        scheduler.update(batch)
    return ran


def test_decoding_steps_waiting_together_run_as_one_batch_in_arrival_order():
    scheduler = Scheduler(max_batch=8)
    for i in range(5):
        scheduler.add(decode(i))
    assert run_all(scheduler) == [("decode", [0, 1, 2, 3, 4], 0, 1)]
    assert not scheduler.waiting


def test_a_batch_holds_at_most_max_batch_and_the_rest_go_next():
    scheduler = Scheduler(max_batch=3)
    for i in range(7):
        scheduler.add(decode(i))
    assert [ids for _, ids, _, _ in run_all(scheduler)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_only_steps_through_the_same_blocks_batch_and_no_group_starves():
    scheduler = Scheduler()
    for i, group in enumerate("abab"):
        scheduler.add(decode(i, group))
    assert [ids for _, ids, _, _ in run_all(scheduler)] == [[0, 2], [1, 3]]


def test_a_long_prefill_goes_in_chunks_and_takes_turns_with_decoding():
    scheduler = Scheduler(prefill_chunk=4)
    scheduler.add(Job(0, JobKind.PREFILL, 10, "a"))
    scheduler.add(decode(1))
    scheduler.add(decode(2))
    first = scheduler.schedule()
    assert first.kind is JobKind.DECODE and [j.id for j in first.jobs] == [1, 2]  # decoding first
    scheduler.update(first)
    chunk = scheduler.schedule()
    assert (chunk.kind, chunk.begin, chunk.end) == (JobKind.PREFILL, 0, 4) and scheduler.update(chunk) == []
    assert scheduler.in_prefill()
    scheduler.add(decode(3))  # arrives while the prefill is half done
    assert [j.id for j in scheduler.schedule().jobs] == [3]
    scheduler.update(scheduler.running)
    assert run_all(scheduler) == [("prefill", [0], 4, 8), ("prefill", [0], 8, 10)]
    assert not scheduler.in_prefill()


def test_decoding_never_starves_a_prefill_and_a_prefill_never_starves_decoding():
    scheduler = Scheduler(prefill_chunk=2)
    scheduler.add(Job(0, JobKind.PREFILL, 6, "a"))
    kinds = []
    for step in range(6):  # a session decoding without pause: a new step as soon as one ran
        scheduler.add(decode(100 + step))
        batch = scheduler.schedule()
        kinds.append(batch.kind.value)
        scheduler.update(batch)
    assert kinds == ["decode", "prefill", "decode", "prefill", "decode", "prefill"]


def forward(i, tokens, rows=1, group="a"):
    return Job(i, JobKind.FORWARD, tokens, (group, tokens), rows=rows)


def test_forwards_run_whole_and_batch_with_forwards_of_the_same_blocks_and_length():
    scheduler = Scheduler(forward_tokens=16)
    for job in [forward(0, 100), forward(1, 3), forward(2, 3, group="b"), forward(3, 3, rows=2), forward(4, 5)]:
        scheduler.add(job)
    assert run_all(scheduler) == [("forward", [0], 0, 100), ("forward", [1, 3], 0, 3), ("forward", [2], 0, 3),
                                  ("forward", [4], 0, 5)]


def test_a_forward_batch_stays_within_the_token_budget_and_max_batch():
    scheduler = Scheduler(max_batch=3, forward_tokens=8)
    for i in range(5):
        scheduler.add(forward(i, 2))
    scheduler.add(forward(5, 2, rows=4))
    assert run_all(scheduler) == [("forward", [0, 1, 2], 0, 2), ("forward", [3, 4], 0, 2), ("forward", [5], 0, 2)]


def test_forwards_and_decoding_take_turns():
    scheduler = Scheduler()
    for job in [forward(0, 4), decode(1), forward(2, 4), decode(3)]:
        scheduler.add(job)
    assert run_all(scheduler) == [("decode", [1, 3], 0, 1), ("forward", [0, 2], 0, 4)]


def test_a_failed_batch_leaves_the_queue_and_the_next_one_runs():
    scheduler = Scheduler()
    scheduler.add(decode(0))
    scheduler.add(Job(1, JobKind.PREFILL, 3, "a"))
    failed = scheduler.schedule()
    assert [j.id for j in scheduler.drop(failed)] == [0]
    assert scheduler.schedule() is not None and scheduler.schedule() is None  # one batch at a time


def test_a_sessions_jobs_run_one_at_a_time_in_arrival_order():
    scheduler = Scheduler(prefill_chunk=4)
    scheduler.add(Job(0, JobKind.PREFILL, 8, "a", session="x"))
    scheduler.add(Job(1, JobKind.DECODE, 1, "a", session="x"))  # e.g. a retried step: never beside the first
    scheduler.add(Job(2, JobKind.DECODE, 1, "a", session="y"))
    scheduler.add(Job(3, JobKind.DECODE, 1, "a", session="y"))
    assert run_all(scheduler) == [("decode", [2], 0, 1), ("prefill", [0], 0, 4), ("decode", [3], 0, 1),
                                  ("prefill", [0], 4, 8), ("decode", [1], 0, 1)]


def prompt(i, tokens, group="a", joinable=True, session=None):
    return Job(i, JobKind.PREFILL, tokens, group, session=session, joinable=joinable)


def test_short_prompts_waiting_together_run_whole_as_one_batch_within_the_budget():
    scheduler = Scheduler(max_batch=8, prefill_chunk=16)
    for job in [prompt(0, 3), prompt(1, 5), prompt(2, 2, group="b"), prompt(3, 4, joinable=False), prompt(4, 4),
                prompt(5, 2)]:
        scheduler.add(job)
    # 0, 1 and 4: 3 rows of at most 5 tokens (15 <= 16); 5 would make 4 x 5 = 20; 2 has other blocks;
    # 3 (a batch of sequences or a padding mask) runs alone
    assert run_all(scheduler) == [("prefill", [0, 1, 4], 0, 5), ("prefill", [2], 0, 2), ("prefill", [3], 0, 4),
                                  ("prefill", [5], 0, 2)]
    assert not scheduler.waiting


def test_short_prompts_behind_a_long_one_take_every_other_turn_with_its_chunks():
    scheduler = Scheduler(max_batch=2, prefill_chunk=4)
    for job in [prompt(0, 10), prompt(1, 2), prompt(2, 2), prompt(3, 1)]:
        scheduler.add(job)
    assert run_all(scheduler) == [("prefill", [0], 0, 4), ("prefill", [1, 2], 0, 2), ("prefill", [0], 4, 8),
                                  ("prefill", [3], 0, 1), ("prefill", [0], 8, 10)]
    for job in [prompt(4, 9), *(prompt(5 + i, 1) for i in range(6))]:  # more than a turn takes: no starving
        scheduler.add(job)
    assert [ids for _, ids, _, _ in run_all(scheduler)] == [[5, 6], [4], [7, 8], [4], [9, 10], [4]]


def test_a_batch_of_prompts_takes_its_turn_with_decoding_and_a_sessions_next_step_waits_for_its_prompt():
    scheduler = Scheduler()
    for job in [prompt(0, 3, session="x"), prompt(1, 4, session="y"), decode(2), Job(3, JobKind.DECODE, 1, "a",
                                                                                      session="x")]:
        scheduler.add(job)
    assert run_all(scheduler) == [("decode", [2], 0, 1), ("prefill", [0, 1], 0, 4), ("decode", [3], 0, 1)]
