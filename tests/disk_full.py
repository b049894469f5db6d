"""Test helper (tests/test_eval.py): run a script whose writes to files named *$DISK_FULL fail with ENOSPC,
as on a full disk, to check that the failure is one line naming what could not be written."""
import builtins, errno, os, runpy, sys

real_open, suffix = builtins.open, os.environ['DISK_FULL']


class Full:
    def __init__(self, f):
        self.f = f

    def write(self, *a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def full_open(file, mode='r', *a, **k):
    f = real_open(file, mode, *a, **k)
    return Full(f) if str(file).endswith(suffix) and set(mode) & set('wa') else f


builtins.open = full_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
