"""Run torchtitan 0.3.0's own trainer on CPU with gloo, changing nothing inside torchtitan.

torchtitan targets accelerators; on a CPU-only machine with torch 2.13 it stops at seven places.
This launcher patches them from outside, before ``torchtitan.train.main()`` runs:

1. the device type defaults to CUDA when no accelerator is found (``torchtitan.tools.utils``
   asks ``torch._utils._get_available_device_type() or "cuda"`` once, at import): it is made
   ``"cpu"``, with a device module that answers torchtitan's memory and name queries;
2. ``torchtitan.distributed.minimal_async_ep.kernels`` imports triton at import time (through
   the model's token dispatcher): a stand-in module without triton is registered, whose
   kernels raise if called (they only serve CUDA expert parallelism); likewise Hugging Face
   ``datasets`` when it is not installed (the trainer imports its HF text loaders, which the
   loader below replaces);
3. torch 2.13 has no ``torch.distributed.set_timeout`` (called after the first step): a
   no-op stands in (it only shortens collective timeouts); the barrier before it passes
   ``device_ids`` (the device module's current device), which only NCCL takes: dropped;
4. gloo rejects ``PREMUL_SUM``, which FSDP2 uses for the ``gradient_divide_factor=1.0``
   torchtitan sets: on CPU the reduce-scatter sums instead, the same numbers (a factor of 1);
5. FlexAttention is compiled and has no CPU backward: the configs use causal SDPA (see 7),
   which torchtitan's decoder takes without masks;
6. torchtitan calls pipeline schedules with inputs already split into microbatches
   (``step(arg_mbs=..., kwarg_mbs=...)``), an API torch 2.13's schedules lack: such calls are
   routed to the schedules' ``_step_microbatches``;
7. the debug configs read a tokenizer folder and the ``c4_test`` dataset from a torchtitan
   checkout (and Hugging Face ``datasets``): the CPU configs below start from those of
   :mod:`normuon.integrations.torchtitan_data` (torchtitan's debug configs with causal SDPA,
   normuon's byte tokenizer and a loader over its embedded Shakespeare corpus, which also run
   on CUDA with the stock ``-m torchtitan.train``).

The CPU configs add float32 everywhere and a small batch (4 x 64 bytes). The loader's training
step ``s`` reads the same rows of one stream (``torchtitan_data.corpus_rows``) at every
data-parallel world size and pipeline microbatching, so runs of any layout see the same data.

Use it in place of ``-m torchtitan.train``::

    torchrun --nproc_per_node=2 tests/torchtitan_cpu.py \
        --module torchtitan_cpu --config llama3_debugmodel_cpu \
        --override.imports normuon.integrations.torchtitan.normuon

``NORMUON_TT_METRICS=FILE`` appends one JSON line per logged step and rank that sees the loss
(step, rank, loss, grad_norm, lr of every group), for tests and plots.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import torch

_PATCHED = "_normuon_torchtitan_cpu_patched"


class _CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the CUDA-style queries torchtitan makes of its device module."""

    def __init__(self) -> None:
        super().__init__("torchtitan_cpu_device")
        self.__dict__.update(
            {k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")}
        )

    @staticmethod
    def device_count() -> int:
        return 1  # every rank uses "cpu:0"

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(device=None):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return types.SimpleNamespace(name="cpu", total_memory=pages)

    @staticmethod
    def memory_stats(device=None) -> dict:
        return {}  # no allocator statistics on CPU: torchtitan logs -1

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def stub_triton_kernels() -> None:
    """Register a stand-in for the one torchtitan module that imports triton eagerly."""
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return  # already imported, or importable for real
    module = types.ModuleType(name)

    def _missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def kernel(*args, **kwargs):
            raise RuntimeError(f"{attr} needs triton on CUDA (MinimalAsyncEP); not on CPU")

        return kernel

    module.__getattr__ = _missing  # type: ignore[method-assign]
    sys.modules[name] = module


def _stub_missing_datasets() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:

        def _absent(*args, **kwargs):
            raise RuntimeError("Hugging Face datasets is not installed; use the CPU loader")

        package = types.ModuleType("datasets")
        package.__path__ = []  # a package, so that datasets.distributed imports
        package.Dataset = type("Dataset", (), {})
        package.IterableDataset = type("IterableDataset", (), {})
        package.load_dataset = package.concatenate_datasets = _absent
        distributed = types.ModuleType("datasets.distributed")
        distributed.split_dataset_by_node = _absent
        package.distributed = distributed
        sys.modules["datasets"], sys.modules["datasets.distributed"] = package, distributed


def patch_torchtitan_for_cpu() -> None:
    """Apply the patches 1-4 and 6 above (idempotent); call before torchtitan is imported.
    (5 and 7 are in the configs.)"""
    if getattr(torch, _PATCHED, False):
        return
    if "torchtitan.tools.utils" in sys.modules:
        raise RuntimeError("patch_torchtitan_for_cpu() must run before torchtitan is imported")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import torch._utils as tu

    # 1. torchtitan.tools.utils computes device_type/device_module once, at import, from these.
    saved = tu._get_available_device_type, tu._get_device_module
    device_module = _CpuDeviceModule()
    tu._get_available_device_type = lambda: "cpu"
    tu._get_device_module = lambda device_type: device_module
    try:
        import torchtitan.tools.utils  # noqa: F401
    finally:
        tu._get_available_device_type, tu._get_device_module = saved

    # 2. triton, and Hugging Face datasets when it is not installed
    stub_triton_kernels()
    _stub_missing_datasets()

    # 3. torch.distributed.set_timeout (torch 2.13 has none)
    import torch.distributed as dist

    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda timeout, group=None: None

    # 4. PREMUL_SUM: sum on CPU (torchtitan's factor is 1.0, so the sum is the same value).
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    divide_factors = collectives._get_gradient_divide_factors

    def _sum_on_cpu(*args, **kwargs):
        device_type = kwargs.get("device_type", args[3] if len(args) > 3 else "")
        if device_type == "cpu":
            kwargs["force_sum_reduction_for_comms"] = True
            args = args[:5]  # force_sum_reduction_for_comms is the 6th, given by keyword
        return divide_factors(*args, **kwargs)

    collectives._get_gradient_divide_factors = _sum_on_cpu

    # 3 (continued). torchtitan's barrier passes device_ids, an argument for NCCL only.
    barrier = dist.barrier

    def _barrier(group=None, async_op=False, device_ids=None):
        return barrier(group=group, async_op=async_op)

    dist.barrier = _barrier
    _pipeline_steps_per_microbatch()
    _record_metrics()
    setattr(torch, _PATCHED, True)


def _pipeline_steps_per_microbatch() -> None:
    """torchtitan 0.3.0 calls ``schedule.step(arg_mbs=..., kwarg_mbs=..., target_mbs=...)`` with
    inputs already split into microbatches (a newer torch API); torch 2.13's ``step`` takes the
    whole batch and splits it itself. Route per-microbatch calls to ``_step_microbatches``, with
    the preamble and the merge of torch 2.13's own ``step``."""
    from torch.distributed.pipelining import schedules

    for cls in (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti):
        if "arg_mbs" in cls.step.__code__.co_varnames:
            continue  # a torch that has the per-microbatch API

        def step(self, *args, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None,
                 return_outputs=True, loss_kwargs=None, _whole_batch=cls.step,
                 **kwargs):  # fmt: skip
            if arg_mbs is None and kwarg_mbs is None and target_mbs is None:
                return _whole_batch(self, *args, losses=losses, return_outputs=return_outputs,
                                    loss_kwargs=loss_kwargs, **kwargs)  # fmt: skip
            stages = getattr(self, "_stages", None) or [self._stage]
            for stage in stages:
                stage.has_backward = self._has_backward
                stage.clear_runtime_states()
            self._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs,
                                    loss_kwargs=loss_kwargs)  # fmt: skip
            for stage in stages:
                if stage.is_last and return_outputs:
                    return self._merge_outputs(stage.output_chunks)
            return None

        cls.step = step


