"""The batch engine on a tiny random model (CPU): continuous batching gives every job exactly its one-by-one answer,
whatever joins or leaves the batch; seeded draws do not depend on the batch; long prompts are prefilled in chunks
without stalling running rows; cancelled, failing and waiting jobs are handled one by one."""

import threading

import pytest
import torch

from lit_adapter.adapter import AdapterConfig, AdapterLLaMA, adapter_state_dict
from lit_adapter.errors import UserError
from lit_adapter.generate.decode import GraphDecode, decode_one_token, generate
from lit_adapter.generate.engine import Engine, Job, QueueFull, Sampling, bucket_sizes
from lit_adapter.model import init_weights

CONFIG = AdapterConfig.from_name("tiny", adapter_prompt_length=4)


@pytest.fixture(scope="module")
def model() -> AdapterLLaMA:
    """A random tiny model serving three random adapters (clearly non-zero gates)."""
    torch.manual_seed(0)
    model = AdapterLLaMA(CONFIG)
    init_weights(model)
    generator = torch.Generator().manual_seed(1)
    model.register_adapters([{name: torch.randn(t.shape, generator=generator)
                              for name, t in adapter_state_dict(model).items()} for _ in range(3)])
    return model.eval()


def prompts(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=generator).tolist()
    return [torch.randint(0, CONFIG.vocab_size, (length,), generator=generator) for length in lengths]


def alone(model: AdapterLLaMA, prompt: torch.Tensor, adapter, new_tokens: int) -> list[int]:
    """The greedy answer of one prompt by itself (batch 1, the plain decoding loop)."""
    model.set_kv_cache(1, prompt.numel() + new_tokens)
    model.select_adapters([adapter])
    return list(generate(model, prompt, new_tokens, temperature=0))


@pytest.mark.parametrize("decode_fn", [decode_one_token, GraphDecode()], ids=["eager", "graph"])
def test_jobs_joining_and_leaving_get_their_one_by_one_answers(model, decode_fn):
    questions = prompts(9, seed=2)
    adapters = [0, 1, 2, None, 1, 0, None, 2, 2]
    lengths = [20, 3, 31, 12, 1, 25, 7, 16, 9]
    expected = [alone(model, p, a, n) for p, a, n in zip(questions, adapters, lengths)]
    assert len({tuple(e) for e in expected}) == len(expected)
    # 4 rows for 9 jobs, prompts prefilled 8 tokens at a time: jobs wait, join mid-flight and leave at their length
    engine = Engine(model, max_batch=4, max_seq_length=80, decode_fn=decode_fn, prefill_chunk=8, length_bucket=16)
    jobs = [Job(p, n, a) for p, a, n in zip(questions, adapters, lengths)]
    for job in jobs:
        engine.submit(job)
    engine.run_until_done()
    assert [job.tokens for job in jobs] == expected
    assert all(job.finish_reason == "length" for job in jobs)
    assert jobs[1].finished_step < jobs[0].finished_step  # the short answer leaves first


def test_a_stop_token_ends_a_job_and_is_not_part_of_its_answer(model):
    prompt = prompts(1, seed=3)[0]
    answer = alone(model, prompt, 0, 20)
    engine = Engine(model, max_batch=2, max_seq_length=64)
    job = Job(prompt, 20, 0, stop_ids=frozenset({answer[5]}))
    engine.submit(job)
    engine.run_until_done()
    assert job.tokens == answer[:answer.index(answer[5])] and job.finish_reason == "stop"


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch(model):
    question = prompts(1, seed=4)[0]
    sampling = Sampling(temperature=0.9, top_k=100, top_p=0.9, seed=11)
    engine = Engine(model, max_batch=4, max_seq_length=64)
    alone_job = Job(question, 20, 1, sampling)
    engine.submit(alone_job)
    engine.run_until_done()
    others = [Job(p, 15, a, Sampling(temperature=1.2)) for p, a in zip(prompts(3, seed=5), [0, None, 2])]
    crowded = Job(question, 20, 1, sampling)
    for job in [others[0], crowded, *others[1:]]:
        engine.submit(job)
    engine.run_until_done()
    assert crowded.tokens == alone_job.tokens
    other_seed = Job(question, 20, 1, Sampling(temperature=0.9, top_k=100, top_p=0.9, seed=12))
    engine.submit(other_seed)
    engine.run_until_done()
    assert other_seed.tokens != alone_job.tokens  # the draws are random, and the seed chooses them


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_go_on(model):
    running = Job(prompts(1, seed=6)[0], 40, 0)
    long_prompt = torch.randint(0, CONFIG.vocab_size, (100,), generator=torch.Generator().manual_seed(7))
    engine = Engine(model, max_batch=2, max_seq_length=128, prefill_chunk=16)
    engine.submit(running)
    while not running.tokens:
        engine.step()
    engine.submit(late := Job(long_prompt, 5, 2))
    counts = []
    while late.first_token_at is None:
        engine.step()
        counts.append(len(running.tokens))
    # the running row got a token at every step of the 100 / 16 = 7 steps of prefill
    assert len(counts) == 7 and counts == list(range(counts[0], counts[0] + 7))
    engine.run_until_done()
    assert late.tokens == alone(model, long_prompt, 2, 5) and running.tokens == alone(model, running.prompt, 0, 40)


