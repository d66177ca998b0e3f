"""A tiny random HF Llama with a word-level tokenizer (ids predictable by hand), saved as an
HF folder: ``init.hf`` for the trainers and the independent reference for parity tests."""
import json

import pytest

WORDS = ("what is the sum of two and three it five four six seven no yes maybe i think so answer"
         " tell me a story once upon time there was cat dog").split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3
VOCAB = 64
# prompt/completion rows over WORDS (SPIN, distillation)
COMPLETION_ROWS = [
    {"prompt": "what is the sum of two and three", "completion": "five"},
    {"prompt": "tell me a story", "completion": "once upon a time there was a cat"},
    {"prompt": "is it a dog", "completion": "yes it is"},
    {"prompt": "what is six and seven", "completion": "i think so"},
]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_hf")
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                      initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return {"dir": out, "vocab": vocab}


@pytest.fixture(scope="session")
def teacher_hf(tmp_path_factory, tiny_hf):
    """A second tiny HF Llama with tiny_hf's vocabulary and another architecture (a
    distillation teacher); its folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("teacher_hf")
    AutoTokenizer.from_pretrained(tiny_hf["dir"]).save_pretrained(out)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                      initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """Tests that build models in the pytest process itself (world size 1) leave no process
    group to the tests after them (those check that nothing initialises one)."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from aligner.parallel import destroy

        destroy()
