"""Confirm the winner against the baseline: repeated measurements, spread reported, no win inside the noise.

Equal hardware: both sides run on the same number of GPUs where the node allows it (`pergpu.equal_gpu_pair`:
vLLM's defaults at TP 1 as replicas next to a TP 2 winner, 2 GPUs vs 2), and every value is per GPU, so a side
never wins by taking more GPUs. What one repeat measures is the objective's (`Objective.measure_repeat`): for
capacity studies one windowed steady step at the winner's capacity per GPU times the side's GPUs, scored by
goodput per GPU; for the fixed-load objectives the trial's own measurement. Servers are started as few times as
the devices allow (see `confirm`). Then, on a GPU node with room for more than one winner server, the winner runs
once with the replicas that fill the node (what the emitted config deploys), to show that its per-GPU value
scales: the scaling efficiency is that run's per-GPU value over the one server's.

The decision rule is a rank test, not a threshold: the winner is recommended only when every one of its repeats
beats every baseline repeat (with 3 + 3 runs that is a one-sided Mann-Whitney test at p = 0.05) and its mean is
higher. Otherwise the baseline is kept and the output says so.

With `cross_check`, each side's live server is measured once more after its repeats, by our client and by
`vllm bench serve` at the same rate on vLLM's schedule (`harness.measure.vllm_bench.cross_check`): the gain shown
by vLLM's own tool next to ours. Each tool sends its own prompt set of the workload's lengths as completions
prompts (what vLLM's client replays), the same sets on both sides, so a prefix cache never serves one tool's
run from the other's; the cross-check is of the tools and the gain, not a capacity.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterator

from optuna.trial import FrozenTrial

from harness.deploy import DeployJob, deploy_together
from harness.launch.server import ServerStartError
from harness.load.client import Target
from harness.measure.vllm_bench import cross_check as run_cross_check
from harness.measure.vllm_bench import work_text
from harness.study.evaluate import StudyContext, evaluate, finalize, measure_live, plan_settings
from harness.study.pergpu import equal_gpu_pair, fill_replicas, gpus_used
from harness.study.trials import CLIENT_LIMITED_LABEL as CLIENT_LIMITED, Evaluation, Spread, settings_of

CLIENT_RETRIES = 2  # a repeat whose load client fell behind is measured again, at most this many times
SLOT_WAIT_S = 30.0  # for devices whose memory the last trial's servers are still releasing; then: not free now
MODE_LIVE = "live servers, repeats interleaved"
MODE_BLOCKS = "live servers, one configuration at a time in alternating blocks"
MODE_FRESH = "fresh server per repeat"
CROSS_CHECK_SEED = 990  # the cross-check's prompts: none of a trial's steps (seeds 0..max_steps) sends them
CROSS_CHECK_MIN_REQUESTS = 20


@dataclass
class Confirmation:
    metric: str
    winner_trial: int
    baseline_trial: int | None
    winner: Spread
    baseline: Spread
    recommended_trial: int
    verdict: str
    winner_metrics: list[dict[str, Any]] = field(default_factory=list)  # per repeat, summary numbers
    baseline_metrics: list[dict[str, Any]] = field(default_factory=list)
    mode: str = MODE_FRESH  # how the repeats were run (MODE_*; phases joined by ' + ')
    winner_gpus: int | None = None  # GPUs each winner repeat ran on (None: stored before sides were recorded)
    baseline_gpus: int | None = None
    winner_settings: dict[str, Any] = field(default_factory=dict)  # as deployed (replicas set)
    baseline_settings: dict[str, Any] = field(default_factory=dict)
    pairing: str = ""  # the sides in words
    per_gpu: bool = False  # the runs are per GPU
    scaling: dict[str, Any] | None = None  # the winner with the node's replica count, measured once
    cross_check: dict[str, Any] | None = None  # per side: our client and `vllm bench serve` on the same requests
    baseline_floor: float | None = None  # `Objective.gain_floor`: a baseline repeat that did not hold counts this

    def _gain_runs(self) -> list[tuple[float, float]]:
        """(measured, as the gain counts it) per valid baseline repeat: one that did not hold the load (its
        `steady_holds`; repeats recorded before it was: held) counts at no less than `baseline_floor`."""
        floor = None if self.baseline_trial in (None, self.winner_trial) else self.baseline_floor
        held = [bool(m.get("steady_holds", True)) for m in self.baseline_metrics] or [True] * len(self.baseline.runs)
        return [(v, v if h or floor is None else max(v, floor))
                for v, ok, h in zip(self.baseline.runs, self.baseline.flags, held) if ok]

    @property
    def floored(self) -> int:
        """How many valid baseline repeats the gain counts at `baseline_floor` instead of their number."""
        return sum(1 for v, counted in self._gain_runs() if counted != v)

    @property
    def improvement(self) -> float | None:
        """Relative gain of the winner's mean over the baseline's mean (valid repeats only), a baseline repeat that
        did not hold the load counted at no less than `baseline_floor`: the gain is never that of a collapse."""
        counted = [c for _, c in self._gain_runs()]
        if not self.winner.valid_runs or not counted:
            return None
        base = statistics.fmean(counted)
        return self.winner.mean / base - 1.0 if base > 0 else None

    def gain_basis(self) -> str:
        """The gain's basis in words when repeats were floored (empty otherwise), for the verdict and reports."""
        if not self.floored:
            return ""
        return (f"the baseline did not hold this load in {self.floored} of {len(self.baseline.valid_runs)} repeats "
                f"(mean {self.baseline.mean:.4g}): in the gain they count as what its own search measured at its "
                f"capacity, {self.baseline_floor:.4g}{' per GPU' if self.per_gpu else ''}, not as a collapse past it")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "winner_trial": self.winner_trial, "baseline_trial": self.baseline_trial,
                "winner": self.winner.to_dict(), "baseline": self.baseline.to_dict(),
                "improvement": self.improvement, "recommended_trial": self.recommended_trial,
                "verdict": self.verdict, "winner_metrics": self.winner_metrics,
                "baseline_metrics": self.baseline_metrics, "mode": self.mode, "winner_gpus": self.winner_gpus,
                "baseline_gpus": self.baseline_gpus, "winner_settings": self.winner_settings,
                "baseline_settings": self.baseline_settings, "pairing": self.pairing, "per_gpu": self.per_gpu,
                "scaling": self.scaling, "cross_check": self.cross_check, "baseline_floor": self.baseline_floor,
                "gain_basis": self.gain_basis()}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Confirmation:
        """Back from `to_dict()` (a study attribute: a rerun, or another worker, reuses the confirmation)."""
        return cls(metric=saved["metric"], winner_trial=saved["winner_trial"],
                   baseline_trial=saved["baseline_trial"],
                   winner=Spread.from_dict(saved["winner"], saved.get("winner_metrics")),
                   baseline=Spread.from_dict(saved["baseline"], saved.get("baseline_metrics")),
                   recommended_trial=saved["recommended_trial"],
                   verdict=saved["verdict"], winner_metrics=saved["winner_metrics"],
                   baseline_metrics=saved["baseline_metrics"], mode=saved.get("mode", ""),
                   winner_gpus=saved.get("winner_gpus"), baseline_gpus=saved.get("baseline_gpus"),
                   winner_settings=saved.get("winner_settings") or {},
                   baseline_settings=saved.get("baseline_settings") or {}, pairing=saved.get("pairing", ""),
                   per_gpu=bool(saved.get("per_gpu", False)), scaling=saved.get("scaling"),
                   cross_check=saved.get("cross_check"), baseline_floor=saved.get("baseline_floor"))


