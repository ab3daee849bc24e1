"""Resolve what a user points the after-training tools at into a local directory to load.

SOURCE may be:

* a job spec YAML: its run dir ``{storage.path}/{name}`` (relative storage paths are relative to the
  current directory, as for ``rtf submit``), then as a run dir;
* a run dir: its ``final/`` (checked against its manifest when it has one; an older run's final/ without
  one is read with a note), or, when there is no usable ``final/``, its latest *committed* checkpoint
  (one with a manifest whose files are all there), said in :attr:`Source.notes`;
* a checkpoint dir ``checkpoint-<step>``: refused when it belongs to a run and is not committed;
* a plain model dir (``config.json``) or adapter dir (``adapter_config.json``);
* an ``s3://`` URI of any of these (endpoint from ``$AWS_ENDPOINT_URL`` or, for a spec, its storage
  section). Remote files are copied into a local cache (``$RTF_CACHE_DIR``, else
  ``~/.cache/raytune_ft/sources``) and reused while the remote listing is unchanged.

The run's ``rtf_spec.yaml`` (in the model dir, else its parent) tells the data format, the method and the
base model. Everything is found by looking at files; nothing heavy (torch, transformers) is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CACHE_MARK = ".rtf_source.json"


@dataclass
class Source:
    """A resolved SOURCE: a local directory holding a model or an adapter, and what is known about it."""

    origin: str  # what the user gave
    kind: str  # "adapter" | "model"
    path: str  # local dir with the adapter or the model files
    remote: str | None = None  # the s3:// dir that ``path`` was copied from
    run_dir: str | None = None  # the run dir it belongs to (local path or s3:// URI), when known
    spec: Any = None  # the run's JobSpec, when found
    spec_path: str | None = None
    base_model: str | None = None  # adapter: the base to load it onto; model: the base it was fine-tuned from
    data_format: str | None = None  # alpaca | chat | text (from the spec's data)
    method: str | None = None  # full | lora | qlora (from the spec, else by the files)
    quantized_base: bool = False  # the adapter was trained on a quantized base (QLoRA)
    step: int | None = None  # checkpoint step, when the source is a checkpoint
    tokenizer_path: str | None = None  # local dir with tokenizer files
    notes: list[str] = field(default_factory=list)
    # Only ever from the user's --trust-remote-code: a run's stored spec is storage, and whoever can write
    # the bucket must not decide that this machine runs the model's Python code.
    trust_remote_code: bool = False

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def from_scratch(self) -> bool:
        """The run built its model from ``model.init`` (no pretrained base exists)."""
        return self.spec is not None and self.spec.model.init is not None

    @property
    def result_dir(self) -> str:
        """Where results about this source are written: the remote dir for s3 sources, else the local one."""
        return self.remote or self.path

    def describe(self) -> str:
        what = "LoRA adapter" if self.is_adapter else "model"
        if self.method == "qlora":
            what = "QLoRA adapter"
        where = self.remote or self.path
        extra = f" (step {self.step})" if self.step is not None else ""
        return f"{what} at {where}{extra}"


# --------------------------------------------------------------------------------------------------
# public API


def resolve_source(source: str | os.PathLike, *, endpoint_url: str | None = None) -> Source:
    """Resolve SOURCE (see the module docstring). Raises :class:`UserError` when nothing loadable is there."""
    origin = str(source)
    if not origin.strip():
        raise UserError("no SOURCE given: pass a job spec, a run dir, a checkpoint dir or a model dir")
    spec = spec_path = None
    if st.is_s3(origin):
        storage = st.config_for(origin.rstrip("/"), endpoint_url=endpoint_url)
        if posixpath.basename(origin.rstrip("/")) == rd.SPEC:
            storage = st.config_for(posixpath.dirname(origin.rstrip("/")), endpoint_url=endpoint_url)
    else:
        local = st.local_path(origin)
        if os.path.isfile(local):
            if not local.endswith((".yaml", ".yml")):
                raise UserError(
                    f"{origin} is a file, not a job spec (.yaml) or a directory",
                    hint="pass a job spec, a run dir, a checkpoint dir or a model dir",
                )
            spec, spec_path = _read_user_spec(local), local
            storage = st.config_for(rd.run_uri(spec.storage.path, spec.name), storage=spec.storage,
                                    endpoint_url=endpoint_url)
            if not st.is_s3(storage.path):
                if not os.path.isdir(storage.path):
                    raise UserError(
                        f"no run dir for spec {origin}: {storage.path} does not exist",
                        hint="has it been submitted (rtf submit)? a relative storage.path is taken from the current directory",
                    )
        else:
            if not os.path.exists(local):
                raise UserError(f"{origin}: no such file or directory")
            storage = st.config_for(local)
    with st.storage_errors(storage, "read"):
        fs, root = st.open(storage)
        src = _resolve_on(fs, root, origin, storage, spec, spec_path)
    return src


def read_run_spec(path: str):
    """The JobSpec stored in a run's ``rtf_spec.yaml`` (already resolved: ``extends`` is not followed)."""
    import yaml

    from raytune_ft.spec.loader import spec_from_dict

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the run's spec {path}: {e}")
    if not isinstance(doc, dict):
        raise UserError(f"{path}: not a job spec (expected a YAML mapping)")
    doc.pop("extends", None)  # the stored spec is already merged with its presets
    try:
        return spec_from_dict(doc)
    except UserError as e:
        raise UserError(f"the run's spec {path} does not validate: {e}")


