"""The training engine, for every technique: what trains, what is saved, what reloads, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from fnmatch import fnmatchcase

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune import records
from sdtune.experiment import experiment_from_dict, load_experiment
from sdtune.generation import load_run_pipeline
from sdtune.models.sampling import generate_images
from sdtune.training import RunExistsError, train_technique

ALL_TECHNIQUES = {
    "full": {"kind": "full", "use_ema": True, "ema_decay": 0.9},
    "lora": {"kind": "lora", "rank": 4, "alpha": 8, "lr_scheduler": "cosine"},
    "locon": {"kind": "lora", "rank": 2, "target_modules": ["to_q", "to_v", "conv1", "conv2"]},
    "dora": {"kind": "dora", "rank": 2},
    "loha": {"kind": "loha", "rank": 2, "alpha": 2},
    "lokr": {"kind": "lokr", "rank": 2, "alpha": 2},
    "partial": {"kind": "partial"},  # the family's first preset (UNets: cross-attention; SD3: context)
    "lora-te": {"kind": "lora", "rank": 2, "train_text_encoder": True, "text_encoder_learning_rate": 1e-3},
    "full-te": {"kind": "full", "train_text_encoder": True},
    "oft": {"kind": "oft", "oft_block_size": 8},
    "boft": {"kind": "boft", "boft_block_size": 4},
    "oft-te": {"kind": "oft", "oft_block_size": 8, "train_text_encoder": True},
}
# (family, technique) pairs of the matrix: every technique on SD1, the ones that differ per family elsewhere
MATRIX = [("sd1", name) for name in ALL_TECHNIQUES if name not in ("full-te", "oft-te")] + [
    (family, name)
    for family in ("sd2", "sdxl", "sd3")
    for name in ("full", "lora", "dora", "loha", "lokr", "partial", "lora-te", "full-te")
] + [("sdxl", "locon"), ("sd3-no-t5", "lora-te"), ("sdxl", "oft-te"), ("sd3", "boft")]


def _base_state(model_dir, part):
    folder = model_dir / part
    weights = folder / "diffusion_pytorch_model.safetensors"
    return load_file(weights if weights.exists() else folder / "model.safetensors")


def _images(pipe, prompts=("a red circle", "a blue square")):
    result = generate_images(pipe, list(prompts), [0], num_inference_steps=3, guidance_scale=3.0, resolution=32, progress=False)
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def _initial_trainable(experiment, name):
    """The technique's trainable tensors before the first step (adapters start from a seeded init)."""
    from sdtune.techniques import TECHNIQUES, trainable_named_parameters

    model = experiment.family.load(experiment.model)
    torch.manual_seed(experiment.train_config_for(name).seed)
    spec = experiment.techniques[name]
    TECHNIQUES.get(spec.kind)(spec.options).prepare(model)
    return {n: p.detach().clone() for n, p in trainable_named_parameters(model).items()}


# every technique kind on SD1 in the default tier (a fresh-process reload each); the other families' cases
# in the slow tier (`python -m pytest -m slow`)
MATRIX_CASES = [
    pytest.param(family, name, id=f"{family}-{name}", marks=() if family == "sd1" else pytest.mark.slow)
    for family, name in MATRIX
]


