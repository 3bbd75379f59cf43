"""Every technique's result loads where people use it, checked with the real loaders.

- community files (kohya/LyCORIS layout) are loaded onto the base model by the ``lycoris-lora``
  package (the loader behind kohya sd-scripts' and A1111's LyCORIS support) and must give the same
  layers as ``sdtune export --merged`` of the same run (which merges through peft): layer by layer
  through LyCORIS' own forward, and as merged weights where LyCORIS merges exactly; LoRA files also
  through diffusers' ``load_lora_weights``;
- single-file checkpoints are read back by diffusers' ``from_single_file`` (bit for bit) and by
  sdtune as a ``model:``;
- ``init_from`` starts an adapter from a community file.

Adapters start from random (not zero) weights, so every tensor of the layout matters: a transposed
factor, a wrong alpha or a wrong name makes a comparison fail.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdtune.config import ConfigError, ModelConfig
from sdtune.experiment import load_experiment
from sdtune.export import export_merged, export_single_file
from sdtune.formats import community
from sdtune.formats.families import export_facts
from sdtune.generation import load_run_pipeline
from sdtune.models import FAMILIES, detect_family_name
from sdtune.testing import experiment_dict
from sdtune.training import train_technique

# random initial weights (peft's init_* = False); alpha ≠ rank so that a wrong alpha shows, except
# loha-tucker, whose alpha = rank lets LyCORIS merge LoHa exactly (see _merges_exactly)
KINDS = {
    "lora": {"kind": "lora", "rank": 2, "alpha": 3, "init_lora_weights": False},
    "locon": {"kind": "lora", "rank": 2, "alpha": 3, "init_lora_weights": False,
              "target_modules": ["to_q", "to_v", "conv1", "conv2", "proj_in"]},
    "dora": {"kind": "dora", "rank": 2, "alpha": 3, "init_lora_weights": False},
    "loha": {"kind": "loha", "rank": 2, "alpha": 3, "init_weights": False},
    "loha-tucker": {"kind": "loha", "rank": 2, "alpha": 2, "init_weights": False, "use_effective_conv2d": True,
                    "target_modules": ["to_q", "conv1"]},
    "lokr": {"kind": "lokr", "rank": 2, "alpha": 3, "init_weights": False, "target_modules": ["to_q", "to_k", "conv1"]},
    "partial": {"kind": "partial"},
    # SDXL: every kind of UNet layer kohya sd-scripts names the SGM way (resnets, samplers, embeddings)
    "sgm-locon": {"kind": "lora", "rank": 2, "alpha": 3, "init_lora_weights": False, "target_modules": [
        "to_q", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1",
        "linear_2", "proj_in", "proj_out"]},
    # SDXL: full-rank differences of resnets (norms: w_norm/b_norm, biases: diff_b), embeddings, samplers
    "partial-sgm": {"kind": "partial", "modules": ["down_blocks.1.resnets.0.*", "time_embedding.*", "add_embedding.*",
                                                   "up_blocks.0.upsamplers.*", "down_blocks.0.downsamplers.*",
                                                   "mid_block.attentions.0.norm.*", "conv_in.*", "conv_norm_out.*"]},
    # Tucker LoKr (lokr_t2 on the 3×3 convs of 32 channels; rank 2 leaves the 16-channel ones a full w2)
    "lokr-tucker": {"kind": "lokr", "rank": 2, "alpha": 3, "init_weights": False, "use_effective_conv2d": True,
                    "decompose_both": True, "target_modules": ["conv1", "conv2", "to_k"]},
}
MATRIX = [(family, kind) for family in ("sd1", "sd2", "sdxl", "sd3") for kind in ("lora", "dora", "loha", "lokr", "partial")]
MATRIX += [("sd1", "locon"), ("sd1", "loha-tucker"), ("sdxl", "sgm-locon")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, family_model, tiny_data):
    """(family, kind) → (run folder, record, folder of its `export --merged`), trained once per module:
    one step of batch 1, the adapter on the text encoders too (their prefixes are part of the layout)."""
    runs = {}

    def get(family, kind):
        if (family, kind) not in runs:
            root = tmp_path_factory.mktemp(f"{family}-{kind}")
            raw = experiment_dict(family_model(family), tiny_data, max_train_steps=1, batch_size=1,
                                  gradient_accumulation_steps=1)
            options = dict(KINDS[kind])
            if options["kind"] != "partial" and "target_modules" not in options:
                options["train_text_encoder"] = True
            if family == "sd3" and "target_modules" in options:
                options.pop("target_modules")  # (UNet layer names)
            raw["techniques"] = {kind: options}
            raw["output_dir"] = str(root / "runs")
            (root / "experiment.yaml").write_text(yaml.safe_dump(raw))
            result = train_technique(load_experiment(root / "experiment.yaml"), kind, progress=False)
            runs[family, kind] = (result.run_dir, result.record, export_merged(result.run_dir, root / "merged"))
        return runs[family, kind]

    return get


# -- LyCORIS, the real loader ------------------------------------------------------------------------
class OriginalNesting(torch.nn.Module):
    """transformers ≥ 5's flattened CLIPTextModel under a ``text_model`` level, as every checkpoint and
    kohya/LyCORIS file names it (the module itself is shared, so what LyCORIS changes is the model)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_model = text_encoder


