"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) for GPT-NeoX and GPT-2: add, save, load.

No maintained library offers them for transformers 5: PEFT has none, and AdapterHub's `adapters` pins
transformers ~=4.57 (and has no GPT-NeoX). So this module is ours, and small. Each adapted sub-layer output h
(the attention block's: `mh_adapter`; the MLP's: `output_adapter`) becomes, before it joins the residual stream,

    a(h) = h + W_up · f(W_down · h + b_down) + b_up        W_down: (H/r, H), W_up: (H, H/r), r = reduction_factor

with f = ReLU or swish (x · sigmoid(x)). W_up and b_up start at zero, so a(h) = h exactly and the adapted model
starts as the base model (W_down: nn.Linear's default init, as LoRA's A). Everything else is frozen. Since f is
non-linear, a(h) cannot be folded into the base weights (unlike LoRA's W + B·A): the adapter stays a separate,
small file (bottleneck_adapter.safetensors + bottleneck_config.json) loaded on its base model.

The adapters are submodules of the sub-layers they follow (`...attention.mh_adapter`, `...mlp.output_adapter`),
applied by forward hooks, so the base model's own parameter names, and its forward code, are unchanged.

Mixed rows, as PEFT's LoRA takes them: `model(..., adapter_names=[...])`, one name per row, runs the adapters on the
rows named "bottleneck" and leaves those named "__base__" as the base model computes them (a(h) = h exactly). A
forward pre-hook on the model pops the argument (so transformers, whose forward passes unknown keyword arguments
down to the attention functions, never sees it) and hands each adapter the rows to adapt; a forward hook clears
them, after an exception too. steering/shared_base.py runs S and S_tuned in one forward this way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from proxytune.foundation.errors import UsageError

BOTTLENECK_CONFIG = "bottleneck_config.json"
BOTTLENECK_WEIGHTS = "bottleneck_adapter.safetensors"

NON_LINEARITIES = ("relu", "swish")

BASE_ROWS = "__base__"  # a row that runs without the adapters (PEFT's name for it)
BOTTLENECK_ADAPTER = "bottleneck"  # a row that runs them

# model_type -> (the decoder's list of blocks, the attention sub-layer, the MLP sub-layer); names as in transformers.
LAYOUTS = {"gpt_neox": ("layers", "attention", "mlp"), "gpt2": ("h", "attn", "mlp")}


@dataclass
class BottleneckConfig:
    """What bottleneck_config.json holds: enough to rebuild the adapters on their base model."""

    base_model_name_or_path: str
    reduction_factor: int = 16
    non_linearity: str = "relu"
    mh_adapter: bool = True  # after the attention block
    output_adapter: bool = True  # after the MLP
    hidden_size: int | None = None  # filled in from the base model
    bottleneck_size: int | None = None  # hidden_size // reduction_factor
    model_type: str | None = None
    adapter_type: str = field(default="bottleneck")


class BottleneckAdapter(nn.Module):
    """a(h) = h + W_up · f(W_down · h + b_down) + b_up, computed in the adapter's dtype (float32 when training on a
    bfloat16 base), returned in h's. `rows` (B,) bool, set for one forward by the model's pre-hook: only those rows
    are adapted, the others are h exactly; None (the default): every row."""

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size, dtype=dtype)
        self.act = nn.ReLU() if non_linearity == "relu" else nn.SiLU()  # SiLU is swish with beta = 1
        self.up = nn.Linear(bottleneck_size, hidden_size, dtype=dtype)
        nn.init.zeros_(self.up.weight)  # a(h) = h at the start
        nn.init.zeros_(self.up.bias)
        self.rows: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        delta = self.up(self.act(self.down(h.to(self.down.weight.dtype))))
        if self.rows is None:
            return h + delta.to(h.dtype)
        if self.rows.shape[0] != h.shape[0]:
            raise ValueError(f"adapter_names has {self.rows.shape[0]} names for a batch of {h.shape[0]} rows")
        # where, not h + rows * delta: a "__base__" row is h itself, even where delta is not finite.
        rows = self.rows.to(h.device).view(-1, *[1] * (h.dim() - 1))  # (B, 1, 1)
        return torch.where(rows, h + delta.to(h.dtype), h)


def _adapters(model) -> list[BottleneckAdapter]:
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


def _take_adapter_names(model, args, kwargs):
    """Forward pre-hook on the adapted model: pop `adapter_names` (one per row: BOTTLENECK_ADAPTER or BASE_ROWS) and
    give each adapter the rows it adapts (all of them when the argument is absent)."""
    names = kwargs.pop("adapter_names", None)
    rows = None
    if names is not None:
        unknown = sorted(set(names) - {BOTTLENECK_ADAPTER, BASE_ROWS})
        if unknown:
            raise ValueError(f"adapter_names {unknown}: a bottleneck model's rows are '{BOTTLENECK_ADAPTER}' or "
                             f"'{BASE_ROWS}'")
        rows = torch.tensor([name == BOTTLENECK_ADAPTER for name in names], device=next(model.parameters()).device)
    for adapter in _adapters(model):
        adapter.rows = rows
    return args, kwargs


def _clear_adapter_names(model, args, output):
    """Forward hook (always called, after an exception too): the next forward adapts every row unless told."""
    for adapter in _adapters(model):
        adapter.rows = None


def _adapt_attention(module, args, output):
    """Forward hook on the attention sub-layer: it returns (attn_output, attn_weights)."""
    if isinstance(output, tuple):
        return (module.mh_adapter(output[0]), *output[1:])
    return module.mh_adapter(output)


