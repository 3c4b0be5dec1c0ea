"""The server's decode queue: the prompts of every request wait in one queue, and one worker thread takes them out
in batches of up to `batch_size` rows and decodes each batch with the steered model (the models are shared, so one
batch runs at a time; requests that arrive meanwhile wait for the next one).

Rows share a batch when they share a sampling group (decode_steered takes one temperature, top_p and generator per
batch): every greedy row is in one group, sampled rows without a seed in one group per (temperature, top_p), and a
request sampled with a seed is a group of its own, decoded with its own generator in steer.py's order (longest
prompt first, batches of `batch_size`), so that its text is steer.py's for the same prompts and seed. Within a group
rows may differ in max_tokens, stop sequences, log-probs and echo.

Gathering: the clients a batch answered come back within milliseconds, and a batch started without them would
leave them queued behind it (at 8 clients: a batch of 7, then one of 1, and so on). So the worker expects as many
rows as the last batch answered plus those that waited when it ended (up to `batch_size`), and waits up to `wait_s`
for them before it starts. The first batch expects `batch_size` rows: clients that start together reach the server
some milliseconds apart, and a first batch of the first one alone put the others a batch behind it for good
(bench_server, 8 clients: batches of 1, 8, 8, 2, 5 rows). A lone client waits `wait_s` once, on its first request;
answered alone, it then never waits. The wait is a quiet time, not a deadline: each row that arrives while the
batch gathers waits `wait_s` more for the next (up to GATHER_LIMIT x `wait_s` in all), because clients come back in
a trickle whose spread grows with the machine's load (on 2 busy cores 8 clients spread over more than 20 ms, and a
fixed 20 ms window cut their batches into 2, 8, 7, 6, 1 rows).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from proxytune.integrations.steered import Completion, SteeredModel, TokenLogprobs

logger = logging.getLogger(__name__)


GREEDY = ("greedy",)  # the sampling group of every greedy row


def sampling_group(temperature: float, top_p: float, seed: int | None, request_id: Hashable) -> Hashable:
    """The group a row of a request decodes in (see the module docstring): temperature 0 is greedy."""
    if temperature == 0:
        return GREEDY
    if seed is None:
        return ("sampled", temperature, top_p)
    return ("seeded", request_id)


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """The generator steer.py samples with for --seed (steering/generation.py's generate_texts)."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class JobResult:
    """A job's continuation and, if asked for, the blend's log-probs of its tokens: those of prompt[1:] and the
    continuation with echo, else of the continuation (TokenLogprobs, teacher-forced)."""

    completion: Completion
    logprobs: TokenLogprobs | None


@dataclass(eq=False)
class Job:
    """One prompt of a request, decoded as one row: `done` is called (from the worker thread) with its JobResult,
    or with the exception that failed its batch."""

    prompt: list[int]
    max_tokens: int  # 0: nothing decoded (echo scoring alone)
    done: Callable[[JobResult | BaseException], None]
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    logprobs: int | None = None  # top tokens per position to return; None = no log-probs
    echo: bool = False
    group: Hashable = GREEDY
    generator: torch.Generator | None = None  # a seeded request's; None = the queue's

    def scoring_pair(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """(prompt, target) whose target tokens get log-probs: with echo every token but the first (nothing comes
        before it), else the continuation."""
        return (self.prompt[:1], self.prompt[1:] + tokens) if self.echo else (self.prompt, tokens)


def decode_jobs(steered: SteeredModel, jobs: list[Job], generator: torch.Generator | None = None) -> list[JobResult]:
    """Decode one batch of jobs of one sampling group together, then score the tokens of those that ask for
    log-probs in one teacher-forced pass."""
    first = jobs[0]
    completions = [Completion([], "", "length") for _ in jobs]
    decoding = [i for i, job in enumerate(jobs) if job.max_tokens > 0]
    if decoding:
        sampled = first.temperature > 0
        decoded = steered.generate(
            [jobs[i].prompt for i in decoding], max_new_tokens=[jobs[i].max_tokens for i in decoding],
            row_stops=[jobs[i].stop for i in decoding], do_sample=sampled,
            temperature=first.temperature if sampled else 1.0, top_p=first.top_p,
            generator=first.generator or generator)
        for i, completion in zip(decoding, decoded):
            completions[i] = completion
    results = [JobResult(c, None) for c in completions]
    scoring = [(i, jobs[i].scoring_pair(completions[i].tokens)) for i, job in enumerate(jobs)
               if job.logprobs is not None]
    for i, (_, target) in scoring:
        if not target:  # a one-token prompt echoed with nothing decoded: no token has a log-prob
            results[i].logprobs = TokenLogprobs([], [])
    scoring = [(i, pair) for i, pair in scoring if pair[1]]
    if scoring:
        scored = steered.token_logprobs([p for _, (p, _) in scoring], [t for _, (_, t) in scoring],
                                        top=max(jobs[i].logprobs for i, _ in scoring))
        for (i, _), logprobs in zip(scoring, scored):
            results[i].logprobs = TokenLogprobs(logprobs.logprobs, [top[:jobs[i].logprobs] for top in logprobs.top])
    return results


class DecodeQueue:
    """Jobs in, batches decoded by one worker thread (start() it; close() fails what still waits)."""

    GATHER_LIMIT = 10  # the longest a batch gathers, in wait_s: rows that keep arriving extend the wait up to it

    def __init__(self, steered: SteeredModel, batch_size: int = 8, wait_s: float = 0.02, seed: int = 0):
        self.steered, self.batch_size, self.wait_s = steered, batch_size, wait_s
        self.generator = seeded_generator(steered.device, seed)  # sampled rows without a seed
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._expected = batch_size  # rows the next batch expects: the last batch's, plus those that waited as it ended
        self._thread = threading.Thread(target=self._run, name="decode-queue", daemon=True)
        self.batch_rows: list[int] = []  # rows of each batch decoded so far (what batching did)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, in order (a seeded request's in steer.py's order: they are batched in it)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode queue is closed")
            self._queue.extend(jobs)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop after the batch being decoded; jobs still queued get a RuntimeError."""
        with self._cond:
            self._closed = True
            left, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in left:
            job.done(RuntimeError("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join()

    def _waiting(self, group: Hashable) -> int:
        return sum(job.group == group for job in self._queue)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job's group, up to batch_size of its jobs in queue order (after the gathering pause)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            group = self._queue[0].group
            want = min(self._expected, self.batch_size)
            start, waiting = time.monotonic(), self._waiting(group)
            deadline, limit = start + self.wait_s, start + self.GATHER_LIMIT * self.wait_s
            while not self._closed and waiting < want and (left := min(deadline, limit) - time.monotonic()) > 0:
                self._cond.wait(left)
                if (now_waiting := self._waiting(group)) > waiting:  # a row arrived: wait for the next one
                    waiting, deadline = now_waiting, time.monotonic() + self.wait_s
            if self._closed:  # close() failed the jobs that waited
                return None
            batch = [job for job in self._queue if job.group == group][:self.batch_size]
            taken = set(map(id, batch))
            self._queue = deque(job for job in self._queue if id(job) not in taken)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results: list[JobResult | BaseException] = list(decode_jobs(self.steered, batch, self.generator))
            except Exception as err:  # a failed batch fails its requests; the worker keeps serving the others
                logger.exception("decoding a batch of %d rows failed", len(batch))
                results = [err] * len(batch)
            self.batch_rows.append(len(batch))
            with self._cond:
                self._expected = len(batch) + len(self._queue)
            for job, result in zip(batch, results):
                job.done(result)