@contextlib.contextmanager
def lycoris_kohya_network():
    """lycoris-lora 4.1.3's kohya network builds a throw-away default network first, which asserts on
    diffusers UNets (``TimestepEmbedding`` is both a target class and has target names); without that
    class the loader itself is unchanged."""
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.logging import logger

    saved, level = LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, logger.level
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = [m for m in saved if m != "TimestepEmbedding"]
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = saved
        logger.setLevel(level)


def sgm_unet(unet):
    """The diffusers UNet's layers under their SGM paths, as kohya sd-scripts' own SDXL UNet nests them
    (the layers are shared, so what LyCORIS changes is the model); the paths are the single-file
    checkpoint's, which diffusers' ``from_single_file`` checks."""
    from sdtune.formats.single_file import unet_original_key

    root = torch.nn.Module()
    for path, layer in unet.named_modules():
        if "weight" not in layer._parameters:
            continue
        *parents, leaf = unet_original_key(f"{path}.weight", dict(unet.config)).split(".")[:-1]
        holder = root
        for name in parents:
            if not hasattr(holder, name):
                holder.add_module(name, torch.nn.Module())
            holder = getattr(holder, name)
        holder.add_module(leaf, layer)
    return root


def lycoris_modules(pipe, family, weights):
    """Load a community file onto ``pipe`` with lycoris-lora: kohya's loader (``lora_unet_``/``lora_te*``,
    text encoders as a list when the family has several; SDXL's UNet under its SGM paths, as kohya
    sd-scripts gives it) and, for SD3's ``lycoris_`` transformer names, LyCORIS' own
    ``create_lycoris_from_weights``. Returns the LyCORIS modules it built."""
    pytest.importorskip("lycoris", reason="the real-loader tests need `pip install lycoris-lora` (the dev extra)")
    from lycoris import create_lycoris_from_weights
    from lycoris.kohya import create_network_from_weights

    encoders = [getattr(pipe, name) for name in family.text_encoder_names if getattr(pipe, name, None) is not None]
    encoders = [e if hasattr(e, "text_model") or "CLIP" not in type(e).__name__ else OriginalNesting(e) for e in encoders]
    with lycoris_kohya_network():
        if family.family == "sd3":
            transformer, _ = create_lycoris_from_weights(1.0, "", pipe.transformer, weights_sd=weights)
            text, _ = create_network_from_weights(1.0, "", None, encoders, torch.nn.Module(), weights_sd=weights)
            return transformer.loras + text.text_encoder_loras
        unet = sgm_unet(pipe.unet) if export_facts(family.family).kohya_trainer_names_unet == "sgm" else pipe.unet
        network, _ = create_network_from_weights(
            1.0, "", None, encoders if len(encoders) > 1 else encoders[0], unet, weights_sd=weights
        )
        return network.unet_loras + network.text_encoder_loras


def _where(pipe, family):
    """id(module) → (component, path) for every module of the base pipeline."""
    return {
        id(module): (name, path)
        for name in (family.denoiser_name, *family.text_encoder_names) if getattr(pipe, name, None) is not None
        for path, module in getattr(pipe, name).named_modules()
    }


