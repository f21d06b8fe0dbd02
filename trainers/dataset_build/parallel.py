"""Running the per-image work on a thread pool, results in input order."""
from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor


def ordered_map(fn, items, workers: int):
    """fn over items on a thread pool, results in input order, at most 2*workers in flight.

    Pillow and OpenCV release the GIL while decoding, resizing and encoding, so threads scale.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="dataset") as pool:
        pending = deque(pool.submit(fn, x) for x in itertools.islice(items, 2 * workers))
        try:
            while pending:
                result = pending.popleft().result()
                for x in itertools.islice(items, 1):
                    pending.append(pool.submit(fn, x))
                yield result
        finally:
            for f in pending:
                f.cancel()
