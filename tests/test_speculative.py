"""proxytune/steering/speculative.py: greedy speculative steering gives steered_generate's tokens (float64, and
float32 on these prompts), and speculative sampling has the blend's output distribution (exact enumeration on a tiny
vocabulary vs a seeded sample)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_clear_lead, make_tiny_model
from scipy.stats import chi2

from proxytune.evaluation.generation import generate_batch
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend, blend_logprobs, slice_vocab
from proxytune.steering.decoding import NgramBlocker, left_pad, process_scores, steered_generate, warp_scores
from proxytune.steering.speculative import (
    DraftSchedule,
    FixedSchedule,
    RowState,
    SpeculativeStats,
    expected_tokens,
    speculative_generate,
    uses_speculation,
)

V = 300
PAD, EOS = 1, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20], [30, 31, 32, 33, 34]]


def tiny_models(dtype=torch.float64, vocab=V, padded=V + 12, sharpen: float = 1.0):
    models = {
        LARGE: make_tiny_model(vocab, seed=2, hidden_size=64, num_layers=3, padded_vocab=padded),
        SMALL_BASE: make_tiny_model(vocab, seed=0, padded_vocab=padded),
        SMALL_TUNED: make_tiny_model(vocab, seed=1, padded_vocab=padded),
    }
    for m in models.values():
        if sharpen != 1.0:  # random tiny models are near-uniform; a bigger output layer makes them opinionated
            with torch.no_grad():
                m.get_output_embeddings().weight.mul_(sharpen)
        m.to(dtype)
    return models


@pytest.fixture(scope="module")
def models64():
    return tiny_models(torch.float64, sharpen=30.0)


def run(fn, models, prompts, blend, **kw):
    ids, mask = left_pad(prompts, PAD)
    kw = dict(dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, vocab_size=V), **kw)
    return fn(models[LARGE], models[SMALL_BASE], models[SMALL_TUNED], ids, mask, blend, **kw)


BLENDS = {
    "proxy-tuning": Blend.from_alpha(1.0),
    "mostly-draft": Blend(large_weight=0.15, tuned_weight=1.0, base_weight=0.1),  # accepts often, not always
    "draft-only": Blend(large_weight=0.0, tuned_weight=1.0, base_weight=0.0),  # every draft kept: bonus path
    "tempered+nucleus": Blend(0.8, 1.2, 0.3, 0.9, 1.1, plausibility_top_p=0.9),
    "min-ratio": Blend(1.0, 1.0, 1.0, plausibility_min_ratio=0.05),
}


@pytest.mark.exactness
@pytest.mark.parametrize("name", list(BLENDS))
@pytest.mark.parametrize("draft_tokens", [None, 1, 4])
def test_greedy_equals_the_plain_loop_in_float64(models64, name, draft_tokens):
    blend = BLENDS[name]
    plain = run(steered_generate, models64, PROMPTS, blend)
    stats = SpeculativeStats()
    spec = run(speculative_generate, models64, PROMPTS, blend, draft_tokens=draft_tokens, stats=stats)
    assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
    assert stats.emitted == plain[0].numel()  # no EOS here: every row ran its 12 tokens
    if draft_tokens is None:
        return  # adaptive: the real clock picks the lengths (a busy machine may draft nothing); the tokens above
        # are what must hold. test_adaptive_greedy_equals_the_plain_loop_whichever_way_it_goes fixes the clock.
    if name == "draft-only":
        assert stats.acceptance == 1.0
    if name == "mostly-draft":
        assert 0 < stats.accepted < stats.drafted  # both the kept and the rejected paths ran


@pytest.mark.exactness
@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.6), dict(no_repeat_ngram_size=2),
                                dict(repetition_penalty=1.3, no_repeat_ngram_size=3, max_new_tokens=20)])
@pytest.mark.parametrize("name", ["mostly-draft", "proxy-tuning"])
def test_greedy_with_repetition_penalty_and_ngram_ban_equals_the_plain_loop(models64, kw, name):
    plain = run(steered_generate, models64, PROMPTS, BLENDS[name], **kw)
    stats = SpeculativeStats()
    # Adaptive, priced by a clock of the rounds run (a draft costs 0.05 of a step), so that drafts run on any machine.
    schedule = DraftSchedule(8, clock=lambda: sum(1 + 0.05 * k for _, k, _ in stats.batch_rounds))
    spec = run(speculative_generate, models64, PROMPTS, BLENDS[name], stats=stats, schedule=schedule, **kw)
    assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
    assert stats.accepted > 0 or name == "proxy-tuning"


@pytest.mark.exactness
def test_each_row_stops_at_its_own_eos_as_the_plain_loop_does(models64):
    blend = BLENDS["mostly-draft"]
    free, _ = run(steered_generate, models64, PROMPTS, blend, eos_token_id=V + 100)
    eos = int(free[0, 3])  # row 0's fourth token becomes the EOS; other rows may meet it elsewhere or never
    plain = run(steered_generate, models64, PROMPTS, blend, eos_token_id=eos)
    spec = run(speculative_generate, models64, PROMPTS, blend, eos_token_id=eos)
    assert plain[1][0] and torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
    for max_new_tokens in (1, 2, 5):  # the budget cuts a round short
        plain = run(steered_generate, models64, PROMPTS, blend, max_new_tokens=max_new_tokens)
        spec = run(speculative_generate, models64, PROMPTS, blend, max_new_tokens=max_new_tokens, draft_tokens=8)
        assert torch.equal(spec[0], plain[0])


@pytest.mark.exactness
def test_a_batch_whose_masked_slots_fill_the_cache_is_packed_and_decodes_the_same(models64, monkeypatch):
    """Rows keep different counts per round, so a batch's caches fill with masked slots; with no spare room
    (the capacity a batch of one needs) BatchCache.reserve must pack them, and every row still decodes as alone."""
    from proxytune.steering import speculative

    packs = []
    real_reserve = speculative.BatchCache.reserve

    def reserve(self, n):
        before = self.length
        real_reserve(self, n)
        packs.append(self.length < before)

    monkeypatch.setattr(speculative, "cache_capacity", lambda batch, width, new, k: width + new + k + 1)
    monkeypatch.setattr(speculative.BatchCache, "reserve", reserve)
    for kw in (dict(), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)):
        plain = run(steered_generate, models64, PROMPTS, BLENDS["mostly-draft"], max_new_tokens=20, **kw)
        spec = run(speculative_generate, models64, PROMPTS, BLENDS["mostly-draft"], max_new_tokens=20,
                   draft_tokens=3, **kw)
        assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
    assert any(packs)  # the packing path ran


@pytest.mark.exactness
@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.6, no_repeat_ngram_size=2)])
def test_plain_steps_alone_are_the_plain_loop(models64, kw):
    """Rounds of k = 0 only (the fallback; the whole batch at once, RoundDecoder.plain_step): the plain loop's tokens
    and forwards, one per model and step, with rows ending at different steps (EOS) and left padding."""
    blend = BLENDS["mostly-draft"]
    free, _ = run(steered_generate, models64, PROMPTS, blend, eos_token_id=V + 100)
    eos = int(free[0, 3])  # row 0 ends early, the others later or never
    plain = run(steered_generate, models64, PROMPTS, blend, eos_token_id=eos, **kw)
    stats = SpeculativeStats()
    spec = run(speculative_generate, models64, PROMPTS, blend, eos_token_id=eos, schedule=FixedSchedule(0),
               stats=stats, **kw)
    assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
    steps = plain[0].shape[1]
    assert stats.plain_steps == len(stats.batch_rounds) == steps and stats.drafted == 0
    assert stats.forwards == {LARGE: steps, SMALL_BASE: steps, SMALL_TUNED: steps}


@pytest.mark.exactness
def test_the_host_knows_whether_a_cache_has_masked_slots(models64, monkeypatch):
    """BatchCache.masked (kept on the host, so that no forward waits for the device to learn it) is True exactly
    when a slot is masked out: left padding, a row that kept fewer tokens than another in a round, a finished row."""
    from proxytune.steering import speculative

    seen = []
    real_keep, real_reserve = speculative.BatchCache.keep, speculative.BatchCache.reserve

    def checked(real):
        def method(self, *args):
            real(self, *args)
            seen.append(self.masked)
            assert self.masked == (not bool(self.mask.all()))
        return method

    monkeypatch.setattr(speculative, "cache_capacity", lambda batch, width, new, k: width + new + k + 1)
    monkeypatch.setattr(speculative.BatchCache, "keep", checked(real_keep))
    monkeypatch.setattr(speculative.BatchCache, "reserve", checked(real_reserve))
    for prompts in (PROMPTS, PROMPTS[:1], [PROMPTS[1]] * 2):
        run(speculative_generate, models64, prompts, BLENDS["mostly-draft"], max_new_tokens=16, draft_tokens=3)
    assert True in seen and False in seen


@pytest.mark.exactness
def test_greedy_float32_equals_the_plain_loop_on_these_prompts():
    """Equal tokens in float32 hold where every step leads clearly: the output layer is 30x, and so is the rounding
    (float32 log-probs within 1.4e-5 of float64 ones here); leads of at least 1e-3 stand far above it."""
    models = tiny_models(torch.float32, sharpen=30.0)
    for blend in BLENDS.values():
        plain = run(steered_generate, models, PROMPTS, blend, max_new_tokens=16, return_logprobs=True)
        assert_clear_lead(plain[2], at_least=1e-3)
        spec = run(speculative_generate, models, PROMPTS, blend, max_new_tokens=16)
        assert torch.equal(spec[0], plain[0])


# ---------------------------------------------------------------------------------------------
# The adaptive draft length (DraftSchedule): follows the acceptance, falls back to plain steps
# ---------------------------------------------------------------------------------------------
def test_expected_tokens_is_the_mean_of_the_kept_prefix_plus_one():
    a, k = 0.6, 3
    # P(exactly i drafts kept) = a^i (1 - a) for i < k, a^k for i = k; the round emits i + 1 tokens.
    mean = sum((i + 1) * a ** i * (1 - a) for i in range(k)) + (k + 1) * a ** k
    assert expected_tokens(a, k) == pytest.approx(mean)
    assert expected_tokens(0.0, 5) == 1 and expected_tokens(1.0, 4) == 5


def drive(schedule: DraftSchedule, cost, agree: float, rounds: int) -> list[int]:
    """Run `rounds` of the schedule where a round of k costs cost(k) seconds and every position agrees with
    probability `agree` (as expected values: one observation per emitted token) -> the k chosen."""
    chosen = []
    for _ in range(rounds):
        k = schedule.next_k()
        chosen.append(k)
        emitted = expected_tokens(agree, k)
        schedule.observe(k, cost(k), [agree] * max(1, round(emitted)))
    return chosen


def test_schedule_falls_back_to_plain_steps_when_drafts_do_not_pay_and_returns_when_they_do():
    cpu_like = lambda k: 1.0 + 1.0 * k  # noqa: E731  a forward of k + 1 tokens costs k + 1 times one
    gpu_like = lambda k: 1.0 + 0.05 * k  # noqa: E731  about the same as one
    never = drive(DraftSchedule(8), gpu_like, 0.0, 60)
    assert never[0] == 0 and set(never[10:]) == {0}  # acceptance 0: plain steps, and no probe (it cannot pay)
    costly = drive(DraftSchedule(8), cpu_like, 0.6, 200)
    assert costly[20:].count(0) > 0.97 * 180  # drafts that cost more than they bring: plain, probing rarely
    assert 0 < sum(k > 0 for k in costly[20:])  # ... but probing
    eager = drive(DraftSchedule(8), gpu_like, 0.95, 40)
    assert eager[-1] >= 7 and 0 not in eager[10:]  # cheap drafts, high acceptance: long ones (7 and 8 near-tie)
    # Drafts whose cost grows slower than their count (a CPU's k + 1-token forward): lengths tried one above the
    # measured ones at an optimistic price, so the best (k = 4 here) is found.
    sublinear = [1, 2.1, 2.55, 3.3, 4.1, 5, 6, 7, 8]
    assert drive(DraftSchedule(8), lambda k: sublinear[k], 1.0, 30)[-1] == 4
    moderate = drive(DraftSchedule(8), gpu_like, 0.5, 40)
    assert set(moderate[15:]) <= {1, 2, 3}  # E/c peaks at k = 2 here (1.75 / 1.1 vs 1.5 / 1.05, 1.875 / 1.15)
    # The agreement changes mid-way: from plain steps back to drafting, from the free observations of plain steps.
    schedule = DraftSchedule(8)
    first = drive(schedule, gpu_like, 0.0, 20)
    later = drive(schedule, gpu_like, 0.9, 20)
    assert first[-1] == 0 and later[-1] > 1


def test_a_rounds_positions_count_alike_whatever_their_order():
    """A batch observes many positions a round; the acceptance is their share over recent rounds, so the rows that
    happen to come last in a round do not decide the next round's length (weighted per position, a batch of 8 at a
    per-token acceptance of 0.69 sent half its rounds to plain steps on an H200)."""
    gpu_like = lambda k: 1.0 + 0.1 * k  # noqa: E731
    rows = [1.0] * 11 + [0.0] * 5  # a batch round's 16 observations, 0.69 agreeing, the disagreeing ones last
    schedules = {order: DraftSchedule(8) for order in ("last", "first")}
    chosen = {order: [] for order in schedules}
    for _ in range(40):
        for order, schedule in schedules.items():
            k = schedule.next_k()
            chosen[order].append(k)
            schedule.observe(k, gpu_like(k), rows if order == "last" else rows[::-1])
    assert chosen["last"] == chosen["first"]
    assert schedules["last"].acceptance == pytest.approx(11 / 16, abs=0.02)
    assert chosen["last"][5:].count(0) == 0  # drafting pays here (E(0.69, 2) / c(2) = 2.17 / 1.2), every round


@pytest.mark.exactness
@pytest.mark.parametrize("name", ["proxy-tuning", "mostly-draft", "draft-only"])
@pytest.mark.parametrize("drafts_cost", [0.05, 1.0])
def test_adaptive_greedy_equals_the_plain_loop_whichever_way_it_goes(models64, name, drafts_cost):
    """The schedule's clock is the price of the rounds run so far (a round of k: 1 + drafts_cost * k), so its
    choices are fixed; whatever they are, the tokens are the plain loop's."""
    stats = SpeculativeStats()
    schedule = DraftSchedule(8, clock=lambda: sum(1 + drafts_cost * k for _, k, _ in stats.batch_rounds))
    plain = run(steered_generate, models64, PROMPTS, BLENDS[name], max_new_tokens=24)
    spec = run(speculative_generate, models64, PROMPTS, BLENDS[name], max_new_tokens=24, schedule=schedule,
               stats=stats)
    assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
    drafting = [k for _, k, _ in stats.batch_rounds[1:]]
    if name == "draft-only" and drafts_cost < 1:
        assert 0 not in drafting and max(drafting) > 2  # every draft kept: longer and longer drafts
    if name == "proxy-tuning":  # disagreeing drafts (acceptance about 0.13): one draft a round at most
        assert max(drafting) <= 1
    if drafts_cost == 1.0 and name != "draft-only":
        # drafts that cost what their tokens would (at acceptance 1 that is a tie): mostly plain steps
        assert stats.plain_steps > len(stats.batch_rounds) / 2


