import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spillgate.core.prefix import block_hashes, tokenize


def test_tokenize_splits_words_and_single_punctuation() -> None:
    assert tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
    assert tokenize("  a\tb\n") == ["a", "b"]
    assert tokenize("x==y?") == ["x", "=", "=", "y", "?"]
    assert tokenize("snake_case 42") == ["snake_case", "42"]
    assert tokenize("") == []


def test_shared_prefix_shares_leading_hashes() -> None:
    a = block_hashes(list("abcdefgh") + ["x"] * 4, 4)
    b = block_hashes(list("abcdefgh") + ["y"] * 4, 4)
    assert len(a) == len(b) == 3
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_hash_covers_everything_before_the_block() -> None:
    # Same second block, different first block: the chain must differ from block 0 on.
    a = block_hashes(["p", "q", "s", "t"], 2)
    b = block_hashes(["p", "r", "s", "t"], 2)
    assert a[0] != b[0]
    assert a[1] != b[1]


def test_partial_last_block_is_not_hashed() -> None:
    tokens = [str(i) for i in range(10)]
    assert len(block_hashes(tokens, 4)) == 2
    assert block_hashes(tokens, 4) == block_hashes(tokens[:8], 4)
    assert block_hashes(tokens[:3], 4) == ()
    assert len(block_hashes(tokens, 5)) == 2


def test_salt_separates_chains() -> None:
    tokens = [str(i) for i in range(16)]
    plain, salted = block_hashes(tokens, 4), block_hashes(tokens, 4, salt="lora-a")
    assert not set(plain) & set(salted)
    assert block_hashes(tokens, 4, salt="lora-a") == salted


def test_hash_is_stable_blake2b_chain() -> None:
    parent = hashlib.blake2b(b"m", digest_size=8).digest()
    first = hashlib.blake2b(parent + b"m" + b"a\x1fb", digest_size=8).digest()
    second = hashlib.blake2b(first + b"m" + b"c\x1fd", digest_size=8).digest()
    expected = (int.from_bytes(first, "big"), int.from_bytes(second, "big"))
    assert block_hashes(["a", "b", "c", "d", "e"], 2, salt="m") == expected


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(["a"], 0)


@given(
    st.lists(st.sampled_from("abc"), max_size=30),
    st.lists(st.sampled_from("abc"), max_size=30),
    st.integers(1, 5),
)
def test_common_full_blocks_iff_common_hashes(a: list[str], b: list[str], size: int) -> None:
    ha, hb = block_hashes(a, size), block_hashes(b, size)
    assert len(ha) == len(a) // size
    common = 0
    while common < min(len(ha), len(hb)) and a[: (common + 1) * size] == b[: (common + 1) * size]:
        common += 1
    shared = 0
    while shared < min(len(ha), len(hb)) and ha[shared] == hb[shared]:
        shared += 1
    assert shared == common
