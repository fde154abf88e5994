"""Secure aggregation's parties without a broker: hospitals that mask, share and hold shares on
disk, and the aggregator's planner and durable ledger, passing the protocol's events in memory.

Keys are real (a federation CA, client certificates, signed X25519 records verified by each
hospital), shares are sealed and opened, holders and the ledger write their files; "killing" a
party is dropping its object and opening a new one over the same directory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from aggregator.aggregation import StalenessPolicy, buffer_weights
from aggregator.secure_unmask import FoldPlan, PendingMasked, UnmaskLedger, plan_fold, unmask
from common.secure_aggregation import (
    KeyRecord,
    KeyRefused,
    ShareRefused,
    Term,
    from_bytes,
    sign_key_record,
    verify_key_record,
)
from common.secure_aggregation.events import (
    MaskedUpload,
    UnmaskAnswer,
    UnmaskRefusal,
    UnmaskRequest,
)
from common.secure_aggregation.policy import SecureAggregationPolicy, knobs_refusal
from edge_node.secure_holder import SecureUpload, ShareHolder, load_agreement_key, mask_for_upload
from healthnet.deploy.pki import CertificateAuthority

FEDERATION = "heart"
HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
POLICY = SecureAggregationPolicy(holders=HOSPITALS)  # T = 1, U = 3, sums of 3 hospitals
SIZE = 28  # the heart federation's logistic regression
NOW = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)
RESOLUTION = POLICY.plan.resolution


@dataclass
class Federation:
    """Four hospitals with verified keys and open share stores; the aggregator's masked inbox."""

    root: Path
    ca: CertificateAuthority
    records: dict[str, KeyRecord]
    holders: dict[str, ShareHolder]
    stack: ExitStack
    inbox: dict[str, MaskedUpload] = dataclasses.field(default_factory=dict)
    receipts: dict[str, set[str]] = dataclasses.field(default_factory=dict)

    def keys_seen_by(self, identity: str) -> dict[str, X25519PublicKey]:
        """The keys ``identity`` accepts: every other hospital's record, verified."""
        return {
            other: verify_key_record(
                record,
                ca_certificate_pem=self.ca.certificate_pem,
                federation=FEDERATION,
                identity=other,
                now=NOW,
            )
            for other, record in self.records.items()
            if other != identity
        }

    def mask(self, sender: str, update_id: str, delta: np.ndarray, seed: int = 0) -> SecureUpload:
        """``sender`` masks ``delta`` and seals its shares; nothing is delivered."""
        return mask_for_upload(
            delta,
            policy=POLICY,
            federation=FEDERATION,
            identity=sender,
            own_key=load_agreement_key(self.root / sender),
            holder_keys=self.keys_seen_by(sender),
            update_id=update_id,
            base_version=0,
            num_samples=100,
            rng=np.random.default_rng(seed),
            random_bytes=np.random.default_rng(seed + 1).bytes,
        )

    def send(self, sender: str, update_id: str, delta: np.ndarray, seed: int = 0) -> SecureUpload:
        """``sender`` masks ``delta``; its shares reach every holder, which receipt them."""
        secure = self.mask(sender, update_id, delta, seed)
        receipts = {self.holders[sender].keep_own(update_id, secure.own_share).holder}
        sender_key = load_agreement_key(self.root / sender).public_key()
        for share in secure.shares:
            receipts.add(self.holders[share.recipient].accept(share, sender_key).holder)
        self.inbox[update_id] = secure.upload
        self.receipts[update_id] = receipts
        return secure

    def pending(self, update_ids: list[str], staleness: list[int]) -> list[PendingMasked]:
        uploads = [self.inbox[u] for u in update_ids]
        coefficients = buffer_weights(
            [u.num_samples for u in uploads], staleness, StalenessPolicy(), 1.0
        )
        return [
            PendingMasked(
                update_id=u.update_id,
                sender=u.sender,
                coefficient=c,
                masked=from_bytes(u.masked, SIZE),
                receipts=frozenset(self.receipts[u.update_id]),
            )
            for u, c in zip(uploads, coefficients, strict=True)
        ]

    def masked(self) -> dict[str, np.ndarray]:
        return {u: from_bytes(up.masked, SIZE) for u, up in self.inbox.items()}

    def reopen(self, identity: str) -> ShareHolder:
        """Kill a holder and start it again over the same directory."""
        self.holders[identity].__exit__(None, None, None)
        self.holders[identity] = self.stack.enter_context(holder_at(self.root, identity))
        return self.holders[identity]


