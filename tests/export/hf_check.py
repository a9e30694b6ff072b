#!/usr/bin/env python3
"""Checks a moeforge Hugging Face export with independent readers (tests/export/test_export.cpp).

  1. safetensors' own reader (safe_open) opens every shard the index names; every tensor equals
     the reference values moeforge's checkpoint holds (--ref: one .npy per HF tensor name),
     bit for bit after rounding the reference to the exported dtype with torch.
  2. A PyTorch Mixtral forward written here from config.json and the safetensors alone (not from
     moeforge's code or memory), in float64, reproduces moeforge's logits (--tokens, --logits) to
     a normwise relative error below 1e-4.
  3. The `tokenizers` library loads tokenizer.json and encodes --text to moeforge's ids (--ids),
     and decodes them back to the text.
Exits 1 naming the first mismatch; prints "hf_check: OK ..." on success.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from tokenizers import Tokenizer


def fail(message):
    print(f"hf_check: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def load_weights(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, ["model.safetensors"]
    weights = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            if f.metadata().get("format") != "pt":
                fail(f"{name}: __metadata__ format is {f.metadata()!r}, transformers wants pt")
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    fail(f"{name} holds {key}, the index says {weight_map.get(key)}")
                weights[key] = f.get_tensor(key)
    if weight_map is not None and set(weight_map) != set(weights):
        fail(f"index and shards disagree: {sorted(set(weight_map) ^ set(weights))[:5]}")
    return weights


def check_tensors(weights, ref_dir):
    refs = {f[:-4]: f for f in os.listdir(ref_dir) if f.endswith(".npy")}
    if set(refs) != set(weights):
        fail(f"tensor names differ from the checkpoint's: {sorted(set(refs) ^ set(weights))[:5]}")
    for name, got in weights.items():
        want = torch.from_numpy(np.load(os.path.join(ref_dir, refs[name]))).to(got.dtype)
        if got.shape != want.shape:
            fail(f"{name}: shape {tuple(got.shape)}, the checkpoint has {tuple(want.shape)}")
        if not torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                           want.view(torch.int16 if got.element_size() == 2 else torch.int32)):
            fail(f"{name}: values differ from the checkpoint's ({got.dtype})")
    return len(weights)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mixtral_forward(cfg, w, ids):
    """Mixtral's forward (transformers modeling_mixtral semantics), float64, one sequence."""
    W = {k: v.to(torch.float64) for k, v in w.items()}
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    E, k, eps = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
    theta = cfg["rope_theta"]
    T = len(ids)
    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # (heads, T, hd), rotate_half convention
        rot = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
        return t * cos + rot * sin

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    window = cfg.get("sliding_window")
    if window is not None:  # transformers: key j is visible to query i when i - j < sliding_window
        mask = mask.masked_fill(torch.ones(T, T, dtype=torch.bool).tril(-window), float("-inf"))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        kk = (h @ W[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, kk = rope(q), rope(kk)
        kk, v = kk.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(T, nh * hd) @ W[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        probs = torch.softmax(h @ W[p + "block_sparse_moe.gate.weight"].T, -1)
        top_w, top_i = torch.topk(probs, k, -1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            q_ = p + f"block_sparse_moe.experts.{e}."
            y = (torch.nn.functional.silu(h @ W[q_ + "w1.weight"].T) * (h @ W[q_ + "w3.weight"].T)) @ W[q_ + "w2.weight"].T
            out = out + ((top_i == e) * top_w).sum(-1, keepdim=True) * y
        x = x + out
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    return x @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ref", help="folder of <hf tensor name>.npy reference values")
    ap.add_argument("--tokens")
    ap.add_argument("--logits")
    ap.add_argument("--text")
    ap.add_argument("--ids")
    a = ap.parse_args()
    with open(os.path.join(a.hf, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("architectures") != ["MixtralForCausalLM"] or cfg.get("model_type") != "mixtral":
        fail(f"config.json is not a MixtralForCausalLM config: {cfg.get('architectures')}")
    weights = load_weights(a.hf)
    summary = [f"{len(weights)} tensors"]
    if a.ref:
        check_tensors(weights, a.ref)
        summary.append("bit-exact")
    if a.tokens:
        ids = np.load(a.tokens).reshape(-1).tolist()
        want = torch.from_numpy(np.load(a.logits)).to(torch.float64).reshape(len(ids), -1)
        got = mixtral_forward(cfg, weights, ids)
        err = ((got - want).norm() / want.norm()).item()
        if not err < 1e-4:
            fail(f"PyTorch Mixtral forward differs from moeforge's logits: normwise relative error {err:.3e}")
        summary.append(f"logits rel err {err:.2e}")
    if a.text:
        tok = Tokenizer.from_file(os.path.join(a.hf, "tokenizer.json"))
        with open(a.text, "rb") as f:
            text = f.read().decode("utf-8")
        got = tok.encode(text, add_special_tokens=False).ids
        want = np.load(a.ids).reshape(-1).tolist()
        if got != want:
            first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            fail(f"tokenizers encodes to {len(got)} ids, moeforge to {len(want)}; first difference at {first}")
        if tok.decode(want, skip_special_tokens=True) != text:
            fail("tokenizers does not decode moeforge's ids back to the text")
        if tok.token_to_id("<bos>") != 256 or tok.token_to_id("<eos>") != 257:
            fail("special token ids differ from moeforge's (<bos> 256, <eos> 257)")
        summary.append(f"tokenizer {len(want)} ids")
    print("hf_check: OK " + ", ".join(summary))


if __name__ == "__main__":
    main()
