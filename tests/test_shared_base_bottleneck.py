"""A bottleneck S_tuned on S's weights shares S's forward (proxytune/models/adapters.py's `adapter_names`, paired by
proxytune/steering/shared_base.py): "__base__" rows are the base model's, the others adapted, and no state outlives
the forward; on other weights it stays as it is (never merged) and runs its own forward; both loaders pair it.
The decoders and scoring, paired against two forwards, are tests/test_shared_base.py's (parametrised over LoRA and
bottleneck)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_shared_base import PROMPTS, V, bottleneck_of, count_forwards, run

from proxytune.evaluation.arguments import ModelArguments as EvaluationModelArguments
from proxytune.evaluation.systems import load_models as load_evaluation_models
from proxytune.models.adapters import (
    BASE_ROWS,
    BOTTLENECK_ADAPTER,
    BottleneckAdapter,
    has_bottleneck_adapters,
    save_bottleneck_adapters,
)
from proxytune.steering.arguments import ModelArguments
from proxytune.steering.blend import SMALL_BASE, SMALL_TUNED, Blend
from proxytune.steering.decoding import steered_generate
from proxytune.steering.loading import load_models
from proxytune.steering.shared_base import paired_adapter, share_or_merge

IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]])  # (3, 5)


@pytest.fixture(scope="module")
def pair():
    base = make_tiny_model(V, seed=0, padded_vocab=V + 12, output_scale=30.0).double()
    tuned = share_or_merge(base, bottleneck_of(base))
    assert paired_adapter(base, tuned) == BOTTLENECK_ADAPTER
    return base, tuned


def rows_of(model) -> list:
    return [m.rows for m in model.modules() if isinstance(m, BottleneckAdapter)]


def test_base_rows_are_the_base_models_and_no_state_outlives_a_forward(pair, monkeypatch):
    base, tuned = pair
    with torch.no_grad():
        alone, adapted = base(IDS).logits, tuned(IDS).logits  # (3, T, V) each
        assert not torch.allclose(alone, adapted)  # the adapters change the output
        seen = []
        real = type(tuned).forward
        monkeypatch.setattr(type(tuned), "forward", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
        mixed = tuned(IDS, adapter_names=[BASE_ROWS, BOTTLENECK_ADAPTER, BASE_ROWS]).logits
        monkeypatch.undo()
        # The pre-hook took the argument: transformers would pass it on, unnoticed, to the attention functions.
        assert seen and not any("adapter_names" in kw for kw in seen)
        torch.testing.assert_close(mixed[[0, 2]], alone[[0, 2]], rtol=0, atol=1e-12)
        torch.testing.assert_close(mixed[1], adapted[1], rtol=0, atol=1e-12)
        assert rows_of(tuned) and all(rows is None for rows in rows_of(tuned))
        assert torch.equal(tuned(IDS).logits, adapted)  # a later plain forward adapts every row
        # A forward that fails midway (names for 2 rows, 3 rows given) leaves nothing behind either.
        with pytest.raises(ValueError, match="2 names for a batch of 3 rows"):
            tuned(IDS, adapter_names=[BASE_ROWS, BOTTLENECK_ADAPTER])
        assert all(rows is None for rows in rows_of(tuned))
        assert torch.equal(tuned(IDS).logits, adapted)
        with pytest.raises(ValueError, match="'default'"):
            tuned(IDS, adapter_names=["default"] * 3)


def test_only_a_bottleneck_on_the_same_weights_is_paired_and_it_is_never_merged(pair, monkeypatch):
    base, _ = pair
    other = make_tiny_model(V, seed=5, padded_vocab=V + 12, output_scale=30.0).double()
    on_other = bottleneck_of(other)
    assert share_or_merge(base, on_other) is on_other and has_bottleneck_adapters(on_other)
    assert paired_adapter(base, on_other) is None
    nudged = bottleneck_of(base)
    with torch.no_grad():
        nudged.gpt_neox.embed_in.weight[3, 0] += 1e-6  # one base weight differs
    assert share_or_merge(base, nudged) is nudged and paired_adapter(base, nudged) is None
    other_dtype = bottleneck_of(base).float()  # the same values, another dtype
    assert paired_adapter(base, share_or_merge(base, other_dtype)) is None
    # Decoding with the adapter on other weights: S and S_tuned run their own forwards, of B rows each.
    large = make_tiny_model(V, seed=2, hidden_size=64, num_layers=3, padded_vocab=V + 12, output_scale=30.0).double()
    sizes, base_sizes = count_forwards(on_other, monkeypatch), count_forwards(base, monkeypatch)
    run(steered_generate, {"large": large, "base": base, "tuned": on_other}, "tuned", PROMPTS, Blend.from_alpha(1.0))
    assert sizes and base_sizes and set(sizes) <= {1, len(PROMPTS)} and set(base_sizes) <= {1, len(PROMPTS)}


def test_both_loaders_pair_a_bottleneck_s_tuned_on_s_and_keep_any_other(tiny_model_dirs, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "bottleneck"
    on_s = bottleneck_of(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["small_base"]))
    on_s.bottleneck_config.base_model_name_or_path = str(tiny_model_dirs["small_base"])
    save_bottleneck_adapters(on_s, adapter_dir)
    tiny_tokenizer.save_pretrained(adapter_dir)  # fine_tune.py saves it beside the adapter
    flags = dict(large_model=str(tiny_model_dirs["large"]), small_tuned_model=str(adapter_dir))
    models, _ = load_models(ModelArguments(small_base_model=str(tiny_model_dirs["small_base"]), large_device="cpu",
                                           **flags))
    assert paired_adapter(models[SMALL_BASE], models[SMALL_TUNED]) is None  # by default: two forwards
    assert has_bottleneck_adapters(models[SMALL_TUNED])
    flags["pair_small_models"] = True
    models, _ = load_models(ModelArguments(small_base_model=str(tiny_model_dirs["small_base"]), large_device="cpu",
                                           **flags))
    assert paired_adapter(models[SMALL_BASE], models[SMALL_TUNED]) == BOTTLENECK_ADAPTER
    # S another model: the adapter stays as it is (it cannot be merged), and S and S_tuned run two forwards.
    models, _ = load_models(ModelArguments(small_base_model=str(tiny_model_dirs["small_tuned"]), large_device="cpu",
                                           **flags))
    assert paired_adapter(models[SMALL_BASE], models[SMALL_TUNED]) is None
    assert has_bottleneck_adapters(models[SMALL_TUNED])
    _, models = load_evaluation_models(
        EvaluationModelArguments(small_base_model=str(tiny_model_dirs["small_base"]), **flags), ["steered"], "cpu")
    assert paired_adapter(models["small_base"], models["small_tuned"]) == BOTTLENECK_ADAPTER
