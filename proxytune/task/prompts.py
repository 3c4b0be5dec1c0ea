"""The prompt: its template (named, from a file, or as a run recorded it), the target, and fitting the prompt's texts
into a token budget."""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_json

logger = logging.getLogger(__name__)

# The meta-review prompt, the default. The template a run used is recorded beside its outputs (write_template) and
# read back by the scripts that come after (choose_template), so training and inference never disagree.
# The target is " " + meta-review + EOS: the leading space keeps the token boundary after the cue
# clean, and the EOS is what teaches the model to stop.
PROMPT_TEMPLATE = "Peer reviews of a paper:\n\n{reviews}\n\nMeta-review:"


# Stanford Alpaca's prompts, with and without an input (github.com/tatsu-lab/stanford_alpaca, train.py's PROMPT_DICT).
ALPACA_TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")


ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


REVIEW_JOINER = "\n\n"


TEMPLATE_FIELDS = ("reviews", "instruction", "input")


# Where a run records its template: the full record (read back), and the text for people.
TEMPLATE_RECORD = "prompt_template.json"


TEMPLATE_TEXT = "prompt_template.txt"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with named fields, filled with a row's texts (the processed data's `reviews` column: a paper's
    reviews, or an instruction and its input). A template with {instruction} and {input} puts the first text in the
    instruction and the rest in the input, and uses `text_no_input` (Alpaca's second prompt) for a row with no input;
    a template with one field ({reviews}, or {instruction} alone) gets all the texts, joined by REVIEW_JOINER.

    `PromptTemplate("t", "Q: {instruction}\\n{input}\\nA:").render(["Add.", "2, 3"])` -> 'Q: Add.\\n2, 3\\nA:'.
    """

    name: str  # a TEMPLATES name, or where it came from (a file)
    text: str
    text_no_input: str | None = None

    def __post_init__(self):
        fields = template_fields(self.text, self.name)
        if "reviews" in fields and len(fields) > 1:
            raise UsageError(f"prompt template {self.name}: {{reviews}} and {{instruction}}/{{input}} cannot be mixed; "
                             "use {reviews}, or {instruction} and {input}")
        if self.text_no_input is not None and template_fields(self.text_no_input, self.name) - {"instruction"}:
            raise UsageError(f"prompt template {self.name}: the no-input text may only use {{instruction}}")

    @property
    def splits_input(self) -> bool:
        """Whether the first text is an instruction and the rest its input (the budget then cuts the input first)."""
        return {"instruction", "input"} <= template_fields(self.text, self.name)

    def render(self, texts: Sequence[str]) -> str:
        """The prompt for one row's texts (they are not cut here: build_prompt does that)."""
        if not self.splits_input:
            joined = REVIEW_JOINER.join(texts)
            return self.text.format(**{name: joined for name in template_fields(self.text, self.name)})
        instruction = texts[0] if texts else ""
        if len(texts) < 2 and self.text_no_input is not None:
            return self.text_no_input.format(instruction=instruction)
        return self.text.format(instruction=instruction, input=REVIEW_JOINER.join(texts[1:]))

    def describe(self) -> str:
        """The template for people (prompt_template.txt, model cards, evaluation's run record): its text, and the
        no-input text after it when it has one."""
        if self.text_no_input is None:
            return self.text
        return f"{self.text}\n\n(without an input:)\n\n{self.text_no_input}"

    def record(self) -> dict:
        """prompt_template.json's content and blend.json's `prompt_template`."""
        return {"name": self.name, "template": self.text, "template_no_input": self.text_no_input}

    def same_as(self, other: PromptTemplate) -> bool:
        """The same prompts, whatever the names."""
        return (self.text, self.text_no_input) == (other.text, other.text_no_input)


def template_fields(text: str, source: str) -> set[str]:
    """The fields of a template text: `template_fields("{instruction}: {input}", "f")` -> {'instruction', 'input'}.
    An unknown field, a format spec and a lone brace are refused, naming `source`."""
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)
                  if name is not None]
    except ValueError as err:
        raise UsageError(f"prompt template {source}: {err}; write {{{{ and }}}} for literal braces") from None
    for name, spec, conversion in parsed:
        if name not in TEMPLATE_FIELDS or spec or conversion:
            raise UsageError(f"prompt template {source}: unknown field {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}}; a template may use {{reviews}}, or {{instruction}} and "
                             "{input}")
    if not parsed:
        raise UsageError(f"prompt template {source} has no field; use {{reviews}}, or {{instruction}} and {{input}}")
    return {name for name, _, _ in parsed}


