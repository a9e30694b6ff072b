// Where the model's tensors live, and the few places values cross to the host.
//
// A model runs on one device (ProcessGrid::device(): the CPU, or this rank's GPU). Parameters,
// gradients and optimizer state are allocated there by the registry; every activation is
// allocated on the device of the block's input (`Tensor::empty(shape, dtype, dev)` with `dev` read
// from the input), so the same model code runs on either backend and the ops dispatch on it.
//
// Only a few values must reach the host, each by an explicit copy through host(): the expert
// counts that size the EP all-to-all-v and rank capacity drops, the per-layer router losses, the
// per-row cross-entropy and the expert loads (telemetry, bias updates). On the CPU host() returns
// the tensor itself, so CPU runs copy nothing and compute exactly what they did before.
#pragma once

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace moeforge {

// A zero-filled tensor on any device (Tensor::zeros is host-only; a device tensor is filled by
// the catalog's fill on its compute stream).
inline Tensor zeros_on(const Shape& shape, DType dtype, Device device) {
  if (device.is_cpu()) return Tensor::zeros(shape, dtype);
  Tensor t = Tensor::empty(shape, dtype, device);
  ops::fill(t, 0.0f);
  return t;
}

// t itself when it is on the host, else a host copy (waits for the device's queued work).
inline Tensor host(const Tensor& t) { return t.device().is_cpu() ? t : t.to_device(Device::cpu()); }

// t itself when it is on `device`, else a copy there.
inline Tensor on_device(const Tensor& t, Device device) { return t.device() == device ? t : t.to_device(device); }

// dst = src for tensors of the same shape and dtype on any devices (through one staging copy
// when they differ). For rare host-computed updates of device tensors, not for the step's ops.
inline void copy_across(const Tensor& src, const Tensor& dst) { ops::copy(on_device(src, dst.device()), dst); }

}  // namespace moeforge
