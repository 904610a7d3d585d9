"""Verification of untrusted nodes, as pure decisions: which completed jobs (and paid sweep trials
stopped early) are re-run on a trusted node, how a re-run is compared with what the node delivered,
and how the node's record changes.

Sampling is adaptive, in the way BOINC's adaptive replication is: each node carries an estimate of
its error rate. A new node starts at `initial_error_rate`; every clean verification multiplies the
estimate by `clean_decay`, every mismatch adds `mismatch_penalty`. A completed job is verified with
probability base_rate × estimate / target_error_rate, held between minimum_rate and maximum_rate: a new
node is checked often (15 % with the defaults, falling to 5 % after about 10 clean checks), one with a
long clean record rarely (1 %), one that just cheated on every other job.

On top, an OverheadBudget keeps re-runs at most `overhead_budget` of the swarm's compute: when the rates
wanted lately average more (a wave of new nodes, many suspects), every rate is scaled down by the same
factor, so the riskiest nodes stay the most watched. bench/verification.py measures detection and
overhead for swarms with cheaters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from compute_swarm.protocol import finite_or_none

PASSED, MISMATCH = "passed", "mismatch"


@dataclass(frozen=True)
class VerificationPolicy:
    base_rate: float = 0.05  # a node whose error estimate is at target_error_rate
    minimum_rate: float = 0.01  # a node with a long clean record
    maximum_rate: float = 0.5
    initial_error_rate: float = 0.06
    target_error_rate: float = 0.02
    clean_decay: float = 0.9
    mismatch_penalty: float = 0.25
    # The most of the swarm's compute re-runs may take, averaged over recent jobs (OverheadBudget).
    overhead_budget: float = 0.10
    # Mismatches that quarantine a node (no more jobs until ops lift it), counted since it was last
    # lifted.
    quarantine_after_mismatches: int = 2

    # LoRA: the delivered adapter's held-out loss, measured by the trusted node, may exceed the trusted
    # run's own by this much (relative, plus absolute): hardware and precision (bf16 on a GPU, fp32 on
    # a CPU) move a loss by a few percent; a random adapter or one trained on a fraction of the steps
    # is far beyond it.
    eval_loss_relative_tolerance: float = 0.10
    eval_loss_absolute_tolerance: float = 0.05
    # And the training losses the node reported, step by step, against the trusted run's: the median
    # relative difference over the steps both report.
    training_loss_relative_tolerance: float = 0.15
    # Batch inference (greedy): a line agrees when its answer and the trusted one share their first
    # `agreeing_prefix_words` words (or all of the shorter one); different hardware may break a
    # greedy tie late in an answer, so the whole answer need not match. The job passes when at least
    # `line_agreement` of its lines agree.
    agreeing_prefix_words: int = 12
    line_agreement: float = 0.9
    # And it is not much longer than the trusted one: at most this many words more, or twice as long,
    # whichever allows more (hardware may run a greedy answer on where the trusted run stopped; a node
    # padding its answers to be paid more tokens is far beyond it).
    answer_extra_words: int = 16
    # The same in tokens (counted with the model's tokenizer, else in bytes): a node padding an answer
    # with one long run of junk adds a single word but many tokens.
    answer_extra_tokens: int = 32


@dataclass(frozen=True)
class NodeRecord:
    """What verification knows of a node."""

    error_rate: float
    clean_streak: int = 0  # consecutive clean verifications
    mismatches: int = 0  # since it was last lifted from quarantine
    trusted_by_ops: bool = False
    quarantined: bool = False


def new_record(policy: VerificationPolicy) -> NodeRecord:
    return NodeRecord(error_rate=policy.initial_error_rate)


def sampling_rate(record: NodeRecord, policy: VerificationPolicy) -> float:
    """The probability that a job this node completed is re-run on a trusted node."""
    rate = policy.base_rate * record.error_rate / policy.target_error_rate
    return min(policy.maximum_rate, max(policy.minimum_rate, rate))


class OverheadBudget:
    """Scales sampling rates so that re-runs average at most `share` of the jobs completed.

    It follows the rates wanted lately (an exponential average over about 1/smoothing jobs) and, while
    that average exceeds the share, applies wanted × share / average: every node's rate shrinks by the
    same factor, so the expected re-run share is the budget and the order of suspicion is kept.
    """

    def __init__(self, share: float, smoothing: float = 0.002):
        self.share = share
        self.smoothing = smoothing
        self.recent_wanted: float | None = None

    def rate(self, wanted: float) -> float:
        """The rate to apply to a job whose node's policy wants `wanted`; records it."""
        if self.recent_wanted is None:  # a fresh coordinator: the first job sets the average
            self.recent_wanted = wanted
        self.recent_wanted += self.smoothing * (wanted - self.recent_wanted)
        if self.recent_wanted <= self.share:
            return wanted
        return wanted * self.share / self.recent_wanted


