"""`python -m spillgate.fleet.child MODULE ARGS...`: run MODULE as a fleet child process.

`python -m spillgate.fleet.child --exec PROGRAM ARGS...` does the same for a binary (Envoy):
it arranges the parent-death signal, then execs PROGRAM in place (same pid, so the
supervisor's process handle and process group stay valid); the setting survives execve
for programs that are not set-user-ID.

The child asks the kernel to SIGKILL it when its parent (the supervisor) dies (Linux
PR_SET_PDEATHSIG), so nothing is left behind even when `spillgate up` itself is SIGKILLed.
Doing it here instead of in a Popen `preexec_fn` keeps the supervisor free of fork-time
code (unsafe once gRPC threads run). If the supervisor died before the call, the child exits.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PARENT_ENV = "SPILLGATE_FLEET_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Arrange SIGKILL on parent death; exit now if `parent` is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent and os.getppid() != parent:
        sys.exit(f"spillgate fleet child: supervisor {parent} is gone")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1:] == ["--exec"]:
        sys.exit("usage: python -m spillgate.fleet.child MODULE|--exec PROGRAM [ARGS...]")
    die_with_parent(int(os.environ.pop(PARENT_ENV, "0") or 0))
    if sys.argv[1] == "--exec":
        program = sys.argv[2]
        os.execv(program, [program, *sys.argv[3:]])
    module, args = sys.argv[1], sys.argv[2:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
