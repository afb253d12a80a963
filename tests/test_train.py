"""Training building blocks: parameter groups, the trapezoidal schedule, spike skipping (parameters untouched),
and checkpoints: bit-identical resume, keep-last-N, and corruption detected without harming older checkpoints."""
import json

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from deepfusion_ref.train import (SpikeSkipper, Trainer, latest_checkpoint, load_checkpoint, param_groups,
                                  save_checkpoint, trapezoidal_lr)


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU(),
                          nn.Linear(16, 1))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: trapezoidal_lr(s, 20, 3, 5))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    return model, opt, sched, ema


def train(model, opt, sched, ema, steps):
    for _ in range(steps):
        tokens = torch.randint(0, 10, (16, 2))
        loss = (model(tokens) - tokens.float().sum(1, keepdim=True) / 10).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)


def states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_param_groups_exclude_biases_norms_and_embeddings():
    model = make()[0]
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[2].weight), id(model[5].weight)}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_trapezoidal_schedule():
    f = [trapezoidal_lr(s, 100, 10, 20, 0.0) for s in range(100)]
    assert f[:10] == [(s + 1) / 10 for s in range(10)] and set(f[10:80]) == {1.0}
    assert all(a > b for a, b in zip(f[80:], f[81:])) and f[-1] == 0.0
    with pytest.raises(ValueError, match="total_steps"):
        trapezoidal_lr(0, 10, 8, 8)