TEMPLATES = {"meta_review": PromptTemplate("meta_review", PROMPT_TEMPLATE),
             "alpaca": PromptTemplate("alpaca", ALPACA_TEMPLATE, ALPACA_NO_INPUT)}


DEFAULT_TEMPLATE = TEMPLATES["meta_review"]


def load_template(name_or_file: str, flag: str = "--prompt_template") -> PromptTemplate:
    """A template by name (TEMPLATES), from a text file, or from a prompt_template.json record."""
    if name_or_file in TEMPLATES:
        return TEMPLATES[name_or_file]
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag} {name_or_file} is neither a template name ({', '.join(TEMPLATES)}) nor a file; pass "
                         "one of them, or a text file with {reviews}, or {instruction} and {input}")
    if path.suffix == ".json":
        return read_template_record(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path} cannot be read: {err}") from None
    return PromptTemplate(name_or_file, text.removesuffix("\n"))


def template_from_record(data: object, source: str) -> PromptTemplate:
    """A template from its record (PromptTemplate.record: prompt_template.json, blend.json's `prompt_template`)."""
    if not isinstance(data, dict) or not isinstance(data.get("template"), str) \
            or not isinstance(data.get("template_no_input") or "", str):
        raise UsageError(f"prompt template record {source} needs a 'template' text (and optionally "
                         "'template_no_input'), as prompt_template.json holds")
    return PromptTemplate(str(data.get("name") or source), data["template"], data.get("template_no_input"))


