"""CLIP's BPE tokenizer, offline: open_clip ships the BPE file that OpenAI's CLIP, Stable Diffusion
1.x (CLIP ViT-L/14) and 2.x (OpenCLIP ViT-H/14) all use, so a transformers ``CLIPTokenizer`` can be
written from it without downloading anything (single-file checkpoints carry no tokenizer)."""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # HF names of open_clip's <start_of_text>/<end_of_text>
PAD = "!"  # id 0: open_clip pads with zeros after the end token


@lru_cache(maxsize=1)
def open_clip_bpe() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(vocab in id order, merges) exactly as open_clip's ``SimpleTokenizer`` builds them."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : 49152 - 256 - 2 + 1])
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    return tuple(vocab + ["<start_of_text>", "<end_of_text>"]), merges


def write_clip_tokenizer(folder: Path, context_length: int, pad: str = PAD) -> CLIPTokenizer:
    """HF ``CLIPTokenizer`` files whose ``padding="max_length", truncation=True`` ids equal
    open_clip's (``pad=PAD``, as SD 2.x pads; SD 1.x pads with ``EOT``). ``split_special_tokens`` keeps the pad string "!" (and ``<|endoftext|>`` typed in
    a caption) ordinary text, as open_clip treats them."""
    vocab, merges = open_clip_bpe()
    ids = {t: i for i, t in enumerate(list(vocab[:-2]) + [SOT, EOT])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=ids, merges=[tuple(m.split()) for m in merges],
        bos_token=SOT, eos_token=EOT, unk_token=EOT, pad_token=pad,
        model_max_length=context_length, split_special_tokens=True,
    )
    tokenizer.save_pretrained(folder)
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(specials, model_max_length=context_length, split_special_tokens=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer
