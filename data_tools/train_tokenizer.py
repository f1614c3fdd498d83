"""Train a WordPiece tokenizer on the train split's reports and save it as a Hugging Face folder.

    python -m data_tools.train_tokenizer --shards DIR --out DIR --vocab-size N [--min-frequency K]

``--shards`` is a build_shards output folder (its ``train/shard-*.tar`` are read) or a split folder
holding ``shard-*.tar`` itself. The ``.txt`` member of every sample is a report. The tokenizer:

- lower-cases and cleans the text (BERT normaliser; accents are kept),
- splits on whitespace and punctuation, except that the de-identification marks ``___`` (any run of
  three or more underscores) and ``XXXX`` stay whole, as single tokens,
- WordPiece with ``##`` continuation pieces and BERT special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``
  at ids 0..4, and a ``[CLS] A [SEP]`` (pair: ``[CLS] A [SEP] B [SEP]``) post-processor,
- is saved with ``transformers.PreTrainedTokenizerFast.save_pretrained``, so
  ``AutoTokenizer.from_pretrained(DIR)`` and ``mpma_ds.load_tokenizer(DIR)`` load it as a fast
  tokenizer whose ``word_ids()`` drive whole-word masking.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tqdm import tqdm

from data_tools.shard_format import wrong_kind

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: De-identification marks kept as one token each (after lower-casing, ``XXXX`` reads ``xxxx``).
DEID_TOKENS = ("___", "xxxx")
#: Pre-tokenisation: a run of 3+ underscores, ``xxxx``, a run of letters/digits, or one other symbol.
_PIECES = Regex(r"_{3,}|xxxx|[^\W_]+|[^\w\s]|_")


class TokenizerDataError(ValueError):
    """The shards given to the trainer cannot give a tokenizer (missing, empty, wrong layout)."""


def find_train_shards(shards: str | Path) -> list[Path]:
    """The ``shard-*.tar`` of the train split under ``shards`` (an output root or a split folder)."""
    root = Path(shards)
    if not root.is_dir():
        raise TokenizerDataError(f"--shards {root} is not a folder; give a build_shards output folder")
    direct = sorted(root.glob("shard-*.tar"))
    if direct:
        return direct
    train = root / "train"
    if not train.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise TokenizerDataError(
            f"{root} has no train split (no {train} folder, no shard-*.tar; folders: {found or 'none'}); "
            "build shards with data_tools.build_shards or point --shards at a split folder"
        )
    listed = sorted(train.glob("shard-*.tar"))
    if not listed:
        raise TokenizerDataError(f"{train} holds no shard-*.tar; the train split is empty, rebuild the shards")
    return listed


def iter_reports(shard_paths: list[Path], progress: bool = False) -> Iterator[str]:
    """Yield the text of every ``.txt`` member of the given tar shards, in order."""
    for path in tqdm(shard_paths, desc="reading shards", unit="shard", disable=not progress):
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        handle = tar.extractfile(member)
                        text = handle.read().decode("utf-8", errors="replace") if handle else ""
                        if text.strip():
                            yield text
        except tarfile.TarError as exc:
            raise TokenizerDataError(
                f"{path} is not a readable tar shard ({exc}); run data_tools.verify_shards"
            ) from exc


def build_untrained_tokenizer() -> Tokenizer:
    """The WordPiece pipeline (normaliser, pre-tokeniser, decoder) before training."""
    tok = Tokenizer(
        models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100)
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(_PIECES, behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def continuation_pieces(tok: Tokenizer, reports: list[str]) -> list[str]:
    """``##c`` for every character ``c`` that follows another inside a pre-tokenised word of ``reports``, in
    code-point order: the continuation pieces the WordPiece trainer would create on its own.

    The trainer (tokenizers 0.23, huggingface/tokenizers#1794) numbers these pieces in the order it walks its
    word-count hash map, which is seeded afresh in every process, and it breaks ties between equally frequent
    merges by those numbers: the same reports gave a different vocabulary in each process. Given to it as
    special tokens in this fixed order they are numbered before training, and every tie is broken the same way.
    """
    seen: set[str] = set()
    for text in reports:
        words = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
        seen.update("".join(word[1:] for word, _ in words))
    return ["##" + c for c in sorted(seen)]


def _replace_dir(partial: Path, target: Path) -> None:
    """Put the finished folder ``partial`` at ``target``: its files fsynced, an existing ``target`` moved aside
    and deleted only once ``partial`` is in place (data_tools does not import mpma_ds's ``fileio``)."""
    for path in partial.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(partial, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def _make_portable(out: Path) -> None:
    """Name the class every transformers release knows, and write the special-token map 4.x reads.

    transformers 5 saves ``"tokenizer_class": "TokenizersBackend"``, which 4.x cannot resolve;
    ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in both.
    """
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    names = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    special = {name: config[name] for name in names if name in config}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "training_info.json",
     "added_tokens.json", "vocab.txt", "chat_template.jinja"}
)  # fmt: skip
"""What a tokenizer folder holds: ``--overwrite`` replaces a folder holding only these (``tokenizer.json`` among
them), never one with other files (the whole folder is swapped for the new one)."""


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, lies under a file, is a non-empty folder (unless ``overwrite``), or
    holds anything but a tokenizer (``overwrite`` deletes the folder it replaces)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder; choose another --out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"--out {out} lies under {parent}, which is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a tokenizer" if (out / "tokenizer.json").is_file() else "files"
        raise FileExistsError(
            f"--out {out} already holds {what}; refusing to replace it (models trained with it would read "
            "other token ids): choose a new folder or pass --overwrite"
        )
    if out.is_dir() and any(out.iterdir()):  # --overwrite replaces a tokenizer folder, never other files
        foreign = sorted(p.name for p in out.iterdir() if p.name not in TOKENIZER_FILES)
        if foreign or not (out / "tokenizer.json").is_file():
            what = f"it also holds {', '.join(foreign[:4])}" if foreign else "it has no tokenizer.json"
            raise FileExistsError(
                f"--out {out} is not a tokenizer folder ({what}); --overwrite replaces only a folder this tool "
                "wrote: choose another --out"
            )


def train_tokenizer(
    shards: str | Path,
    out: str | Path,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    max_length: int = 512,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train on the train split's reports under ``shards``; save the HF tokenizer folder to ``out``.

    ``out`` must be new or empty unless ``overwrite``: a tokenizer replaced under a trained model's feet
    would silently change what its token ids mean.

    Returns:
        {"out", "shards", "reports", "vocab_size"}; the same dict is saved as ``out/training_info.json``.

    Raises:
        TokenizerDataError: no shards, no train split, or no report text.
        ValueError: ``vocab_size`` too small for the special tokens and the corpus alphabet.
        FileExistsError: ``out`` is a file, or a non-empty folder and ``overwrite`` is false.
    """
    from transformers import PreTrainedTokenizerFast  # imported late: --help stays fast

    check_output_folder(Path(out), overwrite)
    minimum = len(SPECIAL_TOKENS) + len(DEID_TOKENS) + 1
    if vocab_size < minimum:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the special tokens alone need {minimum}")
    shard_paths = find_train_shards(shards)
    if problem := wrong_kind(shard_paths, "report", "train_tokenizer"):
        raise TokenizerDataError(problem)
    reports = list(iter_reports(shard_paths, progress=progress))
    if not reports:
        raise TokenizerDataError(
            f"the {len(shard_paths)} train shard(s) under {shards} hold no report text (.txt members); rebuild the shards"
        )

    # trained on a throwaway pipeline: its trainer registers the continuation pieces as special tokens
    learner = build_untrained_tokenizer()
    fixed = list(SPECIAL_TOKENS) + list(DEID_TOKENS)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=fixed + continuation_pieces(learner, reports),
        continuing_subword_prefix="##",
        show_progress=progress,
    )
    learner.train_from_iterator(reports, trainer=trainer, length=len(reports))
    learned = learner.get_vocab(with_added_tokens=False)
    if len(learned) > vocab_size:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: the special tokens and the corpus alphabet alone need "
            f"{len(learned)} entries; ask for at least {len(learned)}"
        )
    # The trainer numbers the rest of its tokens in hash-map order too; number them in a fixed order
    # (the special tokens and de-identification marks first, then sorted).
    order = fixed + sorted(set(learned) - set(fixed))
    tok = build_untrained_tokenizer()
    tok.model = models.WordPiece(
        {t: i for i, t in enumerate(order)},
        unk_token="[UNK]",
        continuing_subword_prefix="##",
        max_input_chars_per_word=100,
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # The de-identification marks are vocabulary entries (ids 5, 6), not special tokens: they are not
    # dropped by decode(skip_special_tokens=True). As normalised added tokens they match before
    # pre-tokenisation, so "___F" or "XXXX-year-old" still yield one "___" / "xxxx" token.
    tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in DEID_TOKENS])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],
    )
    # written whole under <out>.partial, then renamed into place: a kill leaves the old folder (or none),
    # never a tokenizer folder with some of its files
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    fast.save_pretrained(str(partial))
    _make_portable(partial)
    info = {
        "out": str(out_path),
        "shards": len(shard_paths),
        "reports": len(reports),
        "vocab_size": tok.get_vocab_size(),
    }
    (partial / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    _replace_dir(partial, out_path)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.train_tokenizer",
        description="Train a WordPiece tokenizer on the train split's reports and save a Hugging Face folder.",
    )
    parser.add_argument("--shards", required=True, help="build_shards output folder (or a split folder)")
    parser.add_argument("--out", required=True, help="folder to write the tokenizer to")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    parser.add_argument("--max-length", type=int, default=512, help="model_max_length saved with the tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace the tokenizer in an existing --out")
    args = parser.parse_args(argv)
    try:
        info = train_tokenizer(
            args.shards, args.out, args.vocab_size, min_frequency=args.min_frequency, max_length=args.max_length,
            progress=True, overwrite=args.overwrite,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"train_tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print(f"tokenizer with {info['vocab_size']} entries trained on {info['reports']} reports "
          f"from {info['shards']} shard(s) -> {info['out']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
