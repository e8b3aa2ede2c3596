"""The environment stored with every number: the harness commit, also where the tree has no .git."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import envinfo

ROOT = Path(envinfo.__file__).resolve().parents[1]


def test_a_copy_without_git_takes_the_commit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:  # an offline host's copy
        return subprocess.CompletedProcess(argv, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(envinfo.subprocess, "run", no_git)
    monkeypatch.setenv(envinfo.COMMIT_ENV, "f62d7bc")
    assert envinfo._git_commit() == "f62d7bc"
    monkeypatch.delenv(envinfo.COMMIT_ENV)
    assert envinfo._git_commit() is None


def test_another_repositorys_work_tree_around_the_copy_is_not_its_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    def outer_repo(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        out = "/some/other/repo\n" if "--show-toplevel" in argv else "abc1234\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(envinfo.subprocess, "run", outer_repo)
    monkeypatch.setenv(envinfo.COMMIT_ENV, "f62d7bc")
    assert envinfo._git_commit() == "f62d7bc"


def test_the_checkout_names_its_own_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    def checkout(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        out = {"--show-toplevel": f"{ROOT}\n", "--short": "1a2b3c4\n"}
        return subprocess.CompletedProcess(argv, 0, next((v for k, v in out.items() if k in argv), ""), "")

    monkeypatch.setattr(envinfo.subprocess, "run", checkout)
    monkeypatch.setenv(envinfo.COMMIT_ENV, "f62d7bc")
    assert envinfo._git_commit() == "1a2b3c4"  # clean: `status --porcelain` printed nothing
