"""Credential files: bearer tokens, read the same way by the server (`--auth-token-file`),
`defcnn classify` and the attack harness (`--token-file`), and TLS certificates and keys.
Torch-free."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from defcnn.errors import ConfigError


def read_token_file(path: str | Path, *, flag: str = "--token-file") -> str:
    """The token: the file's first line, stripped of surrounding whitespace.

    A missing, unreadable or non-UTF-8 file, or an empty first line, is a ConfigError naming
    `flag` and the file, so a typo never silently turns auth off or sends an empty token.
    """
    try:
        text = read_credential_file(path, flag=flag).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc}") from exc
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"{flag} {path} is empty (expected the token on its first line)")
    return token


CREDENTIAL_LIMIT = 1 << 20  # a certificate chain or a token is a few KB


def read_credential_file(path: str | Path, *, flag: str) -> bytes:
    """The bytes of a small regular file; anything else (missing, a FIFO that would block
    for ever, a device, over CREDENTIAL_LIMIT) is a ConfigError naming `flag`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{flag} {path} is not a regular file")
        if info.st_size > CREDENTIAL_LIMIT:
            raise ConfigError(f"{flag} {path} is {info.st_size} bytes; at most {CREDENTIAL_LIMIT}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(CREDENTIAL_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
