"""Textual inversion (Gal et al. 2022): a new word learned as token embeddings; nothing else trains.

The placeholder (``<my-toy>``; with ``num_vectors: 3`` also ``<my-toy>_1`` and ``<my-toy>_2``, as
diffusers names them) is added to every tokenizer of the model (SD1/2: one; SDXL: CLIP-L and CLIP-G;
SD3: both CLIPs and T5 when loaded), each new row starting from the embedding of
``initializer_token``. Only those rows train, and exactly: the token-embedding module of each text
encoder is wrapped so that the trainable parameter holds the new rows alone
(:class:`NewTokenEmbedding`); the original table and every other weight are frozen tensors the
optimizer never sees (diffusers' script trains the whole table and copies the old rows back after
each step, which weight decay and rounding make approximate). A caption spells the placeholder
once; training expands it to all of its vectors, as diffusers' pipelines do to prompts
(``maybe_convert_prompt``).

Saved as ``learned_embeds.safetensors`` (``{placeholder: [num_vectors, width]}``, one file per text
encoder: ``learned_embeds_2.safetensors`` for the second, … — diffusers' ``load_textual_inversion``
and its SDXL script's layout) and as one A1111/ComfyUI embedding named after the placeholder
(``emb_params`` for SD1/2; ``clip_l``/``clip_g`` for SDXL; ``clip_l``/``clip_g``/``t5xxl`` for SD3).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtune.config import ConfigError
from sdtune.formats.families import export_facts
from sdtune.models import FAMILIES, Model
from sdtune.records import CheckFailure
from sdtune.techniques.base import TECHNIQUES, Technique, TrainedEvidence, loaded_text_encoders
from sdtune.util import atomic

LISTING_FILE = "textual_inversion.json"  # placeholder, tokens, and which file holds which encoder's rows


@dataclass
class TextualInversionOptions:
    placeholder_token: str  # the new word, e.g. "<my-toy>"; it must not be a token already
    initializer_token: str  # an existing one-token word the new vectors start from, e.g. "toy"
    num_vectors: int = 1  # embedding vectors of the new word (diffusers: <tok>, <tok>_1, …)
    text_encoders: list[str] | None = None  # which encoders learn it; None = every one the model has
    # (the loop reads these of every technique; textual inversion trains text encoders by definition)
    train_text_encoder: ClassVar[bool] = False
    text_encoder_learning_rate: ClassVar[float | None] = None


class NewTokenEmbedding(torch.nn.Module):
    """A token embedding whose rows at ``token_ids`` are replaced by the trainable ``vectors``; the
    original table stays a frozen module, so no other row can change."""

    def __init__(self, original: torch.nn.Embedding, token_ids: list[int], vectors: torch.Tensor) -> None:
        super().__init__()
        self.original = original.requires_grad_(False)
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.register_buffer("start", vectors.detach().clone().float(), persistent=False)  # what training began from
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())

    def weights_before_and_after(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The token table as training started (the new rows at their initialiser) and as it ends (the
        learned rows): the layer's W_before and W_after for :mod:`sdtune.anatomy`."""
        rows = max(self.original.num_embeddings, int(self.token_ids.max()) + 1)
        before = torch.zeros(rows, self.vectors.shape[1], dtype=torch.float64, device=self.vectors.device)
        before[: self.original.num_embeddings] = self.original.weight.detach().double()
        after = before.clone()
        before[self.token_ids] = self.start.double()
        after[self.token_ids] = self.vectors.detach().double()
        return before, after

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.original(input_ids.clamp(max=self.original.num_embeddings - 1))
        for row, token_id in enumerate(self.token_ids.tolist()):
            embedded = torch.where((input_ids == token_id)[..., None], self.vectors[row].to(embedded.dtype), embedded)
        return embedded


