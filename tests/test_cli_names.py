"""Usage lines name the command the user typed: the console script, or ``python -m module``."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (pyproject: requires-python >=3.10) has tomli instead
    import tomli as tomllib

# (console script from pyproject.toml, the module that `python -m` runs)
COMMANDS = [
    ("upscaler-server", "upscaler_server"),
    ("takdsr-upscale", "upscaler_server.upscale"),
    ("takdsr-bench", "upscaler_server.bench"),
    ("takdsr-demo", "client_demo"),
    ("takdsr-status", "upscaler_server.status"),
]
# the commands without a console script, run as `python -m` only
PYTHON_M_ONLY = ["upscaler_server.export", "models", "training", "training.data"]
REPO = pathlib.Path(__file__).resolve().parent.parent


def _usage_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.splitlines()[0]


@pytest.mark.parametrize(("script", "module"), COMMANDS)
def test_usage_names_the_console_script(script: str, module: str) -> None:
    path = pathlib.Path(sys.executable).parent / script
    assert path.exists(), f"{path} missing: install the project with `bash scripts/setup.sh --dev`"
    assert _usage_line([str(path), "--help"]).startswith(f"usage: {script} ")


@pytest.mark.parametrize(("script", "module"), COMMANDS)
def test_usage_names_python_dash_m(script: str, module: str) -> None:
    assert _usage_line([sys.executable, "-m", module, "--help"]).startswith(f"usage: python -m {module} ")


@pytest.mark.parametrize("module", [module for _, module in COMMANDS] + ["upscaler_server.export"])
def test_help_ends_with_the_exit_statuses(module: str) -> None:
    """The offline CLI's statuses were in its module docstring only, and the daemon's and the demo's in docs (an
    operator's review); the export and the benchmark ended their help with them."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          check=True)
    epilog = " ".join(done.stdout.rsplit("\n\n", 1)[-1].split())  # argparse wraps it
    assert epilog.startswith("exit status: 0 ") and " 2 " in epilog, done.stdout


def test_the_daemon_reports_the_packages_version_and_the_changelog_describes_it() -> None:
    """welcome.server tells a client which rules a daemon applies (docs/protocol.md, section 10): it must follow the
    package's version, which stayed 0.1.0 while the protocol's rules were tightened (from an upgrade review)."""
    from upscaler_server import __version__

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == declared
    assert f"\n## {declared} (" in (REPO / "CHANGELOG.md").read_text()


def _every_command() -> list[list[str]]:
    """Each console script of pyproject.toml as installed, and each `python -m` command that has none."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    installed = [[str(pathlib.Path(sys.executable).parent / script)] for script in sorted(scripts)]
    return installed + [[sys.executable, "-m", module] for module in PYTHON_M_ONLY]


@pytest.mark.parametrize("command", _every_command(), ids=lambda command: command[-1].rsplit("/", 1)[-1])
def test_every_command_tells_the_packages_version(command: list[str]) -> None:
    """A bug report should say which version it is about: every command answers --version alike."""
    from upscaler_server import __version__

    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert (done.returncode, done.stdout) == (0, f"takdsr-upscaler {__version__}\n"), done.stderr
