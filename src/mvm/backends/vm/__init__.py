"""The microVM backend: QEMU ``microvm``, a Debian cloud kernel, the agent on virtio-serial.

``VmBackend`` is the entry point; ``probe_accelerator()`` tells ``mvmctl doctor``
which accelerator VMs use and why (see ``accel``).
"""

from . import ready
from .accel import probe_accelerator
from .backend import VmBackend, VmInstance

__all__ = ["VmBackend", "VmInstance", "probe_accelerator", "ready"]