def test_cancelled_failing_and_excess_jobs_end_one_by_one(model):
    engine = Engine(model, max_batch=2, max_seq_length=64, max_waiting=1)
    questions = prompts(4, seed=8)

    def explode(token: int) -> None:
        raise RuntimeError("the client's callback failed")

    healthy, failing, waiting = Job(questions[0], 12, 0), Job(questions[1], 12, 1, on_token=explode), \
        Job(questions[2], 12, None)
    for job in (healthy, failing, waiting):
        engine.submit(job)
    with pytest.raises(QueueFull):
        engine.submit(Job(questions[3], 12, 2))
    engine.step()
    engine.step()  # one prompt is prefilled per step
    assert failing.finish_reason == "error" and "callback failed" in str(failing.error)
    assert healthy.tokens and healthy.finish_reason is None  # the other job goes on
    engine.cancel(healthy)
    engine.step()
    assert healthy.finish_reason == "cancelled" and waiting in engine.slots  # the waiting job took a freed row
    engine.run_until_done()
    assert waiting.tokens == alone(model, questions[2], None, 12)
    with pytest.raises(ValueError, match="exceed the engine's 64 positions"):
        engine.submit(Job(questions[0], 64, 0))


def test_run_serves_jobs_from_other_threads_until_stopped(model):
    engine = Engine(model, max_batch=3, max_seq_length=64)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,))
    thread.start()
    done = threading.Event()
    jobs = [Job(p, 8, a, on_finish=lambda job: done.set() if all(j.finished_at for j in jobs) else None)
            for p, a in zip(prompts(5, seed=9), [0, 1, None, 2, 0])]
    for job in jobs:
        engine.submit(job)
    assert done.wait(timeout=60)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert [job.tokens for job in jobs] == [alone(model, j.prompt, j.adapter, 8) for j in jobs]


def test_bucket_sizes():
    assert bucket_sizes(1) == [1] and bucket_sizes(16) == [1, 2, 4, 8, 16] and bucket_sizes(6) == [1, 2, 4, 6]


def test_a_failing_decode_step_ends_its_rows_and_the_engine_goes_on(model):
    calls = []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device failed")
        return decode_one_token(*args)

    engine = Engine(model, max_batch=2, max_seq_length=64, decode_fn=fails_once)
    first, second = (Job(p, 10, a) for p, a in zip(prompts(2, seed=10), [0, 1]))
    engine.submit(first)
    engine.submit(second)
    engine.run_until_done()
    assert first.finish_reason == second.finish_reason == "error" and "device failed" in str(first.error)
    later = Job(first.prompt, 10, 0)
    engine.submit(later)
    engine.run_until_done()
    assert later.tokens == alone(model, first.prompt, 0, 10)


@pytest.mark.parametrize("decode_fn", [decode_one_token, GraphDecode()], ids=["eager", "graph"])
def test_an_adapter_that_makes_logits_non_finite_fails_only_its_jobs(decode_fn):
    """Prompts of 1e30 (finite, far beyond trained values) overflow attention into nan: that job ends with a one-line
    error at its first token; the job beside it in the batch gets its one-by-one answer."""
    torch.manual_seed(0)
    model = AdapterLLaMA(CONFIG)
    init_weights(model)
    normal = {name: torch.randn(t.shape) for name, t in adapter_state_dict(model).items()}
    model.register_adapters([normal, {name: torch.full_like(t, 1e30) for name, t in normal.items()}])
    model.eval()
    good_prompt, bad_prompt = prompts(2, seed=9)
    expected = alone(model, good_prompt, 0, 12)
    engine = Engine(model, max_batch=2, max_seq_length=64, decode_fn=decode_fn)
    good, bad = Job(good_prompt, 12, 0), Job(bad_prompt, 12, 1)
    engine.submit(bad)
    engine.submit(good)
    engine.run_until_done()
    assert bad.finish_reason == "error" and bad.tokens == []
    assert isinstance(bad.error, UserError) and str(bad.error).startswith("the model's next-token scores are not finite")
    assert good.tokens == expected and good.finish_reason == "length"
    with pytest.raises(UserError, match="not finite"):
        alone(model, bad_prompt, 1, 5)
