"""One forward for S and S_tuned when S_tuned is a LoRA or bottleneck adapter on S's very weights (issue 29).

Most users tune S with an adapter (fine_tune.py --use_lora, or --adapter bottleneck). Then S and S_tuned are the
same base weights, and the adapted model runs its adapter on some rows of one batch and not on the others:
`model(..., adapter_names=[...])`, one name per row, with "__base__" for a row that runs the base model alone.
LoRA: PEFT's mixed batches (peft 0.21: LoraModel._enable_peft_forward_hooks and LoraLayer._mixed_batch_forward add
each adapter's update to its rows only). Bottleneck: the same argument, taken by our adapters
(models/adapters.py: a "__base__" row skips them, a(h) = h exactly). So a batch of 2B rows, S's B rows first, then
S_tuned's, serves both models in one forward and streams the base weights once:

    logits[:B] = S(x),  logits[B:] = S_tuned(x)        for  model(input_ids=cat([x, x]), adapter_names=pair_names)

PEFT's constraints: the adapter is not merged (a merged one is in the weights of every row), no DoRA, eval mode.
Opt-in (`--pair_small_models` of steer.py and evaluation.py): on the machines measured it does not pay. Per token,
at pythia-410m/70m shapes, one forward against two was 0.98x (plain loop) and 1.10x (speculative) on a 2-core CPU
and 1.10-1.55x on an H200 in bf16 (bench/RESULTS.md#bench_speculative, part 5): PEFT's mixed-row path adds more
small kernels and index copies than the second forward of a 70m model costs. What it saves is memory: one copy of S.

With it, steering/loading.py (and evaluation's loader) load a LoRA S_tuned unmerged and call `share_or_merge`: when
its base weights equal S's, bit for bit, it is marked as S's twin; otherwise it is merged as before (a fully fine-tuned
S_tuned, or an adapter on another base, keeps two forwards). A bottleneck S_tuned is never merged (it cannot be):
a twin, or as it is. tests/test_shared_base.py (LoRA) and tests/test_shared_base_bottleneck.py compare the paired
forward with two separate ones in float64, left-padded batches and single rows, in every decoder and in scoring.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from proxytune.models.adapters import BASE_ROWS, BOTTLENECK_ADAPTER, base_state_dict, has_bottleneck_adapters

# The --pair_small_models flag of steer.py, evaluation.py and serve.py (their argument classes share it).
PAIR_SMALL_MODELS_HELP = (
    "When S_tuned is a LoRA or bottleneck adapter on S's own weights: true = S and S_tuned run as one forward of 2B "
    "rows (PEFT's adapter_names), one copy of S's weights in memory; false (default) = two forwards, a LoRA S_tuned "
    "merged into a copy of S. Measured: one forward is no faster on CPU and 1.1-1.6x slower per token on an H200 "
    "(bench/RESULTS.md#bench_speculative, part 5).")


def lora_adapter_name(model) -> str | None:
    """The active adapter of an unmerged PEFT LoRA model without DoRA (what mixed batches support), else None."""
    config = getattr(model, "peft_config", None)
    if not config or getattr(model, "active_adapter", None) not in config:
        return None
    adapter = model.active_adapter
    lora = config[adapter]
    if str(getattr(lora.peft_type, "value", lora.peft_type)) != "LORA" or getattr(lora, "use_dora", False):
        return None
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(m.merged for m in layers):
        return None
    return adapter


def mixed_rows_adapter(model) -> str | None:
    """The adapter name under which `model` runs its adapter on the rows so named and the base model alone on the
    "__base__" rows of one batch: an unmerged LoRA model's (lora_adapter_name) or a bottleneck model's; else None."""
    return BOTTLENECK_ADAPTER if has_bottleneck_adapters(model) else lora_adapter_name(model)


def base_weights_of(model) -> dict[str, torch.Tensor]:
    """The state dict of the base model under a bottleneck model (the adapters left out) or a PEFT LoRA model, named
    as the bare model names it (`x.base_layer.weight` -> `x.weight`; the LoRA matrices left out)."""
    if has_bottleneck_adapters(model):
        return base_state_dict(model)
    state = model.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def share_or_merge(small_base, small_tuned, merge: bool = True, pair: bool = True):
    """After loading S_tuned unmerged: with `pair`, mark it as S's twin when it is a LoRA or bottleneck model whose
    base weights equal S's (same names, shapes, dtypes, devices, values) and return it; otherwise return it merged
    (merge_and_unload) when it is a PEFT model and `merge` (False: an adapter on a quantised base, which stays
    unmerged), or as it is (a full model; a bottleneck model, which cannot be merged). The scripts pair only when
    asked (--pair_small_models): one forward of 2B rows measured no faster than two on CPU and slower on a GPU."""
    if small_base is None or small_tuned is None or small_base is small_tuned:
        return small_tuned
    if pair and mixed_rows_adapter(small_tuned) is not None:
        base, tuned = small_base.state_dict(), base_weights_of(small_tuned)
        if base.keys() == tuned.keys() and all(
                base[k].shape == tuned[k].shape and base[k].dtype == tuned[k].dtype
                and base[k].device == tuned[k].device and torch.equal(base[k], tuned[k]) for k in base):
            small_tuned._proxytune_twin_of = weakref.ref(small_base)
            return small_tuned
    if merge and hasattr(small_tuned, "merge_and_unload") and getattr(small_tuned, "peft_config", None):
        return small_tuned.merge_and_unload().eval()
    return small_tuned


def paired_adapter(small_base, small_tuned) -> str | None:
    """S_tuned's adapter name when one forward of S_tuned's model serves both (share_or_merge marked it as S's twin
    and it is still a bottleneck or unmerged LoRA model), else None."""
    twin = getattr(small_tuned, "_proxytune_twin_of", None)
    if small_base is None or twin is None or twin() is not small_base:
        return None
    return mixed_rows_adapter(small_tuned)


def pair_names(adapter: str, batch: int) -> list[str]:
    """adapter_names of a paired batch: S's `batch` rows, then S_tuned's."""
    return [BASE_ROWS] * batch + [adapter] * batch


def paired(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (2B, ...): the rows twice, S's copy first."""
    return torch.cat([tensor, tensor], dim=0)


def split_pair(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> S's (B, ...), S_tuned's (B, ...)."""
    half = tensor.shape[0] // 2
    return tensor[:half], tensor[half:]


def forward_kwargs(adapter_names: list[str] | None) -> dict[str, Any]:
    """The extra forward argument of a paired batch ({} for a plain model)."""
    return {} if adapter_names is None else {"adapter_names": adapter_names}
