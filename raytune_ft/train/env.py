"""Environment and secrets inside every process of a job (principle 6: secrets by reference).

The spec names variables; ``env: {HF_TOKEN: null}`` forwards the submitter's ``$HF_TOKEN``. Ray Jobs
(:mod:`raytune_ft.launch.ray_jobs`, :mod:`raytune_ft.launch.secrets`) seals the values into
``rtf_secrets.sealed`` in the job's ``working_dir`` bundle: AES-256-GCM (``cryptography``'s AEAD; the
variable names and the format bound as associated data) under a key derived with HKDF-SHA256 from the
**cluster's Ray auth token** and a random per-job salt, so the key never travels and the copies of the
bundle Ray keeps are ciphertext, readable only by whoever holds the cluster token (who can run arbitrary
code there anyway). Any file that is not exactly such an envelope for this token is one
:class:`~raytune_ft.errors.SealError` (a one-line UserError, exit 2), never a value in a message.

Here, both halves of that envelope (:func:`seal`, :func:`unseal`) and what runs on the cluster: every
process of the job opens the seal with the token it already has (Ray's token auth gives it to every
process it starts) and sets ``os.environ`` itself: the driver (:func:`install_sealed`), every Ray worker
process through the job's ``runtime_env.worker_process_setup_hook``, and ``train_loop`` checks with
:func:`apply_env` (a second try, and a clear error rather than a run with a missing credential).

Literal (non-secret) values travel in plain sight: ``runtime_env.env_vars`` for the job, and
:func:`apply_env` sets them again from the spec in each worker (so local mode gets them too).
Without token authentication there is no key: secrets are then refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets as _random
from collections.abc import Mapping
from typing import Any

from raytune_ft.errors import SealError, UserError

SEALED_FILE = "rtf_secrets.sealed"
FORMAT = "rtf-sealed-env/2"  # /1 was a hand-made HMAC construction, no longer read
_SALT_BYTES, _NONCE_BYTES, _TAG_BYTES = 16, 12, 16
_HKDF_INFO = b"rtf sealed env v2: AES-256-GCM key"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")  # what may be quoted from an unauthenticated file
_MAX_NAMES = 256
# Opt-in diagnostic: `env: {RTF_ENV_DIGESTS: "HF_TOKEN,OTHER"}` makes each worker record the SHA-256
# of those variables' values in final_results.json (compare with `printf %s "$HF_TOKEN" | sha256sum`)
# to check that a forwarded secret arrived intact without revealing it.
DIGESTS_ENV = "RTF_ENV_DIGESTS"


def _aead(token: str, salt: bytes):
    """AES-256-GCM under a key derived (HKDF-SHA256) from the cluster token and the per-job salt."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO).derive(token.encode("utf-8"))
    return AESGCM(key)


def _associated(names: list[str]) -> bytes:
    """What the tag binds besides the ciphertext: the format and the variable names, framed as JSON."""
    return json.dumps([FORMAT, names], separators=(",", ":")).encode("utf-8")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def seal(values: Mapping[str, str], token: str) -> bytes:
    """An envelope holding ``values``, openable only with ``token`` (the cluster's Ray auth token)."""
    if not token:
        raise ValueError("sealing needs the cluster's auth token")
    names = sorted(values)
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if bad or len(names) > _MAX_NAMES:
        raise UserError(f"env: cannot forward {len(names)} variable(s) with these names (at most {_MAX_NAMES} "
                        f"names of up to 256 letters, digits and _): {', '.join(n[:40] for n in bad[:3])}")
    salt, nonce = _random.token_bytes(_SALT_BYTES), _random.token_bytes(_NONCE_BYTES)
    plain = json.dumps(dict(values), sort_keys=True).encode("utf-8")
    cipher = _aead(token, salt).encrypt(nonce, plain, _associated(names))  # ciphertext || 16-byte tag
    doc = {"format": FORMAT, "names": names, "salt": _b64(salt), "nonce": _b64(nonce), "ciphertext": _b64(cipher)}
    return (json.dumps(doc, indent=1) + "\n").encode("ascii")


def _damaged(why: str) -> SealError:
    return SealError(f"{SEALED_FILE} is damaged or not an rtf sealed-secrets file ({why}); submit the job again")


