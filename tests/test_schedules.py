"""The diffusion core against independent references: diffusers' EDMEulerScheduler (schedule, preconditioning, one
Euler step), closed-form Gaussian denoisers (sampled variance, convergence order of Euler and Heun, through the
flow and VP wrappers too), the analytic EDM loss, guidance on a mixture, and bad input."""
import math

import pytest
import torch

from deepfusion_ref import schedules as S

S_DATA = 0.5


def gaussian_edm_denoiser(s: float):
    "Exact E[x0 | x] for x0 ~ N(0, s^2 I), x = x0 + sigma n."
    return lambda x, sigma, cond=None: x * s**2 / (s**2 + S._per_sample(sigma, x) ** 2)


def gaussian_flow_velocity(s: float):
    "Exact E[n - x0 | x_t] for x_t = (1 - t) x0 + t n, x0 ~ N(0, s^2 I) (derived independently of the wrapper)."
    def v(x_t, t, cond=None):
        t = S._per_sample(t, x_t)
        return x_t * (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2)
    return v


def gaussian_vp_eps(s: float):
    "Exact E[n | x_t] for x_t = alpha x0 + sigma_t n (cosine schedule), x0 ~ N(0, s^2 I)."
    def eps(x_t, t, cond=None):
        alpha, sigma_t = (S._per_sample(c, x_t) for c in S.cosine_alpha_sigma(t))
        return x_t * sigma_t / (alpha**2 * s**2 + sigma_t**2)
    return eps


# --- EDM against diffusers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 18, 50])
def test_karras_sigmas_equal_diffusers(n):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sched.set_timesteps(n)
    ours = S.karras_sigmas(n)
    assert ours.shape == (n + 1,) and ours[-1] == 0
    torch.testing.assert_close(ours.float(), sched.sigmas.float(), rtol=1e-6, atol=0)


