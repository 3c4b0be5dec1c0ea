"""Shared fixtures: a tiny BPE tokenizer trained in milliseconds, tiny GPT-NeoX models saved to tmp
directories, small meta-review fixtures, and access to ../shared (skipped with a reason if absent)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data" / "meta_review"
PYTHIA_TOKENIZER = SHARED / "tokenizers" / "pythia"

requires_shared = pytest.mark.skipif(
    not (SHARED_DATA.is_dir() and PYTHIA_TOKENIZER.is_dir()),
    reason="../shared (real MReD data and the Pythia tokenizer) is not present beside the repo",
)

REVIEWS = [
    "The paper proposes a new normalization for GAN training. Experiments are solid but baselines are weak.",
    "Well written and clearly motivated. The theory section has a gap in the proof of the main lemma.",
    "Novel idea with strong results on CIFAR. Ablations are missing and the related work is thin.",
    "The method is simple and effective. However the evaluation only covers small datasets.",
    "Interesting analysis of graph neural networks for robotics. The writing needs work.",
    "Reviewers agree the contribution is incremental. The rebuttal addressed some concerns.",
]
META = [
    "The reviewers agree the paper is well written but the baselines are weak. Reject.",
    "A clear paper with a gap in the proof. The authors should fix the lemma. Accept with revisions.",
    "Strong results but missing ablations. The committee recommends acceptance as a poster.",
    "Simple and effective method, limited evaluation. Borderline; we lean towards rejection.",
    "The analysis is interesting but the presentation needs work. Reject, resubmit elsewhere.",
    "Incremental contribution. Despite the rebuttal, the paper is not ready. Reject.",
]


def make_rows(n: int = 24) -> list[dict]:
    """n distinct Input/Output rows built from the fixture sentences."""
    rows = []
    for i in range(n):
        a, b = REVIEWS[i % len(REVIEWS)], REVIEWS[(i * 5 + 1) % len(REVIEWS)]
        rows.append({"Input": f"Paper {i}. {a} <sep> {b}", "Output": f"Paper {i}: {META[i % len(META)]}"})
    return rows


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads cost seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rows() -> list[dict]:
    return make_rows()


@pytest.fixture
def jsonl_file(tmp_path, rows) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    """IMDB-shaped rows (text, label) with IMDB's <br /> line breaks: 40 reviews, labels alternating 0/1."""
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": f"Film {i}. {REVIEWS[i % len(REVIEWS)]}<br /><br />{REVIEWS[(i + 1) % len(REVIEWS)]}",
             "label": i % 2} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class TemplateWarnings(logging.Handler):
    """The template warnings (the scripts' setup_logging replaces the root handlers, caplog's among them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def template_warnings():
    handler, logger = TemplateWarnings(), logging.getLogger("proxytune.task.prompts")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE with Pythia's special-token layout (<|endoftext|> = 0, <|padding|> = 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = REVIEWS + META + ["Peer reviews of a paper:", "Meta-review:"]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|padding|>",
        model_max_length=256,
    )
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from proxytune.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def make_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                    padded_vocab: int | None = None, output_scale: float = 1.0):
    """A random GPT-NeoX; `padded_vocab` > vocab_size mimics Pythia's 50,304-row embedding. Its next-token
    distributions are near-uniform (logits within about +-0.5, top-two leads down to ~1e-3 over a few dozen steps);
    `output_scale` multiplies the output layer, and so the logits and their leads."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=padded_vocab or vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    model = GPTNeoXForCausalLM(config).eval()
    if output_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(output_scale)
    return model


# --- exactness: greedy comparisons that no CPU can flip (tests marked `exactness`; tests/exactness_kernels.sh) -------
# Two decodings of one float32 model that round differently (batched or alone, cached or not, speculative or not, HF's
# generate or ours, another CPU's kernels) differ by about 1e-6 in a log-prob (at most 2e-6 measured on the tiny
# models, 4-bit ones included). Their greedy tokens are equal on any CPU wherever each step's best token leads the
# runner-up by far more than that, and a random tiny model can hold a near-tie anywhere: so a float32 test asserts the
# lead (assert_clear_lead) before it asserts equal tokens, and fails at once, on every CPU, if a fixture or prompt
# holds a near-tie, instead of on some CPUs only. In float64 the paths agree to ~1e-15: the float32 log-probs that
# steered decoding casts to are then bit for bit the same, and equal tokens need no lead.
CLEAR_LEAD = 1e-4


