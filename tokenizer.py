"""One tokenizer interface over the formats Llama-family checkpoints ship with.

- `tokenizer.json` (Hugging Face `tokenizers`; also what the GGUF importer writes),
- `tokenizer.model` as sentencepiece (Llama-2, Mistral, TinyLlama),
- `tokenizer.model` as a tiktoken BPE file (Llama-3).
`tokenizer_config.json`, when present, supplies the chat template and BOS/EOS.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: set[int]
    add_bos: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    def __init__(self, path: Path, cfg: dict) -> None:
        from tokenizers import Tokenizer as _Tok
        self._tok = _Tok.from_file(str(path))
        self.bos_id = self._id(cfg.get("bos_token"))
        self.eos_ids = {i for i in (self._id(cfg.get("eos_token")),) if i is not None}
        self.add_bos = bool(cfg.get("add_bos_token", False))

    def _id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class SentencePieceTokenizer:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self._sp.bos_id()
        self.eos_ids = {self._sp.eos_id()}
        self.add_bos = True

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


# Llama-3's pre-tokenizer split pattern and its reserved special tokens (public model card facts).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                   "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>"]


class TiktokenTokenizer:
    def __init__(self, path: Path) -> None:
        import tiktoken
        ranks = {}
        for line in path.read_text().splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        n = len(ranks)
        names = _LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]
        special = {name: n + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(name=path.name, pat_str=_LLAMA3_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=special)
        self.bos_id = special["<|begin_of_text|>"]
        self.eos_ids = {special["<|end_of_text|>"], special["<|eot_id|>"]}
        self.add_bos = True

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline().split()
    if len(first) != 2:
        return False
    try:
        base64.b64decode(first[0], validate=True)
        int(first[1])
    except ValueError:
        return False
    return True


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Pick the tokenizer a checkpoint folder ships with."""
    folder = Path(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if (folder / "tokenizer.json").exists():
        return HFTokenizer(folder / "tokenizer.json", cfg)
    model_file = folder / "tokenizer.model"
    if model_file.exists():
        return TiktokenTokenizer(model_file) if _is_tiktoken_file(model_file) else SentencePieceTokenizer(model_file)
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}")


def chat_template(folder: str | Path) -> str | None:
    cfg_path = Path(folder) / "tokenizer_config.json"
    return json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.exists() else None


def render_chat(template: str, messages: list[dict[str, str]]) -> str:
    """Apply the model's own Jinja chat template, sandboxed (templates come from downloaded files)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="", eos_token="")
