"""Bearer-token files, read the same way by the server (`--auth-token-file`), `defcnn
classify` and the attack harness (`--token-file`). Torch-free."""

from __future__ import annotations

from pathlib import Path

from defcnn.errors import ConfigError


def read_token_file(path: str | Path, *, flag: str = "--token-file") -> str:
    """The token: the file's first line, stripped of surrounding whitespace.

    A missing, unreadable or non-UTF-8 file, or an empty first line, is a ConfigError naming
    `flag` and the file, so a typo never silently turns auth off or sends an empty token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc}") from exc
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"{flag} {path} is empty (expected the token on its first line)")
    return token