def test_row_state_takes_back_pushed_tokens():
    prompt = torch.tensor([5, 6, 7, 5])
    state = RowState(prompt, 20, repetition_penalty=2.0, no_repeat_ngram_size=2)
    before = (state.seen.clone(), {k: set(v) for k, v in state.blocker.seen[0].items()}, list(state.blocker.seqs[0]))
    for token in (6, 9, 9, 3):
        state.push(token)
    assert state.seen[0, 9] and state.blocker.seqs[0][-1] == 3
    state.pop_to(1)
    assert state.blocker.seqs[0] == [5, 6, 7, 5, 6] and not state.seen[0, 9]
    state.pop_to(0)
    assert torch.equal(state.seen, before[0]) and state.blocker.seqs[0] == before[2]
    assert {k: v for k, v in state.blocker.seen[0].items() if v} == before[1]
    # process_scores is the plain loop's processing: the same result as a fresh blocker on the same sequence.
    logp = torch.log_softmax(torch.randn(1, 20, generator=torch.Generator().manual_seed(0)), -1)
    fresh = NgramBlocker(2, prompt[None], torch.ones(1, 4))
    expected = fresh.ban(torch.where(state.seen, logp * 2.0, logp), [0])
    assert torch.equal(state.scores(logp), expected)


# ---------------------------------------------------------------------------------------------
# Sampling: the output distribution is the blend's
# ---------------------------------------------------------------------------------------------
SV = 5  # a tiny vocabulary: token 0 is EOS, 1 is padding (never produced here: it is just a token)
SAMPLE = dict(do_sample=True, temperature=1.0, top_p=0.97, repetition_penalty=1.5, no_repeat_ngram_size=2)
N_NEW = 3