def test_spike_and_nan_updates_are_skipped_and_counted():
    model, opt, _, _ = make()
    skipper = SpikeSkipper(factor=3.0, min_history=3)
    for _ in range(5):
        assert not skipper.should_skip(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf"), 100.0):
        loss = model(torch.randint(0, 10, (4, 2))).sum() * bad
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if skipper.should_skip(norm):
            opt.zero_grad()
        else:
            opt.step()
    assert skipper.skipped == 3 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = skipper.state_dict()
    other = SpikeSkipper(factor=3.0, min_history=3)
    other.load_state_dict(state)
    assert other.skipped == 3 and other.should_skip(100.0) and not other.should_skip(1.1)


def test_resume_is_bit_identical(tmp_path):
    straight = make()
    train(*straight, 20)
    run = make()
    train(*run, 10)
    folder = save_checkpoint(tmp_path, 10, *run, extra={"data_position": 160})
    resumed = make(seed=123)  # different init and RNG: everything must come from the checkpoint
    meta = load_checkpoint(folder, *resumed)
    assert meta["step"] == 10 and meta["extra"]["data_position"] == 160
    train(*resumed, 10)
    assert states_equal(straight[0], resumed[0]) and states_equal(straight[3], resumed[3])
    assert resumed[2].last_epoch == straight[2].last_epoch


def test_keeps_the_last_n_and_finds_the_latest(tmp_path):
    model = make()[0]
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, model, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000015", "step_00000020"]
    assert latest_checkpoint(tmp_path).name == "step_00000020"
    assert not list(tmp_path.glob(".tmp_*"))


@pytest.mark.parametrize("damage", ["truncate", "tamper", "manifest"])
def test_corrupted_checkpoint_is_a_clear_error_and_older_one_survives(tmp_path, damage):
    model, opt, sched, ema = make()
    good = save_checkpoint(tmp_path, 1, model, opt, sched, ema)
    train(model, opt, sched, ema, 1)
    bad = save_checkpoint(tmp_path, 2, model, opt, sched, ema)
    target = bad / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "tamper":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (bad / "manifest.json").unlink()
    fresh = make(seed=5)
    with pytest.raises(ValueError, match="is damaged|has no manifest.json"):
        load_checkpoint(bad, *fresh)
    load_checkpoint(good, *fresh)  # the earlier checkpoint is intact and loads
    assert json.loads((good / "state.json").read_text())["step"] == 1


# --- the trainer ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from deepfusion_ref.text import LanguageModel, packaged_minilm_path

    hf_logging.disable_progress_bar()
    return LanguageModel.from_pretrained(packaged_minilm_path(), max_length=96)


def make_trainer(lm, tmp_path=None, steps=20, seed=0, **options):
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.dit import DeepFusionDiT
    from deepfusion_ref.train import Trainer

    torch.manual_seed(0)
    dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=lm.hidden_size,
                        num_llm_layers=lm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
    return Trainer(dit, lm, SceneDataset(8, 16, 16, seed=1), steps=steps, batch_size=4, lr=1e-3,
                   warmup_steps=2, decay_steps=5, checkpoint_dir=tmp_path, checkpoint_every=10 if tmp_path else 0,
                   seed=seed, progress=False, **options)


@pytest.mark.parametrize("P_mean, P_std", [(-1.2, 1.2), (0.5, 0.25)])
def test_training_noise_levels_follow_P_mean_and_P_std(minilm, P_mean, P_std):
    trainer = make_trainer(minilm, steps=8, P_mean=P_mean, P_std=P_std)
    seen = []
    loss = trainer.objective.loss
    trainer.objective.loss = lambda model, x0, cond, sigma, noise: seen.append(sigma) or loss(model, x0, cond, sigma,
                                                                                              noise)
    trainer.fit(until=3)
    assert len(seen) == 3
    for step, sigma in enumerate(seen):  # by hand: ln(sigma) = P_mean + P_std z, z the step's first normal draws
        z = torch.randn(4, generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(sigma, torch.exp(P_mean + P_std * z))
    with pytest.raises(ValueError, match="P_std"):
        make_trainer(minilm, P_std=0.0)


def test_fit_stops_when_the_time_budget_is_spent(minilm, monkeypatch):
    from types import SimpleNamespace

    import deepfusion_ref.train as train

    trainer = make_trainer(minilm, steps=50)
    clock = iter(range(0, 10_000, 7))  # a fake clock: every reading is 7 s after the previous one
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    history = trainer.fit(minutes=0.5)  # start read at 0 s, then 7, 14, 21, 28 s (train) and 35 s (stop)
    assert len(history) == trainer.step == 4
    with pytest.raises(ValueError, match="minutes"):
        trainer.fit(minutes=0)


@pytest.mark.parametrize("timed", [True, False])
def test_fit_budget_moves_the_lr_schedule_ahead(minilm, monkeypatch, timed):
    from types import SimpleNamespace

    import deepfusion_ref.train as train

    trainer = make_trainer(minilm, steps=50)  # lr 1e-3, warm-up 2, decay over steps 45..49
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    history = trainer.fit(minutes=0.5, timed_schedule=timed)
    # 4 steps, taken at 7, 14, 21 and 28 s of 30: the last at 93% of the budget, i.e. schedule step int(0.93 * 50) = 46,
    # inside the decay (by hand: 1 - (46 - 45 + 1) / 5 = 0.6); by steps alone it is step 4, on the plateau.
    assert trainer.step == 4
    assert history[-1]["lr"] == pytest.approx(1e-3 * (0.6 if timed else 1.0))
    assert train.trapezoidal_lr(46, 50, 2, 5) == pytest.approx(0.6)


def test_trainer_resume_is_bit_identical(minilm, tmp_path):
    straight = make_trainer(minilm)
    straight.fit()
    first = make_trainer(minilm, tmp_path / "ckpt")
    first.fit(until=10)  # as if killed after the checkpoint at step 10
    resumed = make_trainer(minilm, tmp_path / "ckpt", steps=20)
    assert resumed.resume() and resumed.step == 10
    resumed.fit()
    assert states_equal(straight.denoiser, resumed.denoiser) and states_equal(straight.ema, resumed.ema)


def test_trainer_batches_depend_only_on_seed_and_step(minilm):
    a, b = make_trainer(minilm), make_trainer(minilm)
    xa, pa = a.batch(7)
    xb, pb = b.batch(7)
    assert torch.equal(xa, xb) and pa == pb
    assert not torch.equal(a.batch(8)[0], xa)
    prompts = [p for s in range(50) for p in a.batch(s)[1]]
    assert 0 < prompts.count("") < len(prompts) * 0.25  # ~10% condition dropout


def test_every_caption_level_is_sampled(minilm):
    trainer = make_trainer(minilm)
    all_captions = {c for i in range(len(trainer.dataset)) for c in trainer.dataset[i]["captions"]}
    drawn = [p for s in range(60) for p in trainer.batch(s)[1] if p]
    assert set(drawn) <= all_captions
    levels = {trainer.dataset[i]["captions"].index(p) for i in range(len(trainer.dataset))
              for p in drawn if p in trainer.dataset[i]["captions"]}
    assert levels == set(range(6))


def test_grad_accumulation_equals_the_big_batch(minilm):
    from deepfusion_ref.schedules import edm_loss

    # two micro-batches of 4 accumulate the gradient of their mean; check by recomputing it directly
    trainer = make_trainer(minilm)
    trainer.grad_accum, trainer.grad_clip = 2, None
    trainer.skipper.min_history = 10**9  # never skip in this test
    trainer.cond_drop_prob = manual_drop = 0.5  # dropped rows (learned null) in both micro-batches
    model = trainer.conditioned
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train_step()
    manual = make_trainer(minilm)
    manual.cond_drop_prob = manual_drop
    loss = 0
    for micro in range(2):
        x0, prompts = manual.batch(micro)
        assert "" in prompts
        g = torch.Generator().manual_seed(micro)
        loss = loss + edm_loss(manual.conditioned, x0, manual.encode(prompts), generator=g) / 2
    loss.backward()
    opt = torch.optim.AdamW(param_groups(manual.conditioned, 0.1), lr=1e-3 * trapezoidal_lr(0, 20, 2, 5),
                            betas=(0.9, 0.95))
    opt.step()
    for a, b, p0 in zip(model.parameters(), manual.conditioned.parameters(), before):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a, p0) for a, p0 in zip(model.parameters(), before))


