"""Verification policy under attack: a seeded Monte-Carlo swarm, driven by the real policy functions
(coordinator.domain.verification: new_record, sampling_rate, after_verification, is_trusted). No network, no
database: pure Python, a few seconds on 2 cores.

The model:
- --nodes nodes, the first --trusted of them trusted by ops and honest; --cheaters (a comma list of
  shares of all nodes, swept) are cheaters, drawn from the others. --jobs jobs of one compute unit
  each, every one assigned to a uniformly random node that is not quarantined.
- A cheater cheats on each of its jobs with probability --cheat-shares (swept: 1.0 always, 0.2
  "sometimes"). A completed job is re-run on an ops-trusted node other than its own with probability
  sampling_rate(its node's record) (what coordinator.service.verifier does); a re-run costs one unit.
- ASSUMPTION: a verified cheated job is always a mismatch (the comparison catches it, which is what
  the comparison tests show for random adapters, truncated training and made-up answers); a verified
  honest job passes, except for a false mismatch with probability --false-mismatch (swept: 0 and
  0.1 %, hardware flukes).
- A re-run's verdict reaches the node's record --verdict-delay jobs (swarm-wide) after the job
  completed, one round of the swarm by default: meanwhile the node keeps taking jobs.
Measured per policy x cheater share: detection (share of cheated jobs caught), cheated jobs uncaught,
and per cheater the cheated jobs it got away with (uncaught, all before its quarantine), cheaters
quarantined and the jobs each ran until then, honest nodes quarantined, and overhead = re-run units /
job units (goal <= 10 %), over the whole run and over its last quarter (after warm-up). Baseline, in
the same run and on the same random streams: a fixed 5 % sampling rate (minimum = maximum = base =
5 %); the adaptive default's overhead and catches are printed against it as ratios. A last table runs
an honest swarm for longer to show the adaptive overhead's warm-up toward its minimum rate.

    python bench/verification.py [--nodes 200] [--jobs 20000] [--cheaters 0,0.05,0.2] [--seed 1]
                                 [--repeats 3] [--output bench/results/verification.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from random import Random

REPOSITORY = Path(__file__).resolve().parent.parent
# This directory holds bench/coordinator.py: the repository must come first so `coordinator` is the package.
sys.path.insert(0, str(REPOSITORY))
from compute_swarm.coordinator.domain.verification import (  # noqa: E402
    MISMATCH,
    PASSED,
    OverheadBudget,
    VerificationPolicy,
    after_verification,
    new_record,
    sampling_rate,
)

BASELINE = "fixed 5 %"
DEFAULT = "adaptive (default)"
POLICIES: dict[str, VerificationPolicy] = {
    DEFAULT: VerificationPolicy(),
    "adaptive, strict": VerificationPolicy(quarantine_after_mismatches=1, minimum_rate=0.02),
    "adaptive, no budget": VerificationPolicy(overhead_budget=1.0),
    "adaptive, slow warm-up": VerificationPolicy(initial_error_rate=0.1, clean_decay=0.95),
    BASELINE: VerificationPolicy(base_rate=0.05, minimum_rate=0.05, maximum_rate=0.05),
    "fixed 10 %": VerificationPolicy(base_rate=0.10, minimum_rate=0.10, maximum_rate=0.10),
}
OVERHEAD_GOAL = 0.10
WARM_UP_JOBS_PER_NODE = (25, 50, 100, 250, 500, 1000, 2000)


@dataclass(frozen=True)
class Scenario:
    nodes: int
    jobs: int
    trusted: int
    cheaters: int
    cheat_share: float
    false_mismatch: float
    verdict_delay: int


@dataclass
class Outcome:
    jobs: int = 0
    reruns: int = 0
    late_jobs: int = 0  # jobs in the last quarter of the run
    late_reruns: int = 0
    unavailable: int = 0  # sampled, but no trusted node other than the job's own to re-run it
    cheated: int = 0
    caught: int = 0
    cheaters: int = 0
    cheaters_quarantined: int = 0
    honest_quarantined: int = 0
    got_away: list[int] | None = None  # per cheater: cheated jobs not caught
    jobs_to_quarantine: list[int] | None = None  # per quarantined cheater: jobs it ran until then

    def add(self, other: Outcome) -> None:
        for name, value in asdict(other).items():
            if isinstance(value, list):
                setattr(self, name, (getattr(self, name) or []) + value)
            else:
                setattr(self, name, getattr(self, name) + value)


def simulate(policy: VerificationPolicy, scenario: Scenario, seed: str) -> Outcome:
    """One run of the swarm. The same seed gives every policy the same cheaters and random streams."""
    choose, behave, sample = Random(f"{seed}/choose"), Random(f"{seed}/behave"), Random(f"{seed}/sample")
    nodes = scenario.nodes
    records = [new_record(policy)] * nodes
    ops_trusted = list(range(scenario.trusted))
    for node in ops_trusted:
        records[node] = replace(records[node], trusted_by_ops=True)
    cheaters = set(choose.sample(range(scenario.trusted, nodes), scenario.cheaters))
    active = list(range(nodes))
    ran, cheated, caught = [0] * nodes, [0] * nodes, [0] * nodes
    quarantined_after: dict[int, int] = {}
    pending: deque[tuple[int, int, str]] = deque()  # (due at job index, node, outcome), in due order
    outcome = Outcome(jobs=scenario.jobs, cheaters=len(cheaters))
    budget = OverheadBudget(policy.overhead_budget)
    late_from = scenario.jobs - scenario.jobs // 4

    def conclude(node: int, result: str) -> None:
        before = records[node]
        after = after_verification(before, result, policy)
        records[node] = after
        if after.quarantined and not before.quarantined:
            quarantined_after[node] = ran[node]
            active.remove(node)

    for index in range(scenario.jobs):
        while pending and pending[0][0] <= index:
            _, node, result = pending.popleft()
            conclude(node, result)
        if not active:
            outcome.jobs = index
            break
        node = active[choose.randrange(len(active))]
        ran[node] += 1
        late = index >= late_from
        outcome.late_jobs += late
        cheats = node in cheaters and behave.random() < scenario.cheat_share
        cheated[node] += cheats
        if sample.random() >= budget.rate(sampling_rate(records[node], policy)):
            continue
        if not any(other != node and not records[other].quarantined for other in ops_trusted):
            outcome.unavailable += 1
            continue
        outcome.reruns += 1
        outcome.late_reruns += late
        if cheats:
            caught[node] += 1
            result = MISMATCH
        else:
            result = MISMATCH if behave.random() < scenario.false_mismatch else PASSED
        pending.append((index + scenario.verdict_delay, node, result))
    while pending:  # verdicts of re-runs still under way when the last job completed
        _, node, result = pending.popleft()
        conclude(node, result)

    outcome.cheated = sum(cheated)
    outcome.caught = sum(caught)
    outcome.got_away = [cheated[node] - caught[node] for node in sorted(cheaters)]
    outcome.jobs_to_quarantine = [
        quarantined_after[node] for node in sorted(cheaters) if node in quarantined_after
    ]
    outcome.cheaters_quarantined = len(outcome.jobs_to_quarantine)
    outcome.honest_quarantined = sum(1 for node in quarantined_after if node not in cheaters)
    return outcome


def run(policy: VerificationPolicy, scenario: Scenario, seed: int, repeats: int) -> Outcome:
    total = Outcome(got_away=[], jobs_to_quarantine=[])
    for repeat in range(repeats):
        label = f"{seed}/{repeat}/{scenario.cheaters}/{scenario.cheat_share}/{scenario.false_mismatch}"
        total.add(simulate(policy, scenario, label))
    return total


def summary(outcome: Outcome, repeats: int) -> dict:
    got_away = outcome.got_away or []
    to_quarantine = outcome.jobs_to_quarantine or []
    return {
        "detection_rate": outcome.caught / outcome.cheated if outcome.cheated else None,
        "cheated_jobs": outcome.cheated / repeats,
        "caught_jobs": outcome.caught / repeats,
        "uncaught_jobs": (outcome.cheated - outcome.caught) / repeats,
        "got_away_per_cheater_mean": statistics.fmean(got_away) if got_away else None,
        "got_away_per_cheater_max": max(got_away) if got_away else None,
        "cheaters_quarantined_share": outcome.cheaters_quarantined / outcome.cheaters
        if outcome.cheaters
        else None,
        "jobs_until_quarantine_mean": statistics.fmean(to_quarantine) if to_quarantine else None,
        "honest_quarantined": outcome.honest_quarantined / repeats,
        "overhead": outcome.reruns / outcome.jobs if outcome.jobs else 0.0,
        "overhead_last_quarter": outcome.late_reruns / outcome.late_jobs if outcome.late_jobs else 0.0,
        "unverifiable_samples": outcome.unavailable / repeats,
    }


def percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(ours: float | None, baseline: float | None) -> str:
    if ours is None or baseline is None:
        return "-"
    if baseline == 0:
        return "-" if ours == 0 else "inf"
    return f"{ours / baseline:.2f}x"


HEADER = (
    f"{'policy':20}{'cheaters':>9}{'detect':>8}{'uncaught':>9}{'got away':>11}{'quarant.':>9}"
    f"{'jobs to q':>10}{'honest q':>9}{'overhead':>9}{'last 1/4':>9}  goal"
)


def row(name: str, share: float, result: dict) -> str:
    got_away = (
        f"{number(result['got_away_per_cheater_mean'])}/{number(result['got_away_per_cheater_max'], 0)}"
    )
    verdict = "ok" if result["overhead"] <= OVERHEAD_GOAL else "OVER"
    return (
        f"{name:20}{percent(share, 0):>9}{percent(result['detection_rate']):>8}"
        f"{number(result['uncaught_jobs']):>9}{got_away:>11}{percent(result['cheaters_quarantined_share'], 0):>9}"
        f"{number(result['jobs_until_quarantine_mean']):>10}{number(result['honest_quarantined'], 2):>9}"
        f"{percent(result['overhead']):>9}{percent(result['overhead_last_quarter']):>9}  {verdict}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument(
        "--trusted", type=int, default=5, help="nodes trusted by ops (honest; they run re-runs)"
    )
    parser.add_argument("--cheaters", default="0,0.05,0.2", help="shares of all nodes that cheat, comma list")
    parser.add_argument("--cheat-shares", default="1,0.2", help="share of its jobs a cheater cheats on")
    parser.add_argument("--false-mismatch", default="0,0.001", help="an honest job's false mismatch rate")
    parser.add_argument(
        "--verdict-delay", type=int, help="jobs between a completion and its verdict (--nodes)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, pooled (different seeds)")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "bench" / "results" / "verification.json")
    arguments = parser.parse_args()
    if arguments.trusted < 2 or arguments.trusted >= arguments.nodes:
        parser.error(
            "--trusted must be at least 2 (a trusted node's own jobs go to another) and below --nodes"
        )
    cheater_shares = [float(value) for value in arguments.cheaters.split(",")]
    cheat_shares = [float(value) for value in arguments.cheat_shares.split(",")]
    false_mismatches = [float(value) for value in arguments.false_mismatch.split(",")]
    delay = arguments.nodes if arguments.verdict_delay is None else arguments.verdict_delay
    untrusted = arguments.nodes - arguments.trusted

    started = time.monotonic()
    print(
        f"Verification Monte-Carlo: {arguments.nodes} nodes ({arguments.trusted} trusted by ops, honest, "
        f"running the re-runs), {arguments.jobs} jobs of 1 unit on random non-quarantined nodes, a re-run "
        f"costs 1 unit; verdicts land {delay} jobs after the completion; {arguments.repeats} runs per row "
        f"pooled, seed {arguments.seed}.\n"
        "Assumption: a verified cheated job is always caught (a mismatch); a verified honest job passes "
        "but for the false-mismatch rate.\n"
        "Columns: detect = cheated jobs caught / cheated jobs; uncaught = cheated jobs never caught (per "
        "run); got away = per cheater, uncaught cheated jobs, mean/max (all before its quarantine); "
        "quarant. = cheaters quarantined; jobs to q = jobs a cheater ran until quarantined (mean); "
        "honest q = honest nodes quarantined (per run); overhead = re-run units / job units, whole run "
        f"and its last quarter; goal: overhead <= {OVERHEAD_GOAL:.0%}. Baseline: {BASELINE}.\n"
    )
    sections = []
    for cheat_share in cheat_shares:
        for false_mismatch in false_mismatches:
            title = (
                f"cheaters cheat on {cheat_share:.0%} of their jobs, honest false-mismatch rate "
                f"{false_mismatch:.1%}"
            )
            print(title)
            print(HEADER)
            rows, comparisons = [], []
            for share in cheater_shares:
                scenario = Scenario(
                    nodes=arguments.nodes,
                    jobs=arguments.jobs,
                    trusted=arguments.trusted,
                    cheaters=min(untrusted, round(share * arguments.nodes)),
                    cheat_share=cheat_share,
                    false_mismatch=false_mismatch,
                    verdict_delay=delay,
                )
                results = {}
                for name, policy in POLICIES.items():
                    results[name] = summary(
                        run(policy, scenario, arguments.seed, arguments.repeats), arguments.repeats
                    )
                    print(row(name, share, results[name]))
                    rows.append(
                        {
                            "policy": name,
                            "cheater_share": share,
                            "cheaters": scenario.cheaters,
                            **results[name],
                        }
                    )
                ours, baseline = results[DEFAULT], results[BASELINE]
                comparison = {
                    "cheater_share": share,
                    "overhead_ratio": ratio(ours["overhead"], baseline["overhead"]),
                    "overhead_last_quarter_ratio": ratio(
                        ours["overhead_last_quarter"], baseline["overhead_last_quarter"]
                    ),
                    "caught_ratio": ratio(ours["caught_jobs"], baseline["caught_jobs"]),
                    "uncaught_ratio": ratio(ours["uncaught_jobs"], baseline["uncaught_jobs"]),
                }
                comparisons.append(comparison)
                print(
                    f"  {DEFAULT} against {BASELINE}, {share:.0%} cheaters: overhead "
                    f"{comparison['overhead_ratio']} (last quarter {comparison['overhead_last_quarter_ratio']}), "
                    f"cheated jobs caught {comparison['caught_ratio']}, "
                    f"uncaught {comparison['uncaught_ratio']}"
                )
            sections.append(
                {
                    "cheat_share": cheat_share,
                    "false_mismatch": false_mismatch,
                    "rows": rows,
                    "ours_vs_baseline": comparisons,
                }
            )
            print()

    print(f"Warm-up: an honest swarm of {arguments.nodes} nodes, no flukes, overhead against jobs per node")
    print(f"{'policy':20}{'jobs/node':>10}{'overhead':>10}{'last 1/4':>10}")
    warm_up = []
    for name, policy in POLICIES.items():
        if policy.minimum_rate == policy.maximum_rate:
            continue  # fixed: the same at any age
        for per_node in WARM_UP_JOBS_PER_NODE:
            scenario = Scenario(
                arguments.nodes, per_node * arguments.nodes, arguments.trusted, 0, 0.0, 0.0, delay
            )
            result = summary(run(policy, scenario, arguments.seed, 1), 1)
            warm_up.append({"policy": name, "jobs_per_node": per_node, **result})
            print(
                f"{name:20}{per_node:>10}{percent(result['overhead']):>10}"
                f"{percent(result['overhead_last_quarter']):>10}"
            )
    seconds = time.monotonic() - started
    print(f"\n{seconds:.1f} s")

    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(
        json.dumps(
            {
                "model": {
                    "nodes": arguments.nodes,
                    "jobs": arguments.jobs,
                    "trusted_by_ops": arguments.trusted,
                    "verdict_delay_jobs": delay,
                    "repeats": arguments.repeats,
                    "seed": arguments.seed,
                    "assumption": "a verified cheated job is always a mismatch; a verified honest job "
                    "passes except at the false-mismatch rate",
                },
                "policies": {name: asdict(policy) for name, policy in POLICIES.items()},
                "baseline": BASELINE,
                "ours": DEFAULT,
                "overhead_goal": OVERHEAD_GOAL,
                "sections": sections,
                "warm_up": warm_up,
                "seconds": round(seconds, 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
