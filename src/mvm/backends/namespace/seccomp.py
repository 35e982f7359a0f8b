"""The sandbox's seccomp filter: a classic-BPF deny-list, generated here with ``struct``.

Why not libseccomp (``pyseccomp``): it would add a runtime dependency (a ctypes
binding plus the C library) for ~100 instructions whose meaning we want to be able
to read. The program below is small, fixed and documented instruction by
instruction; ``describe_program()`` disassembles it for humans and tests.

Layout of the program (x86_64 only; every jump is forward and short)::

    0  ld  [arch]                       A = seccomp_data.arch
    1  jeq AUDIT_ARCH_X86_64 ? 3 : 2
    2  ret KILL_PROCESS                 i386 (int 0x80) and any other ABI: kill
    3  ld  [nr]                         A = seccomp_data.nr
    4  jge X32_SYSCALL_BIT ? 5 : 6
    5  ret KILL_PROCESS                 x32 ABI syscalls: kill
       -- for each denied syscall N (two instructions each):
       jeq N ? next : skip-one
       ret ERRNO(EPERM)
       -- clone: deny namespace-creating flags (no nested namespaces)
       jeq __NR_clone ? next : skip-block
       ld  [args[0] low 32 bits]
       jset CLONE_NEW* ? next : allow
       ret ERRNO(EPERM)
       ret ALLOW
       -- clone3: flags live in user memory BPF cannot read -> ENOSYS, libc falls back to clone
       -- ioctl: TIOCSTI / TIOCLINUX (terminal input injection) -> EPERM
       -- personality: only PER_LINUX (0) and the query 0xffffffff
       ret ALLOW

Everything not listed is allowed: capabilities are dropped (``--cap-drop ALL``),
no_new_privs is set by bwrap, and the namespaces do the rest; this list removes
kernel attack surface that a sandboxed program has no business touching.
"""

from __future__ import annotations

import errno
import os
import struct

# ---- constants from linux/{seccomp,filter,audit,sched}.h ----------------------

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
OFF_NR = 0
OFF_ARCH = 4


def OFF_ARG_LO(i: int) -> int:
    """Offset of the low 32 bits of ``args[i]`` (x86_64 is little-endian)."""
    return 16 + 8 * i


# classic BPF opcodes
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
#: every namespace flag clone(2) accepts (CLONE_NEWTIME only exists for unshare/clone3;
#: in clone(2)'s low byte 0x80 is part of the exit signal).
CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
PER_LINUX = 0x0
PERSONALITY_QUERY = 0xFFFFFFFF

#: x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl; a stable ABI).
NR_CLONE = 56
NR_IOCTL = 16
NR_PERSONALITY = 135
NR_CLONE3 = 435

#: Syscalls that return EPERM inside the sandbox, with the reason.
DENIED: dict[str, tuple[int, str]] = {
    # kernel keyrings are not namespaced
    "keyctl": (250, "keyrings are not namespaced"),
    "add_key": (248, "keyrings are not namespaced"),
    "request_key": (249, "keyrings are not namespaced"),
    # mounts and root changes (old and new mount API)
    "mount": (165, "no mounts"),
    "umount2": (166, "no mounts"),
    "pivot_root": (155, "no mounts"),
    "open_tree": (428, "no mounts (new mount API)"),
    "move_mount": (429, "no mounts (new mount API)"),
    "fsopen": (430, "no mounts (new mount API)"),
    "fsconfig": (431, "no mounts (new mount API)"),
    "fsmount": (432, "no mounts (new mount API)"),
    "fspick": (433, "no mounts (new mount API)"),
    "mount_setattr": (442, "no mounts (new mount API)"),
    "open_tree_attr": (467, "no mounts (new mount API)"),
    # whole-machine state
    "swapon": (167, "host swap"),
    "swapoff": (168, "host swap"),
    "reboot": (169, "host power"),
    "kexec_load": (246, "host kernel"),
    "kexec_file_load": (320, "host kernel"),
    "init_module": (175, "host kernel modules"),
    "finit_module": (313, "host kernel modules"),
    "delete_module": (176, "host kernel modules"),
    "acct": (163, "host process accounting"),
    "quotactl": (179, "host quotas"),
    "quotactl_fd": (443, "host quotas"),
    "settimeofday": (164, "host clock"),
    "clock_settime": (227, "host clock"),
    "clock_adjtime": (305, "host clock"),
    "adjtimex": (159, "host clock"),
    "syslog": (103, "host kernel log"),
    "vhangup": (153, "host terminals"),
    "iopl": (172, "raw I/O ports"),
    "ioperm": (173, "raw I/O ports"),
    "lookup_dcookie": (212, "profiling interface"),
    # large kernel attack surface
    "bpf": (321, "eBPF"),
    "perf_event_open": (298, "perf events"),
    "userfaultfd": (323, "used to widen kernel race windows"),
    "io_uring_setup": (425, "io_uring bypasses seccomp for its operations"),
    "io_uring_enter": (426, "io_uring bypasses seccomp for its operations"),
    "io_uring_register": (427, "io_uring bypasses seccomp for its operations"),
    "open_by_handle_at": (304, "file handles can escape the root"),
    "name_to_handle_at": (303, "file handles can escape the root"),
    "uselib": (134, "obsolete loader"),
    # no nested namespaces
    "unshare": (272, "no nested namespaces"),
    "setns": (308, "no nested namespaces"),
}