def test_dropped_captions_train_the_learned_null(minilm):
    from deepfusion_ref.text import LayerStack

    trainer = make_trainer(minilm)
    cond = trainer.encode(["a red circle", "", "two shapes"])
    assert cond.drop.tolist() == [False, True, False]
    seen = trainer.null(cond)
    assert torch.equal(seen.hidden[:, 0], cond.hidden[:, 0]) and torch.equal(seen.hidden[:, 2], cond.hidden[:, 2])
    assert torch.equal(seen.hidden[:, 1, 0], trainer.null.hidden[:, 0]) and seen.mask[1].sum() == 1
    # the unconditional branch at sampling time is the same learned condition, and a stack keeps its drop marks
    assert torch.equal(trainer.null.stack(2).hidden[:, 1, 0], trainer.null.hidden[:, 0])
    joined = LayerStack.stack([cond, minilm.encode(["x"])])
    assert joined.drop.tolist() == [False, True, False, False]
    # an update moves the null only when some row of the batch was dropped
    trainer.cond_drop_prob = 0.0
    before = trainer.null.hidden.detach().clone()
    for _ in range(3):  # (adaLN-Zero: the text path only influences the output after the gates have moved)
        trainer.train_step()
    assert torch.equal(trainer.null.hidden, before)
    trainer.cond_drop_prob = 1.0
    trainer.train_step()
    assert not torch.equal(trainer.null.hidden, before)


def test_sample_grids_are_written_at_intervals(minilm, tmp_path):
    from PIL import Image

    trainer = make_trainer(minilm, steps=8)
    trainer.sample_every, trainer.sample_prompts, trainer.sample_dir = 4, ["a red circle", "two shapes"], tmp_path
    trainer.sample_steps = 3
    trainer.fit()
    grids = sorted(p.name for p in tmp_path.glob("*.png"))
    assert grids == ["step_00000004.png", "step_00000008.png"]
    assert Image.open(tmp_path / grids[0]).size == (2 * 18 + 2, 18 + 2)  # two 16x16 samples with 2-pixel borders
    a = trainer.sample(["a red circle"], steps=3, seed=1)
    assert torch.equal(a, trainer.sample(["a red circle"], steps=3, seed=1)) and 0 <= a.min() and a.max() <= 1
    with pytest.raises(ValueError, match="sample_prompts"):
        type(trainer)(trainer.network, minilm, trainer.dataset, steps=2, sample_every=5)


def test_stages_switch_trainable_parameters(minilm):
    from deepfusion_ref.train import set_trainable

    trainer = make_trainer(minilm)
    trainer.stages = [(0, ["net.blocks.0.*"]), (2, ["net.blocks.1.*", "net.final*"])]
    snapshots = []
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters()}
        trainer.train_step()
        snapshots.append({n for n, p in trainer.denoiser.named_parameters() if not torch.equal(p, before[n])})
    assert snapshots[0] and all(n.startswith("net.blocks.0.") for n in snapshots[0] | snapshots[1])
    assert snapshots[3] and all(n.startswith(("net.blocks.1.", "net.final")) for n in snapshots[2] | snapshots[3])
    with pytest.raises(ValueError, match="patterns"):
        set_trainable(trainer.denoiser, ["nothing.*"])


