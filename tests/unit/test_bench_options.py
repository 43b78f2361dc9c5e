"""`fairlane bench` refuses option combinations that cannot make a fair run."""

from __future__ import annotations

from typer.testing import CliRunner

from fairlane.cli.main import build_app


def test_fewer_requests_than_lanes_is_refused_before_anything_starts() -> None:
    # Each lane sends an equal share of --requests; a lane with no share would open a
    # Session, send nothing and be counted as a lane of the run.
    done = CliRunner().invoke(
        build_app(), ["bench", "--lanes", "3", "--requests", "2", "--target", "127.0.0.1:1"]
    )
    assert done.exit_code == 2, done.output
    assert "--requests must be at least --lanes" in done.output


def test_requests_and_duration_together_are_refused() -> None:
    done = CliRunner().invoke(build_app(), ["bench", "--requests", "5", "--duration", "1"])
    assert done.exit_code == 2, done.output
    assert "not both" in done.output