def cache_root() -> str:
    return os.environ.get("RTF_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raytune_ft", "sources")


# --------------------------------------------------------------------------------------------------
# resolution on a filesystem (local and S3 alike)


def _read_user_spec(path: str):
    from raytune_ft.spec.loader import load_spec

    return load_spec(path)


def _entries(fs, path: str) -> tuple[set[str], set[str]]:
    """(file names, dir names) directly under ``path``."""
    import pyarrow.fs as pafs

    files, dirs = set(), set()
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)):
        name = posixpath.basename(info.path.rstrip("/"))
        if info.type == pafs.FileType.Directory:
            dirs.add(name)
        elif info.type == pafs.FileType.File:
            files.add(name)
    return files, dirs


def _model_kind(files: set[str]) -> str | None:
    if ADAPTER_CONFIG in files:
        return "adapter"
    if MODEL_CONFIG in files and any(f.endswith((".safetensors", ".bin")) for f in files):
        return "model"
    return None


def _uri(storage: Any, fs, path: str) -> str:
    """A user-facing name of a native fs path (s3://bucket/key or the local path)."""
    return f"s3://{path}" if st.is_s3(storage.path) else path


def _resolve_on(fs, root: str, origin: str, storage: Any, spec, spec_path: str | None) -> Source:
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck

    info = fs.get_file_info(root)
    files, dirs = _entries(fs, root)
    if info.type == pafs.FileType.NotFound and not files and not dirs:
        raise UserError(f"{origin}: nothing there (no such file, directory or prefix)")
    if info.type == pafs.FileType.File:
        raise UserError(f"{origin} is a file; pass a job spec (.yaml) by its local path, or a directory")

    notes: list[str] = []
    run_dir: str | None = None
    model_dir: str | None = None
    step: int | None = None
    kind = _model_kind(files)
    name = posixpath.basename(root.rstrip("/"))
    if kind is not None:
        model_dir = root
        parent = posixpath.dirname(root.rstrip("/"))
        parent_files, _ = _entries(fs, parent) if parent else (set(), set())
        if rd.SPEC in parent_files or rd.METRICS in parent_files:
            run_dir = parent
        step = ck.parse_step(name)
        if step is not None and run_dir is not None:
            ckinfo = ck.inspect_checkpoint(fs, root)
            if not ckinfo.committed:
                raise UserError(
                    f"{origin} is an incomplete checkpoint ({ckinfo.reason}); it is never loaded",
                    hint="pick a committed checkpoint (rtf checkpoints list RUN_DIR) or the run dir itself",
                )
    elif rd.FINAL in dirs or rd.SPEC in files or rd.METRICS in files or any(ck.parse_step(d) is not None for d in dirs):
        run_dir = root
        final = st.fs_join(root, rd.FINAL)
        final_kind = _model_kind(_entries(fs, final)[0]) if rd.FINAL in dirs else None
        if final_kind is not None:
            model_dir, kind = final, final_kind
        else:
            latest = ck.latest_committed(fs, root)
            if latest is None:
                ckpts = [d for d in dirs if ck.parse_step(d) is not None]
                why = "an empty final/" if rd.FINAL in dirs else "no final/"
                extra = f" and {len(ckpts)} incomplete checkpoint dir(s)" if ckpts else " and no checkpoint"
                raise UserError(
                    f"{origin}: nothing loadable in this run dir ({why}{extra})",
                    hint="the run may still be starting, or it failed before its first committed checkpoint",
                )
            model_dir, step = latest.path, latest.step
            kind = _model_kind(_entries(fs, model_dir)[0])
            if kind is None:
                raise UserError(f"{_uri(storage, fs, model_dir)}: committed checkpoint holds no model or adapter files")
            notes.append(
                f"no final/ in {origin}: using the latest committed checkpoint {latest.name} (step {latest.step})"
            )
    elif any(d.startswith(rd.TRIAL_PREFIX) for d in dirs):
        trials = sorted(d for d in dirs if d.startswith(rd.TRIAL_PREFIX))
        raise UserError(
            f"{origin} is a sweep with {len(trials)} trials; pick one: "
            + ", ".join(_uri(storage, fs, st.fs_join(root, t)) for t in trials[:5])
            + (" ..." if len(trials) > 5 else ""),
            hint="`rtf runs` lists the trials with their losses",
        )
    else:
        shown = ", ".join(sorted(files | {d + "/" for d in dirs})[:8]) or "empty"
        raise UserError(
            f"{origin}: nothing loadable here ({shown})",
            hint=f"expected a job spec, a run dir ({rd.FINAL}/ or {rd.CHECKPOINT_PREFIX}*), a checkpoint, "
            "a model dir (config.json + weights) or an adapter dir (adapter_config.json)",
        )

    verified = step is not None and run_dir is not None  # a committed checkpoint (checked above)
    if run_dir is not None and ck.is_final(model_dir):
        verified = _check_final(fs, model_dir, _uri(storage, fs, model_dir), notes)
    remote = None
    if st.is_s3(storage.path):
        remote = _uri(storage, fs, model_dir)
        local_dir = _materialize(fs, model_dir, remote, verified=verified)
    else:
        local_dir = model_dir

    # the spec: the one given, else the run's stored one (in the model dir, else its run dir)
    if spec is None:
        for d in (model_dir, run_dir):
            if d is None:
                continue
            found = _fetch_spec(fs, d, storage)
            if found is not None:
                spec_path = found
                spec = read_run_spec(found)
                break

    src = Source(
        origin=origin,
        kind=kind,
        path=local_dir,
        remote=remote,
        run_dir=_uri(storage, fs, run_dir) if run_dir else None,
        spec=spec,
        spec_path=spec_path,
        step=step,
        notes=notes,
    )
    _fill_details(src, fs, storage)
    return src


