"""The flags of processing_meta_review.py: which data to read, how to clean, split and tokenize it."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxytune.foundation.errors import raise_problems
from proxytune.foundation.validation import SEED_MAX, number_problems

DEFAULT_DATASET = "zqz979/meta-review"


# --prompt_template's help (proxytune/task/prompts.py: TEMPLATES, load_template); the scripts that read a run's record
# add where their default comes from.
TEMPLATE_HELP = ("The prompt template: meta_review (reviews -> meta-review), alpaca (Stanford Alpaca's instruction, "
                 "input -> response), or a file: text with the fields {reviews}, or {instruction} and {input} (one "
                 "trailing newline is dropped), or a prompt_template.json a run wrote.")


# The fewest review tokens a prompt may keep; below this the target leaves no room for the reviews.
MIN_REVIEW_TOKENS = 16


# Columns with a paper's labels, kept beside Input/Output when the source has them (MReD: the venue's decision and the
# reviewers' average rating).
LABEL_COLUMNS = ("decision", "avg_rating")


@dataclass
class ProcessingArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub dataset id; a local .jsonl/.json/.csv/.parquet file (.jsonl/.json/.csv also compressed: "
                  ".gz/.bz2/.xz/.zst); a directory of such files (split by name: train/validation/test); or a "
                  "save_to_disk directory."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    input_column: str = field(
        default="Input",
        metadata={"help": "Column with the reviews: a string, or a list of strings / of dicts with a 'review' key."},
    )
    output_column: str = field(
        default="Output", metadata={"help": "Column with the meta-review. Alpaca-style data (instruction, input, "
                                    "output columns, no Input/Output) is read as instruction + input -> output."})
    review_separator: str | None = field(
        default=None,
        metadata={"help": "Split a string input column into several reviews at this separator (each then keeps "
                  "a fair share of the token budget). Default: the whole string is one review."},
    )
    prompt_template: str = field(default="meta_review", metadata={"help": TEMPLATE_HELP})
    tokenizer_name: str = field(
        default="EleutherAI/pythia-70m",
        metadata={"help": "Tokenizer (Hub id or local dir) used to measure and tokenize."},
    )
    max_length: int = field(
        default=2048, metadata={"help": "Tokens per example, prompt + target. Pythia's context is 2048."}
    )
    clean: str = field(
        default="whitespace",
        metadata={"help": "Text cleaning: 'whitespace' (normalise spaces, MReD <sep> markers to line breaks), "
                  "'alnum' (the original project's filter: whitespace plus keep only a-zA-Z0-9), or 'none'.",
                  "choices": ["whitespace", "alnum", "none"]},
    )
    min_target_words: int = field(default=10, metadata={"help": "Drop meta-reviews shorter than this (words)."})
    max_target_words: int = field(default=1000, metadata={"help": "Drop meta-reviews longer than this (words)."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Share of rows for validation when the source has no validation split."}
    )
    test_split_percentage: float = field(
        default=10.0, metadata={"help": "Share of rows for test when the source has no test split."}
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Keep at most this many rows per split (debugging)."}
    )
    label_columns: list[str] = field(
        default_factory=lambda: list(LABEL_COLUMNS),
        metadata={"help": "Label columns kept beside Input/Output when the source has them ('decision' is normalised "
                  "by DECISION_MAP: accept/reject); counted per split in stats.json."},
    )
    stratify_by_column: str | None = field(
        default=None,
        metadata={"help": "Split so that each value of this label column (e.g. decision) has the same share in train, "
                  "validation and test. Default: a plain seeded split."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    output_dir: str = field(default="outputs/meta_review", metadata={"help": "Where the processed dataset goes."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the processed dataset to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub dataset as private."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow a Hub dataset/tokenizer to run its own code."}
    )

    def __post_init__(self):
        # --max_length's lower bound depends on the tokenizer: check_max_length, once it is loaded.
        problems = number_problems(self, {
            "min_target_words": "[0, inf)", "max_target_words": "[0, inf)", "validation_split_percentage": "[0, 100)",
            "test_split_percentage": "[0, 100)", "max_examples": "[1, inf)", "seed": f"[0, {SEED_MAX}]"})
        if self.max_target_words < self.min_target_words:
            problems.append(
                f"--min_target_words {self.min_target_words} / --max_target_words {self.max_target_words} "
                "must satisfy 0 <= min <= max"
            )
        if self.validation_split_percentage + self.test_split_percentage >= 100:
            problems.append("--validation_split_percentage + --test_split_percentage must leave rows for training")
        if self.push_to_hub and not self.hub_dataset_id:
            problems.append("--push_to_hub needs --hub_dataset_id (e.g. your-name/meta-review-processed)")
        if self.review_separator == "":
            problems.append("--review_separator must not be empty")
        if self.stratify_by_column and self.stratify_by_column not in self.label_columns:
            problems.append(f"--stratify_by_column {self.stratify_by_column} must be one of --label_columns "
                            f"({', '.join(self.label_columns) or 'none'})")
        raise_problems(problems)
