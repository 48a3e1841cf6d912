"""client_demo window mode under Xvfb: frames, the Dear ImGui HUD and a programmatic F12 screenshot."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import pytest

from demo_utils import output_of, read_png, run_demo
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
    assert read_png(_screenshot(tmp_path)).mean() > 10


def test_a_screenshot_that_cannot_be_written_is_reported_and_the_demo_goes_on(nearest_daemon: Daemon) -> None:
    result = run_demo("--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--screenshot-after", "5",
                      "--exit-after", "10", "--out", "/proc", xvfb=True)  # /proc takes no files, even from root
    assert result.returncode == 0, output_of(result)
    assert "no screenshot: cannot write /proc/takdsr-demo-" in result.stderr, output_of(result)
    assert _counts(result.stdout)[0] == 10
