"""Fault injection: what a crash, a second writer, a damaged file or a bad value does to training and saved models.
SIGKILL at random instants of training and of saving (then resume in a fresh process and compare bit for bit with an
uninterrupted run), each kind of damaged file, two writers on one folder, and every config key given a wrong type
and an out-of-range value, generated from the config schema."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepfusion_ref.experiment import RANGES, ConfigError, section_schema, validate_config
from deepfusion_ref.files import DamagedError, FolderLock
from deepfusion_ref.train import latest_checkpoint, read_metrics, save_checkpoint

WORKER = Path(__file__).with_name("_fault_worker.py")


def run_worker(*args, kill_after: float | None = None, until: str | None = None):
    "Run the worker; with kill_after, SIGKILL it that many seconds after `until` appears (a file), or after start."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        return out
    deadline = time.time() + 120
    while until is not None and not Path(until).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


# --- checkpoints and saved pipelines survive SIGKILL --------------------------------------------------------------


def test_sigkill_during_training_then_resume_is_bit_identical(tmp_path):
    steps = 8
    run_worker("train", tmp_path / "straight", steps, tmp_path / "straight.safetensors")
    reference = load_file(tmp_path / "straight.safetensors")
    rng = random.Random(0)
    for trial in range(3):
        out = tmp_path / f"killed{trial}"
        # killed at a random instant after the first checkpoint exists: mid-step, mid-save or mid-swap
        run_worker("train", out, steps, tmp_path / "unused", kill_after=rng.uniform(0, 0.6),
                   until=out / "checkpoints" / "step_00000001" / "manifest.json")
        run_worker("train", out, steps, out / "final.safetensors")  # a fresh process resumes and finishes
        resumed = load_file(out / "final.safetensors")
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), f"trial {trial}: not bit-identical"
        assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))
        assert not list((out / "checkpoints").glob(".tmp_*")) and not list((out / "checkpoints").glob(".old_*"))


def test_sigkill_during_saving_never_loses_the_checkpoint_or_the_pipeline(tmp_path):
    from deepfusion_ref.pipeline import Text2ImagePipeline

    rng = random.Random(1)
    for trial in range(4):
        run_worker("save", tmp_path, kill_after=rng.uniform(0, 1.5), until=tmp_path / "pipeline" / "manifest.json")
        latest = latest_checkpoint(tmp_path / "checkpoints")  # also puts back a copy renamed aside by the swap
        assert latest is not None and latest.name == "step_00000002", trial
        pipe = Text2ImagePipeline.from_pretrained(tmp_path / "pipeline")  # puts back a copy renamed aside, too
        assert pipe.objective.name == "edm"
    leftovers = list(tmp_path.glob(".tmp_*")) + list((tmp_path / "checkpoints").glob(".tmp_*"))
    # a new writer cleans up after the dead ones
    run_worker("save", tmp_path, kill_after=0.3, until=tmp_path / "pipeline" / "manifest.json")
    from deepfusion_ref.files import recover_folders

    recover_folders(tmp_path)
    recover_folders(tmp_path / "checkpoints")
    assert not any(p.exists() for p in leftovers)


def test_pruning_counts_only_complete_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 2)
    for name in ("step_00000097", "step_00000098", "step_00000099"):  # empty folders: never-finished checkpoints
        (tmp_path / name).mkdir()
    path = save_checkpoint(tmp_path, 3, model, keep=2)
    assert path.exists() and latest_checkpoint(tmp_path) == path
    save_checkpoint(tmp_path, 4, model, keep=2)
    save_checkpoint(tmp_path, 5, model, keep=2)
    complete = sorted(p.name for p in tmp_path.glob("step_*") if (p / "manifest.json").exists())
    assert complete == ["step_00000004", "step_00000005"]
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 6, model, keep=0)


# --- damaged files ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from transformers.utils import logging as hf_logging

    from deepfusion_ref.text import LanguageModel, packaged_minilm_path

    hf_logging.disable_progress_bar()
    return LanguageModel.from_pretrained(packaged_minilm_path(), max_length=48)


def tiny_trainer(lm, out, steps=4, **options):
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.dit import DeepFusionDiT
    from deepfusion_ref.train import Trainer

    torch.manual_seed(0)
    dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=lm.hidden_size,
                        num_llm_layers=lm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
    return Trainer(dit, lm, SceneDataset(8, 16, 16, seed=1), steps=steps, batch_size=4, lr=1e-3, progress=False,
                   checkpoint_dir=out / "checkpoints", checkpoint_every=2, metrics_file=out / "metrics.jsonl",
                   **options)


def test_damaged_latest_checkpoint_is_named_and_an_older_one_offered(minilm, tmp_path):
    tiny_trainer(minilm, tmp_path).fit()
    newest = tmp_path / "checkpoints" / "step_00000004"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DamagedError, match=r"step_00000004 is damaged.*step_00000002.*fallback=True"):
        tiny_trainer(minilm, tmp_path).resume()
    again = tiny_trainer(minilm, tmp_path)
    with pytest.warns(UserWarning, match="skipped"):
        assert again.resume(fallback=True) and again.step == 2


def test_torn_metrics_line_and_nan_are_tolerated(minilm, tmp_path):
    trainer = tiny_trainer(minilm, tmp_path)
    trainer.fit(until=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # a crash in the middle of a line
    resumed = tiny_trainer(minilm, tmp_path)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    from deepfusion_ref.train import append_metrics

    append_metrics(tmp_path / "metrics.jsonl", {"step": 5, "loss": math.nan, "grad_norm": math.inf})
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])  # strict JSON: no NaN
    assert last == {"step": 5, "loss": None, "grad_norm": None}


def test_a_run_that_skipped_every_step_fails(minilm, tmp_path):
    trainer = tiny_trainer(minilm, tmp_path)
    with torch.no_grad():
        for p in trainer.network.parameters():  # NaN everywhere: every gradient norm is non-finite
            p.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="every one of the 4 steps"):
        trainer.fit()


@pytest.fixture
def saved_pipe(minilm, tmp_path):
    from deepfusion_ref.pipeline import Text2ImagePipeline

    trainer = tiny_trainer(minilm, tmp_path, steps=2)
    trainer.fit()
    Text2ImagePipeline.from_trainer(trainer).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_damaged_pipelines_are_refused(saved_pipe):
    from deepfusion_ref.pipeline import Text2ImagePipeline

    weights = saved_pipe / "network" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name].clone().fill_(5e37)  # one weight set to a huge value
    save_file(state, weights)
    with pytest.raises(DamagedError, match="diffusion_pytorch_model.safetensors does not match its hash"):
        Text2ImagePipeline.from_pretrained(saved_pipe)
    (saved_pipe / "network" / "config.json").unlink()
    with pytest.raises(DamagedError, match="config.json is missing"):
        Text2ImagePipeline.from_pretrained(saved_pipe)


def test_pipeline_json_without_a_key_is_named(saved_pipe):
    from deepfusion_ref.files import write_manifest
    from deepfusion_ref.pipeline import Text2ImagePipeline

    settings = json.loads((saved_pipe / "pipeline.json").read_text())
    del settings["sample_size"]
    (saved_pipe / "pipeline.json").write_text(json.dumps(settings))
    write_manifest(saved_pipe)  # a consistent manifest: the folder is intact, its settings are not
    with pytest.raises(DamagedError, match="lacks the key.*sample_size"):
        Text2ImagePipeline.from_pretrained(saved_pipe)


def test_nan_images_and_nan_guidance_are_errors_not_black_pngs(saved_pipe, tmp_path, capsys):
    from deepfusion_ref.cli import main
    from deepfusion_ref.pipeline import Text2ImagePipeline

    pipe = Text2ImagePipeline.from_pretrained(saved_pipe)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe("a red circle", guidance_scale=float("nan"), num_inference_steps=2, progress=False)
    with torch.no_grad():
        next(pipe.network.parameters()).fill_(math.nan)
    with pytest.raises(FloatingPointError, match="NaN"):
        pipe("a red circle", num_inference_steps=2, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(saved_pipe), "--prompt", "x", "--out", str(tmp_path / "x.png"),
              "--guidance", "nan"])
    assert exit_info.value.code == 2 and "--guidance must be a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(saved_pipe), "--prompt", "x", "--out", str(tmp_path / "x.png"),
              "--steps", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--steps must be an int >= 1" in err and "num_inference_steps" not in err
    assert not (tmp_path / "x.png").exists()


# --- two writers --------------------------------------------------------------------------------------------------


def test_a_second_writer_on_one_out_dir_is_refused(minilm, tmp_path):
    with FolderLock(tmp_path / "checkpoints", "checkpoint_dir"):  # another run holds the folder
        with pytest.raises(RuntimeError, match=r"checkpoint_dir: .* is in use by another run \(pid \d+\)"):
            tiny_trainer(minilm, tmp_path).fit()
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was written by the refused run
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from deepfusion_ref.files import FolderLock; "
                             f"lock = FolderLock({str(tmp_path / 'checkpoints')!r}); print('locked', flush=True); "
                             "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"pid {proc.pid}"):
            tiny_trainer(minilm, tmp_path).fit()
    finally:
        proc.kill()
        proc.wait()
    assert len(tiny_trainer(minilm, tmp_path).fit()) == 4  # the lock went with the process


# --- config: changed on resume, wrong types and ranges -------------------------------------------------------------


def base_config(out: Path) -> dict:
    return {"seed": 0, "out_dir": str(out),
            "data": {"kind": "scenes", "width": 16, "height": 16, "size": 16, "max_objects": 2},
            "language_model": {"path": "minilm", "max_length": 48},
            "model": {"class": "DeepFusionDiT", "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2,
                      "long_skips": False},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2, "progress": False}}


def test_resume_with_a_changed_config_is_refused_and_branching_is_explicit(tmp_path):
    from deepfusion_ref.experiment import Experiment

    config = base_config(tmp_path / "run")
    Experiment(config).fit(log=lambda *a: None)
    changed = json.loads(json.dumps(config))
    changed["train"]["lr"] = 5e-2
    with pytest.raises(ValueError, match=r"changed: train\.lr"):
        Experiment(changed).fit(log=lambda *a: None)
    longer = json.loads(json.dumps(config))
    longer["train"]["steps"] = 6
    Experiment(longer).fit(log=lambda *a: None)  # train.steps may change: it trains on
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))
    changed["out_dir"], changed["train"]["steps"] = str(tmp_path / "branch"), 6
    Experiment(changed).fit(branch_from=tmp_path / "run" / "checkpoints" / "step_00000004", log=lambda *a: None)
    assert [m["step"] for m in read_metrics(tmp_path / "branch" / "metrics.jsonl")] == [5, 6]


def _wrong_type(kinds: tuple):
    "A value of none of `kinds`."
    for candidate in ("ten", 2.5, [1], {"a": 1}, True):
        ok = any(isinstance(candidate, bool) if k is bool else
                 isinstance(candidate, int) and not isinstance(candidate, bool) if k is int else
                 isinstance(candidate, (int, float)) and not isinstance(candidate, bool) if k is float else
                 isinstance(candidate, k) for k in kinds)
        if not ok:
            return candidate
    raise AssertionError(kinds)


SCHEMA_SECTIONS = [("data", {"kind": "scenes"}), ("language_model", {}), ("model", {"class": "DeepFusionDiT"}),
                   ("train", {})]


@pytest.mark.parametrize("section, selector", SCHEMA_SECTIONS, ids=[s for s, _ in SCHEMA_SECTIONS])
def test_every_config_key_of_the_wrong_type_is_named(tmp_path, section, selector):
    schema = section_schema(section, selector)
    typed = {k: kinds for k, kinds in schema.items() if kinds and k not in selector}
    assert len(typed) >= 5, typed  # the schema knows the types of most keys
    for key, kinds in typed.items():
        config = base_config(tmp_path)
        config[section][key] = _wrong_type(kinds)
        with pytest.raises(ConfigError, match=rf"'{section}\.{key}' must be"):
            validate_config(config, "run.yaml")


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_ranged_config_key_out_of_range_is_named(tmp_path, key):
    allowed = RANGES[key]
    section, _, name = key.rpartition(".")
    config = base_config(tmp_path)
    kinds = (int,) if key == "seed" else section_schema(section, config[section]).get(name, ())
    integer = int in kinds and float not in kinds
    value = (allowed.low if allowed.low_open else allowed.low - 1) if allowed.low is not None else allowed.high + 1
    value = int(value) if integer else float(value)
    (config if not section else config[section])[name] = value
    if key.startswith("model.") and name not in section_schema("model", config["model"]):
        pytest.skip(f"{name} is not a DeepFusionDiT argument")
    with pytest.raises(ConfigError, match=rf"'{key}' must be"):
        validate_config(config, "run.yaml")


def test_cli_config_errors_are_one_line_naming_the_key(tmp_path, capsys):
    import yaml

    from deepfusion_ref.cli import main

    for section, key, value, expected in (("train", "steps", "ten", "'train.steps' must be an integer"),
                                          ("train", "steps", 2.5, "'train.steps' must be an integer"),
                                          ("train", "batch_size", "4", "'train.batch_size' must be an integer"),
                                          ("train", "lr", "fast", "'train.lr' must be a number"),
                                          ("train", "steps", 0, "'train.steps' must be 1 <= steps"),
                                          ("train", "checkpoint_every", -1, "'train.checkpoint_every' must be"),
                                          ("train", "cond_drop_prob", 2, "'train.cond_drop_prob' must be"),
                                          ("language_model", "max_length", 0, "'language_model.max_length' must be"),
                                          ("train", "sample_prompts", "a red", "'train.sample_prompts' must be")):
        config = base_config(tmp_path / "run")
        config[section][key] = value
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and expected in err[-1] and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "run").exists()
