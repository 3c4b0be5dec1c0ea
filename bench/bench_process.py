"""steer.py as a user runs it, whole processes (start, loading and decoding), side by side in one run: the default
(adaptive speculative decoding), `--speculative false` (the plain loop) and a process that loads L alone and calls
its `generate` on the same prompt (issue 29's check). Random weights at the real Pythia shapes saved to a temporary
folder with the real Pythia tokenizer (../shared/tokenizers/pythia), so S_tuned disagrees with the blend: acceptance
about 0, where drafts never pay and the default must fall back to plain steps.

    python bench/bench_process.py               # 410m / 70m shapes, a 2,000-character prompt, 48 new tokens
    python bench/bench_process.py --ci          # tiny shapes, seconds, no record

Targets (issue 29): default steer.py <= 1.05x the plain loop's process; <= 1.2x L alone's process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, random_model, record  # noqa: E402

from proxytune.models.loading import load_tokenizer

TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "pythia"
REVIEWS = ROOT.parent / "shared" / "data" / "meta_review" / "mred_val_longest.jsonl"

# L alone, as a user would run it: load, tokenize, generate greedily, print.
ALONE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(int(sys.argv[4]))
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = tokenizer(open(sys.argv[2], encoding="utf-8").read(), return_tensors="pt")
out = model.generate(**ids, max_new_tokens=int(sys.argv[3]), do_sample=False, pad_token_id=1)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]))
"""


def save_models(folder: Path, large: str, small: str, tokenizer) -> dict[str, Path]:
    """L, S and S_tuned with random weights (S_tuned another seed than S), each with the tokenizer beside it."""
    dirs = {}
    for role, shape, seed in (("large", large, 0), ("small_base", small, 1), ("small_tuned", small, 2)):
        dirs[role] = folder / role
        random_model(shape, seed=seed).save_pretrained(dirs[role])
        tokenizer.save_pretrained(dirs[role])
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny shapes, a few tokens, no record")
    parser.add_argument("--large", default="pythia-410m")
    parser.add_argument("--small", default="pythia-70m")
    parser.add_argument("--prompt_chars", type=int, default=2000)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each process, in turn (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    parser.add_argument("--no_record", action="store_true")
    args = parser.parse_args()
    if args.ci:
        args.large, args.small, args.prompt_chars, args.new_tokens, args.repeats = "tiny-large", "tiny", 300, 6, 1
    if not TOKENIZER.is_dir() or not REVIEWS.is_file():
        raise SystemExit(f"needs the real Pythia tokenizer and MReD reviews in {TOKENIZER.parent.parent}")
    tokenizer = load_tokenizer(str(TOKENIZER))
    review = next(line for line in REVIEWS.read_text(encoding="utf-8").split("\n") if line.strip())
    prompt = json.loads(review)["Input"][:args.prompt_chars]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dirs = save_models(folder, args.large, args.small, tokenizer)
        prompt_file = folder / "prompt.txt"
        prompt_file.write_text(prompt, encoding="utf-8")
        steer = [sys.executable, str(ROOT / "steer.py"), "--large_model", str(dirs["large"]), "--small_base_model",
                 str(dirs["small_base"]), "--small_tuned_model", str(dirs["small_tuned"]), "--alpha", "1",
                 "--prompt", prompt, "--use_template", "false", "--max_new_tokens", str(args.new_tokens),
                 "--large_device", "cpu"]
        systems = {
            "L alone: load + `generate`": [sys.executable, "-c", ALONE, str(dirs["large"]), str(prompt_file),
                                          str(args.new_tokens), str(args.threads)],
            "steer.py --speculative false (the plain loop)": [*steer, "--speculative", "false"],
            "steer.py (default: adaptive speculative)": steer,
        }
        times = {name: [] for name in systems}
        for _ in range(args.repeats):
            for name, command in systems.items():
                start = time.perf_counter()
                res = subprocess.run(command, capture_output=True, text=True, env={
                    **env, "OMP_NUM_THREADS": str(args.threads)}, cwd=folder, timeout=1800)
                times[name].append(time.perf_counter() - start)
                if res.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    median = {name: statistics.median(t) for name, t in times.items()}
    alone, plain, default = median.values()
    rows = [(name, f"{t:.1f} s", f"{t / plain:.2f}", f"**{t / alone:.2f}**" if name == list(median)[2] else
             f"{t / alone:.2f}", "") for name, t in median.items()]
    rows[2] = (*rows[2][:2], f"**{default / plain:.2f}**", rows[2][3], "<= 1.05 of the plain loop, <= 1.2 of L alone")
    header = ("process", "wall time (median)", "vs plain loop", "vs L alone", "target")
    load = os.getloadavg()
    notes = (f"{args.large}/{args.small} shapes, random weights (S_tuned disagrees with the blend: acceptance about "
             f"0), a {len(prompt)}-character prompt ({len(tokenizer.encode(prompt))} tokens) from a MReD review, "
             f"{args.new_tokens} new tokens, greedy, alpha 1, float32 on CPU, {args.threads} torch thread(s) per "
             f"process; each process {args.repeats} times in turn, medians; start, imports and loading included. "
             f"Load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}.")
    if args.ci or args.no_record:
        for row in rows:
            print(" | ".join(row))
        print(notes)
    else:
        print(record(f"steer.py whole processes at acceptance 0: {args.large}/{args.small} shapes, "
                     f"{args.new_tokens} new tokens", rows, header, notes))


if __name__ == "__main__":
    main()