@torch.inference_mode()
def exact_distribution(models, prompt: list[int], blend: Blend, use_draft: bool = False) -> dict[tuple, float]:
    """Every continuation of up to N_NEW tokens (stopping at EOS) -> its probability, by enumeration: the plain
    loop's per-step distribution (blend, processing, warps) from an uncached forward on each prefix."""
    def step_probs(prefix: list[int]) -> torch.Tensor:
        seq = torch.tensor([prompt + prefix])
        logps = {r: torch.log_softmax(slice_vocab(m(input_ids=seq).logits[:, -1], SV).double(), -1)
                 for r, m in models.items()}
        mixed = logps[SMALL_TUNED] if use_draft else blend_logprobs(
            logps[LARGE], logps[SMALL_TUNED], logps[SMALL_BASE], blend)
        state = RowState(torch.tensor(prompt + prefix), SV, SAMPLE["repetition_penalty"],
                         SAMPLE["no_repeat_ngram_size"])
        warped = warp_scores(state.scores(mixed), SAMPLE["temperature"], SAMPLE["top_p"])
        return torch.softmax(warped, -1)[0]

    dist = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == N_NEW or (prefix and prefix[-1] == EOS):
            dist[tuple(prefix)] = dist.get(tuple(prefix), 0.0) + prob
            return
        for token, p in enumerate(step_probs(prefix).tolist()):
            if p > 0:
                walk(prefix + [token], prob * p)

    walk([], 1.0)
    return dist


