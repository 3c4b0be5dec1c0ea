"""DPO's preference pairs: from a rated workbook or a pairs file, split into train and held-out."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from proxytune.foundation.errors import UsageError
from proxytune.preference.arguments import RLArguments
from proxytune.task.papers import load_all_papers
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_prompt, encode_target
from proxytune.workbook.judgments import judgment_record, read_judgments

logger = logging.getLogger(__name__)


def read_ratings(path: Path) -> list[dict]:
    """The judgments of a workbook (.xlsx, through read_judgments) or of its ratings.jsonl, as the
    records of ratings.jsonl (judgment_record)."""

    if not path.is_file():
        raise UsageError(f"--workbook {path} does not exist; pass evaluation.py's eval_examples.xlsx or ratings.jsonl")
    if path.suffix.lower() == ".xlsx":
        return [judgment_record(j) for j in read_judgments(path).all()]
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"--workbook {path} line {n} is not JSON ({err.msg}); pass ratings.jsonl as "
                                 "evaluation.py or workbook.py wrote it") from None
    return records


def read_eos_flags(directory: Path) -> dict[tuple[str, str], tuple[str, bool]]:
    """{(example_id, system): (prediction, ended_with_eos)} from predictions.jsonl beside the workbook, if any."""
    path = directory / "predictions.jsonl"
    if not path.is_file():
        return {}
    flags = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            rec = json.loads(line)
            flags[(str(rec["example_id"]), rec["system"])] = (rec.get("prediction", ""),
                                                              bool(rec.get("ended_with_eos")))
    return flags


def pairs_from_ratings(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Preference pairs from ratings.jsonl records: for each paper, every two rated outputs with different ratings
    (the higher chosen), and every pairwise choice with a winner. Returns (pairs, counts).

    A pair is {example_id, chosen_system, rejected_system, chosen, rejected}.
    >>> recs = [{"type": "rating", "example_id": "p", "system": "a", "rating": 4, "output": "x"},
    ...         {"type": "rating", "example_id": "p", "system": "b", "rating": 2, "output": "y"}]
    >>> pairs_from_ratings(recs)[0][0]["chosen"]
    'x'
    """
    by_paper: dict[str, list[dict]] = {}
    pairs, counts = [], {"ratings": 0, "choices": 0, "ties": 0}
    for rec in records:
        if rec.get("type") == "rating" and isinstance(rec.get("rating"), (int, float)) and rec.get("output"):
            counts["ratings"] += 1
            by_paper.setdefault(str(rec["example_id"]), []).append(rec)
        elif rec.get("type") == "pairwise" and rec.get("choice") not in (None, ""):
            counts["choices"] += 1
            if not rec.get("winner"):
                counts["ties"] += 1
                continue
            outputs = rec.get("outputs") or {}
            if outputs.get(rec["winner"]) and outputs.get(rec["loser"]):
                pairs.append({"example_id": str(rec["example_id"]), "chosen_system": rec["winner"],
                              "rejected_system": rec["loser"], "chosen": outputs[rec["winner"]],
                              "rejected": outputs[rec["loser"]]})
    for example_id, rated in by_paper.items():
        for i, a in enumerate(rated):
            for b in rated[i + 1:]:
                if a["rating"] == b["rating"]:
                    counts["ties"] += 1
                    continue
                hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
                pairs.append({"example_id": example_id, "chosen_system": hi["system"], "rejected_system": lo["system"],
                              "chosen": hi["output"], "rejected": lo["output"]})
    return pairs, counts


def completion_ids(text: str, ended_with_eos: bool, tokenizer, cap: int) -> list[int]:
    """A rated output as the model wrote it: " " + text (encode_target's rule), with the EOS id only if it ended
    with one; cut to `cap` tokens (a cut output loses its EOS, as a truncated generation has none)."""
    ids = encode_target(text.strip(), tokenizer)
    ids = ids if ended_with_eos else ids[:-1]
    return ids[:cap]


