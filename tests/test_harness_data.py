"""Harness data: the embedded corpus, text and FineWeb-shard readers, malformed input."""

from __future__ import annotations

import struct

import pytest
import torch

from normuon.harness.data import (
    GPT2_VOCAB,
    SHARD_MAGIC,
    get_batch,
    load_data,
    load_shakespeare,
    read_bin_shard,
    validation_batches,
    write_bin_shard,
)


def _shard_bytes(tokens, magic=SHARD_MAGIC, version=1, count=None):
    # Written here byte by byte (not with write_bin_shard) so the reader is checked against
    # the format itself: 256 little-endian int32, then little-endian uint16 tokens.
    count = len(tokens) if count is None else count
    header = struct.pack("<256i", magic, version, count, *([0] * 253))
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


def test_corpus_is_shakespeare_without_gutenberg_licence():
    text = load_shakespeare()
    assert 4_500_000 < len(text) < 6_000_000
    for phrase in ("To be, or not to be", "HAMLET, PRINCE OF DENMARK", "Shall I compare thee",
                   "Now is the winter of our discontent", "THE TEMPEST"):  # fmt: skip
        assert phrase in text, phrase
    lowered = text.lower()
    for boilerplate in ("gutenberg", "*** start of", "*** end of", "small print"):
        assert boilerplate not in lowered, boilerplate
    # First Folio duplicates are not included: Hamlet's title page appears once.
    assert text.count("HAMLET, PRINCE OF DENMARK") == 1


def test_default_data_split_and_vocab():
    data = load_data(None, val_fraction=0.05)
    assert data.vocab_size == 256
    total = data.train.numel() + data.val.numel()
    assert abs(data.val.numel() / total - 0.05) < 1e-3
    assert data.train.dtype == torch.int64 and int(data.train.max()) < 256
    raw = load_shakespeare().encode()
    assert bytes(data.val[-50:].tolist()) == raw[-50:]  # the validation split is the end


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld " * 50, encoding="utf-8")
    data = load_data(tmp_path / "a.txt")
    assert data.vocab_size == 256
    assert bytes(torch.cat([data.train, data.val]).tolist()).decode() == "héllo wörld " * 50
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "2.txt").write_text("second " * 40)
    (folder / "1.txt").write_text("first " * 40)
    joined = bytes(torch.cat([(d := load_data(folder)).train, d.val]).tolist()).decode()
    assert joined == "first " * 40 + "\n\n" + "second " * 40  # sorted by name


def test_bin_shard_reader(tmp_path):
    tokens = [0, 1, 255, 256, 32767, 32768, 50000, 50256] * 10
    path = tmp_path / "fineweb_train_000001.bin"
    path.write_bytes(_shard_bytes(tokens))
    assert read_bin_shard(path).tolist() == tokens  # values >= 2**15 are not sign-extended
    # The writer produces the same bytes as the format spelled out above.
    write_bin_shard(tmp_path / "w.bin", tokens)
    assert (tmp_path / "w.bin").read_bytes() == path.read_bytes()
    data = load_data(path)
    assert data.vocab_size == GPT2_VOCAB
    assert torch.cat([data.train, data.val]).tolist() == tokens


def test_bin_folder_uses_val_shards(tmp_path):
    (tmp_path / "fineweb_train_000001.bin").write_bytes(_shard_bytes(list(range(100, 400))))
    (tmp_path / "fineweb_val_000000.bin").write_bytes(_shard_bytes(list(range(7, 107))))
    data = load_data(tmp_path)
    assert data.vocab_size == GPT2_VOCAB
    assert data.train.tolist() == list(range(100, 400))
    assert data.val.tolist() == list(range(7, 107))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad_magic.bin", _shard_bytes([1, 2, 3], magic=12345), "magic number 12345"),
        ("short_header.bin", b"\x00" * 100, "shorter than the 1024-byte header"),
        ("truncated.bin", _shard_bytes([1, 2, 3], count=10), "truncated shard"),
        ("trailing.bin", _shard_bytes([1, 2, 3], count=2), "trailing bytes"),
        ("version.bin", _shard_bytes([1, 2], version=7), "unsupported shard version 7"),
        ("big_token.bin", _shard_bytes([1, 60000]), "outside the GPT-2 vocabulary"),
        ("empty.txt", b"", "the file is empty"),
        ("junk.txt", bytes([0xFF, 0xFE, 0x80, 0x81]) * 64, "not UTF-8 text"),
        ("nul.txt", b"abc\x00def" * 10, "binary data, not text"),
    ],
)
def test_malformed_input_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_data(path)
    assert name in str(info.value)  # the error names the file


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder") as info:
        load_data(tmp_path / "nope.txt")
    assert "nope.txt" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no files"):
        load_data(tmp_path / "empty")


def test_folder_with_a_junk_file_names_that_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine text " * 20)
    (tmp_path / "model.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="model.pt"):
        load_data(tmp_path)


def test_batches_are_a_function_of_seed_and_step():
    tokens = torch.arange(1000)
    x1, y1 = get_batch(tokens, 4, 16, seed=3, step=7)
    x2, y2 = get_batch(tokens, 4, 16, seed=3, step=7)
    x3, _ = get_batch(tokens, 4, 16, seed=3, step=8)
    assert x1.shape == (4, 16) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the next tokens
    v1 = validation_batches(tokens, 4, 16, 3)
    v2 = validation_batches(tokens, 4, 16, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2, strict=True))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        get_batch(torch.arange(10), 2, 16, seed=0, step=0)
