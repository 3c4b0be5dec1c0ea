"""processing_meta_review.py: sources, cleaning, splits, truncation rule, template/EOS, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PYTHIA_TOKENIZER, ROOT, SHARED_DATA, make_rows, requires_shared

from processing_meta_review import main
from proxytune.foundation.errors import UsageError
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.processing import split_rows
from proxytune.task.prompts import render_prompt
from proxytune.task.reviews import clean_text


def run(tmp_path, tokenizer_dir, data, **kw):
    args = ProcessingArguments(
        dataset_name=str(data), tokenizer_name=str(tokenizer_dir), output_dir=str(tmp_path / "out"),
        max_length=kw.pop("max_length", 256), min_target_words=kw.pop("min_target_words", 5), **kw,
    )
    return args, main(args)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_end_to_end_splits_stats_and_template(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    from datasets import load_from_disk

    rows = make_rows(40)
    rows += [rows[0], {"Input": "", "Output": "x " * 20}, {"Input": "ok review", "Output": None},
             {"Input": "fine review", "Output": "too short"}, {"Input": "long review", "Output": "word " * 2000}]
    args, stats = run(tmp_path, tiny_tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows))
    assert stats["rows_in_total"] == 45 and stats["rows_kept_total"] == 40
    assert stats["dropped"] == {"duplicate": 1, "empty_reviews": 1, "empty_meta_review": 1,
                                "meta_review_too_short": 1, "meta_review_too_long": 1}
    out = tmp_path / "out"
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert (out / "prompt_template.txt").is_file() and (out / "processing_config.json").is_file()
    ds = load_from_disk(str(out))
    assert {k: len(v) for k, v in ds.items()} == {"train": 32, "validation": 4, "test": 4}
    ids = [set(ds[s]["example_id"]) for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # no example in two splits
    ex = ds["train"][0]
    assert ex["prompt"] == render_prompt(ex["reviews"]) and ex["prompt"].endswith("Meta-review:")
    assert ex["target"] == " " + ex["Output"] + tiny_tokenizer.eos_token
    target_ids = tiny_tokenizer(" " + ex["Output"])["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert ex["input_ids"][ex["prompt_length"]:] == target_ids  # the target ends with EOS
    assert ex["input_ids"][: ex["prompt_length"]] == tiny_tokenizer(ex["prompt"])["input_ids"]
    assert "<sep>" not in ex["Input"] and "\n" in ex["Input"]  # MReD markers became line breaks


def test_split_is_seeded_and_deterministic():
    rows = [{"i": i} for i in range(100)]
    a, b, c = split_rows(rows, 10, 20, 1), split_rows(rows, 10, 20, 1), split_rows(rows, 10, 20, 2)
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "validation", "test")] == [70, 10, 20]
    assert sorted(r["i"] for s in a.values() for r in s) == list(range(100))


def test_existing_splits_kept_and_deduplicated(tmp_path, tiny_tokenizer_dir):
    from datasets import Dataset, DatasetDict, load_from_disk

    rows = make_rows(30)
    src = DatasetDict({"train": Dataset.from_list(rows[:25]), "test": Dataset.from_list(rows[20:])})
    src.save_to_disk(str(tmp_path / "src"))
    _, stats = run(tmp_path, tiny_tokenizer_dir, tmp_path / "src", validation_split_percentage=20)
    ds = load_from_disk(str(tmp_path / "out"))
    assert len(ds["test"]) == 10  # the source's test split is kept whole
    assert stats["dropped"] == {"duplicate": 5}  # rows 20-24 were in both: they stay in test only
    assert len(ds["train"]) + len(ds["validation"]) == 20 and len(ds["validation"]) == 4
    assert not set(ds["train"]["example_id"]) & set(ds["test"]["example_id"])


def test_truncation_cuts_reviews_never_target(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    from datasets import load_from_disk

    rows = [{"Input": [f"Reviewer {k} of paper {i}: " + "the experiments are weak and " * 60 for k in range(3)],
             "Output": f"Paper {i}: the reviewers agree the experiments are weak. Reject."} for i in range(10)]
    _, stats = run(tmp_path, tiny_tokenizer_dir, write_jsonl(tmp_path / "long.jsonl", rows), max_length=160)
    assert stats["prompts_truncated"] == 10
    for split in load_from_disk(str(tmp_path / "out")).values():
        for ex in split:
            assert len(ex["input_ids"]) <= 160 and ex["truncated"]
            assert all(f"Reviewer {k} of" in ex["prompt"] for k in range(3))  # each review keeps a share
            assert ex["input_ids"][-1] == tiny_tokenizer.eos_token_id
            target = tiny_tokenizer(" " + ex["Output"])["input_ids"]
            assert ex["input_ids"][ex["prompt_length"]:-1] == target


def test_target_too_long_for_max_length_is_dropped_and_counted(tmp_path, tiny_tokenizer_dir):
    rows = make_rows(12) + [{"Input": "a review", "Output": "very long meta review " * 60}]
    _, stats = run(tmp_path, tiny_tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows), max_length=128)
    assert stats["dropped"] == {"meta_review_exceeds_max_length": 1}


def test_review_separator_splits_string_input(tmp_path, tiny_tokenizer_dir):
    from datasets import load_from_disk

    rows = [{"Input": f"first review {i} ||| second review {i}", "Output": f"meta review {i} " * 3} for i in range(10)]
    run(tmp_path, tiny_tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows), review_separator="|||")
    ex = load_from_disk(str(tmp_path / "out"))["train"][0]
    assert len(ex["reviews"]) == 2 and ex["reviews"][0].startswith("first review")


def test_alnum_cleaning_is_an_option():
    assert clean_text("Good!  <sep> score: 9/10.", "alnum") == "Good\nscore 910"
    assert clean_text("Good!  <sep> score: 9/10.", "whitespace") == "Good!\nscore: 9/10."


def test_csv_and_parquet_sources(tmp_path, tiny_tokenizer_dir):
    import pandas as pd

    frame = pd.DataFrame(make_rows(20)).rename(columns={"Input": "reviews_text", "Output": "meta"})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        _, stats = run(tmp_path, tiny_tokenizer_dir, tmp_path / name, input_column="reviews_text",
                       output_column="meta", overwrite_output_dir=True)
        assert stats["rows_kept_total"] == 20


BAD_INPUTS = {
    "missing_file": (lambda p: p / "nope.jsonl", "does not exist"),
    "empty_file": (lambda p: (p / "e.jsonl").write_text("") and None or p / "e.jsonl", "is empty"),
    "non_utf8": (lambda p: (p / "l.jsonl").write_bytes(b'{"Input": "caf\xe9", "Output": "x"}\n') and p / "l.jsonl",
                 "not UTF-8"),
    "not_json": (lambda p: (p / "n.jsonl").write_text("Input,Output\na,b\n") and p / "n.jsonl", "cannot read"),
    "not_parquet": (lambda p: (p / "n.parquet").write_text("hello") and p / "n.parquet", "not a Parquet file"),
    "missing_column": (lambda p: write_jsonl(p / "m.jsonl", [{"Input": "a", "Summary": "b"}]),
                       "column 'Output' not found"),
    "unknown_extension": (lambda p: (p / "d.xml").write_text("<a/>") and p / "d.xml", "unknown extension"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_fail_cleanly(tmp_path, tiny_tokenizer_dir, case):
    make, needle = BAD_INPUTS[case]
    data = make(tmp_path)
    with pytest.raises(UsageError, match=needle) as err:
        run(tmp_path, tiny_tokenizer_dir, data)
    assert str(data.name) in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_arguments(tmp_path, tiny_tokenizer_dir, jsonl_file):
    with pytest.raises(UsageError, match="max_length"):
        run(tmp_path, tiny_tokenizer_dir, jsonl_file, max_length=8)
    with pytest.raises(UsageError, match="hub_dataset_id"):
        run(tmp_path, tiny_tokenizer_dir, jsonl_file, push_to_hub=True)
    with pytest.raises(UsageError, match="tokenizer"):
        run(tmp_path, tmp_path / "no_tokenizer", jsonl_file)
    run(tmp_path, tiny_tokenizer_dir, jsonl_file)
    with pytest.raises(UsageError, match="overwrite_output_dir"):
        run(tmp_path, tiny_tokenizer_dir, jsonl_file)


def test_cli_error_is_one_line_without_traceback(tmp_path, tiny_tokenizer_dir):
    cmd = [sys.executable, str(ROOT / "processing_meta_review.py"), "--dataset_name", str(tmp_path / "x.jsonl"),
           "--tokenizer_name", str(tiny_tokenizer_dir), "--output_dir", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: data file")


def test_cli_config_file_and_help(tmp_path, tiny_tokenizer_dir, jsonl_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset_name: {jsonl_file}\ntokenizer_name: {tiny_tokenizer_dir}\nmax_length: 100\nseed: 3\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(ROOT / "processing_meta_review.py"), str(cfg), "--max_length", "200",
                          "--min_target_words", "3", "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    saved = json.loads((out / "processing_config.json").read_text())
    assert (saved["max_length"], saved["seed"]) == (200, 3)  # the flag beat the file
    cfg.write_text("max_lenght: 100\n")
    res = subprocess.run([sys.executable, str(ROOT / "processing_meta_review.py"), str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "max_lenght" in res.stderr and str(cfg) in res.stderr
    assert "Traceback" not in res.stderr


@requires_shared
@pytest.mark.parametrize("name, n_rows", [("mred_val_longest.jsonl", 665), ("mred_val_allreviews.jsonl", 127),
                                          ("orsum_raw_sample.jsonl", 10)])
def test_real_data(tmp_path, name, n_rows):
    from datasets import load_from_disk

    args = ProcessingArguments(dataset_name=str(SHARED_DATA / name), tokenizer_name=str(PYTHIA_TOKENIZER),
                               output_dir=str(tmp_path / "out"), max_length=1024)
    stats = main(args)
    assert stats["rows_in_total"] == n_rows and stats["rows_kept_total"] + sum(stats["dropped"].values()) == n_rows
    ds = load_from_disk(str(tmp_path / "out"))
    assert sum(len(s) for s in ds.values()) == stats["rows_kept_total"]
    assert max(len(x) for s in ds.values() for x in s["input_ids"]) <= 1024
    assert all(x[-1] == 0 for s in ds.values() for x in s["input_ids"])  # Pythia's EOS ends every target
    if name == "orsum_raw_sample.jsonl":  # the nested reviews were found (entries without a 'review' text skipped)
        raw = [json.loads(line) for line in (SHARED_DATA / name).open()]
        n_reviews = sum(bool(r.get("review")) for row in raw for r in row["Review"])
        assert sum(len(r) for s in ds.values() for r in s["reviews"]) == n_reviews


def compress(path, suffix):
    """path -> path + suffix, compressed as the suffix says (the datasets library reads all four)."""
    import bz2
    import gzip
    import lzma

    data = path.read_bytes()
    out = path.with_name(path.name + suffix)
    if suffix == ".zst":
        zstandard = pytest.importorskip("zstandard")
        out.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
        with opener(out, "wb") as f:
            f.write(data)
    return out


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
def test_compressed_data_files(tmp_path, tiny_tokenizer_dir, suffix, ext):
    import pandas as pd

    plain = tmp_path / f"d{ext}"
    rows = make_rows(20)
    if ext == ".csv":
        pd.DataFrame(rows).to_csv(plain, index=False)
    else:
        write_jsonl(plain, rows)
    _, stats = run(tmp_path, tiny_tokenizer_dir, compress(plain, suffix))
    assert stats["rows_in_total"] == 20 and stats["rows_kept_total"] == 20


@pytest.mark.parametrize("case, needle", [
    ("corrupt_gzip", "is not a valid gzip file"),
    ("non_utf8_inside_gzip", r"is not UTF-8 \(line 2\)"),
    ("bad_json_inside_xz", "line 1 is not JSON"),
    ("empty_inside_bz2", "is empty"),
    ("gzipped_parquet", "Parquet compresses its columns itself"),
])
def test_bad_compressed_files_fail_cleanly(tmp_path, tiny_tokenizer_dir, case, needle):
    import pandas as pd

    if case == "corrupt_gzip":
        data = tmp_path / "d.jsonl.gz"
        data.write_bytes(compress(write_jsonl(tmp_path / "d.jsonl", make_rows(4)), ".gz").read_bytes()[:30])
    elif case == "non_utf8_inside_gzip":
        (tmp_path / "d.jsonl").write_bytes(b'{"Input": "a", "Output": "b"}\n{"Input": "caf\xe9", "Output": "b"}\n')
        data = compress(tmp_path / "d.jsonl", ".gz")
    elif case == "bad_json_inside_xz":
        (tmp_path / "d.jsonl").write_text("Input,Output\na,b\n")
        data = compress(tmp_path / "d.jsonl", ".xz")
    elif case == "empty_inside_bz2":
        (tmp_path / "d.jsonl").write_text("")
        data = compress(tmp_path / "d.jsonl", ".bz2")
    else:
        pd.DataFrame(make_rows(4)).to_parquet(tmp_path / "d.parquet")
        data = compress(tmp_path / "d.parquet", ".gz")
    with pytest.raises(UsageError, match=needle) as err:
        run(tmp_path, tiny_tokenizer_dir, data)
    assert data.name in str(err.value)
    assert not (tmp_path / "out").exists()


def test_non_text_targets_are_counted_under_their_own_reason(tmp_path, tiny_tokenizer_dir):
    rows = make_rows(20) + [{"Input": "a fine review of the paper", "Output": 7},
                            {"Input": "another fine review", "Output": ["accept", "reject"]},
                            {"Input": 42, "Output": "a meta-review long enough to keep here"},
                            {"Input": "a review", "Output": ""}]
    _, stats = run(tmp_path, tiny_tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows))
    assert stats["dropped"] == {"meta_review_not_text": 2, "reviews_not_text": 1, "empty_meta_review": 1}
    assert stats["rows_kept_total"] == 20


@pytest.mark.parametrize("column, values, needle", [
    ("Output", [3, 5, 8], "column 'Output' of .* holds int values, not text .*--output_column"),
    ("Output", [[1, 2], [3]], "column 'Output' of .* holds list values"),
    ("Input", [1.5, 2.5, 3.5], "column 'Input' of .* holds float values, not text .*--input_column"),
])
def test_a_column_that_is_not_text_is_one_error(tmp_path, tiny_tokenizer_dir, column, values, needle):
    rows = [{**row, column: v} for row, v in zip(make_rows(len(values)), values)]
    with pytest.raises(UsageError, match=needle):
        run(tmp_path, tiny_tokenizer_dir, write_jsonl(tmp_path / "d.jsonl", rows))
    assert not (tmp_path / "out").exists()


def test_directory_of_data_files_is_split_by_name(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    rows = make_rows(30)
    write_jsonl(src / "train.jsonl", rows[:20])
    compress(write_jsonl(src / "mred_val.jsonl", rows[20:25]), ".gz").rename(src / "mred_val.jsonl.gz")
    (src / "mred_val.jsonl").unlink()
    write_jsonl(src / "test.jsonl", rows[25:])
    (src / "README.md").write_text("not data")
    _, stats = run(tmp_path, tiny_tokenizer_dir, src)
    assert stats["rows_kept"] == {"test": 5, "validation": 5, "train": 20}


def test_directory_without_data_says_what_to_pass(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(UsageError, match=r"directory without a dataset.*pass a data file \(\.jsonl.*named by split"):
        run(tmp_path, tiny_tokenizer_dir, tmp_path / "notes")


@pytest.mark.parametrize("flags, needle", [
    (["--validation_split_percentage", "nan"], "--validation_split_percentage nan is not a number"),
    (["--test_split_percentage", "inf"], "--test_split_percentage inf is not a finite float32 number"),
    (["--validation_split_percentage", "1e39"], "--validation_split_percentage 1e+39 is not a finite float32"),
    (["--seed", "-1"], "--seed -1 must be in [0, 4294967295]"),
    (["--seed", str(2**40)], "--seed 1099511627776 must be in"),
    (["--max_examples", "0"], "--max_examples 0 must be >= 1"),
    (["--min_target_words", "-3"], "--min_target_words -3 must be >= 0"),
])
def test_numbers_are_finite_and_in_range(flags, needle):
    from proxytune.foundation.config import parse_config

    with pytest.raises(UsageError) as err:
        parse_config([ProcessingArguments], flags)
    assert needle in str(err.value)


def test_too_small_max_length_hint_is_the_real_minimum(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, jsonl_file):
    """One number, from the tokenizer, in every case and script: the smallest --max_length that works."""
    from proxytune.task.processing import min_max_length

    needed = min_max_length(tiny_tokenizer)
    for too_small in (0, 8, needed - 1):
        with pytest.raises(UsageError, match=f"use at least {needed} "):
            run(tmp_path, tiny_tokenizer_dir, jsonl_file, max_length=too_small)
    write_jsonl(tmp_path / "short.jsonl", [{"Input": f"review {i}", "Output": "a"} for i in range(10)])  # ' a': 1 token
    _, stats = run(tmp_path, tiny_tokenizer_dir, tmp_path / "short.jsonl", max_length=needed, min_target_words=1)
    assert stats["rows_kept_total"] > 0


def test_full_disk_while_saving_leaves_nothing(tmp_path, tiny_tokenizer_dir, jsonl_file, monkeypatch):
    import errno

    import datasets

    def full(self, path, *a, **kw):
        (Path(path) / "data-00000.arrow").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", full)
    with pytest.raises(UsageError, match=r"no space left on the device of .*out \(.* free\); free some space"):
        run(tmp_path, tiny_tokenizer_dir, jsonl_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