def read_template_record(path: Path) -> PromptTemplate:
    """A prompt_template.json file's template."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"prompt template record {path} cannot be read: {err}") from None
    return template_from_record(data, str(path))


def write_template(directory: Path, template: PromptTemplate) -> None:
    """Record the template a run used: prompt_template.txt for people, prompt_template.json to be read back."""
    (directory / TEMPLATE_TEXT).write_text(template.describe() + "\n", encoding="utf-8")
    write_json(directory / TEMPLATE_RECORD, template.record())


def read_template(directory: str | Path | None) -> PromptTemplate | None:
    """The template a run recorded in `directory` (write_template), None if it holds no record (a Hub id, a model
    from elsewhere). A directory written before the record existed has only prompt_template.txt, which names a
    built-in template by its text."""
    if directory is None:
        return None
    path = Path(directory).expanduser()
    if (path / TEMPLATE_RECORD).is_file():
        return read_template_record(path / TEMPLATE_RECORD)
    if (path / TEMPLATE_TEXT).is_file():
        text = (path / TEMPLATE_TEXT).read_text(encoding="utf-8").removesuffix("\n")
        return next((t for t in TEMPLATES.values() if t.describe() == text), None)
    return None


def choose_template(given: str | None, recorded: Sequence[tuple[str, PromptTemplate | None]],
                    flag: str = "--prompt_template") -> PromptTemplate:
    """The template a run uses: `given` (a name or file) when the flag was given, else the first template
    `recorded` ([(where, template or None)]: the small tuned model's final/, a blend file, a processed dataset), else
    meta_review. Every recorded template that differs from the one used is logged as a warning, one line each."""
    records = [(where, template) for where, template in recorded if template is not None]
    if given is not None:
        chosen, source = load_template(given, flag), f"{flag} {given}"
    elif records:
        chosen, source = records[0][1], f"as {records[0][0]} records"
        logger.info("prompt template %s, %s", chosen.name, source)
    else:
        chosen, source = DEFAULT_TEMPLATE, "the default"
    for where, template in records:
        if not template.same_as(chosen):
            logger.warning("prompt template %s (%s) differs from %s, which %s records; the prompts will not be those "
                           "it was made with", chosen.name, source, template.name, where)
    return chosen


def render_prompt(reviews: Sequence[str], template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """Fill the template. `render_prompt(["Good paper.", "Weak baselines."])` gives
    'Peer reviews of a paper:\\n\\nGood paper.\\n\\nWeak baselines.\\n\\nMeta-review:'."""
    return template.render(reviews)


def render_target(meta_review: str, eos_token: str) -> str:
    """The training target: `render_target("Accept.", "<|endoftext|>")` -> ' Accept.<|endoftext|>'."""
    return " " + meta_review + eos_token


def encode_target(meta_review: str, tokenizer) -> list[int]:
    """The training target's ids: " " + meta-review, then the EOS id. The EOS is appended as an id, not as text,
    so a tokenizer that would split "<|endoftext|>" cannot change it. Training, tuning and evaluation all use this."""
    return tokenizer(" " + meta_review, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def allocate_budget(lengths: Sequence[int], budget: int) -> list[int]:
    """Share `budget` tokens among reviews of the given lengths, max-min fair ("water filling").

    Short reviews keep all their tokens; what they leave is shared equally by the long ones, so no
    review is cut to nothing because it came last. `allocate_budget([10, 100, 100], 110)` -> [10, 50, 50].
    """
    budget = max(budget, 0)
    alloc = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    remaining = budget
    for rank, i in enumerate(order):
        left = len(order) - rank
        share = remaining // left
        alloc[i] = min(lengths[i], share)
        remaining -= alloc[i]
    # Integer division may leave up to (n - 1) tokens; give them to truncated reviews, longest first.
    for i in sorted(order, key=lambda i: -lengths[i]):
        if remaining == 0:
            break
        if alloc[i] < lengths[i]:
            alloc[i] += 1
            remaining -= 1
    return alloc


def allocate_texts(lengths: Sequence[int], budget: int, instruction_first: bool) -> list[int]:
    """allocate_budget over a prompt's texts; with `instruction_first` (an {instruction}/{input} template) the first
    text, the instruction, keeps its tokens and the input gives way first:
    `allocate_texts([30, 100], 50, True)` -> [30, 20]; `allocate_texts([30, 100], 20, True)` -> [20, 0]."""
    if not instruction_first or len(lengths) < 2:
        return allocate_budget(lengths, budget)
    first = min(lengths[0], max(budget, 0))
    return [first, *allocate_budget(lengths[1:], budget - first)]


def build_prompt(reviews: Sequence[str], tokenizer, max_prompt_tokens: int | None,
                 template: PromptTemplate = DEFAULT_TEMPLATE) -> tuple[str, bool]:
    """Render the prompt so that `tokenizer(prompt)` has at most `max_prompt_tokens` tokens.

    The texts (reviews; or an instruction and its input) are cut token-wise (the head of each is kept): reviews share
    the budget fairly, an input is cut before its instruction (allocate_texts); the template itself is never cut.
    Returns (prompt, was_truncated).
    """
    prompt = template.render(reviews)
    if max_prompt_tokens is None:
        return prompt, False
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n_prompt <= max_prompt_tokens:
        return prompt, False
    overhead = len(tokenizer(template.render([""] * len(reviews)), add_special_tokens=False)["input_ids"])
    if overhead >= max_prompt_tokens:
        raise UsageError(
            f"the prompt template alone needs {overhead} tokens but only {max_prompt_tokens} are available; "
            "raise --max_length (or lower --max_new_tokens)"
        )
    review_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in reviews]
    budget = max_prompt_tokens - overhead
    # Decoding cut ids and re-encoding the text can merge tokens differently at the cut, so the
    # count is checked again and the budget shaved until the rendered prompt really fits.
    while True:
        alloc = allocate_texts([len(ids) for ids in review_ids], budget, template.splits_input)
        cut = [tokenizer.decode(ids[:n]).strip() for ids, n in zip(review_ids, alloc)]
        prompt = template.render(cut)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt <= max_prompt_tokens or budget <= 0:
            return prompt, True
        budget -= max(1, n_prompt - max_prompt_tokens)


def clean_whitespace(text: str) -> str:
    """`clean_whitespace("a  <sep> b\\t c ")` -> 'a\\nb c': MReD's `<sep>` markers become line breaks,
    runs of spaces collapse, and blank lines are kept at most one deep."""
    text = text.replace("<sep>", "\n")
    text = re.sub(r"[ \t\r\f\v\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
