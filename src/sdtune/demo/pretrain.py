"""Pretrain the demo's base model: the exact SD architecture, small enough for a laptop CPU.

Two stages, both reproducible from a seed:
1. the VAE (AutoencoderKL, 64 px → 16×16×4 latents) learns to reconstruct images of both
   domains and their hybrids (it stays frozen during fine-tuning, so it must be able to draw the
   style it has never been asked to generate);
2. the UNet and the CLIP text encoder train jointly from scratch on the *base* domain only, with
   10 % empty captions for classifier-free guidance, through sdtune's own training loop.

``sdtune demo pretrain --out DIR`` writes a diffusers pipeline folder; the shipped one lives in
``sdtune/assets/demo-base``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtune.demo import world
from sdtune.errors import UserError
from sdtune.testing.tiny import TinySizes, build_tiny_pipeline
from sdtune.util import atomic
from sdtune.util.paths import check_writable_folder

DEMO_SIZES = TinySizes(
    unet_channels=(32, 64, 64),  # 1.49 M parameters
    unet_layers_per_block=1,
    unet_attention_head_dim=8,
    vae_channels=(16, 32, 64),  # ×4 downsampling: 64 px → 16×16 latents
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    max_tokens=8,  # "a large red circle" is 4 words + start/end
    norm_groups=8,
    sample_size=16,
)
RESOLUTION = 64
PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def pretrain(
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    vae_steps: int = 800,
    unet_steps: int = 2500,
    num_images: int = 6000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build, pretrain and write the demo base model to ``out_dir``; returns a summary."""
    out_dir = Path(out_dir)
    check_base_folder(out_dir)
    work = Path(work_dir) if work_dir else out_dir.parent / f".{out_dir.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    init_dir = work / "init"
    if not (init_dir / "vae" / "diffusion_pytorch_model.safetensors").exists() or not (work / "vae.done").exists():
        shutil.rmtree(init_dir, ignore_errors=True)
        build_tiny_pipeline(init_dir, words=world.VOCABULARY, sizes=DEMO_SIZES, seed=seed)
        started = time.perf_counter()
        vae_report = train_vae(init_dir, vae_steps, seed=seed, progress=progress)
        vae_report["time_s"] = time.perf_counter() - started
        atomic.write_json(work / "vae.done", vae_report)
    vae_report = json.loads((work / "vae.done").read_text())
    data_dir = work / "base-data"
    if not (data_dir / "metadata.jsonl").exists():
        world.write_imagefolder(data_dir, world.sample_scenes(num_images, seed + 1, "base"), RESOLUTION)
    started = time.perf_counter()
    run = _train_unet(init_dir, data_dir, work / "runs", unet_steps, seed, progress)
    summary = {
        "vae": vae_report,
        "unet_steps": unet_steps,
        "unet_time_s": time.perf_counter() - started,
        "final_loss": run.record["loss_history"][-1]["loss"],
        "parameters": run.record["parameters"],
        "seed": seed,
    }
    with atomic.replacing(out_dir, folder=True) as folder:  # the old model stays until the new one is whole
        for part in PIPELINE_PARTS:
            source, target = run.run_dir / part, folder / part
            shutil.copytree(source, target) if source.is_dir() else shutil.copy2(source, target)
        (folder / "pretrain.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def check_base_folder(out_dir: Path) -> None:
    """``--out`` before the hour of pretraining: a folder this process can write, empty or an earlier
    demo base model (which the new one replaces whole once it is written)."""
    check_writable_folder(out_dir, "--out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise UserError(
            f"--out: {str(out_dir)!r} holds files that are not a demo base model; `demo pretrain` replaces the whole "
            "folder: choose an empty or new one"
        )


def train_vae(
    pipeline_dir: Path,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train the pipeline's VAE on rendered scenes of both domains and hybrids; set its scaling factor.

    Loss: MSE reconstruction + a small KL term (Rombach et al. 2022 use a KL weight of ~1e-6).
    The scaling factor makes latents unit-variance, as SD's 0.18215 does for its VAE (§4.3.2).
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="pretrain VAE", disable=not progress)
    for step in bar:
        pixels = _vae_batch(rng, batch_size)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = torch.nn.functional.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        pixels = _vae_batch(np.random.default_rng(seed + 99), 64)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
        mse = torch.nn.functional.mse_loss(reconstruction.clamp(-1, 1), pixels).item()
        scaling = 1.0 / posterior.mean.std().item()
    vae.register_to_config(scaling_factor=scaling)
    with atomic.replacing(pipeline_dir / "vae", folder=True) as folder:
        vae.save_pretrained(folder, safe_serialization=True)
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # pixel range [-1, 1]: peak-to-peak 2
    return {"steps": steps, "psnr_db": psnr, "scaling_factor": scaling}


def _vae_batch(rng: np.random.Generator, batch_size: int) -> torch.Tensor:
    images = []
    for _ in range(batch_size):
        scene = world.sample_scenes(1, int(rng.integers(1 << 31)), str(rng.choice(world.DOMAINS)))[0]
        outline, tinted = (None, None) if rng.random() < 0.7 else (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        image = world.render(scene, RESOLUTION, outline=outline, tinted_background=tinted)
        images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def _train_unet(init_dir: Path, data_dir: Path, runs_dir: Path, steps: int, seed: int, progress: bool) -> Any:
    import sdtune

    experiment = sdtune.experiment_from_dict(
        {
            "name": "demo-pretrain",
            "model": str(init_dir),
            "data": {"source": str(data_dir), "resolution": RESOLUTION, "center_crop": True, "random_flip": False},
            "train": {
                "batch_size": 64,
                "max_train_steps": steps,
                "learning_rate": 1e-3,
                "lr_scheduler": "cosine",
                "lr_warmup_steps": 100,
                "caption_dropout": 0.1,
                "adam_weight_decay": 0.0,
                "seed": seed,
                "checkpointing_steps": 250,
                "checkpoints_total_limit": 1,
            },
            "techniques": {"base": {"kind": "full", "train_text_encoder": True}},
        }
    )
    resumable = (runs_dir / "base" / "checkpoints").exists()
    return sdtune.train_technique(
        experiment, "base", runs_dir, resume=True if resumable else None, overwrite=not resumable, progress=progress
    )