def holder_at(root: Path, identity: str) -> ShareHolder:
    return ShareHolder(
        root / identity,
        federation=FEDERATION,
        identity=identity,
        policy=POLICY,
        size=SIZE,
        own_key=load_agreement_key(root / identity),
    )


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(FEDERATION, days=30, now=NOW)


@pytest.fixture
def federation(tmp_path: Path, ca: CertificateAuthority) -> Iterator[Federation]:
    records = {}
    for identity in HOSPITALS:
        issued = ca.issue_client(identity, federation=FEDERATION, days=30, now=NOW)
        records[identity] = sign_key_record(
            federation=FEDERATION,
            identity=identity,
            public_key=load_agreement_key(tmp_path / identity).public_key(),
            certificate_pem=issued.certificate,
            signing_key_pem=issued.private_key,
        )
    with ExitStack() as stack:
        holders = {h: stack.enter_context(holder_at(tmp_path, h)) for h in HOSPITALS}
        yield Federation(tmp_path, ca, records, holders, stack)


DELTAS = {
    "c-1": ("cleveland", np.linspace(-1, 1, SIZE)),
    "h-1": ("hungarian", np.full(SIZE, 0.25)),
    "s-1": ("switzerland", np.sin(np.arange(SIZE))),
}


def send_all(federation: Federation) -> None:
    for seed, (update_id, (sender, delta)) in enumerate(DELTAS.items()):
        federation.send(sender, update_id, delta, seed=10 * seed)


def plan(
    federation: Federation, fold_id: str = "f-1", staleness: tuple[int, ...] = (0, 2, 5)
) -> FoldPlan:
    got = plan_fold(POLICY, fold_id, federation.pending(list(DELTAS), list(staleness)))
    assert isinstance(got, FoldPlan), got
    return got


def ask(federation: Federation, request: UnmaskRequest, who: tuple[str, ...]) -> list[UnmaskAnswer]:
    answers = []
    for holder in who:
        answer = federation.holders[holder].answer(request)
        assert isinstance(answer, UnmaskAnswer), answer
        answers.append(answer)
    return answers


def expected_sum(staleness: tuple[int, ...] = (0, 2, 5)) -> np.ndarray:
    coefficients = buffer_weights([100] * 3, list(staleness), StalenessPolicy(), 1.0)
    return sum(c * d for c, (_, d) in zip(coefficients, DELTAS.values(), strict=True))


# -- the happy path


def test_the_unmasked_fold_is_the_staleness_weighted_sum(federation: Federation) -> None:
    """Three hospitals mask and share; three holders answer; the aggregator gets Σ w_i Δ_i."""
    send_all(federation)
    fold = plan(federation)
    assert fold.holders == HOSPITALS  # everyone receipted everything
    answers = ask(federation, fold.request(), HOSPITALS[:3])
    got = unmask(POLICY, fold, federation.masked(), answers)
    assert np.allclose(got, expected_sum(), atol=4 * RESOLUTION + 1e-3 * 1.0)


def test_what_the_aggregator_holds_of_an_update_is_not_the_update(federation: Federation) -> None:
    """The masked upload's elements are nowhere near the quantized update."""
    secure = federation.send("cleveland", "c-9", np.zeros(SIZE))
    masked = from_bytes(secure.upload.masked, SIZE)
    # A zero update quantizes to 0; its masked form is spread over the whole field.
    assert np.count_nonzero(masked) == SIZE
    assert masked.max() - masked.min() > 2**28