def _client_limited(ev: Evaluation) -> list[str]:
    """Why the load client, not the server, limited this run (empty: a valid server number)."""
    client = getattr(ev.record, "client", None) if ev.record is not None and ev.failure is None else None
    return list(client.reasons or ["client check failed"]) if client is not None and not client.valid else []


def _verdict(winner: FrozenTrial, baseline: FrozenTrial | None, w: Spread, b: Spread, metric: str,
             same: bool, missing: list[str], sides: str = "", per: str = "") -> tuple[str, int]:
    """(verdict, recommended trial). The rank test needs every repeat of both sides measured and valid: a
    client-limited repeat is no server number, and with fewer repeats `beats` would no longer be a test at p = 0.05."""
    kept = winner.number if same or baseline is None else baseline.number
    if missing:
        return (f"not confirmed: {len(missing)} confirmation repeat(s) could not be measured ({missing[0]}); "
                + ("the baseline (vLLM defaults) is kept" if same or baseline is None else
                   f"the baseline is kept (trial #{winner.number} stays unconfirmed)"), kept)
    invalid = len(w.invalid_runs) + (0 if same else len(b.invalid_runs))
    total = len(w.runs) + (0 if same else len(b.runs))
    if invalid:
        return (f"not confirmed: {invalid} of {total} confirmation repeats were {CLIENT_LIMITED} (the load client "
                f"fell behind, so they measured the client, not the server); "
                + ("the baseline (vLLM defaults) is kept" if same or baseline is None else
                   f"the baseline is kept (trial #{winner.number} stays unconfirmed)"), kept)
    if same:
        return "the baseline (vLLM defaults) is the best candidate found; it is kept", winner.number
    on = f"; {sides}" if sides else ""
    if beats(w.runs, b.runs):
        return (f"trial #{winner.number} beats the baseline in every repeat "
                f"({w.mean:.4g} vs {b.mean:.4g} {metric}{on})", winner.number)
    return (f"trial #{winner.number} does not beat the baseline{per} beyond the run-to-run spread"
            + (f" ({sides})" if sides else "") + "; the baseline is kept", kept)


