"""Scoring a set of volumes one volume at a time, host work overlapping device work.

Evaluation at scale (README, "Evaluation at scale") must not hold a test set in memory: BraTS21's
1,251 volumes are ~41 GB. `scored` reads, scores and reduces each volume to something small (a
metrics row, a histogram) and lets it go, with three stages running at once:

- a reader thread decodes the next volumes (bounded queue of `workers` volumes);
- the calling thread dispatches each volume's heatmap to the devices (JAX runs it asynchronously);
- `workers` threads wait for a heatmap, post-process it (median filter, brain mask) and apply
  `reduce` (metrics, histograms), while the devices compute the next heatmaps.

Threads, not processes: the median filter (numpy take + partition), the sorts of AUROC/AUPRC,
the confusion counts and np.bincount run in NumPy calls that release the GIL, and processes would
pickle every volume's maps (~100 MB at 240x240x155) to and fro. Measured on the 2-core
development machine (README, "Evaluation at scale"): 2 processes were no faster than 2 threads
for the median filter or the metrics, and the pipeline took the demo test set from 7.5 to
4.6 s per volume, mostly by overlapping the (XLA:CPU) heatmaps with the host work.
At most about 3 * workers volumes are alive at a time (read ahead, dispatched, post-processed),
whatever the size of the set.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

_DONE = object()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(eval_config) -> int:
    """`eval.workers` (0 or absent in configs of older runs: the CPUs this process may use)."""
    workers = int(eval_config.get("workers", 0) or 0)
    return workers if workers > 0 else default_workers()


def read_ahead(items: Iterable, size: int) -> Iterator:
    """`items` in order, produced by a thread at most `size` items ahead (volume decoding)."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((_DONE, None))
        except BaseException as error:  # handed to the consumer, raised there
            slots.put((_DONE, error))

    thread = threading.Thread(target=produce, name="p2l-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early (an error, a break): the reader ends too


def scored(
    scorer,
    volumes: Iterable,
    reduce: Callable,
    *,
    workers: int,
    filtered: bool = True,
) -> Iterator:
    """`reduce(volume, scored_volume)` of every volume, in order (see the module docstring).

    `volumes` yields objects with subject_id/image/mask/seg (p2l.slices_builder.VolumeRecord);
    `reduce` runs in a worker thread and should return something small. An error in any stage is
    raised here, in the caller's thread.
    """
    workers = max(1, int(workers))
    in_flight: deque = deque()

    def finish(volume, pending):
        return reduce(volume, pending.result())

    reader = read_ahead(volumes, workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="p2l-eval") as pool:
        try:
            for volume in reader:
                pending = scorer.start(volume.subject_id, volume.image, volume.mask, volume.seg,
                                       filtered=filtered)  # fmt: skip
                in_flight.append(pool.submit(finish, volume, pending))
                del volume, pending  # only the future holds them now
                # One more than the workers: a heatmap is computing while every worker is busy.
                if len(in_flight) > workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            reader.close()  # stops the reader thread when we stop early
            for future in in_flight:
                future.cancel()
