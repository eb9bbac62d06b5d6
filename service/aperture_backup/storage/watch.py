"""Whether anything List shows may have changed in a directory since the last look, from Linux's inotify
(through libc, as the standard library has no binding), so that a listing can be reused until it has.

The kernel queues an event inside the very call that changes a file (a write, a rename, a removal, a
change of times), so a look after that call returns sees it: nothing a caller did before asking is
missed. Changes to hidden names (temporary files, the `.state` folder) are ignored, as List ignores those
files: a backup writing its temporary archive does not make every listing scan again. inotify does not
see what another machine changes on a network file system, so callers still scan now and then.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
import sys
from pathlib import Path

_logger = logging.getLogger(__name__)

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_UNMOUNT = 0x2000
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
#: The watched directory itself went away (removed, renamed, unmounted): this watch can no longer tell.
_GONE = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_IGNORED
#: struct inotify_event: wd, mask, cookie, len, then `len` bytes of name.
_EVENT = struct.Struct("iIII")


class DirectoryWatch:
    """An inotify watch on one directory. `changed()` says whether a listed name changed since the last
    call; once the watch cannot tell any more, it says True at every call."""

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def open(cls, directory: Path) -> DirectoryWatch | None:
        """A watch on `directory`, or None where inotify is not available (not Linux, or the user's limit
        of inotify instances or watches reached): callers then scan at every listing."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        except (OSError, AttributeError):
            return None
        if fd < 0:
            _logger.info(
                "no inotify for %s (%s): every List scans the directory", directory, os.strerror(ctypes.get_errno())
            )
            return None
        if int(libc.inotify_add_watch(fd, os.fsencode(directory), _MASK)) < 0:
            _logger.info(
                "cannot watch %s (%s): every List scans the directory", directory, os.strerror(ctypes.get_errno())
            )
            os.close(fd)
            return None
        return cls(fd)

    def changed(self) -> bool:
        """Read every event queued so far; True when one is about a name List shows, when events were lost
        (the queue overflowed), or when the watch no longer works."""
        return self.changes() != set()

    def changes(self) -> set[str] | None:
        """Read every event queued so far: the names List shows that changed since the last call (empty when
        none did), or None when events were lost (the queue overflowed) or the watch no longer works, and
        only a scan of the whole directory can tell."""
        if self._fd < 0:
            return None
        names: set[str] | None = set()
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return names
            except OSError:
                self.close()
                return None
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0")
                offset = start + length
                if mask & _GONE:
                    self.close()
                    return None
                if mask & _IN_Q_OVERFLOW or not name:
                    names = None  # events lost, or one about the directory itself: scan it whole
                elif names is not None and not name.startswith(b"."):
                    names.add(os.fsdecode(name))

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
