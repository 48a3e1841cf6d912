"""``--spawn-server``: run the upscaler daemon as a child process on a private ipc endpoint and always stop it.

The child gets its own session (a Ctrl-C in the terminal reaches the demo only, which then closes its upscaler session
before stopping the daemon in order) and, on Linux, a parent-death signal, so it cannot outlive a demo that is killed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from client_demo.config import DEFAULT_AUTO_BACKENDS
from upscaler_server import daemon_command, die_with_parent
from upscaler_server.client import UpscalerClient
from upscaler_server.errors import ConfigError, ServerUnavailableError
from upscaler_server.shm import SHM_DIR, pid_alive

__all__ = ["DaemonStartError", "SpawnedDaemon", "how_it_ended"]

READY_TIMEOUT = 120.0  # s: a cold torch import plus model warm-up on a busy 2-core machine
STOP_TIMEOUT = 15.0  # s to finish the running frame after SIGTERM before SIGKILL
_STOP_SLICE = 0.05  # s between looks at the demo's signals while it waits for the daemon to stop


class DaemonStartError(RuntimeError):
    """The spawned daemon exited or stayed silent before it was ready; the message holds its log's last lines."""


_FOLDER_PREFIX = "takdsr-demo-"
_AUTO_LOGGER = "upscaler_server.backends.auto"  # the daemon's logger of --backend auto's choices and warnings
_AUTO_LINE_MAX = 600  # characters of one of its messages shown: a compiler's error runs to pages
# a record of the daemon's log: "<date> <time>,<ms> <LEVEL> <logger>: <message>" (upscaler_server.__main__)
_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (?P<logger>\S+): (?P<message>.*)")
# what Python's warnings module writes straight to stderr, outside the log's records: the resource tracker's
# "UserWarning: ... leaked shared_memory objects" when the daemon was killed (it removes those segments itself)
_PYTHON_WARNING = re.compile(r"\S+:\d+: \w*Warning: ")


