"""Checkpoint folders: what a converted model looks like on disk, and how it gets there.

A checkpoint folder holds `config.json` (our ModelArgs), `model.safetensors` (our parameter names,
fused q|k|v and gate|up, Q/K rows in the interleaved-RoPE order), the tokenizer (`tokenizer.json`
or `tokenizer.model`) and `tokenizer_config.json` (chat template, special tokens). Every file is
written to a temporary name and renamed, so a failed conversion never leaves a half-written model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from files import atomic_path, write_json
from linear import PackedLinear, QuantConfig, prepare_quantized
from model import ModelArgs, Transformer

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def save_state_dict(state: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors refuses aliased tensors, so tied weights must already be dropped by the caller."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def model_state_for_saving(model: Transformer) -> dict[str, Tensor]:
    state = model.state_dict()
    if model.output.weight is model.tok_embeddings.weight:  # tied (a quantized head is its own copy)
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
        raise CheckpointError(f"no config.json next to {weights}: a weights file is read with the "
                              f"config.json and tokenizer files of its checkpoint folder; copy them beside it")
    return folder, weights


def load_config(folder: str | Path) -> ModelArgs:
    """Our config.json (ModelArgs fields); a Hugging Face config.json is read too."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
        if "architectures" in cfg or "model_type" in cfg:
            return hf_model_args(cfg)
        fields = {f.name for f in dataclasses.fields(ModelArgs)}
        unknown = set(cfg) - fields
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return ModelArgs(**cfg)
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
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
    try:  # a quantized checkpoint: swap in empty modules of the format it records first
        quant = QuantConfig.from_metadata(_safetensors_metadata(weights), weights)
        if quant is not None:
            prepare_quantized(model, quant, weights)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    expected = set(model_state_for_saving(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config.json: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    state = {k: v.to(dtype) if v.is_floating_point() and not _keeps_dtype(k) else v
             for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for m in model.modules():  # derived buffers are not in the file: still on the meta device
        if isinstance(m, PackedLinear):
            m.no_thresholds = torch.zeros_like(m.thresholds)
    if args.tie_embeddings and "output.weight" not in state:  # a float tied head: share the table
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

SUPPORTED_HF_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")


def hf_model_args(cfg: dict[str, Any]) -> ModelArgs:
    """Build from a Hugging Face `config.json` of a Llama/Mistral-architecture model."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    if model_type not in ("llama", "mistral") and not any(a in SUPPORTED_HF_ARCHS for a in archs):
        raise ValueError(
            f"unsupported architecture {archs or model_type!r}: only Llama-family models "
            f"({', '.join(SUPPORTED_HF_ARCHS)}) are supported")
    # transformers < 5 writes `rope_theta` + `rope_scaling`; 5.x nests both in `rope_parameters`.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        rope_scaling = {k: float(rope[k]) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    elif kind == "default":
        rope_scaling = None
    else:
        raise ValueError(f"unsupported RoPE type {kind!r} (implemented: default, llama3)")
    n_head = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=n_head,
        n_local_heads=cfg.get("num_key_value_heads", n_head),
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        block_size=cfg.get("max_position_embeddings", 4096),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        rope_base=float(rope_theta),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
    )


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
COMPANION_FILES = ("config.json",) + TOKENIZER_FILES  # what a weights file is read with


def check_companions(src: Path, dst: Path, names: tuple[str, ...] = COMPANION_FILES) -> None:
    """Refuse, before any work, to copy `names` from folder `src` into folder `dst` where `dst`
    already holds different ones (another checkpoint's)."""
    for name in names:
        theirs, mine = dst / name, src / name
        if mine.exists() and theirs.exists() and mine.read_bytes() != theirs.read_bytes():
            raise CheckpointError(f"{dst} already holds another checkpoint's {name}; choose another folder")


def copy_companions(src: Path, dst: Path, names: tuple[str, ...] = COMPANION_FILES) -> None:
    """Copy the files among `names` that `src` has into `dst` (atomically, each)."""
    for name in names:
        if (src / name).exists() and src.resolve() != dst.resolve():
            with atomic_path(dst / name) as tmp:
                tmp.write_bytes((src / name).read_bytes())


def convert_hf_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert into `out_dir`, never in place: the downloaded folder stays as it was, so a second
    conversion (or another tool) can still read it."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.resolve() == hf_dir.resolve():
        raise CheckpointError(f"the output folder is the Hugging Face folder {hf_dir}: convert into "
                              "another one (--out), the source is never modified")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"no config.json in {hf_dir}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    if "n_layer" in cfg and not {"architectures", "model_type"} & set(cfg):
        raise CheckpointError(f"{hf_dir} holds a converted checkpoint (our config.json), not a Hugging "
                              "Face one: use it as it is, or download the model again")
    try:
        args = hf_model_args(cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    state = convert_hf_state_dict(read_hf_weights(hf_dir), args)
    save_checkpoint(out_dir, args, state)
    copy_companions(hf_dir, out_dir, TOKENIZER_FILES)
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


def gguf_model_args(meta: dict[str, Any], has_output_tensor: bool) -> ModelArgs:
    """Build from the `llama.*` keys of a GGUF file (the file says its architecture)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    n_head = int(meta["llama.attention.head_count"])
    dim = int(meta["llama.embedding_length"])
    return ModelArgs(
        dim=dim,
        n_layer=int(meta["llama.block_count"]),
        n_head=n_head,
        n_local_heads=int(meta.get("llama.attention.head_count_kv", n_head)),
        intermediate_size=int(meta["llama.feed_forward_length"]),
        vocab_size=int(meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
        block_size=int(meta.get("llama.context_length", 4096)),
        head_dim=int(meta.get("llama.rope.dimension_count", dim // n_head)),
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output_tensor,
    )


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
        args = gguf_model_args(meta, has_output_tensor="output.weight" in tensors)
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
