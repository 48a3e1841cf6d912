"""client_demo window mode under Xvfb: frames, the Dear ImGui HUD and a programmatic F12 screenshot."""

from __future__ import annotations

import ast
import pathlib
import re
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from demo_utils import demo_command, output_of, read_png, run_demo
from server_utils import Daemon, run_server

LR_ARG = "96x54"
WINDOW = (960, 540)  # the HR size (192x108) x5: at least 1280 wide as far as the tests' 1024x768 Xvfb screen allows


@pytest.fixture(scope="module")
def nearest_daemon() -> Iterator[Daemon]:
    with run_server("--backend", "nearest") as daemon:
        yield daemon


def _screenshot(folder: pathlib.Path) -> pathlib.Path:
    shots = sorted(folder.glob("takdsr-demo-*.png"))
    assert len(shots) == 1, f"expected one screenshot in {folder}, found {shots}"
    return shots[0]


def _counts(stdout: str) -> tuple[int, int]:
    match = re.search(r"(\d+) frames shown.*?, (\d+) upscaled", stdout)
    assert match, stdout
    return int(match.group(1)), int(match.group(2))


def test_window_shows_upscaled_frames_and_saves_a_screenshot(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    result = run_demo("--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--scene", "arena",
                      "--screenshot-after", "50", "--exit-after", "60", "--out", str(tmp_path), xvfb=True)
    assert result.returncode == 0, output_of(result)
    shown, upscaled = _counts(result.stdout)
    assert shown == 60 and upscaled >= 1, output_of(result)
    done = re.search(r"client_demo: the daemon since it started: (\d+) frame\(s\) done, 0 failed", result.stdout)
    assert done and int(done.group(1)) >= upscaled, output_of(result)  # the module's daemon: earlier tests' too
    image = read_png(_screenshot(tmp_path))
    assert image.shape == (WINDOW[1], WINDOW[0], 3)
    assert image.mean() > 10 and image.std() > 5, "the screenshot should show the scene and the HUD, not black"


def test_window_stays_responsive_without_a_daemon(tmp_path: pathlib.Path) -> None:
    """No daemon at the endpoint: the window keeps drawing (bilinear and a message) and quits normally."""
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    result = run_demo("--endpoint", endpoint, "--lr", LR_ARG, "--screenshot-after", "40", "--exit-after", "45",
                      "--out", str(tmp_path), xvfb=True)
    assert result.returncode == 0, output_of(result)
    assert _counts(result.stdout) == (45, 0)
    assert "the daemon since it started" not in result.stdout
    assert read_png(_screenshot(tmp_path)).mean() > 10


def test_no_display_exits_5_before_a_daemon_is_spawned(tmp_path: pathlib.Path) -> None:
    """Window mode without a display used to start the daemon (seconds of start-up), then find it cannot open a
    window and stop it again: the display is checked first, and glfw's reason goes into the one message."""
    result = run_demo("--spawn-server", "--device", "cpu", "--endpoint", f"ipc://{tmp_path}/d.sock", "--lr", LR_ARG)
    assert result.returncode == 5, output_of(result)
    assert "cannot open an OpenGL 3.3 window" in result.stderr and "DISPLAY" in result.stderr, output_of(result)
    assert "starting the upscaler daemon" not in result.stderr, output_of(result)
    assert "GLFWError" not in result.stderr and "Traceback" not in result.stderr, output_of(result)
    assert list(tmp_path.iterdir()) == []


def test_a_screenshot_that_cannot_be_written_is_reported_and_the_demo_goes_on(nearest_daemon: Daemon,
                                                                              tmp_path: pathlib.Path) -> None:
    """An --out where no file can be made is refused at the start (status 2, before any window or daemon). One that
    stops taking files during the run (the start's check passed over here) is reported at the screenshot, and the
    demo goes on."""
    args = ["--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--screenshot-after", "5", "--exit-after", "10",
            "--out", "/proc"]  # /proc takes no files, even from root
    refused = run_demo(*args, xvfb=True)
    assert refused.returncode == 2, output_of(refused)
    assert "client_demo: --out: no screenshot could be saved: cannot write into /proc" in refused.stderr
    script = tmp_path / "unchecked.py"
    script.write_text("import sys\nfrom client_demo import cli\ncli._screenshot_folder_problem = lambda cfg: None\n"
                      "sys.exit(cli.main(sys.argv[1:]))\n")
    result = run_demo(command=[*demo_command(xvfb=True)[:-3], sys.executable, str(script), *args])
    assert result.returncode == 0, output_of(result)
    assert "no screenshot: cannot write /proc/takdsr-demo-" in result.stderr, output_of(result)
    assert _counts(result.stdout)[0] == 10


# Runs the demo with glfw reporting a minimised window (0x0, as on Windows) for frames 10-29, the left button held
# near x=0 from frame 12: the divider drag divided by the picture's width, 0.
_MINIMISED = """
import sys
import glfw
from imgui_bundle import imgui
from client_demo import cli, window

count = [0]
sizes = {name: getattr(glfw, name) for name in ("get_framebuffer_size", "get_window_size")}
for name, real in sizes.items():
    setattr(glfw, name, lambda w, real=real: (0, 0) if 10 <= count[0] < 30 else real(w))
original = window._WindowDemo._frame

def frame(self, dt, deadline):
    count[0] += 1
    io = imgui.get_io()
    io.add_mouse_pos_event(2.0, 2.0)
    if count[0] >= 12:
        io.add_mouse_button_event(0, True)
    original(self, dt, deadline)

window._WindowDemo._frame = frame
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_minimised_window_neither_crashes_nor_stops_the_link(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    script = tmp_path / "minimised.py"
    script.write_text(_MINIMISED)
    args = ["--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--view", "split", "--screenshot-after", "20",
            "--exit-after", "60", "--out", str(tmp_path)]
    command = [*demo_command(xvfb=True)[:-3], sys.executable, str(script), *args]
    result = run_demo(command=command)
    assert result.returncode == 0, output_of(result)
    shown, upscaled = _counts(result.stdout)
    assert shown == 60 and upscaled >= 1, output_of(result)


_SHRUNK = """
import sys
import glfw
from imgui_bundle import imgui
from client_demo import cli, hud, window

count, positions = [0], []
original_frame, original_numbers = window._WindowDemo._frame, hud.Hud._numbers

def frame(self, dt, deadline):
    count[0] += 1
    if count[0] in (10, 12, 14):  # a window shrunk to a few pixels (as a user's drag or xdotool can), then back
        glfw.set_window_size(self.window, *{10: (3, 3), 12: (5, 900), 14: (1280, 720)}[count[0]])
    original_frame(self, dt, deadline)

def numbers(self, info):
    position = imgui.get_window_pos()
    positions.append((count[0], position.x, position.y))
    original_numbers(self, info)

window._WindowDemo._frame, hud.Hud._numbers = frame, numbers
status = cli.main(sys.argv[1:])
print("hud at", [p for p in positions if p[0] >= 20][-1])
sys.exit(status)
"""


def test_the_hud_comes_back_inside_after_the_window_was_shrunk_to_a_few_pixels(nearest_daemon: Daemon,
                                                                                tmp_path: pathlib.Path) -> None:
    """Reproduced in a review: after the window was made a few pixels small and then large again, the HUD's title
    bar (its drag handle) stayed off screen for good."""
    script = tmp_path / "shrunk.py"
    script.write_text(_SHRUNK)
    args = ["--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--exit-after", "40", "--out", str(tmp_path)]
    result = run_demo(command=[*demo_command(xvfb=True)[:-3], sys.executable, str(script), *args])
    assert result.returncode == 0, output_of(result)
    _, x, y = ast.literal_eval(result.stdout.split("hud at ")[-1].strip())
    assert x >= 0 and y >= 0, output_of(result)


@pytest.mark.parametrize("headless", [False, True], ids=["window", "headless"])
def test_frames_larger_than_opengl_draws_are_refused_in_words(nearest_daemon: Daemon, tmp_path: pathlib.Path,
                                                              headless: bool) -> None:
    """--lr 8200x10 at x2 is 16400 px wide, past llvmpipe's 16384: a moderngl traceback and exit 1."""
    mode = ["--headless", "--frames", "1"] if headless else ["--exit-after", "5"]
    result = run_demo("--endpoint", nearest_daemon.endpoint, "--lr", "8200x10", *mode, "--out", str(tmp_path),
                      xvfb=not headless)
    assert result.returncode == 2, output_of(result)
    assert "makes 16400x20 frames; this OpenGL draws at most" in result.stderr and "Traceback" not in result.stderr


def test_the_status_says_reconnecting_while_an_attempt_is_under_way() -> None:
    """It read "retrying in 0 s" for seconds while a hello waited for a stalled daemon."""
    from client_demo.link import LinkState
    from client_demo.window import _WindowDemo

    demo = object.__new__(_WindowDemo)
    demo.watch = lambda: None
    demo.link = SimpleNamespace(state=LinkState.RETRYING, retry_at=time.monotonic() - 1.0, reason="no reply")
    assert demo._status()[0] == "upscaler unavailable - reconnecting..."
    demo.link.retry_at = time.monotonic() + 0.3
    assert demo._status()[0] == "upscaler unavailable - retrying in 1 s"


def test_the_status_agrees_with_the_banner_while_frames_are_overdue() -> None:
    """With the daemon stalled the banner said "waiting for the upscaler: no frame for 8 s" while the HUD's status
    stayed a green "connected"."""
    from client_demo.link import LinkState
    from client_demo.window import _WindowDemo

    demo = object.__new__(_WindowDemo)
    demo.watch, demo._shown = lambda: None, True
    demo.link = SimpleNamespace(state=LinkState.READY, waiting=lambda: 8.2)
    demo._stalled = lambda: True
    assert demo._status() == ("connected - no frame for 8 s", "the daemon may be stalled or overloaded", False)
    demo._stalled = lambda: False
    assert demo._status() == ("connected", "", True)


def test_the_first_frame_of_a_connection_is_awaited_not_called_a_stall() -> None:
    """While a new size warmed up in the daemon (auto's measuring: 18 s at 1280x720 on a CPU), the banner said "no
    frame for N s" and the HUD, in red, "the daemon may be stalled or overloaded", although the link waits for
    that first frame up to 120 s (or twice --timeout, if longer) before it gives it up."""
    from client_demo.link import LinkState
    from client_demo.window import _WindowDemo

    demo = object.__new__(_WindowDemo)
    demo.watch, demo._shown, demo._stalled = (lambda: None), None, (lambda: True)
    demo.cfg = SimpleNamespace(timeout=10.0)
    demo.link = SimpleNamespace(state=LinkState.READY, waiting=lambda: 17.6)
    assert demo._status() == ("connected - waiting for the first frame (18 s)",
                              "a new size is prepared first; given up after 120 s", True)
    assert demo._waiting_for() == "waiting for the upscaler's first frame: 18 s (the daemon prepares this size)"
    demo.cfg.timeout = 90.0
    assert demo._status()[1] == "a new size is prepared first; given up after 180 s"
    demo._shown = True  # a frame has come back on this connection: a wait now is a stall
    assert demo._status() == ("connected - no frame for 18 s", "the daemon may be stalled or overloaded", False)
    assert demo._waiting_for() == "waiting for the upscaler: no frame for 18 s"


def test_a_frame_waits_for_upscaled_frames_only_as_long_as_drawing_leaves_room() -> None:
    """Waiting to the deadline and then drawing ran the window at 11 fps for --max-fps 15 whenever no upscaled frame
    came back (a review)."""
    from client_demo.window import poll_timeout, smoothed

    assert poll_timeout(deadline=10.0, now=9.95, drawing_s=0.02) == pytest.approx(0.03)
    assert poll_timeout(deadline=10.0, now=9.99, drawing_s=0.02) == 0.0  # late already: poll without waiting
    assert smoothed(0.0, 0.02) == 0.02  # the first sample taken whole
    assert smoothed(0.02, 0.04) == pytest.approx(0.024)


def test_the_banner_keeps_clear_of_the_hud() -> None:
    """Centred in a 1280x720 window, it covered the HUD's bottom rows (its "Keys" header)."""
    from client_demo.hud import banner_top

    span, text_height = (400.0, 880.0), 13.0
    assert banner_top(720, span, text_height, None) == pytest.approx(353.5)
    assert banner_top(720, span, text_height, (8, 8, 600, 430)) == 446  # below the HUD it would cover
    assert banner_top(720, span, text_height, (8, 8, 360, 430)) == pytest.approx(353.5)  # beside it: clear already
    assert banner_top(440, span, text_height, (8, 8, 600, 430)) == pytest.approx(213.5)  # no room below: the middle


_POPUP_AND_ICONIFIED = """
import sys
import glfw
from imgui_bundle import imgui
from client_demo import cli, hud, window

count, drawn, widths = [0], [0], []
real_imgui, real_attrib = window.imgui, glfw.get_window_attrib


class _OpenPopup:
    '''imgui, with a popup (the view or scene list) open from frame 10 on.'''

    def __getattr__(self, name):
        return getattr(real_imgui, name)

    def is_popup_open(self, *args):
        return count[0] >= 10


def attrib(window_, name):
    return 1 if name == glfw.ICONIFIED and 20 <= count[0] < 40 else real_attrib(window_, name)


original_frame, original_draw = window._WindowDemo._frame, hud.Hud.draw

def frame(self, dt, deadline):
    count[0] += 1
    if sys.argv[1] == "popup" and count[0] in (12, 13):  # Esc pressed, then released, while the popup is open
        real_imgui.get_io().add_key_event(real_imgui.Key.escape, count[0] == 12)
    original_frame(self, dt, deadline)

def draw(self, info, ui, rig):
    drawn[0] += 1
    info.model = "rlfn student 52ch x1 block (student_native) x2 (cpu, fp32), a long model line"
    shot = original_draw(self, info, ui, rig)
    widths.append(self._hud_rect[2] - self._hud_rect[0])
    return shot

if sys.argv[1] == "popup":
    window.imgui = _OpenPopup()
else:
    glfw.get_window_attrib = attrib
window._WindowDemo._frame, hud.Hud.draw = frame, draw
status = cli.main(sys.argv[2:])
print("hud drawn", drawn[0], "widest", max(widths))
sys.exit(status)
"""


@pytest.mark.parametrize("case", ["popup", "iconified"])
def test_an_open_popup_takes_esc_and_a_minimised_window_draws_nothing(nearest_daemon: Daemon, tmp_path: pathlib.Path,
                                                                      case: str) -> None:
    """From a review: Esc meant to close the scene list quit the demo; on X11 a minimised window keeps its
    framebuffer size, so it rendered and upscaled on; one long model line made the HUD about 600 px wide."""
    script = tmp_path / "popup_and_iconified.py"
    script.write_text(_POPUP_AND_ICONIFIED)
    args = ["--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--exit-after", "50", "--out", str(tmp_path)]
    result = run_demo(command=[*demo_command(xvfb=True)[:-3], sys.executable, str(script), case, *args])
    assert result.returncode == 0, output_of(result)
    assert _counts(result.stdout)[0] == 50, output_of(result)  # Esc did not end it at frame 12
    drawn, widest = (float(word) for word in result.stdout.split("hud drawn ")[-1].split(" widest "))
    assert drawn == (30 if case == "iconified" else 50), output_of(result)
    assert widest < 420, output_of(result)


_ESC_CLOSES_A_LIST = """
import sys
import scenes
from client_demo import cli, hud, window

count, combos, seen = [0], {}, []
real_imgui = hud.imgui


class _Recording:
    '''imgui, noting where the HUD's drop-down lists are (window coordinates, as the mouse's).'''

    def __getattr__(self, name):
        return getattr(real_imgui, name)

    def begin_combo(self, label, preview, flags=0):
        opened = real_imgui.begin_combo(label, preview, flags)
        low, high = real_imgui.get_item_rect_min(), real_imgui.get_item_rect_max()
        combos[label] = ((low.x + high.x) / 2, (low.y + high.y) / 2)
        return opened

    def selectable(self, label, selected, *args):
        picked = real_imgui.selectable(label, selected, *args)
        low, high = real_imgui.get_item_rect_min(), real_imgui.get_item_rect_max()
        combos[label] = ((low.x + high.x) / 2, (low.y + high.y) / 2)
        return picked


original_frame = window._WindowDemo._frame

def frame(self, dt, deadline):
    count[0] += 1
    io = real_imgui.get_io()
    if count[0] == 10:  # a click on the scene list opens it
        io.add_mouse_pos_event(*combos["scene"])
        io.add_mouse_button_event(0, True)
    elif count[0] == 11:
        io.add_mouse_button_event(0, False)
    elif count[0] in (20, 21):  # Esc pressed, then released
        io.add_key_event(real_imgui.Key.escape, count[0] == 20)
    elif count[0] in (30, 34):  # open it again, and pick the last scene
        io.add_mouse_pos_event(*combos["scene" if count[0] == 30 else scenes.PRESETS[-1]])
        io.add_mouse_button_event(0, True)
    elif count[0] in (31, 35):
        io.add_mouse_button_event(0, False)
    original_frame(self, dt, deadline)
    if count[0] in (18, 28):
        seen.append(real_imgui.is_popup_open("", real_imgui.PopupFlags_.any_popup_id))
    if count[0] == 38:
        seen.append(self.rig.preset == scenes.PRESETS[-1])

hud.imgui = _Recording()
window._WindowDemo._frame = frame
status = cli.main(sys.argv[1:])
print("list open before and after Esc, then the last scene picked:", seen)
sys.exit(status)
"""


def test_esc_closes_an_open_list_of_the_hud_and_does_not_quit(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """From a review: with the view or scene list open, Esc neither closed it (Dear ImGui closes a popup on Esc only
    with keyboard navigation on) nor quit the demo, so only a click outside it got the keys back. A click on an
    item still picks it."""
    script = tmp_path / "esc_list.py"
    script.write_text(_ESC_CLOSES_A_LIST)
    args = ["--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--exit-after", "40", "--out", str(tmp_path)]
    result = run_demo(command=[*demo_command(xvfb=True)[:-3], sys.executable, str(script), *args])
    assert result.returncode == 0, output_of(result)
    assert "list open before and after Esc, then the last scene picked: [True, False, True]" in result.stdout, \
        output_of(result)
    assert _counts(result.stdout)[0] == 40, output_of(result)  # the Esc that closed the list did not quit


_VIEWS_WITHOUT_SR = """
import sys
from imgui_bundle import imgui
from client_demo import cli, link, window

count, submitted = [0], []
original_frame, original_submit = window._WindowDemo._frame, link.UpscaleLink.submit

def frame(self, dt, deadline):
    count[0] += 1
    if count[0] in (20, 21):  # V pressed, then released: native -> split
        imgui.get_io().add_key_event(imgui.Key.v, count[0] == 20)
    original_frame(self, dt, deadline)

def submit(self, slot, frame_number):
    submitted.append(count[0])
    original_submit(self, slot, frame_number)

window._WindowDemo._frame, link.UpscaleLink.submit = frame, submit
status = cli.main(sys.argv[1:])
print("first submitted at frame", submitted[0] if submitted else None)
sys.exit(status)
"""


def test_the_views_without_sr_send_nothing_to_the_daemon(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """From a review: the native and bilinear views sent every frame to the daemon, whose work took the renderer's
    CPU for frames nobody saw (here, against a spawned CPU daemon at 320x180: native 14.9 fps before, 31.3 after).
    Back in a view with SR, frames go to the daemon again."""
    script = tmp_path / "views.py"
    script.write_text(_VIEWS_WITHOUT_SR)
    args = ["--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--view", "native", "--exit-after", "60",
            "--out", str(tmp_path)]
    result = run_demo(command=[*demo_command(xvfb=True)[:-3], sys.executable, str(script), *args])
    assert result.returncode == 0, output_of(result)
    first = result.stdout.split("first submitted at frame ")[-1].split()[0]
    assert first != "None" and int(first) >= 20, output_of(result)  # none while the native view was shown
    assert _counts(result.stdout)[1] >= 1, output_of(result)
    bilinear = run_demo("--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--view", "bilinear", "--exit-after",
                        "30", "--out", str(tmp_path), xvfb=True)
    assert bilinear.returncode == 0 and _counts(bilinear.stdout) == (30, 0), output_of(bilinear)


@pytest.mark.parametrize(("stopped_by_signal", "daemon_gone"), [(False, False), (True, False), (False, True)],
                         ids=["closed", "signal", "daemon gone"])
def test_the_daemons_statistics_are_asked_for_unless_a_signal_ended_the_run(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str],
                                                                          stopped_by_signal: bool,
                                                                          daemon_gone: bool) -> None:
    """A run a signal ended must end without waiting for a daemon that may be stalled (reproduced in a review: a
    stopped daemon held the exit for the 2 s of the request). A spawned daemon that died during the run is said in
    the summary (a review: the window went on without it, and its summary did not say so)."""
    from client_demo import window
    from upscaler_server.protocol import Statistics

    stats = Statistics(instance="ab12", uptime_ms=1, sessions=1, queued=0, frames_done=7, frames_failed=0,
                       frames_busy=2, recent_frames=0, total_us_p50=0, total_us_p99=0, infer_us_p50=0, infer_us_p99=0)
    asked: list[object] = []
    monkeypatch.setattr(window, "served_statistics", lambda link: asked.append(link) or stats)
    monkeypatch.setattr(window.glfw, "window_should_close", lambda handle: not stopped_by_signal)
    demo = object.__new__(window._WindowDemo)
    demo.window, demo.link, demo.frames, demo.upscaled = None, "the link", 0, 0
    demo.hud = SimpleNamespace(round_trip_ms=[])
    demo.watch = lambda: "exited with status -9" if daemon_gone else None
    status = demo.run(lambda: stopped_by_signal)
    said = capsys.readouterr()
    assert status == (130 if stopped_by_signal else 0)
    assert asked == ([] if stopped_by_signal or daemon_gone else ["the link"])
    assert ("7 frame(s) done, 0 failed, 2 refused BUSY" in said.out) is not (stopped_by_signal or daemon_gone), said
    assert ("the spawned upscaler daemon exited with status -9 during the run: the frames after that were shown "
            "without upscaling") in said.err if daemon_gone else said.err == "", said


def test_a_run_that_upscaled_nothing_says_why_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    """From a walkthrough: "120 frames shown, 0 upscaled" and nothing else; the banner's reason closed with the
    window."""
    from client_demo import window

    demo = object.__new__(window._WindowDemo)
    demo.link, demo.frames, demo.hud, demo.watch = None, 120, SimpleNamespace(round_trip_ms=[]), lambda: None
    demo._status = lambda: ("upscaler unavailable - retrying in 2 s", "no upscaler daemon at ipc:///x.sock", False)
    for upscaled, said in ((0, "client_demo: no frame was upscaled; the upscaler's state at the end: upscaler "
                               "unavailable - retrying in 2 s (no upscaler daemon at ipc:///x.sock)\n"), (3, "")):
        demo.upscaled = upscaled
        demo._summary(10.0, ask_daemon=False)
        printed = capsys.readouterr()
        assert f"120 frames shown in 10.0 s (11.9 fps), {upscaled} upscaled" in printed.out
        assert printed.err == said
