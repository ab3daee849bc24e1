"""Rows of a Hugging Face Hub dataset (``hf://datasets/ORG/NAME``), read through ``datasets.load_dataset``.

``datasets`` does the parts that are its own: resolving the configuration and split, downloading only the
files they need, caching them (``HF_HOME``/``HF_DATASETS_CACHE``), and, offline (``HF_HUB_OFFLINE=1``) or
with the Hub unreachable, reading the latest cached copy. What it lacks and this module adds: one
``DataError`` line instead of its tracebacks (not cached and offline; no such dataset, config or split), a
bounded wait on the Hub, and rows shaped like every other source's (:class:`RawRow`, 1-based row numbers),
so the format checks, bad-row handling, weights and splits stay one path.

Only data is read: a dataset repository that ships a loading script is refused by ``datasets`` itself
(scripts are no longer supported there), and rtf never passes ``trust_remote_code``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from raytune_ft.data.sources import RawRow
from raytune_ft.errors import DataError

PREFIX = "hf://datasets/"


def is_hub(path: str) -> bool:
    return path.startswith(PREFIX)


def describe(path: str, config: str | None = None, split: str | None = None, revision: str | None = None) -> str:
    """How messages name a hub source: ``hf://datasets/org/name[config]:split@revision``."""
    return path + (f"[{config}]" if config else "") + f":{split or 'train'}" + (f"@{revision}" if revision else "")


def read_hub_rows(path: str, *, config: str | None = None, split: str | None = None,
                  revision: str | None = None) -> Iterator[RawRow]:
    """Yield the rows of one split of a hub dataset; DataError (one line) when it cannot be had."""
    repo = path[len(PREFIX):]
    shown = describe(path, config, split, revision)
    dataset = _load(repo, config, split or "train", revision, shown)
    for i, row in enumerate(dataset, start=1):
        yield RawRow(shown, i, dict(row))  # Arrow rows: already decoded objects, one per row


def _load(repo: str, config: str | None, split: str, revision: str | None, shown: str) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    # Their only output here would be "Using the latest cached version…" and, with the Hub unreachable and
    # nothing cached, huggingface_hub's retry lines (about 25 s of them; HF_HUB_OFFLINE=1 skips the wait).
    datasets.logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(repo, config, split=split, revision=revision)
    except (ConnectionError, FileNotFoundError) as e:  # offline or unreachable, and no cached copy
        raise _not_cached(shown, e)
    except DatasetNotFoundError as e:
        raise DataError(f"{shown}: {_first_line(e)}", hint="check the dataset id; gated datasets need HF_TOKEN")
    except ValueError as e:  # an unknown split or config: datasets lists the ones there are
        raise DataError(f"{shown}: {_first_line(e)}", hint="set the source's split: and config: to ones it has")


def _not_cached(shown: str, e: BaseException) -> DataError:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return DataError(f"{shown}: not in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE)",
                         hint="unset HF_HUB_OFFLINE to download it once, or point HF_HOME at a cache that has it")
    return DataError(f"{shown}: not in the local Hugging Face cache, and the Hub at {constants.ENDPOINT} cannot be "
                     f"reached ({_first_line(e)})",
                     hint="check the network or HF_ENDPOINT; HF_HUB_OFFLINE=1 reads only the cache, without waiting")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
