"""The ``--estimate`` of ``configs/lora-vs-qlora.yaml`` (SDXL base 1.0 at 1024 px): each technique's peak
memory with its frozen UNet in bf16, nf4 and int8, for docs/quantization.md.

As in ``benchmarks/card_estimates.py`` (whose architecture writer this uses), the SDXL configs are
written from their published ``config.json`` values, since this machine reaches no model hub; with
hub access ``sdtune train lora-vs-qlora --estimate`` prints the same numbers.

    python benchmarks/lora_vs_qlora_estimates.py --data DIR [--out benchmarks/results/lora_vs_qlora_estimates.json]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    sys.path.insert(0, str(HERE))
    from card_estimates import estimate_arguments, write_architecture

    args = estimate_arguments(__doc__.splitlines()[0])

    import sdtune
    from sdtune.config.shipped import shipped_config
    from sdtune.util import atomic

    folder = write_architecture("sdxl", Path(args.work) / "sdxl")
    experiment = sdtune.load_experiment(
        shipped_config("lora-vs-qlora"), [f"model.path={folder}", f"data.source={args.data}"]
    )
    results = {}
    for estimate in sdtune.estimate_memory(experiment):
        print(f"{estimate.describe()}\n", flush=True)
        results[estimate.technique] = {
            "quantize": dataclasses.asdict(experiment.techniques[estimate.technique].model.quantize),
            "total_bytes": estimate.total, "weights": estimate.weights, "text": estimate.describe(),
        }
    if args.out:
        atomic.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
