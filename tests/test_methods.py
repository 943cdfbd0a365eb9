"""Known-answer tests for MAML, HyperMAML and ProtoNet."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hmaml.errors import HmamlError
from hmaml.methods import maml_weight
from hmaml.methods.functional import head_grads, linear_logits, one_hot
from hmaml.tasks import TaskBatch
from tests.method_fixtures import build, random_tasks

ALL = [("protonet", {}), ("maml", {"inner_steps": 2}), ("maml", {"adapt": "all"}),
       ("hypermaml", {"switch": False}), ("hypermaml", {"warmup_start": 0, "warmup_len": 4})]


def test_head_gradient_closed_form_matches_autograd() -> None:
    torch.manual_seed(0)
    emb = torch.randn(3, 8, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 8))
    weight = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = sum(F.cross_entropy(linear_logits(emb, weight, bias)[t], y[t]) for t in range(3))
    gw, gb = torch.autograd.grad(loss, (weight, bias))
    hw, hb = head_grads(emb, one_hot(y, 4, emb.dtype), weight, bias)
    torch.testing.assert_close(hw, gw)
    torch.testing.assert_close(hb, gb)


def test_one_maml_step_equals_hand_computed_sgd_step_on_the_head() -> None:
    batch = random_tasks(dtype=torch.float64)
    model = build("maml", inner_steps=1, inner_lr=0.37).double()
    out = model(batch)
    support, query = model.embed(batch)
    for t in range(batch.num_tasks):
        w = model.head.weight.detach().clone().requires_grad_(True)
        b = model.head.bias.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(support[t].detach() @ w.T + b, batch.support_y[t])
        gw, gb = torch.autograd.grad(loss, (w, b))
        expected = query[t].detach() @ (w - 0.37 * gw).T + (b - 0.37 * gb)
        torch.testing.assert_close(out.logits[t], expected)
        torch.testing.assert_close(out.weight_update_norm[t], (0.37 * gw).norm())
        torch.testing.assert_close(out.bias_update_norm[t], (0.37 * gb).norm())


def test_every_inner_step_takes_its_gradient_at_the_current_weights() -> None:
    batch = random_tasks(dtype=torch.float64)
    model = build("maml", inner_steps=3, inner_lr=0.5).double()
    support, query = model.embed(batch)
    support, query = support.detach(), query.detach()
    t = 0
    w, b = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    for _ in range(3):  # plain SGD, gradient re-evaluated each step
        w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        gw, gb = torch.autograd.grad(F.cross_entropy(support[t] @ w_.T + b_,
                                                     batch.support_y[t]), (w_, b_))
        w, b = w - 0.5 * gw, b - 0.5 * gb
    torch.testing.assert_close(model(batch).logits[t], query[t] @ w.T + b)


def _meta_grad(model, batch) -> torch.Tensor:
    model.zero_grad()
    model(batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("adapt", ["head", "all"])
def test_second_order_meta_gradient_matches_finite_differences(adapt: str) -> None:
    batch = random_tasks(tasks=2, n_way=3, shot=1, query=2, size=16, dtype=torch.float64)
    model = build("maml", n_way=3, inner_steps=2, inner_lr=0.4, adapt=adapt).double()
    second = _meta_grad(model, batch)
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    gen = torch.Generator().manual_seed(1)
    for index in [*torch.randint(0, flat.numel(), (4,), generator=gen).tolist(), flat.numel() - 1]:
        values = []
        for sign in (1.0, -1.0):
            shifted = flat.clone()
            shifted[index] += sign * 1e-6
            torch.nn.utils.vector_to_parameters(shifted, params)
            with torch.no_grad():
                values.append(model(batch).loss.item())
        torch.nn.utils.vector_to_parameters(flat, params)
        numeric = (values[0] - values[1]) / 2e-6
        assert abs(numeric - second[index].item()) < 1e-5 + 1e-4 * abs(numeric), index
    model.first_order = True
    first = _meta_grad(model, batch)
    assert (first - second).abs().max() > 1e-4  # first order drops the second-order terms


def test_first_order_head_gradient_is_the_query_gradient_at_adapted_weights() -> None:
    batch = random_tasks(dtype=torch.float64)
    model = build("maml", inner_steps=1, inner_lr=0.3, first_order=True).double()
    model(batch).loss.backward()
    support, query = model.embed(batch)
    support, query = support.detach(), query.detach()
    expected = torch.zeros_like(model.head.weight)
    for t in range(batch.num_tasks):
        w = model.head.weight.detach()
        b = model.head.bias.detach()
        gw, gb = head_grads(support[t : t + 1], one_hot(batch.support_y[t : t + 1], 4,
                                                        support.dtype), w[None], b[None])
        wa = (w - 0.3 * gw[0]).requires_grad_(True)
        loss = F.cross_entropy(query[t] @ wa.T + (b - 0.3 * gb[0]), batch.query_y[t])
        expected += torch.autograd.grad(loss, wa)[0] / batch.num_tasks
    torch.testing.assert_close(model.head.weight.grad, expected)


def test_zero_hypernetwork_output_leaves_theta_unchanged() -> None:
    batch = random_tasks()
    model = build("hypermaml", switch=False)
    last = model.hypernet.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    out = model(batch)
    _, query = model.embed(batch)
    w, b = model.head.expand(batch.num_tasks)
    torch.testing.assert_close(out.logits, linear_logits(query, w, b))
    assert out.weight_update_norm.abs().max() == 0 and out.bias_update_norm.abs().max() == 0


def test_hypermaml_at_p0_adapts_without_any_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """At p = 0 neither the MAML path runs (spied) nor can autograd (inference mode)."""
    import hmaml.methods.hypermaml as hypermaml

    batch = random_tasks()
    model = build("hypermaml", warmup_start=0, warmup_len=4)
    calls = []
    real = hypermaml.sgd_head_steps
    monkeypatch.setattr(hypermaml, "sgd_head_steps",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_epoch(1)  # p = 0.8: the spy sees the MAML path
    model(batch)
    assert calls == [1]
    model.set_epoch(4)  # p = 0
    with torch.inference_mode():  # autograd cannot run here at all
        out = model(batch)
    assert calls == [1] and model.p == 0.0
    assert out.logits.shape == (3, 12, 4) and torch.isfinite(out.loss)


def test_the_enhancement_reads_theta_without_gradient() -> None:
    """The hypernetwork's input holds softmax(theta(embedding)) of the universal theta (not of
    adapted weights), and theta's gradient comes through theta' = theta + Delta alone: with the
    no_grad removed, or adapted weights fed in, these equalities fail."""
    batch = random_tasks(dtype=torch.float64)
    model = build("hypermaml", switch=False).double()
    seen = {}
    model.hypernet.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    out = model(batch)
    support, query = model.embed(batch)
    onehot = one_hot(batch.support_y, 4, support.dtype)
    w, b = model.head.expand(batch.num_tasks)
    pred = torch.softmax(linear_logits(support, w, b), -1)
    expected = onehot.transpose(1, 2) @ torch.cat([support, pred, onehot], -1)
    expected = expected / onehot.sum(1).unsqueeze(-1)
    torch.testing.assert_close(seen["x"], expected)
    grad = torch.autograd.grad(out.loss, model.head.weight)[0]
    dw, db = (d.detach() for d in model.delta(support, onehot))
    theta = model.head.weight
    direct = F.cross_entropy(
        linear_logits(query.detach(), theta.expand(3, -1, -1) + dw,
                      model.head.bias.expand(3, -1) + db).flatten(0, 1),
        batch.query_y.flatten(), reduction="none").view(3, -1).mean(1).mean()
    torch.testing.assert_close(grad, torch.autograd.grad(direct, theta)[0])


def test_a_class_update_depends_on_its_own_support_only() -> None:
    batch = random_tasks(shot=3)
    model = build("hypermaml", switch=False)
    support, _ = model.embed(batch)
    onehot = one_hot(batch.support_y, 4, support.dtype)
    dw, db = model.delta(support, onehot)
    changed = support.clone()
    changed[batch.support_y == 2] += 1.0  # alter class 2's shots only
    dw2, db2 = model.delta(changed, onehot)
    others = [0, 1, 3]
    torch.testing.assert_close(dw2[:, others], dw[:, others])
    torch.testing.assert_close(db2[:, others], db[:, others])
    assert (dw2[:, 2] - dw[:, 2]).abs().max() > 1e-4


def _relabel(batch: TaskBatch, perm: torch.Tensor) -> TaskBatch:
    return TaskBatch(batch.support_x, perm[batch.support_y], batch.query_x, perm[batch.query_y],
                     batch.n_way)


def test_protonet_is_class_permutation_equivariant() -> None:
    batch = random_tasks()
    model = build("protonet")
    perm = torch.tensor([2, 0, 3, 1])
    base, permuted = model(batch).logits, model(_relabel(batch, perm)).logits
    torch.testing.assert_close(permuted[..., perm], base)


@pytest.mark.parametrize("enhance", [False, True])
def test_hypermaml_is_class_permutation_equivariant(enhance: bool) -> None:
    """Relabelling the classes of a task, with the model's class-indexed parameters relabelled
    alike (theta's rows; the prediction and label inputs of the hypernetwork), permutes the
    logits: nothing in HyperMAML couples a class to another class's position."""
    batch = random_tasks()
    model = build("hypermaml", switch=False, enhance=enhance)
    perm = torch.tensor([2, 0, 3, 1])
    base = model(batch).logits
    with torch.no_grad():
        model.head.weight[perm] = model.head.weight.clone()
        model.head.bias[perm] = model.head.bias.clone()
        if enhance:
            first = model.hypernet.net[0].weight
            d = model.encoder.feat_dim
            for start in (d, d + 4):  # prediction block, then one-hot label block
                block = first[:, start : start + 4].clone()
                first[:, start + perm] = block
    permuted = model(_relabel(batch, perm)).logits
    torch.testing.assert_close(permuted[..., perm], base)


@pytest.mark.parametrize(("name", "kwargs"), ALL)
def test_batched_tasks_equal_tasks_run_one_by_one(name: str, kwargs: dict) -> None:
    batch = random_tasks(tasks=3, dtype=torch.float64)
    model = build(name, **kwargs).double()
    model.set_epoch(2)  # p = 0.5 for the switch variant: both paths active
    out = model(batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    singles = [model(batch.select(slice(t, t + 1))) for t in range(3)]
    torch.testing.assert_close(out.logits, torch.cat([s.logits for s in singles]))
    single_grads = [torch.autograd.grad(s.loss / 3, list(model.parameters())) for s in singles]
    for g, parts in zip(grads, zip(*single_grads, strict=True), strict=True):
        torch.testing.assert_close(g, sum(parts))


@pytest.mark.parametrize(("epoch", "expected"), [
    (0, 1.0), (49, 1.0),  # W - 1: pure MAML
    (50, 500 / 501),  # W: the switch has begun (no extra pure-MAML epoch)
    (299, 251 / 501), (549, 1 / 501),  # W + S - 1: the last mixed epoch
    (550, 0.0), (10_000, 0.0)])  # W + S: the hypernetwork alone
def test_warmup_switch_schedule_is_the_authors(epoch: int, expected: float) -> None:
    assert maml_weight(epoch, 50, 500) == pytest.approx(expected)
    assert maml_weight(3, 0, 0) == 0.0 and maml_weight(0, 2, 0) == 1.0


def test_switch_end_points_are_maml_head_and_theta_plus_delta() -> None:
    """At p = 1 HyperMAML's logits are MAML-head's (same theta, steps and rate); at p = 0 they
    are those of theta + Delta; in between, the linear mix. Swapping the roles fails."""
    batch = random_tasks(dtype=torch.float64)
    model = build("hypermaml", warmup_start=1, warmup_len=3, inner_steps=2,
                  inner_lr=0.3).double()
    maml = build("maml", inner_steps=2, inner_lr=0.3).double()
    maml.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.startswith("hypernet")})
    model.set_epoch(0)
    assert model.p == 1.0
    torch.testing.assert_close(model(batch).logits, maml(batch).logits)
    model.set_epoch(4)
    assert model.p == 0.0
    support, query = model.embed(batch)
    dw, db = model.delta(support, one_hot(batch.support_y, 4, support.dtype))
    w, b = model.head.expand(batch.num_tasks)
    hyper = linear_logits(query, w + dw, b + db)
    torch.testing.assert_close(model(batch).logits, hyper)
    model.set_epoch(2)  # p = (3 + 1 - 2) / 4 = 0.5
    torch.testing.assert_close(model(batch).logits, 0.5 * (maml(batch).logits + hyper))
    model.switch = False
    model.set_epoch(0)
    assert model.p == 0.0


