"""What shows that a trainer's sharded backend (DeepSpeed ZeRO, FSDP) is really active, for checks and tests.

A backend config that is silently ignored (accelerate falls back to DDP, e.g. a FSDP config on processes it does not
take for GPUs) trains with whole parameters on every process and exits 0; these figures tell the two apart.
"""

from __future__ import annotations


# Backend names, as the checks and tests request them: (DeepSpeed ZeRO stage, FSDP version).
BACKENDS = {"none": (None, None), "zero2": (2, None), "zero3": (3, None), "fsdp1": (None, 1), "fsdp2": (None, 2)}


def sharding_evidence(trainer) -> dict:
    """The wrapper, distributed type, ZeRO stage or FSDP version, and the parameter elements this process holds
    (``local_numel``) of the whole model's (``full_numel``); ZeRO-2 counts the optimizer's fp32 master weights, the
    part it partitions. Call after the model is prepared (after ``train()``)."""
    wrapped = trainer.model_wrapped
    evidence = {"wrapper": type(wrapped).__name__, "distributed_type": str(trainer.accelerator.distributed_type)}
    params = list(wrapped.parameters())
    if trainer.is_deepspeed_enabled:
        evidence["zero_stage"] = wrapped.zero_optimization_stage()
        if evidence["zero_stage"] == 2:
            evidence["full_numel"] = sum(p.numel() for p in params if p.requires_grad)
            evidence["local_numel"] = sum(p.numel() for p in wrapped.optimizer.single_partition_of_fp32_groups)
        if evidence["zero_stage"] == 3:
            # A partitioned ZeRO-3 parameter holds an empty local tensor outside a forward.
            evidence["full_numel"] = sum(p.ds_numel for p in params)
            evidence["local_numel"] = sum(p.numel() for p in params)
    elif trainer.is_fsdp_enabled:
        evidence["fsdp_version"] = trainer.accelerator.state.fsdp_plugin.fsdp_version
        if evidence["fsdp_version"] == 2:
            from torch.distributed.tensor import DTensor

            if not all(isinstance(p, DTensor) for p in params):
                raise AssertionError("FSDP2 is enabled but the model's parameters are not DTensors.")
            evidence["full_numel"] = sum(p.numel() for p in params)
            evidence["local_numel"] = sum(p.to_local().numel() for p in params)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            flat = [m._flat_param for m in FSDP.fsdp_modules(wrapped) if m._flat_param is not None]
            evidence["full_numel"] = sum(p._unpadded_unsharded_size.numel() for p in flat)
            evidence["local_numel"] = sum(p._local_shard.numel() for p in flat)
    else:
        evidence["full_numel"] = evidence["local_numel"] = sum(p.numel() for p in params)
    return evidence


def backend_mismatch(backend: str, evidence: dict, num_processes: int) -> str | None:
    """Why ``evidence`` does not show ``backend`` (a name of :data:`BACKENDS`) active, or ``None`` when it does. On
    several processes a sharded backend must hold less than the whole model on this process."""
    stage, version = BACKENDS[backend]
    if evidence.get("zero_stage") != stage or evidence.get("fsdp_version") != version:
        return (
            f"the `{backend}` backend was requested but the run used {evidence['distributed_type']} (wrapper "
            f"{evidence['wrapper']}, ZeRO stage {evidence.get('zero_stage')}, FSDP version "
            f"{evidence.get('fsdp_version')}): the accelerate config was not applied."
        )
    if backend != "none" and num_processes > 1 and not evidence["local_numel"] < evidence["full_numel"]:
        return (
            f"the `{backend}` backend is on but this process holds all {evidence['full_numel']} parameter elements "
            "(nothing is sharded)."
        )
    return None
