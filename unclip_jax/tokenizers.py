"""CLIP's byte-level BPE tokenizer: OpenAI's (from a local folder) or one trained on our captions.

Both kinds are the same thing on disk and in memory: a transformers `CLIPTokenizer` folder
(vocab.json + merges.txt, or tokenizer.json), loaded with `CLIPTokenizer.from_pretrained(dir)` and
wrapped by `ClipTokenizer`, which pads and truncates to the model's context length:

    [<|startoftext|>, tokens..., <|endoftext|>, pad, pad, ...]        (length = context_length)

and reports where the end-of-text token sits (the text tower pools there). A prompt longer than
the context is cut, keeping the end-of-text token last, and a warning is logged. The empty prompt
is valid: [sot, eot, pad...], the null condition of classifier-free guidance.

A trained tokenizer is built the way OpenAI built CLIP's vocabulary: the same normalisation
(NFC, whitespace collapsed, lower case) and pre-tokenisation (CLIP's regex, then bytes as
characters), BPE merges learned with `tokenizers`, then vocab = 256 bytes, 256 bytes + "</w>", one
entry per merge, the two special tokens. It is saved next to the checkpoint and loads back through
the same `from_pretrained`.

No network: the folder must exist locally (pretrained vocabularies are not downloaded here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation regex (tokenization_clip.py / OpenAI's simple_tokenizer.py).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # noqa: E501
_UNSET_MAX_LENGTH = 10**6  # transformers' "no limit" is ~1e30


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """A tokenised batch. input_ids [B, L] int32; attention_mask [B, L] bool (sot..eot);
    eot_positions [B] int32; truncated [B] bool (the prompt did not fit)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    eot_positions: np.ndarray
    truncated: np.ndarray


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


class ClipTokenizer:
    """Pads/truncates CLIP BPE tokens to `context_length`, with the end-of-text position known.

    `hf_tokenizer` is a transformers CLIPTokenizer; `pad_id` defaults to its pad token
    (<|endoftext|> for OpenAI's folders, "!" = 0 for Karlo's).
    """

    def __init__(self, hf_tokenizer, context_length: int, pad_id: int | None = None):
        if context_length < 2:
            raise ValueError(
                f"context_length must leave room for sot and eot, got {context_length}"
            )
        self.hf = hf_tokenizer
        self.context_length = int(context_length)
        self.sot_id = self._special_id(SOT)
        self.eot_id = self._special_id(EOT)
        self.pad_id = int(hf_tokenizer.pad_token_id if pad_id is None else pad_id)

    def _special_id(self, token: str) -> int:
        token_id = self.hf.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.hf.unk_token_id and token != self.hf.unk_token:
            raise ValueError(f"the tokenizer has no {token} token; is it a CLIP tokenizer?")
        return int(token_id)

    @classmethod
    def from_pretrained(
        cls, path: str | pathlib.Path, context_length: int | None = None, pad_id: int | None = None
    ) -> ClipTokenizer:
        """Load a CLIP tokenizer folder (OpenAI/HF's, or one saved by `save`).

        The context length is the argument, else the folder's model_max_length, else CLIP's 77.
        """
        from transformers import CLIPTokenizer

        from unclip_jax import storage

        if not storage.path(path).is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        folder = storage.local_copy(path)  # transformers reads local files
        files = {p.name for p in folder.iterdir()}
        if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
            raise FileNotFoundError(
                f"{folder} has neither tokenizer.json nor vocab.json + merges.txt"
            )
        try:
            hf = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"cannot read the tokenizer in {folder}: "
                             f"{type(err).__name__}: {err}") from None  # fmt: skip
        if context_length is None:
            context_length = hf.model_max_length
            if context_length >= _UNSET_MAX_LENGTH:
                logger.warning("%s states no context length; using CLIP's 77", folder)
                context_length = 77
        return cls(hf, context_length, pad_id)

    def save(self, path: str | pathlib.Path) -> None:
        """Write the tokenizer folder (transformers' format, model_max_length = context)."""
        self.hf.model_max_length = self.context_length
        self.hf.save_pretrained(str(path))

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the text tower's embedding table needs at least this many)."""
        return len(self.hf)

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedText:
        """Tokenise a prompt or a batch of prompts into [B, context_length] arrays."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str")
        batch, length = len(prompts), self.context_length
        ids = np.full((batch, length), self.pad_id, np.int32)
        mask = np.zeros((batch, length), bool)
        eot = np.zeros((batch,), np.int32)
        truncated = np.zeros((batch,), bool)
        encoded = (
            self.hf(prompts, add_special_tokens=False, verbose=False)["input_ids"]
            if prompts
            else []
        )
        room = length - 2
        for row, tokens in enumerate(encoded):
            if len(tokens) > room:
                truncated[row] = True
                logger.warning(
                    "prompt %d has %d tokens, more than the %d that fit; truncated: %r",
                    row, len(tokens), room, prompts[row][:80],
                )  # fmt: skip
                tokens = tokens[:room]
            seq = [self.sot_id, *tokens, self.eot_id]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
            eot[row] = len(seq) - 1
        return TokenizedText(ids, mask, eot, truncated)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids, without special tokens and padding."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self.hf.decode([i for i in ids if i != self.sot_id], skip_special_tokens=True)


def train_bpe(
    captions: Iterable[str],
    vocab_size: int,
    context_length: int,
    *,
    min_frequency: int = 2,
) -> ClipTokenizer:
    """Learn a CLIP-style BPE on `captions`, with at most `vocab_size` ids (>= 514 + 1 merge).

    The vocabulary is laid out as OpenAI's: ids 0..255 bytes, 256..511 bytes + "</w>" (word
    ends), then one id per merge in the order learned, then <|startoftext|>, <|endoftext|>.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    base = list(bytes_to_unicode().values())
    if vocab_size < 2 * len(base) + 3:
        raise ValueError(f"vocab_size must be at least {2 * len(base) + 3}, got {vocab_size}")
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    # The same normalisation and pre-tokenisation as transformers' CLIPTokenizer, so that the
    # merges learned here are the ones it applies.
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        # The trainer's own vocabulary also counts the word-final characters it has seen; ours
        # always holds all 512 base symbols, so ask for the merges explicitly.
        vocab_size=vocab_size - 2 - len(base) + 256 + 256,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator((str(c) for c in captions), trainer)
    learned = json.loads(bpe.to_str())["model"]["merges"]
    # tokenizers writes merges as [a, b] pairs (older versions: "a b" strings).
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned]
    merges = merges[: vocab_size - 2 * len(base) - 2]
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    hf = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
    return ClipTokenizer(hf, context_length)