def _remove_folders_of_dead_demos() -> None:
    """A demo that could not clean up (SIGKILL; Xlib ends the process when the X connection is lost) leaves its
    private folder (the daemon's log and socket; the daemon itself dies with its parent): this user's folders whose
    demo is gone are removed."""
    for folder in pathlib.Path("/tmp").glob(f"{_FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(_FOLDER_PREFIX).split("-", 1)[0]
        with contextlib.suppress(OSError):
            if not pid.isdigit() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            if not pid_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


class SpawnedDaemon:
    """``python -m upscaler_server`` started by the demo. Use as a context manager: stopped on any exit."""

    def __init__(self, checkpoint: pathlib.Path | None = None, device: str = "auto",
                 endpoint: str | None = None, hurry: Callable[[], bool] = lambda: False, *, backend: str = "auto",
                 auto_backends: Sequence[str] = DEFAULT_AUTO_BACKENDS) -> None:
        """``hurry``: true once the demo was told to stop at once (a second signal); stop() then kills the daemon
        instead of waiting for it, whenever that second signal came. ``backend`` and, with auto, ``auto_backends``:
        the daemon's --backend and --auto-backends."""
        _remove_folders_of_dead_demos()
        self._hurry = hurry
        # short (ipc paths max ~100), and named by this process, so a later demo can tell it was left behind
        self._dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-", dir="/tmp"))
        self.endpoint = endpoint or f"ipc://{self._dir / 'upscaler.sock'}"
        self._shared_endpoint = endpoint is not None  # another daemon could already serve it
        self.log_path = self._dir / "daemon.log"
        args = ["--endpoint", self.endpoint, "--device", device, "--backend", backend]
        if backend == "auto":
            args += ["--auto-backends", ",".join(auto_backends)]
        if checkpoint is not None:
            args += ["--checkpoint", str(checkpoint)]
        self.command: Sequence[str] = daemon_command(args)  # this installation's packages, whatever the cwd holds
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> SpawnedDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, should_stop: Callable[[], bool] = lambda: False, timeout: float = READY_TIMEOUT) -> None:
        """Start the daemon and wait until it answers; DaemonStartError if it exits or stays silent, or if another
        daemon already answers on the endpoint (its answer would be taken for ours)."""
        if self._shared_endpoint and self._answers(timeout=0.5):
            raise DaemonStartError(f"another upscaler daemon already serves {self.endpoint}: drop --spawn-server to "
                                   "use it, or give --spawn-server another --endpoint")
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a chatty daemon must never block on us
            self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if should_stop():
                raise KeyboardInterrupt
            status = self.exit_status()
            if status is not None:
                raise DaemonStartError(f"the upscaler daemon {how_it_ended(status)} before it was ready:\n"
                                       f"{self.log_tail()}")
            if self._logged_ready() and self._answers(timeout=0.5):
                return
            time.sleep(0.05)  # the client fails at once while the daemon's socket file does not exist yet
        raise DaemonStartError(f"the upscaler daemon did not answer within {timeout:g} s:\n{self.log_tail()}")

    def _logged_ready(self) -> bool:
        """Whether the answer on the endpoint can be ours. On an --endpoint of the user's it can be another daemon's:
        one that a second demo started at the same moment, which answers while ours is still starting, and ours then
        finds the endpoint taken and exits. So there, ours must first have logged that it is ready, with its pid
        (the daemon's "upscaler ready: ... pid=N" line)."""
        if not self._shared_endpoint:
            return True
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return re.search(rf"upscaler ready: .* pid={self.pid}\b", log) is not None

    def _answers(self, timeout: float) -> bool:
        """Whether a daemon says hello on the endpoint within ``timeout`` seconds."""
        with contextlib.suppress(ServerUnavailableError, ConfigError):
            UpscalerClient(self.endpoint, timeout=timeout, retries=0, heartbeat=False, name="takdsr-demo").close()
            return True
        return False

    def exit_status(self) -> int | None:
        """The daemon's exit status once it has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def gone(self) -> str | None:
        """Why the daemon is no longer running ("was killed by signal 9 (SIGKILL)"), or None while it runs."""
        status = self.exit_status()
        return None if status is None else how_it_ended(status)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join("  | " + line for line in text.splitlines()[-lines:])

    def auto_backend_lines(self) -> list[str]:
        """What the daemon's --backend auto logged: its choice for each size ("auto backend for 320x180 on cpu:
        eager-bf16 (measured: ...)") and its warnings (a cache it cannot write, a candidate that cannot run)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        messages: list[str] = []
        ours = False  # whether the record the lines belong to is auto's
        for line in text.splitlines():
            record = _LOG_RECORD.match(line)
            if record is None and _PYTHON_WARNING.match(line):
                ours = False
            elif record is not None:
                ours = record["logger"] == _AUTO_LOGGER
                if ours:
                    messages.append(record["message"])
            elif ours and line.strip():  # a message of several lines (a compiler's error): kept on one
                messages[-1] += " | " + line.strip()
        return [m if len(m) <= _AUTO_LINE_MAX else m[:_AUTO_LINE_MAX - 4] + " ..." for m in messages]

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed; clear a dead daemon's shared memory; remove the private directory. A
        KeyboardInterrupt (the demo's second signal) during the wait kills the daemon at once, and the rest is still
        done before it goes on."""
        try:
            if self._proc is not None:
                self._end(self._proc)
                self._proc = None
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            if proc.poll() is None and not self._hurry():
                proc.terminate()
                # in slices: a second signal during the wait is only counted when the first came long before
                deadline = time.monotonic() + STOP_TIMEOUT
                while proc.poll() is None and time.monotonic() < deadline and not self._hurry():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(_STOP_SLICE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.returncode != 0:
                self._remove_segments(proc.pid)

    @staticmethod
    def _remove_segments(pid: int) -> None:
        """A daemon that was killed could not unlink its rings; it was ours, so its segments are ours to clear
        (named /takdsr-<uid>-<pid>-..., docs/protocol.md 6.1). Other daemons' segments are left alone."""
        if not SHM_DIR.is_dir():
            return
        for path in SHM_DIR.glob(f"takdsr-{os.geteuid()}-{pid}-*"):
            path.unlink(missing_ok=True)


def how_it_ended(status: int) -> str:
    """A process's end from Popen's returncode, whose negative values are signals ("exited with status -9")."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        return f"was killed by signal {-status}"
    return f"was killed by signal {-status} ({name})"