def beats(winner: list[float], baseline: list[float]) -> bool:
    return bool(winner) and bool(baseline) and min(winner) > max(baseline) and \
        statistics.fmean(winner) > statistics.fmean(baseline)


def node_gpus(ctx: StudyContext) -> int:
    """GPUs of the node the study runs on (0 on a CPU host)."""
    slots = getattr(ctx, "slots", None)
    return len(slots.gpu_ids) if slots is not None and slots.gpu_ids else 0


def confirm(ctx: StudyContext, winner: FrozenTrial, baseline: FrozenTrial | None, repeats: int,
            metric: str, log: Any = None, cross_check: bool = False,
            load_values: list[float] | None = None) -> Confirmation:
    """Re-measure winner and baseline, `repeats` times each, on equal GPUs where the node allows it. `load_values`:
    the values whose load every repeat offers (default: the winner's; see `tune.confirm_load`).

    When both configurations can be up at once (a CPU host, or disjoint GPU sets free), each is started once and
    the repeats alternate between the two live servers (a winner that is the baseline: one live server). When they
    cannot (a winner on every GPU of the node, one GPU), they alternate in blocks (`alternating_blocks`: A, B B,
    A A, B for 3 repeats): 4 start-ups instead of one per repeat (6), which on GPUs (minutes each) decides whether
    a confirmation fits a time slot, while neither side is measured mostly early (drift) and each is measured on
    two servers (start-to-start spread). Only when a configuration cannot be started on its own slot now does each
    of its repeats start a fresh server.
    """
    # What a repeat measures is the objective's (`Objective.measure_repeat`): capacity studies offer both sides
    # the winner's claimed capacity per GPU times their GPUs and score goodput per GPU, so a baseline that also
    # sustains it ties (and is kept).
    winner_values = list(winner.values if load_values is None else load_values)
    same = baseline is None or baseline.number == winner.number
    pairing = (equal_gpu_pair(settings_of(winner), settings_of(baseline), node_gpus(ctx)) if not same
               else equal_gpu_pair(settings_of(winner), settings_of(winner), node_gpus(ctx)))
    sides = {"winner": pairing.winner, "baseline": pairing.baseline}
    pairs = [("winner", winner)] + ([] if same else [("baseline", baseline)])
    if log is not None:
        print(f"[confirm] {pairing.describe()}", file=log, flush=True)
    runs: dict[str, list[float]] = {"winner": [], "baseline": []}
    valid: dict[str, list[bool]] = {"winner": [], "baseline": []}
    unmeasured: dict[str, list[str]] = {"winner": [], "baseline": []}
    metrics: dict[str, list[dict[str, Any]]] = {"winner": [], "baseline": []}
    modes: list[str] = []
    checks: dict[str, dict[str, Any]] = {}
    with contextlib.closing(_phases(ctx, pairs, sides, repeats)) as phases:
        for mode, live, order in phases:
            modes += [] if mode in modes else [mode]
            if cross_check and not live:
                for who, _ in pairs:
                    checks.setdefault(who, {"skipped": "no live server to measure again (fresh server per repeat)"})
            for i, (who, trial) in order:
                if log is not None:
                    print(f"[confirm {i + 1}/{repeats}] {who} (trial #{trial.number}, {mode})", file=log, flush=True)
                settings = sides[who]
                for attempt in range(1 + CLIENT_RETRIES):
                    label = f"confirm-{who}{i + 1}" + (f"-again{attempt}" if attempt else "")
                    # each try of repeat i has a prompt set of its own (the steps' lengths in other tokens, the
                    # same set for both sides' try): no server is sent the same prompts twice, which its prefix
                    # cache would serve (the H200's defaults server served 99% of a second repeat's prompt
                    # tokens from it when repeats shared their prompts)
                    prompts = confirm_prompt_set(i, attempt, repeats)
                    if live:
                        ev, _ = plan_settings(ctx, settings)
                        measure_live(ctx, live[who], ev, label, repeat_of=winner_values, prompt_set=prompts)
                        ev = finalize(ctx, ev, label)
                    else:
                        ev = evaluate(ctx, settings, label, repeat_of=winner_values, prompt_set=prompts)
                    reasons = _client_limited(ev)
                    if not reasons:
                        break
                    if log is not None:
                        print(f"    -> not a server number ({reasons[0]}); measured again", file=log, flush=True)
                if ev.values is None:  # pruned at launch (the host's memory changed): no number at all
                    unmeasured[who].append(f"not started: {ev.pruned_reason}")
                    if log is not None:
                        print(f"    -> not measured: {ev.pruned_reason}", file=log, flush=True)
                    continue
                value = ev.values[0]
                runs[who].append(float(value))
                valid[who].append(not reasons)
                metrics[who].append({**ev.summary(), "client_valid": not reasons, "gpus": ev.gpus,
                                     **({"client_reason": reasons[0]} if reasons else {}),
                                     **({"steady_holds": False} if ev.failure is not None else {})})
                if log is not None:
                    print(f"    -> {metric} = {value:.4g}"
                          + (f" ({CLIENT_LIMITED}: {reasons[0]}; left out of the means)" if reasons else ""),
                          file=log, flush=True)
            if cross_check and live:  # after the side's repeats, on the same live server
                for who, dep in live.items():
                    if who not in checks:
                        checks[who] = _cross_check(ctx, who, dep, winner_values, log)
    w = Spread(runs["winner"], valid["winner"])
    b = Spread(runs["baseline"], valid["baseline"]) if not same else Spread(list(w.runs), list(w.flags))
    missing = unmeasured["winner"] + ([] if same else unmeasured["baseline"])
    verdict, rec = _verdict(winner, baseline, w, b, metric, same, missing, pairing.describe(),
                            " per GPU" if ctx.objective.per_gpu and node_gpus(ctx) > 0 else "")
    scaling = measure_scaling(ctx, winner, log)
    conf = Confirmation(metric=metric, winner_trial=winner.number,
                        baseline_trial=None if baseline is None else baseline.number, winner=w,
                        baseline=b, recommended_trial=rec, verdict=verdict,
                        winner_metrics=metrics["winner"], baseline_metrics=metrics["baseline"],
                        mode=" + ".join(modes), winner_gpus=pairing.winner_gpus,
                        baseline_gpus=pairing.winner_gpus if same else pairing.baseline_gpus,
                        winner_settings=pairing.winner, baseline_settings=pairing.winner if same else pairing.baseline,
                        pairing=pairing.describe(), per_gpu=ctx.objective.per_gpu, scaling=scaling,
                        cross_check=_cross_check_summary(checks, same) if cross_check else None,
                        baseline_floor=None if same else ctx.objective.gain_floor(baseline))
    if conf.gain_basis() and conf.recommended_trial == winner.number and not same:
        if (conf.improvement or 0.0) <= 0.0:  # ahead of the repeats, not of what the baseline sustains
            conf.recommended_trial = baseline.number
            conf.verdict = (f"trial #{winner.number} beats the baseline's repeats but not what it sustains: "
                            f"{conf.gain_basis()}; gain {conf.improvement:+.1%}; the baseline is kept")
        else:
            conf.verdict += f"; {conf.gain_basis()}: gain {conf.improvement:+.1%}"
    return conf


