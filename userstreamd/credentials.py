"""systemd credentials: secrets the service manager hands over as files
(``LoadCredential=``), read by name from ``$CREDENTIALS_DIRECTORY``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def read_credential(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Contents of $CREDENTIALS_DIRECTORY/<name> (systemd LoadCredential=), trailing newline
    stripped; None if the variable or file is absent.

    An empty credential (or a lone newline) also reads as None: the shipped unit's
    ``SetCredential=db-password:\\n`` fallback, used when the password file is missing,
    means "no password", the way an empty password environment variable does.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid credential name {name!r}")
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        text = (Path(directory) / name).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text.rstrip("\r\n") or None
