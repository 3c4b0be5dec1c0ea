"""The OpenAI-compatible endpoint (serve.py over proxytune/integrations/server.py), called by real clients on a free
loopback port: the official `openai` client and lm-evaluation-harness's `local-completions` get steer.py's text and
the blend's log-probs; bad requests get OpenAI's error body and the server keeps serving; the API key; a bounded load
test; serve.py itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import META, REVIEWS, ROOT, make_tiny_model

import steer
from proxytune.foundation.errors import UsageError
from proxytune.integrations.server import ServeArguments, create_app, serving
from proxytune.integrations.steered import SteeredModel
from proxytune.steering.arguments import ModelArguments, SteerArguments, TuneArguments
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend
from proxytune.steering.decoding import left_pad, steered_generate
from proxytune.steering.loading import load_models

PROMPTS = ["The paper proposes a new method", "Meta-review:", "Reviewers agree the contribution is incremental."]

SEEDS = {"large": 2, "small_base": 0, "small_tuned": 1}

DRAFT_TOKENS = 2


def shape(role: str) -> dict:
    return {"hidden_size": 64, "num_layers": 3} if role == "large" else {}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    """L, S and S_tuned saved as steer.py loads them."""
    root = tmp_path_factory.mktemp("server_models")
    for role, seed in SEEDS.items():
        make_tiny_model(len(tiny_tokenizer), seed=seed, **shape(role)).save_pretrained(root / role)
        tiny_tokenizer.save_pretrained(root / role)
    return root


@pytest.fixture(scope="module")
def models64(tiny_tokenizer):
    """The same three models in float64, so that batching rows together cannot flip a greedy choice."""
    return {role: make_tiny_model(len(tiny_tokenizer), seed=seed, **shape(role)).double()
            for role, seed in SEEDS.items()}


@pytest.fixture(scope="module")
def steered(models64, tiny_tokenizer):
    # a fixed draft length: the adaptive one follows measured times, so seeded samples would vary between runs
    return SteeredModel(models64, tiny_tokenizer, Blend.from_alpha(1.0), draft_tokens=DRAFT_TOKENS)


@pytest.fixture(scope="module")
def url(steered):
    """A server on a free loopback port for the module's tests (batches of up to 3 rows, as steer_texts decodes)."""
    with serving(create_app(steered, batch_size=3)) as base:
        yield base


def client(base: str, api_key: str = "none") -> openai.OpenAI:
    # max_retries=0: a retried request would hide a failure and could be answered twice
    return openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=120)


def post(base: str, body: bytes | dict, api_key: str | None = None) -> tuple[int, dict]:
    """POST /v1/completions with a raw body (a dict is sent as JSON) -> (status, parsed answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(base + "/v1/completions", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def steer_texts(model_dirs, monkeypatch, tmp_path, **flags) -> list[str]:
    """steer.py's main on PROMPTS (as they are, no template), its models loaded from disk and made float64."""
    def load_models_in_float64(*args, **kwargs):
        models, tokenizer = load_models(*args, **kwargs)
        return {role: model.double() for role, model in models.items()}, tokenizer

    monkeypatch.setattr(steer, "load_models", load_models_in_float64)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    model_args = ModelArguments(large_model=str(model_dirs / "large"), small_base_model=str(model_dirs / "small_base"),
                                small_tuned_model=str(model_dirs / "small_tuned"), large_dtype="float32",
                                small_base_dtype="float32", small_tuned_dtype="float32")
    rows = steer.main(model_args, SteerArguments(prompts_file=str(prompts_file), use_template=False, alpha=1.0,
                                                 batch_size=3, draft_tokens=DRAFT_TOKENS, **flags), TuneArguments())
    return [row["generation"] for row in rows]


