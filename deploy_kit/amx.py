"""Timing INT8 kernels as a phone runs them, on an x86 server with Intel AMX.

On hosts with AMX-INT8 (Xeon Sapphire Rapids and later) XNNPACK sends INT8 convolutions to AMX tile
kernels. At batch 1 on small CNNs they cost a fixed ~5 µs per layer whatever the channel count, so
pruning hardly moves the time: CIFAR-10 VGG16-0.25 in LiteRT INT8, 1 thread, read 0.123 / 0.107 /
0.105 ms at keep 1 / 0.5 / 0.25 with AMX and 0.102 / 0.040 / 0.027 ms without it on the same host
(benchmarks/prune.md, session 15). No phone has AMX: a latency table timed with it prices channels
for a machine the model will not run on.

Linux hands AMX's tile state to a process only on request (arch_prctl(ARCH_REQ_XCOMP_PERM), kernel
5.16+); XNNPACK asks when it starts and falls back to its AVX-512 VNNI kernels when refused.
`refuse()` installs a seccomp filter that answers that one request with EPERM. It cannot be
removed, so it goes only into the fresh process that times (deploy_kit/worker.py). Eight BPF
instructions through prctl: libseccomp's Python bindings would need the system's libseccomp for the
same.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import platform
import struct
import sys
from pathlib import Path

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000


def applicable() -> bool:
    """Linux on x86-64: the only place AMX permission exists to be refused."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


@functools.cache  # read once: mode() asks on every cache key, record and report line
def host_has_amx() -> bool:
    if not applicable():
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_int8" in flags


def mode(allow: bool) -> str:
    """What a timing with AMX allowed (or not) measures on this host: used, refused or absent."""
    return "absent" if not host_has_amx() else "used" if allow else "refused"


def _filter() -> bytes:
    def ins(code: int, jt: int, jf: int, k: int) -> bytes:  # struct sock_filter
        return struct.pack("HBBI", code, jt, jf, k)

    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K; offsets in seccomp_data
    return b"".join([
        ins(ld, 0, 0, 4), ins(jeq, 0, 5, AUDIT_ARCH_X86_64),    # arch
        ins(ld, 0, 0, 0), ins(jeq, 0, 3, SYS_ARCH_PRCTL),       # syscall number
        ins(ld, 0, 0, 16), ins(jeq, 0, 1, ARCH_REQ_XCOMP_PERM),  # args[0]
        ins(ret, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
        ins(ret, 0, 0, SECCOMP_RET_ALLOW),
    ])


def refuse() -> str | None:
    """Refuse AMX to this process from now on; None when done, else why it could not be."""
    if not applicable():
        return f"no AMX permission to refuse on {sys.platform}/{platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    prog = ctypes.create_string_buffer(_filter())

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog.raw) // 8, ctypes.cast(prog, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return f"seccomp filter refused: {errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())}"
    return None


def probe() -> int:
    """Ask for AMX's tile state as XNNPACK does: 0 when granted, else the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 else ctypes.get_errno()
