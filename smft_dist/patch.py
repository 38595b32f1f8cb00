"""Knowledge patches: ``python -m smft_dist.patch {diff,apply,revert,merge,forget,show} ...``.

    diff   --base A --model B --out P        the rows B changed from A (two save_pretrained models, one base)
    apply  --model BASE --patch P --out M    M = BASE + P, bit for bit (a model that is not P's base is refused)
    revert --model M --patch P --out BASE    BASE = M - P, bit for bit
    merge  P1 P2 ... --out P [--policy refuse|sum|last]   rows changed by several patches: refused
                                             (default), base + the sum of the deltas, or the last patch's
    forget --patch P --fact ID|TEXT --out P2 [--include-shared]   drop the rows only that fact's steps
                                             trained (reporting the shared ones), or all of its rows
    show   P [--png F] [--model BASE --known FACTS.jsonl --tokenizer DIR]   what P changed, which facts
                                             trained which rows, which known facts read them

An smft / memory_ft run writes its patch to ``train.out_dir/patch``; per-step row sets (for forget
and show) need ``train.log_selected_slots=true``. M is a save_pretrained directory: generation loads
it with ``AutoModelForCausalLM.from_pretrained`` (or applies P in memory: ``patching.apply_to_model``).
"""

from __future__ import annotations

import argparse
import json

from smft_dist.patching import audit, ops
from smft_dist.patching.format import Patch
from smft_dist.train import USER_ERRORS


def _show(args) -> dict:
    p = Patch(args.patch)
    report = audit.summary(p, args.top)
    if args.model:
        if not (args.known and args.tokenizer):
            raise SystemExit("smft_dist.patch show: --model needs --known and --tokenizer")
        report["known_facts"] = audit.known_fact_reads(p, args.model, args.known, args.tokenizer, max_known=args.max_known, top=args.top)
    if args.png:
        report["png"] = str(audit.plot(p, args.png))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diff", help="the patch between two save_pretrained models of one base")
    d.add_argument("--base", required=True)
    d.add_argument("--model", required=True)
    d.add_argument("--out", required=True)
    for name in ("apply", "revert"):
        a = sub.add_parser(name, help=f"{name} a patch: a new save_pretrained directory")
        a.add_argument("--model", required=True)
        a.add_argument("--patch", required=True)
        a.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="several patches of one base into one")
    m.add_argument("patches", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--policy", choices=ops.POLICIES, default="refuse")
    f = sub.add_parser("forget", help="drop the rows only one fact's steps trained")
    f.add_argument("--patch", required=True)
    f.add_argument("--fact", required=True, help="a fact id (show lists them) or text found in exactly one fact")
    f.add_argument("--out", required=True)
    f.add_argument("--include-shared", action="store_true", help="also drop the rows other facts' steps trained too")
    s = sub.add_parser("show", help="audit a patch")
    s.add_argument("patch")
    s.add_argument("--top", type=int, default=5)
    s.add_argument("--png", help="write a picture of where in each table the patch wrote")
    s.add_argument("--model", help="the base model: report which known facts read the changed rows")
    s.add_argument("--known", help="known facts (facts jsonl) for --model")
    s.add_argument("--tokenizer", help="tokenizer directory for --model")
    s.add_argument("--max-known", type=int, default=256)
    args = p.parse_args(argv)
    try:
        if args.cmd == "diff":
            out = ops.diff(args.base, args.model, args.out)
            print(f"patch: {Patch(out).describe()}")
        elif args.cmd in ("apply", "revert"):
            out = ops.apply(args.model, args.patch, args.out, reverse=args.cmd == "revert")
            print(f"{args.cmd}: {out} ({args.model} {'+' if args.cmd == 'apply' else '-'} {args.patch})")
        elif args.cmd == "merge":
            out, shared = ops.merge(args.patches, args.out, args.policy)
            print(f"merge: {Patch(out).describe()}; rows changed by several patches: {shared or 'none'} (policy {args.policy})")
        elif args.cmd == "forget":
            print(json.dumps(ops.forget(args.patch, args.fact, args.out, args.include_shared), indent=1))
        else:
            print(json.dumps(_show(args), indent=1))
    except USER_ERRORS as e:
        raise SystemExit(f"smft_dist.patch: {e}") from None


if __name__ == "__main__":
    main()