# ------------------------------------------------------------------------------------------------
# GLIDE-style text input: no start/end tokens, lowercased, padded with a pad id (SPEC 2.2).


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, pad id 256): for tiny models without BPE files."""

    vocab_size = 257
    pad_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def train_gpt2_bpe(captions: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
    """Learn a GLIDE/GPT-2-style byte-level BPE on `captions` (lowercased, as GLIDE's input is):
    a `Gpt2BpeTokenizer` with at most `vocab_size` ids (>= 258), laid out as GPT-2's vocabulary:
    ids 0..255 the bytes, one id per merge in the order learned, <|endoftext|> last (the pad id).

    For training GLIDE from scratch where GPT-2's own files are not at hand (nothing here is
    downloaded): the same pre-tokeniser and merge rules as GPT-2, learned on our data, so a
    caption's words become single tokens rather than the byte tokenizer's one id per character.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = list(bytes_to_unicode().values())
    if vocab_size < len(base) + 2:
        raise ValueError(f"vocab_size must be at least {len(base) + 2}, got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    bpe.train_from_iterator((str(c).lower() for c in captions), trainer)
    learned = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned]
    merges = merges[: vocab_size - len(base) - 1]
    vocab = {}
    for token in base + ["".join(m) for m in merges] + [EOT]:
        vocab.setdefault(token, len(vocab))
    return Gpt2BpeTokenizer(vocab, merges)


# GLIDE's BPE files under their glide-text2im names (gzipped) or GPT-2's / transformers' names.
_GPT2_VOCAB = ("vocab.json", "encoder.json", "encoder.json.gz")
_GPT2_MERGES = ("merges.txt", "vocab.bpe", "vocab.bpe.gz")