def smallest_lead(scores) -> float:
    """(..., V) scores greedy tokens were picked from -> the smallest lead of a best score over its runner-up:
    `smallest_lead(torch.tensor([[0.0, -1.0, -3.0], [-2.0, -0.5, -0.7]]))` -> 0.2."""
    top = scores.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def assert_clear_lead(scores, at_least: float = CLEAR_LEAD) -> None:
    """Every greedy step of `scores` (..., V) leads by more than `at_least`: no near-tie a rounding could flip."""
    lead = smallest_lead(scores)
    assert lead > at_least, (
        f"near-tie: a greedy step's best token leads the runner-up by {lead:.3g} only (<= {at_least:g}), within the "
        "rounding that differs between decoding paths and CPUs; use other prompts or seeds, or compare in float64")


def record_generate_scores(model, monkeypatch) -> list:
    """Make `model.generate` also record the scores each step picked from (logits after HF's processors); -> the list
    each call appends its (B, N, V) scores to. generate still returns the sequences alone."""
    import torch

    recorded = []
    generate = model.generate

    def generate_and_record(*args, **kwargs):
        out = generate(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        recorded.append(torch.stack(out.scores, dim=1))
        return out.sequences

    monkeypatch.setattr(model, "generate", generate_and_record)
    return recorded


NEAR_TIE_TOKENS = (100, 200)  # (lower id, higher id); the higher one gets the larger logit


def add_near_tie(model, logit: float = 5.45, shift: float = 5.0, dim: int = 0):
    """Build a near-tie into a GPT-NeoX, in place: NEAR_TIE_TOKENS get logits one float32 ulp apart, the larger
    (`logit`) on the higher id, so that a path that rounded the two into one number would pick the lower id. Exactly,
    at every position and on every CPU: dimension `dim` of the final layer norm is the constant 1 (weight 0, bias 1)
    and the two tokens' rows of the output layer read only it, so each logit is a single exact product. Every other
    row reads `shift` there, so all logits lie in [4, 8), as the log-probs do (about -5.7): a log-softmax then
    subtracts exactly and keeps the one-ulp gap (near 0, where a tiny model's logits are, it would merge the two).
    Where `logit` beats the other tokens, greedy decoding must pick the higher id. Returns the model."""
    import torch

    low, high = NEAR_TIE_TOKENS
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight[dim], norm.bias[dim] = 0.0, 1.0
        out = model.get_output_embeddings().weight  # (V, H)
        out[:, dim] = shift
        out[[low, high]] = 0.0
        out[high, dim] = logit
        out[low, dim] = torch.nextafter(out[high, dim], torch.tensor(-math.inf))
    return model


def near_tie_steps(scores):
    """(B, N, V) scores of a model from add_near_tie -> (B, N) bool: the steps where the built tie decided (its
    two tokens the top two, one ulp apart)."""
    import torch

    top = scores.topk(2, dim=-1)
    low, high = NEAR_TIE_TOKENS
    return ((top.indices[..., 0] == high) & (top.indices[..., 1] == low)
            & (top.values[..., 1] == torch.nextafter(top.values[..., 0], torch.tensor(-math.inf))))


def assert_only_the_built_tie(scores) -> None:
    """A near-tie test's premise: the built tie decides at some steps of `scores` (B, N, V), and every other step
    leads clearly (assert_clear_lead), so the test's outcome turns on the built tie alone."""
    tie = near_tie_steps(scores)
    assert 0 < int(tie.sum()) < tie.numel(), f"the built tie decides {int(tie.sum())} of {tie.numel()} steps"
    assert_clear_lead(scores[~tie])


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir) -> dict[str, Path]:
    """Saved tiny models sharing the tiny tokenizer: small_base, small_tuned (other seed), large (wider, deeper).
    Their embeddings are padded past the tokenizer's size, as Pythia's are."""
    root = tmp_path_factory.mktemp("models")
    vocab = len(tiny_tokenizer)
    specs = {
        "small_base": dict(seed=0, hidden_size=32, num_layers=2),
        "small_tuned": dict(seed=1, hidden_size=32, num_layers=2),
        "large": dict(seed=2, hidden_size=64, num_layers=3),
    }
    out = {}
    for name, spec in specs.items():
        model = make_tiny_model(vocab, padded_vocab=vocab + 12, **spec)
        path = root / name
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        out[name] = path
    return out
