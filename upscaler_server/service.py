"""Readiness for a service manager: systemd's notification protocol (sd_notify(3)) without libsystemd.

Under a unit with ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` to a datagram socket and waits for ``READY=1``
before it counts the daemon as started (so units ordered after it, e.g. a game server, start once the endpoint is
bound, not when the process is forked) and shows ``STATUS=`` in ``systemctl status``. Without the variable nothing
is sent. A message that cannot be sent is logged, never fatal: serving matters more than the report of it.

With ``WatchdogSec=`` in the unit, systemd also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and expects
``WATCHDOG=1`` more often than that; when none comes it kills the daemon (SIGABRT), and ``Restart=on-failure`` starts
a new one. :func:`watchdog_timeout` reads that setting; the server decides when the daemon counts as alive.

A start that measures backends (``--tune-sizes``) may take minutes, past systemd's start timeout (90 s by default):
:func:`still_starting` asks for more time before each measurement, so the unit needs no ``TimeoutStartSec=``.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["NOTIFY_ENV", "START_STEP_S", "notify", "still_starting", "watchdog_timeout"]

log = logging.getLogger("upscaler_server")

NOTIFY_ENV = "NOTIFY_SOCKET"
# what one backend measured at start-up may take (a TensorRT engine build takes minutes); a step that hangs longer
# than this is stopped by systemd, as a start past TimeoutStartSec= is
START_STEP_S = 600


def notify(*assignments: str) -> None:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``), one per line, to ``$NOTIFY_SOCKET`` when it is set."""
    address = os.environ.get(NOTIFY_ENV)
    if not address:
        return
    if address.startswith("@"):  # Linux's abstract namespace, written with a leading NUL on the wire
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:  # a path of another kind (systemd's vsock: addresses), or the manager gone
        log.warning("cannot notify the service manager at $%s=%s: %s", NOTIFY_ENV, os.environ[NOTIFY_ENV], exc)


def still_starting(what: str) -> None:
    """Tell the service manager the start goes on with ``what`` (``"eager-bf16 at 640x360, 2 of 3"``): it then waits
    START_STEP_S more for the next message (``EXTEND_TIMEOUT_USEC``, systemd 236 and newer), and ``systemctl
    status`` shows the step. Nothing is sent without ``$NOTIFY_SOCKET``."""
    notify(f"EXTEND_TIMEOUT_USEC={START_STEP_S * 1_000_000}", f"STATUS=starting: measuring backend {what}")


def watchdog_timeout() -> float | None:
    """The service manager's watchdog timeout in seconds (``$WATCHDOG_USEC``), or None when there is none, when
    ``$WATCHDOG_PID`` names another process (a child that inherited the variables), or when the value is no positive
    number of microseconds (logged: the unit's watchdog would then kill a healthy daemon)."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not os.environ.get(NOTIFY_ENV):
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    if not (usec.isascii() and usec.isdigit()) or int(usec) == 0:
        log.warning("ignoring $WATCHDOG_USEC=%s: not a positive number of microseconds; no watchdog pings are sent",
                    usec[:40])
        return None
    return int(usec) / 1e6
