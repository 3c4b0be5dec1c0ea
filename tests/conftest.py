"""Shared fixtures: a tiny BPE tokenizer trained in milliseconds, tiny GPT-NeoX models saved to tmp
directories, small meta-review fixtures, and access to ../shared (skipped with a reason if absent)."""

from __future__ import annotations

import json
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


def make_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, padded_vocab: int | None = None):
    """A random GPT-NeoX; `padded_vocab` > vocab_size mimics Pythia's 50,304-row embedding."""
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
    return GPTNeoXForCausalLM(config).eval()


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
