"""Per-rank model-state memory, measured from the tensors held, and the ZeRO formulas it must equal.

Terms (Rajbhandari et al. 2020, fp32 training): Ψ = trainable parameter elements of this
model-parallel rank, each tensor once; Nd = dp size; P = padding elements added so that shards
split evenly (ZeRO-1/2: per gradient bucket, p_b = ⌈n_b/Nd⌉·Nd; ZeRO-3: per parameter, dim 0
rounded up to a multiple of Nd); Ψ_r = the parameter elements whose optimizer state this rank
holds (Σ_r Ψ_r = Ψ); e = bytes per element (4); K = optimizer bytes per element (Adam: 8, two
moments; SGD with momentum: 4).

    stage   parameters      gradients       optimizer state        total for Adam, P = 0
    0       eΨ              eΨ              KΨ                     16Ψ
    1       e(Ψ+P)          e(Ψ+P)          KΨ_r                   8Ψ + 8Ψ/Nd
    2       e(Ψ+P)          e(Ψ+P)/Nd       KΨ_r                   4Ψ + 12Ψ/Nd
    3       e(Ψ+P)/Nd       e(Ψ+P)/Nd       KΨ_r                   16Ψ/Nd

Measured: the distinct storages (untyped storages, counted once however many views share them)
of the parameters, of the gradients and of the optimizer's per-element state, at the end of an
optimizer step (ZeRO: the first one), when gradients are held. Optimizer scalars (a 0-d `step`
per stepped tensor) are reported apart.
"""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = _local(t.detach()).untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def psi_of(params) -> int:
    """Ψ: elements of the distinct trainable parameters (a DTensor counts at its full dp shape)."""
    seen, n = set(), 0
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def optimizer_bytes(state) -> tuple[int, int]:
    """(per-element state bytes, scalar state bytes) of an optimizer's `state` dict."""
    elems = [v for st in state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    scalars = [v for st in state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() == 0]
    return storage_bytes(elems), sum(v.numel() * v.element_size() for v in scalars)


def zero_formula(stage: int, psi: int, nd: int, padding: int = 0, owned: int | None = None,
                 k: int = 8, e: int = 4) -> dict[str, int]:
    """The table above, in bytes. `owned` = Ψ_r (default Ψ/Nd, or Ψ for stage 0)."""
    full = e * (psi + padding)
    if owned is None:
        owned = psi if stage == 0 else psi // nd
    params = e * psi if stage == 0 else full if stage < 3 else full // nd
    grads = e * psi if stage == 0 else full if stage == 1 else full // nd
    return {"parameters": params, "gradients": grads, "optimizer_state": k * owned}


def memory_breakdown(model, optimizer) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state (the run summary's `memory`).

    ZeRO: measured at the end of the first optimizer step. Plain data parallelism: measured now
    (the reducer keeps its gradient buckets between steps); with no reducer (dp = 1) gradients are
    freed between steps, and autograd's one gradient per parameter is counted from the shapes.
    Each entry also carries the formula's value (`formula`, K from the state actually held).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if hasattr(inner, "measure_memory"):  # a ZeRO optimizer measures its own shards
        out = dict(inner.measured) if inner.measured is not None else inner.measure_memory()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        reducer = getattr(optimizer, "reducer", None)
        grads = [b.buffer for b in getattr(reducer, "buckets", ()) if b.buffer is not None]
        grads += [p.grad for p in params if p.grad is not None]
        elem, scalar = optimizer_bytes(inner.state)
        psi = psi_of(params)
        g = storage_bytes(grads) if grads else sum(p.numel() * p.element_size() for p in params)
        out = {"zero": 0, "dp": model.mesh.dp_size if hasattr(model, "mesh") else 1, "psi": psi,
               "padding": 0, "owned": psi, "parameters": storage_bytes(params), "gradients": g,
               "optimizer_state": elem, "optimizer_scalars": scalar,
               "gradients_measured": bool(grads)}
        out["model_state"] = out["parameters"] + out["gradients"] + elem + scalar
    k = out["optimizer_state"] // max(1, out["owned"])
    out["formula"] = zero_formula(out["zero"], out["psi"], out["dp"], out["padding"], out["owned"],
                                  k=k)
    return out
