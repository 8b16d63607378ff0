"""Evaluation over the processes a launcher started (``torchrun --nproc-per-node N -m minigpt.cli eval ...``).

:class:`Shard` is this process's part of a run: the records ``rank::world_size`` (strided, so every rank gets long and
short prompts), a rank-local predictions file next to the merged one, and the two collectives the runner needs
(gather the ranks' results on rank 0, share rank 0's result). One process is ``Shard()``: its part is everything,
its file the merged one. The process group itself is :func:`minigpt.device.start_process_group`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world_size`` evaluating processes."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Shard:
        """This process's shard in the initialised process group (one process without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this process merges, scores and writes the run's files (rank 0)."""
        return self.rank == 0

    def part(self, records: Sequence[T]) -> list[T]:
        """This rank's records: every ``world_size``-th from ``rank`` on."""
        return list(records[self.rank :: self.world_size])

    def local_path(self, merged: Path) -> Path:
        """The rank-local predictions file next to ``merged`` (``merged`` itself for one process)."""
        if not self.distributed:
            return merged
        return merged.with_name(f"{merged.stem}.rank{self.rank}-of-{self.world_size}{merged.suffix}")

    def all_local_paths(self, merged: Path) -> list[Path]:
        return [Shard(rank, self.world_size).local_path(merged) for rank in range(self.world_size)]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0, None on the others."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.main else None
        dist.gather_object(value, out, dst=0)
        return out

    def share(self, value: T | None) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            assert value is not None
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Shard"]