@pytest.mark.parametrize(("family", "name"), MATRIX_CASES)
def test_technique_trains_saves_and_reloads(family, name, write_experiment, family_model, tmp_path):
    model_dir = family_model(family)
    model = {"path": str(model_dir), "text_encoder_3": False} if family == "sd3-no-t5" else model_dir
    experiment = load_experiment(write_experiment(techniques={name: ALL_TECHNIQUES[name]}, model=model))
    initial = _initial_trainable(experiment, name)
    result = train_technique(experiment, name, progress=False)
    record = result.record
    assert result.status == "finished" and record["steps"]["done"] == 3
    assert record["model"]["family"] == family.split("-")[0]
    assert record["parameters"]["trainable"] > 0 and record["bytes_on_disk"] > 0
    assert len(record["loss_history"]) == 3 and all(np.isfinite(h["loss"]) for h in record["loss_history"])

    _assert_only_intended_tensors_changed(name, result.model, model_dir, initial)
    _assert_checked_and_dissected(name, record)

    # reload in a fresh process (sdtune generate) → the same images as the in-memory trained model
    in_memory = result.model.pipeline()
    expected = _images(in_memory)
    out = tmp_path / "fresh"
    script = (
        "import sys, numpy as np; from sdtune.generation import load_run_pipeline, generate_images;"
        f"pipe, _ = load_run_pipeline({str(result.run_dir)!r}, fuse=False, device=__import__('torch').device('cpu'));"
        "r = generate_images(pipe, ['a red circle', 'a blue square'], [0], 3, 3.0, 32, progress=False);"
        f"np.save({str(out)!r}, np.stack([np.asarray(i, dtype=np.float32) for i in r.images]))"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    reloaded = np.load(f"{out}.npy")
    assert np.abs(reloaded - expected).max() <= 1.0  # uint8 images: at most one level of rounding apart

    # merged (fused) adapter equals the unmerged one within float tolerance
    fused, _ = load_run_pipeline(result.run_dir, fuse=True, device=torch.device("cpu"))
    assert np.abs(_images(fused) - expected).max() <= 2.0


def _assert_checked_and_dissected(name, record):
    """Every run passes the trained-what-it-claims check and carries the anatomy of its change; a LoRA of
    rank r changes every layer by a matrix of numerical rank ≤ r."""
    check = records.trained_check(record)
    assert check is not None and check.passed, check.failures
    assert check.checked["moved"] >= check.checked["trained_tensors"] - len(check.unreachable)
    anatomy = record["anatomy"]
    assert anatomy["total"]["changed_layers"] > 0 and anatomy["total"]["relative"] > 0
    assert anatomy["method"]["intruders"]["k"] == 10 and anatomy["method"]["intruders"]["epsilon"] == 0.5
    assert all({"effective_rank", "numerical_rank", "intruders", "block", "kind"} <= set(layer) for layer in anatomy["layers"])
    spec = ALL_TECHNIQUES[name]
    if spec["kind"] == "lora":
        assert all(layer["numerical_rank"] <= spec["rank"] for layer in anatomy["layers"])
        assert max(layer["numerical_rank"] for layer in anatomy["layers"]) == spec["rank"]


def test_lora_trains_only_adapters_and_writes_diffusers_and_kohya(write_experiment, tiny_model):
    experiment = load_experiment(write_experiment())
    result = train_technique(experiment, "lora", progress=False)
    run_dir = result.run_dir
    assert all("lora_" in name for name in load_file(run_dir / "unet_adapter.safetensors"))
    base = _base_state(tiny_model, "unet")
    pipe, _ = load_run_pipeline(run_dir, fuse=False, device=torch.device("cpu"))
    state = pipe.unet.state_dict()
    for key, tensor in base.items():  # the base UNet is bit-identical under the adapter
        live = state.get(key) if key in state else state[key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
        assert torch.equal(live, tensor), key
    kohya = load_file(run_dir / "pytorch_lora_weights_kohya.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(k.replace(".lora_down.weight", ".alpha") in kohya for k in downs)
    assert all(kohya[k.replace(".lora_down.weight", ".alpha")].item() == 8.0 for k in downs)
    assert any("_attn2_to_k" in k for k in downs)
    assert (run_dir / "pytorch_lora_weights.safetensors").exists()
    assert result.record["parameters"]["trained_modules"][0].startswith("unet.")


def test_full_changes_unet_only_and_saves_ema_weights(write_experiment, tiny_model, tmp_path):
    ema = load_experiment(write_experiment(techniques={"full": {"kind": "full", "use_ema": True, "ema_decay": 0.9}}))
    raw = load_experiment(
        write_experiment(techniques={"full": {"kind": "full", "use_ema": False}}), [f"output_dir={tmp_path / 'raw'}"]
    )
    zero = load_experiment(
        write_experiment(techniques={"full": {"kind": "full", "use_ema": True, "ema_decay": 0.0}}),
        [f"output_dir={tmp_path / 'zero'}"],
    )
    runs = {name: train_technique(exp, "full", progress=False).run_dir for name, exp in
            [("ema", ema), ("raw", raw), ("zero", zero)]}
    saved = {name: _base_state(run, "unet") for name, run in runs.items()}
    base = _base_state(tiny_model, "unet")
    changed = [k for k in base if not torch.equal(base[k], saved["raw"][k])]
    assert len(changed) > 0.9 * len(base)
    for part in ("vae", "text_encoder"):
        frozen = _base_state(runs["raw"], part)
        assert all(torch.equal(t, frozen[k]) for k, t in _base_state(tiny_model, part).items())
    # EMA weights differ from the raw ones, and they are what was saved (decay 0 → EMA == raw)
    assert any(not torch.equal(saved["ema"][k], saved["raw"][k]) for k in changed)
    # (the EMA update s − (1 − d)(s − p) with d = 0 equals p up to float rounding)
    assert all(torch.allclose(saved["zero"][k], saved["raw"][k], rtol=0, atol=1e-6) for k in base)


def test_partial_trains_exactly_the_chosen_tensors(write_experiment, tiny_model):
    experiment = load_experiment(write_experiment(techniques={"p": {"kind": "partial", "preset": "cross-attention"}}))
    result = train_technique(experiment, "p", progress=False)
    trained = load_file(result.run_dir / "partial_weights.safetensors")
    base = _base_state(tiny_model, "unet")
    assert trained and all(".attn2." in k for k in trained)
    expected = {f"unet.{k}" for k in base if ".attn2." in k}
    assert set(trained) == expected
    changed = {k for k, v in trained.items() if not torch.equal(v, base[k[5:]])}
    # every chosen tensor a gradient reaches moved, and only those (the others: see _parameters_without_gradient)
    assert changed == set(trained) - _parameters_without_gradient(result.model) and changed


ADAPTER_MARKERS = ("lora_", "hada_", "lokr_", "oft_")  # (oft_R; boft_R, boft_s)


def _intended(name, model):
    """Which trainable tensors each technique of the matrix should have, for this model's family."""
    denoiser = model.denoiser_name + "."
    encoders = tuple(f"{encoder}." for encoder in model.trained_text_encoders if encoder in model.components)
    adapter = lambda n: any(m in n for m in ADAPTER_MARKERS)  # noqa: E731
    if name == "full":
        return lambda n: n.startswith(denoiser)
    if name == "full-te":
        return lambda n: n.startswith((denoiser, *encoders))
    if name == "partial":
        patterns = next(iter(model.partial_presets.values()))
        return lambda n: n.startswith(denoiser) and any(fnmatchcase(n[len(denoiser):], p) for p in patterns)
    if name in ("lora-te", "oft-te"):
        return lambda n: n.startswith((denoiser, *encoders)) and adapter(n)
    return lambda n: n.startswith(denoiser) and adapter(n)


def _parameters_without_gradient(model):
    """Trainable tensors the objective cannot reach: one backward pass through the family's own
    conditioning and denoiser call. The architectures have a few (SDXL conditions on CLIP-L's
    penultimate layer, so its last layer is unused; SD3's last joint block discards the text
    stream, so its context query is unused); a technique still wraps them, and they cannot move."""
    from sdtune.techniques import trainable_named_parameters

    parameters = trainable_named_parameters(model)
    for parameter in parameters.values():
        parameter.grad = None
    conditioning = model.encode_prompt(["a red circle", "a blue square"])
    conditioning.update(model.image_conditioning(torch.tensor([[40.0, 48, 0, 4, 32, 32]] * 2)))
    latents = torch.randn(2, model.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    model.predict(latents, torch.tensor([500, 250]), conditioning).square().mean().backward()
    dead = {name for name, p in parameters.items() if p.grad is None or not p.grad.any()}
    for parameter in parameters.values():
        parameter.grad = None
    return dead


def _assert_only_intended_tensors_changed(name, model, model_dir, initial):
    """Tensor by tensor: frozen ones equal the base model; the trainable ones are exactly the
    intended ones, and every one of them moved from where it started."""
    intended = _intended(name, model)
    dead = _parameters_without_gradient(model)
    trained_components = set()
    for prefix in model.trainable_names():
        base = _base_state(model_dir, prefix)
        for key, parameter in model.components[prefix].named_parameters():
            full_name = f"{prefix}.{key}"
            if parameter.requires_grad:
                assert intended(full_name), f"{name}: {full_name} trained but should not"
                moved = not torch.equal(parameter.detach().cpu(), initial[full_name])
                assert moved or full_name in dead, f"{name}: {full_name} did not move"
                trained_components.add(prefix)
            else:
                base_key = key.replace(".base_layer.", ".")
                assert torch.equal(parameter.detach().cpu(), base[base_key]), f"{name}: frozen {full_name} changed"
    assert set(initial) == {n for n in initial if intended(n)} and initial
    assert len(dead) <= 0.2 * len(initial), f"{name}: {len(dead)} of {len(initial)} trainable tensors get no gradient"
    expected = {model.denoiser_name}
    if name.endswith("-te"):  # every text encoder the family trains by default, and nothing else
        expected |= {e for e in model.trained_text_encoders if e in model.components}
    assert trained_components == expected


def _interrupt_at(step):
    def hook(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.mark.parametrize(("family", "name"), [(f, n) for f in ("sd1", "sdxl", "sd3") for n in ("full", "lora")])
def test_resume_equals_uninterrupted_bit_for_bit(family, name, write_experiment, family_model, tmp_path):
    path = write_experiment(max_train_steps=6, lr_scheduler="cosine", model=family_model(family))
    straight = load_experiment(path, [f"output_dir={tmp_path / 'straight'}"])
    first = train_technique(straight, name, progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'stopped'}"])
    half = train_technique(stopped, name, progress=False, after_step=_interrupt_at(3))
    assert half.status == "interrupted" and half.record["steps"]["done"] == 3
    assert (half.run_dir / "checkpoints" / "checkpoint-00000003").is_dir()
    with pytest.raises(RunExistsError, match="--resume"):
        train_technique(stopped, name, progress=False)
    resumed = train_technique(stopped, name, progress=False, resume=True)
    assert resumed.status == "finished" and resumed.record["resumed_from"]
    denoiser = first.record["model"]["denoiser"]
    weights = f"{denoiser}/diffusion_pytorch_model.safetensors" if name == "full" else f"{denoiser}_adapter.safetensors"
    a, b = load_file(first.run_dir / weights), load_file(resumed.run_dir / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in first.record["loss_history"]] == [h["loss"] for h in resumed.record["loss_history"]]


def test_finished_run_is_never_overwritten_and_checkpoints_rotate(write_experiment):
    experiment = load_experiment(
        write_experiment(max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2), []
    )
    result = train_technique(experiment, "lora", progress=False)
    checkpoints = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-00000002", "checkpoint-00000003"]
    with pytest.raises(RunExistsError, match="--overwrite"):
        train_technique(experiment, "lora", progress=False)
    again = train_technique(experiment, "lora", progress=False, overwrite=True)
    assert again.status == "finished"
    assert list((again.run_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard


def test_same_data_and_noise_for_every_technique(write_experiment):
    experiment = load_experiment(write_experiment())
    full = train_technique(experiment, "full", progress=False)
    lora = train_technique(experiment, "lora", progress=False)
    # before any update both see the same batch, noise and timesteps from the same base model
    assert full.record["loss_history"][0]["loss"] == lora.record["loss_history"][0]["loss"]
    record = full.record  # what the run used, measured as labelled
    assert record["versions"]["torch"] == torch.__version__ and record["seeds"] == {"train": 0}
    assert record["device"]["type"] == "cpu" and record["num_processes"] == 1
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit and record["git_commit"].startswith(commit)
    timing = record["timing"]
    assert timing["train_time_s"] > 0 and timing["s_per_step"] == pytest.approx(timing["train_time_s"] / 3)
    assert timing["images_per_s"] == pytest.approx(4 * 3 / timing["train_time_s"])  # batch 2 × accumulation 2
    weights = sum(p.numel() * p.element_size() for m in full.model.components.values() for p in m.parameters())
    assert record["memory"]["peak"] == {"bytes": record["memory"]["peak"]["bytes"], "kind": "cpu_peak_rss"}
    assert record["memory"]["peak"]["bytes"] > weights  # the process held at least the model
    assert record["memory"]["cpu_allocator"] == "default"  # a library call leaves its caller's malloc alone
    reloaded = experiment_from_dict(record["config"])  # the config it used, loadable as it was
    assert list(reloaded.techniques) == ["full", "lora"] and reloaded.train_config_for("full").use_ema


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_export_merged_equals_the_unmerged_adapter(family, write_experiment, family_model, tmp_path):
    from sdtune.export import export_merged

    techniques = {"loha": {**ALL_TECHNIQUES["loha"], "train_text_encoder": True}}
    experiment = load_experiment(write_experiment(techniques=techniques, model=family_model(family)))
    result = train_technique(experiment, "loha", progress=False)
    unmerged, _ = load_run_pipeline(result.run_dir, fuse=False, device=torch.device("cpu"))
    out = export_merged(result.run_dir, tmp_path / "merged")
    merged = result.model.pipeline_class().from_pretrained(out)
    for name, module in merged.components.items():  # plain weights only: the adapters are folded in
        if isinstance(module, torch.nn.Module):
            assert not any("lora" in k or "hada" in k for k in module.state_dict()), name
    assert np.abs(_images(merged) - _images(unmerged)).max() <= 2.0


def test_checkpoint_state_round_trips_without_pickles():
    from sdtune.training.checkpoint import join_tensors, split_tensors

    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]},
             "ema": None, "state": {"step": 3, "loss_history": [{"step": 1, "loss": 0.5}]}}
    structure, tensors = split_tensors(state)
    import json

    restored = join_tensors(json.loads(json.dumps(structure)), tensors)
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    assert restored["state"] == state["state"] and restored["ema"] is None


def test_checkpoint_state_with_shared_tensors_is_written_once_and_loads_shared(tmp_path):
    """bitsandbytes' 8-bit AdamW references one quantisation map from every parameter's state."""
    from sdtune.training.checkpoint import load_checkpoint, save_checkpoint

    qmap, base = torch.linspace(-1, 1, 8), torch.arange(6.0)
    state = {"optimizer": {"state": {0: {"qmap": qmap}, 1: {"qmap": qmap}}}, "views": [base[:3], base[3:]]}
    saved = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, state, total_limit=None)
    _, restored = load_checkpoint(saved)
    first, second = restored["optimizer"]["state"][0]["qmap"], restored["optimizer"]["state"][1]["qmap"]
    assert torch.equal(first, qmap) and first is second
    assert [v.tolist() for v in restored["views"]] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_cache_modes_give_the_same_training(family, write_experiment, family_model, tmp_path):
    losses = {}
    for mode in ("memory", "disk", "off"):
        path = write_experiment(techniques={"lora": ALL_TECHNIQUES["lora"]}, data={"cache": mode}, model=family_model(family))
        experiment = load_experiment(path, [f"output_dir={tmp_path / mode}"])
        record = train_technique(experiment, "lora", progress=False).record
        assert record["data"]["cache"] == (None if mode == "off" else mode)
        losses[mode] = [h["loss"] for h in record["loss_history"]]
    assert losses["disk"] == losses["memory"]  # the same cached posteriors, read from files
    assert np.allclose(losses["off"], losses["memory"], rtol=1e-4)  # encoded each step instead
    assert list((tmp_path / "disk" / ".cache").glob("*/0000000?-orig.safetensors"))


def test_caption_dropout_feeds_the_empty_caption_to_the_planned_samples(write_experiment, tmp_path, monkeypatch):
    """Exactly the samples the plan drops (a pure function of seed and position) get the frozen text
    encoder's conditioning of "", the others their caption's; about half at caption_dropout 0.5."""
    from sdtune.training.inputs import InputPipeline

    seen = []
    real = InputPipeline.micro_batch

    def spy(self, global_micro):
        inputs = real(self, global_micro)
        seen.append((self, inputs.batch, {k: v.detach().clone() for k, v in inputs.conditioning.items()}))
        return inputs

    monkeypatch.setattr(InputPipeline, "micro_batch", spy)
    experiment = load_experiment(write_experiment(caption_dropout=0.5, max_train_steps=4))
    train_technique(experiment, "lora", progress=False)
    dropped = kept = 0
    for pipeline, batch, conditioning in seen:
        empty = pipeline.fixed_caption("")["prompt_embeds"]
        for row, index in enumerate(batch.indices):
            caption = pipeline.fixed_caption(pipeline.training_set.captions[index])["prompt_embeds"]
            state = conditioning["prompt_embeds"][row]
            assert torch.equal(state, empty.to(state.dtype)) == batch.dropped[row]
            assert torch.equal(state, caption.to(state.dtype)) != batch.dropped[row]
            dropped, kept = dropped + batch.dropped[row], kept + (not batch.dropped[row])
    assert dropped + kept == 16 and 4 <= dropped <= 12  # 4 steps × batch 2 × accumulation 2, p = 0.5


def _distinct_pairs(experiment, name, steps):
    """The (image, flip) pairs the deterministic order uses in ``steps`` steps (one process)."""
    from sdtune.data.batches import Layout

    cfg, data = experiment.train_config_for(name), experiment.data
    layout = Layout(cfg.seed, 8, cfg.batch_size, cfg.gradient_accumulation_steps, 1, 0, data.random_flip,
                    data.center_crop, cfg.caption_dropout)
    pairs = set()
    for micro in range(steps * cfg.gradient_accumulation_steps):
        batch = layout.plan(micro)
        pairs |= set(zip(batch.indices, batch.flips))
    return pairs


def test_lazy_cache_encodes_each_used_pair_once_and_is_shared(write_experiment, tmp_path, monkeypatch):
    # 1 step of 4 samples uses half of the 8 images: only those are encoded, nothing before step 1
    short = load_experiment(write_experiment(max_train_steps=1, data={"cache": "memory"}), [f"output_dir={tmp_path / 'a'}"])
    record = train_technique(short, "lora", progress=False).record
    assert record["timing"]["encoded_images"] == len(_distinct_pairs(short, "lora", 1)) <= 4
    # 5 steps = 20 samples = 2.5 epochs of 8 images × 2 flips: every used pair exactly once
    long = load_experiment(write_experiment(max_train_steps=5, data={"cache": "disk"}), [f"output_dir={tmp_path / 'b'}"])
    first = train_technique(long, "lora", progress=False).record
    used = _distinct_pairs(long, "lora", 5)
    assert first["timing"]["encoded_images"] == len(used) < 20
    assert len(list((tmp_path / "b" / ".cache").glob("*/*-orig.safetensors"))) + len(
        list((tmp_path / "b" / ".cache").glob("*/*-flip.safetensors"))) == len(used)
    # another technique of the experiment reads the same disk cache: no encode, no image decoded, same first loss
    from sdtune.data.dataset import TrainingSet

    decoded = []
    real_pixels = TrainingSet.pixels
    monkeypatch.setattr(TrainingSet, "pixels", lambda self, *args: decoded.append(args) or real_pixels(self, *args))
    second = train_technique(long, "full", progress=False).record
    assert second["timing"]["encoded_images"] == 0 and decoded == []
    assert second["loss_history"][0]["loss"] == first["loss_history"][0]["loss"]


def test_decoding_workers_do_not_change_training(write_experiment, tmp_path):
    """Random crops (the uncached path): the images decoded by 2 worker processes are the same bits."""
    losses = {}
    for workers in (0, 2):
        path = write_experiment(data={"center_crop": False, "num_workers": workers}, max_train_steps=4)
        record = train_technique(load_experiment(path, [f"output_dir={tmp_path / str(workers)}"]), "lora", progress=False).record
        assert record["data"]["cache"] is None
        losses[workers] = [h["loss"] for h in record["loss_history"]]
    assert losses[0] == losses[2]


def test_resume_is_bit_exact_with_a_memory_cache_and_workers(write_experiment, tmp_path):
    """A resumed process starts with an empty memory cache and re-encodes lazily: same bits."""
    path = write_experiment(max_train_steps=6, data={"cache": "memory", "num_workers": 1})
    first = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'a'}"]), "lora", progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'b'}"])
    train_technique(stopped, "lora", progress=False, after_step=_interrupt_at(2))
    resumed = train_technique(stopped, "lora", progress=False, resume=True)
    a, b = load_file(first.run_dir / "unet_adapter.safetensors"), load_file(resumed.run_dir / "unet_adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in first.record["loss_history"]] == [h["loss"] for h in resumed.record["loss_history"]]


def test_timing_record_is_split_and_synchronised(write_experiment):
    experiment = load_experiment(write_experiment(max_train_steps=6, log_every=2))
    timing = train_technique(experiment, "lora", progress=False).record["timing"]
    for key in ("model_load_time_s", "data_setup_time_s", "cache_open_time_s", "setup_time_s", "train_time_s",
                "encode_time_s", "save_time_s", "job_wall_time_s", "steady_s_per_step", "s_per_step"):
        assert timing[key] is not None and timing[key] >= 0, key
    assert timing["host_syncs"] == 3  # steps 2, 4, 6: the device is synchronised only at logging steps
    assert timing["job_wall_time_s"] > timing["setup_time_s"] + timing["train_time_s"]
    assert timing["steady_s_per_step"] * 4 <= timing["train_time_s"]  # the intervals after the first


@pytest.mark.slow  # (default tier under 6 min: over 10 s on 2 cores)
def test_each_technique_of_train_runs_in_its_own_process(write_experiment):
    """A technique trained after a memory-hungry one records its own peak, not the earlier one's
    (in one process the peak RSS can only grow; see isolate=False below)."""
    from sdtune.runner import train

    techniques = {"big": {"kind": "full", "batch_size": 32}, "small": {"kind": "lora", "batch_size": 1}}
    path = write_experiment(techniques=techniques, data={"resolution": 64}, max_train_steps=2)
    results = train(load_experiment(path), progress=False)
    peak = {r.record["technique"]["name"]: r.record["memory"]["peak"]["bytes"] for r in results}
    assert [r.status for r in results] == ["finished", "finished"]
    assert peak["small"] < peak["big"] - 200e6, peak
    if sys.platform.startswith("linux"):  # sdtune's own training processes keep freed memory (glibc)
        assert {r.record["memory"]["cpu_allocator"] for r in results} == {"kept"}
    assert results[1].record["config"]["techniques"]["small"]["batch_size"] == 1
