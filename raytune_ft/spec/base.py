"""Shapes shared by the spec's sections: the base section (frozen, unknown keys forbidden) and the strict
patterns for every field that reaches a command line, a shell variable, a Kubernetes resource or a URL."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

# Every pattern is used with fullmatch: ``$`` alone would accept a trailing newline ("abc\n"), which then
# becomes a job id, a storage prefix or a line of a rendered manifest.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRETISH = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASS|PASSPHRASE|APIKEY|API_KEY|KEY|PAT|ACCESS_KEY(_ID)?|SECRET_ACCESS_KEY"
    r"|PRIVATE_KEY|CREDENTIALS?)(_|$)"
    r"|TOKEN(?!IZER)|PASSW|SECRET",  # GITHUBTOKEN, DBPASSWORD (but not TOKENIZERS_PARALLELISM)
    re.I,
)
# Well-known credential prefixes: a value that starts so is a secret whatever its variable is called.
TOKEN_VALUE_RE = re.compile(r"(?<![A-Za-z0-9])(?:hf_|sk-|sk_live_|ghp_|gho_|ghs_|github_pat_|glpat-|xox[bp]-)[A-Za-z0-9_-]{8,}"
                             r"|(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{12,}")
# Fields that reach a command line, a shell variable or a Kubernetes resource: strict shapes, each named.
ACCELERATOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
K8S_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label: namespaces
K8S_NAME_RE = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
K8S_QUANTITY_RE = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
K8S_LABEL_KEY_RE = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
K8S_LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
IMAGE_RE = re.compile(  # an OCI image reference: [registry[:port]/]path[:tag][@sha256:digest]
    r"[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?")
VERSION_RE = re.compile(r"[0-9]+\.[0-9]+(\.[0-9]+)?")
GPU_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
PIP_REQ_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(\[[A-Za-z0-9._,-]+\])?"
                        r"(\s*(===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+(\s*,\s*(===|==|!=|~=|<=|>=|<|>)\s*"
                        r"[A-Za-z0-9.*+!_-]+)*)?")
HOST_PATH = r"([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?"  # host[:port][/path]
CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
HUB_PREFIX = "hf://datasets/"
HUB_REPO_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # [org/]name
HUB_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")  # a config, split, branch, tag or commit


def check_hub_source(path: str, config: str | None, split: str | None, revision: str | None) -> None:
    """``hf://datasets/[ORG/]NAME`` with its config/split/revision; those three only for such a path."""
    if not path.startswith(HUB_PREFIX):
        given = [n for n, v in (("config", config), ("split", split), ("revision", revision)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply only to a hub dataset (path: hf://datasets/ORG/NAME)")
        return
    check_shape(path[len(HUB_PREFIX):], HUB_REPO_RE, "hf://datasets/ORG/NAME (a Hugging Face dataset id)")
    for name, v in (("config", config), ("split", split), ("revision", revision)):
        if v is not None and not HUB_REF_RE.fullmatch(v):
            raise ValueError(f"{name} must be letters, digits and ._/- (got {v!r})")
# control characters and the invisible ones that change how text reads (zero-width, line/paragraph separators,
# bidi overrides, BOM): never in a name, a path, a hub id or a revision
UNSAFE_TEXT_RE = re.compile("[\x00-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")  # a branch, tag or commit: main, v1.0, refs/pr/1
REGION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # us-east-1, auto (R2), default (Ceph)


def importable(module: str) -> bool:
    """Whether a package is installed, without importing it (validation stays import-light)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_shape(value: str, pattern: re.Pattern[str], what: str) -> str:
    """``value`` must match ``pattern`` whole; the message says what shape was expected."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"must be {what} (got {value!r})")
    return value


def plain_text(value: str | None, what: str) -> str | None:
    """``value`` without control or invisible characters (see :data:`UNSAFE_TEXT_RE`)."""
    if value is not None and UNSAFE_TEXT_RE.search(value):
        raise ValueError(f"{what} holds a control or invisible character (got {value!r})")
    return value


def no_userinfo(url: str) -> str:
    """Credentials in a URL (``https://KEY:SECRET@host``) would be printed, rendered and logged."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); name the environment variables that "
                         "hold them instead (storage.access_key_env / secret_key_env, or RAY_AUTH_TOKEN)")
    return url


def looks_like_token(value: str) -> bool:
    return bool(TOKEN_VALUE_RE.search(value))


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


def section_rule(fn):
    """A section's rule across its own fields, run after its fields validate (pydantic's model validator).
    Validation with the context ``{"section_rules": False}`` leaves it out: :mod:`raytune_ft.spec.collect`
    validates a section without its failed fields that way and runs the rule itself (``RULE_ATTR``), so a
    rule that does not read a failed field is still reported in the same pass."""

    def rule(self, info: ValidationInfo):
        if (info.context or {}).get("section_rules") is False:
            return self
        fn(self)
        return self

    rule.__name__, rule.__qualname__, rule.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    setattr(rule, RULE_ATTR, fn)
    return model_validator(mode="after")(rule)


RULE_ATTR = "rtf_rule"