def _adapt_mlp(module, args, output):
    """Forward hook on the MLP sub-layer: it returns the MLP's output."""
    return module.output_adapter(output)


def _blocks(model):
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LAYOUTS:
        raise UsageError(f"bottleneck adapters support {', '.join(LAYOUTS)} models, not '{model_type}'; use "
                         "--use_lora for this model")
    blocks, attention, mlp = LAYOUTS[model_type]
    return getattr(model.base_model, blocks), attention, mlp


def add_bottleneck_adapters(model, config: BottleneckConfig, dtype=None):
    """Add adapters to `model` in place, freeze everything else, and record `config` on it (`model.bottleneck_config`,
    which saving reads). `dtype`: the adapters' (default float32, for training). Returns the model."""
    if config.non_linearity not in NON_LINEARITIES:
        raise UsageError(f"--adapter_non_linearity {config.non_linearity} is not one of {', '.join(NON_LINEARITIES)}")
    if not (config.mh_adapter or config.output_adapter):
        raise UsageError("a bottleneck adapter needs mh_adapter, output_adapter or both")
    if has_bottleneck_adapters(model):
        raise UsageError("the model already has bottleneck adapters (it is an adapter directory); it trains them as "
                         "they are: drop --adapter bottleneck, or pass their base model")
    blocks, attention, mlp = _blocks(model)
    hidden = model.config.hidden_size
    size = hidden // config.reduction_factor if config.reduction_factor >= 1 else 0
    if size < 1:
        raise UsageError(f"--reduction_factor {config.reduction_factor} must be in [1, {hidden}] (the model's hidden "
                         "size): the bottleneck has hidden_size / reduction_factor units")
    if config.hidden_size not in (None, hidden) or config.model_type not in (None, model.config.model_type):
        raise UsageError(f"the adapter was trained on a {config.model_type} with hidden size {config.hidden_size}, "
                         f"but its base model {config.base_model_name_or_path} is a {model.config.model_type} with "
                         f"{hidden}; pass the base model it was trained on")
    config.hidden_size, config.bottleneck_size, config.model_type = hidden, size, model.config.model_type
    for param in model.parameters():
        param.requires_grad_(False)
    device = next(model.parameters()).device
    make = lambda: BottleneckAdapter(hidden, size, config.non_linearity, dtype or torch.float32).to(device)  # noqa: E731
    for block in blocks:
        if config.mh_adapter:
            sub = getattr(block, attention)
            sub.mh_adapter = make()
            sub.register_forward_hook(_adapt_attention)
        if config.output_adapter:
            sub = getattr(block, mlp)
            sub.output_adapter = make()
            sub.register_forward_hook(_adapt_mlp)
    model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True)
    model.register_forward_hook(_clear_adapter_names, always_call=True)
    model.bottleneck_config = config
    return model


def has_bottleneck_adapters(model) -> bool:
    return getattr(model, "bottleneck_config", None) is not None


def is_bottleneck_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / BOTTLENECK_CONFIG).is_file()


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapters' parameters, named relative to the decoder (`layers.0.attention.mh_adapter.down.weight`), so
    the same file fits the causal LM and a classifier on the same base."""
    return {name: param.detach() for name, param in model.base_model.named_parameters()
            if ".mh_adapter." in name or ".output_adapter." in name}


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict without the adapters: its base model's, as the base model names it."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if ".mh_adapter." not in name and ".output_adapter." not in name}


def save_bottleneck_adapters(model, directory: str | Path) -> None:
    """Write bottleneck_config.json and bottleneck_adapter.safetensors (the adapters only: the base is not copied)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous().cpu() for name, tensor in adapter_state_dict(model).items()}
    save_file(state, str(directory / BOTTLENECK_WEIGHTS), metadata={"format": "pt"})
    (directory / BOTTLENECK_CONFIG).write_text(json.dumps(asdict(model.bottleneck_config), indent=2) + "\n",
                                               encoding="utf-8")


def read_bottleneck_config(directory: str | Path) -> BottleneckConfig:
    path = Path(directory).expanduser() / BOTTLENECK_CONFIG
    try:
        return BottleneckConfig(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"cannot read {path}: {err}; it should be written by fine_tune.py --adapter bottleneck"
                         ) from None


def load_bottleneck_weights(model, directory: str | Path) -> None:
    """Load an adapter file into a model that has the same adapters (resuming, the best checkpoint); strict: every
    adapter tensor must be in the file, with its shape."""
    from safetensors.torch import load_file

    file = Path(directory).expanduser() / BOTTLENECK_WEIGHTS
    try:
        saved = load_file(str(file))
    except Exception as err:  # safetensors has its own error types for missing and corrupt files
        raise UsageError(f"cannot read the bottleneck adapter {file}: {err}") from None
    own = adapter_state_dict(model)
    if saved.keys() != own.keys() or any(saved[k].shape != own[k].shape for k in own):
        raise UsageError(f"{file} does not fit the model's adapters (other layers or sizes); pass the base model and "
                         "--reduction_factor it was trained with")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(saved[name].to(param.dtype))


def attach_saved_adapters(model, directory: str | Path, dtype=None):
    """Add the adapters saved in `directory` (read_bottleneck_config) to their loaded base `model`, with their
    weights. Returns the model."""
    add_bottleneck_adapters(model, read_bottleneck_config(directory), dtype)
    load_bottleneck_weights(model, directory)
    return model
