"""CPU priority of background work: a backup (its thread, pg_dump and the compression threads) yields the
cores to the calls people wait on (List, GetStatus, downloads, a restore's load) when both compete, and
costs nothing on an idle host.

Linux keeps a nice value per thread, and the threads and processes a thread starts inherit it. A nice value
cannot be lowered again without CAP_SYS_NICE (which containers lack), so only a thread that exists for the
background work and ends with it lowers its own priority, first thing.
"""

from __future__ import annotations

import logging
import os
import threading

_logger = logging.getLogger(__name__)

#: The nice value of a backup: 10 gives it about a tenth of the CPU share of normal work when both want a
#: core (the kernel's weights for nice 0 and 10 are 1024 and 110).
BACKGROUND_NICENESS = 10


def lower_this_thread(niceness: int = BACKGROUND_NICENESS) -> None:
    """Raise the calling thread's nice value by `niceness`, for good: call it only at the start of a thread
    that runs background work and nothing after it. Best effort: where the host forbids it, the work runs
    at normal priority."""
    if niceness <= 0:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    except OSError as exc:
        _logger.debug("could not lower the priority of background work: %s", exc)
