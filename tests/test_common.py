"""The shared helpers: config cascade, prompt template and fair truncation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from conftest import PYTHIA_TOKENIZER, requires_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytune.foundation.config import parse_config, to_jsonable
from proxytune.foundation.errors import UsageError
from proxytune.foundation.hub import hub_is_unreachable
from proxytune.foundation.outputs import atomic_directory
from proxytune.task.prompts import (
    PROMPT_TEMPLATE,
    allocate_budget,
    build_prompt,
    clean_whitespace,
    render_prompt,
    render_target,
)


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


def test_only_credentials_are_redacted_not_settings_that_mention_tokens():
    @dataclass
    class Settings:
        token: str = "hf_a"
        push_to_hub_token: str = "hf_b"
        api_key: str = "sk-c"
        stop_tokens: str = "\n\n"
        tokenizer_name: str = "EleutherAI/pythia-70m"
        eos_token: str = "<|endoftext|>"

    out = to_jsonable(Settings())
    assert [k for k, v in out.items() if v == "<redacted>"] == ["token", "push_to_hub_token", "api_key"]
    assert out["stop_tokens"] == "\n\n" and out["eos_token"] == "<|endoftext|>"


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
    from proxytune.models.loading import load_tokenizer

    tok = load_tokenizer(str(PYTHIA_TOKENIZER))
    reviews = [f"Reviewer {i}: " + "The proposed method is interesting, but the evaluation is limited. " * 200
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


# ---------------------------------------------------------------------------------------------
# Numbers, data files, the Hub, the disk
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, spec, expected", [
    (0.5, "(0, 1]", None),
    (1.5, "(0, 1]", "--x 1.5 must be in (0, 1]"),
    (0.0, "(0, inf)", "--x 0.0 must be > 0"),
    (-1, "[0, inf)", "--x -1 must be >= 0"),
    (float("nan"), "(0, inf)", "--x nan is not a number; pass a number > 0"),
    (float("inf"), "[0, inf)", "--x inf is not a finite float32 number (largest 3.4e+38); pass a number >= 0"),
    (1e39, "(-inf, inf)", "--x 1e+39 is not a finite float32 number (largest 3.4e+38); pass a finite number"),
    (-1e39, "[0, 1)", "--x -1e+39 is not a finite float32 number (largest 3.4e+38); pass a number in [0, 1)"),
    (3.4e38, "(-inf, inf)", None),
    (None, "(0, 1]", None),
    (True, "(5, 6)", None),
])
def test_number_problem(value, spec, expected):
    from proxytune.foundation.validation import number_problem

    assert number_problem("--x", value, spec) == expected


def test_number_problems_sweeps_every_float_field():
    from proxytune.foundation.validation import number_problems

    @dataclass
    class Flags:
        rate: float = float("nan")  # no rule given: still refused
        steps: int = 0
        name: str = "x"
        optional: float | None = None

    problems = number_problems(Flags(), {"steps": ("[1, inf)", "one at least")})
    assert problems == ["--rate nan is not a number; pass a finite number", "--steps 0 must be >= 1 (one at least)"]


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz", ".zst"])
def test_data_files_read_the_same_compressed_or_not(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    from proxytune.foundation.datafiles import read_data_head, read_data_text, split_compression

    text = '{"Input": "caf\u00e9", "Output": "ok"}\n' * 3
    raw = text.encode("utf-8")
    if suffix == ".zst":
        raw = pytest.importorskip("zstandard").ZstdCompressor().compress(raw)
    elif suffix:
        raw = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](raw)
    path = tmp_path / f"d.jsonl{suffix}"
    path.write_bytes(raw)
    assert split_compression(path) == (".jsonl", suffix or None)
    assert read_data_text(path, "--prompts_file") == text
    assert read_data_head(path, 4) == b'{"In'


def test_corrupt_and_non_utf8_compressed_files_name_the_flag(tmp_path):
    import gzip

    from proxytune.foundation.datafiles import read_data_text

    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:40])
    with pytest.raises(UsageError, match=r"--prompts_file .*t.jsonl.gz is not a valid gzip file .*re-compress it"):
        read_data_text(truncated, "--prompts_file")
    latin1 = tmp_path / "l.jsonl.gz"
    latin1.write_bytes(gzip.compress(b'{"a": 1}\n{"a": "caf\xe9"}\n'))
    with pytest.raises(UsageError, match=r"--prompts_file .*l.jsonl.gz is not UTF-8 \(line 2\)"):
        read_data_text(latin1, "--prompts_file")


@pytest.fixture
def hub_probe(monkeypatch):
    """The Hub probe with its per-process answer cleared, offline mode restored afterwards."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    except ImportError:
        pass
    hub_is_unreachable.cache_clear()
    yield lambda endpoint: monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    hub_is_unreachable.cache_clear()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_hub_is_told_within_seconds_and_switches_to_the_cache(hub_probe):
    """huggingface_hub would retry for ~23 s per file (1 + 2 + 4 + 8 + 8 s of back-off); the probe says it at once."""
    import time

    import huggingface_hub.constants as constants

    from proxytune.foundation.hub import hub_offline_reason
    from proxytune.models.loading import load_tokenizer

    hub_probe(f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(UsageError) as err:
        load_tokenizer("nobody-here/no-such-tokenizer", flag="--tokenizer_name")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "is unreachable and tokenizer 'nobody-here/no-such-tokenizer' is not in the local cache" in message
    assert "pass a local path with --tokenizer_name" in message and "HF_HUB_OFFLINE=1" in message
    assert constants.HF_HUB_OFFLINE is True  # later loads go straight to the cache
    assert hub_offline_reason().endswith("is unreachable")


def test_reachable_hub_is_left_alone(hub_probe):
    """Any HTTP answer means reachable: the libraries then talk to the Hub as they always do."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import huggingface_hub.constants as constants

    from proxytune.foundation.hub import hub_offline_reason

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_probe(f"http://127.0.0.1:{server.server_address[1]}")
        assert hub_offline_reason() is None and constants.HF_HUB_OFFLINE is False
    finally:
        server.shutdown()


def test_vocabulary_mismatch_names_every_model(tiny_tokenizer, tmp_path):
    from conftest import train_tiny_tokenizer

    from proxytune.models.loading import check_same_vocab, load_tokenizer

    other = load_tokenizer(str(train_tiny_tokenizer(tmp_path / "other", vocab_size=280)))
    with pytest.raises(UsageError) as err:
        check_same_vocab({"--large_model L": tiny_tokenizer, "--small_base_model S": tiny_tokenizer,
                          "--small_tuned_model T": other})
    assert ("tokenizers of --large_model L and --small_tuned_model T differ (--large_model L 300 tokens, "
            "--small_base_model S 300 tokens, --small_tuned_model T 280 tokens)") in str(err.value)


def test_write_error_names_the_space(tmp_path):
    import errno

    from proxytune.foundation.outputs import format_bytes, is_disk_full, write_error

    full = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(full)
    assert is_disk_full(RuntimeError("SafetensorError: ... No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    message = str(write_error(tmp_path / "out", full, "--output_dir", needed=2_500_000))
    assert message.startswith(f"no space left on the device of {tmp_path / 'out'} (")
    assert "about 2.5 MB needed" in message
    assert "permission" in str(write_error(tmp_path, OSError(errno.EACCES, "Permission denied"))).lower()
    assert (format_bytes(999), format_bytes(1536), format_bytes(3.2e9)) == ("999 B", "1.5 KB", "3.2 GB")
