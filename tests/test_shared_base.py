"""proxytune/steering/shared_base.py: when S_tuned is a LoRA adapter (PEFT mixed batches) or a bottleneck adapter on
S's weights, one forward of 2B rows serves both, and every decoder gives what two separate forwards give (float64:
equal tokens, log-probs within rounding) while S runs no forward of its own; a fully fine-tuned S_tuned, or an adapter
on other weights, is not paired. The bottleneck's own cases: tests/test_shared_base_bottleneck.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model

from proxytune.models.adapters import BottleneckConfig, add_bottleneck_adapters
from proxytune.steering.arguments import ModelArguments
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend
from proxytune.steering.decoding import left_pad, steered_generate
from proxytune.steering.loading import load_models
from proxytune.steering.scoring import score_targets
from proxytune.steering.shared_base import paired_adapter, share_or_merge
from proxytune.steering.speculative import DraftSchedule, SpeculativeStats, speculative_generate

V = 300
PAD, EOS = 1, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20], [30, 31, 32, 33, 34]]


def lora_of(base, seed: int = 3):
    """A LoRA S_tuned on (a copy of) `base`'s weights, its adapters random (not the zero init), so it differs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"],
                        init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base), config).eval()


def bottleneck_of(base, seed: int = 3):
    """A bottleneck S_tuned on (a copy of) `base`'s weights, in its dtype, its up-projections random (not the zero
    init), so it differs; at unit scale with seed 3 the speculation tests' drafts are partly kept, partly rejected."""
    model = add_bottleneck_adapters(copy.deepcopy(base), BottleneckConfig("base", reduction_factor=4),
                                    dtype=next(base.parameters()).dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_adapter.up." in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model.eval()


TUNED = {"lora": (lora_of, "default"), "bottleneck": (bottleneck_of, "bottleneck")}  # kind -> (make, adapter name)


@pytest.fixture(scope="module", params=list(TUNED))
def models(request):
    large = make_tiny_model(V, seed=2, hidden_size=64, num_layers=3, padded_vocab=V + 12, output_scale=30.0)
    base = make_tiny_model(V, seed=0, padded_vocab=V + 12, output_scale=30.0)
    large, base = large.double(), base.double()
    make, adapter = TUNED[request.param]
    tuned = make(base).double()
    # Two forwards: the same adapter on its own copy, never paired (no twin mark).
    separate = copy.deepcopy(tuned)
    paired = share_or_merge(base, tuned)
    assert paired is tuned and paired_adapter(base, paired) == adapter
    assert paired_adapter(base, separate) is None
    return {"large": large, "base": base, "paired": paired, "separate": separate}


def test_only_a_lora_adapter_on_the_same_weights_is_paired():
    base = make_tiny_model(V, seed=0, padded_vocab=V + 12)
    other = make_tiny_model(V, seed=5, padded_vocab=V + 12)
    on_other = lora_of(other)
    merged = share_or_merge(base, on_other)  # an adapter on other weights: merged, two forwards
    assert paired_adapter(base, merged) is None and not hasattr(merged, "peft_config")
    full = make_tiny_model(V, seed=6, padded_vocab=V + 12)  # a fully fine-tuned S_tuned: as it is
    assert share_or_merge(base, full) is full and paired_adapter(base, full) is None
    nudged = lora_of(base)
    with torch.no_grad():
        nudged.get_base_model().gpt_neox.embed_in.weight[3, 0] += 1e-6  # one base weight differs
    assert paired_adapter(base, share_or_merge(base, nudged)) is None


def run(fn, models, tuned_key, prompts, blend, **kw):
    ids, mask = left_pad(prompts, PAD)
    kw = dict(dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, vocab_size=V), **kw)
    return fn(models["large"], models["base"], models[tuned_key], ids, mask, blend, **kw)


def count_forwards(model, monkeypatch) -> list[int]:
    """The batch size of every forward of `model` (its rows), recorded."""
    sizes = []
    real = type(model).forward

    def forward(self, *args, **kwargs):
        if self is model:
            ids = kwargs.get("input_ids", args[0] if args else None)
            sizes.append(ids.shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    return sizes


@pytest.mark.exactness
@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["left-padded batch", "one row"])
def test_plain_loop_paired_equals_two_forwards(models, prompts, monkeypatch):
    blend = Blend.from_alpha(1.0)
    two = run(steered_generate, models, "separate", prompts, blend, return_logprobs=True)
    sizes, base_sizes = count_forwards(models["paired"], monkeypatch), count_forwards(models["base"], monkeypatch)
    one = run(steered_generate, models, "paired", prompts, blend, return_logprobs=True)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and base_sizes == []
    torch.testing.assert_close(one[2], two[2], rtol=0, atol=1e-10)
    assert sizes and all(n in (1, 2 * len(prompts)) for n in sizes)  # paired steps (and a CPU's row prefills)
    assert 2 * len(prompts) in sizes


