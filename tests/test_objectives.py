"""The DI* math against closed forms: schedules, the score-divergence gradient identity, KL."""

import numpy as np
import pytest
import torch

from distar.objectives import (
    DivergenceSpec,
    Schedule,
    distance_grad,
    kl_surrogate,
    one_step_x0,
    score_difference,
    score_divergence_loss,
)


@pytest.fixture(autouse=True)
def _float64():
    """Monte Carlo gradients need double precision; restore the default for other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(beta_schedule):
    from diffusers import DDPMScheduler

    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    ours = Schedule.from_scheduler_config(config).alphas_cumprod
    theirs = DDPMScheduler(**config).alphas_cumprod.double()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_types_recover_x0_and_eps(prediction_type):
    sched = Schedule.from_scheduler_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": prediction_type})
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([5, 399, 990])
    x_t = sched.add_noise(x0, eps, t)
    a, b = sched.ab(t, x0)
    output = eps if prediction_type == "epsilon" else a * eps - b * x0  # what a perfect network predicts
    torch.testing.assert_close(sched.to_eps(output, x_t, t), eps)
    torch.testing.assert_close(sched.to_x0(output, x_t, t), x0)
    torch.testing.assert_close(one_step_x0(output, x_t, t, sched), x0)


def test_unsupported_schedule_is_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        Schedule.from_scheduler_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type"):
        Schedule.from_scheduler_config({"prediction_type": "sample"})


# ---------------------------------------------------------------- 1-D Gaussian world
#
# Generator x0 = mu + s z. Noised marginals are Gaussian, so every score is analytic:
# q_t = N(a mu, a^2 s^2 + b^2), reference p_t = N(a m_r, a^2 s_r^2 + b^2). Networks are
# represented by their x0-predictions D = (x + b^2 score(x)) / a, with frozen parameters:
# theta reaches them only through x_t, as in the trainer.

A, B = 0.8, 0.6
M_REF, S_REF = -0.2, 1.2
THETA = (0.3, 0.7)


def gaussian_score(x, mean, std):
    var = A**2 * std**2 + B**2
    return -(x - A * mean) / var


def as_x0(score, x):
    return (x + B**2 * score) / A


def d_fake(x, theta):
    return as_x0(gaussian_score(x, *theta), x)


def d_ref(x):
    return as_x0(gaussian_score(x, M_REF, S_REF), x)


def sample(n, seed, theta_params):
    g = torch.Generator().manual_seed(seed)
    z, eps = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    mu, s = theta_params
    x0 = mu + s * z
    return x0, A * x0 + B * eps


def surrogate_gradient(loss_fn, n=400_000, chunks=20):
    """Mean and standard error over independent chunks of the gradient w.r.t. (mu, s)."""
    grads = []
    for k in range(chunks):
        params = torch.tensor(THETA, requires_grad=True)
        x0, x_t = sample(n, seed=k, theta_params=(params[0], params[1]))
        loss = loss_fn(x0, x_t).mean()
        grads.append(torch.autograd.grad(loss, params)[0])
    g = torch.stack(grads)
    return g.mean(0), g.std(0) / chunks**0.5


def divergence_fixed_sampling(theta_prime, spec):
    """int d(s_theta'(x) - s_ref(x)) dq_theta(x): the sampling distribution stays at THETA."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)  # E over N(0,1) by quadrature
    mean, std = A * THETA[0], (A**2 * THETA[1] ** 2 + B**2) ** 0.5
    x = torch.tensor(mean + std * nodes).view(-1, 1)
    y = gaussian_score(x, *theta_prime) - gaussian_score(x, M_REF, S_REF)
    if spec.distance == "l2":
        d = y.pow(2).sum(1) / 2
    else:
        d = (y.pow(2).sum(1) + spec.huber_c**2).sqrt() - spec.huber_c
    return float((torch.tensor(weights) * d).sum() / weights.sum())


def finite_difference_gradient(spec, h=1e-5):
    out = []
    for i in range(2):
        up, down = list(THETA), list(THETA)
        up[i] += h
        down[i] -= h
        out.append((divergence_fixed_sampling(up, spec) - divergence_fixed_sampling(down, spec)) / (2 * h))
    return torch.tensor(out)


def theta_const():
    return tuple(THETA)  # the fake score tracks the generator but is not stepped by this loss


def dot(u, v):
    return (u * v).flatten(1).sum(1)


@pytest.mark.parametrize("spec", [DivergenceSpec(distance="pseudo_huber", huber_c=0.5), DivergenceSpec(distance="l2")], ids=["pseudo_huber", "l2"])
def test_score_divergence_gradient_identity(spec):
    a, b = torch.tensor(A), torch.tensor(B)
    truth = finite_difference_gradient(spec)

    exact = lambda x0, x_t: score_divergence_loss(d_fake(x_t, theta_const()), d_ref(x_t), x0, a, b, spec)
    mean, se = surrogate_gradient(exact)
    assert torch.all((mean - truth).abs() < 4 * se + 1e-4), (mean, se, truth)

    # Detaching d'(y): the direction no longer moves with x_t.
    def detached_dprime(x0, x_t):
        df = d_fake(x_t, theta_const())
        u = distance_grad(score_difference(df, d_ref(x_t), a, b), spec.distance, spec.huber_c).detach()
        return -dot(u, a * (df - x0) / b**2)

    # Detaching the reference path: D_ref as a constant, as a pool without backward would give.
    detached_ref = lambda x0, x_t: score_divergence_loss(d_fake(x_t, theta_const()), d_ref(x_t.detach()), x0, a, b, spec)

    for wrong in (detached_dprime, detached_ref):
        w_mean, w_se = surrogate_gradient(wrong)
        gap = (w_mean - truth).abs().max()
        assert gap > 10 * (w_se.max() + se.max()), (wrong.__name__ if hasattr(wrong, "__name__") else wrong, w_mean, truth)


def test_kl_surrogate_matches_analytic_kl_gradient():
    a, b = torch.tensor(A), torch.tensor(B)
    params = torch.tensor(THETA, requires_grad=True)
    m1, v1 = A * params[0], A**2 * params[1] ** 2 + B**2
    m2, v2 = A * M_REF, A**2 * S_REF**2 + B**2
    kl = 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    truth = torch.autograd.grad(kl, params)[0]

    mean, se = surrogate_gradient(lambda x0, x_t: kl_surrogate(d_fake(x_t, theta_const()), d_ref(x_t), x_t, a, b))
    assert torch.all((mean - truth).abs() < 4 * se + 1e-4), (mean, se, truth)
    assert truth.abs().min() > 20 * se.max()  # the check has power: the gradient is far from 0