def _sample_input(module):
    generator = torch.Generator().manual_seed(0)
    if isinstance(module, torch.nn.Linear):
        return torch.randn(3, module.in_features, generator=generator)
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(1, module.in_channels, 6, 6, generator=generator)
    if isinstance(module, torch.nn.GroupNorm):
        return torch.randn(1, module.num_channels, 4, 4, generator=generator)
    return torch.randn(3, module.normalized_shape[0], generator=generator)


def _merges_exactly(module):
    """lycoris-lora 4.1.3 merges LoHa/LoKr with alpha/rank applied twice (``get_diff_weight`` scales
    the already scaled ``get_weight``; its forward is right), so those merge only where the scale is 1."""
    return getattr(module, "scale", 1.0) == 1.0 or type(module).__name__ not in ("LohaModule", "LokrModule")


def _community_file(run_dir, record):
    part = "kohya_lora" if "kohya_lora" in record["outputs"] else "community"
    return run_dir / record["outputs"][part]["files"][0], record["outputs"][part]


@pytest.mark.parametrize(("family", "kind"), MATRIX, ids=[f"{f}-{k}" for f, k in MATRIX])
def test_community_file_loads_in_lycoris_as_the_merged_export(family, kind, trained):
    run_dir, record, merged_dir = trained(family, kind)
    spec = FAMILIES.get(family)
    base_path = record["config"]["model"]["path"]
    path, part = _community_file(run_dir, record)
    assert "LyCORIS" in part["loads_in"] and part["bytes"] == path.stat().st_size
    weights = load_file(path)
    merged = spec.pipeline_class().from_pretrained(merged_dir)
    untouched = spec.load_pipeline(base_path)

    # 1. every layer of the file becomes a LyCORIS module ("lora key not loaded" fails), under the
    #    family's prefixes: the denoiser's, and each trained text encoder's
    base = spec.load_pipeline(base_path)
    modules = lycoris_modules(base, spec, weights)
    assert len(modules) == len({key.split(".")[0] for key in weights})
    components = [spec.denoiser_name]
    if KINDS[kind].get("kind") != "partial" and "target_modules" not in KINDS[kind]:
        components += list(spec.trained_text_encoders)
    by_length = sorted(export_facts(spec.family).community_prefixes.values(), key=len, reverse=True)
    used = {next(p for p in by_length if key.startswith(p)) for key in weights}
    assert used == {export_facts(spec.family).community_prefixes[c] for c in components}
    where = _where(base, spec)
    assert {where[id(m.org_module[0])][0] for m in modules} == set(components)

    # 2. through LyCORIS' forward, every layer computes what the merged export's layer computes
    for module in modules:
        module.apply_to()
    moved = False
    for module in modules:
        layer = module.org_module[0]
        component, layer_path = where[id(layer)]
        sample = _sample_input(layer)
        with torch.no_grad():
            ours = layer(sample)
            theirs = getattr(merged, component).get_submodule(layer_path)(sample)
            before = getattr(untouched, component).get_submodule(layer_path)(sample)
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale, msg=f"{component}.{layer_path}")
        moved |= not torch.allclose(theirs, before, atol=1e-3 * scale)
    assert moved  # the adapter does something, so the comparison means something

    # 3. merged by LyCORIS into fresh weights, they are the export's; nothing else moved
    fresh = spec.load_pipeline(base_path)
    fresh_modules = lycoris_modules(fresh, spec, weights)
    where = _where(fresh, spec)
    adapted = {where[id(m.org_module[0])] for m in fresh_modules}
    exact = [m for m in fresh_modules if _merges_exactly(m)]
    assert exact or kind in ("loha", "lokr")
    for module in exact:
        module.merge_to(1.0)
    compared = {where[id(m.org_module[0])] for m in exact}
    for component in components:
        ours, theirs = getattr(fresh, component).state_dict(), getattr(merged, component).state_dict()
        for key, value in theirs.items():
            layer = (component, key.rpartition(".")[0])
            if layer in compared or layer not in adapted:
                torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5 * max(value.abs().max().item(), 1.0),
                                           msg=f"{component}.{key}")


