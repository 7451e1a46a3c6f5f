"""Files that appear only once complete: write to a temporary name in the same folder, then rename."""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, *, fsync: bool = False):
    """Yield a temporary path (``.NAME.XXXX.tmpSUFFIX`` beside ``path``, same suffix, so writers that
    pick a format by suffix still work); once the block finishes it replaces ``path``. On an error
    the temporary file is removed and ``path`` is left as it was. The file gets the permissions a
    plain ``open`` would give (``mkstemp`` makes it private). Leftovers of a killed process match
    ``.*.tmp*``, which :class:`~fnevr.train.run_folder.RunFolder` cleans up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