def test_a_contributor_that_drops_out_after_sending_still_yields_the_sum(
    federation: Federation,
) -> None:
    """Cleveland sends and disappears: the three others answer and the fold completes."""
    send_all(federation)
    fold = plan(federation)
    federation.holders["cleveland"].__exit__(None, None, None)
    answers = ask(federation, fold.request(), ("hungarian", "switzerland", "va"))
    got = unmask(POLICY, fold, federation.masked(), answers)
    assert np.allclose(got, expected_sum(), atol=4 * RESOLUTION + 1e-3)


def test_two_answers_are_not_enough(federation: Federation) -> None:
    """With U = 3, two holders' answers rebuild nothing."""
    send_all(federation)
    fold = plan(federation)
    answers = ask(federation, fold.request(), ("hungarian", "va"))
    with pytest.raises(ValueError, match="needed"):
        unmask(POLICY, fold, federation.masked(), answers)


# -- the planner waits for what it needs


def test_the_planner_waits_for_enough_distinct_hospitals(federation: Federation) -> None:
    """Two updates of cleveland and one of hungarian are two hospitals: not yet."""
    federation.send("cleveland", "c-1", np.zeros(SIZE))
    federation.send("cleveland", "c-2", np.zeros(SIZE))
    federation.send("hungarian", "h-1", np.zeros(SIZE))
    reason = plan_fold(POLICY, "f", federation.pending(["c-1", "c-2", "h-1"], [0, 0, 0]))
    assert reason == "2 distinct hospitals buffered, 3 needed"


def test_the_planner_waits_until_enough_holders_hold_every_share(federation: Federation) -> None:
    """Receipts from only two holders for one update: the sum could not be answered yet."""
    send_all(federation)
    federation.receipts["s-1"] = {"switzerland", "va"}
    reason = plan_fold(POLICY, "f", federation.pending(list(DELTAS), [0, 0, 0]))
    assert reason == "2 holders hold every share, 3 needed"


# -- crashes


def test_an_aggregator_killed_mid_unmasking_asks_the_same_sum_again(
    federation: Federation, tmp_path: Path
) -> None:
    """Plan recorded, two answers in, kill: the reopened ledger has the same plan; holders that
    answered answer again with the same bytes; the fold completes once and is closed."""
    send_all(federation)
    ledger_dir = tmp_path / "aggregator"
    fold = plan(federation)
    with UnmaskLedger(ledger_dir) as ledger:
        ledger.record(fold)
        first = ask(federation, fold.request(), ("cleveland", "hungarian"))
    # Killed. A new process: the plan is still open, and is asked again unchanged.
    with UnmaskLedger(ledger_dir) as ledger:
        (again,) = ledger.open_plans()
        assert again == fold
        answers = ask(federation, again.request(), ("cleveland", "hungarian", "va"))
        assert [a.share_sum for a in answers[:2]] == [a.share_sum for a in first]
        got = unmask(POLICY, again, federation.masked(), answers)
        assert np.allclose(got, expected_sum(), atol=4 * RESOLUTION + 1e-3)
        ledger.close(again.fold_id, version=1)
    with UnmaskLedger(ledger_dir) as ledger:
        assert ledger.open_plans() == []
        replanned = plan(federation, fold_id="f-2")
        with pytest.raises(ValueError, match="already planned: c-1, h-1, s-1"):
            ledger.record(replanned)


def test_a_holder_killed_after_recording_a_release_answers_the_same_again(
    federation: Federation,
) -> None:
    """The release is on disk before the answer: after a restart the same request gets the same
    bytes, and a different sum over the same masks is still refused."""
    send_all(federation)
    fold = plan(federation)
    (before,) = ask(federation, fold.request(), ("va",))
    holder = federation.reopen("va")
    (after,) = ask(federation, fold.request(), ("va",))
    assert after.share_sum == before.share_sum
    other = plan(federation, fold_id="f-2", staleness=(3, 3, 3))
    refusal = holder.answer(other.request())
    assert isinstance(refusal, UnmaskRefusal)
    assert "already released in another sum" in refusal.reason