@pytest.mark.parametrize(("family", "kind"), [("sd1", "locon"), ("sd2", "lora"), ("sdxl", "lora"), ("sdxl", "sgm-locon")])
def test_lora_community_file_loads_in_diffusers_as_the_merged_export(family, kind, trained):
    """diffusers' own kohya converter reads the file (LoCon convs and text encoders included; SDXL's
    SGM names through its own SGM → diffusers map, ``_maybe_map_sgm_blocks_to_diffusers``)."""
    run_dir, record, merged_dir = trained(family, kind)
    spec = FAMILIES.get(family)
    path, part = _community_file(run_dir, record)
    assert "diffusers load_lora_weights" in part["loads_in"]
    pipe = spec.load_pipeline(record["config"]["model"]["path"])
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="kohya")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = spec.pipeline_class().from_pretrained(merged_dir)
    for component in (spec.denoiser_name, *spec.text_encoder_names):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(merged, component).state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=f"{component}.{key}")


# -- SDXL: SGM names, read independently ------------------------------------------------------------------
SDXL_LAYOUT = [("sdxl", kind) for kind in ("lora", "dora", "loha", "lokr", "partial", "sgm-locon", "loha-tucker",
                                           "lokr-tucker", "partial-sgm")]


def comfy_key_map(checkpoint):
    """Community layer name → weight key (without ``.weight``), built as ComfyUI's ``model_lora_keys_unet``/
    ``_clip`` build it: from the checkpoint's own keys, '.' → '_', with no knowledge of diffusers' names.
    CLIP-G is held in the Hugging Face layout under ``te2.`` (as ComfyUI converts it when loading)."""
    prefixes = {"model.diffusion_model.": "lora_unet_", "conditioner.embedders.0.transformer.": "lora_te1_", "te2.": "lora_te2_"}
    return {
        name + key[len(start):-len(".weight")].replace(".", "_"): key[: -len(".weight")]
        for key in checkpoint if key.endswith(".weight")
        for start, name in prefixes.items() if key.startswith(start)
    }


def community_delta(tensors, weight):
    """ΔW of one layer of a community file by the formulas of ComfyUI's ``comfy/weight_adapter/`` (lora.py,
    loha.py, lokr.py; A1111's are the same): scale = alpha / rank, rank = the ``lora_down``/``hada_w1_b``/
    ``lokr_w*_b`` rows. DoRA is LyCORIS' and peft's (norm of W + ΔW per output row, ``dora_scale`` out×1…)."""
    alpha = tensors.get("alpha")
    if "lora_down.weight" in tensors:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
        if "dora_scale" in tensors:
            magnitude = tensors["dora_scale"]
            assert magnitude.shape == (weight.shape[0], *[1] * (weight.dim() - 1))
            merged = weight + delta
            delta = merged * magnitude / merged.flatten(1).norm(dim=1).reshape(magnitude.shape) - weight
        return delta
    if "hada_w1_a" in tensors:
        def side(a, b, core):
            return a @ b if core is None else torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)
        w1 = side(tensors["hada_w1_a"], tensors["hada_w1_b"], tensors.get("hada_t1"))
        w2 = side(tensors["hada_w2_a"], tensors["hada_w2_b"], tensors.get("hada_t2"))
        return (w1 * w2).reshape(weight.shape) * (alpha / tensors["hada_w1_b"].shape[0])
    rank = None
    w1 = tensors.get("lokr_w1")
    if w1 is None:
        w1, rank = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"], tensors["lokr_w1_b"].shape[0]
    w2 = tensors.get("lokr_w2")
    if w2 is None:
        a, b, core = tensors["lokr_w2_a"], tensors["lokr_w2_b"], tensors.get("lokr_t2")
        w2 = a @ b if core is None else torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)
        rank = b.shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight.shape) * (1.0 if rank is None else alpha / rank)


