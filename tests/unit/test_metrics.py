"""Quality metrics: the maths on known inputs, and the CLIP scorer / registry on a tiny random CLIP."""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.metrics import (
    METRICS,
    ClipScorer,
    DinoEncoder,
    Metric,
    MetricContext,
    MetricUnavailable,
    bootstrap_ci,
    centroid_distance,
    compute_all,
    cosine_matrix,
    default_metric_names,
    fidelity,
    frechet_distance,
    kid,
    mean_max_cosine,
    register_metric,
    style_shares,
    vendi_score,
)
from sdtune.util.registry import Registry, RegistryError

WORDS = ["a", "image", "realistic", "semi", "cartoon", "red", "green", "blue", "square", "circle"]
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


# --------------------------------------------------------------------------- maths


def _random(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_identical_sets_are_perfectly_faithful():
    x = _random(12)
    assert mean_max_cosine(x, x) == pytest.approx(1.0)
    assert centroid_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    copies = np.repeat(x[:1], 5, axis=0)
    assert fidelity(copies, copies) == pytest.approx(1.0)
    assert fidelity(x, x) <= 1.0
    assert cosine_matrix(x, x).diagonal() == pytest.approx(np.ones(12))


def test_fidelity_is_the_dot_product_of_mean_unit_embeddings():
    a, b = _random(7, seed=1), _random(9, seed=2)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    assert fidelity(a, b) == pytest.approx(float(unit(a).mean(0) @ unit(b).mean(0)))
    assert centroid_distance(a, b) > 0


def test_vendi_of_copies_is_one_and_of_orthonormal_vectors_is_n():
    assert vendi_score(np.tile(_random(1), (10, 1))) == pytest.approx(1.0)
    assert vendi_score(np.eye(6)) == pytest.approx(6.0)
    assert vendi_score(np.eye(5, 40) * 3.0) == pytest.approx(5.0)  # scale-free, n < d
    assert vendi_score(np.vstack([np.eye(4)] * 3)) == pytest.approx(4.0)  # n > d: 3 copies of 4 directions
    assert 1.0 < vendi_score(_random(30)) <= 16.0 + 1e-9


def test_kid_of_a_set_with_itself_is_near_zero_and_grows_apart():
    a = _random(200, d=8, seed=3)
    b = _random(200, d=8, seed=4) + 1.5
    same_mean, same_std = kid(a, a, num_subsets=20)
    diff_mean, _ = kid(a, b, num_subsets=20)
    assert abs(same_mean) < 0.05 * diff_mean
    assert same_std >= 0
    assert diff_mean > 0.1
    assert kid(a[:5], b[:7], subset_size=1000, num_subsets=3)[0] > 0  # subset size adapts to small sets


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = _random(100, d=8, seed=5)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(a, a + shift) for shift in (0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts)
    assert shifts[-1] == pytest.approx(8 * 2.0**2, rel=1e-6)  # a pure shift adds ‖Δμ‖²


def test_fid_handles_sets_smaller_than_the_dimension():
    a, b = _random(5, d=32, seed=6), _random(6, d=32, seed=7)
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(8)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    for values in (small, large):
        mean, low, high = bootstrap_ci(values)
        assert low <= mean <= high
        assert mean == pytest.approx(values.mean())
    width = lambda v: bootstrap_ci(v)[2] - bootstrap_ci(v)[1]  # noqa: E731
    assert width(large) < width(small) / 3
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)


def test_style_shares_sum_to_one():
    classes = ["realistic", "semi-cartoon", "cartoon"]
    shares = style_shares(["cartoon", "cartoon", "realistic", 1], classes)
    assert list(shares) == classes
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares == {"realistic": 0.25, "semi-cartoon": 0.25, "cartoon": 0.5}
    with pytest.raises(ValueError, match="not among"):
        style_shares(["anime"], classes)


# --------------------------------------------------------------------------- a tiny random CLIP