def _read_text(path: pathlib.Path) -> str:
    """A tokenizer file's text (gzipped or not); a damaged file is named in the error."""
    import gzip

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read tokenizer file {path}: {err}") from None


class Gpt2BpeTokenizer:
    """GLIDE's tokenizer (glide-text2im tokenizer/bpe.py): GPT-2's byte-level BPE over lowercased
    text, no special tokens added; the pad id is the last id (<|endoftext|>, 50256 for GPT-2).

    Loaded from a folder holding glide-text2im's `encoder.json.gz` + `vocab.bpe.gz` (as bundled in
    its tokenizer/ package), or GPT-2's `vocab.json` + `merges.txt`; nothing is downloaded. The
    BPE runs in `tokenizers` with GPT-2's pre-tokenizer regex, the one bpe.py uses, so the ids
    are bpe.py's (checked against it: tests/test_glide_import.py). `save(folder)` writes
    vocab.json + merges.txt.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        from tokenizers import Tokenizer, models, pre_tokenizers

        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("a GPT-2 BPE vocabulary must number its tokens 0..N-1")
        self.vocab, self.merges = dict(vocab), list(merges)
        self.vocab_size = len(vocab)
        self.pad_id = self.vocab_size - 1  # bpe.py's end_token: n_vocab - 1
        bpe = Tokenizer(models.BPE(vocab=self.vocab, merges=self.merges))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._bpe = bpe

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path) -> Gpt2BpeTokenizer:
        from unclip_jax import storage

        folder = storage.path(folder)
        found = []
        for names in (_GPT2_VOCAB, _GPT2_MERGES):
            path = next((folder / n for n in names if (folder / n).is_file()), None)
            if path is None:
                raise FileNotFoundError(f"no GPT-2 BPE file in {folder}: expected one of "
                                        f"{', '.join(names)}")  # fmt: skip
            found.append(path)
        try:
            vocab = json.loads(_read_text(found[0]))
        except json.JSONDecodeError as err:
            raise ValueError(f"tokenizer file {found[0]} is not JSON: {err}") from None
        lines = _read_text(found[1]).split("\n")
        # Both files start with a "#version" line; bpe.py drops the first and the last line.
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise ValueError(f"{found[1]}: a merge line must hold two tokens, got {bad!r}")
        return cls(vocab, merges)

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text, add_special_tokens=False).ids

    def save(self, folder: str | pathlib.Path) -> pathlib.Path:
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False))
        merges = "\n".join(" ".join(m) for m in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
        return folder


def glide_tokenize(tokenizer, prompts: list[str], text_ctx: int, pad_id: int, *, warn: bool = True):
    """GLIDE's text input: lowercased, no start/end tokens, truncated, padded with pad_id.

    Returns NumPy (tokens [B, text_ctx] int32, mask [B, text_ctx] bool). An empty prompt is the null
    condition (all padding). Too-long prompts are truncated with a warning.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    tokens = np.full((len(prompts), text_ctx), pad_id, np.int32)
    mask = np.zeros((len(prompts), text_ctx), bool)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is {type(prompt).__name__}, not str")
        ids = tokenizer.encode(prompt.lower())
        if len(ids) > text_ctx:
            if warn:
                logger.warning("prompt %d has %d tokens; truncated to %d: %r", i, len(ids),
                               text_ctx, prompt)  # fmt: skip
            ids = ids[:text_ctx]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return tokens, mask


def glide_tokenizer_from_config(data_config, run_dir: str | pathlib.Path | None = None):
    """The tokenizer a GLIDE-style config's data section names: "bytes", or "gpt2_bpe" read from
    the run folder's tokenizer/ (a converted GLIDE run carries it there)."""
    name = data_config.get("tokenizer", "bytes")
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2_bpe":
        folder = None if run_dir is None else pathlib.Path(run_dir) / "tokenizer"
        if folder is None or not folder.is_dir():
            raise ValueError(f"tokenizer 'gpt2_bpe' needs the run's tokenizer/ folder, not found "
                             f"in {run_dir}; `unclip-jax convert glide` writes it")  # fmt: skip
        return Gpt2BpeTokenizer.from_folder(folder)
    raise ValueError(f"unknown GLIDE tokenizer {name!r}: 'bytes' or 'gpt2_bpe'")
