"""Bottleneck adapters against LoRA at a matched number of trained parameters, side by side in one run: validation
loss on MReD, training tokens/s, and the forward cost each leaves in S_tuned (LoRA merged costs nothing; bottleneck
adapters cannot be merged).

    python bench/bench_adapters.py            # pretrain S on IMDB, then each adapter on MReD; records (~30 min, 2 CPUs)
    python bench/bench_adapters.py --ci --no_record      # tiny sizes, a few steps, the table printed only

The base S is the offline lab's S shape (d=96, 2 layers, 4 heads; bench/steering_lab.py), pretrained here on IMDB
reviews from scratch with a byte-level BPE of 8,192 tokens trained on the same text (Pythia's special-token layout),
so that the adapters adapt a model that has learnt something. Each adapter then trains on the same processed MReD
data (`mred_val_longest.jsonl`, processing_meta_review.py's split), the same steps, batch, schedule and seed, at
each learning rate of LEARNING_RATES; the best validation loss over them is reported per adapter, so neither
is judged at a learning rate that suits only the other. Matched sizes: LoRA on all four GPT-NeoX linear layers trains
16·r·d parameters per layer, bottleneck adapters 2·(2·d·d/f + d/f + d): r = 4 against f = 6 (16 units) on d = 96.

Not measured here: the steered result with each as S_tuned (it needs the lab's L: bench/adapter_lab.py measures it
on a finished steering lab; docs/your-task-your-model.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, record  # noqa: E402

import fine_tune  # noqa: E402
import processing_meta_review  # noqa: E402
from proxytune.models.loading import load_causal_lm  # noqa: E402
from proxytune.task.arguments import ProcessingArguments  # noqa: E402
from proxytune.training.arguments import parse_args  # noqa: E402
from proxytune.training.data import limit  # noqa: E402
from proxytune.training.model import count_parameters  # noqa: E402

SHARED = ROOT.parent / "shared"
MRED = SHARED / "data" / "meta_review" / "mred_val_longest.jsonl"
IMDB = SHARED / "data" / "imdb" / "imdb_partial.jsonl.gz"
SEED = 42
LEARNING_RATES = (1e-3, 3e-3)
ADAPTERS = {
    "LoRA r=4 (all four linear layers)": ["--use_lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"],
    "bottleneck f=6 (16 units, relu)": ["--adapter", "bottleneck", "--reduction_factor", "6"],
}
QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", str(SEED)]


def train_tokenizer(out: Path, texts: list[str], vocab_size: int) -> Path:
    """A byte-level BPE with Pythia's special tokens first (<|endoftext|> = 0, <|padding|> = 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<|endoftext|>", "<|padding|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", pad_token="<|padding|>").save_pretrained(out)
    return out


def run(*flags: str) -> dict:
    return fine_tune.main(*parse_args([*QUIET, *flags]))


