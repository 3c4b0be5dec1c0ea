"""A quantised large model for steering (issue 19): memory, time per token and the cost in quality, on CPU.

    python bench/bench_quantized.py --threads 1 --lab /work/main/outputs/lab    # both parts; records RESULTS.md
    python bench/bench_quantized.py --ci --no_record                            # tiny shapes, seconds

1. Cost at the real shapes that fit this machine: L = pythia-410m shape, S and S_tuned = pythia-70m shape (random
   weights, Pythia's vocabulary), L stored as float32, bfloat16, 8-bit (LLM.int8) or 4-bit (NF4, double
   quantisation; on a CPU with AVX512-BF16 bitsandbytes runs it in a fused bfloat16 kernel, "4-bit general" switches
   that off: dequantise, then a float32 matmul). Each setting runs in a fresh process, so its peak RSS is its own:
   L's weights (get_memory_footprint), the process's peak RSS, and the steering time per new token at batch 1
   (alpha = 1, greedy; (t(1 + N) - t(1)) / N, so the prompt pass is left out).
2. Quality: the lab's trained models (--lab: S, S_tuned, L and the blends --tune chose) on the real validation
   papers of the lab's data: per-token NLL of the reference meta-reviews under L alone and under each blend, with L
   full (float32) and quantised. The lab's L is tiny (hidden 256), so this shows the size of the effect, not the
   effect on pythia-6.9b.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, TOKENIZER_VOCAB, random_model, record  # noqa: E402

from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.models.quantization import linear_4bit_layers
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend
from proxytune.steering.decoding import steered_generate
from proxytune.steering.scoring import blend_nll, per_token_nll, score_targets
from proxytune.task.prompts import encode_target, render_prompt
from proxytune.task.sources import load_saved_split

SETTINGS = {  # name -> (dtype, bits, keep bitsandbytes' CPU bfloat16 kernel)
    "float32": ("float32", None, True),
    "bfloat16": ("bfloat16", None, True),
    "8-bit": ("float32", 8, True),
    "4-bit": ("float32", 4, True),
    "4-bit general": ("float32", 4, False),
}
CI_SETTINGS = ("float32", "8-bit", "4-bit general")  # --ci: run in one process, peak RSS shared
NEVER_EOS = TOKENIZER_VOCAB + 10  # an id past the sliced vocabulary: every run decodes exactly N tokens


def quantisable_share(model) -> tuple[int, int]:
    """(parameters of the linear layers bitsandbytes quantises, all parameters): everything but the embeddings, the
    output layer, layer norms and biases."""
    out = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not out)
    return linear, model.num_parameters()


def load_large(path: str, setting: str):
    dtype, bits, fused = SETTINGS[setting]
    model = load_causal_lm(path, dtype=dtype, device="cpu", quantize=bits)
    if bits == 4 and not fused:
        for layer in linear_4bit_layers(model):
            layer.support_avx512bf16_for_cpu = False
    return model


# ---------------------------------------------------------------------------------------------
# 1. Memory and time at the real shapes, one setting per process
# ---------------------------------------------------------------------------------------------
def child(args) -> None:
    """Runs in its own process: load L in one setting, steer, print one JSON line."""
    torch.set_num_threads(args.threads)
    print(json.dumps(measure_setting(args.large_dir, args.child, args)))


def measure_setting(large_dir: str, setting: str, args) -> dict:
    started = time.perf_counter()
    large = load_large(large_dir, setting)
    load_s = time.perf_counter() - started
    small_base, small_tuned = random_model(args.small, seed=1), random_model(args.small, seed=2)
    prompt = torch.randint(2, TOKENIZER_VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        steered_generate(large, small_base, small_tuned, prompt, mask, Blend.from_alpha(1.0), max_new_tokens=n,
                         eos_token_id=NEVER_EOS, pad_token_id=1, vocab_size=TOKENIZER_VOCAB)
        return time.perf_counter() - t0

    run(2)  # warm-up
    times = [(run(1 + args.new_tokens) - run(1)) / args.new_tokens for _ in range(args.repeats)]
    return {"setting": setting, "weights_bytes": large.get_memory_footprint(), "load_s": load_s,
            "ms_per_token": 1000 * sorted(times)[len(times) // 2],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure_costs(args) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_quantized_") as tmp:
        large_dir = Path(tmp) / "large"
        large = random_model(args.large, seed=0)
        args.share = quantisable_share(large)
        large.save_pretrained(large_dir)  # quantisation happens at load, from the files
        del large
        for setting in CI_SETTINGS if args.ci else SETTINGS:
            if args.ci:  # in this process: the figures are not the point, and each fresh process costs seconds
                results.append(measure_setting(str(large_dir), setting, args))
                continue
            cmd = [sys.executable, __file__, "--child", setting, "--large_dir", str(large_dir), "--small", args.small,
                   "--threads", str(args.threads), "--prompt_tokens", str(args.prompt_tokens), "--new_tokens",
                   str(args.new_tokens), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise SystemExit(f"{setting}: {out.stderr[-2000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# 2. Quality on the lab's models
# ---------------------------------------------------------------------------------------------
def lab_blends(lab: Path) -> dict:
    blends = {"proxy-tuning, alpha=1": Blend.from_alpha(1.0)}
    report = lab / "steer" / "tune_report.json"
    if report.is_file():  # --tune's perplexity-best free blend (its chosen blend.json is often alpha = 1)
        entry = json.loads(report.read_text(encoding="utf-8")).get("entries", {}).get("free blend", {})
        if entry.get("blend"):
            blends["--tune's free blend"] = Blend(**{k: v for k, v in entry["blend"].items()
                                                   if k in Blend.__dataclass_fields__})
    return blends


def measure_quality(args) -> list[dict]:
    lab = Path(args.lab)
    tokenizer = load_tokenizer(str(lab / "tokenizer"))
    split = load_saved_split(lab / "data", "validation", "--lab")
    rows = list(split)[:args.n_papers]
    prompts = [r["input_ids"][:r["prompt_length"]] for r in rows]
    targets = [r["input_ids"][r["prompt_length"]:] for r in rows]
    small = {SMALL_BASE: load_causal_lm(str(lab / "small" / "final"), device="cpu"),
             SMALL_TUNED: load_causal_lm(str(lab / "small_tuned" / "final"), device="cpu")}
    blends = lab_blends(lab)
    results = []
    for setting in CI_SETTINGS if args.ci else SETTINGS:
        models = {LARGE: load_large(str(lab / "large" / "final"), setting), **small}
        scored = score_targets(models, prompts, targets, vocab_size=len(tokenizer), batch_size=8,
                               keep_logprobs=(LARGE, SMALL_TUNED, SMALL_BASE), pad_token_id=tokenizer.pad_token_id,
                               show_progress=False)
        row = {"setting": setting, "papers": len(rows), "tokens": int(scored["n_tokens"].sum()),
               "weights_bytes": models[LARGE].get_memory_footprint(),
               "L alone": per_token_nll(scored[LARGE], scored["n_tokens"])}
        for name, blend in blends.items():
            row[name] = per_token_nll(blend_nll(scored, blend), scored["n_tokens"])
        results.append(row)
        print(row, flush=True)
    return results, quantisable_share(load_large(str(lab / "large" / "final"), "float32"))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def ci_lab(tmp: Path) -> Path:
    """A stand-in for outputs/lab with tiny random models (hidden 64: bitsandbytes' CPU kernel shapes)."""
    import datasets

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_rows, make_tiny_model, train_tiny_tokenizer


    tok_dir = train_tiny_tokenizer(tmp / "tokenizer")
    tokenizer = load_tokenizer(str(tok_dir))
    for name, seed, hidden in (("small", 0, 64), ("small_tuned", 1, 64), ("large", 2, 128)):
        make_tiny_model(len(tokenizer), seed=seed, hidden_size=hidden, padded_vocab=len(tokenizer) + 12) \
            .save_pretrained(tmp / name / "final")
    rows = []
    for r in make_rows(8):
        prompt = tokenizer(render_prompt([r["Input"]]), add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + encode_target(r["Output"], tokenizer), "prompt_length": len(prompt)})
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp / "data"))
    return tmp


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", default=str(ROOT / "outputs" / "lab"),
                        help="The lab's outputs (fine_tune/steer runs).")
    parser.add_argument("--large", default="pythia-410m")
    parser.add_argument("--small", default="pythia-70m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n_papers", type=int, default=64, help="Validation papers scored in part 2.")
    parser.add_argument("--skip_costs", action="store_true", help="Part 2 only.")
    parser.add_argument("--ci", action="store_true", help="Tiny shapes and a tiny stand-in lab: seconds.")
    parser.add_argument("--no_record", action="store_true",
                        help="Print only; do not record in bench/RESULTS.md (a record replaces this script's "
                             "earlier record of the same configuration).")
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--large_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench_quantized_lab_")
    if args.ci:
        args.large, args.small, args.prompt_tokens, args.new_tokens, args.repeats = "tiny-large", "tiny", 16, 4, 1
        args.lab = str(ci_lab(Path(tmp.name)))
    elif not (Path(args.lab) / "large" / "final").is_dir():
        raise SystemExit(f"--lab {args.lab} holds no large/final; "
                         "pass the lab's directory (e.g. /work/main/outputs/lab)")

    if not args.skip_costs:
        costs = measure_costs(args)
        linear, total = args.share
        notes = ("Shared machine: 2 cores, used by other engineers at the same time, so timings are noisy. "
                 f"L weights = get_memory_footprint() of L: bitsandbytes quantises the {linear / 1e6:.0f} M parameters "
                 f"of L's linear layers and keeps the other {(total - linear) / 1e6:.0f} M (embeddings, output layer, "
                 "norms) in the dtype given (float32 here). Peak RSS = the whole process (L, S and S_tuned, torch, "
                 "transformers), each setting in a fresh process; bitsandbytes quantises at load, from the float32 "
                 "files, and peak RSS includes that.")
        base = next(c for c in costs if c["setting"] == "float32")
        table = [(c["setting"], gb(c["weights_bytes"]), gb(c["peak_rss_bytes"]), f"{c['load_s']:.1f}",
                  f"{c['ms_per_token']:.1f}", f"**{c['ms_per_token'] / base['ms_per_token']:.2f}**") for c in costs]
        title = (f"Quantised L for steering: cost, L={args.large} shape, S={args.small} shape, batch 1, "
                 f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.threads} thread(s)")
        header = ("L stored as", "L weights GB", "peak RSS GB", "load s", "steered ms/token", "vs float32")
        text = record(title, table, header, notes) if not args.no_record else None
        print(text or "\n".join(" | ".join(str(c) for c in row) for row in table))
    quality, (linear, total) = measure_quality(args)
    names = [k for k in quality[0] if k not in ("setting", "papers", "tokens", "weights_bytes")]
    full = quality[0]
    table = [(q["setting"], f"{q['weights_bytes'] / 1e6:.1f}",
              *[f"{q[n]:.4f} ({q[n] - full[n]:+.4f})" for n in names]) for q in quality]
    title = (f"Quantised L for steering: quality, the lab's L/S/S_tuned, {full['papers']} validation papers "
             f"({full['tokens']} reference tokens)")
    qnotes = ("Per-token NLL (nats) of the reference meta-reviews; in brackets the change from L in float32. "
              f"Lab: {args.lab}. Of the lab L's {total / 1e6:.1f} M parameters only the {linear / 1e6:.1f} M of its "
              "linear layers are quantised (the embeddings and the output layer stay float32), so this shows the size "
              "of the effect on a small model, not on a real Pythia; 4-bit on this CPU (AVX512-BF16) computes in "
              "bfloat16 in bitsandbytes' fused kernel, '4-bit general' in float32. No CUDA run was made here.")
    header = ("L stored as", "L weights MB", *[f"NLL {n}" for n in names])
    text = record(title, table, header, qnotes) if not args.no_record else None
    print(text or "\n".join(" | ".join(str(c) for c in row) for row in table))
    tmp.cleanup()


if __name__ == "__main__":
    main()