def _check_final(fs, final: str, uri: str, notes: list[str]) -> bool:
    """A run's final/ against its manifest (written last by the recipe, as for a checkpoint): True when it
    has one and every listed file is there with its size (from s3 each file's sha256 is then checked while
    it downloads); UserError when a file is missing or of another size. A final/ without a manifest (an
    older rtf wrote it, or its upload stopped) is still read, with a one-line note: refusing it would lock
    out every run trained before final/ manifests, and a missing manifest is no more suspicious than a
    rewritten one (the manifest guards against damage and partial uploads; who can write the bucket can
    rewrite both)."""
    from raytune_ft import checkpoints as ck

    manifest = ck.read_manifest(fs, final)
    if manifest is None:
        notes.append(f"{uri} has no {rd.MANIFEST} (an older rtf wrote it, or its upload stopped): its files are not verified")
        return False
    problems = ck.verify(fs, final, manifest)
    if problems:
        raise UserError(
            f"{uri} does not match its manifest: " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
            hint="the upload of final/ was interrupted or the files were changed in storage; "
            "a committed checkpoint of the run can be loaded instead (rtf checkpoints list)",
        )
    return True


def _fetch_spec(fs, d: str, storage: Any) -> str | None:
    """A local path of ``d/rtf_spec.yaml`` (downloaded into the cache for s3), or None."""
    p = st.fs_join(d, rd.SPEC)
    if not st.is_s3(storage.path):
        return p if os.path.isfile(p) else None
    data = st.read_bytes(fs, p)
    if data is None:
        return None
    dest = os.path.join(cache_root(), "specs", hashlib.sha256(p.encode()).hexdigest()[:16], rd.SPEC)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "wb") as f:
        f.write(data)
    return dest


