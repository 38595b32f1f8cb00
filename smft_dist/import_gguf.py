"""A GGUF file as a ``save_pretrained`` directory: ``python -m smft_dist.import_gguf --gguf FILE --out DIR``.

Writes fp32 weights and the tokenizer, the directory ``smft_dist.retrofit --model`` and
``smft_dist.evaluate --model`` read. Needs the ``gguf`` package (``pip install gguf==0.19.0``); an
architecture the retrofit cannot represent is refused in one line naming the field.
"""

from __future__ import annotations

import argparse

from smft_dist.config import ConfigError
from smft_dist.model.from_gguf import load_gguf


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="output directory (save_pretrained + tokenizer)")
    args = p.parse_args(argv)
    try:
        model, tokenizer = load_gguf(args.gguf)
    except (ConfigError, OSError) as e:
        raise SystemExit(f"smft_dist.import_gguf: {str(e).strip().splitlines()[0]}") from None
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    c = model.config
    print(f"import_gguf: {args.gguf} -> {args.out}: {c.model_type}, {c.num_hidden_layers} layers, dim {c.hidden_size}, "
          f"vocab {c.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (fp32)", flush=True)


if __name__ == "__main__":
    main()
