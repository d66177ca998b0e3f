"""One tokenizer interface over SentencePiece ``.model`` files and HF tokenizer folders.

``load_tokenizer(path)``: a ``.model`` file (or a folder holding ``tokenizer.model`` and no
``tokenizer.json``) is read with SentencePiece; any other folder with
``transformers.AutoTokenizer``. Both expose ``encode`` (no BOS / EOS added), ``decode``,
``decode_batch`` (the texts ``decode`` gives, in one call), ``vocab_size``, ``bos_id`` / ``eos_id`` / ``pad_id``, ``token_to_id`` and ``save(dir)``,
which writes files ``transformers.AutoTokenizer.from_pretrained(dir)`` loads (for
SentencePiece: ``tokenizer.model`` + a Llama tokenizer config).

:func:`train_sentencepiece` trains a small tokenizer (byte fallback, so any text
round-trips; digits split so numbers are written digit by digit) with the extra_id
template markers as single tokens.

:func:`tokenizer_hash` identifies a tokenizer by the bytes of the files that define it and
the ``config.json`` keys that choose its class (prepared datasets record it:
aligner.data.prepared).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

SPECIAL_TEMPLATE_TOKENS = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")


class Tokenizer:
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_batch(self, sequences: Sequence[Iterable[int]]) -> List[str]:
        """``[decode(ids) for ids in sequences]``, in one call where the backend has one."""
        return [self.decode(ids) for ids in sequences]

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def save(self, out_dir) -> Path:
        raise NotImplementedError

    chat_template: Optional[str] = None


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file):
        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: SentencePiece model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> List[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def decode_batch(self, sequences: Sequence[Iterable[int]]) -> List[str]:
        batch = [[int(i) for i in ids] for ids in sequences]
        return self.sp.decode(batch) if batch else []  # decode([]) is one empty sequence's text

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, out / "tokenizer.model")  # content only: the mode follows the umask
        piece = self.sp.id_to_piece
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": piece(self.bos_id),
            "eos_token": piece(self.eos_id),
            "pad_token": piece(self.pad_id),
            "unk_token": piece(self.sp.unk_id()),
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": True,
            "model_max_length": 4096,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (out / "special_tokens_map.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2))
        return out


class HFTokenizer(Tokenizer):
    def __init__(self, folder):
        from transformers import AutoTokenizer

        self.path = Path(folder)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.path))
        except Exception as exc:
            raise ValueError(f"{self.path}: cannot load an HF tokenizer ({exc})") from None
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else -1
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{self.path}: the tokenizer defines no eos_token")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.chat_template = getattr(self.tok, "chat_template", None)

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, sequences: Sequence[Iterable[int]]) -> List[str]:
        """Where ``decode`` returns the fast (Rust) backend's text unchanged (transformers'
        own ``decode``, no clean-up of tokenization spaces): the backend's ``decode_batch``,
        without transformers' conversions per call; else one ``decode`` per sequence."""
        if not self._backend_decodes:
            return [self.decode(ids) for ids in sequences]
        return self.tok._tokenizer.decode_batch([[int(i) for i in ids] for ids in sequences],
                                                skip_special_tokens=False)

    @property
    def _backend_decodes(self) -> bool:
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # another transformers layout: decode per sequence
            return False
        cls = type(self.tok)
        return (isinstance(self.tok, TokenizersBackend) and cls.decode is TokenizersBackend.decode
                and cls._decode is TokenizersBackend._decode and not self.tok.clean_up_tokenization_spaces)

    def token_to_id(self, token: str) -> Optional[int]:
        i = self.tok.convert_tokens_to_ids(token)
        return None if i is None or i == self.tok.unk_token_id else i

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        self.tok.save_pretrained(str(out))
        return out


def load_tokenizer(path) -> Tokenizer:
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.is_dir():
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            if not (p / "tokenizer.json").is_file() and (p / "tokenizer.model").is_file():
                return SentencePieceTokenizer(p / "tokenizer.model")
            return HFTokenizer(p)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
    raise FileNotFoundError(f"{p}: no tokenizer (expected a SentencePiece .model file or an HF tokenizer folder)")


# the files of an HF tokenizer folder that define how it tokenises (weights beside them do not)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_hash(tokenizer) -> str:
    """sha256 over the files ``tokenizer`` (a :class:`Tokenizer`, or its path) was loaded from:
    a SentencePiece ``.model`` file (its bytes), or those of :data:`TOKENIZER_FILES` an HF
    folder holds (name and bytes). The same files give the same hash wherever they are."""
    path = Path(getattr(tokenizer, "path", tokenizer))
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no tokenizer files to identify the tokenizer by")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    # transformers picks the tokenizer class from config.json's model_type when the tokenizer
    # files do not name one (e.g. Qwen2's class rebuilds a tokenizer.json as byte-level BPE):
    # the same files tokenise differently beside another model's config
    digest.update(b"config.json\0" + json.dumps(_tokenizer_class_keys(path), sort_keys=True).encode())
    return digest.hexdigest()


def _tokenizer_class_keys(folder: Path) -> dict:
    """The keys of ``folder/config.json`` that choose an HF tokenizer's class."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: config.get(k) for k in ("model_type", "tokenizer_class") if isinstance(config, dict)}


def train_sentencepiece(texts: Iterable[str], out_file, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a BPE SentencePiece model on ``texts``; deterministic for the same input."""
    import io

    import sentencepiece as spm

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        split_digits=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=list(SPECIAL_TEMPLATE_TOKENS),
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out_file.write_bytes(model.getvalue())
    return out_file