def build_workbook_pairs(args: RLArguments, tokenizer, max_length: int,
                         template: PromptTemplate = DEFAULT_TEMPLATE) -> list[dict]:
    """Tokenized pairs {example_id, prompt_ids, chosen_ids, rejected_ids} from --workbook, prompts from the papers."""
    path = Path(args.workbook)
    records = read_ratings(path)
    pairs, counts = pairs_from_ratings(records)
    if counts["ratings"] == 0 and counts["choices"] == 0:
        raise UsageError(f"--workbook {path} holds no ratings or pairwise choices; rate outputs in its Review sheet "
                         "(1-5) or choose in its Pairwise sheet, save it and run again")
    if not pairs:
        raise UsageError(f"--workbook {path}: all {counts['ties']} rated pairs are ties ({counts['ratings']} ratings, "
                         f"{counts['choices']} choices), so nothing is preferred; rate outputs of a paper differently")
    papers = load_all_papers(args.dataset_path)
    missing = sorted({p["example_id"] for p in pairs} - papers.keys())
    if missing:
        raise UsageError(f"--workbook {path} rates {len(missing)} papers that --dataset_path {args.dataset_path} does "
                         f"not have (e.g. example_id {missing[0]}); pass the dataset the workbook was made from")
    eos_flags = read_eos_flags(path.parent)
    if not eos_flags:
        logger.warning("no predictions.jsonl beside %s: whether each output ended with EOS is unknown, so no EOS is "
                       "trained on", path)
    cap = max_length // 2

    def ids_of(pair: dict, which: str) -> list[int]:
        text = pair[which]
        known = eos_flags.get((pair["example_id"], pair[f"{which}_system"]))
        ended = bool(known and known[1] and known[0].strip() == text.strip())
        return completion_ids(text, ended, tokenizer, cap)

    out = []
    for pair in pairs:
        chosen, rejected = ids_of(pair, "chosen"), ids_of(pair, "rejected")
        prompt, _ = build_prompt(papers[pair["example_id"]]["reviews"], tokenizer,
                                 max_length - max(len(chosen), len(rejected)), template)
        out.append({"example_id": pair["example_id"], "prompt_ids": tokenizer(prompt, add_special_tokens=False)[
            "input_ids"], "chosen_ids": chosen, "rejected_ids": rejected})
    logger.info("%s: %d ratings and %d pairwise choices -> %d preference pairs over %d papers (%d ties skipped)", path,
                counts["ratings"], counts["choices"], len(out), len({p["example_id"] for p in out}), counts["ties"])
    return out


def build_file_pairs(path: Path, tokenizer, max_length: int) -> list[dict]:
    """Tokenized pairs from a JSONL of {prompt, chosen, rejected}; the prompt is used as written."""
    if not path.is_file():
        raise UsageError(f"--pairs_file {path} does not exist; pass a JSONL of {{prompt, chosen, rejected}}")
    eos = tokenizer.eos_token
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"--pairs_file {path} line {n} is not JSON ({err.msg})") from None
        texts = [rec.get(k) if isinstance(rec, dict) else None for k in ("prompt", "chosen", "rejected")]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise UsageError(f"--pairs_file {path} line {n} needs non-empty text fields prompt, chosen and rejected")
        prompt, chosen, rejected = texts
        ids = [completion_ids(t.removesuffix(eos), t.rstrip().endswith(eos), tokenizer, max_length // 2)
               for t in (chosen, rejected)]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - max(map(len, ids)))):]  # keep the cue at the end
        out.append({"example_id": str(rec.get("example_id", f"line-{n}")), "prompt_ids": prompt_ids,
                    "chosen_ids": ids[0], "rejected_ids": ids[1]})
    same = sum(p["chosen_ids"] == p["rejected_ids"] for p in out)
    out = [p for p in out if p["chosen_ids"] != p["rejected_ids"]]
    if same:
        logger.warning("%s: skipped %d pairs whose chosen and rejected texts are the same", path, same)
    return out


def split_pairs(pairs: list[dict], percentage: float, min_pairs: int, seed: int, source: str):
    """(train, held out): the pairs of a seeded `percentage` of the papers are held out (whole papers, so a held-out
    margin is measured on papers the policy was not trained on). Refuses fewer than `min_pairs` training pairs."""
    papers = sorted({p["example_id"] for p in pairs})
    n_held = int(len(papers) * percentage / 100)
    held = set(random.Random(seed).sample(papers, n_held)) if n_held else set()
    train = [p for p in pairs if p["example_id"] not in held]
    heldout = [p for p in pairs if p["example_id"] in held]
    if len(train) < min_pairs:
        raise UsageError(f"{source} gives {len(train)} training preference pairs ({len(heldout)} more held out), fewer "
                         f"than --min_pairs {min_pairs}; rate more outputs, or lower --min_pairs")
    return train, heldout
