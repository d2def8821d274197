"""A CLIP tokenizer the project builds itself: byte-level characters and the two special tokens, no downloads."""

import json
import os

# CLIP's byte-to-character table (Radford et al. 2021, GPT-2's `bytes_to_unicode`): the 188 printable bytes stand for
# themselves, the other 68 map to code points 256.. so that every byte has a visible character.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def byte_characters() -> list:
    """The 256 characters of byte-level BPE, in byte order."""
    extra = iter(range(256, 512))
    return [chr(b) if b in _PRINTABLE else chr(next(extra)) for b in range(256)]


def write_clip_tokenizer_files(folder) -> str:
    """Writes vocab.json and merges.txt of a byte-level CLIP tokenizer without merges; returns the folder.

    Every byte is a token twice, inside a word and at its end ("</w>"), so any text round-trips; with no merges a
    word costs one token per byte, which is plenty for short prompts such as class names.
    """
    os.makedirs(folder, exist_ok=True)
    characters = byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return str(folder)


def build_clip_tokenizer(folder, model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` from the files `write_clip_tokenizer_files` writes into `folder`."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