# -- a dishonest aggregator


def test_no_mask_is_unmasked_in_two_different_sums(federation: Federation) -> None:
    """The aggregator asks three holders for one sum, then the others for a second sum of the
    same masks with other weights: the holders that answered refuse, and the one left is
    fewer than U."""
    send_all(federation)
    first = plan(federation)
    ask(federation, first.request(), ("cleveland", "hungarian", "switzerland"))
    second = plan(federation, fold_id="f-2", staleness=(9, 0, 0))
    answers = [federation.holders[h].answer(second.request()) for h in HOSPITALS]
    refused = [a for a in answers if isinstance(a, UnmaskRefusal)]
    assert [r.holder for r in refused] == ["cleveland", "hungarian", "switzerland"]
    assert len(answers) - len(refused) < POLICY.scheme.threshold


def test_a_sum_of_too_few_hospitals_is_refused(federation: Federation) -> None:
    """The aggregator asks for cleveland's and hungarian's masks alone (two hospitals)."""
    send_all(federation)
    request = UnmaskRequest(
        fold_id="peek",
        policy_digest=POLICY.digest(),
        terms=(Term("c-1", "cleveland", 1), Term("h-1", "hungarian", 1)),
    )
    refusal = federation.holders["va"].answer(request)
    assert isinstance(refusal, UnmaskRefusal)
    assert "fewer than 3" in refusal.reason


def test_a_request_that_misnames_a_sender_is_refused(federation: Federation) -> None:
    """Passing cleveland's update off as va's to reach the count of hospitals: refused."""
    send_all(federation)
    request = UnmaskRequest(
        fold_id="f-x",
        policy_digest=POLICY.digest(),
        terms=(
            Term("c-1", "cleveland", 1),
            Term("h-1", "hungarian", 1),
            Term("s-1", "va", 1),
        ),
    )
    refusal = federation.holders["hungarian"].answer(request)
    assert isinstance(refusal, UnmaskRefusal)
    assert "wrong sender for s-1" in refusal.reason


# -- keys and shares


def test_a_substituted_key_record_is_refused_and_nothing_is_masked_for_it(
    federation: Federation,
) -> None:
    """The broker swaps va's retained key record for one with its own key: every hospital
    refuses it, and a node without va's verified key masks nothing."""
    genuine = federation.records["va"]
    federation.records["va"] = dataclasses.replace(
        genuine, public_key=X25519PrivateKey.generate().public_key().public_bytes_raw()
    )
    with pytest.raises(KeyRefused, match="signature"):
        federation.keys_seen_by("cleveland")
    federation.records["va"] = genuine
    keys = federation.keys_seen_by("cleveland")
    del keys["va"]  # what cleveland holds while va's only record is the forged one
    with pytest.raises(ValueError, match="no verified key for holders va"):
        mask_for_upload(
            np.zeros(SIZE),
            policy=POLICY,
            federation=FEDERATION,
            identity="cleveland",
            own_key=load_agreement_key(federation.root / "cleveland"),
            holder_keys=keys,
            update_id="c-1",
            base_version=0,
            num_samples=1,
            rng=np.random.default_rng(0),
            random_bytes=np.random.default_rng(1).bytes,
        )


def test_a_holder_refuses_a_second_different_share_of_one_update(federation: Federation) -> None:
    """A replayed share is receipted again; a different share for the same update id is not."""
    first = federation.send("cleveland", "c-1", np.zeros(SIZE), seed=1)
    share = next(s for s in first.shares if s.recipient == "va")
    key = load_agreement_key(federation.root / "cleveland").public_key()
    assert federation.holders["va"].accept(share, key).update_id == "c-1"
    second = federation.mask("cleveland", "c-1", np.ones(SIZE), seed=2)
    other = next(s for s in second.shares if s.recipient == "va")
    with pytest.raises(ShareRefused, match="second, different share"):
        federation.holders["va"].accept(other, key)