def chi_square_p(counts: dict[tuple, int], dist: dict[tuple, float], n: int) -> float:
    """Pearson's test of the counts against `dist`, outcomes expected under 5 times pooled into one bin."""
    big = [o for o, p in dist.items() if p * n >= 5]
    small_p = 1 - sum(dist[o] for o in big)
    observed = [counts.get(o, 0) for o in big] + [n - sum(counts.get(o, 0) for o in big)]
    expected = [dist[o] * n for o in big] + [small_p * n]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    unseen = sum(c for o, c in counts.items() if o not in dist)
    assert unseen == 0, f"{unseen} samples have probability 0 under the blend"
    return float(chi2.sf(stat, len(expected) - 1))


@pytest.mark.parametrize("adaptive", [False, True, "plain steps"])
def test_speculative_sampling_has_the_blends_distribution(adaptive):
    """Fixed k = 2, the adaptive schedule (a plain step, then drafting rounds: its choices depend on what was
    decoded before, so each token is still distributed as the blend's), and plain steps only (k = 0: the fallback,
    the whole batch sampled at once)."""
    models = tiny_models(torch.float64, vocab=SV, padded=SV + 3, sharpen=3.0)
    blend = Blend(1.0, 1.0, 0.6, plausibility_top_p=0.95)
    prompt = [2, 3, 4]
    target = exact_distribution(models, prompt, blend)
    draft = exact_distribution(models, prompt, blend, use_draft=True)
    assert abs(sum(target.values()) - 1) < 1e-9
    # The draft is far from the target, so a sampler that kept every draft would fail this test.
    assert 0.5 * sum(abs(target.get(o, 0) - draft.get(o, 0)) for o in set(target) | set(draft)) > 0.15

    n = 1500
    ids, mask = left_pad([prompt] * n, PAD)
    stats = SpeculativeStats()
    schedule = FixedSchedule(0) if adaptive == "plain steps" else DraftSchedule(
        8, clock=lambda: sum(1 + 0.05 * k for _, k, _ in stats.batch_rounds)) if adaptive else None
    tokens, ended = speculative_generate(
        models[LARGE], models[SMALL_BASE], models[SMALL_TUNED], ids, mask, blend, max_new_tokens=N_NEW,
        eos_token_id=EOS, pad_token_id=-1, vocab_size=SV, generator=torch.Generator().manual_seed(0),
        draft_tokens=2, stats=stats, schedule=schedule, **SAMPLE)
    if adaptive is True:
        assert stats.plain_steps >= 1 and stats.drafted > 0  # both kinds of round ran
    if adaptive == "plain steps":
        assert stats.drafted == 0 and stats.plain_steps == len(stats.batch_rounds)
    counts: dict[tuple, int] = {}
    for row in tokens.tolist():
        key = tuple(itertools.takewhile(lambda t: t != -1, row))
        counts[key] = counts.get(key, 0) + 1
    if adaptive != "plain steps":
        assert 0.2 < stats.acceptance < 0.95  # both the keep and the resample rules were exercised
    assert chi_square_p(counts, target, n) > 1e-3
    assert chi_square_p(counts, draft, n) < 1e-6  # the test can tell the draft's distribution from the blend's