def run_worker(out, parallel="ddp", ranks=1, checkpoint_dir=None, grad_accum=1):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("_ddp_train.py")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["GRAD_ACCUM"] = str(grad_accum)
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]  # a free port
    args = [str(worker), str(out), parallel] + ([str(checkpoint_dir)] if checkpoint_dir else [])
    subprocess.run(launcher + args, check=True, env=env, timeout=300)
    return load_file(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    pytest.importorskip("transformers")
    return run_worker(tmp_path_factory.mktemp("one") / "one.safetensors")


def assert_same_training(got, expected):
    start = make_state_for_comparison()
    assert got.keys() == expected.keys()
    moved = 0
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4)
        moved += k in start and not torch.equal(expected[k], start[k])
    assert moved > 0  # training happened
    assert any(k.startswith("null.") for k in expected)  # the learned null trained and was checkpointed too


@pytest.mark.slow
def test_torchrun_ddp_equals_one_process(one_process, tmp_path):
    # 2 ranks (gloo, CPU) with half of the global batch each == 1 process with the whole batch, up to the order
    # of the gradient reduction.
    got = run_worker(tmp_path / "ddp.safetensors", "ddp", ranks=2)
    assert int(got.pop("allreduce_calls")) > 0  # DDP exchanged the gradients
    assert_same_training(got, one_process)


@pytest.mark.slow
def test_torchrun_ddp_accumulates_without_exchanging_until_the_last_micro_batch(tmp_path):
    # grad_accum 2 under DDP == one process with grad_accum 2; and DDP exchanged gradients once per optimiser step
    # (no_sync on the first micro-batch), as often as with no accumulation at all, not once per micro-batch.
    single = run_worker(tmp_path / "one.safetensors", grad_accum=2)
    got = run_worker(tmp_path / "ddp.safetensors", "ddp", ranks=2, grad_accum=2)
    calls = int(got.pop("allreduce_calls"))
    assert_same_training(got, single)
    plain = int(run_worker(tmp_path / "ddp1.safetensors", "ddp", ranks=2)["allreduce_calls"])
    assert calls == plain > 0  # 4 steps x the buckets of one exchange; without no_sync it would be twice as many


@pytest.mark.slow
def test_torchrun_fsdp2_with_resume_equals_one_process(one_process, tmp_path):
    # FSDP2 (fully_shard, 2 ranks): 2 steps, a checkpoint gathered from the shards, a fresh sharded trainer resumed
    # from it, 2 more steps == 4 steps in one process. The checkpoint also loads into a plain, unsharded model.
    from deepfusion_ref.train import latest_checkpoint, load_checkpoint

    got = run_worker(tmp_path / "fsdp.safetensors", "fsdp", ranks=2, checkpoint_dir=tmp_path / "ckpt")
    assert_same_training(got, one_process)
    plain = {}
    meta = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"), plain, restore_rng=False)
    assert meta["step"] == 4 and plain.keys() == {k for k in one_process if not k.startswith("ema.")}


def make_state_for_comparison():
    "The worker's initial parameters (same seed and config), to check that training moved them."
    from deepfusion_ref.dit import DeepFusionDiT
    from deepfusion_ref.schedules import EDMPrecond

    torch.manual_seed(0)
    dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=384,
                        num_llm_layers=6, rope_axes=(4, 6, 6), long_skips=False)
    return {f"denoiser.{k}": v for k, v in EDMPrecond(dit).state_dict().items()}


class FullCaptionScenes(torch.utils.data.Dataset):
    "A SceneDataset whose items keep only the full-detail caption: each image has one prompt that names it."

    def __init__(self, scenes):
        self.scenes = scenes

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        item = self.scenes[index]
        return {**item, "captions": item["captions"][-1:]}


