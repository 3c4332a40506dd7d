"""Checkpoint folders: what a converted model looks like on disk, and how it gets there.

A checkpoint folder holds `config.json` (our ModelArgs), `model.safetensors` (our parameter names,
fused q|k|v and gate|up, Q/K rows in the interleaved-RoPE order), the tokenizer (`tokenizer.json`
or `tokenizer.model`) and `tokenizer_config.json` (chat template, special tokens). Every file is
written to a temporary name and renamed, so a failed conversion never leaves a half-written model.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model import ModelArgs, Transformer

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make converted models private
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_state_dict(state: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors refuses aliased tensors, so tied weights must already be dropped by the caller."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def model_state_for_saving(model: Transformer) -> dict[str, Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
    return state


def save_checkpoint(out_dir: str | Path, args: ModelArgs, state: dict[str, Tensor]) -> None:
    out_dir = Path(out_dir)
    save_state_dict(state, out_dir / WEIGHTS_FILE)
    write_json(out_dir / "config.json", args.to_dict())


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """Accept a folder or a weights file inside one; return (folder, weights file)."""
    path = Path(path)
    if path.is_dir():
        folder, weights = path, path / WEIGHTS_FILE
    else:
        folder, weights = path.parent, path
    if not weights.exists():
        raise CheckpointError(f"checkpoint not found: {weights} (convert one first, see README)")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"no config.json next to {weights}")
    return folder, weights


def load_config(folder: str | Path) -> ModelArgs:
    try:
        return ModelArgs.from_json(Path(folder) / "config.json")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"bad config.json in {folder}: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """Build the model from a checkpoint folder (or weights file) and load its weights."""
    folder, weights = resolve_checkpoint(path)
    args = load_config(folder)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {weights}: {e} (file corrupt or truncated?)") from None
    with torch.device("meta"):
        model = Transformer(args)
    if "quantization" in _safetensors_metadata(weights):
        from quantize import apply_quantized_state  # a quantized checkpoint swaps its linears first
        apply_quantized_state(model, weights)
    expected = set(model_state_for_saving(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config.json: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    state = {k: v.to(dtype) if v.is_floating_point() and not _keeps_dtype(k) else v
             for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def _keeps_dtype(name: str) -> bool:
    """Quantization scales and TEAL thresholds stay float32: casting them to bf16 would add error
    for no speed (and the kernels take float32)."""
    return name.endswith((".scales", ".zeros", ".thresholds"))


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# ---------------------------------------------------------------------------------------------
# Hugging Face -> ours
# ---------------------------------------------------------------------------------------------

def interleave_rope_rows(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """HF Llama rotates halves (i, i+d/2); our RoPE rotates pairs (2i, 2i+1): reorder Q/K rows."""
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def convert_hf_state_dict(hf: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Map a Llama `LlamaForCausalLM` state dict onto our names, fusing q|k|v and gate|up."""
    def take(name: str) -> Tensor:
        try:
            return hf[name]
        except KeyError:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}") from None

    out = {"tok_embeddings.weight": take("model.embed_tokens.weight"),
           "norm.weight": take("model.norm.weight")}
    if not args.tie_embeddings:
        out["output.weight"] = take("lm_head.weight")
    for i in range(args.n_layer):
        p = f"model.layers.{i}."
        q = interleave_rope_rows(take(p + "self_attn.q_proj.weight"), args.n_head, args.head_dim)
        k = interleave_rope_rows(take(p + "self_attn.k_proj.weight"), args.n_local_heads, args.head_dim)
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, take(p + "self_attn.v_proj.weight")])
        out[f"layers.{i}.attention.wo.weight"] = take(p + "self_attn.o_proj.weight")
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        out[f"layers.{i}.feed_forward.w2.weight"] = take(p + "mlp.down_proj.weight")
        out[f"layers.{i}.attention_norm.weight"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    return out


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a HF folder: sharded or single safetensors, else .bin (weights_only)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"no *.safetensors or pytorch_model*.bin files in {folder}")
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # corrupt shards surface as many exception types
            raise CheckpointError(f"cannot read {f}: {e}") from None
    return state


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def convert_hf_checkpoint(hf_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    hf_dir = Path(hf_dir)
    out_dir = Path(out_dir) if out_dir else hf_dir
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"no config.json in {hf_dir}")
    try:
        args = ModelArgs.from_hf_config(json.loads(cfg_path.read_text()))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    state = convert_hf_state_dict(read_hf_weights(hf_dir), args)
    if out_dir != hf_dir:
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                with atomic_path(out_dir / name) as tmp:
                    tmp.write_bytes((hf_dir / name).read_bytes())
    # Our config.json replaces HF's only after the weights are in place (same folder case).
    save_state_dict(state, out_dir / WEIGHTS_FILE)
    write_json(out_dir / "config.json", args.to_dict())
    return out_dir


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp) -> ours
# ---------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_output": "attention.wo",
    "ffn_down": "feed_forward.w2",
}


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Metadata and dequantized float32 tensors (numpy shapes, i.e. [out, in]) of a GGUF file."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # exotic field types we never need
            continue
    tensors = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions innermost first
        tensors[t.name] = torch.from_numpy(arr.reshape(shape).astype("float32"))
    return meta, tensors


def convert_gguf_state_dict(g: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """GGUF keeps Q/K rows in llama.cpp's order, which is already our interleaved-RoPE order."""
    out = {"tok_embeddings.weight": g["token_embd.weight"], "norm.weight": g["output_norm.weight"]}
    if not args.tie_embeddings:
        out["output.weight"] = g["output.weight"]
    for i in range(args.n_layer):
        p = f"blk.{i}."
        for src, dst in _GGUF_LAYER_NAMES.items():
            out[f"layers.{i}.{dst}.weight"] = g[p + src + ".weight"]
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [g[p + "attn_q.weight"], g[p + "attn_k.weight"], g[p + "attn_v.weight"]])
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(
            [g[p + "ffn_gate.weight"], g[p + "ffn_up.weight"]])
    return out


def gguf_tokenizer_json(meta: dict[str, Any]) -> str:
    """Rebuild a Hugging Face byte-level BPE tokenizer.json from the vocabulary stored in GGUF."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported "
                              "(only byte-level BPE, 'gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                        fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") in ("smollm", "llama3", "qwen2", "deepseek-llm"):
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, meta.get("tokenizer.ggml.token_type", [])) if kind == 3]
    tok.add_special_tokens(control)
    return tok.to_str()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    meta, tensors = read_gguf(gguf_path)
    try:
        args = ModelArgs.from_gguf_metadata(meta, has_output_tensor="output.weight" in tensors)
        state = convert_gguf_state_dict(tensors, args)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{gguf_path}: unsupported or incomplete GGUF ({e})") from None
    tokens = meta["tokenizer.ggml.tokens"]
    tok_cfg = {"bos_token": tokens[int(meta["tokenizer.ggml.bos_token_id"])],
               "eos_token": tokens[int(meta["tokenizer.ggml.eos_token_id"])],
               "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               "chat_template": meta.get("tokenizer.chat_template")}
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tmp.write_text(gguf_tokenizer_json(meta))
    write_json(out_dir / "tokenizer_config.json", tok_cfg)
    save_checkpoint(out_dir, args, state)
    return out_dir