# ---------------------------------------------------------------------------------------------
# Wiring: steer.py and evaluation.py
# ---------------------------------------------------------------------------------------------
@pytest.mark.exactness
def test_one_prompt_decodes_speculatively_and_the_flag_turns_it_off(tiny_model_dirs, monkeypatch):
    from test_steer import model_flags, run_main

    from proxytune.steering import speculative

    assert speculative.process_scores is process_scores  # one per-step processing for both loops
    blend = Blend.from_alpha(1.0)
    assert uses_speculation(object(), blend, True)
    assert not uses_speculation(object(), blend, False) and not uses_speculation(None, blend, True)
    assert not uses_speculation(object(), Blend.from_alpha(0.0), True)  # S_tuned is not in the blend
    calls = []
    real = speculative.speculative_generate
    monkeypatch.setattr(speculative, "speculative_generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    argv = [*model_flags(tiny_model_dirs), "--alpha", "1.0", "--prompt", "Strong results. Accept.",
            "--max_new_tokens", "10"]  # leads of 2e-2 and more ('Good paper. Weak baselines.': a step leads by 1e-4)
    fast = run_main(argv)
    assert len(calls) == 1 and calls[0]["draft_tokens"] is None  # the default: adaptive (DraftSchedule)
    plain_logps = []  # the plain loop's blended log-probs: the float32 models' leads (conftest's exactness note)
    plain_loop = speculative.steered_generate

    def plain_loop_keeping_logprobs(*args, **kwargs):
        tokens, ended, logps = plain_loop(*args, **kwargs, return_logprobs=True)
        plain_logps.append(logps)
        return tokens, ended

    monkeypatch.setattr(speculative, "steered_generate", plain_loop_keeping_logprobs)
    plain = run_main([*argv, "--speculative", "false"])
    assert_clear_lead(plain_logps[0])
    assert len(calls) == 1 and fast[0]["generation"] == plain[0]["generation"]
    run_main([*argv, "--draft_tokens", "0"])
    assert calls[-1]["draft_tokens"] is None  # 0 = adaptive
    assert run_main([*argv, "--draft_tokens", "2"])[0]["generation"] == plain[0]["generation"]
    assert calls[-1]["draft_tokens"] == 2



@pytest.mark.exactness
def test_evaluation_steered_system_decodes_one_example_speculatively(tiny_tokenizer, monkeypatch):
    from proxytune.steering import speculative

    models = tiny_models(torch.float64, vocab=len(tiny_tokenizer), padded=len(tiny_tokenizer) + 12, sharpen=30.0)
    calls = []
    real = speculative.speculative_generate
    monkeypatch.setattr(speculative, "speculative_generate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, mask = left_pad([[5, 6, 7, 8, 9]], tiny_tokenizer.pad_token_id)
    settings = dict(max_new_tokens=8, do_sample=False, temperature=1.0, top_p=1.0, repetition_penalty=1.0,
                    no_repeat_ngram_size=0)
    out = {flag: generate_batch("steered", models, Blend.from_alpha(1.0), ids, mask, settings,
                                tiny_tokenizer, torch.Generator(), speculative=flag) for flag in (True, False)}
    assert calls == [1] and torch.equal(out[True], out[False])
