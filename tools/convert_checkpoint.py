"""Converts a Hugging Face checkpoint directory (or a GGUF file) into a kunjax orbax directory.

    python -m tools.convert_checkpoint --src=/models/Llama-3.2-1B --dst=/models/llama-1b-orbax --dtype=bfloat16

The orbax directory holds kunjax_config.json, the tokenizer files and the parameters in kunjax's
per-layer layout, so serving restores it without re-transposing any weight.
"""

from __future__ import annotations

import os

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing the module for its
    functions never clashes with another tool's flags."""
    flags.DEFINE_string("src", None, "Hugging Face checkpoint directory or .gguf file", required=True)
    flags.DEFINE_string("dst", None, "output orbax directory", required=True)
    flags.DEFINE_string("dtype", "float32", "float32 | bfloat16: dtype of the saved parameters")


def convert(src: str, dst: str, dtype: str = "float32") -> None:
    import numpy as np

    from kunjax.io.checkpoints.orbax_io import save_orbax
    from kunjax.io.loader import load_model, parse_dtype

    dt = parse_dtype(dtype)
    # Keep tensors on the host: the converter needs no accelerator memory.
    lm = load_model(src, dtype=dt, place=lambda a: np.asarray(a).astype(dt))
    save_orbax(dst, lm.config, lm.params, tokenizer_dir=src if os.path.isdir(src) else None,
               chat_template=lm.chat_template)


def main(argv):
    del argv
    convert(FLAGS.src, FLAGS.dst, FLAGS.dtype)
    print(f"wrote {FLAGS.dst}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
