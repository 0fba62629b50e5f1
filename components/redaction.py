"""The one credential scrubber: nothing kfp-grpo prints, logs, tags or compiles carries a secret.

Two guards, used by every entry point:
- `credentials_in(value)` says why a value (a URI, a path) carries a credential: a password in
  its ``user:password@`` part, or a secret query parameter (``?token=``, ``X-Amz-Signature=``,
  ...). The config schema, the `--tracking-uri`/`--init-*-uri` options and the tracking URI a
  local run takes from the environment refuse such a value (`refuse_credentials`), because it
  would be compiled into a pipeline or stored as a KFP run parameter.
- `scrub(text)` replaces, in text about to be printed or logged, every URI password, secret
  query parameter, the values of the secret environment variables (`SECRET_ENV`) and any value
  registered with `register_secret` (the `--token` of a command) by ``***``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit

from components.errors import KfpGrpoError

# environment variables whose values are secrets wherever they appear
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "KF_PIPELINES_TOKEN", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD")
# query parameters that carry a credential (presigned URLs, token auth)
SECRET_PARAMS = ("token", "access_token", "auth", "password", "passwd", "pwd", "secret", "api_key", "apikey",
                 "key", "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                 "x-goog-signature", "x-goog-credential")
MASK = "***"
_registered: set[str] = set()

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s@:'\"]*):([^/\s@'\"]+)@")
_QUERY = re.compile(r"(?i)([?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMS) + r")=)([^&;#\s'\"]+)")


class CredentialError(KfpGrpoError, ValueError):
    """A credential was given where it would be stored or shown; the message names where, never the secret."""


def register_secret(value: str | None) -> None:
    """Scrub `value` (e.g. a `--token`) from everything printed for the rest of the process."""
    if value and len(value) >= 4:
        _registered.add(value)


def _secrets(min_length: int = 4) -> list[str]:
    found = {os.environ.get(k, "") for k in SECRET_ENV} | _registered
    return sorted((s for s in found if len(s) >= min_length), key=len, reverse=True)  # longest first


def credentials_in(value: str) -> str | None:
    """Why `value` carries a credential (None when it does not)."""
    if "://" not in value:
        return None
    try:
        parts = urlsplit(value.strip())
        password = parts.password
    except ValueError:  # e.g. an invalid port: not a URI we can read, so look at the text
        password = _USERINFO.search(value) and "?"
        parts = None
    if password:
        return "contains a password (user:password@)"
    query = parts.query if parts is not None else ""
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name.lower() in SECRET_PARAMS:
            return f"contains a secret query parameter ({name}=)"
    if any(s in value for s in _secrets(min_length=8)):
        return "contains the value of a secret environment variable"
    return None


def refuse_credentials(value: str | None, where: str) -> None:
    """CredentialError naming `where` when `value` carries a credential."""
    why = credentials_in(value) if value else None
    if why:
        raise CredentialError(f"{where} {why}: it would be stored in the pipeline or the run's parameters "
                              "and shown in the KFP UI; give credentials as MLFLOW_TRACKING_USERNAME/"
                              "MLFLOW_TRACKING_PASSWORD (or AWS_*) from a Kubernetes Secret instead")


def scrub(text: str) -> str:
    """`text` with every credential it holds replaced by ``***``."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{MASK}@", text)
    text = _QUERY.sub(lambda m: m.group(1) + MASK, text)
    for s in _secrets():
        text = text.replace(s, MASK)
    return text


def error_line(err: BaseException | str) -> str:
    """The one `error: ...` line of a user error: one line, scrubbed."""
    return "error: " + scrub(" ".join(str(err).split()))