@pytest.mark.parametrize(("family", "kind"), SDXL_LAYOUT, ids=[k for _, k in SDXL_LAYOUT])
def test_sdxl_community_file_on_the_sgm_checkpoint_is_the_merged_single_file(family, kind, trained, tmp_path):
    """kohya sd-scripts names SDXL's UNet the SGM way (``lora_unet_input_blocks_4_1_…``), as the single-file
    checkpoint does (its names are checked by diffusers' ``from_single_file``). The community file applied
    to the base model's single file by an independent reader (ComfyUI's key map and formulas, Tucker LoKr
    ``lokr_t2`` included) gives ``export --single-file`` of the run, every weight."""
    from sdtune.formats.single_file import clip_to_original, original_state_dict

    run_dir, record, merged_dir = trained(family, kind)
    spec = FAMILIES.get(family)
    path, part = _community_file(run_dir, record)
    assert ("LyCORIS" if kind == "dora" else "kohya sd-scripts") in part["loads_in"]  # (see community.TOOLS)
    base = spec.load_pipeline(record["config"]["model"]["path"])
    open_clip = export_facts(spec.family).single_file_layout["text_encoder_2"][0]  # CLIP-G, compared in the HF layout instead

    def checkpoint(single_file, text_encoder_2):
        kept = {key: value for key, value in single_file.items() if not key.startswith(open_clip)}
        return {**kept, **{f"te2.{key}": value for key, value in clip_to_original(text_encoder_2).items()}}

    before = checkpoint(original_state_dict(base.components, export_facts(spec.family).single_file_layout), base.text_encoder_2)
    ours = dict(before)
    key_map = comfy_key_map(ours)
    layers = {}
    for key, value in load_file(path).items():
        name, _, tensor = key.partition(".")
        layers.setdefault(name, {})[tensor] = value.double()
    assert set(layers) <= set(key_map), sorted(set(layers) - set(key_map))[:3]  # "lora key not loaded"
    found = {tensor for tensors in layers.values() for tensor in tensors}
    assert {"lokr-tucker": {"lokr_t2"}, "loha-tucker": {"hada_t1", "hada_t2"}, "dora": {"dora_scale"},
            "partial-sgm": {"w_norm", "b_norm", "diff_b"}}.get(kind, set()) <= found
    for name, tensors in layers.items():
        layer = key_map[name]
        weight = ours[f"{layer}.weight"].double()
        if "diff" in tensors or "w_norm" in tensors:
            ours[f"{layer}.weight"] = weight + tensors.get("diff", tensors.get("w_norm"))
            for bias_name in ("diff_b", "b_norm"):
                if bias_name in tensors:
                    ours[f"{layer}.bias"] = ours[f"{layer}.bias"].double() + tensors[bias_name]
        else:
            ours[f"{layer}.weight"] = weight + community_delta(tensors, weight)

    exported = load_file(export_single_file(run_dir, tmp_path / "merged.safetensors"))
    merged_te2 = spec.pipeline_class().from_pretrained(merged_dir).text_encoder_2
    theirs = checkpoint(exported, merged_te2)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key].float(), value, rtol=1e-4, atol=1e-5 * max(value.abs().max().item(), 1.0),
                                   msg=key)
    moved = {key.split(".")[0] for key, value in theirs.items() if not torch.equal(value, before[key])}
    assert "model" in moved  # the UNet changed, so the comparison means something


# -- single-file checkpoints ---------------------------------------------------------------------------
def _assert_same_weights(pipe, reference, skip=()):
    for name, module in reference.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        ours, theirs = getattr(pipe, name).state_dict(), module.state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            if f"{name}.{key}" not in skip:
                assert torch.equal(ours[key], value), f"{name}.{key}"


