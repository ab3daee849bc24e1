"""Storage roots: local directories and S3-compatible object stores (AWS S3, MinIO, R2, Ceph).

A storage root is the spec's ``storage.path``: a local directory or ``s3://bucket/prefix``. Two clients
reach it, built from the same settings:

* :func:`pyarrow_filesystem` returns ``(pyarrow.fs.FileSystem, root_path)``. Ray Train is given exactly
  this (``RunConfig(storage_filesystem=fs, storage_path=root_path)``) and the checkpoint code
  (:mod:`raytune_ft.checkpoints`) uses it through the helpers at the bottom of this module, so both
  backends run the same code.
* :func:`boto3_client` for the CLI side and :func:`preflight`, whose error codes are precise enough
  to tell a wrong endpoint from a missing bucket from bad keys from a missing permission.

The ``storage`` argument is duck-typed: anything with ``path``, ``endpoint_url``, ``region``,
``access_key_env``, ``secret_key_env`` and ``session_token_env`` (the spec's ``StorageSpec`` or
:class:`StorageConfig`). Credential *values* are read from the environment variables those fields
name, at the moment a client is made, and never enter a message: every error text built from an
exception goes through :func:`scrub`.

Library helpers let pyarrow's ``OSError`` through (a network blip while training is an infrastructure
failure, to be retried, not a user error); :func:`storage_errors` turns them into one-line
:class:`~raytune_ft.errors.StorageError` where a user is waiting (CLI, preflight).

pyarrow and boto3 are imported lazily so that importing this module (and the CLI) stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from raytune_ft.errors import StorageError, UserError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

DEFAULT_ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
DEFAULT_SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
DEFAULT_SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
DEFAULT_REGION = "us-east-1"  # MinIO's and Ceph's default; R2 accepts any region for signing

# Bounds that make a dead or stalled endpoint fail in bounded time. ``request_timeout`` is a stall
# timeout (fails when less than 1 byte/s moves for that long), not a cap on a whole upload, so big
# checkpoint parts are fine. A black-holed endpoint fails after about
# max_attempts * (request_timeout + backoff); a refused connection within about a second.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 3

PREFLIGHT_MARKER = ".rtf_preflight"


# ----------------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket[/prefix]``."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; ``s3://bucket`` -> ``("bucket", "")``."""
    uri = str(uri)
    if not is_s3(uri):
        raise UserError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise UserError(f"no bucket in S3 URI {uri!r} (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI (``/`` separated, no doubled slashes)."""
    uri = str(uri)
    parts = tuple(str(p).strip("/") for p in parts if str(p).strip("/"))
    if is_s3(uri):
        bucket, key = split_s3(uri)
        rest = "/".join(p for p in (key, *parts) if p)
        return f"s3://{bucket}/{rest}" if rest else f"s3://{bucket}"
    return os.path.join(uri, *parts) if parts else uri


def fs_join(base: str, *parts: str) -> str:
    """Join parts onto a path native to a pyarrow filesystem (``bucket/key`` or an absolute path)."""
    out = base.rstrip("/") or base
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}" if out != "/" else f"/{p}"
    return out