def _write_tokenizer_files(folder) -> None:
    """A BPE vocabulary: every letter (with and without ``</w>``), merges that build WORDS whole, specials."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase + "-"
    vocab = {token: i for i, token in enumerate([*letters, *(c + "</w>" for c in letters)])}
    merges = []
    for word in WORDS:
        merged, *rest = [*word[:-1], word[-1] + "</w>"]
        for symbol in rest:
            if f"{merged} {symbol}" not in merges:
                merges.append(f"{merged} {symbol}")
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    for token in SPECIALS:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _build_tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    _write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        **ids,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model, tokenizer


@pytest.fixture
def tiny_clip(tmp_path) -> ClipScorer:
    """A ClipScorer around a random-weight CLIP with tiny dimensions and a 10-word tokenizer."""
    from transformers import CLIPImageProcessor

    model, tokenizer = _build_tiny_clip(tmp_path)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    return ClipScorer(model, tokenizer, processor, batch_size=3)


def _images(count: int, seed: int, size: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def test_clip_embeddings_and_scores(tiny_clip):
    images = _images(5, seed=0)
    embeddings = tiny_clip.image_embeddings(images)
    assert embeddings.shape == (5, 16)
    assert np.linalg.norm(embeddings, axis=1) == pytest.approx(np.ones(5), abs=1e-5)
    texts = tiny_clip.text_embeddings(["a red square", "a blue circle", "semi-cartoon " * 20])  # truncated
    assert np.linalg.norm(texts, axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert not np.allclose(texts[0], texts[1])
    again = tiny_clip.image_embeddings([images[2].copy(), images[0]])
    assert again[0] == pytest.approx(embeddings[2], abs=1e-5)
    scores = tiny_clip.clip_score(images, ["a red square"] * 5)
    assert scores.shape == (5,) and np.all((scores >= 0) & (scores <= 100))
    probabilities = tiny_clip.zero_shot(images, ["realistic", "semi-cartoon", "cartoon"])
    assert probabilities.shape == (5, 3)
    assert probabilities.sum(axis=1) == pytest.approx(np.ones(5))


def test_load_from_a_local_folder_reads_the_preprocessing(tmp_path):
    model, tokenizer = _build_tiny_clip(tmp_path / "tokenizer-files")
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = {
        "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.4, 0.4, 0.4],
        "image_std": [0.3, 0.3, 0.3],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    scorer = ClipScorer.load(str(folder), device="cpu")
    assert scorer.processor.crop_size == {"height": 32, "width": 32}  # transformers' processor, the folder's values
    assert scorer.processor.image_mean == pytest.approx([0.4] * 3)
    assert scorer.image_embeddings(_images(2, seed=1)).shape == (2, 16)


def test_load_failure_is_one_clear_line(tmp_path):
    missing = str(tmp_path / "no-such-clip")
    with pytest.raises(MetricUnavailable) as caught:
        ClipScorer.load(missing)
    message = str(caught.value)
    assert "\n" not in message and missing in message and "evaluation.clip_model" in message


def _context(**overrides) -> MetricContext:
    prompts = [
        "a red square",
        "a red square",
        "a blue circle",
        "a blue circle",
        "a green image",
        "a green image",
    ]
    fields = dict(
        images=_images(6, seed=2),
        prompts=prompts,
        seeds=[0, 1] * 3,
        in_domain=[True, True, True, True, False, False],
        training_images=_images(5, seed=3, size=(32, 32)),
        base_images=_images(6, seed=4),
    )
    return MetricContext(**{**fields, **overrides})


def test_compute_all_runs_every_metric(tiny_clip, tiny_dino_dir):
    dino = DinoEncoder.load(str(tiny_dino_dir))
    ctx = _context(clip_loader=lambda: tiny_clip, loaders={"dino": lambda: dino})
    results = compute_all(ctx, default_metric_names())
    assert set(results) == {name for name in METRICS.names() if METRICS.get(name).default}
    assert {"dino", "clip_i", "clip_t", "drift"} <= set(results) and "pickscore" not in results
    for name, entry in results.items():
        assert entry["skipped"] is None, name
        assert entry["direction"] == METRICS.get(name).direction
        values = entry["value"].values() if isinstance(entry["value"], dict) else [entry["value"]]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), (name, entry)
    assert sum(results["style_split"]["value"].values()) == pytest.approx(1.0)
    assert 0 <= results["clip_score"]["value"] <= 100
    assert 1 <= results["diversity"]["value"] <= 6 + 1e-9
    assert results["fidelity"]["details"]["nearest_neighbour"] >= results["fidelity"]["value"]
    assert results["preservation"]["details"]["n"] == 2  # out-of-domain prompts only


def test_preservation_is_one_against_itself_and_skipped_without_base(tiny_clip):
    ctx = _context(clip_loader=lambda: tiny_clip)
    ctx.base_images = ctx.images
    assert compute_all(ctx, ["preservation"])["preservation"]["value"] == pytest.approx(1.0)
    base_row = compute_all(_context(base_images=None, clip_loader=lambda: tiny_clip), ["preservation"])
    assert base_row["preservation"]["value"] is None
    assert "base-model images" in base_row["preservation"]["skipped"]


def test_unavailable_clip_skips_clip_metrics_but_not_others(tmp_path, caplog):
    registry: Registry[Metric] = Registry("metric")
    for name in METRICS.names():
        registry.register(name)(METRICS.get(name))

    @register_metric("image_count", direction="none", registry=registry)
    def image_count(ctx):
        """How many images were generated."""
        return {"value": len(ctx.images)}

    ctx = _context(clip_model=str(tmp_path / "missing-clip"), device="cpu")
    results = compute_all(ctx, registry=registry)
    assert results["image_count"] == {"value": 6, "direction": "none", "skipped": None, "details": {}}
    for name in (n for n in METRICS.names() if METRICS.get(n).needs == "clip"):
        assert results[name]["value"] is None
        assert "could not be loaded" in results[name]["skipped"] and "\n" not in results[name]["skipped"]
    assert "skipped" in caplog.text


def test_registry_rejects_unknown_and_duplicate_names(tiny_clip):
    with pytest.raises(RegistryError, match="choose one of: .*clip_score"):
        compute_all(_context(clip_loader=lambda: tiny_clip), ["clip_score", "sharpness"])
    with pytest.raises(RegistryError, match="twice"):
        register_metric("fid", direction="lower")(lambda ctx: {"value": 0.0})
    with pytest.raises(ValueError, match="direction"):
        register_metric("new", direction="up")


def test_context_checks_lengths():
    with pytest.raises(ValueError, match="seeds"):
        _context(seeds=[0])