def _field(doc: dict[str, Any], key: str, size: int | None = None, at_least: int = 0) -> bytes:
    text = doc.get(key)
    if not isinstance(text, str):
        raise _damaged(f"no {key}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _damaged(f"{key} is not base64") from None
    if _b64(raw) != text:  # one spelling per value: no bit of the file is left unchecked
        raise _damaged(f"{key} is not canonical base64")
    if (size is not None and len(raw) != size) or len(raw) < at_least:
        raise _damaged(f"{key} has the wrong length")
    return raw


def _parse(blob: bytes) -> tuple[list[str], bytes, bytes, bytes]:
    """(names, salt, nonce, ciphertext) of an envelope, or :class:`SealError`; nothing from an
    unauthenticated file reaches a message unless it is shaped like a variable name."""
    try:
        doc = json.loads(blob)
    except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _damaged("not JSON") from None
    if not isinstance(doc, dict):
        raise _damaged("not a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        shown = fmt if isinstance(fmt, str) and re.fullmatch(r"rtf-sealed-env/\d{1,3}", fmt) else "unknown"
        raise SealError(f"{SEALED_FILE} has format {shown} and this rtf reads {FORMAT}: the rtf that submitted "
                        "the job and the cluster's differ in version")
    if set(doc) != {"format", "names", "salt", "nonce", "ciphertext"}:
        raise _damaged("unexpected fields")
    names = doc.get("names")
    if not (isinstance(names, list) and len(names) <= _MAX_NAMES
            and all(isinstance(n, str) and _NAME.fullmatch(n) for n in names) and names == sorted(set(names))):
        raise _damaged("names")
    salt = _field(doc, "salt", _SALT_BYTES)
    nonce = _field(doc, "nonce", _NONCE_BYTES)
    cipher = _field(doc, "ciphertext", at_least=_TAG_BYTES)
    return names, salt, nonce, cipher


def sealed_names(blob: bytes) -> list[str]:
    """The variable names an envelope says it holds (``[]`` if it is not one)."""
    try:
        return _parse(blob)[0]
    except SealError:
        return []


def unseal(blob: bytes, token: str | None) -> dict[str, str]:
    """The values sealed by :func:`seal`. Any blob that is not exactly that (truncated, altered, foreign,
    sealed for another token) is one :class:`SealError`, naming variables, never values."""
    from cryptography.exceptions import InvalidTag

    names, salt, nonce, cipher = _parse(blob)
    listed = ", ".join(names) or "none"
    if not token:
        raise SealError(f"cannot open the forwarded secrets ({listed}): this process has no Ray auth token "
                        "(the cluster must run with RAY_AUTH_MODE=token)")
    try:
        plain = _aead(token, salt).decrypt(nonce, cipher, _associated(names))
    except InvalidTag:
        raise SealError(f"cannot open the forwarded secrets ({listed}): sealed for another Ray auth token than "
                        "this cluster's, or altered on the way") from None
    try:  # authenticated: only a holder of the token could have made this; checked all the same
        values = json.loads(plain)
        ok = isinstance(values, dict) and sorted(values) == names and all(isinstance(v, str) for v in values.values())
    except ValueError:
        ok = False
    if not ok:
        raise _damaged("its contents do not match its names")
    return values


# --------------------------------------------------------------------------- in the job's processes


def cluster_token() -> str | None:
    """The Ray auth token of the cluster this process belongs to, as Ray itself finds it
    (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``)."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if loader.has_token(ignore_auth_mode=True):
            return (loader.get_raw_token() or "").strip() or None
    except Exception:  # noqa: BLE001 - no Ray, or an older one: no token
        pass
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


_found: str | None = None  # where this process found the sealed file (the job's working_dir)


def find_sealed(directory: str | None = None) -> str | None:
    global _found
    for d in (directory, _found and os.path.dirname(_found), os.getcwd()):
        if d and os.path.isfile(os.path.join(d, SEALED_FILE)):
            _found = os.path.join(d, SEALED_FILE)
            return _found
    return None


def install_sealed(directory: str | None = None) -> list[str]:
    """Open the job's sealed secrets (in ``directory``, else the working directory) and put them in
    ``os.environ``. Returns the names installed; ``[]`` when the job has none (local mode, KubeRay,
    RunPod: those set the variables themselves). Raises :class:`SealError`."""
    path = find_sealed(directory)
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise SealError(f"cannot read {SEALED_FILE} ({e.strerror})") from None
    values = unseal(blob, cluster_token())
    os.environ.update(values)
    return sorted(values)


def apply_env(spec: Any) -> list[str]:
    """First thing in every worker: set the spec's literal ``env`` values and make sure the forwarded
    ones are here (installing the job's sealed secrets if the setup hook did not). Returns the names of
    forwarded variables present. Raises UserError when a sealed job's secret did not arrive."""
    for name, value in spec.env.items():
        if value is not None:
            os.environ[name] = value
    wanted = list(spec.forwarded_env)
    if any(n not in os.environ for n in wanted) and find_sealed():
        install_sealed()  # a SealError is a UserError: one line, and the worker's failure says why
        missing = [n for n in wanted if n not in os.environ]
        if missing:
            raise UserError(f"forwarded variable(s) {', '.join(missing)} did not reach this worker")
    return [n for n in wanted if n in os.environ]


def env_report(spec: Any) -> dict[str, Any]:
    """What a worker records about its environment: the forwarded names it has (never values), and
    the SHA-256 of the variables named in ``$RTF_ENV_DIGESTS`` (an opt-in check)."""
    report: dict[str, Any] = {"forwarded_env": [n for n in spec.forwarded_env if n in os.environ]}
    digests = {}
    for name in filter(None, (x.strip() for x in os.environ.get(DIGESTS_ENV, "").split(","))):
        if name in os.environ:
            digests[name] = hashlib.sha256(os.environ[name].encode("utf-8")).hexdigest()
    if digests:
        report["env_digests"] = digests
    return report
