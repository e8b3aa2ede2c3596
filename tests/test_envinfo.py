"""The environment stored with every number: the harness commit, also where the tree has no .git."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from harness import envinfo


def test_a_checkout_names_its_commit_and_a_copy_without_git_takes_it_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert envinfo._git_commit()  # this repository
    monkeypatch.setenv(envinfo.COMMIT_ENV, "f62d7bc")
    real = subprocess.run

    def no_git(argv: list[str], **kw: Any) -> Any:  # what an offline host's copy of the tree answers
        return real(["git", "-C", "/", "rev-parse", "--short", "HEAD"], **kw) if argv[0] == "git" else real(argv, **kw)

    monkeypatch.setattr(envinfo.subprocess, "run", no_git)
    assert envinfo._git_commit() == "f62d7bc"
    monkeypatch.delenv(envinfo.COMMIT_ENV)
    assert envinfo._git_commit() is None
