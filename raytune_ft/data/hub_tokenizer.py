"""Load a tokenizer named by a Hugging Face Hub id, failing in seconds with one line when the Hub cannot
be reached and the tokenizer is not cached.

The gap this fills: ``AutoTokenizer.from_pretrained`` on an unreachable Hub retries with backoff for about
50 s, then ends in a long ``OSError`` traceback that says neither which spec field named the model nor what
to set. Here the mode is decided first: a local directory loads as it is; ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) loads from the cache only; otherwise one short request tells whether the Hub
endpoint (``HF_ENDPOINT``) answers at all, and when it does not, a cached copy is used and an uncached id
is refused with what to set.
"""

from __future__ import annotations

import os
from typing import Any

from raytune_ft.errors import UserError

PROBE_TIMEOUT_S = 5.0
_CACHE_PROBES = ("tokenizer_config.json", "tokenizer.json", "config.json")


def is_local(name: str) -> bool:
    return os.path.isdir(os.path.expanduser(name))


def offline() -> bool:
    """The Hub libraries' offline switch (HF_HUB_OFFLINE, or transformers' TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_cached(name: str, revision: str | None = None) -> bool:
    """Some tokenizer or config file of ``name`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for f in _CACHE_PROBES:
        try:
            hit = try_to_load_from_cache(name, f, revision=revision)
        except Exception:  # a malformed id: not cached
            return False
        if isinstance(hit, str):
            return True
    return False


def unreachable(url: str) -> str | None:
    """Why the Hub at ``url`` cannot be reached (one short request, through the Hub client's own session
    and its proxy settings, no retries), or None when it answers with any HTTP status."""
    from huggingface_hub import get_session

    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # connection refused, DNS, TLS, timeout: each means no Hub from here
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "refused" in text.lower():
            return "connection refused"
        return text[:160]
    return None


def load_tokenizer(name: str, *, field: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """``AutoTokenizer.from_pretrained(name)``; ``field`` names the spec field that gave ``name``. UserError
    (one line) when it cannot be loaded: offline and uncached, the Hub unreachable and uncached, or
    transformers refusing it."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if not is_local(name):
        if offline():
            if not is_cached(name, revision):
                raise UserError(_offline_uncached(field, name))
            kwargs["local_files_only"] = True
        else:
            why = unreachable(endpoint())
            if why is not None:
                if not is_cached(name, revision):
                    raise UserError(
                        f"{field} {name}: the Hugging Face Hub at {endpoint()} is unreachable ({why}) and the "
                        "tokenizer is not in the local cache; set it to a local directory, fix the network or "
                        "HF_ENDPOINT, or download it once where the Hub is reachable and set HF_HUB_OFFLINE=1"
                    )
                kwargs["local_files_only"] = True  # cached: use it now rather than retry the Hub for a minute
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{field} {name}: cannot load the tokenizer: {first}") from None


def _offline_uncached(field: str, name: str) -> str:
    return (f"{field} {name}: not in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE); "
            "set it to a local directory, or download it once with the network on (unset HF_HUB_OFFLINE)")