@pytest.mark.parametrize(("family", "kind"), [("sd1", "lora"), ("sd2", "loha"), ("sdxl", "dora"), ("sd3", "lokr")])
def test_single_file_export_reads_back_bit_for_bit(family, kind, trained, tmp_path):
    """``export --single-file`` of an adapter run (merged) → diffusers ``from_single_file`` (offline: the
    tiny model's folder as ``config``) → the same weights, bit for bit, as ``export --merged``."""
    run_dir, record, merged_dir = trained(family, kind)
    spec = FAMILIES.get(family)
    out = export_single_file(run_dir, tmp_path / "model.safetensors")
    keys = load_file(out).keys()
    prefixes = {prefix for prefix, _ in export_facts(spec.family).single_file_layout.values()}
    assert {next(p for p in prefixes if k.startswith(p)) for k in keys} == {
        prefix for component, (prefix, _) in export_facts(spec.family).single_file_layout.items()
        if getattr(spec.pipeline_class().from_pretrained(merged_dir), component, None) is not None
    }
    config = record["config"]["model"]["path"]
    loaded = spec.pipeline_class().from_single_file(str(out), config=config, **_single_file_kwargs(spec))
    merged = spec.pipeline_class().from_pretrained(merged_dir)
    skip = set()
    if family == "sd3":
        # diffusers sets SD3's CLIP-L projection to the identity (as in the released SD3 models, not in
        # the tiny one), and picks the CLIP-G weights by width, which the tiny model's two CLIPs share:
        # CLIP-G is read back with the converter diffusers uses for it instead
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        skip = {"text_encoder.text_projection.weight", *(f"text_encoder_2.{k}" for k in merged.text_encoder_2.state_dict())}
        clip_g = convert_ldm_clip_checkpoint(load_file(out), "text_encoders.clip_g.transformer.")
        clip_g = {k: v for k, v in clip_g.items() if not k.startswith(("text_encoders.", "model.", "first_stage_model."))}
        reference = merged.text_encoder_2.state_dict()
        assert clip_g.keys() == reference.keys() and all(torch.equal(clip_g[k], v) for k, v in reference.items())
    _assert_same_weights(loaded, merged, skip)


def _single_file_kwargs(spec):
    return {k: v for k, v in spec.pipeline_extras.items() if v is None or isinstance(v, bool)}


