"""What other tools call each family's components: kohya/LyCORIS key prefixes, the original
single-file layout, embedding keys, ModelSpec and kohya metadata names.

These are facts about files other tools read and write, not about the model sdtune trains, so they
live with the formats rather than in the family's file: adding a family is one ``models/<family>.py``
and one entry here (a family without an entry trains and loads in diffusers, and
:func:`export_facts` refuses community and single-file outputs in one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdtune.errors import UserError


class NoExportFacts(UserError, KeyError):
    """A family that has no entry here: no community or single-file files for it."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ExportFacts:
    """One family's names in the community and original layouts."""

    community_prefixes: dict[str, str]  # component → key prefix of kohya/LyCORIS adapter files
    single_file_layout: dict[str, tuple[str, str]]  # component → (original key prefix, layout)
    embedding_keys: dict[str, str]  # text encoder → its key in A1111/ComfyUI embedding files
    modelspec_architecture: str  # the ModelSpec (kohya, A1111) name of the base architecture
    kohya_base_model_version: str  # kohya's ss_base_model_version ("sd_v1", "sdxl_base_v1-0")
    # how kohya sd-scripts' own trainer names the denoiser's layers, and so sdtune's community files:
    # "diffusers" (SD1/2), "sgm" (SDXL: input_blocks_…), "none" (SD3: SimpleTuner/ComfyUI's lycoris_…)
    kohya_trainer_names_unet: str = "diffusers"
    kohya_lora_file: bool = True  # a `pytorch_lora_weights_kohya.safetensors` (kohya's LoRA naming) exists
    sgm_components: tuple[str, ...] = field(default=())  # components whose community names are SGM paths


_LDM = {"unet": ("model.diffusion_model.", "unet"), "vae": ("first_stage_model.", "vae")}

EXPORT_FACTS: dict[str, ExportFacts] = {
    "sd1": ExportFacts(
        community_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
        single_file_layout={**_LDM, "text_encoder": ("cond_stage_model.transformer.", "clip")},  # CompVis LDM
        embedding_keys={"text_encoder": "emb_params"},  # A1111's one-vector-table file
        modelspec_architecture="stable-diffusion-v1", kohya_base_model_version="sd_v1",
    ),
    "sd2": ExportFacts(
        community_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
        single_file_layout={**_LDM, "text_encoder": ("cond_stage_model.model.", "open_clip")},  # OpenCLIP-H
        embedding_keys={"text_encoder": "emb_params"},
        modelspec_architecture="stable-diffusion-v2", kohya_base_model_version="sd_v2",
    ),
    "sdxl": ExportFacts(
        community_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
        single_file_layout={  # Stability's SGM
            **_LDM, "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
            "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
        },
        embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
        modelspec_architecture="stable-diffusion-xl-v1-base", kohya_base_model_version="sdxl_base_v1-0",
        kohya_trainer_names_unet="sgm",  # its own SDXL UNet: lora_unet_input_blocks_4_1_…, as sdtune writes
        sgm_components=("unet",),
    ),
    "sd3": ExportFacts(
        # SimpleTuner's LyCORIS names for the transformer (what ComfyUI maps for SD3) and ComfyUI's/
        # OneTrainer's lora_te1/2/3 for CLIP-L, CLIP-G and T5
        community_prefixes={
            "transformer": "lycoris_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
            "text_encoder_3": "lora_te3_",
        },
        single_file_layout={  # Stability's SD3 checkpoints
            "transformer": ("model.diffusion_model.", "mmdit"), "vae": ("first_stage_model.", "vae"),
            "text_encoder": ("text_encoders.clip_l.transformer.", "clip"),
            "text_encoder_2": ("text_encoders.clip_g.transformer.", "clip"),
            "text_encoder_3": ("text_encoders.t5xxl.transformer.", "t5"),
        },
        embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},  # ComfyUI's
        modelspec_architecture="stable-diffusion-3", kohya_base_model_version="sd3",
        kohya_trainer_names_unet="none", kohya_lora_file=False,
    ),
}


def export_facts(family: str) -> ExportFacts:
    """The export facts of a registered family; one line when there are none."""
    if family not in EXPORT_FACTS:
        raise NoExportFacts(
            f"model family {family!r} has no community/single-file names (sdtune.formats.families); its runs "
            "load in diffusers and `sdtune generate`, but no kohya or single-file file is written"
        )
    return EXPORT_FACTS[family]


def family_of_metadata(metadata: dict[str, str] | None) -> str | None:
    """The family a community file says it was trained on (ModelSpec's ``modelspec.architecture``, or
    kohya's ``ss_base_model_version``), or None when its metadata does not say or names no family here."""
    metadata = metadata or {}
    architecture = metadata.get("modelspec.architecture", "").split("/")[0]
    version = metadata.get("ss_base_model_version", "")
    for family, facts in EXPORT_FACTS.items():
        if architecture == facts.modelspec_architecture or (not architecture and version == facts.kohya_base_model_version):
            return family
    return None
