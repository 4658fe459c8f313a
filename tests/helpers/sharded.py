"""Sharded backends (DeepSpeed ZeRO-2/3, FSDP1/FSDP2) on CPU processes, for the 2-process tests.

Each backend is a set of training arguments (the tests carry their own configs, so the user-facing files in
recipes/accelerate/ stay GPU configs). ZeRO-3 sets ``stage3_param_persistence_threshold: 0``: with the default
threshold a tiny model keeps every parameter whole on every process, and a forward is then not collective, which
would hide any code path that runs a forward on one process only.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType


def _deepspeed(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
    }


def _fsdp(version: int) -> dict:
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": version,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            # FSDP1's full state dict offloads to CPU, which on CPU processes aliases memory it then frees (the clone
            # that follows segfaults): FSDP1 saves sharded here, so its plain-model save is checked on GPUs only.
            "state_dict_type": "FULL_STATE_DICT" if version == 2 else "SHARDED_STATE_DICT",
            "use_orig_params": True,  # FSDP1 with LoRA: frozen and trained parameters share flat parameters
            "sync_module_states": False,  # FSDP1 refuses it on CPU; every process loads the same weights anyway
        },
    }


BACKENDS = {
    "zero2": {"deepspeed": _deepspeed(2)},
    "zero3": {"deepspeed": _deepspeed(3)},
    "fsdp1": _fsdp(1),
    "fsdp2": _fsdp(2),
}


def backend_args(backend: str) -> dict:
    """Training-argument overrides that turn ``backend`` on; call :func:`on_cpu` once the arguments are built."""
    return BACKENDS[backend]


def on_cpu(backend: str) -> None:
    """Test-only set-up of ``backend`` in CPU processes, between building the training arguments (which reset the
    distributed state) and building the trainer."""
    if backend.startswith("fsdp"):
        fsdp_on_cpu()
    else:
        deepspeed_on_cpu()


def deepspeed_on_cpu() -> None:
    """Test-only: give DeepSpeed the CPU processes' gloo group.

    On GPUs accelerate starts DeepSpeed's communication when it sets the process group up; with ``use_cpu`` it sets up
    plain gloo and DeepSpeed would see a world of 1 (its batch-size check then fails). ``init_distributed`` adopts the
    group that already exists.
    """
    import deepspeed

    PartialState(cpu=True)
    deepspeed.init_distributed(dist_backend="gloo")


def fsdp_on_cpu() -> None:
    """Test-only: let accelerate turn FSDP on in CPU processes.

    ``AcceleratorState`` switches to FSDP only from a GPU-type distributed mode (MULTI_GPU and its kin), and CPU
    processes start as MULTI_CPU, so an FSDP config is silently ignored there and the run is plain DDP. Marking the
    (already initialised, gloo, device cpu) shared state MULTI_GPU after the training arguments are built and before
    the trainer builds its Accelerator makes the
    FSDP plugin apply, as on GPUs. Real runs on GPUs never need this.
    """
    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU
        # accelerate names the CPU device "cpu:<local rank>"; FSDP1 compares it with its own compute device, "cpu".
        state.device = torch.device("cpu")


@torch.no_grad()
def full_weights(trainer) -> dict[str, torch.Tensor]:
    """The whole trained weights on this process (gathered from the shards), by the plain model's names."""
    wrapped = trainer.model_wrapped
    model = trainer.accelerator.unwrap_model(wrapped)
    if trainer.is_deepspeed_enabled and wrapped.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    if trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, writeback=False):
            return {_plain_name(n): p.detach().clone() for n, p in wrapped.named_parameters()}
    weights = {}
    for name, p in model.named_parameters():
        weights[name] = p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
    return weights


def _plain_name(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name
