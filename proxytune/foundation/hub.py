"""Hugging Face Hub access: is it reachable, what is cached, and errors that say how to work offline."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

from proxytune.foundation.errors import UsageError, first_line

logger = logging.getLogger(__name__)


# The Hub, reachable or not. huggingface_hub retries a failed request five times, 1 + 2 + 4 + 8 + 8 s apart
# (huggingface_hub/utils/_http.py; no setting changes it), and loading one tokenizer makes two such requests: without
# a network, ~48 s pass before the error. One probe with a short timeout tells within seconds, and offline mode then
# sends the libraries straight to their caches.
HUB_PROBE_TIMEOUT_S = 3.0  # a slow link can set HF_HUB_ETAG_TIMEOUT, which the probe then uses instead


@functools.cache
def hub_is_unreachable() -> bool:
    """Whether the Hub endpoint fails to answer within HUB_PROBE_TIMEOUT_S (False under HF_HUB_OFFLINE, where nothing
    is asked). When it fails, this process is switched to offline mode, so that a cached model still loads at once."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    timeout = HUB_PROBE_TIMEOUT_S
    if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT:
        timeout = constants.HF_HUB_ETAG_TIMEOUT
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any answer, even an error status, will do
        return False
    except Exception as err:  # httpx's connect/timeout/proxy errors, DNS failures: all mean "unreachable"
        logger.warning("the Hugging Face Hub (%s) is unreachable (%s); using the local cache only",
                       constants.ENDPOINT, first_line(err))
        go_offline()
        return True


def go_offline() -> None:
    """Offline mode for this process and its children, as HF_HUB_OFFLINE=1 at start would have set it."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers (is_offline_mode)
    if "datasets.config" in sys.modules:  # datasets copies the flag at import; a later import reads the one above
        sys.modules["datasets.config"].HF_HUB_OFFLINE = sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True


def hub_offline_reason() -> str | None:
    """Call before loading a Hub id: None when the Hub will be asked; otherwise why only the local cache will be
    read ("the Hugging Face Hub (https://huggingface.co) is unreachable", or "HF_HUB_OFFLINE is set")."""
    from huggingface_hub import constants

    if hub_is_unreachable():
        return f"the Hugging Face Hub ({constants.ENDPOINT}) is unreachable"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return None


def not_cached_error(what: str, name: str, flag: str, reason: str) -> UsageError:
    """`{reason} and {what} '{name}' is not in the local cache (...); pass a local path with {flag}, or ...`."""
    from huggingface_hub import constants

    fix = ("run once where the Hub is reachable to fill the cache (later runs then work offline, with HF_HUB_OFFLINE=1 "
           "to skip the network)" if "unreachable" in reason else "unset HF_HUB_OFFLINE where the Hub is reachable")
    return UsageError(f"{reason} and {what} '{name}' is not in the local cache ({constants.HF_HUB_CACHE}); pass a "
                      f"local path with {flag}, or {fix}")


def check_hub_for_push(flag: str = "--push_to_hub") -> None:
    """Refuse a push up front, before any work, when the Hub cannot be reached."""
    reason = hub_offline_reason()
    if reason:
        raise UsageError(f"{flag} needs the Hugging Face Hub, but {reason}; drop {flag} (push later with "
                         "`hf upload`) or run where the Hub is reachable")


def is_missing_local_path(name_or_path: str) -> bool:
    """A Hub id is 'name' or 'org/name'; './x', '/x', '~/x', 'x/' and 'a/b/c' can only be local paths, so when they
    do not exist, say that rather than the Hub's "Repo id must be in the form ..."."""
    local = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith("/") or name_or_path.count("/") > 1
    return local and not Path(name_or_path).expanduser().exists()


def hub_model_of(name_or_path: str) -> str | None:
    """The Hub id that loading `name_or_path` downloads from, or None: the id itself, or the base model of a local
    LoRA adapter directory when that base is not a local path."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path
    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and not Path(base).expanduser().exists() else None


def hub_revision(repo_id: str, cache_dir: str | Path | None = None) -> str | None:
    """The commit of `repo_id` in the local Hub cache (the snapshot from_pretrained loads), or None when the model
    is not cached from the Hub. transformers 5 no longer keeps the commit on the config (`_commit_hash` is gone)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # not a valid repo id: a path, a typo; the loader reports those
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None  # .../snapshots/<commit>/config.json
