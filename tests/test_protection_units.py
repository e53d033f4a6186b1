"""The protection pieces on their own: DP clipping, noise and accounting; robust rules; upload and broadcast codecs."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.compat.common.recorddict_compat import fitins_to_recorddict

from fedmeta.fl.aggregation import SiteUpdate, group_updates, weighted_mean
from fedmeta.fl.site_app import received_model
from fedmeta.fl.compression import Int8Codec, TopKCodec, decode_broadcast, dense_bytes, encode_broadcast
from fedmeta.fl.config import ConfigError, RunConfig
from fedmeta.fl.privacy import PrivacyAccount, PrivacyBudgetExceeded, clip_update, noise_multiplier_for, noisy_mean, update_norm
from fedmeta.fl.robust import coordinate_median, krum, robust_mean, trimmed_mean
from fedmeta.fl.secagg import received_state, secure_fit_ins
from fedmeta.fl.strategy import MetaStrategy


def _update(seed, scale=1.0, heads=("a",), spread=1.0):
    """A site's update: a direction all honest sites share plus ``spread`` of its own."""
    shared, own = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(seed)
    update = {"params.body.w": torch.randn(4, 3, generator=shared) + spread * torch.randn(4, 3, generator=own)}
    update.update({f"params.heads.{t}.w": torch.randn(2, generator=shared) + spread * torch.randn(2, generator=own) for t in ("a", "b") if t in heads})
    return {k: v * scale for k, v in update.items()}


# --- differential privacy ------------------------------------------------------


def test_clipping_bounds_the_whole_update_and_leaves_small_ones_alone():
    big = _update(0, scale=10.0)
    clipped, norm = clip_update(big, 1.0)
    assert norm > 1.0 and update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    small = {k: v * 1e-3 for k, v in big.items()}
    same, _ = clip_update(small, 1.0)
    for k in small:
        assert torch.equal(same[k], small[k])


def test_noise_has_the_calibrated_spread_and_sites_weigh_equally():
    updates = [SiteUpdate(f"s{i}", {"params.body.x": torch.full((20000,), float(i))}, {"a": 1 + 100 * i}) for i in range(4)]
    exact = noisy_mean(group_updates(updates), std=0.0)
    assert torch.allclose(exact["params.body.x"], torch.full((20000,), 1.5)), "equal site weights, whatever the example counts"
    noisy = noisy_mean(group_updates(updates), std=2.0)
    # Noise N(0, 2^2) on the sum of 4 sites: std 0.5 on the mean.
    assert float((noisy["params.body.x"] - 1.5).std()) == pytest.approx(0.5, rel=0.03)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    low, high = PrivacyAccount(0.8, 1e-5, 10, 100), PrivacyAccount(2.0, 1e-5, 10, 100)
    assert low.epsilon == 0.0
    eps = []
    for _ in range(3):
        low.spend()
        high.spend()
        eps.append(low.epsilon)
    assert eps[0] < eps[1] < eps[2]
    assert high.epsilon < low.epsilon


def test_the_budget_refuses_the_round_that_would_exceed_it_and_survives_a_checkpoint():
    account = PrivacyAccount(2.0, 1e-5, 5, 50, max_epsilon=3.0)
    spent = 0
    with pytest.raises(PrivacyBudgetExceeded, match="max_epsilon = 3"):
        while True:
            account.check_budget()
            account.spend()
            spent += 1
    assert spent >= 1 and account.epsilon <= 3.0 < account.epsilon_after(1)
    restored = PrivacyAccount(2.0, 1e-5, 5, 50, max_epsilon=3.0)
    restored.load_state_dict(account.state_dict())
    assert restored.epsilon == account.epsilon and restored.rounds == spent


def test_calibrated_noise_spends_the_asked_epsilon():
    sigma = noise_multiplier_for(4.0, 1e-5, rounds=20, sample_size=20, population=100)
    assert PrivacyAccount(sigma, 1e-5, 20, 100).epsilon_after(20) <= 4.0
    assert PrivacyAccount(sigma * 0.9, 1e-5, 20, 100).epsilon_after(20) > 4.0


