#!/usr/bin/python3
"""PyTorch side of scripts/bench-cpu.sh: trains the moe_reference.py model and reports tokens/s.

The model is tests/reference/moe_reference.py's (the independent PyTorch reference of the
moeforge transformer), built from the same run configuration moeforge reads, with freshly
initialised parameters (moeforge's init: normal(0, init_std), init_std / sqrt(2 * n_layers)
for the output projections wo and w2, ones for norm weights). Each optimizer step does the work
moeforge's trainer does: global_batch / micro_batch forward + backward passes accumulating
gradients, clip_grad_norm_ to optim.grad_clip, and a torch.optim.AdamW step (betas, eps, weight
decay from optim, no decay on norm weights). The learning rate is held at optim.lr: the schedule
changes one scalar per step, not the work done.

Data: windows of seq_len + 1 consecutive tokens of the token shards in --data (the files
`moeforge data prepare` writes; layout in data/token_shard.h), at random starts, so both programs
train on the same text. Building the batch is timed, as it is in moeforge's step.

Usage: /usr/bin/python3 tests/reference/bench_torch_train.py --config configs/tiny.pbtxt
           --data DIR/train [--set model.dim=256 ...] [--steps 30] [--skip 2] [--threads N]

Prints one line per step and, last, `bench_torch_train: N steps, X tok/s over steps A..B`
(tokens / wall time of the steps after the first --skip). Needs only Debian's python3-torch and
python3-numpy. A bad config or shard exits with code 2 and one message.
"""

import argparse
import glob
import math
import os
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_reference  # noqa: E402  (the model; its directory is not a package)

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "moeforge.proto")
# The run-config sections this benchmark reads and the proto message each one is.
SECTIONS = {"model": "ModelConfig", "train": "TrainConfig", "optim": "OptimConfig"}
SHARD_MAGIC = b"MOEFTOKS"


class BenchError(Exception):
    """A bad config, override or shard; reported as one message with exit code 2."""


# ---- a small protobuf-text reader: enough for configs/*.pbtxt (scalars and nested messages) ----

TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}:;,]|[^\s{}:;,#"]+')


def scalar(text):
    """A pbtxt or --set value: number, true/false, quoted string, or enum identifier (kept as str)."""
    if text.startswith('"'):
        return bytes(text[1:-1], "utf-8").decode("unicode_escape")
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_pbtxt(text, where):
    """Protobuf text format -> nested dict (a repeated field keeps its last value)."""
    tokens = [t for t in TOKEN.findall(text) if t.strip() and not t.startswith("#") and t not in ",;"]
    root, stack, i = {}, [], 0
    node = root
    while i < len(tokens):
        tok = tokens[i]
        if tok == "}":
            if not stack:
                raise BenchError(f"{where}: unbalanced '}}'")
            node = stack.pop()
            i += 1
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt == ":" and i + 2 < len(tokens) and tokens[i + 2] != "{":
            node[tok] = scalar(tokens[i + 2])
            i += 3
        elif nxt == "{" or (nxt == ":" and tokens[i + 2] == "{"):
            child = node.setdefault(tok, {})
            stack.append(node)
            node = child
            i += 2 if nxt == "{" else 3
        else:
            raise BenchError(f"{where}: cannot parse near '{tok}'")
    if stack:
        raise BenchError(f"{where}: unbalanced '{{'")
    return root


def proto_defaults(path):
    """{section: {field: default}} from `optional T name = N [default = X];` in configs/moeforge.proto."""
    with open(path) as fh:
        text = fh.read()
    out = {}
    for section, message in SECTIONS.items():
        match = re.search(r"message\s+" + message + r"\s*\{(.*?)\n\}", text, re.S)
        if not match:
            raise BenchError(f"{path}: message {message} not found")
        out[section] = {name: scalar(value) for name, value in
                        re.findall(r"optional\s+\w+\s+(\w+)\s*=\s*\d+\s*\[default\s*=\s*([^\]]+?)\]", match.group(1))}
    return out


def load_run_config(path, overrides):
    """The model/train/optim sections of a run config: proto defaults, then the file, then --set."""
    if not os.path.isfile(path):
        raise BenchError(f"{path}: file not found")
    with open(path) as fh:
        parsed = parse_pbtxt(fh.read(), path)
    cfg = proto_defaults(PROTO)
    for section in SECTIONS:
        cfg[section].update(parsed.get(section, {}))
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, field = key.partition(".")
        if not sep or section not in SECTIONS or "." in field or field not in cfg[section]:
            # Other sections (data, logging, ...) do not change the work of a step.
            if sep and section not in SECTIONS:
                continue
            raise BenchError(f"--set {item}: expected section.field=value with a field of "
                             f"{'/'.join(SECTIONS)} in {PROTO}")
        cfg[section][field] = scalar(value)
    return cfg


def reference_config(model):
    """The run config's model section as moe_reference.parse_config expects it (validated there)."""
    raw = {key: model[key] for key in moe_reference.CONFIG_KEYS if key in model}
    if raw.get("head_dim") == 0:  # the proto's "0 means dim / n_heads"
        raw["head_dim"] = model["dim"] // model["n_heads"]
    raw["gating"] = str(raw["gating"]).lower()
    for key in ("rope_theta", "norm_eps", "aux_loss_coef", "z_loss_coef"):
        raw[key] = float(raw[key])
    try:
        return moe_reference.parse_config(raw, "model")
    except moe_reference.InputError as err:
        raise BenchError(str(err)) from None


# ---- model parameters, data, training ----

def init_params(cfg, init_std, generator):
    """moeforge's initialisation (models/*.cpp): see the module docstring."""
    out_std = init_std / math.sqrt(2.0 * cfg["n_layers"])
    params = {}
    for name, shape in moe_reference.param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            value = torch.ones(shape)
        else:
            std = out_std if name.endswith(("attn.wo", ".w2")) else init_std
            value = torch.randn(shape, generator=generator) * std
        params[name] = value.requires_grad_(True)
    return params


def read_shards(directory):
    """All tokens of the shards in `directory` as one int64 array (layout: data/token_shard.h)."""
    paths = sorted(glob.glob(os.path.join(directory, "*.bin")))
    if not paths:
        raise BenchError(f"{directory}: no *.bin token shards (run `moeforge data prepare`)")
    parts = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size < 32 or raw[:8].tobytes() != SHARD_MAGIC:
            raise BenchError(f"{path}: not a moeforge token shard (bad magic)")
        _, width = np.frombuffer(raw[8:16].tobytes(), dtype="<u4")
        count, docs = np.frombuffer(raw[16:32].tobytes(), dtype="<u8")
        start = 32 + 8 * (int(docs) + 1)
        if width not in (2, 4) or raw.size != start + int(width) * int(count):
            raise BenchError(f"{path}: truncated or corrupt shard (token width {width}, {count} tokens, "
                             f"{raw.size} bytes)")
        parts.append(np.frombuffer(raw[start:].tobytes(), dtype="<u2" if width == 2 else "<u4").astype(np.int64))
    return np.concatenate(parts)


def batch(stream, rows, seq_len, rng):
    """(tokens, targets) (rows, seq_len): random windows of seq_len + 1 tokens, shifted by one."""
    starts = rng.integers(0, stream.size - seq_len, size=rows)
    windows = torch.from_numpy(stream[starts[:, None] + np.arange(seq_len + 1)[None, :]])
    return windows[:, :-1], windows[:, 1:]


def train(args):
    run = load_run_config(args.config, args.set)
    model, t, o = run["model"], run["train"], run["optim"]
    cfg = reference_config(model)
    if model.get("recompute"):
        print("bench_torch_train: note: model.recompute is set; moeforge recomputes activations, "
              "this PyTorch loop does not", file=sys.stderr)
    seq_len, global_batch, micro_batch = t["seq_len"], t["global_batch"], t["micro_batch"]
    if micro_batch <= 0 or global_batch % micro_batch:
        raise BenchError(f"train.global_batch {global_batch} must be a multiple of train.micro_batch {micro_batch}")
    if args.steps <= args.skip:
        raise BenchError(f"--steps {args.steps} must exceed --skip {args.skip}")
    stream = read_shards(args.data)
    if stream.size <= seq_len + 1 or stream.max() >= cfg["vocab_size"]:
        raise BenchError(f"{args.data}: need more than {seq_len + 1} tokens, all < vocab_size "
                         f"{cfg['vocab_size']} (found {stream.size} tokens, max {stream.max()})")

    torch.manual_seed(t["seed"])
    params = init_params(cfg, float(model["init_std"]), torch.Generator().manual_seed(t["seed"]))
    decay = [p for n, p in params.items() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in params.items() if n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(o["weight_decay"])},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=float(o["lr"]), betas=(float(o["beta1"]), float(o["beta2"])),
                                  eps=float(o["eps"]))
    rng = np.random.default_rng(t["seed"])
    micro_batches = global_batch // micro_batch
    n_params = sum(p.numel() for p in params.values())
    print(f"bench_torch_train: {n_params} parameters ({cfg['n_layers']} layers, {cfg['n_experts']} experts "
          f"top-{cfg['top_k']}, dim {cfg['dim']}), {args.steps} steps x {global_batch} x {seq_len} tokens, "
          f"{micro_batches} micro-batches per step, {torch.get_num_threads()} threads", flush=True)

    timed_tokens, timed_seconds = 0, 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(micro_batches):
            tokens, targets = batch(stream, micro_batch, seq_len, rng)
            loss = moe_reference.model_loss(params, tokens, targets, cfg)[0]
            (loss / micro_batches).backward()
            loss_sum += loss.item() / micro_batches
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), float(o["grad_clip"])) \
            if o["grad_clip"] > 0 else torch.tensor(float("nan"))
        optimizer.step()
        seconds = time.perf_counter() - start
        if step > args.skip:
            timed_tokens += global_batch * seq_len
            timed_seconds += seconds
        print(f"step {step:>{len(str(args.steps))}}/{args.steps} | loss {loss_sum:.4f} | gnorm {grad_norm.item():.3f}"
              f" | {global_batch * seq_len / seconds:.0f} tok/s", flush=True)
    print(f"bench_torch_train: {args.steps} steps, {timed_tokens / timed_seconds:.1f} tok/s over steps "
          f"{args.skip + 1}..{args.steps}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run configuration (protobuf text), e.g. configs/tiny.pbtxt")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override like moeforge's --set (model./train./optim. fields; others ignored)")
    parser.add_argument("--data", required=True, help="directory of token shards (moeforge data prepare's train/)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the rate (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default nproc)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    try:
        train(args)
    except BenchError as err:
        print(f"bench_torch_train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
