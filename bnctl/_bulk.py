"""Reading in bulk: cyclic garbage collection paused while a file's layers are read.

Reading a large checkpoint builds millions of small objects that hold no cycles (a 70 MB
safetensors header is 800,000 dicts; 200,000 layers are 200,000 records and their rows).
Each of Python's generation-2 collections walks every one of them, so with collection on,
a read of 200,000 layers spends more than half its time collecting nothing; paused, the
read is about twice as fast. What was read is then frozen (``gc.freeze``): later
collections, while the table is drawn, skip it instead of walking it again. Reference
counting still frees all of it as usual; only cyclic garbage made during the read (a read
makes next to none) is left to the end of the process.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """Cyclic collection paused for the duration and restored as it was, even on errors;
    on success, the objects alive at the end are frozen out of later collections."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if was_enabled:
            gc.enable()
