"""Small GPT-2 language models for AutoTimes, made offline: randomly initialised, or pretrained
here on English text that ships with Python and its installed packages.

AutoTimes' claim is that a *pretrained* LLM, frozen, is a better forecaster's backbone than no LM.
No pretrained LLM can be downloaded on these machines, so :func:`pretrain_text_lm` makes the
nearest stand-in: a GPT-2 of the tiny default size trained as a causal LM (next-token
cross-entropy) on the text at hand — the Python language reference topics (``pydoc_data``,
about 0.75 MB of English prose) and the descriptions in the installed packages' metadata (a few
MB of English and Markdown) — with a byte-level BPE tokenizer trained on the same text plus
AutoTimes' timestamp sentences. It is tiny and sees a few MB, not the trillions of tokens of an
LLM: a test of the mechanism (does a frozen LM's text knowledge transfer?), not of the paper's
scale. The folder it writes is an ordinary ``transformers`` folder
(``module.net.lm.path=<folder>``).

``python -m seqapps.text_lm --out <folder> [--steps N]`` (the shell's command) pretrains one and
prints its held-out loss before and after.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from seqapps.errors import InputError

EOS = "<|endoftext|>"


def local_text_corpus(min_chars: int = 200) -> list[str]:
    """English text that ships with this Python: the language reference topics (``pydoc_data``)
    and the installed packages' long descriptions, one document each (those of ``min_chars``
    characters or more), in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics)]
    descriptions = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        text = (meta.get_payload() or meta.get("Description") or "").strip()
        name = meta.get("Name") or ""
        if len(text) >= min_chars and name.lower() not in descriptions:
            descriptions[name.lower()] = text
    docs += [descriptions[name] for name in sorted(descriptions)]
    return [d for d in docs if len(d) >= min_chars]


def byte_bpe_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus`` (``EOS`` its only special token), as a
    ``transformers`` fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)


def gpt2(tokenizer, n_layer: int, n_embd: int, n_head: int, n_positions: int, seed: int):
    """A randomly initialised GPT-2 (no dropout) for ``tokenizer``'s vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def save_lm_folder(model, tokenizer, folder: str | Path, files: dict[str, str]) -> bool:
    """Write ``model``, ``tokenizer`` and ``files`` (name -> text, e.g. a README) to ``folder``
    under a temporary name and rename it into place. Returns whether it did: a folder that is
    there already (another process wrote it first) is kept, and this one dropped."""
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        hf_logging.disable_progress_bar()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        for name, text in files.items():
            (tmp / name).write_text(text)
        try:
            tmp.rename(folder)
            return True
        except OSError:  # there already
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _blocks(ids: torch.Tensor, block: int) -> torch.Tensor:
    """A 1-D token stream -> ``[N, block]`` non-overlapping training blocks (the model shifts the
    labels itself: each block's tokens predict their successors within it)."""
    n = len(ids) // block
    return ids[:n * block].view(n, block)


@torch.no_grad()
def _mean_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [model(input_ids=blocks[i:i + batch], labels=blocks[i:i + batch]).loss.item()
              for i in range(0, len(blocks), batch)]
    model.train()
    return float(sum(losses) / len(losses))


def pretrain_text_lm(folder: str | Path, steps: int = 2000, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                     n_positions: int = 256, vocab_size: int = 4096, block: int = 128, batch: int = 16,
                     lr: float = 2e-3, seed: int = 0, corpus: Sequence[str] | None = None,
                     extra_texts: Sequence[str] = ()) -> dict:
    """Pretrain a GPT-2 as a causal LM on ``corpus`` (default :func:`local_text_corpus`) for
    ``steps`` AdamW steps of ``batch`` blocks of ``block`` tokens (cosine decay after 5 % warm-up),
    and write it with its tokenizer to ``folder``. ``extra_texts`` (e.g. timestamp sentences) join
    the tokenizer's training text only. 5 % of the documents are held out; returns the report
    (held-out loss before and after, tokens seen, seconds), also written to ``pretraining.json``."""
    if steps < 1 or block < 8 or block > n_positions:
        raise InputError(f"pretrain_text_lm: steps={steps}, block={block}, n_positions={n_positions}; need steps >= 1 "
                         "and 8 <= block <= n_positions")
    if Path(folder).exists():
        raise InputError(f"pretrain_text_lm: '{folder}' exists; give a new folder (nothing was written)")
    docs = list(corpus if corpus is not None else local_text_corpus())
    if len(docs) < 2:
        raise InputError("pretrain_text_lm: the corpus needs at least two documents (one is held out)")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=generator).tolist()
    n_held = max(1, len(docs) // 20)
    held, train = [docs[i] for i in order[:n_held]], [docs[i] for i in order[n_held:]]
    tokenizer = byte_bpe_tokenizer(train + list(extra_texts), vocab_size)

    def stream(texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor(tokenizer(EOS.join(texts))["input_ids"], dtype=torch.long)

    train_blocks, held_blocks = _blocks(stream(train), block), _blocks(stream(held), block)[:64]
    if len(train_blocks) < batch or len(held_blocks) < 1:
        raise InputError(f"pretrain_text_lm: the corpus gives {len(train_blocks)} training blocks of {block} tokens "
                         f"and {len(held_blocks)} held out; give more text or a smaller block")
    model = gpt2(tokenizer, n_layer, n_embd, n_head, n_positions, seed)
    before = _mean_loss(model, held_blocks, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0.0, s - warmup) / max(1, steps - warmup))))))
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(train_blocks), (batch,), generator=generator)
        loss = model(input_ids=train_blocks[pick], labels=train_blocks[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    report = {"held_out_loss_before": before, "held_out_loss_after": _mean_loss(model, held_blocks, batch),
              "steps": steps, "tokens_seen": steps * batch * block, "train_tokens": int(train_blocks.numel()),
              "documents": len(docs), "seconds": round(time.perf_counter() - start, 1),
              "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "vocab_size": len(tokenizer), "seed": seed}
    readme = ("A GPT-2 pretrained by seqapps (seqapps.tasks.forecasting.text_lm) as a causal LM on English text "
              "shipped with Python and its installed packages, for AutoTimes' frozen-LM experiments.\n\n"
              + "".join(f"- {k}: {v}\n" for k, v in report.items()))
    if not save_lm_folder(model.eval(), tokenizer, folder,
                          {"README.md": readme, "pretraining.json": json.dumps(report, indent=2)}):
        raise InputError(f"pretrain_text_lm: '{folder}' appeared while training (another run?); this model was "
                         "not written")
    return report
