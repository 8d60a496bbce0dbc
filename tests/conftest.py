"""Shared fixtures: the tiny Qwen-Image encoders, written once per test session."""

import pytest


@pytest.fixture(scope="session")
def tiny_encoders_dir(tmp_path_factory) -> str:
    """A directory in the Qwen-Image layout with tiny random weights (`mmdit make-tiny-encoders`).

    Written through the CLI entry point, as a user would; read-only by convention: tests that
    modify encoders copy it first.
    """
    from mmdit.launch.cli import main

    out = tmp_path_factory.mktemp("tiny_encoders")
    assert main(["make-tiny-encoders", str(out)]) == 0
    return str(out)