def test_full_run_exports_one_checkpoint_from_the_cli(write_experiment, family_model, tmp_path, capsys):
    """The full fine-tune of SD1 (text encoder too) as A1111/ComfyUI load it: one original-layout file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from sdtune.cli import main

    path = write_experiment(techniques={"full": {"kind": "full", "train_text_encoder": True}}, max_train_steps=1)
    run_dir = train_technique(load_experiment(path), "full", progress=False).run_dir
    out = tmp_path / "full.safetensors"
    assert main(["export", str(run_dir), "--single-file", str(out)]) == 0
    assert "single-file checkpoint written" in capsys.readouterr().out
    checkpoint = load_file(out)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in checkpoint
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in checkpoint
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # 1×1 conv, as in LDM
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in checkpoint
    assert infer_diffusers_model_type(checkpoint) == "v1"  # what sdtune's family detection reads
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(family_model("sd1")),
                                                      safety_checker=None, requires_safety_checker=False)
    _assert_same_weights(loaded, StableDiffusionPipeline.from_pretrained(run_dir))

    assert main(["export", str(run_dir), "--single-file", str(out), "--precision", "fp16", "--overwrite"]) == 0
    assert {value.dtype for value in load_file(out).values()} == {torch.float16}
    assert main(["export", str(run_dir), "--single-file", str(out)]) == 2  # never overwritten silently
    assert main(["export", str(run_dir), "--single-file", str(tmp_path / "x.ckpt")]) == 2
    assert main(["export", str(run_dir)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"sdtune: error: --single-file: {out} exists; choose another file or pass --overwrite",
        f"sdtune: error: --single-file: '{tmp_path / 'x.ckpt'}' does not end in .safetensors; name the file OUT.safetensors",
        "sdtune: error: export: give --merged --out DIR (a diffusers folder), --single-file OUT.safetensors, or both",
    ]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3"])
def test_single_file_model_loads_with_the_same_weights(family, family_model, tmp_path):
    """``model: file.safetensors`` (original layout) with ``single_file_config``: sdtune detects the
    family from the config folder and loads exactly the folder's weights (diffusers folder → single
    file → sdtune → same weights)."""
    from sdtune.formats.single_file import save_single_file

    spec = FAMILIES.get(family)
    folder = family_model(family)
    reference = spec.load_pipeline(str(folder))
    path = save_single_file(reference.components, export_facts(spec.family).single_file_layout, tmp_path / "model.safetensors", {})
    config = ModelConfig(path=str(path), single_file_config=str(folder))
    assert detect_family_name(config) == family
    if family == "sd1":  # from the keys alone (diffusers' infer_diffusers_model_type); the tiny SD2/SDXL/
        assert detect_family_name(ModelConfig(path=str(path))) == "sd1"  # SD3 defeat its shape checks
    model = spec.load(config)
    skip = {"text_encoder.text_projection.weight", *(f"text_encoder_2.{k}" for k in reference.text_encoder_2.state_dict())} \
        if family == "sd3" else set()  # (see test_single_file_export_reads_back_bit_for_bit)
    _assert_same_weights(model.pipeline(), reference, skip)


def test_training_starts_from_a_single_file_model(write_experiment, family_model, tmp_path):
    from sdtune.formats.single_file import save_single_file

    spec = FAMILIES.get("sd1")
    reference = spec.load_pipeline(str(family_model("sd1")))
    path = save_single_file(reference.components, export_facts(spec.family).single_file_layout, tmp_path / "sd1.safetensors", {})
    model = {"path": str(path), "single_file_config": str(family_model("sd1"))}
    experiment = load_experiment(write_experiment(model=model, max_train_steps=1))
    result = train_technique(experiment, "lora", progress=False)
    assert result.status == "finished" and result.record["model"]["family"] == "sd1"
    pipe, _ = load_run_pipeline(result.run_dir, device=torch.device("cpu"))  # base from the file + the LoRA
    assert pipe.unet.config.sample_size == reference.unet.config.sample_size


# -- init_from --------------------------------------------------------------------------------------------
INIT_FROM = [("sd1", "lora", "sd1-lora"), ("sd1", "dora", "sd1-dora"), ("sdxl", "loha", "sdxl-loha"),
             ("sdxl", "sgm-locon", "sdxl-sgm-names"), ("sdxl", "sgm-locon", "sdxl-diffusers-names"), ("sd3", "lokr", "sd3-lokr")]


@pytest.mark.parametrize(("family", "kind", "case"), INIT_FROM, ids=[case for _, _, case in INIT_FROM])
def test_init_from_a_community_file_starts_where_it_left_off(family, kind, case, trained, tmp_path):
    """An adapter initialised from a run's community file (with another alpha: the file's scale is
    folded in) has exactly the run's weights once merged, before any training. SDXL files are read in
    kohya's SGM names (what sdtune writes) and in diffusers' block names (what other trainers write)."""
    from safetensors.torch import save_file

    from sdtune.techniques import TECHNIQUES
    from sdtune.techniques.adapter import merge_adapters

    run_dir, record, merged_dir = trained(family, kind)
    path, _ = _community_file(run_dir, record)
    if case == "sdxl-diffusers-names":
        unet = FAMILIES.get(family).load_pipeline(record["config"]["model"]["path"]).unet
        renamed = {community.layer_name("lora_unet_", unet, p, sgm=True): community.layer_name("lora_unet_", unet, p)
                   for p, layer in unet.named_modules() if "weight" in layer._parameters}
        weights = {f"{renamed[key.split('.')[0]]}.{key.partition('.')[2]}": value for key, value in load_file(path).items()}
        assert all(key.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks",
                                   "lora_unet_time_embedding", "lora_unet_add_embedding", "lora_unet_conv_")) for key in weights)
        path = tmp_path / "diffusers-names.safetensors"
        save_file(weights, path)
    raw = {**record["config"], "techniques": {"again": _technique_entry(record, kind, path)}}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(raw))
    experiment = load_experiment(tmp_path / "again.yaml")
    spec = experiment.techniques["again"]
    assert spec.options.init_from == str(path)
    model = experiment.family.load(experiment.model)
    TECHNIQUES.get(spec.kind)(spec.options).prepare(model)
    merged = model.pipeline_class().from_pretrained(merged_dir)
    for component in model.trainable_names():
        module = model.components[component]
        merge_adapters(module)
        ours, theirs = module.state_dict(), getattr(merged, component).state_dict()
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=f"{component}.{key}")


def _technique_entry(record, kind, path):
    """The run's technique entry, with another alpha and ``init_from``."""
    entry = dict(KINDS[kind])
    entry.update(train_text_encoder=record["technique"]["options"]["train_text_encoder"], init_from=str(path))
    if record["model"]["family"] == "sd3":
        entry.pop("target_modules", None)
    entry["alpha"] = 7
    return entry


