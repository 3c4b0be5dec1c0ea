"""Serve the steered model over an OpenAI-compatible HTTP API: /v1/completions, /v1/models, /health.

The blend steer.py --tune wrote (its record names L, S and S_tuned), on this machine only (127.0.0.1:8000):
    python serve.py --blend outputs/steer/blend.json

The three models and alpha, on every network, with a key (read from the environment, not the command line):
    PROXYTUNE_API_KEY=secret python serve.py --large_model EleutherAI/pythia-410m \\
        --small_base_model EleutherAI/pythia-70m --small_tuned_model OUT/final --alpha 1.0 --host 0.0.0.0

Then any OpenAI client: `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret").completions.create(
model="proxytune-steered", prompt="...", max_tokens=64, temperature=0)`, or lm-evaluation-harness's
`local-completions` model type. Concurrent requests are decoded together in batches (--batch_size). Prompts reach the
models as sent; the prompt template S_tuned was tuned with (as its final/ or the blend records; --prompt_template
overrides) is listed by /v1/models, and with --use_template each text prompt (the reviews, or the instruction) is put
into it, as steer.py does. Requests, the flags and what the answers hold: docs/integrations.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.config import to_jsonable
from proxytune.integrations.server import API_KEY_ENV, LOOPBACK, ServeArguments, create_app, serve
from proxytune.integrations.steered import load_steered, resolve_blend
from proxytune.steering.arguments import ModelArguments

logger = logging.getLogger("serve")


def main(model_args: ModelArguments, serve_args: ServeArguments) -> None:
    """Load the steered model and serve it until interrupted."""
    setup_logging()
    api_key = serve_args.api_key or os.environ.get(API_KEY_ENV) or None
    blend = resolve_blend(serve_args.blend, serve_args.alpha)  # a bad blend file fails before the models load
    shown = dataclasses.replace(serve_args, api_key="<redacted>" if api_key else None)
    logger.info("config: %s", json.dumps(to_jsonable(model_args, shown)))
    if serve_args.host not in LOOPBACK and api_key is None:
        logger.warning("listening on %s without an API key: anyone who reaches the port can use the models "
                       "(give --api_key or %s)", serve_args.host, API_KEY_ENV)
    steered = load_steered(model_args, blend, serve_args.blend, serve_args.speculative,
                           serve_args.draft_tokens or None, serve_args.prompt_template)
    app = create_app(steered, model_name=serve_args.model_name, api_key=api_key, batch_size=serve_args.batch_size,
                     batch_wait_s=serve_args.batch_wait_ms / 1000, seed=serve_args.seed,
                     use_template=serve_args.use_template)
    logger.info("prompt template %s: %s", steered.template.name,
                "text prompts are put into it" if serve_args.use_template else
                "prompts reach the models as sent (format them with it, or pass --use_template)")
    logger.info("serving '%s' (%s) at http://%s:%d/v1%s", serve_args.model_name, steered.describe(), serve_args.host,
                serve_args.port, ", API key required" if api_key else "")
    serve(app, serve_args.host, serve_args.port)


if __name__ == "__main__":
    run_cli(main, [ModelArguments, ServeArguments], __doc__)
