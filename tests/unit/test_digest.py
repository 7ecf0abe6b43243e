"""sha256_file reads in blocks and must equal hashing the whole file at once."""

from __future__ import annotations

import hashlib
from pathlib import Path

from defcnn.digest import sha256_file


def test_sha256_file_equals_the_digest_of_its_bytes_across_block_boundaries(
    tmp_path: Path,
) -> None:
    for size in (0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 7, 3 << 20):
        data = bytes(i % 251 for i in range(size))
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()
