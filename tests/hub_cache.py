"""A simulated warm Hugging Face cache, so the project's real Hub code paths run offline in tests.

    from hub_cache import build_hub_cache, offline_env
    build_hub_cache(tmp / "hf", tokenizer_dir, datasets={"zqz979/meta-review": rows})
    subprocess.run([sys.executable, "processing_meta_review.py", "--output_dir", out], env=offline_env(tmp / "hf"))

With `HF_HOME=<dir> HF_HUB_OFFLINE=1` (what `offline_env` sets) these then work with no network:
`AutoModelForCausalLM.from_pretrained("EleutherAI/pythia-70m")`, `AutoTokenizer.from_pretrained(...)` and
`datasets.load_dataset("zqz979/meta-review")`.

Models sit in huggingface_hub's cache layout, as `hf_hub_download` leaves them:

    HF_HOME/hub/models--EleutherAI--pythia-70m/
        refs/main                          the commit hash, no newline
        blobs/<sha256 or git-sha1>         file contents (sha256 for LFS files such as weights)
        snapshots/<commit>/config.json     relative symlinks into blobs/

Each is a tiny random GPT-NeoX with Pythia's config keys (`torch_dtype: float16`, `rotary_pct` 0.25, untied
embeddings, max_position_embeddings 2048) and float16 safetensors, its vocabulary padded past the tokenizer's
size to a multiple of 128 as Pythia's 50,304 rows are past the tokenizer's 50,277.

Datasets are different: datasets 5.x in offline mode never reads the Hub cache. `load_dataset("a/b")` first asks
the Hub for the dataset card (refused offline), then falls back to `CachedDatasetModuleFactory`
(datasets/load.py), which globs `HF_HOME/datasets/a___b/*/*/*` (the name part snake-cased) and hands the newest
directory to the `Cache` builder (datasets/packaged_modules/cache/cache.py). That builder wants the directory
name at `<config>` to equal `config_name` in its `dataset_info.json`, takes the split names and shard lengths
from that file, and reads `<dataset name>-<split>.arrow` beside it. `add_dataset` writes exactly that, through
the Json builder's own `download_and_prepare`, into `HF_HOME/datasets/a___b/default/0.0.0/<commit>/`.

The commit: transformers 5.24 no longer sets `config._commit_hash` (it drops the key); the revision a load used is
`transformers.utils.hub.resolve_revision(repo_id).resolved`, which offline reads refs/main.

Environment variables are read when huggingface_hub / datasets are imported, so use the cache from a
subprocess started with `offline_env(hf_home)`, not from the test process itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

# Sizes given to model ids in order: each later id is a bigger tiny model, as 410m is bigger than 70m.
SIZES = [dict(hidden_size=32, num_layers=2), dict(hidden_size=64, num_layers=3), dict(hidden_size=96, num_layers=3)]
PYTHIA_IDS = ("EleutherAI/pythia-70m", "EleutherAI/pythia-410m")
TASK_DATASET = "zqz979/meta-review"
CORPUS_DATASET = "stanfordnlp/imdb"
CONTEXT = 2048  # Pythia's max_position_embeddings and tokenizer model_max_length


def fake_commit(*parts: str) -> str:
    """A stable 40-hex 'commit hash' for a repo's contents, e.g. fake_commit("EleutherAI/pythia-70m", "32x2")."""
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def blob_name(path: Path) -> str:
    """The name huggingface_hub gives a file in blobs/: sha256 for LFS files (weights), git's blob sha1 otherwise."""
    data = path.read_bytes()
    if path.suffix == ".safetensors" or len(data) > 10 * 2**20:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_repo_files(hf_home: Path, repo_id: str, files: Mapping[str, Path], commit: str,
                   repo_type: str = "model") -> Path:
    """Lay `files` (name in repo -> local file) out as one cached snapshot of `repo_id`; returns the snapshot dir."""
    repo_dir = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = repo_dir / "blobs" / blob_name(src)
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def pythia_config(vocab_rows: int, hidden_size: int, num_layers: int, num_heads: int = 4) -> dict:
    """config.json in the form the Pythia repos ship it (legacy keys, float16), at a tiny size."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "gelu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 4 * hidden_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": CONTEXT,
        "model_type": "gpt_neox",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.24.0",
        "use_cache": True,
        "use_parallel_residual": True,
        "vocab_size": vocab_rows,
    }


def add_model(hf_home: Path, repo_id: str, tokenizer_dir: Path, *, hidden_size: int = 32, num_layers: int = 2,
              num_heads: int = 4, seed: int = 0) -> str:
    """Cache a tiny random Pythia-shaped model plus the tokenizer files of `tokenizer_dir` as `repo_id`.

    Returns the commit hash. The tokenizer's model_max_length is set to 2048, as in Pythia's tokenizer_config.json.
    """
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer_dir = Path(tokenizer_dir)
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    vocab_rows = -(-(vocab + 1) // 128) * 128  # strictly past the tokenizer, as Pythia's rows are
    config = pythia_config(vocab_rows, hidden_size, num_layers, num_heads)
    commit = fake_commit(repo_id, json.dumps(config, sort_keys=True), str(seed), str(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(config)).to(torch.float16)
        model.save_pretrained(tmp / "model")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files = {"config.json": tmp / "config.json", "model.safetensors": tmp / "model" / "model.safetensors"}
        for src in sorted(tokenizer_dir.iterdir()):
            if src.is_file() and src.name not in files and src.suffix != ".safetensors":
                files[src.name] = src  # tokenizer.json, tokenizer_config.json, special_tokens_map.json, ...
        if "tokenizer_config.json" in files:
            tok_config = json.loads(files["tokenizer_config.json"].read_text())
            tok_config["model_max_length"] = CONTEXT
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
            files["tokenizer_config.json"] = tmp / "tokenizer_config.json"
        add_repo_files(hf_home, repo_id, files, commit)
    return commit


def split_rows(rows: Sequence[dict] | Mapping[str, Sequence[dict]]) -> dict[str, list[dict]]:
    """A mapping passes through; a list is cut 80/10/10 in order into train/validation/test (each at least 1 row)."""
    if isinstance(rows, Mapping):
        return {split: list(r) for split, r in rows.items()}
    rows = list(rows)
    if len(rows) < 3:
        raise ValueError(f"need at least 3 rows to make train/validation/test splits, got {len(rows)}")
    n_train = len(rows) - 2 * max(1, len(rows) // 10)
    n_val = (len(rows) - n_train) // 2
    return {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


def add_dataset(hf_home: Path, repo_id: str, rows: Sequence[dict] | Mapping[str, Sequence[dict]]) -> Path:
    """Prepare `rows` into the datasets cache as Hub dataset `repo_id` (see the module docstring); returns its dir.

    >>> add_dataset(home, "zqz979/meta-review", {"train": [...], "validation": [...], "test": [...]})
    PosixPath('.../datasets/zqz979___meta-review/default/0.0.0/<commit>')
    """
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    splits = split_rows(rows)
    namespace, name = repo_id.split("/")
    commit = fake_commit(repo_id, json.dumps(splits, sort_keys=True))
    target = Path(hf_home) / "datasets" / f"{namespace}___{camelcase_to_snakecase(name)}" / "default" / "0.0.0" / commit
    if target.exists():
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory() as tmp:
        data_files = {}
        for split, split_data in splits.items():
            path = Path(tmp) / f"{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in split_data), encoding="utf-8")
            data_files[split] = str(path)
        builder = Json(cache_dir=str(Path(tmp) / "cache"), dataset_name=name, config_name="default", hash=commit,
                       data_files=data_files)
        builder.download_and_prepare(output_dir=str(target))
    for lock in target.parent.glob(f"{commit}*.lock"):  # the builder's file locks; a warm cache has none
        lock.unlink()
    return target


def build_hub_cache(hf_home: Path, tokenizer_dir: Path, *,
                    models: Sequence[str] | Mapping[str, dict] = PYTHIA_IDS,
                    datasets: Mapping[str, Sequence[dict] | Mapping[str, Sequence[dict]]] | None = None,
                    seed: int = 0) -> dict[str, str]:
    """Fill `hf_home` with cached models and prepared datasets; returns {model id: commit hash}.

    `models`: ids (the i-th gets SIZES[i], so later ids are bigger) or {id: dict(hidden_size=, num_layers=,
    num_heads=)} (e.g. Pythia's real 410m shape, 1024/24/16, for timing on a GPU).
    `datasets`: {Hub id: rows}, rows a list (cut 80/10/10) or {split: rows}; e.g.
    {"zqz979/meta-review": make_rows(30), "stanfordnlp/imdb": {"train": [{"text": ..., "label": 0}], "test": [...]}}.
    """
    hf_home = Path(hf_home)
    specs = (dict(models) if isinstance(models, Mapping)
             else {m: SIZES[min(i, len(SIZES) - 1)] for i, m in enumerate(models)})
    commits = {repo_id: add_model(hf_home, repo_id, tokenizer_dir, seed=seed + i, **spec)
               for i, (repo_id, spec) in enumerate(specs.items())}
    for repo_id, rows in (datasets or {}).items():
        add_dataset(hf_home, repo_id, rows)
    return commits


def offline_env(hf_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a subprocess that reads only the cache in `hf_home` and never tries the network."""
    env = dict(os.environ if base is None else base)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE",
                "HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        env.pop(key, None)
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    return env