def test_tiny_dit_overfits_sixteen_scenes(minilm, threads):
    # A tiny deep-fusion DiT memorises 16 captioned scenes: the EDM loss on a fixed evaluation set (the 16 images,
    # each under 4 fixed (sigma, noise) draws from EDM's log-normal) falls more than 10x. Per-step losses are too
    # noisy to compare (each step draws new sigmas); the fixed set removes that noise.
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.dit import DeepFusionDiT
    from deepfusion_ref.schedules import edm_coefficients, edm_loss, edm_loss_weight, sample_edm_sigmas
    from deepfusion_ref.text import LayerStack
    from deepfusion_ref.train import Trainer

    threads(1)  # matrices this small gain nothing from a second thread, and lose a lot on a busy CPU
    data = FullCaptionScenes(SceneDataset(16, 16, 16, seed=3, max_objects=2, exact_rgb_prob=0.0))
    prompts = [data[i]["captions"][0] for i in range(len(data))]
    assert len(set(prompts)) == len(prompts)  # distinct prompts: memorising is possible
    torch.manual_seed(0)
    dit = DeepFusionDiT(in_channels=3, patch_size=4, hidden_size=64, depth=2, num_heads=4, text_dim=minilm.hidden_size,
                        num_llm_layers=minilm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
    trainer = Trainer(dit, minilm, data, steps=800, batch_size=16, lr=6e-3, weight_decay=0.0,
                      warmup_steps=80, decay_steps=400, cond_drop_prob=0.0, learned_null=False, spike_factor=1e9,
                      progress=False)
    draws = 4
    images = torch.stack([data[i]["image"] for i in range(len(data))]).repeat(draws, 1, 1, 1)
    cond = LayerStack.stack([minilm.encode(prompts)] * draws)
    g = torch.Generator().manual_seed(123)
    sigma = sample_edm_sigmas(len(images), generator=g)
    noise = torch.randn(images.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return edm_loss(trainer.denoiser, images, cond, sigma=sigma, noise=noise).item()

    before = eval_loss()
    # the zero-initialised output layer makes the untrained denoiser D(x) = c_skip x exactly
    c_skip = edm_coefficients(sigma)[0].view(-1, 1, 1, 1)
    untrained = (edm_loss_weight(sigma) * ((c_skip * (images + sigma.view(-1, 1, 1, 1) * noise) - images) ** 2)
                 .flatten(1).mean(1)).mean().item()
    assert before == pytest.approx(untrained, rel=1e-5)
    history = trainer.fit()
    after = eval_loss()
    assert len(history) == 800 and not any(h["skipped"] for h in history)
    assert after < before / 10, f"fixed-set EDM loss fell only {before / after:.1f}x ({before:.3f} -> {after:.3f})"


def test_dataloader_workers_train_exactly_as_in_process(minilm):
    # batches are a function of (seed, step): two worker processes building them ahead change nothing
    in_process, workers = make_trainer(minilm, steps=8), make_trainer(minilm, steps=8, num_workers=2)
    in_process.fit()
    workers.fit(until=3)
    workers.fit()  # a second fit starts a new loader at step 3
    for a, b in zip(in_process.conditioned.parameters(), workers.conditioned.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_workers"):
        make_trainer(minilm, num_workers=-1)


def test_trainer_trains_on_aspect_buckets(minilm, tmp_path):
    import math

    import numpy as np
    from deepfusion_ref.data import ImageTextFolder
    from deepfusion_ref.dit import DeepFusionDiT
    from deepfusion_ref.train import Trainer
    from PIL import Image

    rows = []
    for k, (w, h) in enumerate([(40, 40), (64, 30), (30, 30), (70, 34)]):
        Image.fromarray(np.full((h, w, 3), 50 * k, np.uint8)).save(tmp_path / f"{k}.png")
        rows.append(f'{{"file": "{k}.png", "caption": "image {k}"}}')
    (tmp_path / "captions.jsonl").write_text("\n".join(rows))
    folder = ImageTextFolder(tmp_path, size=None, buckets=[(16, 16), (24, 12)])
    dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=minilm.hidden_size,
                        num_llm_layers=minilm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
    trainer = Trainer(dit, minilm, folder, steps=6, batch_size=2, progress=False, objective="flow")
    shapes = {tuple(trainer.batch(s)[0].shape[-2:]) for s in range(6)}
    assert shapes == {(16, 16), (12, 24)}
    history = trainer.fit()
    assert len(history) == 6 and all(math.isfinite(m["loss"]) for m in history)


def test_image_cond_prob_rows_are_deterministic_and_read_their_image(tmp_path):
    from deepfusion_ref.data import RenderedScenes, SceneDataset
    from deepfusion_ref.text import LanguageModel, build_vision_lm, packaged_minilm_path

    scenes = RenderedScenes(SceneDataset(8, 16, 16, seed=3))
    captions = [c for i in range(8) for c in scenes[i]["captions"]]
    vlm = LanguageModel.from_pretrained(build_vision_lm(captions, tmp_path / "vlm", layers=1, steps=3, progress=False))
    make = lambda p, seed=0: Trainer(torch.nn.Conv2d(3, 3, 1), vlm, scenes, steps=2, batch_size=8,  # noqa: E731
                                     image_cond_prob=p, seed=seed, progress=False)
    trainer = make(0.5)
    images, prompts = trainer.batch(1)
    rows = trainer.image_rows(1, prompts)
    assert torch.equal(rows, make(0.5).image_rows(1, prompts))  # a function of (seed, step)
    assert not torch.equal(rows, make(0.5, seed=1).image_rows(1, prompts)) or rows.sum() in (0, 8)
    assert not make(0.0).image_rows(1, prompts).any() and bool(make(1.0).image_rows(1, prompts).sum() ==
                                                               sum(p != "" for p in prompts))
    cond = trainer.encode(prompts, images, rows)
    for i in range(len(prompts)):
        alone = vlm.encode([""], images=[(images[i] + 1) / 2]) if rows[i] else vlm.encode([prompts[i]])
        n = int(alone.mask.sum())
        torch.testing.assert_close(cond.hidden[:, i, :n], alone.hidden[:, 0, :n])
        assert bool(cond.drop[i]) == (prompts[i] == "" and not rows[i])
    with pytest.raises(ValueError, match="image_cond_prob"):
        Trainer(torch.nn.Conv2d(3, 3, 1), LanguageModel.from_pretrained(packaged_minilm_path()), scenes, steps=2,
                image_cond_prob=0.5)
    with pytest.raises(ValueError, match="image_cond_prob"):
        make(1.5)


def test_language_models_last_layer_trains_checkpoints_and_samples_from_its_average(tmp_path):
    from deepfusion_ref.pipeline import Text2ImagePipeline
    from deepfusion_ref.text import LanguageModel, packaged_minilm_path

    fresh = lambda: LanguageModel.from_pretrained(packaged_minilm_path(), max_length=96)  # noqa: E731 (not shared)
    lm = fresh()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    trainer = make_trainer(lm, tmp_path / "ck", steps=10, lm_trainable_layers=1)
    trainer.fit()
    changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("encoder.layer.5.") for k in changed)  # the last layer only
    assert any(k.startswith("lm_tail.") for k in trainer.conditioned.state_dict())
    # resumed in a new trainer over a fresh language model: the trained layer comes back with the network
    again_lm = fresh()
    again = make_trainer(again_lm, tmp_path / "ck", steps=10, lm_trainable_layers=1)
    assert again.resume() and all(torch.equal(v, again_lm.model.state_dict()[k]) for k, v in lm.model.state_dict().items())
    # the EMA pipeline reads with the averaged layer, in a copy: the live model is untouched by sampling
    pipe = Text2ImagePipeline.from_trainer(trainer)
    assert pipe.language_model is not lm
    ema_tail = trainer.ema.module.lm_tail.state_dict()
    assert all(torch.equal(v, pipe.language_model.tail_modules(1).state_dict()[k]) for k, v in ema_tail.items())
    assert not torch.equal(pipe.language_model.encode("a red circle").hidden[-1], fresh().encode("a red circle").hidden[-1])
    assert Text2ImagePipeline.from_trainer(trainer, ema=False).language_model is lm
    with pytest.raises(ValueError, match="lm_trainable_layers: not supported with parallel='fsdp'"):
        make_trainer(fresh(), steps=10, lm_trainable_layers=1, parallel="fsdp")
    with pytest.raises(ValueError, match="lm_trainable_layers: k must be an int in 1..6"):
        make_trainer(fresh(), steps=10, lm_trainable_layers=7)
