"""The mvm guest agent: runs processes and touches files inside a sandbox.

Stdlib only (it runs on the guest's own Python, 3.11 or newer). The host talks
to it with the framed protocol of ``mvm.protocol`` over an inherited socket
(namespace backend) or a virtio-serial port (microVM); ``docs/protocol.md``
lists its operations and events.

Modules, one concern each:

* ``__main__``  – command line, PID-1 duty, signal handling
* ``server``    – connections, hello, request dispatch, worker pool
* ``transport`` – the inherited fd and the virtio-serial port (with reconnects)
* ``processes`` – ``proc.*``: spawning, the output pump, exit reporting
* ``reaper``    – the one place that waits for children
* ``keeper``    – PID 1 of a microVM: starts the agent again when it dies
* ``proctree``  – ``/proc`` walking: process families and race-free signalling
* ``files``     – ``fs.*``
* ``accounts``  – ``user=``: guest accounts, and file steps performed as one (forked child, fd passing)
* ``tcp``       – ``tcp.*``: loopback connections relayed as streams (port forwards, egress)
* ``system``    – ``agent.info``/``agent.configure``: clock, entropy, hostname, prctl
* ``errors``    – protocol error types and argument validation
"""

AGENT_VERSION = "1.1.0"
#: How many times PID 1 starts the agent again after it died (a microVM: the sandbox goes on,
#: the processes the dead agent ran are ended); the supervisor holds the guest to the same
#: bound. An agent that keeps dying ends the sandbox.
MAX_AGENT_RESTARTS = 3