#: Decisions recorded for ``describe()``.
POLICY_NOTES = (
    "seccomp: deny-list returning EPERM for keyrings, mounts, kernel modules, kexec, reboot, swap, "
    "clock changes, syslog, bpf, perf_event_open, userfaultfd, io_uring, file handles, iopl/ioperm, "
    "acct, quotactl, unshare/setns and namespace flags of clone (clone3 -> ENOSYS); personality "
    "limited to PER_LINUX; TIOCSTI/TIOCLINUX refused; non-x86_64 ABIs (i386, x32) kill the process",
    "seccomp: ptrace is allowed (debuggers work; it only reaches processes of the same sandbox, "
    "kernels >= 4.8 re-check seccomp after a tracer changes a syscall)",
)


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, 0, 0, k & 0xFFFFFFFF)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    if not (0 <= jt <= 255 and 0 <= jf <= 255):
        raise ValueError("BPF jump offset out of range")
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def build_filter() -> bytes:
    """The filter as ``struct sock_filter[]`` bytes, what ``bwrap --seccomp FD`` reads."""
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    enosys = SECCOMP_RET_ERRNO | errno.ENOSYS
    prog = [
        _stmt(BPF_LD_W_ABS, OFF_ARCH),  # A = arch
        _jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),  # x86_64 -> skip the kill
        _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),  # any other ABI (i386 via int 0x80)
        _stmt(BPF_LD_W_ABS, OFF_NR),  # A = syscall number
        _jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),  # x32 numbers carry bit 30
        _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
    ]
    for nr, _why in DENIED.values():
        prog.append(_jump(BPF_JEQ_K, nr, 0, 1))  # this syscall? fall into the ret
        prog.append(_stmt(BPF_RET_K, eperm))
    # clone: refuse namespace flags; A is reloaded, so the block ends in a return
    prog += [
        _jump(BPF_JEQ_K, NR_CLONE, 0, 4),  # not clone -> skip the 4-instruction block
        _stmt(BPF_LD_W_ABS, OFF_ARG_LO(0)),  # A = flags (low 32 bits hold every CLONE_NEW*)
        _jump(BPF_JSET_K, CLONE_NAMESPACE_FLAGS, 0, 1),
        _stmt(BPF_RET_K, eperm),
        _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]
    # clone3: its flags are in a user-memory struct; ENOSYS makes glibc fall back to clone
    prog += [
        _jump(BPF_JEQ_K, NR_CLONE3, 0, 1),
        _stmt(BPF_RET_K, enosys),
    ]
    # ioctl: terminal input injection
    prog += [
        _jump(BPF_JEQ_K, NR_IOCTL, 0, 5),
        _stmt(BPF_LD_W_ABS, OFF_ARG_LO(1)),  # A = request (an unsigned int in the kernel)
        _jump(BPF_JEQ_K, TIOCSTI, 2, 0),
        _jump(BPF_JEQ_K, TIOCLINUX, 1, 0),
        _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
        _stmt(BPF_RET_K, eperm),
    ]
    # personality: only the default persona and the query
    prog += [
        _jump(BPF_JEQ_K, NR_PERSONALITY, 0, 5),
        _stmt(BPF_LD_W_ABS, OFF_ARG_LO(0)),
        _jump(BPF_JEQ_K, PER_LINUX, 2, 0),
        _jump(BPF_JEQ_K, PERSONALITY_QUERY, 1, 0),
        _stmt(BPF_RET_K, eperm),
        _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]
    prog.append(_stmt(BPF_RET_K, SECCOMP_RET_ALLOW))
    return b"".join(prog)


def describe_program(program: bytes | None = None) -> list[str]:
    """A readable disassembly (one line per instruction)."""
    program = build_filter() if program is None else program
    names = {0x20: "ld", 0x15: "jeq", 0x35: "jge", 0x45: "jset", 0x06: "ret"}
    lines = []
    for index in range(len(program) // 8):
        code, jt, jf, k = struct.unpack_from("=HBBI", program, index * 8)
        op = names.get(code, hex(code))
        if op == "ret" or op == "ld":
            lines.append(f"{index:3d} {op} {k:#x}")
        else:
            lines.append(f"{index:3d} {op} {k:#x} ? {index + 1 + jt} : {index + 1 + jf}")
    return lines


def filter_fd() -> int:
    """A readable fd positioned at the start of the program (a sealed memfd when possible)."""
    data = build_filter()
    try:
        fd = os.memfd_create("mvm-seccomp", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
    except (AttributeError, OSError):
        read_end, write_end = os.pipe()
        os.write(write_end, data)  # ~1 KiB: fits in the pipe buffer
        os.close(write_end)
        return read_end
    os.write(fd, data)
    try:
        import fcntl

        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        )
    except (AttributeError, OSError):
        pass
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
