"""Toy tokenizer and prefix-cache block hashes shared by the replica engine and the router.

The hashes identify KV-cache blocks the way vLLM's prefix cache does: each full block's hash
covers every token before it, so two prompts share block ``k`` only if they share the first
``k + 1`` blocks. The router can therefore predict cache hits from hashes alone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_TOKEN_SEP = "\x1f"


def tokenize(text: str) -> list[str]:
    """Split ``text`` into words and single punctuation characters; whitespace is dropped.

    Deterministic and process-independent, so token counts and hashes agree everywhere.
    """
    return _TOKEN_RE.findall(text)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def block_hashes(tokens: Sequence[str], block_size: int, salt: str = "") -> tuple[int, ...]:
    """Return the hash chain of the FULL blocks of ``tokens`` (a trailing partial block is skipped).

    ``h_i`` is the big-endian 64-bit integer of ``blake2b(h_{i-1} + salt + "\\x1f".join(block),
    digest_size=8)``; the parent of the first block is ``blake2b(salt, digest_size=8)``. Prompts
    sharing their first ``k`` full blocks share the first ``k`` hashes; a different ``salt``
    (e.g. model or LoRA adapter) gives unrelated chains. Stable across processes and runs.
    Raises ``ValueError`` if ``block_size < 1``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    salt_bytes = salt.encode()
    parent = _digest(salt_bytes)
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = _TOKEN_SEP.join(tokens[start : start + block_size]).encode()
        parent = _digest(parent + salt_bytes + block)
        out.append(int.from_bytes(parent, "big"))
    return tuple(out)