def test_config_refuses_combinations_that_break_a_guarantee():
    with pytest.raises(ConfigError, match="secure.secagg"):
        RunConfig.from_dict({"secure": {"secagg": True}, "aggregation": {"rule": "median"}})
    with pytest.raises(ConfigError, match="cannot combine with secure.secagg"):
        RunConfig.from_dict({"secure": {"secagg": True}, "compression": {"upload": "topk"}})
    with pytest.raises(ConfigError, match="accounted for the mean only"):
        RunConfig.from_dict({"privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}, "aggregation": {"rule": "krum"}})
    with pytest.raises(ConfigError, match="max_epsilon needs"):
        RunConfig.from_dict({"privacy": {"max_epsilon": 4.0}})


# --- robust rules ----------------------------------------------------------------


def test_robust_rules_ignore_a_sign_flipped_minority():
    honest = [SiteUpdate(f"s{i}", _update(i, heads=("a", "b") if i < 3 else ("a",), spread=0.3), {"a": 10, "b": 10}) for i in range(8)]
    attacker = SiteUpdate("evil", {k: -10 * v for k, v in _update(99, heads=("a", "b")).items()}, {"a": 10_000, "b": 10_000})
    clean = weighted_mean(group_updates(honest))
    attacked = weighted_mean(group_updates(honest + [attacker]))
    assert update_norm({k: attacked[k] - clean[k] for k in clean}) > 3
    for rule in ("median", "trimmed_mean", "krum", "multikrum"):
        # Head b is held by 3 honest sites + the attacker: too few for Krum's n > 2f + 2, so Krum refuses it by name.
        robust, refused = robust_mean(group_updates(honest + [attacker]), rule, trim_fraction=0.2, byzantine=1)
        if rule in ("krum", "multikrum"):
            assert refused == [f"head 'b': 4 site(s) hold it; {rule} with aggregation.byzantine_sites = 1 needs at least 5 (n > 2f + 2)"]
            assert set(robust) == set(clean) - {"params.heads.b.w"}, rule
        else:
            assert refused == [] and set(robust) == set(clean), rule
        assert update_norm({k: robust[k] - clean[k] for k in robust}) < 1.0, rule


def test_head_groups_only_compare_sites_that_have_the_head():
    updates = [SiteUpdate("x", {"params.heads.a.w": torch.tensor([1.0])}, {"a": 1}), SiteUpdate("y", {"params.heads.b.w": torch.tensor([5.0])}, {"b": 1})]
    out, _ = robust_mean(group_updates(updates), "median")
    assert out["params.heads.a.w"].item() == 1.0 and out["params.heads.b.w"].item() == 5.0


def test_rules_match_their_definitions():
    stack = torch.tensor([[1.0, 0.0], [2.0, 10.0], [3.0, 20.0], [4.0, 30.0], [100.0, -50.0]])
    assert coordinate_median(stack).tolist() == [3.0, 10.0]
    assert trimmed_mean(stack, 0.2).tolist() == [3.0, 10.0]  # one dropped at each end
    # Krum with f = 1 scores each row by its n - f - 2 = 2 nearest neighbours (squared distances):
    # [1, 1] scores 0.5 + 2 = 2.5, the lowest; Multi-Krum's next best is [1.5, 1.5] (0.5 + 4.5).
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.5, 1.5], [3.0, 3.0], [50.0, 50.0]])
    assert krum(points, byzantine=1).tolist() == [1.0, 1.0]
    assert krum(points, byzantine=1, select=2).tolist() == [1.25, 1.25]


# --- compression -------------------------------------------------------------------


def test_int8_is_four_times_smaller_and_close():
    update = _update(1)
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    arrays, _ = Int8Codec().encode(update, {})
    decoded = Int8Codec().decode(arrays, sorted(update), shapes)
    for k, v in update.items():
        assert (decoded[k] - v).abs().max() <= v.abs().max() / 254 + 1e-7
    assert arrays["q"].dtype == torch.int8 and arrays["q"].numel() == sum(v.numel() for v in update.values())


def test_topk_error_feedback_delivers_everything_eventually():
    codec = TopKCodec(ratio=0.1)
    update = {"params.w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    shapes = {"params.w": (1000,)}
    residual, delivered = {}, torch.zeros(1000)
    rounds = 40
    for _ in range(rounds):
        arrays, residual = codec.encode(update, residual)
        delivered += codec.decode(arrays, ["params.w"], shapes)["params.w"]
    sent = sum(t.numel() * t.element_size() for t in arrays.values())
    assert dense_bytes(update) / sent > 10  # 3 bytes per kept entry (int16 position, int8 value)
    # What was sent plus what the site still holds is exactly what it produced.
    assert torch.allclose(delivered + residual["params.w"], rounds * update["params.w"], atol=1e-3)
    assert float(residual["params.w"].norm()) < 0.1 * rounds * float(update["params.w"].norm())


def test_a_malformed_compressed_update_is_refused_with_its_reason():
    codec = TopKCodec(ratio=0.5)
    arrays, _ = codec.encode({"params.w": torch.ones(4)}, {})
    arrays["idx"] = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside its 4 entries"):
        codec.decode(arrays, ["params.w"], {"params.w": (4,)})
    with pytest.raises(ValueError, match="does not have"):
        codec.decode(arrays, ["params.v"], {"params.w": (4,)})
    assert math.isfinite(dense_bytes({"a": torch.ones(3)}))


def _received(config, state, secure):
    """The model a site unpacks from what the server builds for it (plain or SecAgg+), and the bytes sent.

    Only a message's content matters to the sites' unpacking, so a namespace stands in for the message.
    """
    if secure:
        fit_ins, sent = secure_fit_ins(config, 1, state, evaluate_received=False)
        return received_state(SimpleNamespace(content=fitins_to_recorddict(fit_ins, keep_input=True)))[3], sent
    strategy = MetaStrategy(config, optimizer=None, rng=random.Random(0))
    arrays, node_config = strategy._broadcast(state, ConfigRecord({"round": 1}))
    return received_model(SimpleNamespace(content=RecordDict({"arrays": arrays, "config": node_config}))), arrays.count_bytes()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_an_int8_broadcast_is_smaller_and_sites_unpack_the_model(secure):
    state = {k: torch.cat([v] * 200) for k, v in _update(3, heads=("a", "b")).items()}  # big enough that framing is small
    sent = {}
    for option, tolerance in (("none", 0.0), ("int8", 1 / 254)):
        config = RunConfig.model_validate({"compression": {"broadcast": option}})
        received, sent[option] = _received(config, state, secure)
        assert sorted(received) == sorted(state)
        for k, v in state.items():
            assert received[k].shape == v.shape and received[k].dtype == torch.float32
            assert (received[k] - v).abs().max() <= tolerance * v.abs().max() + 1e-7, (option, k)
    assert sent["none"] / sent["int8"] > 3.5, sent
    packed, layout = encode_broadcast(state)
    assert torch.equal(decode_broadcast(packed, layout)["params.body.w"], received["params.body.w"])
