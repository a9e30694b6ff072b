#!/usr/bin/python3
"""torch.optim.AdamW as the reference for moeforge's AdamW (optim/adamw.cpp).

Usage: /usr/bin/python3 tests/reference/adamw_reference.py --dir DIR

Reads  DIR/config.json  {"beta1", "beta2", "eps", "weight_decay", "lrs": [lr per step],
                         "params": [{"name", "weight_decay": bool}, ...]}
       DIR/params/<name>.npy            float32 initial values
       DIR/grads/<step>/<name>.npy      float32 gradient of each step (step = 0 .. len(lrs)-1)
Runs one torch.optim.AdamW step per entry of "lrs" (parameters with weight_decay false in a
param group with weight_decay 0, the others with the configured one) and writes
       DIR/torch/<name>.param.npy, DIR/torch/<name>.exp_avg.npy, DIR/torch/<name>.exp_avg_sq.npy

Only Debian's python3-torch and python3-numpy are needed; CPU, float32, one thread (the update is
elementwise, so threads change nothing but the run time). Bad input exits with code 2 and one
message naming the file.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch


class InputError(Exception):
    """A bad file in the exchange directory; reported as one message with exit code 2."""


def load_array(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: missing")
    try:
        array = np.load(path)
    except ValueError as err:
        raise InputError(f"{path}: not a .npy file ({err})") from err
    if array.dtype != np.float32:
        raise InputError(f"{path}: expected float32, found {array.dtype}")
    return torch.from_numpy(array.copy())


def load_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: {err}") from err
    for key in ("beta1", "beta2", "eps", "weight_decay", "lrs", "params"):
        if key not in cfg:
            raise InputError(f"{path}: missing field '{key}'")
    if not cfg["lrs"] or not cfg["params"]:
        raise InputError(f"{path}: 'lrs' and 'params' must be non-empty lists")
    return cfg


def run(directory):
    cfg = load_config(os.path.join(directory, "config.json"))
    names = [p["name"] for p in cfg["params"]]
    params = {name: load_array(os.path.join(directory, "params", name + ".npy")) for name in names}
    decayed = [params[p["name"]] for p in cfg["params"] if p["weight_decay"]]
    exempt = [params[p["name"]] for p in cfg["params"] if not p["weight_decay"]]
    groups = [g for g in ({"params": decayed, "weight_decay": cfg["weight_decay"]},
                          {"params": exempt, "weight_decay": 0.0}) if g["params"]]
    # foreach=False: the plain per-tensor loop, the formula the C++ code states it follows.
    optimizer = torch.optim.AdamW(groups, lr=cfg["lrs"][0], betas=(cfg["beta1"], cfg["beta2"]),
                                  eps=cfg["eps"], foreach=False)
    for step, lr in enumerate(cfg["lrs"]):
        for name, param in params.items():
            grad = load_array(os.path.join(directory, "grads", str(step), name + ".npy"))
            if grad.shape != param.shape:
                raise InputError(f"grads/{step}/{name}.npy: shape {tuple(grad.shape)}, "
                                 f"parameter has {tuple(param.shape)}")
            param.grad = grad
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()

    out = os.path.join(directory, "torch")
    os.makedirs(out, exist_ok=True)
    for name, param in params.items():
        state = optimizer.state[param]
        np.save(os.path.join(out, name + ".param.npy"), param.detach().numpy())
        np.save(os.path.join(out, name + ".exp_avg.npy"), state["exp_avg"].numpy())
        np.save(os.path.join(out, name + ".exp_avg_sq.npy"), state["exp_avg_sq"].numpy())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="exchange directory written by the C++ test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        run(args.dir)
    except InputError as err:
        print(f"adamw_reference.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
