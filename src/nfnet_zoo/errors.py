"""The one exception type users see as a one-line message instead of a traceback, and the words for
faults of the machine (OSError) the command line reports the same way."""
from __future__ import annotations

import errno
import os


class NFNetZooError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""

    def __init__(self, *args):
        # Raised in a DataLoader worker, it is raised again in the main process as NFNetZooError("Caught
        # NFNetZooError in DataLoader worker process 0.\nOriginal Traceback ...\n...NFNetZooError: MESSAGE"): keep
        # the one line the user needs
        if len(args) == 1 and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            args = (args[0].rstrip().rpartition("NFNetZooError: ")[2],)
        super().__init__(*args)


_FIXES = {
    errno.ENOSPC: ("disk full", "free some space and run it again (the last saved state and models are kept)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run it again (the last saved state and models are kept)"),
    errno.EROFS: ("read-only file system", "use a folder on a writable disk"),
    errno.EACCES: ("permission denied", "pass a folder you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "pass a folder you may write to, or fix its permissions"),
}


def machine_fault(e: OSError) -> str:
    """One line for an OSError: what failed, on which file, and the fix where one is known."""
    what, fix = _FIXES.get(e.errno, (e.strerror or str(e) or type(e).__name__, ""))
    if e.errno in _FIXES and e.strerror and e.strerror != os.strerror(e.errno):
        what += f": {e.strerror}"  # our own words on the fault (e.g. how much room is missing)
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{what}{where}{'; ' + fix if fix else ''}".replace("\n", " ")
