"""Where a user is waiting (the CLI, the preflight): storage failures classified into one-line,
secret-free :class:`~raytune_ft.errors.StorageError` s, and the preflight that checks a storage root before
any compute is paid for. The library helpers in :mod:`raytune_ft.storage.core` let pyarrow's ``OSError``
through (a network blip while training is an infrastructure failure, to be retried, not a user error)."""

from __future__ import annotations

import builtins
import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from raytune_ft.errors import StorageError, UserError
from raytune_ft.storage.core import (
    boto3_client,
    endpoint_url,
    env_names,
    is_s3,
    local_path,
    pyarrow_filesystem,
    region,
    scrub,
    split_s3,
)

PREFLIGHT_MARKER = ".rtf_preflight"


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
    ak_env, sk_env, tok_env = env_names(storage)
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


def preflight_status(storage: Any, **kwargs: Any) -> tuple[str, str]:
    """:func:`preflight` for a report that goes on after it: ``("ok", what was checked)``, ``("skipped",
    why)`` when there is nothing to check with (no credentials), or ``("failed", the one-line error)``."""
    try:
        return "ok", preflight(storage, **kwargs)
    except UserError as e:
        state = "skipped" if getattr(e, "kind", None) == "no_credentials" else "failed"
        return state, e.message + (f" ({e.hint})" if e.hint else "")


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
        with builtins.open(marker, "wb") as f:
            f.write(b"rtf preflight marker; safe to delete\n")
        os.remove(marker)
    except OSError as exc:
        raise _fail_local(root, f"not writable: {exc.strerror or exc}")
    return f"{root}: directory exists, writable and deletable"


def _fail_local(root: str, what: str) -> StorageError:
    err = StorageError(f"storage directory {root}: {what}", hint="set storage.path to a writable directory")
    err.kind = "local"  # type: ignore[attr-defined]
    return err