@pytest.mark.exactness
def test_openai_client_gets_steer_py_text_and_the_blend_logprobs(url, steered, model_dirs, monkeypatch, tmp_path):
    expected = steer_texts(model_dirs, monkeypatch, tmp_path, max_new_tokens=10)
    answer = client(url).completions.create(model="proxytune-steered", prompt=PROMPTS, max_tokens=10, temperature=0,
                                            logprobs=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.text.strip() for c in answer.choices] == expected  # steer.py strips its generations
    assert answer.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in answer.choices)
    # The log-probs against the decoder's own: the blend's distribution at each step of incremental decoding
    # (a KV cache, not the server's teacher-forced pass).
    tok = steered.tokenizer
    models = steered.models
    for prompt, choice in zip(PROMPTS, answer.choices):
        ids, mask = left_pad([tok.encode(prompt)], tok.pad_token_id)
        tokens, _, logps = steered_generate(models[LARGE], models[SMALL_BASE], models[SMALL_TUNED], ids, mask,
                                            steered.blend, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, vocab_size=steered.vocab_size,
                                            return_logprobs=True)  # (1, N), _, (1, N, V)
        chosen = logps[0].gather(-1, tokens[0][:, None])[:, 0]  # (N,)
        assert choice.logprobs.tokens == [tok.decode([t]) for t in tokens[0].tolist()]
        assert choice.logprobs.token_logprobs == pytest.approx(chosen.tolist(), abs=1e-5)
        best = logps[0].topk(3, dim=-1).values.tolist()  # (N, 3)
        for top, values, token, logprob in zip(choice.logprobs.top_logprobs, best, choice.logprobs.tokens,
                                                chosen.tolist()):
            # the 3 likeliest (two ids that decode alike share one key) and the chosen token
            assert max(top.values()) == pytest.approx(values[0], abs=1e-5)
            assert top[token] == pytest.approx(logprob, abs=1e-5)
            assert all(any(v == pytest.approx(w, abs=1e-5) for w in [*values, logprob]) for v in top.values())
        assert choice.logprobs.text_offset[0] == 0


