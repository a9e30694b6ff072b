#!/usr/bin/python3
"""Independent PyTorch reference of the moeforge MoE transformer (loss and gradients).

Written from docs' model math (embedding -> L x [RMSNorm, GQA+RoPE causal attention, residual,
RMSNorm, top-k MoE with optional shared expert, residual] -> RMSNorm -> LM head -> CE, plus
load-balancing aux loss and router z-loss), not from the C++ code, so that a test comparing the
two catches a mistake made in either. Gradients come from torch autograd.

Usage: /usr/bin/python3 tests/reference/moe_reference.py --dir DIR

Reads  DIR/config.json, DIR/tokens.npy, DIR/targets.npy (int, (B, T); negative target = ignored),
       DIR/params/<canonical name>.npy (float32).
Writes DIR/torch/loss.json   {"loss", "ce", "aux", "z", "experts", "min_margin"}
       DIR/torch/grads/<canonical name>.npy (float32 d loss / d parameter).

Only Debian's python3-torch (1.13) and python3-numpy are needed; runs on CPU in float32 with
torch.set_num_threads(OMP_NUM_THREADS or 1). Bad input exits with code 2 and one message.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

CONFIG_KEYS = {
    "vocab_size": int, "dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
    "head_dim": int, "n_experts": int, "top_k": int, "expert_hidden": int,
    "n_shared_experts": int, "gating": str, "rope_theta": float, "norm_eps": float,
    "tie_embeddings": bool, "aux_loss_coef": float, "z_loss_coef": float,
    "sliding_window": int, "document_start_token": int,
}
GATINGS = ("softmax_topk", "sigmoid_topk")


class InputError(Exception):
    """A bad file in the exchange directory; reported as one message with exit code 2."""


def parse_config(raw, where):
    missing = sorted(set(CONFIG_KEYS) - set(raw))
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if missing:
        raise InputError(f"{where}: missing config fields {missing}")
    # An unknown field may switch on behaviour this reference does not model (e.g. a capacity
    # factor); rejecting it is safer than silently comparing against a different model.
    if unknown:
        raise InputError(f"{where}: unknown config fields {unknown} (expected only {sorted(CONFIG_KEYS)})")
    cfg = {}
    for key, kind in CONFIG_KEYS.items():
        value = raw[key]
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, str) if kind is str else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise InputError(f"{where}: field '{key}' must be {kind.__name__}, found {value!r}")
        cfg[key] = float(value) if kind is float else value
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "n_experts", "top_k", "expert_hidden"):
        if cfg[key] <= 0:
            raise InputError(f"{where}: field '{key}' must be > 0, found {cfg[key]}")
    checks = [
        (cfg["n_shared_experts"] >= 0, "n_shared_experts must be >= 0"),
        (cfg["n_heads"] % cfg["n_kv_heads"] == 0, "n_heads must be a multiple of n_kv_heads"),
        (cfg["head_dim"] % 2 == 0, "head_dim must be even (RoPE rotates halves)"),
        (cfg["top_k"] <= cfg["n_experts"], "top_k must be <= n_experts"),
        (cfg["gating"] in GATINGS, f"gating must be one of {GATINGS}"),
        (cfg["rope_theta"] > 0 and cfg["norm_eps"] > 0, "rope_theta and norm_eps must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(f"{where}: {message}; config is {cfg}")
    return cfg


def param_shapes(cfg):
    """Canonical name -> global shape, exactly the set of parameters the model has."""
    V, C, E, F_ = cfg["vocab_size"], cfg["dim"], cfg["n_experts"], cfg["expert_hidden"]
    HD, KD, SF = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"], \
        cfg["n_shared_experts"] * cfg["expert_hidden"]
    shapes = {"embed.weight": (V, C)}
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm.weight": (C,),
            p + "attn.wq": (HD, C), p + "attn.wk": (KD, C), p + "attn.wv": (KD, C),
            p + "attn.wo": (C, HD),
            p + "moe_norm.weight": (C,),
            p + "moe.router": (E, C),
            p + "moe.experts.w1": (E, F_, C), p + "moe.experts.w3": (E, F_, C),
            p + "moe.experts.w2": (E, C, F_),
        })
        if SF > 0:
            shapes.update({p + "moe.shared.w1": (SF, C), p + "moe.shared.w3": (SF, C),
                           p + "moe.shared.w2": (C, SF)})
    shapes["final_norm.weight"] = (C,)
    if not cfg["tie_embeddings"]:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def load_npy(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable .npy file ({err})") from None


def load_params(params_dir, cfg, dtype):
    shapes = param_shapes(cfg)
    if not os.path.isdir(params_dir):
        raise InputError(f"{params_dir}: parameter directory not found")
    present = {f[:-4] for f in os.listdir(params_dir) if f.endswith(".npy")}
    extra = sorted(present - set(shapes))
    if extra:
        raise InputError(f"{params_dir}: unexpected parameter files {[e + '.npy' for e in extra]} "
                         f"for this config (tie_embeddings={cfg['tie_embeddings']}, "
                         f"n_shared_experts={cfg['n_shared_experts']}, n_layers={cfg['n_layers']})")
    params = {}
    for name, shape in shapes.items():
        path = os.path.join(params_dir, name + ".npy")
        array = load_npy(path)
        if array.dtype != np.float32:
            raise InputError(f"{path}: expected dtype float32, found {array.dtype}")
        if tuple(array.shape) != shape:
            raise InputError(f"{path}: expected shape {shape} from config, found {tuple(array.shape)}")
        params[name] = torch.tensor(array, dtype=dtype, requires_grad=True)
    return params


def load_tokens(path, cfg, is_target):
    array = load_npy(path)
    if array.dtype.kind not in "iu":
        raise InputError(f"{path}: expected an integer array, found dtype {array.dtype}")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{path}: expected a non-empty (B, T) array, found shape {array.shape}")
    array = array.astype(np.int64)
    V = cfg["vocab_size"]
    if array.max() >= V or (not is_target and array.min() < 0):
        # Negative targets mark ignored positions; negative tokens have no meaning.
        allowed = f"< {V}" if is_target else f"in [0, {V})"
        raise InputError(f"{path}: ids must be {allowed}, found range [{array.min()}, {array.max()}]")
    return torch.from_numpy(array)


def rmsnorm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_tables(T, D, theta, dtype):
    # Angles in float64 so the table does not depend on how fp32 rounds t * inv_freq.
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    angle = torch.cat([angle, angle], dim=-1)  # (T, D): the same angle for x[i] and x[i+D/2]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def visible_keys(tokens, cfg):
    """(B, T, T) bool: query i may see key j. Causal; with a window, i - j < window; with a
    document start token, only keys of the same document, numbered by counting start tokens."""
    B, T = tokens.shape
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    allowed = (j <= i).expand(B, T, T).clone()
    if cfg["sliding_window"] > 0:
        allowed &= (i - j) < cfg["sliding_window"]
    if cfg["document_start_token"] >= 0:
        doc = torch.cumsum((tokens == cfg["document_start_token"]).long(), dim=1)  # (B, T)
        allowed &= doc.unsqueeze(2) == doc.unsqueeze(1)
    return allowed


def attention(a, p, cfg, cos, sin, allowed):
    B, T, _ = a.shape
    H, Hkv, D = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    q = (a @ p["attn.wq"].T).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = (a @ p["attn.wk"].T).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = (a @ p["attn.wv"].T).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    # Query head j reads kv head j // (H / Hkv): consecutive query heads share a kv head.
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    probs = scores.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(B, T, H * D)
    return o @ p["attn.wo"].T


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def moe(x, p, cfg):
    """x (N, C) -> (out (N, C), aux, z, selected experts (N, K), routing margin per token (N))."""
    N = x.shape[0]
    E, K = cfg["n_experts"], cfg["top_k"]
    logits = x @ p["moe.router"].T  # (N, E)
    if cfg["gating"] == "softmax_topk":
        scores = logits.softmax(dim=-1)
        probs = scores
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    top_scores, top_idx = scores.topk(K, dim=-1, sorted=True)  # (N, K), descending
    gate = top_scores / top_scores.sum(dim=-1, keepdim=True)  # (N, K)

    out = torch.zeros_like(x)
    for e in range(E):
        hit = top_idx == e  # (N, K); an expert appears at most once per token
        rows = hit.any(dim=-1).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        weight = (gate * hit).sum(dim=-1)[rows]  # (n_e)
        y = swiglu(x[rows], p["moe.experts.w1"][e], p["moe.experts.w3"][e], p["moe.experts.w2"][e])
        out = out.index_add(0, rows, y * weight[:, None])
    if cfg["n_shared_experts"] > 0:
        out = out + swiglu(x, p["moe.shared.w1"], p["moe.shared.w3"], p["moe.shared.w2"])

    # Switch/GShard balance loss; the counts are a step function of the routing, so they are
    # constants and the gradient reaches the router only through probs.
    counts = torch.bincount(top_idx.reshape(-1), minlength=E).detach().to(x.dtype)  # (E)
    aux = E / (N * K) * (counts * probs.mean(dim=0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()

    with torch.no_grad():
        if K < E:
            unselected = scores.scatter(1, top_idx, float("-inf"))
            margin = top_scores[:, K - 1] - unselected.max(dim=-1).values
        else:
            margin = torch.full((N,), float("inf"), dtype=x.dtype)
    return out, aux, z, top_idx.detach(), margin


def model_loss(params, tokens, targets, cfg):
    """Returns (loss, ce, aux, z, experts per layer [(N, K)], smallest routing margin)."""
    B, T = tokens.shape
    C, eps = cfg["dim"], cfg["norm_eps"]
    dtype = params["embed.weight"].dtype
    cos, sin = rope_tables(T, cfg["head_dim"], cfg["rope_theta"], dtype)
    allowed = visible_keys(tokens, cfg)
    h = params["embed.weight"][tokens]  # (B, T, C)
    aux = z = 0.0
    experts, margin = [], float("inf")
    for i in range(cfg["n_layers"]):
        prefix = f"layers.{i}."
        p = {name[len(prefix):]: t for name, t in params.items() if name.startswith(prefix)}
        h = h + attention(rmsnorm(h, p["attn_norm.weight"], eps), p, cfg, cos, sin, allowed)
        x = rmsnorm(h, p["moe_norm.weight"], eps).reshape(B * T, C)
        out, aux_i, z_i, top_idx, margin_i = moe(x, p, cfg)
        h = h + out.view(B, T, C)
        aux, z = aux + aux_i, z + z_i
        experts.append(top_idx)
        margin = min(margin, margin_i.min().item())
    f = rmsnorm(h, params["final_norm.weight"], eps).reshape(B * T, C)
    head = params["embed.weight"] if cfg["tie_embeddings"] else params["lm_head.weight"]
    logits = f @ head.T  # (N, V)
    labels = targets.reshape(-1).masked_fill(targets.reshape(-1) < 0, -100)
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="mean")
    loss = ce + cfg["aux_loss_coef"] * aux + cfg["z_loss_coef"] * z
    return loss, ce, aux, z, experts, margin


def run(exchange_dir):
    config_path = os.path.join(exchange_dir, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"{config_path}: file not found")
    try:
        with open(config_path) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise InputError(f"{config_path}: invalid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    cfg = parse_config(raw, config_path)
    tokens = load_tokens(os.path.join(exchange_dir, "tokens.npy"), cfg, is_target=False)
    targets = load_tokens(os.path.join(exchange_dir, "targets.npy"), cfg, is_target=True)
    if tokens.shape != targets.shape:
        raise InputError(f"{exchange_dir}: tokens.npy has shape {tuple(tokens.shape)} but "
                         f"targets.npy has {tuple(targets.shape)}")
    if not (targets >= 0).any():
        raise InputError(f"{exchange_dir}/targets.npy: every target is ignored (< 0); "
                         "the cross-entropy mean is undefined")
    params = load_params(os.path.join(exchange_dir, "params"), cfg, torch.float32)

    loss, ce, aux, z, experts, margin = model_loss(params, tokens, targets, cfg)
    loss.backward()

    out_dir = os.path.join(exchange_dir, "torch")
    grads_dir = os.path.join(out_dir, "grads")
    os.makedirs(grads_dir, exist_ok=True)
    for name, tensor in params.items():
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        np.save(os.path.join(grads_dir, name + ".npy"), grad.detach().numpy().astype(np.float32))
    result = {
        "loss": loss.item(), "ce": ce.item(), "aux": float(aux), "z": float(z),
        "experts": [e.reshape(-1).tolist() for e in experts],
        # JSON has no infinity: with top_k == n_experts nothing is unselected, so no margin.
        "min_margin": margin if math.isfinite(margin) else None,
    }
    with open(os.path.join(out_dir, "loss.json"), "w") as fh:
        json.dump(result, fh)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="exchange directory written by the C++ test")
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else 1)
    try:
        result = run(args.dir)
    except InputError as err:
        print(f"moe_reference.py: error: {err}", file=sys.stderr)
        return 2
    print(f"moe_reference.py: loss {result['loss']:.7g} ce {result['ce']:.7g} "
          f"aux {result['aux']:.7g} z {result['z']:.7g} min_margin {result['min_margin']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
