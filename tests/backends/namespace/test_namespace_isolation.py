"""What a sandbox can see and do: host invisible, no capabilities, seccomp, uid mapping."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from nshelpers import Guest

from mvm.backends.namespace import seccomp


@pytest.fixture(scope="module")
def shared(request, template, tmp_path_factory):
    """One sandbox for the read-only checks of this module."""
    from mvm.backends.base import NetworkPolicy, Resources, SandboxSpec
    from mvm.backends.namespace import NamespaceBackend

    os.environ["MVM_NS_LEAK_CANARY"] = "host-secret-value"
    state = tmp_path_factory.mktemp("iso")
    inst = NamespaceBackend().create(SandboxSpec("isolation", template, Resources(), NetworkPolicy(), state / "sb"))
    try:
        guest = Guest(inst.start())
    except BaseException:
        inst.destroy()
        raise
    yield inst, guest
    guest.close()
    inst.destroy()
    os.environ.pop("MVM_NS_LEAK_CANARY", None)


def test_the_agent_answers_hello(shared):
    _inst, guest = shared
    assert guest.peer["kind"] == "hello"
    assert guest.peer["protocol"] == "mvm"


def test_host_files_are_invisible(shared):
    _, guest = shared
    res = guest.py(
        "import os; print(os.path.exists('/work'), os.path.exists('/work/main'), "
        "os.path.exists('/root/.mvm'), os.path.exists('/var/tmp/mvm-test-templates'), "
        "os.uname().nodename)"
    )
    assert res.exit_code == 0, res.err
    assert res.out.split() == ["False", "False", "False", "False", "sandbox"]


def test_host_processes_are_invisible(shared):
    _, guest = shared
    res = guest.py(
        "import os, json; pids = [int(p) for p in os.listdir('/proc') if p.isdigit()];"
        "print(json.dumps({p: open(f'/proc/{p}/cmdline','rb').read().decode(errors='replace') for p in pids}))"
    )
    assert res.exit_code == 0, res.err
    procs = json.loads(res.out)
    assert len(procs) <= 6, procs  # bwrap's init, the agent, this python (and the agent's helpers)
    assert all(int(pid) < 50 for pid in procs), procs
    assert not any("pytest" in cmd for cmd in procs.values())


def test_only_loopback_and_no_route_to_host_listeners(shared):
    _, guest = shared
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        res = guest.py(
            "import socket\n"
            "ifaces = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
            "print(ifaces)\n"
            "s = socket.socket(); s.settimeout(3)\n"
            f"try:\n    s.connect(('127.0.0.1', {port})); print('CONNECTED')\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n"
            "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=3); print('EGRESS')\n"
            "except OSError as e:\n    print('no-egress', e.errno)\n"
        )
    finally:
        listener.close()
    assert res.exit_code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0] == "['lo']"
    assert lines[1].startswith("refused")
    assert lines[2].startswith("no-egress")


def test_environment_does_not_leak(shared):
    _, guest = shared
    res = guest.run(["/bin/cat", "/proc/1/environ"])
    assert b"host-secret-value" not in res.stdout
    res = guest.py("import os; print(sorted(os.environ))")
    assert "MVM_NS_LEAK_CANARY" not in res.out


def test_only_account_capabilities_no_new_privs_seccomp_on(shared):
    """Sandbox root keeps only ACCOUNT_CAPS, and only when its uids are an unprivileged
    idmapped range (they then act on that range alone); otherwise it has none."""
    from mvm.backends.namespace.backend import ACCOUNT_CAPS

    inst, guest = shared
    res = guest.run(["/bin/cat", "/proc/self/status"])
    status = dict(line.split(":\t", 1) for line in res.out.splitlines() if ":\t" in line)
    bits = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}
    kept = sum(1 << bits[name] for name in ACCOUNT_CAPS) if inst.uid_mode == "idmapped" else 0
    for cap in ("CapPrm", "CapEff", "CapBnd"):
        assert int(status[cap].strip(), 16) == kept, (cap, status[cap])
    assert int(status["CapAmb"].strip(), 16) & ~kept == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"


SYSCALL_PROBE = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return (r, ctypes.get_errno())
out = {
    "unshare_user": call(272, 0x10000000),
    "unshare_net": call(272, 0x40000000),
    "setns": call(308, 0, 0),
    "mount": (libc.mount(b"none", b"/mnt", b"tmpfs", 0, None), ctypes.get_errno()),
    "keyctl": call(250, 0, 0),
    "add_key": call(248, 0, 0, 0, 0, 0),
    "bpf": call(321, 0, 0, 0),
    "perf_event_open": call(298, 0, 0, -1, -1, 0),
    "userfaultfd": call(323, 0),
    "io_uring_setup": call(425, 1, 0),
    "open_tree": call(428, -100, 0, 0),
    "clone_newuser": call(56, 0x10000000 | 17, 0, 0, 0, 0),
    "clone3": call(435, 0, 0),
    "personality_linux32": call(135, 8),
    "personality_query": call(135, 0xFFFFFFFF),
    "getpid": call(39),
}
print(json.dumps(out))
"""


