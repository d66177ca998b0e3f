"""``Tokenizer.decode_batch`` gives, in one call, the texts ``decode`` gives one by one:
for a word-level fast tokenizer (the backend's batch call), a SentencePiece model (byte
fallback, template markers), the same model saved for transformers and loaded as an HF
tokenizer, and an HF tokenizer that cleans up tokenization spaces (one ``decode`` per
sequence: the backend's text is not what ``decode`` returns)."""
import random

from aligner.data.tokenizer import HFTokenizer, load_tokenizer, train_sentencepiece
from tests.word_tokenizer import save_word_tokenizer


def sequences(tok, texts, seed=0):
    """Each text's ids, some with special ids, an empty one and random ids."""
    rng = random.Random(seed)
    out = [tok.encode(t) for t in texts]
    out += [[tok.eos_id] + ids + [tok.pad_id, tok.eos_id] for ids in out[:3]]
    out += [[], [rng.randrange(tok.vocab_size) for _ in range(40)], [rng.randrange(tok.vocab_size) for _ in range(3)]]
    return out


def check(tok, texts):
    seqs = sequences(tok, texts)
    one_by_one = [tok.decode(ids) for ids in seqs]
    assert tok.decode_batch(seqs) == one_by_one
    assert tok.decode_batch(tuple(tuple(s) for s in seqs)) == one_by_one  # any sequences of ids
    assert tok.decode_batch([]) == []
    return one_by_one


def test_word_level_fast_tokenizer(tmp_path):
    words = [f"w{i}" for i in range(50)]
    tok = load_tokenizer(save_word_tokenizer(tmp_path / "tok", words, ["<extra_id_0>"]))
    assert isinstance(tok, HFTokenizer) and tok._backend_decodes  # the backend's batch call runs
    texts = check(tok, ["w1 w2 w3", "w49 <extra_id_0> w0", "w7"])
    assert texts[0] == "w1 w2 w3"


def test_sentencepiece_and_its_hf_folder(tmp_path):
    data = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(30) for b in range(0, 30, 7)]
    sp = load_tokenizer(train_sentencepiece(data, tmp_path / "tok.model", vocab_size=400))
    texts = ["The answer is 1234.", "Reverse zebra! ümlaut", "<extra_id_1> What is 3 plus 4?", "  two  spaces "]
    decoded = check(sp, texts)
    assert decoded[:2] == texts[:2]
    hf = HFTokenizer(sp.save(tmp_path / "hf"))
    check(hf, texts)


def test_clean_up_spaces_decodes_one_by_one(tmp_path):
    from transformers import AutoTokenizer

    words = ["hello", ",", "world", ".", "it", "'s"]
    folder = save_word_tokenizer(tmp_path / "tok", words, [])
    fast = AutoTokenizer.from_pretrained(folder, clean_up_tokenization_spaces=True)
    fast.save_pretrained(folder)
    tok = load_tokenizer(folder)
    assert not tok._backend_decodes
    decoded = check(tok, ["hello , world .", "it 's"])
    assert decoded[:2] == ["hello, world.", "it's"]  # cleaned up, as decode does