def forward_ms(models: dict, tokens: int, repeats: int) -> dict[str, float]:
    """{name: median wall time (ms) of one no-grad forward over a (4, tokens) batch}, the models taking turns in each
    round so that a busy moment of the shared machine falls on all of them alike."""
    import torch

    ids = torch.randint(2, 1000, (4, tokens), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(ids)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(ids)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny sizes and steps")
    parser.add_argument("--no_record", action="store_true", help="print the table only")
    parser.add_argument("--work_dir", default=None, help="Where the runs go (default: a temporary directory).")
    args = parser.parse_args()
    ci = args.ci
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_adapters-"))
    work.mkdir(parents=True, exist_ok=True)
    import datasets
    import torch

    torch.manual_seed(SEED)
    load_start = os.getloadavg()[0]
    # Sized for a shared 2-core CPU (about 30 min): a short pretraining, 200 papers cut to 384 tokens.
    n_texts, pretrain_steps, max_length, n_papers = (200, 4, 256, 64) if ci else (2000, 100, 384, 200)
    with gzip.open(IMDB, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(n_texts), f)]
    (work / "imdb.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    mred = [json.loads(line) for line in MRED.read_text(encoding="utf-8").splitlines()]
    tokenizer_dir = train_tokenizer(work / "tokenizer", texts + [r["Input"] + "\n" + r["Output"] for r in mred],
                                    1024 if ci else 8192)

    # 1. The base S: the lab's S shape pretrained on IMDB.
    start = time.perf_counter()
    base = run("--config_name", "tiny", "--config_overrides",
               "hidden_size=96,num_hidden_layers=2,num_attention_heads=4,intermediate_size=384",
               "--tokenizer_name", str(tokenizer_dir), "--dataset_path", str(work / "imdb.jsonl"), "--text_column",
               "text", "--max_length", "256", "--max_steps", str(pretrain_steps), "--per_device_train_batch_size", "8",
               "--learning_rate", "3e-3", "--save_steps", str(pretrain_steps), "--num_samples", "0",
               "--output_dir", str(work / "base"))["final_dir"]
    pretrain_s = time.perf_counter() - start

    # 2. The task data, processed once, as fine_tune.py reads it.
    data_dir = work / "mred"
    processing_meta_review.main(ProcessingArguments(dataset_name=str(MRED), tokenizer_name=str(tokenizer_dir),
                                                    max_length=max_length, output_dir=str(data_dir)))
    train_split = datasets.load_from_disk(str(data_dir))["train"]
    trained_on = limit(train_split, n_papers, SEED)  # the seeded sample fine_tune.py's --max_train_samples takes
    n_train, train_tokens = len(trained_on), sum(len(ids) for ids in trained_on["input_ids"])

    # 3. Each adapter at each learning rate: one epoch of the same batches.
    rows, trained_params, models = [], {}, {}
    for name, flags in ADAPTERS.items():
        best = None
        for lr in LEARNING_RATES[:1] if ci else LEARNING_RATES:
            out = work / f"{name.split()[0]}-{flags[-1]}-{lr:g}"
            start = time.perf_counter()
            result = run("--model_name_or_path", str(base), "--dataset_path", str(data_dir), "--max_length",
                         str(max_length), "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
                         "--learning_rate", f"{lr:g}", "--save_steps", "20", "--num_samples", "0",
                         "--max_train_samples", str(n_train), "--output_dir", str(out), *flags)
            wall = time.perf_counter() - start
            metrics = result["metrics"]
            tokens_per_s = train_tokens / metrics["train_runtime"]
            if best is None or metrics["eval_loss"] < best[1]:
                best = (lr, metrics["eval_loss"], tokens_per_s, wall, result["final_dir"])
        lr, loss, tokens_per_s, wall, final = best
        tuned = load_causal_lm(str(final), device="cpu")  # LoRA: merged on load; bottleneck: adapters kept
        trained_params[name] = sum(t.numel() for n, t in tuned.named_parameters()
                                   if "_adapter." in n) or None
        if trained_params[name] is None:  # LoRA: its trained parameters are in the adapter file
            from safetensors.torch import load_file

            trained_params[name] = sum(t.numel() for t in load_file(str(final / "adapter_model.safetensors")).values())
        models[name] = tuned
        rows.append([name, f"{trained_params[name]:,}", f"{lr:g}", f"{loss:.4f}", f"{tokens_per_s:,.0f}"])
    base_name = "base S (no adapter), for the forward cost"
    models[base_name] = load_causal_lm(str(base), device="cpu")
    total, _ = count_parameters(models[base_name])
    rows.append([base_name, "0", "-", "-", "-"])
    forward = forward_ms(models, 64 if ci else max_length, 3 if ci else 20)
    rows = [tuple(row + [f"{forward[row[0]]:.1f}"]) for row in rows]
    header = ("S_tuned", "trained parameters", "best lr", "MReD validation loss (best)", "training tokens/s",
              f"forward ms, 4 x {64 if ci else max_length} tokens")
    for row in rows:
        print(" | ".join(row))
    if args.no_record:
        return
    base_eval = json.loads((base / "metrics.json").read_text()).get("eval_loss")
    notes = (f"Base S: GPT-NeoX d=96, 2 layers, 4 heads ({total:,} parameters), pretrained from scratch on "
             f"{n_texts} IMDB reviews, {pretrain_steps} steps of 8 x 256 tokens (IMDB validation loss "
             f"{base_eval:.3f}; {pretrain_s:.0f} s), tokenizer: byte-level BPE of 8,192 tokens trained on that text "
             f"and MReD. Task: `mred_val_longest.jsonl` processed by processing_meta_review.py "
             f"(max_length {max_length}), one epoch of {n_train} training papers (a seeded sample; {train_tokens:,} "
             "tokens), batch 8, "
             f"cosine schedule with 5% warm-up, seed {SEED}, each adapter at lr "
             f"{', '.join(f'{x:g}' for x in LEARNING_RATES)}, the best validation loss kept (fine_tune.py's best "
             "checkpoint, evaluated every 20 steps). Tokens/s: the training set's tokens over the Trainer's "
             "train_runtime (its evaluations included, the same number for every adapter), float32 on CPU. Forward: "
             "median of 20 no-grad passes, the models taking turns; LoRA is merged on load, so it costs what the base "
             "costs; bottleneck adapters cannot be merged. The steered result with each as S_tuned is not measured "
             f"here (it needs the lab's L). Machine load (1-min average) at the start and end: {load_start:.1f}, "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: where it exceeds the cores, other work shared them "
             "and the speeds are indicative only.")
    record("Bottleneck adapters against LoRA at matched trained parameters (lab S, MReD)", rows, header, notes)


if __name__ == "__main__":
    main()
