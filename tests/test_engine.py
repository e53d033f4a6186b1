"""The meta-learning engine matches explicit per-task autograd references."""

import pytest
import torch
from torch.func import functional_call

from fedmeta.data import EpisodeSampler, SineTasks
from fedmeta.meta import ANIL, FOMAML, MAML, MetaSGD, Reptile, make_algorithm
from fedmeta.meta.inner import per_row_loss
from fedmeta.models import MultiTaskModel, TaskSpec, head_prefix, task_params


def sine_model(seed=0):
    torch.manual_seed(seed)
    return MultiTaskModel.mlp(1, [TaskSpec(name="sine", kind="regression")], hidden=(40, 40))


def reference_meta_grad(model, state, batch, steps, first_order, head_only=False, inner_lrs=None, lr=0.01):
    """A per-task loop with torch.autograd.grad(create_graph=True), as learn2learn computes it."""
    spec = model.tasks[batch.task]
    params = {k: v.clone().requires_grad_(True) for k, v in task_params(state["params"], batch.task).items()}
    lrs = {k: inner_lrs[k].clone().requires_grad_(True) for k in params} if inner_lrs is not None else None

    def loss(p, x, y, w):
        out = functional_call(model, p, (x,), {"task": batch.task})
        return (per_row_loss(spec, out, y) * w).sum() / w.sum()

    total = 0.0
    for i in range(batch.size):
        sx, sy, sw, qx, qy, qw = (t[i] for t in batch.tensors())
        fast = dict(params)
        names = [k for k in fast if k.startswith(head_prefix(batch.task))] if head_only else list(fast)
        for _ in range(steps):
            grads = torch.autograd.grad(loss(fast, sx, sy, sw), [fast[n] for n in names], create_graph=not first_order)
            for n, g in zip(names, grads):
                fast[n] = fast[n] - (lrs[n] if lrs is not None else lr) * g
        total = total + loss(fast, qx, qy, qw)
    total = total / batch.size
    leaves = list(params.values()) + (list(lrs.values()) if lrs is not None else [])
    grads = torch.autograd.grad(total, leaves)
    out = {"params": dict(zip(params, grads[: len(params)]))}
    if lrs is not None:
        out["inner_lrs"] = dict(zip(lrs, grads[len(params) :]))
    return total.detach(), out


def assert_state_close(actual, expected, atol=1e-5):
    assert actual.keys() == expected.keys()
    for group in expected:
        assert actual[group].keys() == expected[group].keys()
        for k in expected[group]:
            torch.testing.assert_close(actual[group][k], expected[group][k], atol=atol, rtol=0)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize(
    "algo, first_order, head_only",
    [(MAML, False, False), (FOMAML, True, False), (ANIL, False, False)],
)
def test_meta_gradient_equals_per_task_autograd_reference(algo, first_order, head_only, steps):
    model = sine_model()
    alg = algo(lr=0.02, adaptation_steps=steps)
    state = alg.init_state(model)
    batch = SineTasks(seed=1).sample(meta_batch=6, shots=10)
    loss, grads = alg.meta_loss_and_grad(model, state, batch)
    ref_loss, ref = reference_meta_grad(model, state, batch, steps, first_order, head_only=alg.head_only, lr=0.02)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert_state_close(grads, ref)


@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_gradient_covers_weights_and_learned_rates(steps):
    model = sine_model()
    alg = MetaSGD(lr=0.02, adaptation_steps=steps)
    state = alg.init_state(model)
    # Perturb the rates so that the test does not pass by symmetry.
    state["inner_lrs"] = {k: v * (1 + 0.5 * torch.rand_like(v)) for k, v in state["inner_lrs"].items()}
    batch = SineTasks(seed=2).sample(meta_batch=5, shots=10)
    loss, grads = alg.meta_loss_and_grad(model, state, batch)
    ref_loss, ref = reference_meta_grad(model, state, batch, steps, False, inner_lrs=state["inner_lrs"])
    assert_state_close(grads, ref)
    assert set(grads) == {"params", "inner_lrs"}


def test_anil_gradient_for_classification_head_matches_reference():
    torch.manual_seed(0)
    tasks = [TaskSpec(name="a", kind="multiclass", n_classes=3), TaskSpec(name="b", kind="regression")]
    model = MultiTaskModel.mlp(5, tasks, hidden=(16,))
    x = torch.randn(200, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    batch = EpisodeSampler(x.numpy(), y.numpy(), "a", classification=True, shots=3, query_size=8, n_classes=3).sample(4)
    alg = ANIL(lr=0.1, adaptation_steps=2)
    state = alg.init_state(model)
    _, grads = alg.meta_loss_and_grad(model, state, batch)
    _, ref = reference_meta_grad(model, state, batch, 2, False, head_only=True, lr=0.1)
    assert_state_close(grads, ref)
    assert not any(k.startswith("heads.b.") for k in grads["params"]), "another task's head must not get a gradient"


@pytest.mark.parametrize("steps", [1, 5])
def test_reptile_update_equals_k_plain_sgd_steps(steps):
    model = sine_model()
    alg = Reptile(lr=0.05, adaptation_steps=steps)
    state = alg.init_state(model)
    batch = SineTasks(seed=3).sample(meta_batch=1, shots=10)
    delta, _ = alg.delta(model, state, batch)

    reference = sine_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    x = torch.cat([batch.support_x[0], batch.query_x[0]])
    y = torch.cat([batch.support_y[0], batch.query_y[0]])
    for _ in range(steps):
        opt.zero_grad()
        ((reference(x, "sine").squeeze(-1) - y) ** 2).mean().backward()
        opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state["params"][name] + delta[name], p.detach(), atol=1e-6, rtol=0)


