"""The `fairlane` command as a process, against services on loopback: a stdout closed
under it, and Ctrl-C while it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fairlane.cli.main import EXIT_INTERRUPTED
from fairlane.cli.rendering import EXIT_BROKEN_PIPE
from tests.unit.loopback_services import LoopbackServices

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRLANE_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "clients"), str(ROOT)]),
        FAIRLANE_CONFIG_DIR=str(tmp_path),
        GRPC_VERBOSITY="ERROR",
    )
    return env


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "text"])
def test_a_closed_stdout_ends_watch_quietly(tmp_path: Path, json_output: bool) -> None:
    """`fairlane watch | head -1`: once the reader is gone, watch ends with 141 (as a
    Unix tool killed by SIGPIPE) and prints nothing: no `error: Broken pipe`."""
    # More results than a pipe holds: watch is still writing when the reader leaves.
    with LoopbackServices(stored=5000) as services:
        args = ["watch", "--token", "t", "--queue-target", services.target]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fairlane.cli.main",
                *args,
                *(["--json"] if json_output else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(tmp_path),
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            assert b"result 1" in proc.stdout.readline()
            proc.stdout.close()  # as `head -1` does after its line
            code = proc.wait(timeout=30)
            stderr = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (code, stderr) == (EXIT_BROKEN_PIPE, "")


# The console script (`from fairlane.cli.main import main; sys.exit(main())`), with Ctrl-C
# arriving while it imports the module named first.
STARTING = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT is ignored
interrupted = sys.argv[1]

class InterruptImport:
    def find_spec(self, name, path=None, target=None):
        if name == interrupted:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)  # raised in the import, as a Ctrl-C would be
        return None

sys.meta_path.insert(0, InterruptImport())
sys.argv = ["fairlane", *sys.argv[2:]]
from fairlane.cli.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("module", ["typer", "rich.console", "grpc", "fairlane.cli.commands"])
def test_ctrl_c_while_starting_exits_130_quietly(tmp_path: Path, module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", STARTING, module, "whoami", "--token", "t"],
        capture_output=True,
        env=_env(tmp_path),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr.decode()) == (EXIT_INTERRUPTED, "")
    assert done.stdout == b""


def test_the_start_up_hook_does_interrupt(tmp_path: Path) -> None:
    """The test above is not vacuous: the same interruption in a plain import is the
    usual KeyboardInterrupt traceback."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            STARTING.replace("from fairlane.cli.main", "import typer\n#"),
            "typer",
        ],
        capture_output=True,
        env=_env(tmp_path),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGINT
    assert "KeyboardInterrupt" in done.stderr.decode()
