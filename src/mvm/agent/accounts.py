"""Guest accounts: the ``user`` a request names, and acting as it.

* ``account`` resolves ``user`` (a name or a numeric uid) for every op that takes one
  (``proc.start``, the ``fs.*`` ops): an unknown one is ``UserNotFound``, defined here once.
  ``acting_account`` is the rule every such op follows, in one place: the request's
  ``user``, else the template's default user (an OCI image's ``User``), else the agent.
* ``credentials`` is what ``subprocess.Popen`` needs to run a process as an account.
* ``open_as`` / ``run_as`` perform the permission-relevant step of a file operation as an
  account: in a short-lived forked child that dropped to it (groups, gid, uid -- as a
  process started as it), so the kernel checks modes, ownership and search permissions
  as for that user. ``open_as`` hands the opened fd back over a socketpair (SCM_RIGHTS):
  the agent reads or writes it as usual. ``run_as`` brings back a small JSON result (a
  ``stat``, a listing page). An ``OSError`` or ``AgentError`` in the child is raised in
  the agent as it was, so callers map errors exactly as for their own calls.

No account (``None``) or the agent's own: the step runs right here, no fork.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import AgentError, Args

R = TypeVar("R")

#: The child only drops privileges, makes a few system calls and ``_exit``s: no lock another
#: thread may hold is touched, which is the deadlock Python 3.12+ warns about at every fork.
warnings.filterwarnings("ignore", message=r"This process .* is multi-threaded", category=DeprecationWarning)

#: Bytes of a child's answer read per ``recv`` (a listing page is at most ~48 KiB).
_ANSWER_CHUNK = 64 * 1024


def account(user: str | None) -> pwd.struct_passwd | None:
    """The guest account ``user`` names (a name or a numeric uid); unknown -> ``UserNotFound``."""
    if user is None:
        return None
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        if user.isdigit() and int(user) == os.getuid():
            return None  # the agent's own uid, also in an image whose /etc/passwd lacks it
        raise AgentError("UserNotFound", f"user: no user {user!r} in the guest (see /etc/passwd)",
                         field="user", user=user) from None


def acting_account(args: Args, default_user: str | None) -> pwd.struct_passwd | None:
    """The account an op acts as: its ``user`` if given (``root`` or ``0`` included), else
    ``default_user`` -- the image's ``User`` (``system.System.default_user``), so commands
    and files act as the same account unless a request names another. ``None``: the agent."""
    return account(args.string("user", max_length=256) or default_user)


def _is_self(who: pwd.struct_passwd | None) -> bool:
    return who is None or (who.pw_uid, who.pw_gid) == (os.getuid(), os.getgid())


def credentials(who: pwd.struct_passwd | None) -> dict[str, Any]:
    """Popen arguments that run the child as ``who`` with its groups (nothing for the agent's own)."""
    if who is None or _is_self(who):
        return {}
    result: dict[str, Any] = {"user": who.pw_uid, "group": who.pw_gid}
    if setgroups_allowed():
        result["extra_groups"] = os.getgrouplist(who.pw_name, who.pw_gid)
    return result


def setgroups_allowed() -> bool:
    """False in a user namespace whose ``setgroups`` is denied (the namespace backend's
    bubblewrap): there a child keeps the agent's (empty) supplementary groups."""
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() != "deny"
    except OSError:
        return True  # no user namespace: setgroups is allowed to root


def open_as(who: pwd.struct_passwd | None, path: str, flags: int, mode: int = 0o777) -> int:
    """``os.open`` with ``who``'s permissions; the fd is the agent's to use and close."""
    if _is_self(who):
        return os.open(path, flags, mode)
    _, fds = _in_child(who, lambda: (None, [os.open(path, flags | os.O_CLOEXEC, mode)]))
    return fds[0]


def run_as(who: pwd.struct_passwd | None, action: Callable[[], R]) -> R:
    """``action()`` with ``who``'s permissions; its result must be JSON (or ``None``)."""
    if _is_self(who):
        return action()
    value, _ = _in_child(who, lambda: (action(), []))
    return value  # type: ignore[no-any-return]


def _in_child(who: pwd.struct_passwd | None, action: Callable[[], tuple[Any, list[int]]]) -> tuple[Any, list[int]]:
    """Fork, drop to ``who`` in the child, run ``action`` there and bring back its answer.

    The child is not waited for here: the reaper collects every child of the agent (an
    unknown pid is simply reaped), and the answer's end of file says the child is done."""
    assert who is not None
    groups = os.getgrouplist(who.pw_name, who.pw_gid) if setgroups_allowed() else None  # NSS: in the agent
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            ours.close()
            _child(theirs, who, groups, action)
        theirs.close()
        message, fds = _answer(ours)
    finally:
        ours.close()
        theirs.close()
    if not message:
        for fd in fds:
            os.close(fd)
        raise AgentError("Internal", f"the helper acting as user {who.pw_name!r} ended without an answer",
                         user=who.pw_name)
    answer = json.loads(message)
    if "os_error" in answer:
        code, reason, filename = answer["os_error"]
        raise OSError(code, reason, filename)
    if "agent_error" in answer:
        error_type, text, details = answer["agent_error"]
        raise AgentError(error_type, text, **details)
    return answer["value"], fds


def _answer(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, _flags, _address = socket.recv_fds(sock, _ANSWER_CHUNK, 1)
    parts = [data]
    while data:
        data = sock.recv(_ANSWER_CHUNK)
        parts.append(data)
    return b"".join(parts), fds


def _child(sock: socket.socket, who: pwd.struct_passwd, groups: list[int] | None,
           action: Callable[[], tuple[Any, list[int]]]) -> None:
    try:
        fds: list[int] = []
        try:
            if groups is not None:
                os.setgroups(groups)
            os.setresgid(who.pw_gid, who.pw_gid, who.pw_gid)
            os.setresuid(who.pw_uid, who.pw_uid, who.pw_uid)
            value, fds = action()
            answer: dict[str, Any] = {"value": value}
        except AgentError as exc:
            answer = {"agent_error": [exc.type, exc.message, exc.details]}
        except OSError as exc:
            filename = os.fsdecode(exc.filename) if exc.filename is not None else None
            answer = {"os_error": [exc.errno, exc.strerror, filename]}
        message = json.dumps(answer).encode()
        sent = socket.send_fds(sock, [message], fds)
        sock.sendall(message[sent:])
    finally:
        os._exit(0)