def local_path(path: str) -> str:
    """Absolute local path for a spec path (``~`` expanded, ``file://`` accepted)."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    return os.path.abspath(os.path.expanduser(path))


# ----------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class StorageConfig:
    """The storage settings outside a spec (the CLI's ``rtf checkpoints list s3://...``)."""

    path: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key_env: str = DEFAULT_ACCESS_KEY_ENV
    secret_key_env: str = DEFAULT_SECRET_KEY_ENV
    session_token_env: str = DEFAULT_SESSION_TOKEN_ENV
    keep_checkpoints: int = 3

    @classmethod
    def from_uri(cls, uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> StorageConfig:
        return cls(path=str(uri), endpoint_url=endpoint_url or None, region=region or None)


def with_path(storage: Any, path: str) -> StorageConfig:
    """The same endpoint and credentials as ``storage``, rooted at ``path``."""
    return StorageConfig(
        path=path,
        endpoint_url=getattr(storage, "endpoint_url", None),
        region=getattr(storage, "region", None),
        access_key_env=getattr(storage, "access_key_env", None) or DEFAULT_ACCESS_KEY_ENV,
        secret_key_env=getattr(storage, "secret_key_env", None) or DEFAULT_SECRET_KEY_ENV,
        session_token_env=getattr(storage, "session_token_env", None) or DEFAULT_SESSION_TOKEN_ENV,
    )


def endpoint_url(storage: Any) -> str | None:
    """The S3 endpoint: ``storage.endpoint_url``, else ``$AWS_ENDPOINT_URL_S3``/``$AWS_ENDPOINT_URL``.

    ``None`` means AWS itself. Raises StorageError for anything but ``http(s)://host[:port]``.
    """
    url = (
        getattr(storage, "endpoint_url", None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if not url:
        return None
    url = url.strip()
    if "@" in url:
        # never echo it: whatever precedes the @ is a credential (and a '/' in a secret breaks parsing)
        raise StorageError(
            "the S3 endpoint URL carries credentials (user:secret@host); "
            "put them in the environment variables the spec names instead"
        )
    parts = urlsplit(url)
    shown = scrub(url, storage)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(
            f"S3 endpoint {shown!r} is not an http:// or https:// URL",
            hint="e.g. http://127.0.0.1:9000 for MinIO or https://<account>.r2.cloudflarestorage.com for R2",
        )
    if parts.path not in ("", "/") or parts.query:
        raise StorageError(f"S3 endpoint {shown!r} must be scheme://host[:port] without a path")
    if ":" not in parts.hostname and not _HOSTNAME.fullmatch(parts.hostname):
        # botocore refuses it too, but with a bare ValueError ("Invalid endpoint") and a traceback
        raise StorageError(f"S3 endpoint {shown!r}: {parts.hostname!r} is not a valid host name "
                           "(letters, digits, '-' and '.' only)")
    return f"{parts.scheme}://{parts.netloc}"


_HOSTNAME = re.compile(r"((?!-)[a-z\d-]{1,63}(?<!-)\.)*(?!-)[a-z\d-]{1,63}(?<!-)", re.IGNORECASE)


def region(storage: Any) -> str:
    return (
        getattr(storage, "region", None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or DEFAULT_REGION
    )


def _env_names(storage: Any) -> tuple[str, str, str]:
    return (
        getattr(storage, "access_key_env", None) or DEFAULT_ACCESS_KEY_ENV,
        getattr(storage, "secret_key_env", None) or DEFAULT_SECRET_KEY_ENV,
        getattr(storage, "session_token_env", None) or DEFAULT_SESSION_TOKEN_ENV,
    )


@dataclass(frozen=True)
class _Credentials:
    access_key: str
    secret_key: str
    session_token: str | None

    def __repr__(self) -> str:  # never print the values
        return "_Credentials(***)"


def credentials(storage: Any) -> _Credentials | None:
    """Keys read now from the env vars ``storage`` names; ``None`` means the default AWS chain.

    The default chain (profile, instance metadata, ...) is used only when the default variable
    names are in use and unset. When the spec names other variables, they must be set: silently
    falling back to whatever else the machine has would write to the wrong account.
    """
    ak_env, sk_env, tok_env = _env_names(storage)
    ak, sk, tok = os.environ.get(ak_env), os.environ.get(sk_env), os.environ.get(tok_env)
    if ak and sk:
        return _Credentials(ak, sk, tok or None)
    if ak or sk:
        have, missing = (ak_env, sk_env) if ak else (sk_env, ak_env)
        raise StorageError(f"${have} is set but ${missing} is not; S3 needs both the access key and the secret key")
    custom = [n for n, d in ((ak_env, DEFAULT_ACCESS_KEY_ENV), (sk_env, DEFAULT_SECRET_KEY_ENV)) if n != d]
    if custom:
        raise StorageError(
            f"the storage credentials are named as ${ak_env} and ${sk_env}, but they are not set",
            hint=f"export {ak_env}=... {sk_env}=... before running",
        )
    return None


def _secret_values(storage: Any | None) -> list[str]:
    names = set(_env_names(storage)) if storage is not None else set()
    names |= {DEFAULT_ACCESS_KEY_ENV, DEFAULT_SECRET_KEY_ENV, DEFAULT_SESSION_TOKEN_ENV}
    vals = [os.environ.get(n) for n in names]
    # longest first, so a value that contains another is replaced whole
    return sorted({v for v in vals if v and len(v) >= 4}, key=len, reverse=True)


def scrub(text: str, storage: Any | None = None) -> str:
    """``text`` with every credential value (from the env vars ``storage`` names) replaced by ***."""
    text = str(text)
    for v in _secret_values(storage):
        text = text.replace(v, "***")
    return text


# ----------------------------------------------------------------------------------------------------
# Clients


def pyarrow_filesystem(
    storage: Any,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    request_timeout: float = REQUEST_TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
) -> tuple[pyarrow.fs.FileSystem, str]:
    """``(filesystem, root_path)`` for ``storage.path``, as Ray Train and the checkpoint code use it.

    S3: a ``pyarrow.fs.S3FileSystem`` on ``endpoint_url`` (path-style addressing, as MinIO/Ceph
    need), with the keys from the named env vars (or the default AWS chain), bounded retries and
    timeouts; ``root_path`` is ``bucket/prefix``. Local: ``LocalFileSystem`` and the absolute dir.

    The S3 filesystem is a subclass whose pickle holds the env var *names*, not the key values:
    a plain ``S3FileSystem`` pickles its secret key, and Ray pickles ``RunConfig`` (Tune writes
    it to ``{storage}/{name}/tuner.pkl``, and ships it to every worker). Unpickled, it reads the
    keys from that process's environment, so the variables must be set where Ray runs the
    workers (as the rest of rtf's secrets are).
    """
    import pyarrow.fs as pafs

    path = str(storage.path)
    if not is_s3(path):
        return pafs.LocalFileSystem(), local_path(path)

    bucket, key = split_s3(path)
    ak_env, sk_env, tok_env = _env_names(storage)
    settings: dict[str, Any] = dict(
        region=region(storage),
        connect_timeout=float(connect_timeout),
        request_timeout=float(request_timeout),
        max_attempts=int(max_attempts),
        access_key_env=ak_env,
        secret_key_env=sk_env,
        session_token_env=tok_env,
    )
    url = endpoint_url(storage)
    if url:
        parts = urlsplit(url)
        settings.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    fs = _s3_class()(settings)
    return fs, fs_join(bucket, key) if key else bucket


_S3FS_CLASS: Any = None


def _s3_class() -> Any:
    """The S3FileSystem subclass (made on first use so that pyarrow loads lazily)."""
    global _S3FS_CLASS
    if _S3FS_CLASS is None:
        import pyarrow.fs as pafs

        class EnvCredentialsS3FileSystem(pafs.S3FileSystem):
            """``S3FileSystem`` that pickles the names of its credential env vars, never the keys."""

            def __init__(self, settings: dict[str, Any]):
                self._rtf_settings = dict(settings)
                super().__init__(**_s3_kwargs(self._rtf_settings))

            def __reduce__(self):
                return (_rebuild_s3, (self._rtf_settings,))

            def __repr__(self) -> str:
                s = self._rtf_settings
                return f"<S3FileSystem endpoint={s.get('scheme', 'https')}://{s.get('endpoint_override', 'aws')} region={s['region']}>"

        EnvCredentialsS3FileSystem.__qualname__ = EnvCredentialsS3FileSystem.__name__
        _S3FS_CLASS = EnvCredentialsS3FileSystem
    return _S3FS_CLASS


def _rebuild_s3(settings: dict[str, Any]) -> Any:
    return _s3_class()(settings)


def _s3_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = dict(
        region=settings["region"],
        connect_timeout=settings["connect_timeout"],
        request_timeout=settings["request_timeout"],
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings["max_attempts"]),
    )
    if settings.get("endpoint_override"):
        kwargs.update(endpoint_override=settings["endpoint_override"], scheme=settings["scheme"])
    names = StorageConfig(
        path="s3://_",
        access_key_env=settings["access_key_env"],
        secret_key_env=settings["secret_key_env"],
        session_token_env=settings["session_token_env"],
    )
    creds = credentials(names)
    if creds is not None:
        kwargs.update(access_key=creds.access_key, secret_key=creds.secret_key)
        if creds.session_token:
            kwargs["session_token"] = creds.session_token
    return kwargs


def s3_resolver(storage: Any):
    """``uri -> (pyarrow filesystem, path)`` for the data pipeline's s3:// sources, with ``storage``'s
    endpoint and keys (a local path raises ValueError: the pipeline opens those itself)."""
    def resolve(uri: str):
        if not uri.startswith("s3://"):
            raise ValueError(uri)
        fs, _ = pyarrow_filesystem(storage)
        bucket, key = split_s3(uri)
        return fs, f"{bucket}/{key}"

    return resolve


def boto3_client(
    storage: Any,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = REQUEST_TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
):
    """A boto3 S3 client for the same endpoint, region and keys as :func:`pyarrow_filesystem`."""
    import boto3
    from botocore.config import Config

    url = endpoint_url(storage)
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": int(max_attempts), "mode": "standard"},
        # custom endpoints (MinIO, Ceph) need path-style; pyarrow does the same with an override
        s3={"addressing_style": "path" if url else "auto"},
    )
    kwargs: dict[str, Any] = dict(region_name=region(storage), config=config)
    if url:
        kwargs["endpoint_url"] = url
    creds = credentials(storage)
    if creds is not None:
        kwargs.update(aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key)
        if creds.session_token:
            kwargs["aws_session_token"] = creds.session_token
    # a fresh session: no shared state with other threads, no cached credentials of another storage
    return boto3.session.Session().client("s3", **kwargs)


# ----------------------------------------------------------------------------------------------------
# Error classification


def describe(storage: Any) -> str:
    """``s3://bucket/prefix at http://host:port`` or the absolute local directory."""
    path = str(storage.path)
    if not is_s3(path):
        return local_path(path)
    try:
        url = endpoint_url(storage)
    except StorageError:
        url = "<invalid endpoint>"
    return f"{path} at {url or 'AWS S3'}"


# pyarrow (AWS C++ SDK) error names in OSError texts -> our kind of failure
_PYARROW_KINDS = [
    ("NETWORK_CONNECTION", "unreachable"),
    ("NO_SUCH_BUCKET", "no_bucket"),
    ("INVALID_ACCESS_KEY_ID", "bad_key"),
    ("SIGNATURE_DOES_NOT_MATCH", "bad_secret"),
    ("ACCESS_DENIED", "denied"),
    ("EXPIRED_TOKEN", "token"),
    ("INVALID_TOKEN", "token"),
]

_BOTO_KINDS = {
    "NoSuchBucket": "no_bucket",
    "InvalidAccessKeyId": "bad_key",
    "SignatureDoesNotMatch": "bad_secret",
    "AccessDenied": "denied",
    "AllAccessDisabled": "denied",
    "403": "forbidden",  # a HEAD's error has no body: bad keys and missing permission look alike
    "Forbidden": "forbidden",
    "InvalidToken": "token",
    "ExpiredToken": "token",
    "TokenRefreshRequired": "token",
    "PermanentRedirect": "region",
    "AuthorizationHeaderMalformed": "region",
    "IllegalLocationConstraintException": "region",
}


def _message(kind: str, storage: Any, action: str, detail: str) -> tuple[str, str | None]:
    """(one-line message, hint) for a failure of ``kind`` while doing ``action``."""
    where = describe(storage)
    ak_env, sk_env, tok_env = _env_names(storage)
    bucket = split_s3(str(storage.path))[0] if is_s3(str(storage.path)) else ""
    url = None
    with contextlib.suppress(StorageError):
        url = endpoint_url(storage)
    if kind == "unreachable":
        return (
            f"cannot reach S3 endpoint {url or 'AWS S3'}: {detail}",
            "check storage.endpoint_url (or $AWS_ENDPOINT_URL): scheme, host and port",
        )
    if kind == "no_bucket":
        return (
            f"bucket {bucket!r} does not exist at {url or 'AWS S3'}",
            f"create it first (e.g. `aws s3 mb s3://{bucket}`, or in the MinIO/R2 console)",
        )
    if kind == "bad_key":
        return (
            f"{url or 'AWS S3'} does not recognise the access key in ${ak_env} (InvalidAccessKeyId)",
            f"check ${ak_env}, and that it belongs to this endpoint",
        )
    if kind == "bad_secret":
        return (
            f"{url or 'AWS S3'} rejected the request signature for bucket {bucket!r}: the secret key in "
            f"${sk_env} does not match the access key in ${ak_env} (SignatureDoesNotMatch)",
            f"check ${sk_env}",
        )
    if kind == "token":
        return (f"{url or 'AWS S3'} rejected the session token in ${tok_env}: {detail}", None)
    if kind == "region":
        return (
            f"bucket {bucket!r} at {url or 'AWS S3'} is in another region than {region(storage)!r}: {detail}",
            "set storage.region to the bucket's region",
        )
    if kind == "denied":
        return (
            f"access denied: the credentials in ${ak_env} may not {action} {where}",
            "grant s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on the bucket/prefix",
        )
    if kind == "forbidden":
        return (
            f"403 Forbidden: the credentials in ${ak_env} may not {action} {where} "
            "(no reason given: wrong keys or a missing permission)",
            f"`rtf checkpoints list` on the run dir names which; check ${ak_env}/${sk_env} and the bucket policy",
        )
    if kind == "no_credentials":
        return (
            f"no S3 credentials for {where}: ${ak_env}/${sk_env} are unset and the default AWS chain found none",
            f"export {ak_env}=... {sk_env}=...",
        )
    return (f"cannot {action} {where}: {detail}", None)


def classify_boto_error(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) for a boto3/botocore exception."""
    import botocore.exceptions as bex

    if isinstance(exc, bex.NoCredentialsError):
        return "no_credentials", "no credentials"
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        msg = err.get("Message") or code
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        kind = _BOTO_KINDS.get(code)
        if kind is None and status == 404 and code in ("404", "NotFound"):
            kind = "no_bucket"
        return kind or "other", f"{code}: {msg}" if code and code != msg else str(msg)
    if isinstance(exc, bex.EndpointConnectionError):
        cause = repr(exc.__cause__ or exc.kwargs.get("error", ""))
        if "Name or service not known" in cause or "nodename nor servname" in cause or "getaddrinfo" in cause:
            return "unreachable", "host not found (DNS)"
        if "Connection refused" in cause or "ConnectionRefused" in cause:
            return "unreachable", "connection refused"
        return "unreachable", "could not connect"
    if isinstance(exc, bex.ConnectTimeoutError):
        return "unreachable", "connection timed out"
    if isinstance(exc, (bex.ReadTimeoutError,)):
        return "unreachable", "no response (read timed out)"
    if isinstance(exc, (bex.ConnectionClosedError, bex.ProxyConnectionError, bex.SSLError, bex.HTTPClientError)):
        return "unreachable", type(exc).__name__
    return "other", f"{type(exc).__name__}: {exc}"


def classify_pyarrow_error(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) for an OSError from pyarrow's S3 filesystem (by the AWS SDK's error name)."""
    text = str(exc)
    if "ACCESS_DENIED" in text and "No response body" in text:
        return "forbidden", text.splitlines()[0]
    for needle, kind in _PYARROW_KINDS:
        if needle in text:
            if kind == "unreachable":
                low = text.lower()
                if "resolve host" in low or "curlcode: 6" in low:
                    return kind, "host not found (DNS)"
                if "timeout" in low or "too slow" in low:
                    return kind, "timed out"
                if "could not connect" in low or "couldn't connect" in low or "curlcode: 7" in low:
                    return kind, "connection refused"
            return kind, text.splitlines()[0] if text else type(exc).__name__
    return "other", text.splitlines()[0] if text else type(exc).__name__


def _to_storage_error(exc: BaseException, storage: Any, action: str) -> StorageError:
    mod = type(exc).__module__ or ""
    if mod.startswith(("botocore", "boto3")):
        kind, detail = classify_boto_error(exc)
    elif isinstance(exc, OSError) and is_s3(str(storage.path)):
        kind, detail = classify_pyarrow_error(exc)
    else:
        kind, detail = "other", str(exc)
        if isinstance(exc, OSError) and exc.strerror:
            detail = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    msg, hint = _message(kind, storage, action, scrub(detail, storage))
    err = StorageError(scrub(msg, storage), hint=scrub(hint, storage) if hint else None)
    err.kind = kind  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def storage_errors(storage: Any, action: str = "access") -> Iterator[None]:
    """Turn pyarrow/boto3/OS errors inside the block into one-line, secret-free StorageErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified, chained, re-raised
        mod = type(exc).__module__ or ""
        if isinstance(exc, OSError) or mod.startswith(("botocore", "boto3")):
            raise _to_storage_error(exc, storage, action) from None
        raise


# ----------------------------------------------------------------------------------------------------
# Preflight


def preflight(storage: Any, *, timeout: float = 10.0, max_attempts: int = 2) -> str:
    """Check that ``storage.path`` is usable before any compute is paid for; return what was checked.

    S3: the endpoint answers, the bucket exists, the keys are accepted, the prefix can be listed,
    written and deleted (a marker object is written then deleted), and pyarrow (the client Ray
    uses) sees the same root. Local: the directory can be created, written and deleted in.
    Each failure is its own one-line :class:`StorageError` (``.kind`` says which).
    """
    if is_s3(str(storage.path)):
        return _preflight_s3(storage, timeout=timeout, max_attempts=max_attempts)
    return _preflight_local(storage)


def preflight_status(storage: Any, **kwargs: Any) -> tuple[str, str]:
    """:func:`preflight` for a report that goes on after it: ``("ok", what was checked)``, ``("skipped",
    why)`` when there is nothing to check with (no credentials), or ``("failed", the one-line error)``."""
    try:
        return "ok", preflight(storage, **kwargs)
    except UserError as e:
        state = "skipped" if getattr(e, "kind", None) == "no_credentials" else "failed"
        return state, e.message + (f" ({e.hint})" if e.hint else "")


def _fail(kind: str, storage: Any, action: str, detail: str) -> StorageError:
    msg, hint = _message(kind, storage, action, detail)
    err = StorageError(scrub(msg, storage), hint=scrub(hint, storage) if hint else None)
    err.kind = kind  # type: ignore[attr-defined]
    return err


def _preflight_s3(storage: Any, *, timeout: float, max_attempts: int) -> str:
    bucket, prefix = split_s3(str(storage.path))
    url = endpoint_url(storage)  # raises on a malformed endpoint
    client = boto3_client(storage, connect_timeout=timeout, read_timeout=timeout, max_attempts=max_attempts)
    # ListObjectsV2 rather than HeadBucket: a HEAD error has no body, so a 403 could not tell bad
    # keys from a missing permission; a GET's error body names the reason.
    with storage_errors(storage, "list"):
        client.list_objects_v2(Bucket=bucket, Prefix=(prefix + "/") if prefix else "", MaxKeys=1)
    marker = "/".join(p for p in (prefix, f"{PREFLIGHT_MARKER}-{uuid.uuid4().hex[:12]}") if p)
    with storage_errors(storage, "write to"):
        client.put_object(Bucket=bucket, Key=marker, Body=b"rtf preflight marker; safe to delete\n")
    with storage_errors(storage, "delete objects in"):
        client.delete_object(Bucket=bucket, Key=marker)
    # the client Ray will use must agree
    fs, root = pyarrow_filesystem(storage, connect_timeout=timeout, request_timeout=timeout, max_attempts=max_attempts)
    with storage_errors(storage, "list (through pyarrow)"):
        fs.get_file_info(root)
    return f"{storage.path} at {url or 'AWS S3'}: reachable, bucket exists, credentials accepted, writable and deletable"


def _preflight_local(storage: Any) -> str:
    root = local_path(str(storage.path))
    # find the first component that exists: if it is a file, say which
    probe = root
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.exists(probe) and not os.path.isdir(probe):
        what = "it" if probe == root else probe
        raise _fail_local(root, f"{what} is a file, not a directory")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise _fail_local(root, f"cannot create it: {exc.strerror or exc}")
    marker = os.path.join(root, f"{PREFLIGHT_MARKER}-{uuid.uuid4().hex[:12]}")
    try:
        with open(marker, "wb") as f:
            f.write(b"rtf preflight marker; safe to delete\n")
        os.remove(marker)
    except OSError as exc:
        raise _fail_local(root, f"not writable: {exc.strerror or exc}")
    return f"{root}: directory exists, writable and deletable"


def _fail_local(root: str, what: str) -> StorageError:
    err = StorageError(f"storage directory {root}: {what}", hint="set storage.path to a writable directory")
    err.kind = "local"  # type: ignore[attr-defined]
    return err


# ----------------------------------------------------------------------------------------------------
# Helpers on a pyarrow filesystem (both backends); paths are native to ``fs``


def is_local_fs(fs: Any) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dirs(fs: pyarrow.fs.FileSystem, path: str) -> list[str]:
    """Names of the immediate subdirectories of ``path`` (sorted); ``[]`` when it does not exist."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime: float | None  # seconds since the epoch, when the backend says


def list_files(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, FileStat]:
    """All files under ``path``, recursively: ``{relative/posix/path: FileStat}``."""
    import pyarrow.fs as pafs

    base = path.rstrip("/") + "/"
    out: dict[str, FileStat] = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base) :] if info.path.startswith(base) else posixpath.relpath(info.path, path)
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        out[rel] = FileStat(int(info.size or 0), mtime)
    return out


def read_bytes(fs: pyarrow.fs.FileSystem, path: str) -> bytes | None:
    """The bytes of a small file, ``None`` when it does not exist."""
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    """Write a small file so that readers see all of it or nothing.

    Local: written to a temporary name beside it, then renamed (atomic on POSIX). S3: one object
    upload, which becomes visible only when complete.
    """
    if is_local_fs(fs):
        parent = os.path.dirname(path)
        fs.create_dir(parent, recursive=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(fs: pyarrow.fs.FileSystem, path: str) -> Any | None:
    """Parsed JSON at ``path``, ``None`` when it does not exist (ValueError when not JSON)."""
    data = read_bytes(fs, path)
    return None if data is None else json.loads(data.decode("utf-8"))


def write_json(fs: pyarrow.fs.FileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as JSON, all or nothing (see :func:`write_bytes`)."""
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def delete_file(fs: pyarrow.fs.FileSystem, path: str) -> None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(fs: pyarrow.fs.FileSystem, path: str) -> None:
    """Delete ``path`` and everything under it; nothing happens when it does not exist."""
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        if is_local_fs(fs):
            return
        # S3: a "directory" without a marker object still reports its children
        if not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            return
    fs.delete_dir(path)


def upload_dir(local_dir: str, fs: pyarrow.fs.FileSystem, dest_path: str) -> None:
    """Copy the contents of a local directory to ``dest_path`` on ``fs`` (recursively)."""
    import pyarrow.fs as pafs

    local_dir = local_path(local_dir)
    if not os.path.isdir(local_dir):
        raise UserError(f"not a directory: {local_dir}")
    if is_local_fs(fs):
        fs.create_dir(dest_path, recursive=True)
    pafs.copy_files(local_dir, dest_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(fs: pyarrow.fs.FileSystem, src_path: str, local_dir: str) -> None:
    """Copy everything under ``src_path`` on ``fs`` into a local directory (created if needed)."""
    import pyarrow.fs as pafs

    local_dir = local_path(local_dir)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(src_path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