def test_the_hypernetwork_rests_while_p_is_1_and_is_tested_alone() -> None:
    model = build("hypermaml", warmup_start=2, warmup_len=2)
    model.set_epoch(1)
    assert {id(p) for p in model.resting_parameters()} == {id(p) for p in
                                                          model.hypernet.parameters()}
    model.set_epoch(2)
    assert model.resting_parameters() == []
    model.set_epoch(0)
    model.set_tested()
    assert model.p == 0.0 and build("maml").resting_parameters() == []


def test_protonet_logits_are_negative_squared_distances_to_the_prototypes() -> None:
    batch = random_tasks(shot=3, dtype=torch.float64)
    model = build("protonet").double()
    support, query = model.embed(batch)
    for t in range(batch.num_tasks):
        protos = torch.stack([support[t][batch.support_y[t] == c].mean(0) for c in range(4)])
        expected = -((query[t][:, None, :] - protos[None]) ** 2).sum(-1)
        torch.testing.assert_close(model(batch).logits[t], expected)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: TaskBatch(b.support_x[:, :-1], b.support_y, b.query_x, b.query_y, 4),
     r"support_y: shape \(3, 8\) does not match support_x"),
    (lambda b: TaskBatch(b.support_x, b.support_y, b.query_x[..., :8], b.query_y, 4),
     "disagree"),
    (lambda b: TaskBatch(b.support_x[:, :-1], b.support_y[:, :-1], b.query_x, b.query_y, 4),
     "not a multiple of n_way=4"),
    (lambda b: TaskBatch(b.support_x, torch.zeros_like(b.support_y), b.query_x, b.query_y, 4),
     "each label 0..3 exactly 2 times"),
    (lambda b: TaskBatch(b.support_x, b.support_y, b.query_x, b.query_y + 4, 4),
     "query_y: labels must lie in 0..3"),
    (lambda b: TaskBatch(b.support_x[0], b.support_y, b.query_x, b.query_y, 4),
     r"support_x: expected \[T, examples, C, H, W\]"),
])
def test_bad_task_batches_are_named(mutate, message: str) -> None:
    with pytest.raises(HmamlError, match=message):
        mutate(random_tasks()).validate()


def test_method_refuses_a_batch_of_another_way() -> None:
    batch = random_tasks(n_way=4)
    model = build("hypermaml", n_way=5)
    with pytest.raises(HmamlError, match="n_way=4 but the model was built for n_way=5"):
        model(batch)


def test_unknown_method_and_adapt_mode_are_named() -> None:
    from types import SimpleNamespace

    from hmaml.methods import build_method
    from hmaml.models import build_encoder

    with pytest.raises(HmamlError, match=r"method\.name: unknown method 'reptile'"):
        build_method(SimpleNamespace(name="reptile"), build_encoder("conv4", 1, 28), 5)
    with pytest.raises(HmamlError, match=r"method\.adapt: 'body'"):
        build("maml", adapt="body")
