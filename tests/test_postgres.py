"""Many workers on one study through a real PostgreSQL server (a throwaway cluster, see tests/pg.py).

- bad storage input (wrong password, nothing listening, a study made with another space) is a one-line error
  before any trial, and the existing study is left exactly as it was;
- workers starting together queue each baseline once (the study lock);
- a confirmation claim is held by one worker and taken over when its heartbeat stops;
- three `python -m harness.sweep` workers on the tiny model, one SIGKILLed while its vLLM server runs: its server
  dies with it, its trial is failed by the heartbeat and retried, and the study ends complete and consistent.

Without the PostgreSQL binaries these tests skip, except in CI (CI=true), where they fail so a missing install
is noticed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import psutil
import pytest
import yaml

from conftest import write_sweep as shared_sweep
from pg import Postgres, throwaway_postgres, unavailable_reason

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parents[1]
STUDY = "tiny@cpu@tiny-cpu@capacity"


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    with throwaway_postgres() as server:
        yield server


def fresh_db(pg: Postgres, name: str) -> str:
    pg.psql(f"CREATE DATABASE {name} OWNER {pg.user}")
    return pg.url_with(database=name)


def snapshot(url: str, name: str) -> Any:
    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    study = optuna.load_study(study_name=name, storage=storage)
    trials = [(t.number, t.state.name, t.values, t.params, t.user_attrs, t.system_attrs, t.datetime_start,
               t.datetime_complete) for t in study.get_trials()]
    out = (json.dumps(study.user_attrs, sort_keys=True, default=str), trials)
    storage.engine.dispose()
    return out


def write_sweep(root: Path, model: Path, *, trials: int, knobs: list[int] | None = None, confirm: int = 0) -> Path:
    # an explicit KV size skips vLLM's CPU warm-up: the cheapest start there is
    return shared_sweep(root, model, trials=trials, confirm=confirm, space_name="pg",
                        fixed={"kv_cache_memory_bytes": 64 * 2**20}, choices=knobs, max_steps=1, seed=5, dirs=False,
                        start_timeout_s=600)


def worker(sweep: Path, node: Path, url: str, *extra: str, **popen: Any) -> subprocess.Popen[str]:
    """One node: its own results and configs dirs (like a separate machine), the shared study URL."""
    node.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_TUNE_HEARTBEAT_S": "2", "VLLM_TUNE_GRACE_S": "10", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness.sweep", str(sweep), "--storage", url,
                             "--results-dir", str(node / "results"), "--configs-dir", str(node / "configs"), *extra],
                            cwd=node, env=env, text=True, stdout=subprocess.DEVNULL,
                            stderr=open(node / "stderr.log", "w"), **popen)


def vllm_descendants(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in kids:
        try:
            cmd = " ".join(p.cmdline())
            if "vllm.entrypoints" in cmd or p.name().startswith("VLLM") or "multiprocessing" in cmd:
                out.append(p)
        except psutil.Error:
            pass
    return out


def our_servers(root: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info.get("cmdline") or [])
            if ("vllm" in cmd or "VLLM" in cmd) and p.info.get("cwd") and str(root) in p.info["cwd"]:
                found.append(p)
        except psutil.Error:
            pass
    return found


def cli(sweep: Path, root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.sweep", str(sweep), *args,
                           "--results-dir", str(root / "results"), "--configs-dir", str(root / "configs")],
                          cwd=root, text=True, capture_output=True, timeout=timeout)


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------- bad input


def test_wrong_password_and_no_server_are_one_line_errors(pg: Postgres, tiny_model: Path, tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, tiny_model, trials=1)
    for url, words in ((pg.url_with(password="wrong"), "password authentication failed"),
                       (pg.url_with(port=1), "Connection refused"),
                       (pg.url_with(database="nosuchdb"), 'database "nosuchdb" does not exist'),
                       ("postgresql://tuner@127.0.0.1:1/x?sslmode=bogus", "sslmode")):
        t0 = time.monotonic()
        proc = cli(sweep, tmp_path, "--storage", url, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = stderr_lines(proc)
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: ") and words in lines[0] and "storage" in lines[0], lines[0]
        assert "wrong" not in lines[0]  # the password is not echoed
        assert time.monotonic() - t0 < 60
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


def test_a_different_space_is_refused_and_the_study_is_untouched(pg: Postgres) -> None:
    from harness.errors import UserError
    from harness.study.runner import open_study
    from harness.study.storage import make_storage

    url = fresh_db(pg, "identity")
    storage = make_storage(url)
    ident = {"model": "m", "space": {"knobs": {"max_num_seqs": [4, 8]}}, "workload": {"name": "w"}}
    study = open_study("s", storage, ["maximize"], optuna.samplers.RandomSampler(), ident)
    study.enqueue_trial({}, user_attrs={"baseline": "vllm-defaults", "settings": {}})
    before = snapshot(url, "s")
    other = {**ident, "space": {"knobs": {"max_num_seqs": [16, 32]}}}
    with pytest.raises(UserError, match="different space"):
        open_study("s", make_storage(url), ["maximize"], optuna.samplers.RandomSampler(), other)
    with pytest.raises(UserError, match="other directions"):
        open_study("s", make_storage(url), ["maximize", "minimize"], optuna.samplers.RandomSampler(), ident)
    assert snapshot(url, "s") == before


# ---------------------------------------------------------------------------------------------- coordination

RACE = textwrap.dedent("""
    import sys, time, optuna
    from harness.study.runner import open_study, enqueue_baselines
    from harness.study.storage import make_storage, study_lock
    url, go = sys.argv[1], float(sys.argv[2])
    storage = make_storage(url)
    while time.time() < go:
        time.sleep(0.0005)
    with study_lock(storage, "race"):
        study = open_study("race", storage, ["maximize"], optuna.samplers.RandomSampler(), {"space": 1})
        enqueue_baselines(study, {"vllm-defaults": {}, "committed-config": {"max_num_seqs": 8}})