def confirm_prompt_set(repeat: int, attempt: int, repeats: int) -> int:
    """The prompt set of try `attempt` of repeat `repeat` (0-based): distinct for every try of a confirmation."""
    return repeat + attempt * repeats


def _cross_check(ctx: StudyContext, who: str, dep: Any, winner_values: list[float], log: Any) -> dict[str, Any]:
    """Our client, then `vllm bench serve`, once each on this side's live server at the rate its repeats offered,
    or why not."""
    rate = ctx.objective.cross_check_rate(winner_values, dep.topology.gpus)
    if rate is None or rate <= 0:
        return {"skipped": f"the {ctx.objective.kind} objective offers no open-loop rate to replay"}
    if len(dep.group.targets) != 1:
        return {"skipped": f"{len(dep.group.targets)} servers: vllm bench serve drives one URL"}
    if ctx.completion_requests is None:
        return {"skipped": "no tokenizer for the cross-check's prompts"}
    n = max(CROSS_CHECK_MIN_REQUESTS, round(rate * (ctx.objective.step_s or 60.0)))
    if log is not None:
        print(f"[confirm cross-check] {who}: {n} requests at {rate:.3g} req/s through our client, then vllm bench "
              f"serve", file=log, flush=True)
    try:
        # one prompt set per tool, the same sets on both sides: the server's prefix cache (on in vLLM's defaults)
        # never serves the second tool's run from the first's, and vLLM's tool sees identical requests on both sides
        got = run_cross_check(Target(*dep.group.targets[0]), dep.served_name, ctx.model, ctx.completion_requests(n, 0),
                              rate, ctx.study_dir / "cross-check" / who, slo=ctx.objective.slo,
                              vllm_requests=ctx.completion_requests(n, 1))
    except Exception as exc:  # noqa: BLE001 - a failed cross-check must not cost the confirmation its repeats
        return {"failed": f"{type(exc).__name__}: {exc}"[:500]}
    if log is not None:
        o, v = got["ours"], got["vllm"]
        print(f"    -> goodput {o['goodput']:.4g} (ours) vs {v['goodput']:.4g} (vllm bench serve) req/s; p99 TTFT "
              f"{o['ttft_p99']:.0f} vs {v['ttft_p99']:.0f} ms; mean TPOT {o['tpot_mean']:.2f} vs "
              f"{v['tpot_mean']:.2f} ms{work_text(got)}", file=log, flush=True)
    return {**got, "gpus": dep.topology.gpus}