def is_trusted(record: NodeRecord, policy: VerificationPolicy) -> bool:
    """May this node verify others' work? Only when ops trust it: a clean record is no proof, since a
    node that earned trust by itself could then clear its own sybils' work."""
    return record.trusted_by_ops and not record.quarantined


def after_verification(record: NodeRecord, outcome: str, policy: VerificationPolicy) -> NodeRecord:
    """The node's record once one of its jobs was verified; a mismatch may quarantine it."""
    if outcome == PASSED:
        return replace(
            record, error_rate=record.error_rate * policy.clean_decay, clean_streak=record.clean_streak + 1
        )
    mismatches = record.mismatches + 1
    return replace(
        record,
        error_rate=min(1.0, record.error_rate + policy.mismatch_penalty),
        clean_streak=0,
        mismatches=mismatches,
        quarantined=record.quarantined or mismatches >= policy.quarantine_after_mismatches,
    )


def lifted(record: NodeRecord, policy: VerificationPolicy) -> NodeRecord:
    """Ops lift a quarantine: the node starts over with twice a new node's error estimate (its jobs
    re-run at twice a new node's rate until clean checks bring it down)."""
    return replace(
        record, quarantined=False, mismatches=0, clean_streak=0, error_rate=policy.initial_error_rate * 2
    )


# ---- comparisons


@dataclass(frozen=True)
class Verdict:
    outcome: str  # PASSED or MISMATCH
    reason: str


