"""Library changes under our feet (issue #20 §8), each pinned by a test of what our files mean:

- diffusers #14409 loads a mixed-rank LoRA file without alpha information at scale 1 per layer: our
  diffusers file has each layer's scale folded in (alpha = rank everywhere), our kohya file an alpha
  per layer; both load in diffusers as the trained model, with the metadata and without it;
- transformers 5 removed ``text_model.`` from ``CLIPTextModel``'s module names: our community files
  keep the original names, and every text-encoder key maps back onto a module of today's model;
- diffusers deprecates ``torch_dtype`` (for ``dtype``): no call of ours passes it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.experiment import load_experiment
from sdtune.formats import community
from sdtune.formats.families import export_facts
from sdtune.techniques import trainable_named_parameters
from sdtune.techniques.adapter import DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE, merge_adapters

ROOT = Path(__file__).resolve().parents[2]
# rank 4 and alpha 8 (scale 2) by default; to_q at rank 2 (scale 4), to_k at alpha 3 (scale 0.75),
# and the text encoder's q_proj at rank 1 (scale 8): four scales, two ranks per component
MIXED = {
    "kind": "lora", "rank": 4, "alpha": 8, "rank_pattern": {"to_q": 2, "q_proj": 1}, "alpha_pattern": {"to_k": 3},
    "train_text_encoder": True,
}


@pytest.fixture(scope="module")
def mixed_rank_lora(tmp_path_factory, tiny_model, tiny_data):
    """A mixed-rank LoRA (random B, as after training) saved by the technique; its effective weights."""
    import yaml
    from conftest import experiment_dict

    folder = tmp_path_factory.mktemp("mixed")
    raw = experiment_dict(tiny_model, tiny_data)
    raw["techniques"] = {"mixed": MIXED}
    (folder / "experiment.yaml").write_text(yaml.safe_dump(raw))
    experiment = load_experiment(folder / "experiment.yaml")
    technique = experiment.techniques["mixed"].build()
    model = experiment.family.load(experiment.model)
    technique.prepare(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainable_named_parameters(model).items():
            if "lora_B" in name:  # (B starts at zero: give every layer an update)
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    run_dir = folder / "mixed"
    run_dir.mkdir()
    technique.save(model, run_dir)
    effective = {}
    for component in ("unet", "text_encoder"):
        module = model.components[component]
        merge_adapters(module)
        effective[component] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return experiment, run_dir, effective


def _assert_loads_as_trained(experiment, run_dir, weight_name, effective):
    pipe = experiment.family.load_pipeline(experiment.model.path)
    pipe.load_lora_weights(str(run_dir), weight_name=weight_name, adapter_name="x")
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    for component, state in effective.items():
        ours = getattr(pipe, component).state_dict()
        for key, value in state.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=f"{weight_name}: {component}.{key}")


# peft warns of a pattern key that matches no module of the component it adapts: each component gets its own keys
@pytest.mark.filterwarnings("error:The following (rank|alpha)_pattern keys did not match")
def test_mixed_rank_lora_files_load_in_diffusers_as_trained(mixed_rank_lora, tmp_path):
    experiment, run_dir, effective = mixed_rank_lora
    kohya = load_file(run_dir / KOHYA_LORA_FILE)
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert {kohya[k].shape[0] for k in downs} == {1, 2, 4}  # the ranks really are mixed
    assert all(k.replace(".lora_down.weight", ".alpha") in kohya for k in downs)  # an alpha for every layer
    for weight_name in (DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE):
        _assert_loads_as_trained(experiment, run_dir, weight_name, effective)
    # a tool that drops the header's metadata (or a loader that ignores it): still the trained model,
    # since every layer's scale is 1 in the diffusers file
    with safe_open(str(run_dir / DIFFUSERS_LORA_FILE), framework="pt") as file:
        assert file.metadata()  # (what is dropped here)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(run_dir / DIFFUSERS_LORA_FILE), stripped / DIFFUSERS_LORA_FILE)
    _assert_loads_as_trained(experiment, stripped, DIFFUSERS_LORA_FILE, effective)


def test_text_encoder_keys_keep_the_original_names_and_map_to_todays_modules(mixed_rank_lora):
    """transformers ≥ 5's CLIPTextModel has no ``text_model`` level; every tool's key map has it."""
    experiment, run_dir, _ = mixed_rank_lora
    text_encoder = experiment.family.load(experiment.model).components["text_encoder"]
    assert not hasattr(text_encoder, "text_model") or hasattr(text_encoder.text_model, "encoder")
    prefix = export_facts("sd1").community_prefixes["text_encoder"]
    layers = sorted({k.split(".")[0] for k in load_file(run_dir / KOHYA_LORA_FILE) if k.startswith(prefix)})
    assert layers and all(layer.startswith(prefix + "text_model_encoder_layers_") for layer in layers)
    names = community.layer_names(text_encoder, prefix)  # community name → today's module path
    for layer in layers:
        module = text_encoder.get_submodule(names[layer])
        assert isinstance(module, torch.nn.Linear) and names[layer].endswith(("q_proj", "k_proj", "v_proj", "out_proj"))


def test_no_call_passes_torch_dtype():
    """diffusers and transformers take ``dtype`` (``torch_dtype`` is deprecated, removed at diffusers 1.0)."""
    calls = re.compile(r"\btorch_dtype\s*=")
    found = [f"{path.relative_to(ROOT)}:{number}" for folder in ("src", "tests", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    assert not found, found