@pytest.mark.exactness
def test_scoring_and_tunes_cached_logprobs_paired_equal_two_forwards(models, monkeypatch):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    targets = [[20, 21, 22], [23, 24, 25, 26, 27], [28]]
    kw = dict(vocab_size=V, batch_size=2, blend=Blend.from_alpha(1.0), keep_logprobs=(LARGE, SMALL_TUNED, SMALL_BASE),
              cache_dtype=torch.float64, pad_token_id=PAD, show_progress=False)
    two = score_targets({LARGE: models["large"], SMALL_TUNED: models["separate"], SMALL_BASE: models["base"]},
                        prompts, targets, **kw)
    sizes, base_sizes = count_forwards(models["paired"], monkeypatch), count_forwards(models["base"], monkeypatch)
    one = score_targets({LARGE: models["large"], SMALL_TUNED: models["paired"], SMALL_BASE: models["base"]},
                        prompts, targets, **kw)
    assert sizes == [4, 2] and base_sizes == []  # batches of 2 and 1 rows, each paired; S runs none of its own
    assert one.keys() == two.keys()
    for key in two:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-10)
    assert not torch.allclose(one[f"logprobs/{SMALL_TUNED}"], one[f"logprobs/{SMALL_BASE}"])  # two models


@pytest.mark.exactness
@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["left-padded batch", "one row"])
@pytest.mark.parametrize("draft_tokens", [None, 1, 3])
def test_speculation_paired_equals_two_forwards(models, prompts, draft_tokens, monkeypatch):
    """S rides in S_tuned's drafting forwards (2B rows) and runs no verifying forward; the tokens are the plain
    loop's with two forwards. A blend S_tuned leads (mostly-draft) keeps drafts, so rounds of several run."""
    blend = Blend(large_weight=0.15, tuned_weight=1.0, base_weight=0.1)
    plain = run(steered_generate, models, "separate", prompts, blend, max_new_tokens=16)
    stats = SpeculativeStats()
    # Adaptive (None): priced by a clock of the rounds run (a draft costs 0.05 of a step), so it drafts and steps.
    schedule = DraftSchedule(8, clock=lambda: sum(1 + 0.05 * k for _, k, _ in stats.batch_rounds)) \
        if draft_tokens is None else None
    sizes, base_sizes = count_forwards(models["paired"], monkeypatch), count_forwards(models["base"], monkeypatch)
    spec = run(speculative_generate, models, "paired", prompts, blend, max_new_tokens=16, draft_tokens=draft_tokens,
               stats=stats, schedule=schedule)
    assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1]) and base_sizes == []
    assert stats.forwards[SMALL_BASE] == 0 and 0 < stats.accepted < stats.drafted
    assert 2 * len(prompts) in sizes and all(n in (1, 2 * len(prompts)) for n in sizes)


@pytest.mark.exactness
def test_speculative_sampling_paired_draws_what_two_forwards_draw(models):
    """Sampling with a seed: the same random draws see the same distributions (float64), so the same tokens."""
    blend = Blend(large_weight=0.5, tuned_weight=1.0, base_weight=0.5)
    kw = dict(do_sample=True, temperature=1.0, top_p=0.9, draft_tokens=2, max_new_tokens=16)
    two = run(speculative_generate, models, "separate", PROMPTS, blend, generator=torch.Generator().manual_seed(0),
              **kw)
    one = run(speculative_generate, models, "paired", PROMPTS, blend, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(one[0], two[0])


def test_steer_loads_a_lora_s_tuned_on_s_as_a_pair_and_any_other_as_before(tiny_model_dirs, tiny_tokenizer, tmp_path):
    from test_steer import run_main
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "lora"
    lora_of(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["small_base"])).save_pretrained(adapter_dir)
    tiny_tokenizer.save_pretrained(adapter_dir)  # fine_tune.py saves it beside the adapter
    flags = dict(large_model=str(tiny_model_dirs["large"]), small_tuned_model=str(adapter_dir), large_device="cpu")
    # By default (no --pair_small_models) two forwards, the adapter merged: one measured no faster.
    models, _ = load_models(ModelArguments(small_base_model=str(tiny_model_dirs["small_base"]), **flags))
    assert paired_adapter(models[SMALL_BASE], models[SMALL_TUNED]) is None
    assert not hasattr(models[SMALL_TUNED], "peft_config")
    flags["pair_small_models"] = True
    models, _ = load_models(ModelArguments(small_base_model=str(tiny_model_dirs["small_base"]), **flags))
    assert paired_adapter(models[SMALL_BASE], models[SMALL_TUNED]) == "default"
    # S another model: the adapter is merged, as before, and S and S_tuned run two forwards.
    models, _ = load_models(ModelArguments(small_base_model=str(tiny_model_dirs["small_tuned"]), **flags))
    assert paired_adapter(models[SMALL_BASE], models[SMALL_TUNED]) is None
    assert not hasattr(models[SMALL_TUNED], "peft_config")
    rows = run_main(["--large_model", flags["large_model"], "--small_base_model", str(tiny_model_dirs["small_base"]),
                     "--small_tuned_model", str(adapter_dir), "--large_device", "cpu", "--alpha", "1.0",
                     "--prompt", "Strong results. Accept.", "--max_new_tokens", "6", "--pair_small_models", "true"])
    assert rows[0]["n_new_tokens"] == 6 or rows[0]["ended_with_eos"]