def test_init_from_is_relative_to_the_experiment_file(write_experiment, tmp_path, monkeypatch):
    """Like ``model`` and ``data``, ``init_from`` names a file next to the experiment, wherever sdtune runs."""
    from safetensors.torch import save_file

    (tmp_path / "weights").mkdir()
    save_file({"lora_unet_conv_in.alpha": torch.tensor(1.0)}, tmp_path / "weights" / "start.safetensors")
    path = write_experiment(techniques={"lora": {"kind": "lora", "init_from": "weights/start.safetensors"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    experiment = load_experiment(path)
    assert experiment.techniques["lora"].options.init_from == str(tmp_path / "weights" / "start.safetensors")
    with pytest.raises(ConfigError, match=rf"^techniques.lora.init_from: '{tmp_path}/weights/missing.safetensors' is not a "
                       r".safetensors file; .* \(absolute, or relative to the experiment file\)$"):
        load_experiment(write_experiment(techniques={"lora": {"kind": "lora", "init_from": "weights/missing.safetensors"}}))


def test_init_from_errors_are_one_line_with_the_fix(write_experiment, trained, tmp_path):
    with pytest.raises(ConfigError, match=r"^techniques.lora.init_from: '.*nowhere.safetensors' is not a .safetensors file"):
        load_experiment(write_experiment(techniques={"lora": {"kind": "lora", "init_from": str(tmp_path / "nowhere.safetensors")}}))
    run_dir, record, _ = trained("sd1", "loha")
    path, _ = _community_file(run_dir, record)
    from sdtune.techniques import TECHNIQUES

    cases = {  # technique → the message
        "lora": r"holds hada_w1_a, .* \(a loha file\), which a lora technique cannot take; use kind: loha",
        "loha": r"is \(\d+, \d+\) in .* but \(\d+, \d+\) here; use the rank",
    }
    for kind, message in cases.items():
        options = {"kind": kind, "train_text_encoder": True, "init_from": str(path), "rank": 4 if kind == "loha" else 2}
        experiment = load_experiment(write_experiment(techniques={"t": options}))
        model = experiment.family.load(experiment.model)
        spec = experiment.techniques["t"]
        with pytest.raises(ConfigError, match=message):
            TECHNIQUES.get(spec.kind)(spec.options).prepare(model)
    experiment = load_experiment(write_experiment(techniques={"t": {"kind": "loha", "rank": 2, "init_from": str(path)}}))
    model = experiment.family.load(experiment.model)
    with pytest.raises(ConfigError, match="which is no layer of unet; is it for this model family"):
        TECHNIQUES.get("loha")(experiment.techniques["t"].options).prepare(model)


def test_weights_without_a_community_form_are_refused_not_dropped():
    """Partial training of a text encoder moves its embeddings, which no kohya/LyCORIS layout holds:
    the community file is not written at all rather than written without them; so with an SDXL UNet
    layer that has no SGM name."""
    encoder = torch.nn.Module()
    encoder.token_embedding = torch.nn.Embedding(4, 2)
    encoder.proj = torch.nn.Linear(2, 2)
    trained_tensors = {"text_encoder.proj.weight": torch.ones(2, 2), "text_encoder.token_embedding.weight": torch.ones(4, 2)}
    base = {k: torch.zeros_like(v) for k, v in trained_tensors.items()}
    with pytest.raises(community.CommunityFormatError, match=r"text_encoder.token_embedding.weight \(Embedding\)"):
        community.differences_to_community(trained_tensors, base, {"text_encoder": encoder}, {"text_encoder": "lora_te_"})
    out = community.differences_to_community(
        {"text_encoder.proj.bias": torch.ones(2)}, {"text_encoder.proj.bias": torch.zeros(2)},
        {"text_encoder": encoder}, {"text_encoder": "lora_te_"},
    )
    assert set(out) == {"lora_te_proj.diff_b", "lora_te_proj.diff"} and not out["lora_te_proj.diff"].any()
    unet = torch.nn.Module()  # an SDXL-like UNet with a layer the SGM checkpoint has no name for
    unet.config = {"layers_per_block": 1, "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
    unet.encoder_hid_proj = torch.nn.Linear(2, 2)
    with pytest.raises(community.CommunityFormatError, match="'encoder_hid_proj.weight' has no original-layout name"):
        community.differences_to_community({"unet.encoder_hid_proj.weight": torch.ones(2, 2)},
                                           {"unet.encoder_hid_proj.weight": torch.zeros(2, 2)},
                                           {"unet": unet}, {"unet": "lora_unet_"}, sgm=("unet",))