def _cross_check_summary(checks: dict[str, dict[str, Any]], same: bool) -> dict[str, Any]:
    """Both sides' cross-checks and the winner's gain over the baseline as each tool measured it (per GPU)."""
    out: dict[str, Any] = {"winner": checks.get("winner"), "baseline": checks.get("winner") if same
                           else checks.get("baseline")}
    w, b = out["winner"] or {}, out["baseline"] or {}
    if "ours" in w and "ours" in b:
        gain = {}
        for tool in ("ours", "vllm"):
            wv, bv = w[tool]["goodput"] / max(w["gpus"], 1), b[tool]["goodput"] / max(b["gpus"], 1)
            gain[tool] = wv / bv - 1.0 if bv > 0 else None
        out["goodput_gain_per_gpu"] = gain
    return out


def measure_scaling(ctx: StudyContext, winner: FrozenTrial, log: Any = None) -> dict[str, Any] | None:
    """The winner once with the replicas that fill the node (what the emitted config deploys), measured as a
    trial is (a capacity search starts at the one server's capacity x replicas): its per-GPU value over the one
    server's is the scaling efficiency. None when one server already fills the node (or on a CPU host)."""
    settings = settings_of(winner)
    replicas = fill_replicas(settings, node_gpus(ctx))
    if replicas <= 1 or not ctx.objective.per_gpu or not winner.values or winner.values[0] <= 0:
        return None
    scaled = {**settings, "replicas": replicas}
    if log is not None:
        print(f"[confirm scaling] trial #{winner.number} x {replicas} replicas on {gpus_used(scaled)} GPUs",
              file=log, flush=True)
    ev = evaluate(ctx, scaled, "confirm-scaling", incumbent=list(winner.values))
    value = ev.values[0] if ev.values and ev.failure is None and not ev.pruned_reason else None
    one = float(winner.values[0])
    out = {"replicas": replicas, "gpus": gpus_used(scaled), "settings": scaled, "value_per_gpu": value,
           "one_server_per_gpu": one, "efficiency": (value / one) if value is not None else None,
           "failure": ev.pruned_reason or (ev.failure.message[:300] if ev.failure is not None else None),
           "client_valid": not _client_limited(ev), "capacity": ev.capacity}
    if log is not None:
        eff = out["efficiency"]
        print(f"    -> per GPU {value if value is None else f'{value:.4g}'} vs one server {one:.4g}: scaling "
              f"efficiency {'-' if eff is None else f'{eff:.0%}'}", file=log, flush=True)
    return out


