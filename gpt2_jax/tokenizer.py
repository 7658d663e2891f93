"""Tokenizers: one interface over Hugging Face tokenizer directories and SentencePiece models.

Supported: GPT-2 byte-level BPE (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``), BERT-style
``vocab.txt`` (as the Chinese GPT-2 models use) and SentencePiece ``.model`` files. Every tokenizer
has ``[BOS] [SEP] [EOS] [PAD]``; a training example is ``[BOS] title [SEP] keywords [SEP] text [EOS]``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer
from transformers import BertTokenizerFast, GPT2TokenizerFast, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

from gpt2_jax.errors import GPT2JaxError, first_line
from gpt2_jax.text import CJK

SPECIAL_TOKENS = ("[BOS]", "[SEP]", "[EOS]", "[PAD]")
SP_MODEL_FILE = "spm.model"
SP_SPECIALS_FILE = "special_tokens.json"  # beside a SentencePiece model: the ids of the four special tokens
_HF_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
_LOOKED_FOR = "tokenizer.json, vocab.json + merges.txt, vocab.txt or one *.model (SentencePiece)"
# CJK ideographs and punctuation, full-width forms and the supplementary ideograph planes (not Hangul:
# Korean separates words with spaces).
_CJK_GAP = re.compile(f"(?<=[{CJK}]) +(?=[{CJK}])")


class Tokenizer:
    """A tokenizer with ``[BOS] [SEP] [EOS] [PAD]``; ``len(tok)`` counts added tokens (the embedding size)."""

    kind: str  # "hf" or "sentencepiece"
    base_vocab_size: int  # the vocabulary before special tokens were added
    vocab_size: int  # including added tokens
    special_ids: dict[str, int]  # "[BOS]" -> id, ...

    @property
    def bos_id(self) -> int:
        return self.special_ids["[BOS]"]

    @property
    def sep_id(self) -> int:
        return self.special_ids["[SEP]"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["[EOS]"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["[PAD]"]

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added, but ``[SEP]`` etc. in the text map to their ids."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def save(self, out_dir: str | Path) -> Path:
        """Write the tokenizer files so that ``load_tokenizer(out_dir)`` gives identical ids."""
        raise NotImplementedError

    def format_prompt(self, title: str, keywords: str | Sequence[str], max_tokens: int | None = None) -> list[int]:
        """``[BOS] title [SEP] keywords [SEP]``: what generation continues from. With ``max_tokens``, the
        last keywords are dropped until it fits, as training does (data.batches.prompt_limit); the title stays whole.
        Without a title and keywords, ``[EOS]``: plain-text documents are trained as ``[EOS] text [EOS]``."""
        words = keywords.split() if isinstance(keywords, str) else [w for k in keywords for w in k.split()]
        if not title and not words:
            return [self.eos_id]
        title_ids = self.encode(title)
        while True:
            ids = [self.bos_id, *title_ids, self.sep_id, *self.encode(" ".join(words)), self.sep_id]
            if max_tokens is None or len(ids) <= max_tokens or not words:
                return ids
            words.pop()

    def format_example(self, title: str, keywords: str | Sequence[str], text: str) -> list[int]:
        """``[BOS] title [SEP] keywords [SEP] text [EOS]`` (``[EOS] text [EOS]`` without title and keywords):
        one training example, as data.batches.Batches assembles it."""
        return [*self.format_prompt(title, keywords), *self.encode(text), self.eos_id]


class HFTokenizer(Tokenizer):
    """A transformers fast tokenizer (``.hf``) with the special tokens registered as special added tokens."""

    kind = "hf"

    def __init__(self, hf):
        self.hf = hf
        self.base_vocab_size = hf.vocab_size
        # Named roles, so that the saved tokenizer (and a model exported with it) has bos/eos/pad ids set.
        # A token already in the vocabulary (BERT's [SEP], [PAD]) keeps its id.
        hf.add_special_tokens(dict(zip(("bos_token", "sep_token", "eos_token", "pad_token"), SPECIAL_TOKENS)))
        self.special_ids = {t: hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.vocab_size = len(hf)
        # WordPiece decoding puts a space between all tokens; Chinese text has none between characters.
        self._join_cjk = type(hf.backend_tokenizer.model).__name__ == "WordPiece"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The Rust tokenizer directly: no [CLS]/[SEP] wrapping, no max-length warnings, parallel batches;
        # encode_batch_fast gives encode_batch's ids without computing offsets (about a quarter less time).
        return [e.ids for e in self.hf.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _CJK_GAP.sub("", text) if self._join_cjk else text

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        self.hf.save_pretrained(out)
        write_hf_tokenizer(self.hf.backend_tokenizer, out, self.special_ids, unk_token=self.hf.unk_token)
        return out


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.sp``); special tokens it lacks get ids after its vocabulary."""

    kind = "sentencepiece"

    def __init__(self, model_file: Path):
        self.model_file = model_file
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise GPT2JaxError(f"{model_file}: not a readable SentencePiece model ({first_line(e)})") from None
        self.base_vocab_size = n = self.sp.get_piece_size()
        specials_file = model_file.parent / SP_SPECIALS_FILE
        if specials_file.is_file():
            self.special_ids = _read_special_ids(specials_file, self.sp)
        else:
            # Pieces the model has (user-defined symbols) keep their ids; the rest follow the vocabulary.
            self.special_ids = {}
            for t in SPECIAL_TOKENS:
                i = self.sp.piece_to_id(t)
                self.special_ids[t] = i if self.sp.id_to_piece(i) == t else n + sum(
                    j >= n for j in self.special_ids.values())
        self.vocab_size = max(n, *(i + 1 for i in self.special_ids.values()))
        self._id_to_special = {i: t for t, i in self.special_ids.items()}
        # We split on the special strings ourselves: then they are atomic whether or not the model
        # has them, and "a [SEP] b" encodes exactly like format_example's separately encoded parts.
        self._split = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """As the exported tokenizer.json decodes: the text between special tokens is decoded as one run,
        a run's leading "▁" is a space unless it starts the text, and special tokens are written as is."""
        parts, run = [], []

        def flush():
            if run:
                text = self.sp.decode(run)
                if parts and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run.clear()

        for i in map(int, ids):
            if i not in self._id_to_special:
                run.append(i)
            elif not skip_special_tokens:
                flush()
                parts.append(self._id_to_special[i])
        flush()
        return "".join(parts)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() != self.model_file.parent.resolve():  # saving in place keeps the model as it is
            shutil.copyfile(self.model_file, out / SP_MODEL_FILE)
        (out / SP_SPECIALS_FILE).write_text(json.dumps(self.special_ids, indent=2) + "\n")
        # No unk_token: transformers would drop it as special when decoding, where SentencePiece writes " ⁇ ".
        write_hf_tokenizer(_sentencepiece_to_rust(self.model_file), out, self.special_ids)
        return out


