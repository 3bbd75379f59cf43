"""Orthogonal fine-tuning through peft: OFT (Qiu et al. 2023; peft's OFTv2 form, Qiu et al. 2025) and
BOFT (butterfly OFT, Liu et al. 2024).

Both multiply a frozen layer by a learned block-diagonal orthogonal matrix R (Cayley transform of a
skew-symmetric one; BOFT: a product of butterfly-permuted block-diagonal ones, times a per-output
scale). peft rotates the layer's *input*: ``y = W (Rᵀ x)``, i.e. W' = W Rᵀ.

No community file is written. The LyCORIS loader (and ComfyUI's ``oft``/``boft`` adapters, which
follow it) reads ``oft_blocks`` as a rotation of the layer's *output* rows: W' = Rᵀ W (LyCORIS
``functional/diag_oft.py``: ``einsum("k n m, k n ... -> k m ...", r, W.view(blocks, size, ...))``). An
input rotation is not an output rotation of the same layer in general (W Rᵀ = R'ᵀ W needs
R' = W R W⁻¹, neither orthogonal nor block-diagonal, nor defined for a non-square W), so no setting of
peft's options maps to that layout; peft's default Cayley–Neumann series is not even exactly
orthogonal. The peft files load in ``sdtune generate`` and peft; ``sdtune export --merged`` and
``--single-file`` fold the rotation into the weights, which every tool reads.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdtune.config import ConfigError
from sdtune.models import Model
from sdtune.techniques.adapter import AdapterTechnique
from sdtune.techniques.base import TECHNIQUES


class OrthogonalTechnique(AdapterTechnique):
    """An orthogonal adapter: peft's files only (see the module docstring for why no community file)."""

    alpha_field = None
    default_peft_args: dict[str, Any] = {}

    @classmethod
    def complete_peft_args(cls, peft_args: dict[str, Any], given: set[str]) -> dict[str, Any]:
        return peft_args

    @classmethod
    def check_options(cls, options: Any, where: str) -> None:
        if options.init_from is not None:
            raise ConfigError(
                f"{where}.init_from: {cls.kind} has no kohya/LyCORIS file to start from (see the README); remove init_from"
            )

    def save(self, model: Model, out_dir: Path) -> dict[str, list[str]]:
        return {"adapter": self._save_peft(self._adapted_states(model), out_dir)}

    def loads_in(self, part: str, family: str) -> list[str]:
        return ["sdtune generate", "peft inject_adapter_in_model + set_peft_model_state_dict"]


@TECHNIQUES.register("oft")
class OFT(OrthogonalTechnique):
    """peft ``OFTConfig``: ``oft_block_size`` (peft's default 32) or ``rank`` (= ``r``, the number of
    blocks per layer; giving it sets ``oft_block_size: 0``, as peft wants exactly one of the two),
    ``coft``/``eps``, ``block_share``, ``use_cayley_neumann``, ``module_dropout``…"""

    kind = "oft"
    peft_config_name = "OFTConfig"

    @classmethod
    def complete_peft_args(cls, peft_args: dict[str, Any], given: set[str]) -> dict[str, Any]:
        if peft_args.get("r") and "oft_block_size" not in given:  # the blocks are counted, not sized
            peft_args["oft_block_size"] = 0
        return peft_args


@TECHNIQUES.register("boft")
class BOFT(OrthogonalTechnique):
    """peft ``BOFTConfig``: ``boft_block_size`` or ``boft_block_num`` (giving the number sets
    ``boft_block_size: 0``, as peft wants exactly one), ``boft_n_butterfly_factor``, ``boft_dropout``…
    (peft's defaults: block size 4, one butterfly factor)."""

    kind = "boft"
    peft_config_name = "BOFTConfig"

    @classmethod
    def complete_peft_args(cls, peft_args: dict[str, Any], given: set[str]) -> dict[str, Any]:
        if peft_args.get("boft_block_num") and "boft_block_size" not in given:
            peft_args["boft_block_size"] = 0
        return peft_args

    def make_trainable(self, model: Model) -> None:
        factor = self.options.peft.get("boft_n_butterfly_factor", 1)
        if factor > 1 and not _butterfly_kernel_available():
            # peft would silently train with factor 1 instead (and its files would not load elsewhere)
            raise ConfigError(
                f"boft_n_butterfly_factor: {factor} needs peft's fbd_cuda extension (a CUDA GPU, nvcc and "
                "ninja), which does not load here; without it peft trains factor 1; set boft_n_butterfly_factor: 1"
            )
        with _without_kernel_warnings():
            super().make_trainable(model)

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        factor = options.get("peft", {}).get("boft_n_butterfly_factor", 1)
        if factor > 1 and not _butterfly_kernel_available():  # peft would build factor-1 layers the file does not fit
            raise ConfigError(
                f"{run_dir}: BOFT with boft_n_butterfly_factor {factor} loads only where peft's fbd_cuda extension "
                "does (a CUDA GPU, nvcc, ninja); run `sdtune export --merged` there to use it elsewhere"
            )
        with _without_kernel_warnings():
            return super().load_into(pipe, run_dir, options)


def _butterfly_kernel_available() -> bool:
    from peft.tuners.boft.layer import get_fbd_cuda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_fbd_cuda() is not None


@contextlib.contextmanager
def _without_kernel_warnings() -> Iterator[None]:
    """peft warns on every BOFT layer that its CUDA extension did not load (and that it uses one
    butterfly factor): sdtune has checked that already, so the warnings say nothing new."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to load the CUDA extension")
        warnings.filterwarnings("ignore", message="Setting boft_n_butterfly_factor to 1")
        yield
