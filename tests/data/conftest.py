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
    from tests.word_tokenizer import word_vocab, save_word_tokenizer

    out = tmp_path_factory.mktemp("wordtok")
    plain = save_word_tokenizer(out / "plain", WORDS, SPECIAL)
    chat = save_word_tokenizer(out / "chat", WORDS, SPECIAL, chat_template=CHAT_TEMPLATE)
    return {"plain": plain, "chat": chat, "vocab": word_vocab(WORDS, SPECIAL)}