@pytest.mark.exactness
def test_a_seed_samples_as_steer_py_does(url, model_dirs, monkeypatch, tmp_path):
    expected = steer_texts(model_dirs, monkeypatch, tmp_path, max_new_tokens=8, do_sample=True, temperature=0.8,
                           top_p=0.9, seed=7)
    ask = dict(model="proxytune-steered", prompt=PROMPTS, max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    first, again = client(url).completions.create(**ask), client(url).completions.create(**ask)
    assert [c.text.strip() for c in first.choices] == expected
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    other = client(url).completions.create(**{**ask, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


@pytest.mark.exactness
def test_echo_scores_the_prompt_and_stop_cuts_the_text(url, steered):
    """echo with max_tokens=0 is how clients score a text: every token's log-prob after the first, summing to the
    blend's teacher-forced score; a stop sequence cuts the text before it."""
    tok = steered.tokenizer
    text = META[0]
    answer = client(url).completions.create(model="proxytune-steered", prompt=text, max_tokens=0, echo=True,
                                            logprobs=1, temperature=0)
    choice = answer.choices[0]
    ids = tok.encode(text)
    assert choice.text == text and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.token_logprobs) == len(ids)
    (expected,), _ = steered.score([ids[:1]], [ids[1:]])
    assert sum(choice.logprobs.token_logprobs[1:]) == pytest.approx(expected, abs=1e-4)
    free = client(url).completions.create(model="proxytune-steered", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    stop = next(c for c in (free.choices[0].text[i:i + 2] for i in range(2, 12)) if c.strip() and "\ufffd" not in c)
    cut = client(url).completions.create(model="proxytune-steered", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].text == free.choices[0].text[:free.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and free.choices[0].finish_reason == "length"


@pytest.mark.exactness
def test_lm_eval_local_completions_agrees_with_the_steered_backend(url, steered, tiny_tokenizer_dir, tmp_path):
    """The harness's own API backend, pointed at the server, gets what our in-process backend gets (which
    tests/test_lm_eval_backend.py holds to the harness's hf backend): same generations, same log-likelihoods."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install lm-eval==0.4.13")
    from lm_eval.tasks import TaskManager
    from test_lm_eval_backend import loglikelihoods, write_tasks

    from proxytune.integrations.harness import SteeredLM

    write_tasks(tmp_path, tmp_path / "datasets_cache")
    tasks = ["pt_mc", "pt_gen", "pt_ppl"]

    def evaluate(model, **kwargs) -> dict:
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, log_samples=True, task_manager=TaskManager(
            include_path=str(tmp_path), include_defaults=False), **kwargs)
        return {task: {"metrics": results["results"][task], "responses": [
            s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]}
            for task in tasks}

    served = evaluate("local-completions", model_args={
        "base_url": url + "/v1/completions", "model": "proxytune-steered", "tokenizer": str(tiny_tokenizer_dir),
        "tokenizer_backend": "huggingface", "max_length": steered.context, "batch_size": 2, "num_concurrent": 2,
        "max_retries": 1})
    ours = evaluate(SteeredLM(steered, batch_size=3))
    assert served["pt_gen"]["responses"] == ours["pt_gen"]["responses"]
    assert any(r != [""] for r in ours["pt_gen"]["responses"]), "the generation task produced nothing to compare"
    for task in ("pt_mc", "pt_ppl"):
        assert loglikelihoods(served, task) == pytest.approx(loglikelihoods(ours, task), abs=1e-4)
    assert served["pt_mc"]["metrics"]["acc,none"] == ours["pt_mc"]["metrics"]["acc,none"]


BAD_REQUESTS = {
    "unknown field": ({"prompt": "x", "max_tokens": 2, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    "negative max_tokens": ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    "prompt longer than the context": ({"prompt": [5] * 600, "max_tokens": 0}, 400, "prompt"),
    "prompt and max_tokens past the context": ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    "NaN": (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    "Infinity": (b'{"prompt": "x", "top_p": Infinity}', 400, "top_p"),
    "huge float": (b'{"prompt": "x", "temperature": 1e400}', 400, "temperature"),
    "not JSON": (b'{"prompt": ', 400, None),
    "no prompt": ({"max_tokens": 2}, 400, "prompt"),
    "empty prompt": ({"prompt": ""}, 400, "prompt"),
    "token outside the vocabulary": ({"prompt": [3, 10**9]}, 400, "prompt"),
    "wrong type": ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    "stream": ({"prompt": "x", "stream": True}, 400, "stream"),
    "too many logprobs": ({"prompt": "x", "logprobs": 1000}, 400, "logprobs"),
    "seed out of range": ({"prompt": "x", "seed": -1}, 400, "seed"),
    "another model": ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(url, case):
    body, status, param = BAD_REQUESTS[case]
    got, answer = post(url, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["param"] == param
    ok, answer = post(url, {"prompt": PROMPTS[1], "max_tokens": 2, "temperature": 0})
    assert ok == 200 and len(answer["choices"]) == 1


def test_the_api_key_is_required_when_set(steered):
    with serving(create_app(steered, api_key="s3cret")) as base:
        assert post(base, {"prompt": "x", "max_tokens": 1})[0] == 401
        status, answer = post(base, {"prompt": "x", "max_tokens": 1}, api_key="s3cres")
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert [m.id for m in client(base, "s3cret").models.list().data] == ["proxytune-steered"]
        assert client(base, "s3cret").completions.create(model="proxytune-steered", prompt="x", max_tokens=1,
                                                         temperature=0).choices[0].finish_reason
        with urllib.request.urlopen(base + "/health", timeout=30) as response:  # open: it tells nothing
            assert json.loads(response.read()) == {"status": "ok"}


def test_load_loses_and_duplicates_nothing_and_batches(steered):
    """32 clients x 8 requests at once: every request gets one answer, its own (echo returns its prompt), the text
    a lone decoding of that prompt gives; the queue decoded them in batches of several rows."""
    clients, per_client, max_tokens = 32, 8, 3
    prompts = {(c, r): f"Paper {c}-{r}. {REVIEWS[(c + r) % len(REVIEWS)][:40]}"
               for c in range(clients) for r in range(per_client)}
    tok = steered.tokenizer
    keys = list(prompts)
    expected = {}
    for start in range(0, len(keys), 32):
        batch = keys[start:start + 32]
        for key, completion in zip(batch, steered.generate([tok.encode(prompts[k]) for k in batch],
                                                           max_new_tokens=max_tokens)):
            expected[key] = completion.text
    app = create_app(steered, batch_size=8)
    with serving(app) as base:
        def run_client(c: int) -> list[str]:
            api = client(base)
            return [api.completions.create(model="proxytune-steered", prompt=prompts[c, r], max_tokens=max_tokens,
                                           temperature=0, echo=True).choices[0].text for r in range(per_client)]

        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(run_client, c) for c in range(clients)]
            answers = [f.result(timeout=300) for f in futures]
        assert time.monotonic() - started < 300  # bounded: it ended by itself
        rows = list(app.state.queue.batch_rows)
    for c, texts in enumerate(answers):
        assert texts == [prompts[c, r] + expected[c, r] for r in range(per_client)]
    assert sum(rows) == clients * per_client  # each request decoded once
    assert max(rows) > 1, f"no two requests were decoded together: {rows[:20]}"


def test_the_first_batch_gathers_clients_that_start_together_and_a_lone_client_then_waits_no_more(monkeypatch):
    """Clients that start together reach the queue some milliseconds apart: the first batch waits (up to wait_s) for
    a full batch instead of decoding the first request alone, which kept the others a batch behind it for good.
    Once a batch of one is answered, the next batch expects one row (a lone client waits no more)."""
    from types import SimpleNamespace

    from proxytune.integrations import batching
    from proxytune.integrations.steered import Completion

    monkeypatch.setattr(batching, "decode_jobs", lambda steered, jobs, generator=None: [
        batching.JobResult(Completion([], "", "length"), None) for _ in jobs])
    queue = batching.DecodeQueue(SimpleNamespace(device="cpu"), batch_size=8, wait_s=60.0)
    queue.start()
    answered = threading.Semaphore(0)

    def job() -> batching.Job:
        return batching.Job(prompt=[5, 6], max_tokens=1, done=lambda result: answered.release())

    try:
        queue.submit([job()])
        time.sleep(0.05)  # the other clients arrive a little later
        queue.submit([job() for _ in range(7)])
        for _ in range(8):
            assert answered.acquire(timeout=120)
        assert queue.batch_rows == [8]
    finally:
        queue.close()
    lone = batching.DecodeQueue(SimpleNamespace(device="cpu"), batch_size=8, wait_s=0.2)
    lone.start()
    try:
        for _ in range(2):
            lone.submit([job()])
            assert answered.acquire(timeout=120)
            assert lone._expected == 1  # answered alone with nothing waiting: the next batch starts at once
        assert lone.batch_rows == [1, 1]
    finally:
        lone.close()


def test_a_batch_gathers_rows_that_arrive_in_a_trickle(monkeypatch):
    """Rows that keep arriving, each within wait_s of the one before (over more than wait_s in all), make one batch:
    the wait is a quiet time. (The spacing leaves a margin of 1.4 s against a slow machine.)"""
    from types import SimpleNamespace

    from proxytune.integrations import batching
    from proxytune.integrations.steered import Completion

    monkeypatch.setattr(batching, "decode_jobs", lambda steered, jobs, generator=None: [
        batching.JobResult(Completion([], "", "length"), None) for _ in jobs])
    queue = batching.DecodeQueue(SimpleNamespace(device="cpu"), batch_size=8, wait_s=2.0)
    answered = threading.Semaphore(0)
    queue.start()
    try:
        for _ in range(5):  # 5 rows over 2.4 s: past one wait_s, never 2 s apart
            queue.submit([batching.Job(prompt=[5, 6], max_tokens=1, done=lambda result: answered.release())])
            time.sleep(0.6)
        for _ in range(5):
            assert answered.acquire(timeout=120)
        assert queue.batch_rows == [5]
    finally:
        queue.close()


def test_serve_arguments_are_checked():
    with pytest.raises(UsageError, match="--port"):
        ServeArguments(port=70000)
    with pytest.raises(UsageError, match="either --alpha or --blend"):
        ServeArguments(alpha=1.0, blend="b.json")
    with pytest.raises(UsageError, match="--batch_size"):
        ServeArguments(batch_size=0)


def test_serve_py_binds_loopback_and_serves_the_models_it_loads(model_dirs, tmp_path):
    """serve.py itself: the models from flags, a free port (0), 127.0.0.1 by default, the key from the
    environment; it answers, then stops on SIGINT."""
    (tmp_path / "blend.json").write_text(json.dumps({"alpha": 1.0}), encoding="utf-8")
    env = {**os.environ, "PROXYTUNE_API_KEY": "k3y"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "--large_model", str(model_dirs / "large"), "--small_base_model",
         str(model_dirs / "small_base"), "--small_tuned_model", str(model_dirs / "small_tuned"), "--blend",
         str(tmp_path / "blend.json"), "--port", "0", "--large_device", "cpu"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not (bound := re.search(r"Uvicorn running on http://([\d.]+):(\d+)", "".join(lines))):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "serve.py did not start:\n" + "".join(lines)
            time.sleep(0.2)
        host, port = bound.groups()
        assert host == "127.0.0.1"
        base = f"http://{host}:{port}"
        assert post(base, {"prompt": "x", "max_tokens": 1})[0] == 401
        answer = client(base, "k3y").completions.create(model="proxytune-steered", prompt=PROMPTS[0], max_tokens=4,
                                                        temperature=0)
        assert answer.usage.completion_tokens >= 1
        assert "k3y" not in "".join(lines)  # the key is never logged
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        reader.join(timeout=10)
    assert process.returncode == 0, "".join(lines)


def test_rows_of_one_batch_keep_their_own_lengths_and_stops(steered):
    """What lets the queue batch different requests: each row of a batch as if decoded alone."""
    tok = steered.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    alone = [steered.generate([p], max_new_tokens=n)[0] for p, n in zip(prompts, (3, 9, 6))]
    text = alone[1].text
    stop = next(c for c in (text[i:i + 2] for i in range(2, len(text) - 1)) if c.strip() and "\ufffd" not in c)
    together = steered.generate(prompts, max_new_tokens=[3, 9, 6], row_stops=[[], [stop], []])
    assert together[0] == alone[0] and together[2] == alone[2] and len(together[0].tokens) == 3
    assert together[1].text == text[:text.index(stop)] and together[1].finish_reason == "stop"


def test_prompts_go_into_the_template_s_tuned_records_with_use_template(steered, model_dirs, tmp_path,
                                                                        template_warnings):
    """load_steered takes steer.py's template (S_tuned's final/ records it; a flag that differs wins, warned);
    /v1/models lists it; with use_template a text prompt is put into it, cut to leave max_tokens, and answered as that
    prompt sent as it is; without, prompts reach the models as sent."""
    import dataclasses
    import shutil

    from proxytune.integrations.steered import load_steered
    from proxytune.task.prompts import TEMPLATES, write_template

    shutil.copytree(model_dirs, tmp_path / "models")
    write_template(tmp_path / "models" / "small_tuned", TEMPLATES["alpaca"])  # as fine_tune.py records it in final/
    flags = {f"{role}_model": str(tmp_path / "models" / role) for role in SEEDS}
    assert load_steered(ModelArguments(**flags), Blend.from_alpha(1.0)).template.name == "alpaca"
    assert not template_warnings
    assert load_steered(ModelArguments(**flags), Blend.from_alpha(1.0),
                        prompt_template="meta_review").template.name == "meta_review"
    assert any("differs from alpaca" in line and "small_tuned" in line for line in template_warnings)

    alpaca = dataclasses.replace(steered, template=TEMPLATES["alpaca"])
    body = {"prompt": "Summarise the reviews. <sep> Good paper; weak baselines.", "max_tokens": 5, "temperature": 0,
            "echo": True}
    prompt = alpaca.templated(body["prompt"], alpaca.context - body["max_tokens"])
    assert prompt == TEMPLATES["alpaca"].render(["Summarise the reviews.\nGood paper; weak baselines."])  # as --prompt
    assert alpaca.templated(["Summarise.", "Good paper."]) == TEMPLATES["alpaca"].render(["Summarise.", "Good paper."])
    with serving(create_app(alpaca, use_template=True)) as templated, serving(create_app(alpaca)) as plain:
        status, ours = post(templated, body)
        assert status == 200 and ours["choices"][0]["text"].startswith(prompt)
        assert post(plain, {**body, "prompt": prompt})[1]["choices"][0]["text"] == ours["choices"][0]["text"]
        assert post(plain, body)[1]["choices"][0]["text"].startswith(body["prompt"])  # as sent
        assert post(templated, {**body, "prompt": " <sep> "})[0] == 400
        with urllib.request.urlopen(templated + "/v1/models", timeout=60) as response:
            assert json.loads(response.read())["data"][0]["prompt_template"]["name"] == "alpaca"
