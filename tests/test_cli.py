"""The `deepfusion` command line: train from YAML/JSON (resume, identical results), config errors, sample, eval, run
(papermill) and the installed entry point."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from deepfusion_ref.cli import ConfigError, load_config, main, parse_value
from deepfusion_ref.evaluate import CATEGORIES

TINY = """
seed: 3
out_dir: {out}
data: {{kind: scenes, width: 16, height: 16, size: 32, max_objects: 2}}
language_model: {{path: minilm, max_length: 48}}
model: {{class: DeepFusionDiT, patch_size: 2, hidden_size: 32, depth: 2, num_heads: 2, long_skips: false}}
train: {{steps: {steps}, batch_size: 4, lr: 1e-3, cond_drop_prob: 0.3, checkpoint_every: 3, progress: false}}
"""


def write_config(path: Path, out: Path, steps: int = 6) -> Path:
    path.write_text(TINY.format(out=out, steps=steps))
    return path


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(out: Path, step: int) -> dict:
    folder = out / "checkpoints" / f"step_{step:08d}"
    return {**load_file(folder / "model.safetensors"), **{f"ema.{k}": v for k, v in
                                                          load_file(folder / "ema.safetensors").items()}}


@pytest.fixture(scope="module")
def yaml_run(tmp_path_factory):
    "A tiny DiT trained for 6 steps by `deepfusion train --config tiny.yaml`."
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "tiny.yaml", root / "yaml_run")
    assert main(["train", "--config", str(config)]) == 0
    return root, root / "yaml_run"


def test_train_writes_checkpoints_metrics_and_pipeline(yaml_run):
    from deepfusion_ref.pipeline import Text2ImagePipeline

    root, out = yaml_run
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != ".lock")  # .lock: the one-writer lock
    assert kept == ["step_00000003", "step_00000006"]
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(json.loads(line)["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())
    pipe = Text2ImagePipeline.from_pretrained(out / "pipeline")
    assert pipe.sample_size == (16, 16) and pipe.null is not None
    assert pipe.network.config["text_dim"] == 384 and pipe.network.config["num_llm_layers"] == 6  # filled from MiniLM
    # the pipeline holds the EMA network of the last checkpoint
    ema = checkpoint_tensors(out, 6)
    for name, value in pipe.network.state_dict().items():
        assert torch.equal(value, ema[f"ema.module.denoiser.net.{name}"]), name
    saved = json.loads((out / "pipeline" / "training_config.json").read_text())
    assert saved == load_config(root / "tiny.yaml")


def test_json_config_trains_bit_identical_to_yaml(yaml_run):
    root, out = yaml_run
    config = yaml.safe_load((root / "tiny.yaml").read_text())
    assert config["train"]["lr"] == "1e-3"  # PyYAML's reading, which load_config corrects
    config["train"]["lr"] = 0.001
    config["out_dir"] = str(root / "json_run")
    (root / "tiny.json").write_text(json.dumps(config))
    assert load_config(root / "tiny.json") == {**load_config(root / "tiny.yaml"), "out_dir": str(root / "json_run")}
    assert main(["train", "--config", str(root / "tiny.json")]) == 0
    a, b = checkpoint_tensors(out, 6), checkpoint_tensors(root / "json_run", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_resumes_instead_of_restarting(yaml_run):
    root, out = yaml_run
    copy = root / "resumed"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("pipeline"))
    config = write_config(root / "resume.yaml", copy, steps=6)
    before = checkpoint_tensors(copy, 6)
    assert main(["train", "--config", str(config)]) == 0  # the same command again: nothing left to train
    assert metric_steps(copy) == [1, 2, 3, 4, 5, 6]
    kept = sorted(p.name for p in (copy / "checkpoints").iterdir() if p.name != ".lock")  # .lock: the one-writer lock
    assert kept == ["step_00000003", "step_00000006"]
    assert all(torch.equal(v, checkpoint_tensors(copy, 6)[k]) for k, v in before.items())
    # a run that died after logging step 7 but before checkpointing it: its line is dropped and step 7 is redone
    with open(copy / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 123.0}) + "\n")
    write_config(config, copy, steps=8)
    assert main(["train", "--config", str(config)]) == 0
    assert metric_steps(copy) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert json.loads((copy / "checkpoints" / "step_00000008" / "state.json").read_text())["step"] == 8
    assert (copy / "pipeline" / "pipeline.json").exists()


def test_config_errors_name_the_file_and_key(tmp_path, capsys):
    good = TINY.format(out=tmp_path / "never", steps=2)
    for right, wrong, key in (("steps: 2", "stepz: 2", "train.stepz"),
                              ("max_objects: 2", "max_object: 2", "data.max_object")):
        path = tmp_path / "bad.yaml"
        path.write_text(good.replace(right, wrong))
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert str(path) in err and repr(key) in err and f"did you mean {right.split(':')[0]!r}" in err
    (tmp_path / "extra.yaml").write_text(good + "optimiser: adam\n")
    with pytest.raises(ConfigError, match=r"extra\.yaml: unknown key 'optimiser'"):
        load_config(tmp_path / "extra.yaml")
    (tmp_path / "model.yaml").write_text(good.replace("class: DeepFusionDiT", "class: DiT"))
    with pytest.raises(ConfigError, match=r"'model.class' must be one of"):
        load_config(tmp_path / "model.yaml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match=r"c\.toml: unknown config format"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    assert not (tmp_path / "never").exists()  # nothing was built or written


def test_data_levels_keep_only_those_caption_levels(tmp_path):
    "data.levels (1..6, as the CLI's --level) picks the captions the model trains on; a level out of range is an error."
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.experiment import build_dataset, validate_config

    data = {"kind": "scenes", "size": 5, "width": 16, "height": 16, "seed": 3, "levels": [5, 2]}
    dataset, scenes = build_dataset(data), SceneDataset(5, 16, 16, seed=3)
    assert [dataset[i]["captions"] for i in range(5)] == [[scenes[i]["captions"][4], scenes[i]["captions"][1]]
                                                          for i in range(5)]
    assert torch.equal(dataset[2]["image"], scenes[2]["image"])
    (tmp_path / "tiny.yaml").write_text(TINY.format(out=tmp_path / "never", steps=2))
    config = load_config(tmp_path / "tiny.yaml")
    for bad in ([0], [7], [], [True], "5"):
        config["data"]["levels"] = bad
        with pytest.raises(ConfigError, match=r"data\.levels"):
            validate_config(config, "levels.yaml")


def test_sample_writes_requested_size_deterministically(yaml_run, tmp_path):
    from deepfusion_ref.pipeline import Text2ImagePipeline

    _, out = yaml_run
    args = ["sample", "--pipeline", str(out / "pipeline"), "--prompt", "a red circle", "--steps", "3",
            "--height", "32", "--width", "16", "--guidance", "2.5"]
    assert main(args + ["--out", str(tmp_path / "a.png"), "--seed", "5"]) == 0
    assert main(args + ["--out", str(tmp_path / "b.png"), "--seed", "5"]) == 0
    assert main(args + ["--out", str(tmp_path / "c.png"), "--seed", "6", "--num-images", "2"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    assert Image.open(tmp_path / "a.png").size == (16, 32)  # PIL: (width, height)
    assert np.array_equal(a, b)
    c0, c1 = (np.asarray(Image.open(tmp_path / f"c_{i}.png")) for i in range(2))
    assert not np.array_equal(a, c0) and not np.array_equal(c0, c1)
    # the flags reach the pipeline call as the diffusers arguments they stand for
    pipe = Text2ImagePipeline.from_pretrained(out / "pipeline")
    expected = pipe("a red circle", height=32, width=16, num_inference_steps=3, guidance_scale=2.5,
                    generator=torch.Generator().manual_seed(5), progress=False).images[0]
    assert np.array_equal(a, np.asarray(expected))


def test_eval_writes_aggregate_json_and_report(yaml_run, tmp_path, capsys):
    _, out = yaml_run
    args = ["eval", "--pipeline", str(out / "pipeline"), "--n", "3", "--steps", "2", "--level", "5"]
    assert main(args + ["--out", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.html")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert tuple(metrics["accuracy"]) == CATEGORIES and metrics["n_images"] == 3
    assert metrics["settings"]["seed"] == 1000 and metrics["settings"]["pairs"] == "consecutive"
    assert 0 <= metrics["overall"] <= 1 and 0 <= metrics["saturation"] <= 1
    assert 0 <= metrics["floor"] <= 1 and metrics["ceiling"] == 1.0  # the scale's ends: another prompt, clean renders
    assert (tmp_path / "r.html").exists() and (tmp_path / "r.png").exists()
    assert json.loads(capsys.readouterr().out) == metrics  # also printed
    # the noise of image i does not depend on how the images are batched
    assert main(args + ["--out", str(tmp_path / "m2.json"), "--batch-size", "2"]) == 0
    assert json.loads((tmp_path / "m2.json").read_text()) == metrics
    with pytest.raises(SystemExit):  # seed 0 made the training scenes (training_config.json beside the pipeline)
        main(["eval", "--pipeline", str(out / "pipeline"), "--seed", "0"])
    assert "seed of the training scenes" in capsys.readouterr().err


def test_convert_writes_safetensors_and_names_a_bad_file(tmp_path, capsys):
    "Qwen2VL-Flux's connector.pt (a DDP-saved state dict) converts once; a truncated file is one line naming it."
    from safetensors.torch import load_file

    state = {"module.linear.weight": torch.randn(8, 6), "module.linear.bias": torch.randn(8)}
    torch.save(state, tmp_path / "connector.pt")
    assert main(["convert", str(tmp_path / "connector.pt")]) == 0
    out = tmp_path / "connector.safetensors"
    assert capsys.readouterr().out.strip() == str(out)
    converted = load_file(out)
    assert converted.keys() == {"linear.weight", "linear.bias"}
    assert torch.equal(converted["linear.weight"], state["module.linear.weight"])
    (tmp_path / "cut.pt").write_bytes((tmp_path / "connector.pt").read_bytes()[:64])
    assert main(["convert", str(tmp_path / "cut.pt")]) == 2
    err = capsys.readouterr().err
    assert "cut.pt: not a readable state dict" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cut.safetensors").exists()


def test_parse_value_reads_yaml_scalars():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("2.5e-1") == 0.25 and parse_value("1e-3") == 0.001
    assert parse_value("true") is True and parse_value("None") is None and parse_value("null") is None
    assert parse_value("[1, 3]") == [1, 3]
    assert parse_value("runs/x") == "runs/x" and parse_value("") == "" and parse_value("2024-01-01") == "2024-01-01"


def test_run_injects_parameters(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1\nratio = 0.5\ntag = 'a'\nresult = 'unset'",
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import json\nfrom pathlib import Path\n"
                                          "Path(result).write_text(json.dumps([x, ratio, tag, type(x).__name__]))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    result = tmp_path / "result.json"
    assert main(["run", str(tmp_path / "tiny.ipynb"), "-p", "x", "3", "-p", "ratio", "2.5e-1", "-r", "tag", "007",
                 "-r", "result", str(result), "--out", str(tmp_path / "ran.ipynb")]) == 0
    assert json.loads(result.read_text()) == [3, 0.25, "007", "int"]
    executed = nbformat.read(tmp_path / "ran.ipynb", as_version=4)
    assert "injected-parameters" in executed.cells[1].metadata.tags


def test_installed_entry_point_and_module():
    script = Path(sys.executable).parent / "deepfusion"
    assert script.exists(), "the console script is missing: pip install --no-build-isolation --no-deps -e ."
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(cmd in done.stdout for cmd in ("train", "sample", "eval", "run", "convert"))
    done = subprocess.run([sys.executable, "-m", "deepfusion_ref.cli", "train", "--config", "missing.yaml"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "missing.yaml" in done.stderr


@pytest.mark.parametrize("name", ["quickstart", "cascade_base", "image_folder", "qwen2vl_flux_lab"])
def test_example_configs_load_and_train_a_few_steps(tmp_path, name):
    "Each config in configs/ is valid as written and trains 2 steps (on a shrunken copy: sizes and steps only)."
    from deepfusion_ref.experiment import Experiment

    root = Path(__file__).parents[1]
    config = load_config(root / "configs" / f"{name}.yaml")
    config["out_dir"] = str(tmp_path / "run")
    config["train"].update(steps=2, batch_size=2, warmup_steps=0, decay_steps=0, checkpoint_every=0, progress=False)
    config["train"].pop("sample_every", None)
    if config["data"]["kind"] == "scenes":
        config["data"]["size"] = 8
    else:  # a folder of generated images and captions.jsonl
        from deepfusion_ref.data import SceneDataset

        folder = tmp_path / "images"
        folder.mkdir()
        lines = []
        for i in range(4):
            item = SceneDataset(4, 64, 64, seed=0)[i]
            Image.fromarray(((item["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(
                folder / f"{i}.png")
            lines.append(json.dumps({"file": f"{i}.png", "captions": item["captions"]}))
        (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
        config["data"]["path"] = str(folder)
    experiment = Experiment.from_config(config, name)
    pipe_dir = experiment.fit(log=lambda *a: None)
    assert experiment.trainer.step == 2 and (pipe_dir / "pipeline.json").exists()
    assert json.loads((pipe_dir / "pipeline.json").read_text())["objective"] == experiment.trainer.objective.config()
    # a new Experiment of the finished run gives the trained pipeline (resumed), not its initial weights
    trained = experiment.pipeline().network.state_dict()
    again = Experiment.from_config(config, name).pipeline().network.state_dict()
    assert trained.keys() == again.keys() and all(torch.equal(v, again[k]) for k, v in trained.items())


def test_train_help_names_the_sections_and_the_example_configs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "objective" in text and "configs/quickstart.yaml" in text and "language_model" in text
    named = re.findall(r"configs/[\w.]+\.yaml", text)  # every example config it points at exists
    assert named and all((Path(__file__).parents[1] / name).exists() for name in named)


def test_flux_config_with_a_vae_gradient_checkpointing_and_stages_by_global_block_index(tmp_path):
    from diffusers import AutoencoderKL

    from deepfusion_ref.experiment import ConfigError, Experiment

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "flux_folder" / "vae")
    root = Path(__file__).parents[1]
    config = load_config(root / "configs" / "qwen2vl_flux_lab.yaml")
    config.update(out_dir=str(tmp_path / "run"), codec={"path": str(tmp_path / "flux_folder"), "subfolder": "vae"})
    config["data"]["size"] = 8
    config["train"].update(steps=2, batch_size=2, warmup_steps=0, decay_steps=0, checkpoint_every=0, progress=False,
                           gradient_checkpointing=True, stages=[[0, ["flux:1-2", "net.connector.*"]]])
    experiment = Experiment.from_config(config, "flux+vae")
    trainer = experiment.trainer
    assert trainer.codec is not None and trainer.network.config.in_channels == 4  # the VAE's latent channels
    assert trainer.network.transformer.gradient_checkpointing
    assert trainer.stages == [(0, ["net.transformer.transformer_blocks.1.*",
                                   "net.transformer.single_transformer_blocks.0.*", "net.connector.*"])]
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    experiment.fit(log=lambda *a: None)
    changed = {k for k, v in trainer.network.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("transformer.transformer_blocks.1.", "transformer.single_transformer_blocks.0.",
                                         "connector.")) for k in changed)
    images = experiment.pipeline()("a red circle", num_inference_steps=2, output_type="pt", progress=False).images
    assert images.shape == (1, 3, 16, 16)  # decoded by the VAE from 8x8 latents
    for bad, key in (({"path": str(tmp_path / "none")}, "codec.path"), ({"path": "x", "scale": 1}, "codec.scale")):
        with pytest.raises(ConfigError, match=key):
            Experiment.from_config({**config, "codec": bad}, "bad").trainer
    config["train"]["stages"] = [[0, ["flux:9"]]]
    with pytest.raises(ConfigError, match=r"train.stages\[0\]"):
        Experiment.from_config(config, "bad").trainer


def test_flux_config_starts_from_a_pretrained_transformer_folder(tmp_path):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from deepfusion_ref.experiment import ConfigError, Experiment

    torch.manual_seed(3)
    transformer = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                         axes_dims_rope=(2, 2, 4))
    transformer.save_pretrained(tmp_path / "flux" / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  norm_num_groups=4).save_pretrained(tmp_path / "flux" / "vae")
    config = load_config(Path(__file__).parents[1] / "configs" / "qwen2vl_flux_lab.yaml")
    config["model"] = {"class": "FluxDenoiser", "transformer_path": str(tmp_path / "flux"),
                       "transformer_subfolder": "transformer", "guidance": 2.0}
    config.update(out_dir=str(tmp_path / "run"), codec={"path": str(tmp_path / "flux"), "subfolder": "vae"})
    config["data"]["size"] = 4
    config["train"].pop("stages")
    network = Experiment.from_config(config, "pretrained").trainer.network
    assert network.config.guidance == 2.0 and network.config.in_channels == 4
    mine = network.transformer.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in transformer.state_dict().items())  # the folder's weights
    with pytest.raises(ConfigError, match="not both"):
        Experiment.from_config({**config, "model": {**config["model"], "transformer_config": {}}}, "x").trainer
    with pytest.raises(ConfigError, match="needs its VAE"):
        Experiment.from_config({k: v for k, v in config.items() if k != "codec"}, "x").trainer


def test_report_config_holds_the_reports_values_and_its_stages_name_real_flux_blocks():
    from deepfusion_ref.data import aspect_buckets
    from deepfusion_ref.experiment import stage_patterns, validate_config
    from deepfusion_ref.flux import FluxDenoiser
    from deepfusion_ref.schedules import Prediction
    from deepfusion_ref.train import set_trainable

    config = load_config(Path(__file__).parents[1] / "configs" / "qwen2vl_flux_report.yaml")
    validate_config(config, "qwen2vl_flux_report.yaml")
    train = config["train"]
    assert (train["lr"], train["betas"], train["weight_decay"], train["grad_accum"]) == (1e-5, [0.9, 0.95], 0.1, 2)
    assert train["bf16"] and train["gradient_checkpointing"] and train["batch_size"] * train["grad_accum"] == 128
    assert [tuple(b) for b in config["data"]["buckets"]] == aspect_buckets(1024)
    with torch.device("meta"):  # FLUX.1-dev's shape without its 12B parameters in memory
        flux = FluxDenoiser(transformer_config=dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                                    num_attention_heads=24, joint_attention_dim=4096,
                                                    pooled_projection_dim=768, guidance_embeds=True,
                                                    axes_dims_rope=(16, 56, 56)), text_dim=3584, in_channels=16)
    wrapped = Prediction(flux)
    trained = []
    for first, patterns in train["stages"]:
        set_trainable(wrapped, stage_patterns(patterns, flux))
        names = {n.split(".")[2] + "." + n.split(".")[3] for n, p in wrapped.named_parameters()
                 if p.requires_grad and n.startswith("net.transformer.") and "blocks" in n}
        trained.append(len(names))
    assert trained == [19, 19 + 19, 57]  # whole blocks, by the global index


def test_eval_on_unseen_compositions_scores_only_scenes_with_a_held_out_composition(yaml_run, tmp_path):
    from deepfusion_ref.data import HeldOut, Scene
    from deepfusion_ref.experiment import held_out_samples

    _, out = yaml_run
    samples = held_out_samples(out / "pipeline", n=3, steps=1, compositions="unseen", progress=False)
    assert samples["settings"]["compositions"] == "unseen"
    assert all(HeldOut().found(Scene.from_dict(item["scene"])) for item in samples["items"])
    args = ["eval", "--pipeline", str(out / "pipeline"), "--n", "2", "--steps", "1", "--compositions", "seen",
            "--out", str(tmp_path / "seen.json")]
    assert main(args) == 0
    assert json.loads((tmp_path / "seen.json").read_text())["settings"]["compositions"] == "seen"


def test_loading_a_pipeline_prints_no_accelerate_advice(yaml_run):
    import io
    import logging

    from deepfusion_ref.files import diffusers_load_options
    from deepfusion_ref.pipeline import Text2ImagePipeline

    _, out = yaml_run
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        Text2ImagePipeline.from_pretrained(out / "pipeline")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert "accelerate" not in log.getvalue()
    assert diffusers_load_options() in ({}, {"low_cpu_mem_usage": False})
