"""Suite-wide settings: tests marked `gpu` are skipped, visibly and with the reason, without CUDA; Ctrl-C reaches the
processes the tests start even when the suite itself was started in the background; daemons the tests start keep
their backend cache in a folder of the session's. Also the `one_thread` fixture, for modules that compare runs of
small networks (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test, then the count it had: engines set the process-wide count."""
    import torch  # here, not at the top: most test modules never load torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_backend_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """$TAKDSR_CACHE_DIR for the session: the demo's daemons run --backend auto, whose measurements would otherwise
    land in the user's ~/.cache/takdsr (and a developer's cached choices would spare the tests the measuring)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAKDSR_CACHE_DIR", str(tmp_path_factory.mktemp("takdsr-cache")))
        yield


def pytest_configure(config: pytest.Config) -> None:
    # A non-interactive shell starts a background command (`bash .ci/run &`) with SIGINT ignored, and every process
    # the tests start would inherit that: the tests that send Ctrl-C to a trainer, a driver script or the exporter
    # would see it ignored and fail. Python's own handler here is reset to the default in each child at exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in gpu_items:
        item.add_marker(skip)
