"""``MvmSandboxEnvironment``: one mvm sandbox per Inspect sample.

Inspect calls are async; the SDK is blocking and thread-safe, so each call runs on a
worker thread (``anyio.to_thread``). Every sandbox of a task carries the workload id
``inspect:<task>``: ``task_cleanup`` and ``inspect sandbox cleanup mvm`` find the
ones a crashed run left behind by it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

import anyio
from inspect_ai.util import (
    ExecResult,
    OutputLimitExceededError,
    SandboxEnvironment,
    SandboxEnvironmentConfigType,
    SandboxEnvironmentLimits,
    sandboxenv,
)
from pydantic import BaseModel, Field

from mvm import errors
from mvm.sdk.policy import network, resources
from mvm.sdk.sandbox import Sandbox
from mvm.spec import Resources

from ..common import DEFAULT_WORKDIR, EVAL_TEMPLATE, guest_path

WORKLOAD_PREFIX = "inspect:"
T = TypeVar("T")


class MvmResourcesConfig(BaseModel, frozen=True):
    """``resources(...)``: checked by mvm when a sandbox is made."""

    cpu_cores: float = Resources.cpu_cores
    memory_mb: int = Resources.memory_mb
    rootfs_size_mb: int = Resources.rootfs_size_mb
    max_processes: int = Resources.max_processes


class MvmNetworkConfig(BaseModel, frozen=True):
    """``network(...)``: ``deny`` (default), ``allow`` (egress to ``allow``'s host:port), ``open``."""

    mode: Literal["deny", "allow", "open"] = "deny"
    allow: list[str] = Field(default_factory=list)


class MvmSandboxConfig(BaseModel, frozen=True):
    """The ``mvm`` sandbox's configuration (``sandbox=("mvm", MvmSandboxConfig(...))``, or a
    ``.toml`` template path as the config string).

    ``template``: a catalog name or a custom template's TOML path (default: ``eval-tools``,
    python-3.13 plus adduser/passwd/procps). ``backend``: ``vm``, ``namespace`` or ``None``
    (``$MVM_BACKEND``, else the strongest this host runs). ``user``: the guest account that
    ``exec`` (unless a call names its own ``user``), ``read_file`` and ``write_file`` act as,
    with its permissions -- as Inspect's docker provider honours an image's user; ``None``:
    the template's default (root, or an OCI image's ``User``). ``sample_init`` creates it
    (``useradd --create-home``) when the template lacks it.
    ``workdir``: where relative paths and commands land (default: ``/root``, or the user's
    home); ``sample_init`` creates it, owned by ``user``, if it does not exist. ``ttl``:
    destroyed after it even if Inspect dies.
    """

    template: str = EVAL_TEMPLATE
    backend: Literal["vm", "namespace"] | None = None
    resources: MvmResourcesConfig = Field(default_factory=MvmResourcesConfig)
    network: MvmNetworkConfig = Field(default_factory=MvmNetworkConfig)
    user: str | None = None
    workdir: str | None = None
    ttl: str = "2h"


#: ``sample_init`` for a config with a ``user`` (``$1``) and maybe a ``workdir`` (``$2``), as root:
#: the account (created if the template lacks it), then the workdir (its home unless given;
#: created, owned by it, if missing), printed. One command: a TCG microVM pays per exec.
USER_SETUP = """set -e
id -u "$1" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$1"
workdir=${2:-$(getent passwd "$1" | cut -d: -f6)}
[ -d "$workdir" ] || { mkdir -p "$workdir"; chown "$1:" "$workdir"; }
printf %s "$workdir"
"""


def _config_of(config: SandboxEnvironmentConfigType | None) -> MvmSandboxConfig:
    if config is None:
        return MvmSandboxConfig()
    if isinstance(config, MvmSandboxConfig):
        return config
    if isinstance(config, str):
        return MvmSandboxConfig(template=config)
    raise errors.InvalidArgument(
        "config", f"{type(config).__name__} is not an mvm sandbox config", allowed="MvmSandboxConfig or a template"
    )


async def _off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@sandboxenv(name="mvm")
class MvmSandboxEnvironment(SandboxEnvironment):
    """An Inspect sandbox backed by one mvm sandbox (microVM or namespaces)."""

    def __init__(self, sandbox: Sandbox, workdir: str, user: str | None = None):
        super().__init__()
        self.sandbox = sandbox
        self.workdir = workdir
        self.user = user

    # ---- lifecycle ---------------------------------------------------------------

    @classmethod
    def config_deserialize(cls, config: dict[str, Any]) -> BaseModel:
        return MvmSandboxConfig(**config)

    @classmethod
    async def task_init(cls, task_name: str, config: SandboxEnvironmentConfigType | None) -> None:
        from mvm.templates import ensure_template

        await _off_loop(ensure_template, _config_of(config).template)  # build once, not per sample

    @classmethod
    async def sample_init(
        cls, task_name: str, config: SandboxEnvironmentConfigType | None, metadata: dict[str, str]
    ) -> dict[str, SandboxEnvironment]:
        settings = _config_of(config)
        sandbox = await _off_loop(
            Sandbox.create,
            settings.template,
            backend=settings.backend,
            ttl=settings.ttl,
            resources=resources(**settings.resources.model_dump()),
            network=network(settings.network.mode, list(settings.network.allow)),
            workload_id=WORKLOAD_PREFIX + task_name,
        )
        try:
            if settings.user is None:
                workdir = settings.workdir or DEFAULT_WORKDIR
                await _off_loop(sandbox.files.mkdir, workdir)
            else:
                setup = ["sh", "-c", USER_SETUP, "sh", settings.user, settings.workdir or ""]
                workdir = (await _off_loop(sandbox.commands.run, setup, user="root", check=True)).stdout
        except BaseException:
            await _off_loop(sandbox.kill)
            raise
        return {"default": cls(sandbox, workdir, settings.user)}

    @classmethod
    async def sample_cleanup(
        cls,
        task_name: str,
        config: SandboxEnvironmentConfigType | None,
        environments: dict[str, SandboxEnvironment],
        interrupted: bool,
    ) -> None:
        for environment in environments.values():
            if isinstance(environment, MvmSandboxEnvironment):
                await _off_loop(environment.sandbox.kill)

    @classmethod
    async def task_cleanup(cls, task_name: str, config: SandboxEnvironmentConfigType | None, cleanup: bool) -> None:
        if cleanup:
            await _off_loop(_kill_workloads, WORKLOAD_PREFIX + task_name)

    @classmethod
    async def cli_cleanup(cls, id: str | None) -> None:
        if id is not None:
            await _off_loop(lambda: Sandbox.connect(id).kill())
        else:
            await _off_loop(_kill_workloads, None)

    # ---- operations ----------------------------------------------------------------

    async def exec(
        self,
        cmd: list[str],
        input: str | bytes | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        user: str | None = None,
        timeout: int | None = None,
        timeout_retry: bool = True,
        concurrency: bool = True,
    ) -> ExecResult[str]:
        limit = SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE
        try:
            result = await _off_loop(
                self.sandbox.commands.run,
                list(cmd),
                stdin=input,
                cwd=guest_path(self.workdir, cwd or "."),
                env=env,
                user=user if user is not None else self.user,
                timeout_seconds=timeout,
                max_output_bytes=limit,
            )
        except errors.UserNotFound as exc:
            return ExecResult(success=False, returncode=1, stdout="", stderr=str(exc))  # as `su` would say
        except errors.FileNotFoundInSandbox as exc:
            if exc.path == cmd[0] or exc.details.get("field") == "argv":  # a missing program: a failed result
                return ExecResult(success=False, returncode=127, stdout="", stderr=str(exc))
            raise
        if result.truncated:
            raise OutputLimitExceededError(SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE_STR, result.stdout)
        code = result.exit_code if result.exit_code is not None else 1
        return ExecResult(success=code == 0, returncode=code, stdout=result.stdout, stderr=result.stderr)

    async def write_file(self, file: str, contents: str | bytes) -> None:
        await _off_loop(self.sandbox.files.write, guest_path(self.workdir, file), contents, user=self.user)

    @overload
    async def read_file(self, file: str, text: Literal[True] = True) -> str: ...

    @overload
    async def read_file(self, file: str, text: Literal[False]) -> bytes: ...

    async def read_file(self, file: str, text: bool = True) -> str | bytes:
        try:
            data: bytes = await _off_loop(
                self.sandbox.files.read,
                guest_path(self.workdir, file),
                max_bytes=SandboxEnvironmentLimits.MAX_READ_FILE_SIZE,
                user=self.user,
            )
        except errors.TooLarge:
            raise OutputLimitExceededError(SandboxEnvironmentLimits.MAX_READ_FILE_SIZE_STR, None) from None
        return data.decode("utf-8") if text else data


def _kill_workloads(workload_id: str | None) -> None:
    """Kill the adapter's sandboxes: those of one task, or (``None``) all of them."""
    for info in Sandbox.list():
        owner = info.workload_id or ""
        if owner == workload_id or (workload_id is None and owner.startswith(WORKLOAD_PREFIX)):
            try:
                Sandbox.connect(info.id).kill()
            except errors.SandboxNotFound:
                pass  # gone meanwhile
