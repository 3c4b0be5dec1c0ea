"""tests/hub_cache.py: the simulated warm Hub cache serves models, tokenizer and datasets under their real ids with
HF_HUB_OFFLINE=1, to a fresh process (the library reads its environment at import), through the project's own
loaders; and processing_meta_review.py runs on its Hub defaults from it (~20 s)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_rows, train_tiny_tokenizer
from hub_cache import build_hub_cache, offline_env

IMDB = {"train": [{"text": f"A fine film, number {i}.", "label": i % 2} for i in range(12)],
        "test": [{"text": f"A dull film, number {i}.", "label": 0} for i in range(4)]}

PROBE = """
import json, sys
import datasets, torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils.hub import resolve_revision
from proxytune.models.loading import load_causal_lm, load_tokenizer
out = {}
for repo in ("EleutherAI/pythia-70m", "EleutherAI/pythia-410m"):
    model = load_causal_lm(repo, device="cpu", dtype="auto")
    out[repo] = {"dtype": str(model.dtype), "hub_dtype": str(AutoModelForCausalLM.from_pretrained(repo).dtype),
                 "config_dtype": str(AutoConfig.from_pretrained(repo).dtype), "rows": model.config.vocab_size,
                 "params": model.num_parameters(), "context": model.config.max_position_embeddings,
                 "commit": resolve_revision(repo).resolved}
tok = load_tokenizer("EleutherAI/pythia-70m")
out["tokenizer"] = {"len": len(tok), "eos": tok.eos_token_id, "pad": tok.pad_token_id, "max": tok.model_max_length}
for name in ("zqz979/meta-review", "stanfordnlp/imdb"):
    ds = datasets.load_dataset(name)
    out[name] = {split: ds[split].to_list() for split in ds}
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hub")
    tok = train_tiny_tokenizer(root / "tok")
    commits = build_hub_cache(root / "hf", tok,
                              datasets={"zqz979/meta-review": make_rows(30), "stanfordnlp/imdb": IMDB})
    return root / "hf", commits


def run_offline(hf_home: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = offline_env(hf_home)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_layout_is_the_hub_cache(hub_home):
    hf_home, commits = hub_home
    repo = hf_home / "hub" / "models--EleutherAI--pythia-70m"
    assert (repo / "refs" / "main").read_text() == commits["EleutherAI/pythia-70m"]
    snapshot = repo / "snapshots" / commits["EleutherAI/pythia-70m"]
    weights = snapshot / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == (repo / "blobs").resolve()
    assert weights.resolve().name == hashlib.sha256(weights.read_bytes()).hexdigest()
    config = json.loads((snapshot / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["max_position_embeddings"] == 2048
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in snapshot.iterdir()}


def test_models_tokenizer_and_datasets_load_offline(hub_home, tmp_path):
    hf_home, commits = hub_home
    res = run_offline(hf_home, ["-c", PROBE], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("PROBE", 1)[1])
    small, large = out["EleutherAI/pythia-70m"], out["EleutherAI/pythia-410m"]
    for repo, got in (("EleutherAI/pythia-70m", small), ("EleutherAI/pythia-410m", large)):
        assert got["hub_dtype"] == got["config_dtype"] == "torch.float16"  # as Pythia's checkpoints declare
        assert got["dtype"] == "torch.float32"  # the project's dtype="auto" on CPU
        assert got["context"] == 2048 and got["rows"] > out["tokenizer"]["len"] and got["rows"] % 128 == 0
        assert got["commit"] == commits[repo]
    assert large["params"] > 2 * small["params"]
    assert out["tokenizer"] == {"len": 300, "eos": 0, "pad": 1, "max": 2048}
    rows = make_rows(30)
    assert out["zqz979/meta-review"] == {"train": rows[:24], "validation": rows[24:27], "test": rows[27:]}
    assert out["stanfordnlp/imdb"] == IMDB


def test_processing_runs_on_its_hub_defaults(hub_home, tmp_path):
    hf_home, _ = hub_home
    res = run_offline(hf_home, [str(ROOT / "processing_meta_review.py"), "--output_dir", str(tmp_path / "out")],
                      cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    config = json.loads((tmp_path / "out" / "processing_config.json").read_text())
    assert (config["dataset_name"], config["tokenizer_name"]) == ("zqz979/meta-review", "EleutherAI/pythia-70m")
    assert stats["rows_in_total"] == 30 and stats["rows_kept"] == {"train": 24, "validation": 3, "test": 3}