def test_a_share_from_a_non_holder_or_for_another_holder_is_refused(
    federation: Federation,
) -> None:
    """Shares addressed elsewhere, or from an identity outside the roster, are refused."""
    secure = federation.send("cleveland", "c-1", np.zeros(SIZE))
    key = load_agreement_key(federation.root / "cleveland").public_key()
    to_va = next(s for s in secure.shares if s.recipient == "va")
    with pytest.raises(ShareRefused, match="reached hungarian"):
        federation.holders["hungarian"].accept(to_va, key)
    with pytest.raises(ShareRefused, match="not another holder"):
        federation.holders["va"].accept(dataclasses.replace(to_va, sender="mallory"), key)
    with pytest.raises(ShareRefused, match="another policy"):
        federation.holders["va"].accept(dataclasses.replace(to_va, policy_digest="0" * 64), key)


# -- the policy


def test_the_policy_refuses_settings_secure_aggregation_cannot_serve() -> None:
    """Compressed updates, robust rules and buffers the policy cannot sum are refused."""
    assert knobs_refusal(POLICY, buffer_size=3, dense_updates=True, mean_aggregation=True) is None
    for kwargs, words in [
        ({"dense_updates": False}, "dense"),
        ({"mean_aggregation": False}, "mean"),
        ({"buffer_size": 17}, "max_terms"),
        ({"buffer_size": 2}, "distinct hospitals"),
    ]:
        settings = {"buffer_size": 3, "dense_updates": True, "mean_aggregation": True} | kwargs
        reason = knobs_refusal(POLICY, **settings)  # type: ignore[arg-type]
        assert reason is not None
        assert words in reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"holders": ("a", "a", "b")}, "twice", id="duplicate-holder"),
        pytest.param({"holders": ("a", "b", "c"), "recovery": 2}, "two different", id="too-few"),
        pytest.param(
            {"holders": ("a", "b", "c"), "min_contributors": 2}, "below 3", id="small-sums"
        ),
        pytest.param({"holders": ("a", "b")}, "exceeds", id="sums-larger-than-roster"),
        pytest.param({"holders": ("a/b", "c", "d")}, "invalid", id="bad-identity"),
    ],
)
def test_an_unsafe_or_impossible_policy_is_refused(kwargs: dict[str, object], message: str) -> None:
    """A policy that could leak a mask, or that could never unmask a sum, does not construct."""
    with pytest.raises(Exception, match=message):
        SecureAggregationPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_policy_digest_changes_with_every_field() -> None:
    """Updates of different rosters or thresholds are never summed: their digests differ."""
    base = SecureAggregationPolicy(holders=HOSPITALS)
    variants = [
        dataclasses.replace(base, holders=(*HOSPITALS, "extra")),
        dataclasses.replace(base, holders=tuple(reversed(HOSPITALS))),
        dataclasses.replace(base, recovery=4),
        dataclasses.replace(base, min_contributors=4),
        dataclasses.replace(base, clip=2.0),
        dataclasses.replace(base, weight_levels=512),
        dataclasses.replace(base, max_terms=8),
    ]
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == len(variants) + 1


def test_shares_of_any_valid_update_id_are_held(federation: Federation) -> None:
    """Update ids may end like the store's temp files ("x.tmp"); their shares still count."""
    for seed, (sender, update_id) in enumerate(
        [("cleveland", "a.tmp"), ("hungarian", "b.share"), ("va", "c")]
    ):
        federation.send(sender, update_id, np.zeros(SIZE), seed=seed)
    assert {"a.tmp", "b.share", "c"} <= federation.holders["switzerland"].held().keys()


def test_a_nodes_agreement_key_is_private_and_survives_a_restart(tmp_path: Path) -> None:
    """The X25519 key file is written with mode 0600 and read back, not replaced, on restart."""
    first = load_agreement_key(tmp_path / "node")
    path = tmp_path / "node" / "agreement.key"
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_agreement_key(tmp_path / "node")
    assert again.public_key().public_bytes_raw() == first.public_key().public_bytes_raw()
