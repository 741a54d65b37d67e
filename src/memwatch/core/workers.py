"""How probe work is shared between the processes of a distributed (``accelerate``) run.

Every process calls a probe at the same step. Each takes its contiguous share of the work
(:meth:`Workers.share`), and :attr:`Workers.gather` concatenates the per-process lists in process
order on every process, so the gathered rows are exactly what one process alone would have made.
With one process, sharing is the identity and gathering a plain copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from memwatch.errors import MemwatchError

T = TypeVar("T")


@dataclass
class Workers:
    """This process's place among the processes that share a probe's work.

    Attributes:
        process_index: rank of this process.
        num_processes: how many processes share the work.
        gather: concatenates per-process lists in process order (a collective call when
            ``num_processes > 1``; every process must call it).

    Example:
        >>> Workers(1, 2).share([10, 11, 12])
        [12]
    """

    process_index: int = 0
    num_processes: int = 1
    gather: Callable[[list], list] = field(default=list)

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def broadcast(self, value: T) -> T:
        """The main process's ``value`` on every process (collective: every process must call it).

        Example:
            >>> Workers().broadcast({"skip": False})
            {'skip': False}
        """
        return value if self.num_processes == 1 else self.gather([value])[0]

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of ``items`` (see :func:`split_for_process`)."""
        return split_for_process(items, self.process_index, self.num_processes)  # type: ignore[arg-type]

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> Workers:
        """Workers for an ``accelerate.Accelerator`` (``gather_object`` across its processes).

        Raises:
            MemwatchError: the launcher started several processes (``WORLD_SIZE``) but the Accelerator
                runs as one (accelerate does so without GPUs unless ``cpu=True``): every process would
                probe and write the same store alone.
        """
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if accelerator.num_processes == 1 and world > 1:
            raise MemwatchError(
                f"the launcher started {world} processes (WORLD_SIZE) but the Accelerator runs as 1 process: on a "
                "machine without GPUs create it with Accelerator(cpu=True), so that the processes share the work"
            )
        if accelerator.num_processes == 1:
            return cls()
        from accelerate.utils import gather_object

        return cls(accelerator.process_index, accelerator.num_processes, gather_object)


def split_for_process(seeds: Sequence[T], process_index: int, num_processes: int) -> list[T]:
    """The contiguous share of ``seeds`` that process ``process_index`` generates.

    Shares differ in length by at most one (the first ``len(seeds) % num_processes`` processes get
    one more, as in ``accelerate``'s ``split_between_processes``), and concatenating the shares in
    process order gives ``seeds`` back, so gathered samples line up with the seed list.

    Args:
        seeds: all probe seeds, in order.
        process_index: this process's rank, ``0 <= process_index < num_processes``.
        num_processes: number of processes sharing the work.

    Example:
        >>> [split_for_process(range(5), i, 2) for i in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    if num_processes < 1:
        raise MemwatchError(f"num_processes={num_processes}: must be at least 1")
    if not 0 <= process_index < num_processes:
        raise MemwatchError(f"process_index={process_index}: must be in [0, {num_processes})")
    seeds = list(seeds)
    base, extra = divmod(len(seeds), num_processes)
    start = process_index * base + min(process_index, extra)
    stop = start + base + (1 if process_index < extra else 0)
    return seeds[start:stop]