@TECHNIQUES.register("textual-inversion")
class TextualInversion(Technique):
    kind = "textual-inversion"
    Options = TextualInversionOptions
    single_file_refused = (
        "a textual-inversion run is an embedding, not a model: A1111/ComfyUI load its <placeholder>.safetensors "
        "(see the README), and `export --merged` writes a diffusers pipeline that knows the word"
    )
    prior_preservation_refused = (
        "textual inversion trains only its new token, which class prompts do not contain, so the prior "
        "loss has no gradient to give"
    )

    @classmethod
    def validate_options(cls, raw: dict[str, Any], where: str) -> Any:
        for key in ("train_text_encoder", "text_encoder_learning_rate"):
            if key in raw:
                raise ConfigError(
                    f"{where}.{key}: textual inversion trains only its new token's embeddings; remove it "
                    "(`learning_rate` sets their rate, `text_encoders` which encoders learn the token)"
                )
        options = super().validate_options(raw, where)
        token = options.placeholder_token
        if not token or any(c.isspace() for c in token):
            raise ConfigError(f"{where}.placeholder_token: {token!r} is not allowed; expected one word without spaces, e.g. '<my-toy>'")
        if options.num_vectors < 1:
            raise ConfigError(f"{where}.num_vectors: {options.num_vectors!r} is not allowed; expected 1 or more")
        if not options.initializer_token.strip():
            raise ConfigError(f"{where}.initializer_token: empty; give a word the model knows, e.g. 'toy'")
        return options

    @classmethod
    def check_family(cls, options: Any, family: type[Model], where: str) -> None:
        super().check_family(options, family, where)
        if options.num_vectors > 1 and not expands_multi_vector_prompts(family):
            raise ConfigError(
                f"{where}.num_vectors: {family.pipeline_class_name} does not expand a multi-vector token in "
                f"prompts (it has no textual-inversion loader); use num_vectors: 1 on {family.family}"
            )

    # -- training ---------------------------------------------------------------------------------
    def tokens(self) -> list[str]:
        token = self.options.placeholder_token
        return [token] + [f"{token}_{i}" for i in range(1, self.options.num_vectors)]

    def encoders(self, model: Model) -> list[str]:
        return loaded_text_encoders(model, self.options.text_encoders or model.loaded_text_encoders)

    def make_trainable(self, model: Model) -> None:
        for name in self.encoders(model):
            tokenizer = model.tokenizers[tokenizer_name(name)]
            encoder = model.components[name]
            initializer = single_token_id(tokenizer, self.options.initializer_token, name)
            token_ids = add_new_tokens(tokenizer, self.tokens(), name)
            original = encoder.get_input_embeddings()
            start = original.weight[initializer].detach()[None].repeat(len(token_ids), 1)
            encoder.set_input_embeddings(NewTokenEmbedding(original, token_ids, start))

    # -- what it claims ---------------------------------------------------------------------------
    def claimed_components(self, model: Model) -> list[str]:
        return self.encoders(model)  # the new word's vectors, in each text encoder; the denoiser stays frozen

    def per_row_parameters(self) -> tuple[str, ...]:
        return ("*.vectors",)  # one learned vector per row (NewTokenEmbedding)

    def trained_invariants(self, model: Model, evidence: TrainedEvidence) -> list[CheckFailure]:
        """Besides the components: every vector of the new word, in every text encoder, got a
        gradient and moved."""
        failures = super().trained_invariants(model, evidence)
        tokens = self.tokens()
        for name, rows in sorted(evidence.rows.items()):
            for index, (gradient, moved) in enumerate(rows):
                where = f"{name}[{index}] ({tokens[index] if index < len(tokens) else index})"
                if gradient is False:
                    failures.append(CheckFailure("vector", where, "this vector of the new word never got a gradient"))
                if not moved:
                    failures.append(CheckFailure("vector", where, "this vector of the new word did not move"))
        return failures

    def check_captions(self, captions: list[str]) -> None:
        """A training set that never names the placeholder could not learn it."""
        token = self.options.placeholder_token
        if not any(token in caption for caption in captions):
            raise ConfigError(
                f"textual-inversion: no caption contains the placeholder {token!r}; write it into the captions "
                f"or set data.instance_prompt, e.g. 'a photo of {token}'"
            )

    def transform_caption(self, caption: str) -> str:
        """Captions spell the placeholder once; the text encoders see all its vectors (as prompts do
        in diffusers' pipelines). A caption that names it twice spells all vectors twice."""
        return caption.replace(self.options.placeholder_token, " ".join(self.tokens()))

    # -- outputs ----------------------------------------------------------------------------------
    def save(self, model: Model, out_dir: Path) -> dict[str, list[str]]:
        token, embedding_keys = self.options.placeholder_token, export_facts(model.family).embedding_keys
        files, community = {}, {}
        for name in self.encoders(model):
            vectors = model.components[name].get_input_embeddings().vectors.detach().float().cpu().contiguous()
            index = model.text_encoder_names.index(name)
            file = "learned_embeds.safetensors" if index == 0 else f"learned_embeds_{index + 1}.safetensors"
            atomic.save_tensors(out_dir / file, {token: vectors})
            files[name] = file
            community[embedding_keys[name]] = vectors
        community_file = f"{community_name(token)}.safetensors"
        atomic.save_tensors(out_dir / community_file, community)
        listing = {"placeholder_token": token, "tokens": self.tokens(), "files": files, "community_file": community_file}
        atomic.write_json(out_dir / LISTING_FILE, listing)
        return {"embeddings": [*files.values(), LISTING_FILE], "community": [community_file]}

    def loads_in(self, part: str, family: str) -> list[str]:
        """Which tools read the files of a record part (``outputs.<part>.loads_in`` of the record)."""
        diffusers = ["diffusers load_textual_inversion"] if expands_multi_vector_prompts(FAMILIES.get(family)) else []
        return ["A1111", "ComfyUI", *diffusers] if part == "community" else [*diffusers, "sdtune generate"]

    @classmethod
    def restore(cls, model: Model, run_dir: Path, options: dict[str, Any]) -> Model:
        """As training left it: the new tokens added and wrapped (:class:`NewTokenEmbedding`, starting
        from the initialiser), their vectors the learned ones."""
        from safetensors.torch import load_file

        technique = cls(options)
        technique.prepare(model)
        listing = json.loads((run_dir / LISTING_FILE).read_text())
        for name, file in listing["files"].items():
            learned = load_file(run_dir / file)[listing["placeholder_token"]]
            with torch.no_grad():
                model.components[name].get_input_embeddings().vectors.copy_(learned)
        return model

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        """Add the learned tokens to the pipeline's tokenizers and text encoders (what diffusers'
        ``load_textual_inversion`` does, for every family; the tests check both give the same images)."""
        from safetensors.torch import load_file

        listing = json.loads((run_dir / LISTING_FILE).read_text())
        for name, file in listing["files"].items():
            vectors = load_file(run_dir / file)[listing["placeholder_token"]]
            tokenizer, encoder = getattr(pipe, tokenizer_name(name)), getattr(pipe, name)
            add_embeddings(tokenizer, encoder, listing["tokens"], vectors, name)
        return pipe


