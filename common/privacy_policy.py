"""What a privacy policy asks of a node, and what the aggregator admits (DESIGN §5, privacy).

:class:`~common.messages.PrivacyPolicy` is the wire schema of a policy (the run's, in the
manifest, or a hospital's own); this module holds the rules that read it. A policy is stricter
than another when it promises the patients at least as much: no less noise, no larger budget, no
larger delta. The clipping norm C scales the noise with the gradients and does not change the
guarantee, so a node may clip at any C. Pure functions of their arguments: no I/O, no torch.
"""

from __future__ import annotations

from common.messages import MetricRelease, PrivacyPolicy, PrivacySpend

__all__ = [
    "EPSILON_SLACK",
    "at_least_as_private_as",
    "delta_error",
    "effective_privacy",
    "spend_error",
]

# The accountant's epsilon is a float computed on the node; the aggregator allows this relative
# slack when it compares it with the budget, so rounding never refuses an honest update.
EPSILON_SLACK = 1e-9

_RELEASE_ORDER = (MetricRelease.EXACT, MetricRelease.ROUNDED, MetricRelease.SUPPRESSED)


def at_least_as_private_as(policy: PrivacyPolicy, asked: PrivacyPolicy) -> bool:
    """True when ``policy`` promises at least what ``asked`` does.

    A fixed noise multiplier must be at least the asked one; a calibrated policy is judged by its
    budget alone (its noise follows from the budget and the planned versions).
    """
    if policy.epsilon_budget > asked.epsilon_budget or policy.delta > asked.delta:
        return False
    if _RELEASE_ORDER.index(policy.metrics) < _RELEASE_ORDER.index(asked.metrics):
        return False
    if asked.noise_multiplier is not None:
        return policy.noise_multiplier is not None and (
            policy.noise_multiplier >= asked.noise_multiplier
        )
    return True


def effective_privacy(asked: PrivacyPolicy, own: PrivacyPolicy | None) -> PrivacyPolicy:
    """What a node trains under: the run's policy, tightened wherever the hospital asks more.

    The smaller budget and delta, the larger fixed noise and the more guarded metric release win;
    a hospital with a fixed noise multiplier keeps it when it is no smaller than the run's.
    """
    if own is None:
        return asked
    noise, calibrate = asked.noise_multiplier, asked.calibrate_versions
    if own.noise_multiplier is not None and (noise is None or own.noise_multiplier > noise):
        noise, calibrate = own.noise_multiplier, None
    elif noise is None and own.calibrate_versions is not None:
        # Both calibrate: planning more versions spreads the budget thinner, so more noise.
        calibrate = max(own.calibrate_versions, calibrate or 0)
    release = max(asked.metrics, own.metrics, key=_RELEASE_ORDER.index)
    return PrivacyPolicy(
        noise_multiplier=noise,
        calibrate_versions=calibrate,
        max_grad_norm=own.max_grad_norm,
        delta=min(asked.delta, own.delta),
        epsilon_budget=min(asked.epsilon_budget, own.epsilon_budget),
        metrics=release,
    )


def delta_error(policy: PrivacyPolicy, records: int) -> str | None:
    """Why ``policy`` cannot protect a hospital of ``records`` training records, or None.

    A delta of 1/n or more allows a mechanism that publishes one of n records outright.
    """
    if records <= 0:
        return "no training records"
    if policy.delta * records >= 1:
        return (
            f"delta {policy.delta:g} is not below 1/n for n = {records} training records "
            f"(1/n = {1 / records:.3g}): set a smaller delta"
        )
    return None


def spend_error(asked: PrivacyPolicy, spend: PrivacySpend | None, records: int) -> str | None:
    """Why an update trained at ``spend`` by a hospital claiming ``records`` training records does
    not meet the run's policy ``asked``, or None when it does."""
    if spend is None:
        return "the run asks for differential privacy and the update carries no privacy spend"
    if spend.delta > asked.delta:
        return f"delta {spend.delta:g} is above the run's {asked.delta:g}"
    if spend.delta * records >= 1:
        return f"delta {spend.delta:g} is not below 1/n for n = {records} samples"
    if spend.epsilon_budget > asked.epsilon_budget:
        return f"budget {spend.epsilon_budget:g} is above the run's {asked.epsilon_budget:g}"
    if spend.epsilon > spend.epsilon_budget * (1 + EPSILON_SLACK):
        return f"epsilon {spend.epsilon:.4g} is past the budget {spend.epsilon_budget:g}"
    if asked.noise_multiplier is not None and spend.noise_multiplier < asked.noise_multiplier:
        return (
            f"noise multiplier {spend.noise_multiplier:g} is below the run's "
            f"{asked.noise_multiplier:g}"
        )
    return None
