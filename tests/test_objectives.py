"""The objectives (schedules.EDM, RectifiedFlow, VP) against independent references: each trains a toy network whose
samples follow the data distribution; rectified flow's grid and Euler step equal diffusers'
FlowMatchEulerDiscreteScheduler's (shift 1, 3, FLUX's dynamic shift); the Trainer and the pipeline work for all
three, record the objective, and call diffusers-style step callbacks."""
import json

import pytest
import torch
from torch import nn

from deepfusion_ref import schedules as S


class ToyNet(nn.Module):
    "An MLP network(x, t, cond) on 1-D data; the time enters as itself and Fourier features at frequencies 1..32."

    def __init__(self, width: int = 64):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(6))
        self.mlp = nn.Sequential(nn.Linear(14, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, x, t, cond=None):
        tt = t.float().view(-1, 1)
        return self.mlp(torch.cat([x, tt, (tt * self.freqs).sin(), (tt * self.freqs).cos()], dim=1))


def bimodal(n: int, generator) -> torch.Tensor:
    "x0 = +-1 + 0.1 n: two narrow modes of equal weight."
    sign = torch.randint(0, 2, (n, 1), generator=generator) * 2.0 - 1
    return sign + 0.1 * torch.randn(n, 1, generator=generator)


@pytest.mark.parametrize("objective", [S.EDM(P_mean=-0.4, sigma_data=1.0), S.RectifiedFlow(),
                                       S.RectifiedFlow(shift=3.0), S.VP()], ids=["edm", "flow", "flow-shift3", "vp"])
def test_each_objective_trains_a_toy_whose_samples_match_the_data(objective):
    # VP's first DDIM steps multiply an error e of the noise prediction into x0 by sigma/alpha (~600 at t = 0.999): a
    # toy net off by 0.07 there sends every sample to one mode. As diffusers' DDIMScheduler (clip_sample=True), the
    # x0 estimate is clipped to the data's range for VP; the other objectives need no help.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = objective.wrap(ToyNet())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1500):
        x0 = bimodal(256, g)
        loss = objective.loss(model, x0, None, objective.training_times(256, g), torch.randn(x0.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    denoiser = objective.denoiser(model)
    limit = 1.5 if objective.name == "vp" else float("inf")
    with torch.no_grad():
        noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(2))
        x = S.sample_objective(objective, lambda y, t: denoiser(y, t).clamp(-limit, limit), noise,
                               objective.timesteps(40), progress=False)
    assert torch.isfinite(x).all()
    positive = (x > 0).float().mean().item()
    spread = (x.abs() - 1).abs().median().item()
    assert abs(positive - 0.5) < 0.08, positive  # both modes, in equal measure
    assert abs(x.abs().mean().item() - 1) < 0.12 and spread < 0.2, (x.abs().mean().item(), spread)  # at +-1, narrow


@pytest.mark.parametrize("n", [1, 4, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grid_equals_diffusers(n, shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ours = S.RectifiedFlow(shift=shift).timesteps(n)
    assert ours[0] == 1.0 and ours[-1] == 0 and ours.shape == (n + 1,)
    torch.testing.assert_close(ours.float(), sched.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096])
def test_flow_dynamic_shift_equals_diffusers_and_flux(seq_len):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                      max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert S.flux_mu(seq_len) == pytest.approx(mu)
    sched.set_timesteps(18, mu=mu)
    torch.testing.assert_close(S.RectifiedFlow(dynamic_shift=True).timesteps(18, image_seq_len=seq_len).float(),
                               sched.sigmas, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="image_seq_len"):
        S.RectifiedFlow(dynamic_shift=True).timesteps(18)


def test_flow_euler_sampling_equals_the_diffusers_scheduler_loop():
    diffusers = pytest.importorskip("diffusers")
    velocity = lambda x, t: torch.tanh(x) * (1 - t.view(-1, 1)) + 0.3  # noqa: E731  any smooth velocity field
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(velocity(ref, sched.sigmas[i].expand(5)), t, ref).prev_sample
    flow = S.RectifiedFlow(shift=3.0)
    ours = S.sample_objective(flow, lambda y, t: y - t.view(-1, 1) * velocity(y, t), x, flow.timesteps(12),
                              "euler", progress=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_edm_objective_samples_exactly_as_sample_heun():
    "The shared step is EDM's Algorithm 2: bit for bit what sample_heun (k-diffusion's sampler) gives."
    d = lambda x, sigma, cond=None: x * 0.25 / (0.25 + S._per_sample(sigma, x) ** 2)  # noqa: E731
    edm = S.EDM()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    sigmas = edm.timesteps(10)
    for sampler, reference in (("heun", S.sample_heun), ("euler", S.sample_euler)):
        ours = S.sample_objective(edm, d, x, sigmas, sampler, progress=False)
        assert torch.equal(ours, reference(d, x * sigmas[0].item(), sigmas, progress=False))


def test_objectives_round_trip_and_bad_values_name_the_key():
    for objective in (S.EDM(P_mean=-0.6), S.RectifiedFlow(shift=3.0, dynamic_shift=False), S.VP(t_max=0.99)):
        assert S.make_objective(json.loads(json.dumps(objective.config()))) == objective
    assert S.make_objective("flow") == S.RectifiedFlow() and S.make_objective("edm") != S.make_objective("flow")
    for make, key in ((lambda: S.EDM(P_std=0), "P_std"), (lambda: S.RectifiedFlow(shift=-1), "shift"),
                      (lambda: S.VP(t_max=1.0), "t_max"), (lambda: S.EDM(sigma_min=1, sigma_max=0.5), "sigma_min"),
                      (lambda: S.make_objective("ddpm"), "objective"),
                      (lambda: S.make_objective({"name": "flow", "shfit": 3}), "objective")):
        with pytest.raises(ValueError, match=key):
            make()


# --- Trainer and pipeline for every objective ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from transformers.utils import logging as hf_logging

    from deepfusion_ref.text import LanguageModel, packaged_minilm_path

    hf_logging.disable_progress_bar()
    return LanguageModel.from_pretrained(packaged_minilm_path(), max_length=48)


def tiny_trainer(lm, objective, **options):
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.dit import DeepFusionDiT
    from deepfusion_ref.train import Trainer

    torch.manual_seed(0)
    dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=lm.hidden_size,
                        num_llm_layers=lm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
    return Trainer(dit, lm, SceneDataset(8, 16, 16, seed=1), steps=4, batch_size=4, lr=1e-3, progress=False,
                   objective=objective, **options)


@pytest.mark.parametrize("name", ["edm", "flow", "vp"])
def test_trainer_and_pipeline_for_every_objective(minilm, tmp_path, name):
    from deepfusion_ref.pipeline import Text2ImagePipeline

    trainer = tiny_trainer(minilm, name)
    seen = []
    loss = trainer.objective.loss
    trainer.objective.loss = lambda model, x0, cond, t, noise: seen.append(t) or loss(model, x0, cond, t, noise)
    history = trainer.fit()
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    if name == "flow":  # logit-normal times in (0, 1)
        assert all(((t > 0) & (t < 1)).all() for t in seen)
    pipe = Text2ImagePipeline.from_trainer(trainer)
    assert pipe.objective == trainer.objective and pipe.parameterization == name
    times = []

    def on_step_end(p, i, t, kwargs):
        times.append(t)
        assert p is pipe and kwargs["latents"].shape == (1, 3, 16, 16)

    images = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="pt", progress=False, callback_on_step_end=on_step_end).images
    assert images.shape == (1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert times == trainer.objective.timesteps(3, image_seq_len=64)[:-1].tolist()  # the objective's own times
    pipe.save_pretrained(tmp_path / name)
    assert json.loads((tmp_path / name / "pipeline.json").read_text())["objective"] == trainer.objective.config()
    again = Text2ImagePipeline.from_pretrained(tmp_path / name)
    assert again.objective == trainer.objective
    assert torch.equal(images, again("a red circle", num_inference_steps=3, output_type="pt", progress=False,
                                     generator=torch.Generator().manual_seed(0)).images)


def test_callback_can_replace_the_latents(minilm):
    from deepfusion_ref.pipeline import Text2ImagePipeline

    pipe = Text2ImagePipeline.from_trainer(tiny_trainer(minilm, "flow"))
    zeroed = pipe("a red circle", num_inference_steps=3, output_type="pt", progress=False,
                  callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])}).images
    assert torch.equal(zeroed, torch.full_like(zeroed, 0.5))  # the last step's latents 0 decode to mid-grey


def test_trainer_refuses_wrapped_networks_and_edm_shorthands_for_other_objectives(minilm):
    trainer = tiny_trainer(minilm, "edm")
    with pytest.raises(ValueError, match="network: pass the raw network"):
        type(trainer)(S.EDMPrecond(trainer.network), minilm, trainer.dataset, steps=2)
    with pytest.raises(ValueError, match="P_mean/P_std"):
        tiny_trainer(minilm, "flow", P_mean=-0.6)
    assert tiny_trainer(minilm, "edm", P_mean=-0.6).objective == S.EDM(P_mean=-0.6)
