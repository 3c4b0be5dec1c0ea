"""bench/sentiment_lab.py --preset pythia: its flags and arguments, and its smoke path end to end on a simulated warm
Hub cache (tiny random models saved as EleutherAI/pythia-70m and -410m, stanfordnlp/imdb's labelled splits; offline,
in a subprocess, as tests/test_steering_lab.py runs the steering lab's preset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REVIEWS, ROOT

from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError

sys.path.insert(0, str(ROOT / "bench"))
import sentiment_lab  # noqa: E402

WORDS = {0: ["awful", "boring", "dreadful", "dull"], 1: ["great", "wonderful", "superb", "lovely"]}


def lab_args(*argv: str) -> sentiment_lab.SentimentLabArguments:
    (args,) = parse_config([sentiment_lab.SentimentLabArguments], list(argv))
    return args


def test_preset_flags_are_checked():
    with pytest.raises(UsageError, match="--large 1.4b needs --preset pythia"):
        lab_args("--large", "1.4b", "--data", str(ROOT / "README.md"))
    with pytest.raises(UsageError, match="--large 7b: choose from 410m, 1.4b"):
        lab_args("--preset", "pythia", "--large", "7b", "--data", "stanfordnlp/imdb")
    with pytest.raises(UsageError, match="--steering_lab_dir does not apply"):
        lab_args("--preset", "pythia", "--steering_lab_dir", str(ROOT), "--data", "stanfordnlp/imdb")
    with pytest.raises(UsageError, match="--data stanfordnlp/imdb is not a file"):  # a Hub id needs --preset
        lab_args("--data", "stanfordnlp/imdb")


def test_preset_arguments_for_a_large_l(tmp_path):
    lab = sentiment_lab.resolve_lab(lab_args("--preset", "pythia", "--large", "1.4b", "--device", "cpu",
                                             "--data", "stanfordnlp/imdb", "--work_dir", str(tmp_path)))
    assert (lab.small, lab.large) == ("EleutherAI/pythia-70m", "EleutherAI/pythia-1.4b") and lab.steering is None
    assert lab.profile == sentiment_lab.Profile(**{**vars(sentiment_lab.PROFILES["pythia"]), "judge_lr": 1e-5})
    assert lab.figure.name == "sentiment_lab_pythia-1.4b.png" and lab.results_file == ROOT / "bench" / "RESULTS.md"

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    judge = sentiment_lab.classifier_arguments(lab, "judge")
    assert flag(judge, "--model_name_or_path") == "EleutherAI/pythia-1.4b" and flag(judge, "--learning_rate") == "1e-05"
    rl = sentiment_lab.rl_arguments(lab, "rloo", lab.large, str(tmp_path / "rl"))
    assert flag(rl, "--max_steps") == "1000" and flag(rl, "--model_name_or_path") == "EleutherAI/pythia-1.4b"
    argv = sentiment_lab.evaluation_arguments(lab, "rloo", 1.0, ["large"], tmp_path / "eval")
    assert flag(argv, "--device") == "cpu" and flag(argv, "--large_model") == "EleutherAI/pythia-1.4b"


@pytest.fixture(scope="module")
def imdb_hub(tmp_path_factory):
    """A simulated warm Hub cache: tiny models as EleutherAI/pythia-70m and -410m, and stanfordnlp/imdb with 300
    labelled reviews (train and test, integer labels as the Hub's) and an unlabelled split the lab must skip."""
    from conftest import train_tiny_tokenizer
    from hub_cache import build_hub_cache

    root = tmp_path_factory.mktemp("sentiment_hub")
    rows = [{"text": f"This film was {WORDS[i % 2][i % 4]}.<br /><br />{REVIEWS[i % len(REVIEWS)]}", "label": i % 2}
            for i in range(300)]
    imdb = {"train": rows[:150], "test": rows[150:],
            "unsupervised": [{"text": "No label here.", "label": -1} for _ in range(20)]}
    build_hub_cache(root / "hf", train_tiny_tokenizer(root / "tok"), datasets={"stanfordnlp/imdb": imdb})
    return root / "hf"


def test_pythia_preset_smoke_on_the_simulated_hub(imdb_hub, tmp_path):
    """--preset pythia --smoke end to end through the Hub code paths (offline, from the simulated cache): S and L and
    the reviews load by their Hub ids, both classifiers and the three RL runs train, the six evaluations run, and the
    record names the models."""
    from hub_cache import offline_env

    env = offline_env(imdb_hub)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    work = tmp_path / "work"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sentiment_lab.py"), "--preset", "pythia", "--smoke",
                          "--data", "stanfordnlp/imdb", "--threads", "1", "--work_dir", str(work)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    split = json.loads((work / "split" / "split.json").read_text())
    assert split["source"] == "stanfordnlp/imdb" and split["shared_reviews"] == 0
    assert split["parts"]["judge"]["labels"].keys() == {"neg", "pos"}  # 0/1 read as IMDB's names; -1 rows skipped
    commands = (work / "commands.sh").read_text()
    assert "fine_tune.py --task classification" in commands and commands.count("python evaluation.py") == 6
    assert "--model_name_or_path EleutherAI/pythia-70m" in commands
    assert "--model_name_or_path EleutherAI/pythia-410m" in commands
    assert "--large_model EleutherAI/pythia-410m" in commands
    import torch

    if torch.cuda.is_available():  # default_device(): the GPU, with bf16 (or fp16) for the classifiers and RLOO
        assert "--device cuda" in commands and commands.count("--bf16 true") + commands.count("--fp16 true") == 4
    else:
        assert "--device cpu" in commands and "--bf16" not in commands
    report = json.loads((work / "report.json").read_text())
    assert len(report["systems"]) == 11 and all(s["n"] == 12 for s in report["systems"].values())
    results = (work / "RESULTS.md").read_text()
    assert "pythia-70m + pythia-410m" in results and "pythia-smoke profile" in results
    assert "`EleutherAI/pythia-70m` and `EleutherAI/pythia-410m` from the Hub" in results
