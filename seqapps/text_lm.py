"""``python -m seqapps.text_lm --out <folder> [--steps N]``: pretrain the small GPT-2 of
:mod:`seqapps.tasks.forecasting.text_lm` on the English text shipped with Python and its
packages (AutoTimes' offline stand-in for a pretrained LLM) and print its held-out loss before
and after. The folder must not exist; it is written whole or not at all."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from seqapps.errors import InputError
from seqapps.tasks.forecasting.autotimes_data import timestamp_corpus
from seqapps.tasks.forecasting.text_lm import pretrain_text_lm


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqapps.text_lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write (a transformers causal-LM folder)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # the timestamp sentences AutoTimes embeds join the tokenizer's text, so that they tokenize well
        report = pretrain_text_lm(args.out, steps=args.steps, n_layer=args.n_layer, n_embd=args.n_embd,
                                  n_head=args.n_head, seed=args.seed, extra_texts=timestamp_corpus())
    except InputError as err:
        print(f"seqapps.text_lm: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