def _record_metrics() -> None:
    """NORMUON_TT_METRICS=FILE: one JSON line per logged step and rank that sees the loss
    (pipeline parallelism: only the ranks holding the last stage; torchtitan logs -1 elsewhere),
    with the lr of every group."""
    path = os.environ.get("NORMUON_TT_METRICS")
    if not path:
        return
    from torchtitan.components.metrics import MetricsProcessor

    log = MetricsProcessor.log

    def logged(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if float(global_avg_loss) != -1.0:
            lrs = [float(g["lr"]) for opt in self.optimizers for g in opt.param_groups]
            line = json.dumps({"step": step, "rank": rank, "loss": float(global_avg_loss),
                               "grad_norm": float(grad_norm), "lrs": lrs})  # fmt: skip
            with open(path, "a") as f:  # one short append per line: whole lines, any order
                f.write(line + "\n")
        return log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)

    MetricsProcessor.log = logged


# ----------------------------------------------------------------------------- configs

# The trainer's configs, defined in the patched process only: torchtitan's ConfigManager imports
# this file as the module ``torchtitan_cpu`` (``--module torchtitan_cpu``) after main() patched,
# and normuon.integrations.torchtitan_data imports torchtitan, which must come after the patches.
if getattr(torch, _PATCHED, False):
    from normuon.integrations.torchtitan_data import with_embedded_data

    def _cpu(config, model: str, n_layers: int | None = None):
        """A debug config on the embedded corpus (normuon.integrations.torchtitan_data: byte
        tokenizer, SDPA attention, partial_dtensor, no validation) made runnable on CPU:
        float32 everywhere, no CUDA graphs, a small batch."""
        config = with_embedded_data(config, model, n_layers)
        config.training.mixed_precision_param = "float32"
        config.training.local_batch_size = 4
        config.training.seq_len = 64
        config.training.disable_cuda_graphs = True
        config.metrics.log_freq = 1
        return config

    def llama3_debugmodel_cpu():
        """torchtitan's Llama 3 debug model (6 layers, d=256, vocab 2048), on CPU."""
        from torchtitan.models.llama3.config_registry import llama3_debugmodel

        return _cpu(llama3_debugmodel(), "llama3")

    def deepseek_v3_debugmodel_cpu():
        """torchtitan's DeepSeek-V3 debug model cut to its first 2 layers (a dense one, then MoE:
        8 routed experts as (E, F, D) stacks, a router, shared experts), on CPU."""
        from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel

        return _cpu(deepseek_v3_debugmodel(), "deepseek_v3", n_layers=2)


def main(argv: list[str] | None = None) -> None:
    """``python -m torchtitan.train`` on CPU: patch, then run torchtitan's own main()."""
    patch_torchtitan_for_cpu()
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from torchtitan.train import main as torchtitan_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    torchtitan_main()


if __name__ == "__main__":
    main()
