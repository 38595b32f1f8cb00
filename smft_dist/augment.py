"""New knowledge to training data: ``python -m smft_dist.augment --kind facts|documents --input F --out O.jsonl``.

``facts``: QA pairs (``--schema`` qa, facts, triviaqa, nq_open or simpleqa) -> {fact, paraphrases,
question, answer}; ``documents``: text (``--schema`` text or dclm) -> one {document, augmentations}
line per chunk. Rewrites come from a local HF instruct model (``--model DIR``), ``--batch-size``
units at a time, or the templates (``--model template``); a fact's model texts that miss its answer
or subject are rejected and, after ``--rounds`` tries, the templates stand in. Each line records its
source (with kept / rejected counts); the totals and the rate are printed at the end. Rerunning on
an existing output resumes it. The output is the ``facts`` / ``documents`` source of ``data.continual``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from smft_dist.config import ConfigError, SourceConfig
from smft_dist.data.rewriters import (AugmentConfig, HFRewriter, TemplateRewriter, augment, document_units, fact_units, make_documents, make_facts,
                                    written_units)
from smft_dist.data.schemas import DataError
from smft_dist.data.sources import load_records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", required=True, choices=("facts", "documents"))
    p.add_argument("--input", required=True, help="local file / directory / glob, or a hub dataset name")
    p.add_argument("--schema", default=None, help="input schema (default: qa for facts, text for documents)")
    p.add_argument("--split", default="train", help="hub split")
    p.add_argument("--max-examples", type=int, default=None, help="first n input records only")
    p.add_argument("--out", required=True, help="output jsonl (resumed when it exists)")
    p.add_argument("--model", default="template", help="local HF causal LM directory, or 'template'")
    p.add_argument("-n", type=int, default=64, help="paraphrases per fact / augmentations per chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="units generated together; prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--max-chars", type=int, default=400, help="rewrites longer than this and than twice their source are dropped")
    p.add_argument("--rounds", type=int, default=3, help="generation tries (a fact's statement, then the paraphrases) before the templates fill in")
    p.add_argument("--chunk-words", type=int, default=120, help="documents: words per chunk at most")
    p.add_argument("--limit", type=int, default=None, help="stop after this many output lines")
    args = p.parse_args(argv)
    cfg = AugmentConfig(n=args.n, seed=args.seed, max_chars=args.max_chars, rounds=args.rounds, chunk_words=args.chunk_words,
                        batch=args.batch_size)
    facts = args.kind == "facts"
    schema = args.schema or ("qa" if facts else "text")
    try:
        for name, value in (("-n", cfg.n), ("--max-chars", cfg.max_chars), ("--chunk-words", cfg.chunk_words), ("--batch-size", args.batch_size)):
            if value <= 0:
                raise ConfigError(f"{name}: must be positive")
        allowed = ("qa", "facts", "triviaqa", "nq_open", "simpleqa") if facts else ("text", "dclm")
        if schema not in allowed:
            raise ConfigError(f"--schema: {schema!r} cannot become {args.kind} (choose from {', '.join(allowed)})")
        src = SourceConfig(path=args.input, schema=schema, split=args.split, max_examples=args.max_examples)
        records = load_records(src, "qa" if facts else "text")
        units = fact_units(records, args.input) if facts else document_units(records, args.input, cfg.chunk_words)
        if args.model == "template":
            rewriter = TemplateRewriter()
        else:
            try:
                rewriter = HFRewriter(args.model, args.batch_size, args.max_new_tokens, args.temperature)
            except (OSError, ValueError) as e:
                raise ConfigError(f"--model: cannot load {args.model!r} ({str(e).strip().splitlines()[0]})") from None
        before, start = len(written_units(Path(args.out))), time.perf_counter()
        lines = augment(units, make_facts if facts else make_documents, rewriter, cfg, args.out, args.limit)
        seconds = time.perf_counter() - start
        totals = Counter()
        for source in written_units(Path(args.out)):
            totals.update({k: int(source.get(k, 0)) for k in ("kept", "rejected", "template_statement", "template_fill")})
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise SystemExit(f"smft_dist.augment: {e}") from None
    print(f"augment: {lines} {args.kind} lines in {args.out} ({rewriter.name}, n={cfg.n}); this run wrote {lines - before} "
          f"in {seconds:.0f} s ({60 * (lines - before) / max(seconds, 1e-9):.1f} per minute)", flush=True)
    if facts:
        print(f"augment: model texts kept {totals['kept']}, rejected {totals['rejected']} (missing the answer or subject); "
              f"template statements {totals['template_statement']}, template paraphrases {totals['template_fill']}", flush=True)
    else:
        print(f"augment: template augmentations {totals['template_fill']}", flush=True)


if __name__ == "__main__":
    main()
