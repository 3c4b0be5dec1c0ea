"""proxytune: fine-tune a small model, steer a large one with the small pair's difference at decoding time.

The library under the top-level scripts (processing_meta_review.py, fine_tune.py, steer.py, evaluation.py,
rl_tune.py, workbook.py). Its layers, lowest first: foundation -> task -> models | workbook -> steering | training
-> evaluation | preference; docs/architecture.md says which module owns what, and `lint-imports` checks the layers.
"""

import logging

# bitsandbytes, which peft and the Trainer import whenever it is installed, logs at import that an optional kernel from
# the Hub is missing (its built-in CPU kernel runs instead), and LLM.int8 logs that it casts inputs to float16 (its
# design) on every matrix product: noise on stderr, before logging is even set up.
for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    logging.getLogger(_name).setLevel(logging.ERROR)
