"""The steered model the integrations share (proxytune/integrations/steered.py): the blend from its sources, and
decoding that stops at stop sequences, in the plain loop and speculatively."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model

from proxytune.foundation.errors import UsageError
from proxytune.integrations.steered import SteeredModel, cut_at_stop, resolve_blend
from proxytune.steering.blend import Blend


@pytest.fixture(scope="module")
def steered_models(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    return {"large": make_tiny_model(vocab, seed=2, hidden_size=64, num_layers=3).double(),
            "small_base": make_tiny_model(vocab, seed=0).double(),
            "small_tuned": make_tiny_model(vocab, seed=1).double()}


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a.b\nc", ["\n", "."]) == ("a", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)


def test_resolve_blend_takes_one_source(tmp_path):
    assert resolve_blend() == Blend.from_alpha(1.0)
    assert resolve_blend(alpha=0.5) == Blend.from_alpha(0.5)
    assert resolve_blend(weights={"large_weight": 2.0}) == Blend(large_weight=2.0)
    (tmp_path / "blend.json").write_text(json.dumps({"alpha": 0.25}))
    assert resolve_blend(str(tmp_path / "blend.json")) == Blend.from_alpha(0.25)
    with pytest.raises(UsageError, match="not blend and alpha"):
        resolve_blend(str(tmp_path / "blend.json"), alpha=1.0)


@pytest.mark.parametrize("speculative", [True, False])
def test_generation_stops_at_the_first_stop_sequence(steered_models, tiny_tokenizer, speculative):
    """A stop sequence taken from the row's own unstopped output: the stopped row is that output cut before it, its
    tokens end with the one that completed it, and a row without it runs on to max_new_tokens."""
    model = SteeredModel(steered_models, tiny_tokenizer, Blend.from_alpha(1.0), speculative=speculative)
    prompts = [tiny_tokenizer.encode(t) for t in ("Meta-review:", "The paper proposes a new method")]
    free = model.generate(prompts, max_new_tokens=16)
    assert [c.finish_reason for c in free] == ["length", "length"] and all(len(c.tokens) == 16 for c in free)
    text = free[0].text
    # two characters of row 0's text past its start, whole (no replacement character), not in row 1's text
    stop = next(c for c in (text[i:i + 2] for i in range(2, len(text) - 1))
                if c.strip() and "\ufffd" not in c and c not in free[1].text)
    stopped = model.generate(prompts, max_new_tokens=16, stop=[stop])
    assert stopped[0].text == text[:text.index(stop)] and stopped[0].finish_reason == "stop"
    n = len(stopped[0].tokens)
    assert stopped[0].tokens == free[0].tokens[:n]
    assert stop in tiny_tokenizer.decode(stopped[0].tokens)
    assert stop not in tiny_tokenizer.decode(free[0].tokens[:n - 1])
    assert stopped[1].text == free[1].text and stopped[1].finish_reason == "length"
