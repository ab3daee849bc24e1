"""Environment and secrets inside every process of a job (principle 6: secrets by reference).

The spec names variables; ``env: {HF_TOKEN: null}`` forwards the submitter's ``$HF_TOKEN``. Ray Jobs
(:mod:`raytune_ft.launch.ray_jobs`, :mod:`raytune_ft.launch.secrets`) seals the values into
``rtf_secrets.sealed`` in the job's ``working_dir`` bundle: an encrypt-then-MAC envelope (HMAC-SHA256
keystream + HMAC-SHA256 tag, stdlib only) under a key derived (HKDF-SHA256) from the **cluster's Ray auth
token** and a random per-job salt, so the key never travels and the copies of the bundle Ray keeps are
ciphertext, readable only by whoever holds the cluster token (who can run arbitrary code there anyway).

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
import hashlib
import hmac
import json
import os
import secrets as _random
from collections.abc import Mapping
from typing import Any

from raytune_ft.errors import UserError

SEALED_FILE = "rtf_secrets.sealed"
FORMAT = "rtf-sealed-env/1"
# Opt-in diagnostic: `env: {RTF_ENV_DIGESTS: "HF_TOKEN,OTHER"}` makes each worker record the SHA-256
# of those variables' values in final_results.json (compare with `printf %s "$HF_TOKEN" | sha256sum`)
# to check that a forwarded secret arrived intact without revealing it.
DIGESTS_ENV = "RTF_ENV_DIGESTS"


class SealError(Exception):
    """The sealed secrets could not be opened (wrong token, damaged file). Never holds a value."""


def _keys(token: str, salt: bytes) -> tuple[bytes, bytes]:
    prk = hmac.new(salt, token.encode("utf-8"), hashlib.sha256).digest()  # HKDF-Extract
    enc = hmac.new(prk, b"rtf sealed env v1: encryption\x01", hashlib.sha256).digest()  # HKDF-Expand, 1 block
    mac = hmac.new(prk, b"rtf sealed env v1: authentication\x01", hashlib.sha256).digest()
    return enc, mac


def _keystream(key: bytes, nonce: bytes, n: int) -> bytes:
    blocks = [hmac.new(key, nonce + i.to_bytes(8, "big"), hashlib.sha256).digest() for i in range((n + 31) // 32)]
    return b"".join(blocks)[:n]


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def seal(values: Mapping[str, str], token: str) -> bytes:
    """An envelope holding ``values``, openable only with ``token`` (the cluster's Ray auth token)."""
    if not token:
        raise ValueError("sealing needs the cluster's auth token")
    salt, nonce = _random.token_bytes(16), _random.token_bytes(16)
    enc, mac = _keys(token, salt)
    plain = json.dumps(dict(values), sort_keys=True).encode("utf-8")
    cipher = _xor(plain, _keystream(enc, nonce, len(plain)))
    names = sorted(values)
    tag = hmac.new(mac, _authenticated(names, salt, nonce, cipher), hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    doc = {"format": FORMAT, "names": names, "salt": b64(salt), "nonce": b64(nonce),
           "ciphertext": b64(cipher), "tag": b64(tag)}
    return (json.dumps(doc, indent=1) + "\n").encode("ascii")


def _authenticated(names: list[str], salt: bytes, nonce: bytes, cipher: bytes) -> bytes:
    return b"|".join([FORMAT.encode(), ",".join(names).encode(), salt, nonce, cipher])


def sealed_names(blob: bytes) -> list[str]:
    try:
        return list(json.loads(blob)["names"])
    except (ValueError, KeyError, TypeError):
        return []


def unseal(blob: bytes, token: str | None) -> dict[str, str]:
    """The values sealed by :func:`seal`; :class:`SealError` (naming variables, never values) if not."""
    try:
        doc = json.loads(blob)
        if doc.get("format") != FORMAT:
            raise SealError(f"{SEALED_FILE}: unknown format {doc.get('format')!r}")
        names = list(doc["names"])
        salt, nonce, cipher, tag = (base64.b64decode(doc[k]) for k in ("salt", "nonce", "ciphertext", "tag"))
    except SealError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise SealError(f"{SEALED_FILE} is damaged ({type(e).__name__})") from None
    if not token:
        raise SealError(f"cannot open the forwarded secrets ({', '.join(names)}): this process has no Ray "
                        "auth token (the cluster must run with RAY_AUTH_MODE=token)")
    enc, mac = _keys(token, salt)
    expect = hmac.new(mac, _authenticated(names, salt, nonce, cipher), hashlib.sha256).digest()
    if not hmac.compare_digest(expect, tag):
        raise SealError(f"cannot open the forwarded secrets ({', '.join(names)}): sealed for another Ray "
                        "auth token than this cluster's, or damaged")
    values = json.loads(_xor(cipher, _keystream(enc, nonce, len(cipher))).decode("utf-8"))
    if sorted(values) != sorted(names):
        raise SealError(f"{SEALED_FILE}: names and contents disagree")
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
    with open(path, "rb") as f:
        values = unseal(f.read(), cluster_token())
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
        try:
            install_sealed()
        except SealError as e:
            raise UserError(str(e)) from None
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
