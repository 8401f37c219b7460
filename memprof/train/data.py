"""Training data: real English text, byte-level tokens, deterministic per-rank batches.

Tokenizer: none to download. A token is one UTF-8 byte of the text (ids 0..255); every preset's
vocabulary has at least 256 entries, so the ids index the embedding table directly. Memory does not
depend on which tokens are fed, only on their shape, so bytes are enough for a memory profiler and
keep the run fully offline.

Sharding (data parallelism): a sample is a window of ``seq_len`` tokens starting at offset ``s``.
Rank ``r`` of ``world_size`` owns the start offsets ``s`` with ``s % world_size == r``, so ranks
never draw the same window; within its shard a rank draws offsets with a ``torch.Generator`` seeded
from ``(seed, rank)``: the same flags give the same batches on every run.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from memprof.errors import MemprofError

# The shipped texts, in the order they are joined (see memprof/data/README.md for their sources).
SHIPPED_TEXTS: tuple[str, ...] = (
    "declaration_of_independence.txt",
    "lincoln_speeches.txt",
    "cc0_legal_code.txt",
)


def load_text(path: Path | None = None) -> bytes:
    """UTF-8 bytes of ``path``, or of the texts shipped in ``memprof/data`` when None."""
    if path is not None:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise MemprofError(f"cannot read --data {path}: {e.strerror}") from None
    folder = resources.files("memprof") / "data"
    return b"\n\n".join(folder.joinpath(name).read_bytes() for name in SHIPPED_TEXTS)


def tokenize(text: bytes) -> torch.Tensor:
    """Byte-level tokens: a 1-D uint8 tensor of the bytes' values (0..255), one byte per token.

    ``ByteBatches`` keeps the stream as a bytearray (outside tensor memory) and widens only each
    batch to int64 ids.
    """
    # clone: a tensor that owns its memory, not a view of a bytearray kept alive beside it
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


class ByteBatches:
    """Deterministic micro-batches of one rank's shard: ``next_batch()`` -> ``[micro_batch, seq_len]``.

    The model gets the same tensor as ``input_ids`` and ``labels``: HF's GPT2LMHeadModel shifts
    the labels by one position itself before computing the loss.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch: int, seed: int, rank: int, world_size: int):
        n_starts = tokens.numel() - seq_len + 1  # window start offsets 0 .. n - seq_len
        if n_starts < world_size:
            raise MemprofError(
                f"the text has {tokens.numel()} tokens, too few for {world_size} ranks of --seq-len {seq_len} windows: "
                "use a shorter --seq-len or a longer --data text"
            )
        # The stream is kept as a bytearray, not a tensor: it is the script's input data, host memory
        # outside torch's allocator (as a GPU run's data set is outside device memory), so a CPU run's
        # device total holds only what training computes with. Only each batch is made a tensor.
        self.stream = bytearray(tokens.numpy().tobytes())
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        # This rank's shard: every world_size-th start offset, beginning at its rank. Its i-th offset
        # is rank + world_size * i, computed per pick rather than kept as a tensor of offsets.
        self.rank = rank
        self.world_size = world_size
        self.n_shard = len(range(rank, n_starts, world_size))
        # Mix the rank into the seed so ranks sample independently, yet reproducibly.
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def resident_bytes(self) -> int:
        """Tensor bytes this sampler keeps alive for the whole run: none (the token stream is a
        bytearray, :attr:`stream`; its bytes are in the process's RSS, not in tensor memory)."""
        return 0

    def next_batch(self) -> torch.Tensor:
        """``[micro_batch, seq_len]`` int64 ids: each row a window of this rank's shard."""
        picks = torch.randint(0, self.n_shard, (self.micro_batch,), generator=self.generator)
        batch = torch.empty((self.micro_batch, self.seq_len), dtype=torch.int64)
        for row, pick in zip(batch, picks.tolist()):
            start = self.rank + self.world_size * pick
            # copy_ widens the uint8 window into the int64 row: no int64 copy of the stream, no offsets tensor
            row.copy_(torch.frombuffer(self.stream, dtype=torch.uint8, offset=start, count=self.seq_len))
        return batch