Phase = tuple[str, "dict[str, Any] | None", list[tuple[int, tuple[str, FrozenTrial]]]]


def _phases(ctx: StudyContext, pairs: list[tuple[str, FrozenTrial]], sides: dict[str, dict[str, Any]],
            repeats: int) -> Iterator[Phase]:
    """(mode, live deployments by role or None, the repeats to run on them). Each phase's servers are up only
    while the caller works through its repeats; closing the generator tears them down."""
    interleaved = [(i, pair) for i in range(repeats) for pair in pairs]
    if getattr(ctx, "slots", None) is None:
        yield MODE_FRESH, None, interleaved
        return
    plans = [plan_settings(ctx, sides[who]) for who, _ in pairs]
    if any(ev.pruned_reason for ev, _ in plans):
        yield MODE_FRESH, None, interleaved
        return
    needs = {who: n for (who, _), (_, n) in zip(pairs, plans)}
    if not ctx.slots.gpu_ids or sum(needs.values()) <= ctx.slots.capacity:
        with _deployed(ctx, pairs, sides, needs) as deps:
            if deps is not None:
                yield MODE_LIVE, deps, interleaved
                return
    left = interleaved
    failed: list[tuple[str, FrozenTrial]] = []
    if len(pairs) > 1:
        for pair, block in alternating_blocks(pairs, repeats):
            if any(p is pair for p in failed):
                continue  # it did not start for an earlier block: its repeats go to fresh servers
            with _deployed(ctx, [pair], sides, needs, tag=f"-r{block[0] + 1}") as deps:
                if deps is None:
                    failed.append(pair)  # no free devices for it now, or it failed to start: fresh servers (which
                    continue             # wait for the devices) for its repeats, at the end
                yield MODE_BLOCKS, deps, [(i, pair) for i in block]
            left = [(i, p) for i, p in left if not (p is pair and i in block)]
    if left:
        yield MODE_FRESH, None, left


def alternating_blocks(pairs: list[Any], repeats: int) -> list[tuple[Any, list[int]]]:
    """Each side's repeat indices in blocks, one server start per block, when the sides cannot be up together:
    A, B B, A A, B, ... (the first block one long, then blocks of two), so each side's repeats sit as early as the
    other's on average and, from 3 repeats on, come from more than one server start."""
    if len(pairs) < 2:
        return [(pairs[0], list(range(repeats)))] if pairs else []
    done, out, side, size = [0, 0], [], 0, 1
    while min(done) < repeats:
        n = min(size, repeats - done[side])
        if n > 0:
            out.append((pairs[side], list(range(done[side], done[side] + n))))
            done[side] += n
        side, size = 1 - side, 2
    return out


@contextlib.contextmanager
def _deployed(ctx: StudyContext, pairs: list[tuple[str, FrozenTrial]], sides: dict[str, dict[str, Any]],
              needs: dict[str, int], tag: str = "") -> Iterator[dict[str, Any] | None]:
    """These configurations started at once on free devices (disjoint GPU sets), or None when they do not fit now."""
    with contextlib.ExitStack() as stack:
        try:
            jobs = []
            for who, trial in pairs:
                # GPUs: all need free devices now; CPU: only one of them is under load at any time
                slot = (stack.enter_context(ctx.slots.acquire(needs[who], timeout_s=SLOT_WAIT_S))
                        if ctx.slots.gpu_ids else ctx.slots.cpu_host_slot())
                jobs.append(DeployJob(ctx.model, sides[who], slot, ctx.study_dir / "logs" / f"confirm-{who}{tag}"))
            deps = stack.enter_context(deploy_together(jobs, start_timeout_s=ctx.start_timeout_s))
        except (TimeoutError, ValueError, ServerStartError):
            deps = None
        if not deps:
            stack.close()
            yield None
            return
        yield {who: dep for (who, _), dep in zip(pairs, deps)}
