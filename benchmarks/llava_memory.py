"""Print the estimated GPU memory per device of DRAPE training with the llava-7b preset.

The numbers are an estimate from formulas (see drape/presets/llava_memory.py for the
assumptions), computed from the full-size architecture built on the meta device. Nothing
runs on a GPU.

    python benchmarks/llava_memory.py --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import logging

from drape.presets.llava import build_llava_architecture, load_llava_spec
from drape.presets.llava_memory import estimate_training_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="samples per device and step")
    parser.add_argument(
        "--seq-len", type=int, default=1024,
        help="LLM input positions per sample: template, soft prompts, 576 visual tokens, text",
    )
    parser.add_argument("--generators", type=int, default=1, help="prompt generators held (tasks seen)")
    args = parser.parse_args(argv)
    # open_clip logs a warning for every model built without pretrained weights.
    logging.basicConfig(level=logging.ERROR)

    spec = load_llava_spec("full")
    counts = build_llava_architecture("meta", "full").parameter_counts()
    print("Parameter counts (built on the meta device):")
    for name, count in counts.items():
        print(f"  {name:26s} {count:>14,d}")
    estimate = estimate_training_memory(spec, args.batch_size, args.seq_len, generators=args.generators)
    print(
        f"\nEstimated GPU memory per device, batch {args.batch_size} x {args.seq_len} positions, "
        "bf16 frozen models, gradient checkpointing:"
    )
    print(estimate.table())


if __name__ == "__main__":
    main()