def compare_lora(
    *,
    delivered_eval_loss: float | None,
    trusted_eval_loss: float | None,
    reported_losses: dict[int, float],
    trusted_losses: dict[int, float],
    policy: VerificationPolicy,
) -> Verdict:
    """A fine-tune's result against a trusted re-run of the same spec (same data, seed and steps).

    delivered_eval_loss: the delivered adapter's held-out loss, measured by the trusted node (None when
    the delivered adapter could not be loaded at all). reported_losses / trusted_losses: training loss
    by step, as the node reported it and as the trusted run measured it.
    """
    if finite_or_none(trusted_eval_loss) is None:
        # Nothing to compare with (a dataset too small for a held-out split): the training losses decide.
        held_out_note = "no held-out set"
    elif finite_or_none(delivered_eval_loss) is None:
        return Verdict(
            MISMATCH, "the delivered adapter could not be evaluated (it does not fit the job's model)"
        )
    else:
        allowed = (
            trusted_eval_loss * (1 + policy.eval_loss_relative_tolerance)
            + policy.eval_loss_absolute_tolerance
        )
        if delivered_eval_loss > allowed:
            return Verdict(
                MISMATCH,
                f"the delivered adapter's held-out loss is {delivered_eval_loss:.4f}, the trusted run's "
                f"{trusted_eval_loss:.4f} (at most {allowed:.4f} allowed)",
            )
        held_out_note = f"held-out loss {delivered_eval_loss:.4f} against {trusted_eval_loss:.4f}"
    common = sorted(set(reported_losses) & set(trusted_losses))
    if trusted_losses and not common:
        return Verdict(MISMATCH, "the node reported no training loss at any step the trusted run took")
    differences = sorted(
        abs(reported_losses[step] - trusted_losses[step]) / max(abs(trusted_losses[step]), 1e-6)
        for step in common
    )
    if differences:
        median = differences[len(differences) // 2]
        if median > policy.training_loss_relative_tolerance:
            return Verdict(
                MISMATCH,
                f"the reported training losses differ from the trusted run's by {median:.0%} (median over "
                f"{len(common)} steps; at most {policy.training_loss_relative_tolerance:.0%} allowed)",
            )
        return Verdict(
            PASSED, f"{held_out_note}; training losses within {median:.1%} over {len(common)} steps"
        )
    return Verdict(PASSED, held_out_note)


def compare_stopped_trial(
    *,
    delivered_eval_loss: float | None,
    trusted_eval_loss: float | None,
    reported_losses: dict[int, float],
    trusted_losses: dict[int, float],
    same_learning_rates: bool,
    policy: VerificationPolicy,
) -> Verdict:
    """A sweep trial stopped early and paid up to a checkpoint, against a trusted run of its spec to
    that checkpoint's step: delivered_eval_loss is the checkpoint's held-out loss, measured by the
    trusted node.

    The held-out losses decide, as for a finished fine-tune. The training losses count too only when
    the two runs took the same learning rates: a re-run to step k schedules its decay over k steps, the
    trial over all of its own (the engine cannot stop a schedule part way), so with a decaying schedule
    the two runs part after the warm-up and their step losses are not expected to agree.

    A trial is stopped on a held-out loss its node reported; without a held-out set (the trusted run
    measured none) that loss cannot have been measured, and the checkpoint is not taken on trust.
    """
    if finite_or_none(trusted_eval_loss) is None:
        return Verdict(
            MISMATCH,
            "the trusted run has no held-out set, so the held-out loss the trial was stopped on was not measured",
        )
    return compare_lora(
        delivered_eval_loss=delivered_eval_loss,
        trusted_eval_loss=trusted_eval_loss,
        reported_losses=reported_losses if same_learning_rates else {},
        trusted_losses=trusted_losses if same_learning_rates else {},
        policy=policy,
    )


def line_agrees(
    delivered: str,
    trusted: str,
    policy: VerificationPolicy,
    count_tokens: Callable[[str], int] | None = None,
) -> bool:
    """Does a delivered answer agree with the trusted one? Its first words match, and it is not much
    longer in words or in tokens (`count_tokens`: the model's tokenizer; without it, bytes)."""
    delivered_words, trusted_words = delivered.split(), trusted.split()
    if len(delivered_words) > len(trusted_words) + max(policy.answer_extra_words, len(trusted_words)):
        return False
    length = count_tokens or (lambda text: len(text.encode()))
    delivered_tokens, trusted_tokens = length(delivered), length(trusted)
    if delivered_tokens > trusted_tokens + max(policy.answer_extra_tokens, trusted_tokens):
        return False
    needed = min(policy.agreeing_prefix_words, len(delivered_words), len(trusted_words))
    if needed == 0:
        return len(delivered_words) == len(trusted_words)
    return delivered_words[:needed] == trusted_words[:needed]


def compare_completions(
    delivered: Sequence[str],
    trusted: Sequence[str],
    policy: VerificationPolicy,
    count_tokens: Callable[[str], int] | None = None,
) -> Verdict:
    """A greedy batch's answers, line by line, against a trusted re-run's."""
    if len(delivered) != len(trusted):
        return Verdict(MISMATCH, f"{len(delivered)} answers delivered, the trusted run gave {len(trusted)}")
    if not trusted:
        return Verdict(PASSED, "no lines")
    agreeing = sum(
        line_agrees(mine, theirs, policy, count_tokens)
        for mine, theirs in zip(delivered, trusted, strict=True)
    )
    share = agreeing / len(trusted)
    if share < policy.line_agreement:
        return Verdict(
            MISMATCH,
            f"{agreeing} of {len(trusted)} answers agree with the trusted run's "
            f"(at least {policy.line_agreement:.0%} needed)",
        )
    return Verdict(PASSED, f"{agreeing} of {len(trusted)} answers agree with the trusted run's")
