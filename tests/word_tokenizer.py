"""A real HF tokenizer with a fixed word vocabulary, for tests whose token ids are
predictable by hand: ids ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, then the special
markers, then the words in order (or in a seeded shuffle of them: another tokenizer of the
same words)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, Optional, Sequence


def word_vocab(words: Sequence[str], special: Sequence[str], seed: int = 0) -> Dict[str, int]:
    order = list(words)
    if seed:
        random.Random(seed).shuffle(order)
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *special])}
    for w in order:
        vocab.setdefault(w, len(vocab))
    return vocab


def save_word_tokenizer(out: Path, words: Sequence[str], special: Sequence[str], seed: int = 0,
                        chat_template: Optional[str] = None) -> Path:
    """Write the tokenizer (``PreTrainedTokenizerFast``, whitespace-split words) to ``out``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(word_vocab(words, special, seed), unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=list(special))
    if chat_template is not None:
        fast.chat_template = chat_template
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out