def expands_multi_vector_prompts(family: type[Model]) -> bool:
    """Whether the family's diffusers pipeline loads textual inversions and spells a multi-vector
    token out in prompts (SD1/2, SDXL: yes; SD3: no)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    return issubclass(family.pipeline_class(), TextualInversionLoaderMixin)


def tokenizer_name(encoder: str) -> str:
    """The pipeline's tokenizer of a text encoder (text_encoder_2 → tokenizer_2), as diffusers names them."""
    return encoder.replace("text_encoder", "tokenizer")


def community_name(token: str) -> str:
    """The embedding's file name in A1111/ComfyUI (prompts there name an embedding by its file)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "embedding"


def single_token_id(tokenizer: Any, word: str, encoder: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(
            f"initializer_token: {word!r} is {len(ids)} tokens for the tokenizer of {encoder}; choose a word "
            "that is one token (the new vectors start from its embedding)"
        )
    return ids[0]


def add_new_tokens(tokenizer: Any, tokens: list[str], encoder: str) -> list[int]:
    """Add ``tokens`` to the tokenizer; their ids. A token it already has is an error, not reused."""
    present = [token for token in tokens if token in tokenizer.get_vocab() or _one_known_token(tokenizer, token)]
    if present:
        raise ConfigError(
            f"placeholder_token: {present[0]!r} is already a token of the tokenizer of {encoder}; choose a new "
            "word, e.g. '<my-toy>'"
        )
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(set(ids)) != len(tokens):
        raise RuntimeError(f"the tokenizer of {encoder} did not add {tokens} as new tokens (ids {ids})")
    return ids


def _one_known_token(tokenizer: Any, word: str) -> bool:
    """True when the tokenizer already reads ``word`` as one token of its vocabulary (CLIP's
    vocabulary spells words with an end-of-word mark, so ``word in vocab`` misses them)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def add_embeddings(tokenizer: Any, encoder: torch.nn.Module, tokens: list[str], vectors: torch.Tensor, name: str) -> None:
    """Add tokens with the given embedding rows to a plain tokenizer/text encoder pair."""
    ids = add_new_tokens(tokenizer, tokens, name)
    table = encoder.get_input_embeddings()
    rows = max(table.num_embeddings, max(ids) + 1)  # T5's table is padded beyond its vocabulary: never shrink it
    if rows > table.num_embeddings:
        encoder.resize_token_embeddings(rows, mean_resizing=False)
        table = encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[ids] = vectors.to(table.weight.device, table.weight.dtype)