""")


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_workers_starting_together_queue_each_baseline_once(pg: Postgres, tmp_path: Path, backend: str) -> None:
    url = fresh_db(pg, "race") if backend == "postgresql" else f"sqlite:///{tmp_path / 'studies.db'}"
    go = time.time() + 6  # every process has imported and connected by then
    procs = [subprocess.Popen([sys.executable, "-c", RACE, url, str(go)], cwd=REPO, text=True,
                              stderr=subprocess.PIPE) for _ in range(5)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    trials = optuna.load_study(study_name="race", storage=storage).get_trials()
    assert sorted(t.user_attrs["baseline"] for t in trials) == ["committed-config", "vllm-defaults"]
    assert [t.number for t in trials] == [0, 1]
    storage.engine.dispose()


def test_claim_is_exclusive_and_taken_over_when_its_owner_stops_beating(pg: Postgres,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.study.storage import make_storage
    from harness.study.workers import Claim

    storage = make_storage(fresh_db(pg, "claim"))
    study = optuna.create_study(study_name="c", storage=storage)
    # beats every 0.2 s, stale after 3 s: a beat delayed by a loaded machine or database is not a dead owner
    a = Claim(study, storage, "job", heartbeat_s=0.2, grace_s=3.0)
    assert a.acquire()
    monkeypatch.setattr("harness.study.workers.worker_id", lambda: "other-host:1")
    b = Claim(study, storage, "job", heartbeat_s=0.2, grace_s=3.0)
    time.sleep(4.0)  # longer than the grace: only a's beats keep it its own
    assert b.owner() == a.me and not b.acquire()
    a._stop.set()  # a dies without releasing
    a._thread.join()
    assert b.owner() == a.me  # its last beat is fresh: not taken over before its grace runs out
    stopped = time.monotonic()
    while b.owner() is not None and time.monotonic() - stopped < 30:
        time.sleep(0.2)
    assert b.owner() is None and b.acquire() and b.owner() == "other-host:1"
    b.release()
    assert study.user_attrs["job"] is None


def test_budget_counts_every_workers_trials(tmp_path: Path) -> None:
    """Finished, running and queued trials of all workers fill the budget; a trial sampled beyond it is surplus,
    a queued one (baseline, retry) never is. No PostgreSQL needed: the rule is the same on SQLite."""
    from harness.study.workers import Budget

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'b.db'}")
    budget = Budget(3)
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    running_elsewhere = study.ask()
    assert budget.taken(study) == 3
    mine = study.ask()  # asked at the same moment as the other worker's: beyond the budget
    assert budget.surplus(study, mine.number)
    study.tell(mine, state=optuna.trial.TrialState.FAIL)
    study.tell(running_elsewhere, state=optuna.trial.TrialState.FAIL)  # e.g. Ctrl-C: does not count
    assert budget.taken(study) == 2
    study.enqueue_trial({}, user_attrs={"baseline": "vllm-defaults"})
    queued = study.ask()  # takes the queued trial
    assert not budget.surplus(study, queued.number)
    assert not Budget(1).surplus(study, queued.number)  # even over the budget, a queued trial runs


def test_drain_retries_a_dead_workers_trials_and_creates_nothing_else(pg: Postgres) -> None:
    """A RUNNING trial whose heartbeat stopped, and one that never sent any (its worker died at once): both are
    failed and re-queued, the retries run here, and no new trial is sampled."""
    from harness.study.workers import drain, run_queued

    storage = optuna.storages.RDBStorage(
        fresh_db(pg, "drain").replace("postgresql://", "postgresql+psycopg2://", 1),
        heartbeat_interval=1, grace_period=1,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    study = optuna.create_study(study_name="d", storage=storage, direction="maximize")
    dead = study.ask({"x": optuna.distributions.IntDistribution(0, 10)})  # its worker beat once, then died
    dead.set_user_attr("settings", {"x": dead.params["x"]})
    storage.record_heartbeat(dead._trial_id)
    silent = study.ask()  # its worker died before the first heartbeat
    ran: list[int] = []
    ended: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        return 1.0

    time.sleep(3)
    drain(study, objective, [lambda st, t: ended.append(t.number)], poll_s=0.2, settle_s=0.5)
    trials = study.get_trials()
    states = {t.number: t.state.name for t in trials}
    assert states[dead.number] == "FAIL" and states[silent.number] == "FAIL"
    retries = {t.system_attrs["failed_trial"]: t for t in trials if "failed_trial" in t.system_attrs}
    assert set(retries) == {dead.number, silent.number}
    assert all(t.state.name == "COMPLETE" and t.value == 1.0 for t in retries.values())
    assert retries[dead.number].params == dead.params  # the same candidate again
    assert retries[dead.number].user_attrs["settings"] == {"x": dead.params["x"]}
    assert sorted(ran) == sorted(ended) == sorted(t.number for t in retries.values())
    assert len(trials) == 4  # two originals, two retries, nothing sampled
    assert not run_queued(study, objective, [])  # nothing left: creates nothing either
    assert len(study.get_trials()) == 4
    storage.engine.dispose()


# ---------------------------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def killed_worker_run(pg: Postgres, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Three workers (nodes a, b, c) on one study of 3 trials; node a is SIGKILLed while its server runs."""
    root = tmp_path_factory.mktemp("pg-workers")
    url = fresh_db(pg, "sweep")
    sweep = write_sweep(root, tiny_model, trials=3, confirm=1)
    procs = {n: worker(sweep, root / n, url) for n in "abc"}
    victim = procs["a"]
    deadline = time.monotonic() + 600
    servers: list[psutil.Process] = []
    while time.monotonic() < deadline and victim.poll() is None:
        servers = vllm_descendants(victim.pid)
        if any(p.name().startswith("VLLM") or "EngineCore" in " ".join(p.cmdline()) for p in servers
               if p.is_running()):
            break  # the engine core is up: the server really runs
        time.sleep(0.5)
    assert victim.poll() is None, (root / "a" / "stderr.log").read_text()[-3000:]
    assert servers, "worker a never started a server"
    time.sleep(2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    t_kill = time.monotonic()
    orphans = [p for p in servers if p.is_running()]
    while orphans and time.monotonic() - t_kill < 60:
        time.sleep(0.5)
        orphans = [p for p in orphans if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    reaped_s = time.monotonic() - t_kill
    results = {}
    for n in "bc":
        try:
            results[n] = procs[n].wait(timeout=1500)
        except subprocess.TimeoutExpired:
            procs[n].kill()
            results[n] = None
    return root, url, results, orphans, reaped_s


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_worker_trial_is_retried_and_study_is_complete(killed_worker_run) -> None:  # type: ignore[no-untyped-def]
    root, url, results, orphans, reaped_s = killed_worker_run
    for n in "bc":
        assert results[n] == 0, (root / n / "stderr.log").read_text()[-4000:]
    assert not orphans, f"the killed worker's vLLM processes outlived it: {orphans}"
    assert reaped_s < 30
    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # unique, no gap
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    # a worker that asked for a trial in the moment between the dead trial's failure and its retry being queued got
    # a surplus one: marked FAIL with nothing run (workers.Budget.surplus), which is the designed way out of that race
    surplus = [t for t in trials if t.state.name == "FAIL" and t.user_attrs.get("outcome") == "surplus"]
    assert all(not {"metrics", "startup", "records"} & set(t.user_attrs) for t in surplus), surplus  # nothing ran
    failed = [t for t in trials if t.state.name == "FAIL" and t.number not in {s.number for s in surplus}]
    assert len(failed) == 1, states  # the killed worker's trial, failed once (dead-process check or heartbeat)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].user_attrs["settings"] == failed[0].user_attrs["settings"]
    assert retries[0].user_attrs.get("baseline") == failed[0].user_attrs.get("baseline")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3  # the budget, over all workers
    assert [t.user_attrs.get("baseline") for t in trials].count("vllm-defaults") - len(
        [t for t in failed if t.user_attrs.get("baseline")]) == 1  # one baseline measured
    assert all(t.values is not None and t.user_attrs.get("outcome") for t in complete)
    ran_on = {n: (root / n / "stderr.log").read_text().count("] trial #") for n in "bc"}
    assert all(ran_on.values()), ran_on  # both surviving workers took trials
    # one worker confirms the global best against the baseline; the other waits for its result and emits the same
    best = max((t for t in complete), key=lambda t: (t.values[0], -t.number))
    if best.user_attrs.get("baseline") == "vllm-defaults":  # the defaults measured best: the best other is confirmed
        best = max((t for t in complete if t.number != best.number), key=lambda t: (t.values[0], -t.number))
    confirmed = optuna.load_study(study_name=STUDY, storage=storage).user_attrs["confirm"]
    storage.engine.dispose()
    assert confirmed["winner_trial"] == best.number
    confirmers = [n for n in "bc" if "[confirm 1/1] winner" in (root / n / "stderr.log").read_text()]
    assert len(confirmers) == 1, confirmers
    provenance = {n: yaml.safe_load((root / n / "configs" / "tiny.yaml").read_text())["provenance"] for n in "bc"}
    for p in provenance.values():
        assert p["study"] == STUDY and p["trial"] == confirmed["recommended_trial"]
        assert p["improvement"]["verdict"] == confirmed["verdict"]
        assert p["improvement"]["winner"]["runs"] == confirmed["winner"]["runs"]
    time.sleep(1)
    assert not our_servers(root)


@pytest.mark.slow
def test_rerun_and_other_space_leave_the_finished_study_alone(killed_worker_run, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    root, url, _, _, _ = killed_worker_run
    before = snapshot(url, STUDY)
    node = root / "d"
    node.mkdir()
    again = cli(root / "sweep.yaml", node, "--storage", url)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished; nothing to run" in again.stderr
    other = write_sweep(node, tiny_model, trials=3, knobs=[16, 32])
    proc = cli(other, node, "--storage", url)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in stderr_lines(proc) if ln.startswith("error:")]
    assert len(err) == 1 and "different space" in err[0] and "nothing was changed" in err[0], proc.stderr
    assert snapshot(url, STUDY) == before
