"""``rtf push RUN --repo-id ORG/NAME``: upload a finished run's ``final/`` to the Hugging Face Hub.

What goes up: every file of ``final/`` (the adapter or the full model, the tokenizer, trainer_state.json,
final_results.json, rtf_spec.yaml), a generated model card as ``README.md`` and the loss plot as
``loss.png`` (from the run's metrics.jsonl, :mod:`raytune_ft.tools.plot`). ``huggingface_hub`` does the
upload (``create_repo`` then one ``create_commit``), with the token from ``$HF_TOKEN``, which is never
printed. ``dry_run`` lists the files and renders the card without touching the network.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import yaml

from raytune_ft import rundir as rd
from raytune_ft.checkpoints import local_files
from raytune_ft.errors import UserError

TOKEN_ENV = "HF_TOKEN"
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
CARD, PLOT = "README.md", "loss.png"
_SKIP = (".rtf_source.json", rd.MANIFEST)  # rtf's own cache marker and final/'s manifest, not part of the artifact


def push(source: str, repo_id: str, *, private: bool = False, dry_run: bool = False,
         endpoint_url: str | None = None) -> dict[str, Any]:
    """Upload (or with ``dry_run`` only describe) the run's final artifacts. Returns ``{"repo_id",
    "files": [{"path", "size"}], "card", "dry_run", "url"}``."""
    if not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UserError(f"--repo-id {repo_id!r} is not a Hub repo id", hint="write it as ORG/NAME or USER/NAME")
    from raytune_ft.tools.source import resolve_source

    src = resolve_source(source, endpoint_url=endpoint_url)
    if not os.path.isfile(os.path.join(src.path, rd.FINAL_RESULTS)):
        raise UserError(f"{source}: {src.describe()} is not a finished run's final/ (no {rd.FINAL_RESULTS})",
                        hint="push uploads what a run ended with; let it finish (or resubmit it) first")
    token = None
    if not dry_run:
        token = os.environ.get(TOKEN_ENV)
        if not token:
            raise UserError(f"${TOKEN_ENV} is not set: the Hub needs a write token to create and upload the repo",
                            hint="export HF_TOKEN=... (a token with write access), or pass --dry-run")

    files = sorted(f for f in local_files(src.path) if os.path.basename(f) not in _SKIP and f not in (CARD, PLOT))
    with open(os.path.join(src.path, rd.FINAL_RESULTS), encoding="utf-8") as f:
        results = json.load(f)
    spec_file = os.path.join(src.path, rd.SPEC)  # what the run trained with; else the run dir's
    spec_yaml = open(spec_file, encoding="utf-8").read() if os.path.isfile(spec_file) else ""
    if not spec_yaml and src.spec is not None:
        from raytune_ft.spec import to_yaml

        spec_yaml = to_yaml(src.spec)
    spec_doc = yaml.safe_load(spec_yaml) if spec_yaml else {}
    if not isinstance(spec_doc, dict):
        spec_doc = {}

    with tempfile.TemporaryDirectory(prefix="rtf-push-") as stage:
        return _stage_and_push(src, repo_id, files, results, spec_doc, spec_yaml, stage, private=private,
                               dry_run=dry_run, token=token, endpoint_url=endpoint_url)


def _stage_and_push(src: Any, repo_id: str, files: list[str], results: dict[str, Any], spec_doc: dict[str, Any],
                    spec_yaml: str, stage: str, *, private: bool, dry_run: bool, token: str | None,
                    endpoint_url: str | None) -> dict[str, Any]:
    plot_path = os.path.join(stage, PLOT)
    has_plot = _plot(src.run_dir, plot_path, endpoint_url)
    from raytune_ft.tools.card import render_card

    card = render_card(repo_id=repo_id, spec_doc=spec_doc, results=results, kind=src.kind, has_plot=has_plot,
                       spec_yaml=spec_yaml)
    card_path = os.path.join(stage, CARD)
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(card)
    uploads = [(rel, os.path.join(src.path, rel)) for rel in files] + [(CARD, card_path)]
    if has_plot:
        uploads.append((PLOT, plot_path))
    listing = [{"path": rel, "size": os.path.getsize(p)} for rel, p in sorted(uploads)]
    out = {"repo_id": repo_id, "files": listing, "card": card, "dry_run": dry_run, "private": private,
           "source": src.remote or src.path, "url": f"https://huggingface.co/{repo_id}"}
    if not dry_run:
        assert token is not None
        _upload(repo_id, uploads, private=private, token=token, run_name=spec_doc.get("name", ""))
    return out


def _plot(run_dir: str | None, out: str, endpoint_url: str | None) -> bool:
    """The loss plot from the run's metrics.jsonl; False when there is none to plot."""
    if not run_dir:
        return False
    from raytune_ft.tools.plot import plot

    try:
        plot(run_dir, out, endpoint_url=endpoint_url)
    except UserError:
        return False
    return True


def _upload(repo_id: str, uploads: list[tuple[str, str]], *, private: bool, token: str, run_name: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, operations=[CommitOperationAdd(path_in_repo=rel, path_or_fileobj=p)
                                               for rel, p in uploads],
                          commit_message=f"rtf push: run {run_name}".strip(), repo_type="model")
    except HfHubHTTPError as e:
        code = getattr(getattr(e, "response", None), "status_code", None)
        raise UserError(f"the Hub refused the upload to {repo_id}" + (f" (HTTP {code})" if code else "")
                        + f": {_scrub(str(e).splitlines()[0] if str(e) else type(e).__name__, token)}",
                        hint="check that $HF_TOKEN has write access to that namespace")
    except OSError as e:  # no network, DNS, TLS
        raise UserError(f"cannot reach the Hub to upload {repo_id}: {_scrub(str(e), token)}")


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def render(result: dict[str, Any]) -> str:
    """The text `rtf push` prints: what went (or would go) up, and for a dry run the card."""
    total = sum(f["size"] for f in result["files"])
    verb = "would upload" if result["dry_run"] else "uploaded"
    head = (f"{verb} {len(result['files'])} files ({total / 2**20:.1f} MiB) from {result['source']} to "
            f"{result['url']}" + (" (private)" if result["private"] else ""))
    lines = [head] + [f"  {f['path']}  {f['size']:,} B" for f in result["files"]]
    if result["dry_run"]:
        lines += ["", f"--- {CARD} ---", result["card"]]
    return "\n".join(lines)
