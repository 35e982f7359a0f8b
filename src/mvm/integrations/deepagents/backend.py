"""``MvmSandboxBackend``: ``deepagents.backends.sandbox.BaseSandbox`` over one mvm sandbox.

``BaseSandbox`` builds ls/read/write/edit/grep/glob (and their async twins) on
``execute`` and the two batch file calls; this class supplies those over the public
SDK: ``Sandbox`` for the sync ones, ``AsyncSandbox`` (one connection per event loop)
for ``aexecute``/``aupload_files``/``adownload_files`` — no worker threads.
"""

from __future__ import annotations

import asyncio

from deepagents.backends.protocol import (
    ExecuteResponse,
    FileDownloadResponse,
    FileOperationError,
    FileUploadResponse,
)
from deepagents.backends.sandbox import BaseSandbox

from mvm import errors
from mvm.backends.base import NetworkPolicy, Resources
from mvm.sdk.async_sandbox import AsyncSandbox
from mvm.sdk.models import CommandResult
from mvm.sdk.sandbox import Sandbox

from ..common import EVAL_TEMPLATE

#: ``execute``'s default timeout (seconds) and combined-output cap.
DEFAULT_TIMEOUT_SECONDS = 30 * 60
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


class MvmSandboxBackend(BaseSandbox):
    """A Deep Agents sandbox backed by an mvm sandbox (microVM or namespaces)."""

    def __init__(self, sandbox: Sandbox, *, owned: bool = False, default_timeout: int = DEFAULT_TIMEOUT_SECONDS):
        self.sandbox = sandbox
        self._owned = owned
        self._default_timeout = default_timeout
        self._async: tuple[asyncio.AbstractEventLoop, AsyncSandbox] | None = None

    @classmethod
    def create(
        cls,
        template: str = EVAL_TEMPLATE,
        *,
        backend: str | None = None,
        resources: Resources | None = None,
        network: NetworkPolicy | None = None,
        ttl: str = "2h",
    ) -> MvmSandboxBackend:
        """A new sandbox this backend owns (``close()`` destroys it)."""
        sandbox = Sandbox.create(
            template, backend=backend, resources=resources, network=network, ttl=ttl, workload_id="deepagents"
        )
        return cls(sandbox, owned=True)

    def close(self) -> None:
        if self._owned:
            self.sandbox.kill()

    @property
    def id(self) -> str:
        return str(self.sandbox.id)

    def execute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        """Run ``command`` with ``/bin/sh -c``; stdout then stderr as ``output``."""
        try:
            result = self.sandbox.commands.run(
                command, timeout_seconds=self._timeout(timeout), max_output_bytes=MAX_OUTPUT_BYTES
            )
        except errors.CommandTimeout as exc:
            return _timed_out(exc)
        return _response(result)

    async def aexecute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        try:
            sandbox = await self._async_sandbox()
            result = await sandbox.commands.run(
                command, timeout_seconds=self._timeout(timeout), max_output_bytes=MAX_OUTPUT_BYTES
            )
        except errors.CommandTimeout as exc:
            return _timed_out(exc)
        return _response(result)

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        responses = []
        for path, content in files:
            try:
                self.sandbox.files.write(_absolute(path), content)
                responses.append(FileUploadResponse(path=path))
            except (errors.MvmError, _RelativePath) as exc:
                responses.append(FileUploadResponse(path=path, error=_error_code(exc)))
        return responses

    async def aupload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        sandbox = await self._async_sandbox()
        responses = []
        for path, content in files:
            try:
                await sandbox.files.write(_absolute(path), content)
                responses.append(FileUploadResponse(path=path))
            except (errors.MvmError, _RelativePath) as exc:
                responses.append(FileUploadResponse(path=path, error=_error_code(exc)))
        return responses

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        responses = []
        for path in paths:
            try:
                responses.append(FileDownloadResponse(path=path, content=self.sandbox.files.read(_absolute(path))))
            except (errors.MvmError, _RelativePath) as exc:
                responses.append(FileDownloadResponse(path=path, content=None, error=_error_code(exc)))
        return responses

    async def adownload_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        sandbox = await self._async_sandbox()
        responses = []
        for path in paths:
            try:
                content = await sandbox.files.read(_absolute(path))
                responses.append(FileDownloadResponse(path=path, content=content))
            except (errors.MvmError, _RelativePath) as exc:
                responses.append(FileDownloadResponse(path=path, content=None, error=_error_code(exc)))
        return responses

    def _timeout(self, timeout: int | None) -> int:
        return timeout if timeout is not None else self._default_timeout

    async def _async_sandbox(self) -> AsyncSandbox:
        """The same sandbox through ``AsyncSandbox``, connected once per event loop
        (a connection belongs to the loop that opened it)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (loop, await AsyncSandbox.connect(self.sandbox.id))
        return self._async[1]


def _response(result: CommandResult) -> ExecuteResponse:
    return ExecuteResponse(output=result.stdout + result.stderr, exit_code=result.exit_code, truncated=result.truncated)


def _timed_out(exc: errors.CommandTimeout) -> ExecuteResponse:
    return ExecuteResponse(output=exc.stdout + exc.stderr + f"\n[command timed out: {exc.message}]", exit_code=124)


class _RelativePath(ValueError):
    pass


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise _RelativePath(path)
    return path


def _error_code(exc: Exception) -> FileOperationError | str:
    """Deep Agents' per-file error codes; anything else is its own message."""
    if isinstance(exc, (_RelativePath, errors.InvalidArgument)):
        return "invalid_path"
    if isinstance(exc, FileNotFoundError):
        return "file_not_found"
    if isinstance(exc, PermissionError):
        return "permission_denied"
    if isinstance(exc, IsADirectoryError):
        return "is_directory"
    if isinstance(exc, NotADirectoryError):
        return "invalid_path"
    return str(exc)
