"""lm-evaluation-harness with the steered blend as a model type: `--model proxytune-steered`.

lm-eval's own command line (`lm_eval run ...`, every flag the same), with proxytune's backend registered first
(lm-eval 0.4.13 reads no plugins from a checkout). Needs `pip install lm-eval==0.4.13`. Evaluate the blend
steer.py --tune wrote on a task of your own (a YAML over local files, in --include_path):
    python harness.py run --model proxytune-steered --model_args blend=outputs/steer/blend.json \
        --tasks my_task --include_path my_tasks/ --device cpu --batch_size 8

The three models and alpha instead of a blend file (S_tuned = S steers nothing: L's own results):
    python harness.py run --model proxytune-steered --model_args large_model=EleutherAI/pythia-410m,\
small_base_model=EleutherAI/pythia-70m,small_tuned_model=OUT/final,alpha=1.0 --tasks my_task --include_path my_tasks/

docs/integrations.md lists the model_args (steer.py's model flags without dashes, the blend, speculative, seed).
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import proxytune.integrations.harness  # noqa: F401  (registers the proxytune-steered model type)

if __name__ == "__main__":
    cli_evaluate()
