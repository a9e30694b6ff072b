#!/usr/bin/env python3
"""Checks a moeforge GGUF export with gguf-py's GGUFReader (tests/export/test_export.cpp).

The reference is an f32 Hugging Face export of the same checkpoint (--hf), read with safetensors;
this script applies the HF -> GGUF llama transforms itself (shared/formats.md §3.8: q/k row
permutation per head, experts stacked on a new leading axis) and checks:
  1. the metadata llama.cpp needs, with the right GGUF types and the model's values, and the
     byte-level gpt2 tokenizer (259 unique tokens, byte b is GPT-2's unicode char of b);
  2. every tensor: names, ne, type (norms and routers F32, the rest --type), and values equal to
     the reference for f32 / f16 / bf16 (after rounding it to that type) or within the block
     quantisation bound for q8_0 (amax/254 + fp16 scale rounding) and q4_0 (amax/8 + the same).
Exits 1 naming the first mismatch; prints "gguf_check: OK ..." on success.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors.numpy import load_file


def fail(message):
    print(f"gguf_check: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--hf", required=True, help="an f32 HF export of the same checkpoint")
    ap.add_argument("--type", required=True, choices=["f32", "f16", "bf16", "q8_0", "q4_0"])
    a = ap.parse_args()
    with open(os.path.join(a.hf, "config.json")) as f:
        cfg = json.load(f)
    ref = {}
    for name in os.listdir(a.hf):
        if name.endswith(".safetensors"):
            ref.update(load_file(os.path.join(a.hf, name)))

    r = GGUFReader(a.gguf)
    fields = r.fields

    def value(key, vtype):
        if key not in fields:
            fail(f"metadata {key} is missing")
        f = fields[key]
        if f.types[0] != vtype:
            fail(f"metadata {key} has type {f.types[0].name}, llama.cpp wants {vtype.name}")
        return f.contents()

    U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    L, E, V = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    expect = {
        ("general.architecture", STR): "llama",
        ("llama.block_count", U32): L,
        ("llama.embedding_length", U32): cfg["hidden_size"],
        ("llama.feed_forward_length", U32): cfg["intermediate_size"],
        ("llama.attention.head_count", U32): nh,
        ("llama.attention.head_count_kv", U32): nkv,
        ("llama.rope.dimension_count", U32): hd,
        ("llama.expert_count", U32): E,
        ("llama.expert_used_count", U32): cfg["num_experts_per_tok"],
        ("llama.context_length", U32): cfg["max_position_embeddings"],
        ("llama.vocab_size", U32): V,
        ("tokenizer.ggml.model", STR): "gpt2",
        ("tokenizer.ggml.bos_token_id", U32): 256,
        ("tokenizer.ggml.eos_token_id", U32): 257,
    }
    for (key, vtype), want in expect.items():
        got = value(key, vtype)
        if got != want:
            fail(f"metadata {key} = {got!r}, expected {want!r}")
    for key, want in (("llama.rope.freq_base", cfg["rope_theta"]),
                      ("llama.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])):
        if not np.isclose(value(key, F32), want, rtol=1e-6):
            fail(f"metadata {key} = {value(key, F32)}, expected {want}")
    if a.type in ("q8_0", "q4_0") and value("general.quantization_version", U32) != 2:
        fail("general.quantization_version must be 2 for a quantized file")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    b2u = bytes_to_unicode()
    if len(tokens) != V or len(set(tokens)) != V or any(tokens[b] != b2u[b] for b in range(256)):
        fail("tokenizer.ggml.tokens is not the 256 GPT-2 byte characters + specials, unique, of the vocab size")
    if tokens[256:259] != ["<bos>", "<eos>", "<pad>"]:
        fail(f"special tokens {tokens[256:259]}")
    types = fields["tokenizer.ggml.token_type"]
    if types.types != [GGUFValueType.ARRAY, GGUFValueType.INT32] or len(types.contents()) != V:
        fail("tokenizer.ggml.token_type must be an INT32 array of n_vocab entries")
    if fields["tokenizer.ggml.merges"].contents() != []:
        fail("tokenizer.ggml.merges must be empty")

    def permute(w, n):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    want = {"token_embd.weight": ref["model.embed_tokens.weight"], "output_norm.weight": ref["model.norm.weight"]}
    if "lm_head.weight" in ref:
        want["output.weight"] = ref["lm_head.weight"]
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        want[b + "attn_norm.weight"] = ref[p + "input_layernorm.weight"]
        want[b + "attn_q.weight"] = permute(ref[p + "self_attn.q_proj.weight"], nh)
        want[b + "attn_k.weight"] = permute(ref[p + "self_attn.k_proj.weight"], nkv)
        want[b + "attn_v.weight"] = ref[p + "self_attn.v_proj.weight"]
        want[b + "attn_output.weight"] = ref[p + "self_attn.o_proj.weight"]
        want[b + "ffn_norm.weight"] = ref[p + "post_attention_layernorm.weight"]
        want[b + "ffn_gate_inp.weight"] = ref[p + "block_sparse_moe.gate.weight"]
        for gname, w in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
            want[b + gname + ".weight"] = np.stack(
                [ref[p + f"block_sparse_moe.experts.{e}.{w}.weight"] for e in range(E)])
    names = [t.name for t in r.tensors]
    if sorted(names) != sorted(want):
        fail(f"tensor names differ: {sorted(set(names) ^ set(want))[:5]}")
    qtype = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
             "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[a.type]
    worst = 0.0
    for t in r.tensors:
        w = want[t.name].astype(np.float32)
        if list(t.shape) != list(reversed(w.shape)):
            fail(f"{t.name}: ne {list(t.shape)}, expected {list(reversed(w.shape))}")
        f32_only = w.ndim == 1 or t.name.endswith("_norm.weight") or t.name.endswith("ffn_gate_inp.weight")
        ttype = GGMLQuantizationType.F32 if f32_only else qtype
        if t.tensor_type != ttype:
            fail(f"{t.name}: type {t.tensor_type.name}, expected {ttype.name}")
        got = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(w.shape)
        if ttype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            dt = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                  GGMLQuantizationType.BF16: torch.bfloat16}[ttype]
            rounded = torch.from_numpy(w).to(dt).to(torch.float32).numpy()
            if not np.array_equal(got, rounded):
                fail(f"{t.name}: values differ from the reference rounded to {ttype.name}")
        else:
            blocks, gblocks = w.reshape(-1, 32), got.reshape(-1, 32)
            amax = np.abs(blocks).max(axis=1, keepdims=True)
            step = 1.0 / 254.0 if ttype == GGMLQuantizationType.Q8_0 else 1.0 / 8.0
            bound = amax * (step + 2.0 ** -10) + 1e-12
            err = np.abs(gblocks - blocks)
            if (err > bound).any():
                fail(f"{t.name}: a {ttype.name} block is off by {err.max():.3e}, beyond its bound")
            worst = max(worst, float((err / bound).max()))
    print(f"gguf_check: OK {len(r.tensors)} tensors ({a.type}), {len(fields)} metadata keys, "
          f"worst error / bound {worst:.3f}")


if __name__ == "__main__":
    main()
