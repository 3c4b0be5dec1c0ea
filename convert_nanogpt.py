"""Convert a nanoGPT checkpoint (`ckpt.pt` from karpathy/nanoGPT's train.py) once into a Hugging Face GPT-2 directory.

With the tokenizer its data was encoded with (nanoGPT's default: GPT-2's BPE, `gpt2` on the Hub):
    python convert_nanogpt.py --checkpoint out/ckpt.pt --tokenizer_name gpt2 --output_dir outputs/nanogpt-gpt2

The directory (model.safetensors, config.json, the tokenizer, nanogpt_source.json) then goes wherever a model does:
    python fine_tune.py --model_name_or_path outputs/nanogpt-gpt2 ...
    python steer.py --large_model gpt2-medium --small_base_model outputs/nanogpt-gpt2 ...

The checkpoint is read with torch.load(weights_only=True) only: tensors and plain containers, never other objects (a
pickle can run code). What maps onto GPT-2 how: proxytune/models/nanogpt.py. fine_tune.py and the other scripts also
take the `.pt` itself (converted on the fly, the tokenizer from --tokenizer_name).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_tokenizer
from proxytune.models.nanogpt import convert_nanogpt, is_nanogpt_checkpoint

logger = logging.getLogger("convert_nanogpt")


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={"help": "nanoGPT's checkpoint file (ckpt.pt: keys model, model_args, ...)."})
    output_dir: str = field(metadata={"help": "The GPT-2 directory to write (atomically)."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "The tokenizer the checkpoint's data was encoded with (Hub id or directory; "
                                "nanoGPT's default is GPT-2's BPE, `gpt2`), saved beside the weights. Without it the "
                                "directory has no tokenizer, and every script then needs --tokenizer_name."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a Hub tokenizer to run its own code."})


def main(args: ConvertArguments):
    """Convert; returns the output directory."""
    setup_logging()
    if not is_nanogpt_checkpoint(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint} is not a .pt file; pass nanoGPT's ckpt.pt")
    tokenizer = load_tokenizer(args.tokenizer_name, args.trust_remote_code) if args.tokenizer_name else None
    out = convert_nanogpt(args.checkpoint, args.output_dir, tokenizer, overwrite=args.overwrite_output_dir)
    logger.info("wrote %s: %s", out, ", ".join(sorted(p.name for p in out.iterdir())))
    return out


if __name__ == "__main__":
    run_cli(main, [ConvertArguments], __doc__)