def _fill_details(src: Source, fs, storage: Any) -> None:
    spec = src.spec
    files = set(os.listdir(src.path))
    if spec is not None:
        src.method = spec.method.type
        fmts = [s.format for s in spec.data.train]
        src.data_format = fmts[0]
        if len(set(fmts)) > 1:
            src.notes.append(f"the train sources mix formats {sorted(set(fmts))}; prompts use {fmts[0]} (the first)")
    else:
        src.method = "lora" if src.is_adapter else "full"
    if src.is_adapter:
        cfg = _read_json(os.path.join(src.path, ADAPTER_CONFIG))
        src.base_model = _adapter_base(src, cfg)
        src.quantized_base = src.method == "qlora" or _base_is_quantized(src.base_model)
        if spec is not None and spec.method.type == "full":
            src.notes.append("the spec says method.type full, but this dir holds an adapter; loading it as an adapter")
            src.method = "lora"
    else:
        if spec is not None and spec.model.name_or_path:
            src.base_model = spec.model.name_or_path  # what it was fine-tuned from (for --compare-base)
        if spec is not None and spec.method.type != "full":
            # e.g. a merged model with the run's spec copied next to it
            src.method = "full"
            src.notes.append(f"the run trained a {spec.method.type} adapter; this dir holds a whole (merged) model")
    src.tokenizer_path = _tokenizer_dir(src, files, fs, storage)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _adapter_base(src: Source, cfg: dict) -> str:
    named = cfg.get("base_model_name_or_path")
    spec_base = src.spec.model.name_or_path if src.spec is not None else None
    for cand in (named, spec_base):
        if cand and _is_local_model(cand):
            if cand != named and named:
                src.notes.append(f"adapter base {named} is not on this machine; using the spec's model {cand}")
            return st.local_path(cand)
    if src.from_scratch and not named:
        raise UserError(
            f"{src.origin}: the adapter's base was built from scratch (model.init) and is not saved anywhere",
            hint="train from scratch with method.type: full, or save the base model and set model.name_or_path",
        )
    cand = named or spec_base
    if not cand:
        raise UserError(f"{src.origin}: the adapter names no base model (adapter_config.json base_model_name_or_path)")
    if os.path.isabs(cand) or cand.startswith((".", "~")) or cand.count("/") > 1:
        raise UserError(
            f"the adapter's base model {cand} is not on this machine",
            hint=f"copy the base model there, or point model.name_or_path in the run's {rd.SPEC} at a local copy",
        )
    return cand  # a hub id: transformers loads it from its cache (or downloads it unless HF_HUB_OFFLINE=1)


def _is_local_model(path: str) -> bool:
    p = st.local_path(path)
    return os.path.isfile(os.path.join(p, MODEL_CONFIG))


def _base_is_quantized(base: str | None) -> bool:
    if not base or not _is_local_model(base):
        return False
    try:
        return "quantization_config" in _read_json(os.path.join(st.local_path(base), MODEL_CONFIG))
    except UserError:
        return False


def _tokenizer_dir(src: Source, files: set[str], fs, storage: Any) -> str | None:
    if files & set(TOKENIZER_FILES):
        return src.path
    # a checkpoint saved without its tokenizer: the run's final/, else the spec's tokenizer, else the base
    if src.run_dir is not None and not st.is_s3(storage.path):
        final = os.path.join(src.run_dir, rd.FINAL)
        if os.path.isdir(final) and set(os.listdir(final)) & set(TOKENIZER_FILES):
            return final
    spec = src.spec
    if spec is not None and spec.tokenizer.name_or_path:
        return spec.tokenizer.name_or_path
    if src.base_model:
        return src.base_model
    if spec is not None and spec.model.name_or_path:
        return spec.model.name_or_path
    return None


# --------------------------------------------------------------------------------------------------
# s3: copy into the local cache


def _materialize(fs, path: str, uri: str, *, verified: bool) -> str:
    """A local copy of the remote dir ``path``, reused while its listing (names and sizes) is unchanged.
    ``verified``: ``path`` has a manifest; only its files are copied, each checked by size and sha256."""
    from raytune_ft import checkpoints as ck

    listing = {k: v.size for k, v in st.list_files(fs, path).items()}
    dest = os.path.join(cache_root(), hashlib.sha256(uri.encode()).hexdigest()[:16], posixpath.basename(path.rstrip("/")))
    mark = os.path.join(os.path.dirname(dest), _CACHE_MARK)
    if os.path.isdir(dest) and os.path.isfile(mark):
        try:
            with open(mark, encoding="utf-8") as f:
                if json.load(f) == {"uri": uri, "files": listing}:
                    return dest
        except (OSError, ValueError):
            pass
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    # verified: a fixed name, so that ck.download's partial dir for it is found again and an interrupted copy
    # continues (a kill between its rename and ours leaves a whole copy there: dropped)
    tmp = os.path.join(parent, ".pull" if verified else f".partial-{uuid.uuid4().hex[:8]}")
    if verified:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if verified:
            ck.download(fs, path, tmp)  # only the manifest's files, each checked by size and sha256; resumable
        else:
            st.download_dir(fs, path, tmp)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(mark, "w", encoding="utf-8") as f:
        json.dump({"uri": uri, "files": listing}, f)
    return dest