def test_preconditioning_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EDMEulerScheduler(sigma_data=S_DATA)
    sigma = torch.tensor([0.002, 0.05, 0.5, 3.0, 80.0], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    f = torch.randn(5, 3, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = S.edm_coefficients(sigma, S_DATA)
    col = sigma[:, None]
    torch.testing.assert_close(c_in[:, None] * x, sched.precondition_inputs(x, col), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_noise, sched.precondition_noise(sigma), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_skip[:, None] * x + c_out[:, None] * f, sched.precondition_outputs(x, f, col),
                               rtol=1e-6, atol=1e-12)


def test_one_euler_step_equals_diffusers_step():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    network = lambda x_in, c_noise, cond: net(x_in) * (1 + c_noise[:, None])  # noqa: E731
    sched = diffusers.EDMEulerScheduler(sigma_data=S_DATA)
    sched.set_timesteps(10)
    x = torch.randn(3, 4, dtype=torch.float64) * float(sched.sigmas[0])
    t = sched.timesteps[0]
    model_in = sched.scale_model_input(x, t)
    expected = sched.step(network(model_in, t.expand(3).double(), None), t, x).prev_sample

    ours = S.sample_euler(S.EDMPrecond(network, S_DATA), x, sched.sigmas[:2].double(), progress=False)
    torch.testing.assert_close(ours, expected.double(), rtol=1e-6, atol=1e-9)


# --- exact denoisers: sampled variance and order of convergence ------------------------------------------------

SAMPLERS = {"euler": S.sample_euler, "heun": S.sample_heun}


def wrapped_denoiser(kind: str, s: float):
    if kind == "edm":
        return gaussian_edm_denoiser(s)
    if kind == "flow":
        return S.FlowDenoiser(gaussian_flow_velocity(s))
    return S.VPDenoiser(gaussian_vp_eps(s))


@pytest.mark.parametrize("kind", ["edm", "flow", "vp"])
@pytest.mark.parametrize("sampler, steps", [("heun", 64), ("euler", 1024)])
def test_sample_variance_matches_data(kind, sampler, steps):
    s = 0.7
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(20_000, 1, generator=g, dtype=torch.float64) * 80.0
    out = SAMPLERS[sampler](wrapped_denoiser(kind, s), x_T, S.karras_sigmas(steps), progress=False)
    assert abs(out.var().item() / s**2 - 1) < 0.02


@pytest.mark.parametrize("kind", ["edm", "flow", "vp"])
@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_order_of_convergence(kind, sampler, order):
    # The ODE maps x_T to x_T * s / sqrt(s^2 + sigma_max^2) exactly; the error of that scale falls as steps^-order.
    s = 0.5
    x_T = torch.full((1, 1), 80.0, dtype=torch.float64)
    exact = 80.0 * s / math.sqrt(s**2 + 80.0**2)
    errors = [abs(SAMPLERS[sampler](wrapped_denoiser(kind, s), x_T, S.karras_sigmas(n), progress=False).item() - exact)
              for n in (32, 64, 128)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 2**order * 0.8 < coarse / fine < 2**order * 1.25, errors


def test_heun_skips_correction_at_zero_and_counts_calls():
    calls = []
    d = gaussian_edm_denoiser(0.5)
    counting = lambda x, sigma: calls.append(sigma[0].item()) or d(x, sigma)  # noqa: E731
    S.sample_heun(counting, torch.randn(2, 3) * 80, S.karras_sigmas(10), progress=False)
    assert len(calls) == 2 * 10 - 1 and 0.0 not in calls


def test_churn_is_seeded_and_changes_the_path():
    d = gaussian_edm_denoiser(0.5)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 80
    sig = S.karras_sigmas(20)
    run = lambda seed, churn: S.sample_heun(d, x, sig, progress=False, S_churn=churn,  # noqa: E731
                                           generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3, 10.0), run(3, 10.0))
    assert not torch.equal(run(3, 10.0), run(4, 10.0))
    assert torch.equal(run(3, 0.0), run(4, 0.0))  # no churn: deterministic ODE, the generator is unused


def test_callback_sees_every_step():
    seen = []
    S.sample_euler(gaussian_edm_denoiser(0.5), torch.randn(2, 2) * 80, S.karras_sigmas(7), progress=False,
                   callback=lambda info: seen.append((info["i"], info["sigma"])))
    assert [i for i, _ in seen] == list(range(7)) and seen[0][1] == 80.0


# --- training losses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.5, 1.2])
def test_edm_loss_of_exact_denoiser_has_analytic_value(s):
    # For x0 ~ N(0, s^2), E[(D - x0)^2 | sigma] = sigma^2 s^2 / (s^2 + sigma^2); times lambda(sigma) and averaged
    # over ln(sigma) ~ N(-1.2, 1.2^2). With s = sigma_data this is exactly 1 for every sigma.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20_000, 8, generator=g, dtype=torch.float64) * s
    losses = torch.stack([S.edm_loss(gaussian_edm_denoiser(s), x0[i::10], generator=g) for i in range(10)])
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    sigma = torch.exp(-1.2 + 1.2 * z)
    per_sigma = S.edm_loss_weight(sigma, S_DATA) * sigma**2 * s**2 / (s**2 + sigma**2)
    expected = torch.trapezoid(per_sigma * torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi), z).item()
    if s == S_DATA:
        assert abs(expected - 1) < 1e-6
    standard_error = losses.std().item() / math.sqrt(len(losses))
    assert abs(losses.mean().item() - expected) < 4 * standard_error + 1e-3, (losses.mean().item(), expected)


def test_flow_loss_of_exact_velocity_is_its_irreducible_part():
    # The exact velocity leaves only the conditional variance: E||v* - (n - x0)||^2 = Var(n - x0) - Var(v*),
    # averaged over t ~ logit-normal(0, 1) by quadrature.
    s = 1.0
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, 1, generator=g, dtype=torch.float64) * s
    loss = S.flow_loss(gaussian_flow_velocity(s), x0, generator=g).item()
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    t = torch.sigmoid(z)
    var_target = s**2 + 1  # Var(n - x0)
    explained = (t - (1 - t) * s**2) ** 2 / ((1 - t) ** 2 * s**2 + t**2)  # Var(E[n - x0 | x_t])
    expected = torch.trapezoid((var_target - explained) * torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi), z).item()
    assert abs(loss - expected) < 0.01, (loss, expected)


def test_euler_in_sigma_is_flow_matching_euler_in_t():
    # The EDM Euler step through FlowDenoiser equals the plain flow-matching Euler step x_t += (t' - t) v,
    # written here independently, at t = sigma / (1 + sigma).
    v = gaussian_flow_velocity(0.6)
    sigmas = S.karras_sigmas(12)
    noise = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = S.sample_euler(S.FlowDenoiser(v), noise * sigmas[0], sigmas, progress=False)
    ts = (sigmas / (1 + sigmas)).tolist()
    x_t = noise * ts[0]  # = sigma_0 n / (1 + sigma_0)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x_t = x_t + (t_next - t) * v(x_t, torch.full((5,), t, dtype=torch.float64))
    torch.testing.assert_close(ours, x_t, rtol=1e-9, atol=1e-12)