class _SpmToRust(SpmConverter):
    """transformers' SentencePiece converter with byte fallback, a run-wise leading-space rule as
    SentencePiece applies it to each piece of text we encode, and a decoder that undoes both."""

    handle_byte_fallback = True

    def normalizer(self, proto):
        # SentencePiece's remove_extra_whitespaces: no leading or trailing spaces, runs of spaces as one.
        # Spaces only: a newline the normalisation rule keeps is a piece of its own.
        steps = [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
        charsmap = proto.normalizer_spec.precompiled_charsmap
        return normalizers.Sequence(([normalizers.Precompiled(charsmap)] if charsmap else []) + steps)

    def pre_tokenizer(self, replacement, add_prefix_space):
        # "always": every piece of text between special tokens starts a word, as each part we encode does.
        return pre_tokenizers.Metaspace(replacement=replacement, prepend_scheme="always")

    def decoder(self, replacement, add_prefix_space):
        spec = self.proto.trainer_spec  # an unknown piece reads as SentencePiece writes it: " ⁇ "
        return decoders.Sequence([decoders.Replace(spec.unk_piece, spec.unk_surface), decoders.Replace("\u2581", " "),
                                  decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])


def _sentencepiece_to_rust(model_file: Path) -> RustTokenizer:
    class Source:  # what the converter reads of a slow tokenizer
        vocab_file = str(model_file)
        add_prefix_space = True
        legacy = False

    return _SpmToRust(Source()).converted()


def write_hf_tokenizer(backend: RustTokenizer, out: Path, special_ids: dict[str, int], *, unk_token=None) -> None:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` that `AutoTokenizer`
    (transformers 4 and 5) loads as a generic fast tokenizer giving our ids: `[BOS] [SEP] [EOS] [PAD]`
    registered as special tokens with their roles, and no post-processor (a BERT vocabulary's would wrap
    every call in [CLS] ... [SEP]; our examples carry their own special tokens)."""
    spec = json.loads(backend.to_str())
    spec["post_processor"] = None
    rust = RustTokenizer.from_str(json.dumps(spec))
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="[BOS]", sep_token="[SEP]", eos_token="[EOS]",
                                 pad_token="[PAD]", unk_token=unk_token, clean_up_tokenization_spaces=False)
    got = {t: hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if got != special_ids:
        raise GPT2JaxError(f"the exported tokenizer.json would give the special tokens ids {got}, not {special_ids}")
    hf.save_pretrained(str(out))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a Hugging Face tokenizer directory or a SentencePiece model (file, or a directory with one)."""
    path = Path(path)
    if not path.exists():
        raise GPT2JaxError(f"tokenizer path {path} does not exist")
    if path.is_file():
        if path.name in (*_HF_VOCAB_FILES, "merges.txt"):
            return _load_hf(path.parent)
        return SentencePieceTokenizer(path)
    sp_models = sorted(path.glob("*.model"))
    if len(sp_models) == 1 and (path / SP_SPECIALS_FILE).is_file():  # ours; its tokenizer.json is the export
        return SentencePieceTokenizer(sp_models[0])
    if any((path / f).is_file() for f in _HF_VOCAB_FILES):
        return _load_hf(path)
    if (path / "tokenizer").is_dir() and (path / "model_config.json").is_file():  # a training run's directory
        return load_tokenizer(path / "tokenizer")
    if len(sp_models) == 1:
        return SentencePieceTokenizer(sp_models[0])
    if sp_models:
        raise GPT2JaxError(f"{path}: several SentencePiece models ({', '.join(m.name for m in sp_models)}); "
                           f"give the path of one")
    raise GPT2JaxError(f"{path}: no tokenizer files (looked for {_LOOKED_FOR})")


def _load_hf(d: Path) -> HFTokenizer:
    has = lambda name: (d / name).is_file()  # noqa: E731
    if has("vocab.json") and not has("merges.txt") and not has("tokenizer.json"):
        raise GPT2JaxError(f"{d}: vocab.json without merges.txt (a byte-level BPE tokenizer needs both)")
    if has("tokenizer.json"):
        cls = PreTrainedTokenizerFast  # it describes any fast tokenizer whole, as our exports write it
    elif has("vocab.json"):
        cls = GPT2TokenizerFast
    elif has("vocab.txt"):
        cls = BertTokenizerFast
    else:
        raise GPT2JaxError(f"{d}: no tokenizer files (looked for {_LOOKED_FOR})")
    try:
        hf = cls.from_pretrained(str(d))
    except Exception as e:  # transformers and tokenizers raise many types for a corrupt file
        raise GPT2JaxError(f"{d}: cannot load the Hugging Face tokenizer ({first_line(e)})") from None
    return HFTokenizer(hf)


def _read_special_ids(file: Path, sp) -> dict[str, int]:
    try:
        ids = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise GPT2JaxError(f"{file}: unreadable ({first_line(e)})") from None
    if (not isinstance(ids, dict) or sorted(ids) != sorted(SPECIAL_TOKENS)
            or not all(isinstance(i, int) and i >= 0 for i in ids.values()) or len(set(ids.values())) != 4):
        raise GPT2JaxError(f"{file}: expected distinct non-negative ids for exactly {', '.join(SPECIAL_TOKENS)}")
    for t, i in ids.items():
        if i < sp.get_piece_size() and sp.id_to_piece(i) != t:
            raise GPT2JaxError(f"{file}: id {i} of {t} is the model's piece {sp.id_to_piece(i)!r}")
    return {t: ids[t] for t in SPECIAL_TOKENS}


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int, *,
                        model_type: str = "unigram") -> Tokenizer:
    """Train a SentencePiece model on ``texts``; writes ``out_dir/spm.model`` (+ ``spm.vocab``)."""
    if vocab_size <= 0:  # SentencePiece's own message is an internal assertion
        raise GPT2JaxError(f"vocab size must be positive, got {vocab_size}")
    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GPT2JaxError(f"cannot write the tokenizer to {out}: {blocker} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(out / "spm"), vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,  # no <unk>: characters unseen in training become UTF-8 byte pieces
            user_defined_symbols=list(SPECIAL_TOKENS),  # atomic pieces with ids 1..4
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,  # [BOS] [EOS] [PAD] take the roles of <s> </s> <pad>
            normalization_rule_name="nfkc",  # unlike the default nmt_nfkc, keeps newlines
            hard_vocab_limit=False,  # a small corpus yields a smaller vocabulary instead of an error
            max_sentence_length=1 << 16, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as e:
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if need:
            raise GPT2JaxError(f"vocab size {vocab_size} is too small for this corpus: SentencePiece needs at "
                               f"least {need.group(1)} (its characters, 256 byte pieces and special tokens)") from None
        raise GPT2JaxError(f"SentencePiece training failed: {first_line(e)}") from None
    tok = SentencePieceTokenizer(out / SP_MODEL_FILE)
    tok.save(out)
    return tok


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE on ``texts``; writes a Hugging Face tokenizer directory."""
    specials = ["<|endoftext|>", *SPECIAL_TOKENS]
    if vocab_size < 256 + len(specials):
        raise GPT2JaxError(f"vocab size {vocab_size} is too small for byte-level BPE: it needs at least "
                           f"{256 + len(specials)} (256 bytes and {len(specials)} special tokens)")
    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # checked before training, not when saving after it
        raise GPT2JaxError(f"cannot write the tokenizer to {out}: {blocker} is a file, not a directory")
    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    hf = GPT2TokenizerFast(tokenizer_object=bpe, unk_token=specials[0], bos_token=specials[0],
                           eos_token=specials[0])
    tok = HFTokenizer(hf)
    tok.save(out_dir)
    return tok
