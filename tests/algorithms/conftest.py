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
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_hf")
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    save_llama(out, seed=0, hidden_size=32, intermediate_size=64, num_key_value_heads=2, initializer_range=0.1)
    return {"dir": out, "vocab": vocab}


def save_llama(out, seed, **shape):
    """A random tiny HF Llama over the word vocabulary (ids of SPECIAL fixed), saved to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                 rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                 tie_word_embeddings=False, **shape)).save_pretrained(out)


@pytest.fixture(scope="session")
def teacher_hf(tmp_path_factory, tiny_hf):
    """A second tiny HF Llama with tiny_hf's vocabulary and another architecture (a
    distillation teacher); its folder."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("teacher_hf")
    AutoTokenizer.from_pretrained(tiny_hf["dir"]).save_pretrained(out)
    save_llama(out, seed=1, hidden_size=48, intermediate_size=96, num_key_value_heads=4, initializer_range=0.2)
    return str(out)


def adam_run(out_dir, lr, **trainer):
    """The ``optim`` and ``trainer`` sections of a parity run: Adam without weight decay or
    clipping at a constant ``lr``, global batch 4 in micro-batches of 2, nothing exported."""
    return {"optim": {"name": "adam", "lr": lr, "weight_decay": 0.0, "clip_grad": 0.0, "warmup_steps": 0,
                      "schedule": "constant", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
            "trainer": dict({"global_batch_size": 4, "micro_batch_size": 2, "out_dir": out_dir, "export_hf": False,
                             "progress": False, "tensorboard": False, "resume": False}, **trainer)}


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
