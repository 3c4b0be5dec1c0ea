"""The shared helpers: config cascade, prompt template and fair truncation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import (
    PROMPT_TEMPLATE,
    UsageError,
    allocate_budget,
    atomic_directory,
    build_prompt,
    clean_whitespace,
    parse_config,
    render_prompt,
    render_target,
    to_jsonable,
)
from conftest import PYTHIA_TOKENIZER, requires_shared


@dataclass
class Args:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    name: str = "base"
    steps: int = 10
    flag: bool = False
    modules: list[str] = field(default_factory=lambda: ["dense"])
    mode: str = field(default="a", metadata={"choices": ["a", "b"]})


def write(path, obj):
    path.write_text(json.dumps(obj) if path.suffix == ".json" else "\n".join(f"{k}: {v}" for k, v in obj.items()))
    return path


def test_config_files_cascade_and_flags_win(tmp_path):
    a = write(tmp_path / "a.json", {"lr": 0.5, "name": "from_a", "flag": True, "modules": ["q", "k"]})
    b = write(tmp_path / "b.yaml", {"name": "from_b", "steps": 3})
    (args,) = parse_config([Args], [str(a), str(b)])
    assert (args.lr, args.name, args.steps, args.flag, args.modules) == (0.5, "from_b", 3, True, ["q", "k"])
    (args,) = parse_config([Args], [str(a), str(b), "--name", "cli", "--steps", "7"])
    assert (args.name, args.steps, args.lr) == ("cli", 7, 0.5)
    (args,) = parse_config([Args], [str(b), str(a)])
    assert args.name == "from_a" and args.steps == 3


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"stepz": 3}, "unknown key 'stepz'"),
        ({"steps": "many"}, "key 'steps' has value 'many'"),
        ({"lr": "fast"}, "key 'lr'"),
        ({"mode": "c"}, "choose one of"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, content, needle):
    path = write(tmp_path / "bad.yaml", content)
    with pytest.raises(UsageError) as err:
        parse_config([Args], [str(path)])
    assert needle in str(err.value) and str(path) in str(err.value)


def test_config_unknown_key_suggests_close_match(tmp_path):
    path = write(tmp_path / "c.json", {"step": 2})
    with pytest.raises(UsageError, match="did you mean 'steps'"):
        parse_config([Args], [str(path)])


def test_config_file_missing_or_not_a_mapping(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        parse_config([Args], [str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        parse_config([Args], [str(tmp_path / "list.yaml")])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_config([Args], [str(tmp_path / "broken.json")])


def test_to_jsonable_redacts_tokens():
    @dataclass
    class WithToken:
        hub_token: str = "hf_secret"
        max_new_tokens: int = 5

    out = to_jsonable(WithToken())
    assert out["hub_token"] == "<redacted>" and out["max_new_tokens"] == 5


def test_template_and_target():
    prompt = render_prompt(["A.", "B."])
    assert prompt == PROMPT_TEMPLATE.format(reviews="A.\n\nB.")
    assert prompt.endswith("Meta-review:")
    assert render_target("Accept.", "<|endoftext|>") == " Accept.<|endoftext|>"


def test_clean_whitespace():
    assert clean_whitespace("  Good\t paper. <sep>  Weak  baselines.\n\n\n\nReject ") == (
        "Good paper.\nWeak baselines.\n\nReject"
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=8), st.integers(0, 2000))
def test_allocate_budget_is_fair_and_fits(lengths, budget):
    alloc = allocate_budget(lengths, budget)
    assert all(0 <= a <= n for a, n in zip(alloc, lengths))
    assert sum(alloc) == min(budget, sum(lengths))  # uses the whole budget, never more
    cut = [a for a, n in zip(alloc, lengths) if a < n]
    if cut:
        # Max-min fair: a truncated review gets at least as much as any other review (±1 for rounding).
        assert min(cut) >= max(alloc) - 1


def test_allocate_budget_example():
    assert allocate_budget([10, 100, 100], 110) == [10, 50, 50]


def test_build_prompt_fits_and_keeps_every_review(tiny_tokenizer):
    reviews = [f"Review number {i} says: " + "the experiments are weak and " * 40 for i in range(3)]
    full, truncated = build_prompt(reviews, tiny_tokenizer, None)
    assert not truncated and full == render_prompt(reviews)
    for budget in (60, 120, 250):
        prompt, truncated = build_prompt(reviews, tiny_tokenizer, budget)
        assert truncated
        assert len(tiny_tokenizer(prompt)["input_ids"]) <= budget
        assert prompt.startswith("Peer reviews of a paper:") and prompt.endswith("Meta-review:")
        for i in range(3):  # every review keeps its head, the last ones are not cut away
            assert f"Review number {i}" in prompt


def test_build_prompt_template_does_not_fit(tiny_tokenizer):
    with pytest.raises(UsageError, match="template alone"):
        build_prompt(["some review"], tiny_tokenizer, 3)


@requires_shared
def test_build_prompt_real_tokenizer_long_reviews():
    from common import load_tokenizer

    tok = load_tokenizer(str(PYTHIA_TOKENIZER))
    reviews = [("Reviewer %d: " % i) + "The proposed method is interesting, but the evaluation is limited. " * 200
               for i in range(4)]
    prompt, truncated = build_prompt(reviews, tok, 1000)
    n = len(tok(prompt)["input_ids"])
    assert truncated and 950 <= n <= 1000
    assert all(f"Reviewer {i}:" in prompt for i in range(4))


def test_atomic_directory_keeps_old_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(UsageError, match="overwrite_output_dir"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (out / "a.txt").read_text() == "second"