def test_flow_and_vp_wrappers_invert_their_parameterisations():
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 60.0], dtype=torch.float64)
    t = sigma / (1 + sigma)
    torch.testing.assert_close(S.shift_t(t, 1.0), t)
    assert (S.shift_t(t, 3.0) > t).all()
    alpha, sigma_t = S.cosine_alpha_sigma(S.cosine_t_of_sigma(sigma))
    torch.testing.assert_close(sigma_t / alpha, sigma, rtol=1e-6, atol=1e-9)
    x = torch.randn(5, 3, dtype=torch.float64)
    for kind in ("flow", "vp"):  # exact wrapped denoisers equal the EDM closed form
        torch.testing.assert_close(wrapped_denoiser(kind, 0.8)(x, sigma), gaussian_edm_denoiser(0.8)(x, sigma),
                                   rtol=1e-6, atol=1e-9)


# --- guidance and thresholding in the loop --------------------------------------------------------------------


def test_guidance_moves_samples_toward_the_conditioned_component():
    mixture = S.GaussianMixtureDenoiser(torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.6]]), 0.4)
    n = 2000
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    want, uncond = torch.zeros(n, dtype=torch.long), torch.full((n,), -1)
    out = {w: S.sample_heun(S.GuidedDenoiser(mixture, want, uncond, w), x_T, S.karras_sigmas(32), progress=False)
           for w in (0.0, 1.0, 3.0)}
    nearest = {w: torch.cdist(o, mixture.means).argmin(1) for w, o in out.items()}
    share = {w: (nearest[w] == 0).double().mean().item() for w in out}
    assert share[0.0] < 0.5 < share[1.0] <= share[3.0]
    others = mixture.means[1:].mean(0)
    dist = {w: (o - others).norm(dim=1).mean().item() for w, o in out.items()}
    assert dist[3.0] > dist[1.0]  # w > 1 pushes further from the other components


def test_guidance_is_one_batched_call_per_step():
    calls = []
    mixture = S.GaussianMixtureDenoiser(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), 0.3)

    def counting(x, sigma, cond):
        calls.append(x.shape[0])
        return mixture(x, sigma, cond)

    n = 8
    guided = S.GuidedDenoiser(counting, torch.zeros(n, dtype=torch.long), torch.full((n,), -1), 5.0)
    S.sample_euler(guided, torch.randn(n, 2) * 80, S.karras_sigmas(12), progress=False)
    assert calls == [2 * n] * 12


def test_conditions_concatenate_leaf_by_leaf():
    a = {"hidden": torch.zeros(2, 3, 4), "mask": torch.ones(2, 3), "layers": (torch.zeros(2, 1),), "name": "x"}
    b = {"hidden": torch.ones(2, 3, 4), "mask": torch.zeros(2, 3), "layers": (torch.ones(2, 1),), "name": "x"}
    both = S.concat_conditions(a, b)
    assert both["hidden"].shape == (4, 3, 4) and both["layers"][0].shape == (4, 1) and both["name"] == "x"
    with pytest.raises(ValueError, match="structure"):
        S.concat_conditions(a, {"hidden": torch.zeros(2, 3, 4)})


@pytest.mark.parametrize("threshold", ["static", "dynamic"])
def test_thresholding_is_applied_to_every_step(threshold):
    seen = []
    over = lambda x, sigma, cond: 3 * torch.tanh(x)  # noqa: E731  (x0 estimates outside [-1, 1])
    guided = S.GuidedDenoiser(over, None, threshold=threshold)
    S.sample_euler(guided, torch.randn(4, 16) * 80, S.karras_sigmas(6), progress=False,
                   callback=lambda info: seen.append(info["denoised"].abs().max().item()))
    assert len(seen) == 6 and max(seen) <= 1.0


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [[80.0, -1.0, 0.0], [1.0, 2.0, 0.0], [1.0, 1.0, 0.0], [5.0], [[5.0, 0.0]],
                                    [float("nan"), 0.0]])
def test_bad_sigmas_are_named(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        S.sample_euler(gaussian_edm_denoiser(0.5), torch.randn(2, 3), torch.tensor(sigmas), progress=False)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma"):
        S.EDMPrecond(lambda x, c, cond: x)(torch.randn(4, 3), torch.ones(3))
    with pytest.raises(ValueError, match="denoiser"):
        S.sample_euler(lambda x, sigma: x[:1], torch.randn(2, 3), S.karras_sigmas(3), progress=False)
    with pytest.raises(ValueError, match="x must"):
        S.sample_euler(gaussian_edm_denoiser(0.5), torch.zeros(2, 3, dtype=torch.long), S.karras_sigmas(3),
                       progress=False)
    with pytest.raises(ValueError, match="n must"):
        S.karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        S.karras_sigmas(10, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="threshold"):
        S.GuidedDenoiser(gaussian_edm_denoiser(0.5), None, threshold="dynamc")
    with pytest.raises(ValueError, match="uncond"):
        S.GuidedDenoiser(gaussian_edm_denoiser(0.5), None, guidance_scale=3.0)
    with pytest.raises(ValueError, match="shift"):
        S.shift_t(torch.tensor([0.5]), 0.0)