def test_reptile_batch_delta_is_the_mean_of_episode_deltas():
    model = sine_model()
    alg = Reptile(lr=0.05, adaptation_steps=3)
    state = alg.init_state(model)
    batch = SineTasks(seed=4).sample(meta_batch=4, shots=10)
    delta, _ = alg.delta(model, state, batch)
    singles = [alg.delta(model, state, batch.episode(i))[0] for i in range(4)]
    for k in delta:
        torch.testing.assert_close(delta[k], torch.stack([s[k] for s in singles]).mean(0), atol=1e-6, rtol=0)


def test_padding_rows_do_not_change_the_meta_gradient():
    model = sine_model()
    alg = MAML(lr=0.02)
    state = alg.init_state(model)
    batch = SineTasks(seed=5).sample(meta_batch=3, shots=10)
    padded = type(batch)(
        batch.task,
        torch.cat([batch.support_x, torch.randn(3, 4, 1)], 1),
        torch.cat([batch.support_y, torch.randn(3, 4)], 1),
        torch.cat([batch.support_w, torch.zeros(3, 4)], 1),
        *batch.query,
    )
    _, g1 = alg.meta_loss_and_grad(model, state, batch)
    _, g2 = alg.meta_loss_and_grad(model, state, padded)
    assert_state_close(g1, g2, atol=1e-6)


def test_unknown_algorithm_names_the_choices():
    with pytest.raises(ValueError, match="unknown algorithm 'mamll'.*maml"):
        make_algorithm("mamll")


def test_invalid_inner_rate_is_rejected_with_its_value():
    with pytest.raises(ValueError, match="lr must be > 0, got -1"):
        MAML(lr=-1)


@pytest.mark.parametrize("algo", [MAML, ANIL, MetaSGD])
def test_hand_batched_mlp_forward_gives_the_vmap_gradient(algo):
    model = sine_model()
    alg = algo(lr=0.02, adaptation_steps=2)
    state = alg.init_state(model)
    batch = SineTasks(seed=6).sample(meta_batch=5, shots=10)
    loss_a, fast = alg.meta_loss_and_grad(model, state, batch, use_vmap=False)
    loss_b, vmapped = alg.meta_loss_and_grad(model, state, batch, use_vmap=True)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    assert_state_close(fast, vmapped, atol=1e-6)


def test_cnn_body_meta_gradient_matches_reference():
    torch.manual_seed(0)
    model = MultiTaskModel.cnn(1, [TaskSpec(name="digit", kind="multiclass", n_classes=4)], channels=(4, 4))
    x = torch.randn(80, 1, 8, 8)
    y = torch.arange(80) % 4
    batch = EpisodeSampler(x.numpy(), y.numpy(), "digit", classification=True, shots=2, query_size=6, n_classes=4).sample(3)
    alg = MAML(lr=0.05, adaptation_steps=1)
    state = alg.init_state(model)
    _, grads = alg.meta_loss_and_grad(model, state, batch)
    _, ref = reference_meta_grad(model, state, batch, 1, False, lr=0.05)
    assert_state_close(grads, ref)


def test_adapt_takes_one_episode_of_a_batch_as_it_comes():
    model = sine_model()
    alg = MAML(lr=0.01)
    state = alg.init_state(model)
    episode = SineTasks(seed=7).sample(meta_batch=4, shots=10).episode(2)
    as_batch_of_one = alg.adapt(model, state, episode.support, "sine", steps=5)
    unwrapped = alg.adapt(model, state, tuple(t[0] for t in episode.support), "sine", steps=5)
    assert_state_close({"params": as_batch_of_one}, {"params": unwrapped}, atol=0)


def test_adapt_refuses_several_episodes_naming_their_shape():
    model = sine_model()
    alg = MAML(lr=0.01)
    batch = SineTasks(seed=7).sample(meta_batch=4, shots=10)
    with pytest.raises(ValueError, match=r"one support set.*got weights of shape \(4, 10\).*batch.episode\(i\).support"):
        alg.adapt(model, alg.init_state(model), batch.support, "sine", steps=1)
