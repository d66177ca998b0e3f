import pytest

from aligner.data.datasets import DEFAULT_SYSTEM

SPECIAL = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "<user>", "<assistant>", "<system>"]
WORDS = ["System", "User", "Assistant", "be", "nice", "hi", "there", "hello", "friend", "bye", "fine", "ok",
         "good", "bad", "what", "is", "2", "4"] + DEFAULT_SYSTEM.split()
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A real HF tokenizer with a fixed word vocabulary: ids are predictable by hand.

    ids: <pad> 0, <unk> 1, <s> 2, </s> 3, then the special markers, then WORDS in order.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + SPECIAL)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=SPECIAL)
    out = tmp_path_factory.mktemp("wordtok")
    fast.save_pretrained(out)
    plain = out / "plain"
    fast.save_pretrained(plain)
    fast.chat_template = CHAT_TEMPLATE
    chat = out / "chat"
    fast.save_pretrained(chat)
    return {"plain": plain, "chat": chat, "vocab": vocab}