def test_seccomp_denies_with_eperm(shared):
    _, guest = shared
    res = guest.py(SYSCALL_PROBE)
    assert res.exit_code == 0, res.err
    out = json.loads(res.out)
    eperm = 1
    for name in (
        "unshare_user",
        "unshare_net",
        "setns",
        "mount",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "open_tree",
        "clone_newuser",
        "personality_linux32",
    ):
        assert out[name] == [-1, eperm], (name, out[name])
    assert out["clone3"] == [-1, 38]  # ENOSYS: glibc falls back to clone, which we can inspect
    assert out["personality_query"][0] >= 0
    assert out["getpid"][0] > 0


def test_processes_still_fork_and_thread(shared):
    _, guest = shared
    res = guest.py(
        "import os, threading, subprocess\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "print(subprocess.run(['/bin/echo', 'child'], capture_output=True, text=True).stdout.strip())\n"
    )
    assert res.exit_code == 0, res.err
    assert res.out.strip() == "child"


@pytest.mark.parametrize(
    "name, code",
    [
        # i386 ABI via int 0x80: mov eax, 20 (getpid); int 0x80; ret
        ("i386", "b'\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3'"),
        # x32 ABI: syscall number with bit 30 set (mov eax, 0x40000027; syscall; ret)
        ("x32", "b'\\xb8\\x27\\x00\\x00\\x40\\x0f\\x05\\xc3'"),
    ],
)
def test_foreign_abis_kill_the_process(shared, name, code):
    _, guest = shared
    res = guest.py(
        "import ctypes, mmap\n"
        f"code = {code}\n"
        "buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "buf.write(code)\n"
        "addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))\n"
        "ctypes.CFUNCTYPE(ctypes.c_long)(addr)()\n"
        "print('survived')\n"
    )
    assert "survived" not in res.out
    assert res.signal == 31 or res.exit_code in (-31, 128 + 31), (name, res)  # SIGSYS


def test_sandbox_root_is_an_unprivileged_host_uid(shared):
    inst, guest = shared
    res = guest.sh("id -u; id -g; cat /proc/self/uid_map; touch /root/made-inside; echo ok")
    assert res.exit_code == 0, res.err
    lines = res.out.split("\n")
    assert lines[0] == "0" and lines[1] == "0"
    desc = inst.describe()
    assert desc["uid_map"]["mode"] == "idmapped"
    base = desc["uid_map"]["host_uid"]
    assert base >= 0x70000000
    assert lines[2].split() == ["0", str(base), "65536"]
    # seen from the host, every sandbox process runs as that uid
    for pid in inst.host_pids():
        uids = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")]
        assert uids[0].split()[1:] == [str(base)] * 4, (pid, uids)
    # and files it makes belong to it on the host
    made = inst.layer.upper / "root" / "made-inside"
    assert made.stat().st_uid == base


def test_sandbox_root_can_change_template_owned_files(shared, template):
    inst, guest = shared
    before = (template.rootfs / "etc" / "passwd").read_bytes()
    res = guest.sh("echo 'extra:x:1234:1234::/nonexistent:/bin/false' >> /etc/passwd && tail -1 /etc/passwd")
    assert res.exit_code == 0, res.err
    assert res.out.strip().startswith("extra:")
    assert (template.rootfs / "etc" / "passwd").read_bytes() == before
    assert (inst.layer.upper / "etc" / "passwd").read_bytes().endswith(b"extra:x:1234:1234::/nonexistent:/bin/false\n")


def test_describe_is_honest(shared):
    inst, _ = shared
    desc = inst.describe()
    assert desc["isolation"] == "namespace"
    assert desc["root"] == "overlay-image"
    assert desc["cgroup"] in ("v1", "v2")
    assert desc["seccomp"] is True
    assert desc["network"] == "loopback-only"
    assert any("kernel" in note for note in desc["notes"])


def test_seccomp_program_is_well_formed():
    program = seccomp.build_filter()
    assert len(program) % 8 == 0 and len(program) // 8 < 4096
    lines = seccomp.describe_program(program)
    assert lines[0].endswith("ld 0x4")  # arch first
    assert "jeq 0xc000003e" in lines[1]
    assert lines[-1].endswith(f"ret {seccomp.SECCOMP_RET_ALLOW:#x}")
    text = "\n".join(lines)
    for _name, (nr, _why) in seccomp.DENIED.items():
        assert f"jeq {nr:#x} ?" in text
    fd = seccomp.filter_fd()
    try:
        assert os.read(fd, 1 << 16) == program
        assert stat.S_ISREG(os.fstat(fd).st_mode) or stat.S_ISFIFO(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
