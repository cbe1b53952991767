"""The training loop of one harness run: :class:`Trainer` (setup, checkpoints, evaluation,
the step) and its summary, :class:`RunResult`. The one-call form is
:func:`normuon.harness.train.train_run`. The loop reads its settings from a
:class:`~normuon.harness.spec.RunSpec` and validates none of them again."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import (
    CHECKPOINT_NAME,
    atomic_save,
    check_checkpoint_identity,
    load_checkpoint,
    prepare_out_dir,
    write_json,
)
from .config import RunConfig
from .data import TokenData, get_batch, validation_batches
from .model import GPT
from .optimizers import build_optimizer, optimizer_state_bytes
from .parallel import full_state, is_sharded, load_full_state, wrap_model
from .runtime import init_distributed, progress_bar, sync
from .schedule import LRSchedule
from .signals import RunInterrupted, StopSignals
from .spec import MAX_SEED, RunSpec, resolve_spec

__all__ = ["MAX_SEED", "RunResult", "Trainer"]


@dataclass
class RunResult:
    """Summary of one run (also written as ``result.json``)."""

    optimizer: str
    seed: int
    steps: int
    """Steps completed (less than the config's when stopped early with ``stop_at_step``)."""
    final_val_loss: float
    val_steps: list[int]
    val_losses: list[float]
    val_times: list[float]
    """Training wall time (seconds, evaluation excluded) at each validation point."""
    train_time_s: float
    optimizer_time_s: float
    optimizer_share: float
    """Fraction of training wall time spent in ``optimizer.step()``."""
    optimizer_state_bytes: int
    tokens_per_s: float
    n_params: int
    device: str
    out_dir: str


class Trainer:
    """One run, step by step: build with the settings, :meth:`start`, then :meth:`fit`.

    ``spec``: a :class:`~normuon.harness.spec.RunSpec` that has (``optimizer``, ``seed``) among
    its trainings and was resolved with ``data`` (used as it is: nothing is validated again),
    or a :class:`~normuon.harness.config.RunConfig`, resolved here for this one training.
    ``train_run`` is the one-call form. The attributes ``spec``, ``step``, ``model``,
    ``optimizer`` and ``history`` are public for callers that drive the loop themselves
    (tests, notebooks).
    """

    def __init__(
        self,
        spec: RunSpec | RunConfig,
        optimizer: str,
        data: TokenData,
        *,
        seed: int = 0,
        out_dir: str | Path,
        device: str | None = None,
        dist_timeout_s: float | None = None,
        progress: bool | None = None,
        tensorboard: bool = False,
        diagnostics_every: int = 0,
    ) -> None:
        if isinstance(spec, RunSpec):
            spec.check_training(optimizer, seed, data)
        else:  # settings from Python code: resolved (validated once) for this training
            spec, data = resolve_spec(spec, data, optimizers=[optimizer], seeds=[seed])
        if not isinstance(diagnostics_every, int) or diagnostics_every < 0:
            raise ValueError(f"diagnostics_every must be an int >= 0, got {diagnostics_every!r}")
        self.spec, self.name, self.data, self.seed = spec, optimizer, data, seed
        self.tcfg = spec.train
        self.out = Path(out_dir)
        self.dist, self.device = init_distributed(device, dist_timeout_s)
        d = self.dist
        if d.world != spec.world_size:
            raise ValueError(f"the spec was resolved for {spec.world_size} process(es), this "
                             f"launch has {d.world}: resolve it in the launched ones")  # fmt: skip
        self.progress = progress if d.main else False
        self.identity = spec.identity(optimizer, seed)
        self._tensorboard = tensorboard
        self._diagnostics_every = diagnostics_every
        self._build()
        self.step, self.train_time, self.opt_time = 0, 0.0, 0.0
        self.history: list[dict[str, Any]] = []
        self.run_id = ""
        # Train-loss accumulator since the last log line (in the checkpoint, so that the
        # logged losses of a resumed run match too).
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.writer = None
        self.diagnostics = None

    # ---------------------------------------------------------------- setup

    def _build(self) -> None:
        """Model, optimizer, schedule, autocast and the fixed validation batches."""
        tcfg, dev = self.tcfg, self.device
        torch.manual_seed(self.seed)  # model init depends on the seed only, not the optimizer
        self.raw_model = GPT(self.spec.model).to(dev)
        self.n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.model = wrap_model(self.raw_model, tcfg, self.dist, dev)
        self.optimizer = build_optimizer(self.name, self.raw_model,
                                         self.spec.optimizers[self.name], dev)  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRSchedule(tcfg))
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if dev.type == "cuda" and tcfg.autocast_bf16
            else contextlib.nullcontext()
        )
        self.val_set = validation_batches(self.data.val, tcfg.batch_size, tcfg.seq_len,
                                          tcfg.val_batches)  # fmt: skip

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def start(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Claim the run folder (fresh) or restore the checkpoint there (``resume``)."""
        if self.dist.main:
            prepare_out_dir(self.out, resume=resume, overwrite=overwrite)
        if resume:
            self._restore()
        else:
            self.run_id = uuid.uuid4().hex
            self.history = [{"kind": "run", "run_id": self.run_id, "optimizer": self.name,
                             "seed": self.seed}]  # fmt: skip
        if self.dist.main:
            write_json(self.out / "config.json", {**self.identity, "budget":
                       self.spec.budget.to_json(), "run_id": self.run_id})  # fmt: skip
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            self._open_loggers()

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.checkpoint_path)
        check_checkpoint_identity(ckpt, self.identity, self.checkpoint_path)
        self.run_id = ckpt.get("run_id", "")
        self.history = self._read_own_metrics(int(ckpt["step"]))
        load_full_state(self.raw_model, self.optimizer, ckpt["model"], ckpt["optimizer"],
                         self.dist)  # fmt: skip
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if self.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], self.device)
        self.step, self.train_time, self.opt_time = ckpt["step"], ckpt["train_time"], ckpt[
            "opt_time"]  # fmt: skip
        self.loss_sum.copy_(ckpt["loss_sum"])
        self.loss_count = ckpt["loss_count"]

    def _read_own_metrics(self, step: int) -> list[dict[str, Any]]:
        """The metrics lines of this run up to ``step``; ValueError if they are another run's."""
        path = self.metrics_path
        if not path.is_file():
            raise ValueError(f"--resume: {path} is missing; the run folder is incomplete")
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line]
        except json.JSONDecodeError:
            raise ValueError(f"--resume: {path} is not JSON lines (damaged)") from None
        head = records[0] if records else {}
        if head.get("kind") != "run" or head.get("run_id") != self.run_id:
            raise ValueError(
                f"--resume: {path} belongs to another run than {self.checkpoint_path} (run ids "
                f"{head.get('run_id')!r} and {self.run_id!r}); start a fresh run with --overwrite"
            )
        # Lines written after the checkpoint (a crash) are dropped: they will be redone.
        return [records[0]] + [r for r in records[1:] if r["step"] <= step]

    def _open_loggers(self) -> None:
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            # purge_step: a resumed run drops the events written after its checkpoint.
            purge = self.step + 1 if self.step else None
            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)
        if self._diagnostics_every:
            if self.dist.world > 1 and is_sharded(self.raw_model):
                raise ValueError("diagnostics need whole parameters: not available with fsdp2")
            from normuon.diagnostics import NeuronDiagnostics, hidden_matrices

            path = self.out / "diagnostics.jsonl"
            if self.step and path.is_file():  # keep the records up to the checkpoint
                kept = [line for line in path.read_text().splitlines()
                        if line and json.loads(line)["step"] <= self.step]  # fmt: skip
                path.write_text("".join(line + "\n" for line in kept))
            elif path.exists():
                path.unlink()
            self.diagnostics = NeuronDiagnostics(
                hidden_matrices(self.raw_model), every=self._diagnostics_every, jsonl=path,
                writer=self.writer, start_step=self.step, model=self.raw_model,
            ).attach(self.optimizer)  # fmt: skip

    # ---------------------------------------------------------------- bookkeeping

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.dist.main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in ("train_loss", "val_loss", "lr", "tokens_per_s"):
                if key in record:
                    self.writer.add_scalar(f"{key}", record[key], record["step"])

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (a collective under torchrun: call on all ranks)."""
        model_state, opt_state = full_state(self.raw_model, self.optimizer, self.dist)
        if not self.dist.main:
            return
        atomic_save(
            {
                "step": self.step,  # also the data position: batch s depends on (seed, s) only
                "model": model_state,
                "optimizer": opt_state,
                "scheduler": self.scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device)
                if self.device.type == "cuda" else None,
                "train_time": self.train_time,
                "opt_time": self.opt_time,
                "loss_sum": self.loss_sum.detach().cpu(),
                "loss_count": self.loss_count,
                "run_json": json.dumps(self.identity),
                "run_id": self.run_id,
            },
            self.checkpoint_path,
        )  # fmt: skip

    def _shard(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Global batch (B, T) -> this rank's rows -> grad_accum micro-batches on the device.
        d, b = self.dist, self.tcfg.batch_size
        mine = x[d.rank * b // d.world : (d.rank + 1) * b // d.world]
        return list(mine.to(self.device, non_blocking=True).chunk(self.tcfg.grad_accum))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (all ranks together)."""
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for x, y in self.val_set:
            for xm, ym in zip(self._shard(x), self._shard(y), strict=True):
                with self.autocast:
                    total += self.model(xm, ym).double()
        self.model.train()
        if self.dist.world > 1:
            dist.all_reduce(total)
        return float(total) / (len(self.val_set) * self.tcfg.grad_accum * self.dist.world)

    # ---------------------------------------------------------------- the step

    def train_step(self) -> float:
        """One optimizer step on batch ``self.step``; returns the lr it used."""
        tcfg, dev = self.tcfg, self.device
        sync(dev)
        t0 = time.perf_counter()
        x, y = get_batch(self.data.train, tcfg.batch_size, tcfg.seq_len, self.seed, self.step)
        for i, (xm, ym) in enumerate(zip(self._shard(x), self._shard(y), strict=True)):
            last = i == tcfg.grad_accum - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync_ctx = (self.model.no_sync()
                        if self.dist.world > 1 and not last and hasattr(self.model, "no_sync")
                        else contextlib.nullcontext())  # fmt: skip
            with sync_ctx, self.autocast:
                loss = self.model(xm, ym) / tcfg.grad_accum
            with sync_ctx:
                loss.backward()
            self.loss_sum += loss.detach()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tcfg.grad_clip)
        lr_now = self.optimizer.param_groups[0]["lr"]
        sync(dev)
        t1 = time.perf_counter()
        self.optimizer.step()
        sync(dev)
        t2 = time.perf_counter()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss_count += 1
        self.train_time += time.perf_counter() - t0
        self.opt_time += t2 - t1
        return lr_now

    def _after_step(self, lr_now: float, bar: Any) -> None:
        """Logging, evaluation and periodic checkpoints due after step ``self.step``."""
        tcfg, step = self.tcfg, self.step
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            train_loss = float(self.loss_sum) / self.loss_count
            self.loss_sum.zero_()
            self.loss_count = 0
            tok_s = step * tcfg.batch_size * tcfg.seq_len / max(self.train_time, 1e-9)
            self.log({"kind": "train", "step": step, "train_loss": train_loss, "lr": lr_now,
                      "time": self.train_time, "tokens_per_s": tok_s})  # fmt: skip
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if step % tcfg.val_every == 0 or step == tcfg.steps:
            val = self.evaluate()
            self.log({"kind": "val", "step": step, "val_loss": val, "time": self.train_time})
            if not math.isfinite(val):
                raise FloatingPointError(
                    f"{self.name} (seed {self.seed}) diverged: validation loss {val} at step "
                    f"{step}; lower the learning rate"
                )
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _stop_requested(self, signals: StopSignals) -> int | None:
        """The signal that asked to stop, agreed by every rank (any rank's signal counts)."""
        flag = signals.received or 0
        if self.dist.world > 1:
            t = torch.tensor([flag], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag or None

    def fit(self, stop_at_step: int | None = None) -> RunResult:
        """Train to the configured steps (or ``stop_at_step``), checkpoint, return the summary.

        Raises :class:`RunInterrupted` (after checkpointing) on SIGINT/SIGTERM.
        """
        tcfg = self.tcfg
        end = tcfg.steps if stop_at_step is None else min(tcfg.steps, stop_at_step)
        bar = progress_bar(tcfg.steps, self.step, self.progress, f"{self.name} seed {self.seed}")
        try:
            with StopSignals() as signals:
                if self.step == 0:
                    self.log({"kind": "val", "step": 0, "val_loss": self.evaluate(), "time": 0.0})
                self.model.train()
                while self.step < end:
                    lr_now = self.train_step()
                    self._after_step(lr_now, bar)
                    if bar is not None:
                        bar.update(1)
                    signum = self._stop_requested(signals)
                    if signum is not None and self.step < end:
                        self.save_checkpoint()
                        raise RunInterrupted(signum, self.step, self.checkpoint_path)
                self.save_checkpoint()
                result = self.result()  # written before a late signal is handed on
        finally:
            if bar is not None:
                bar.close()
            self.close()
        return result

    def close(self) -> None:
        """Detach the diagnostics hooks and flush the TensorBoard writer."""
        if self.diagnostics is not None:
            self.diagnostics.detach()
            self.diagnostics = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def result(self) -> RunResult:
        """The run's summary; written as ``result.json`` by rank 0."""
        vals = [r for r in self.history if r["kind"] == "val"]
        tcfg = self.tcfg
        tt = self.train_time
        result = RunResult(
            optimizer=self.name,
            seed=self.seed,
            steps=self.step,
            final_val_loss=vals[-1]["val_loss"],
            val_steps=[r["step"] for r in vals],
            val_losses=[r["val_loss"] for r in vals],
            val_times=[r["time"] for r in vals],
            train_time_s=tt,
            optimizer_time_s=self.opt_time,
            optimizer_share=self.opt_time / tt if tt > 0 else 0.0,
            optimizer_state_bytes=optimizer_state_bytes(self.optimizer),
            tokens_per_s=self.step * tcfg.batch_size * tcfg.seq_len / tt if tt > 0 else 0.0,
            n_params=self.n_params,
            device=str(self.device),
            out_dir=str(self.out),
        )
        if self.dist.main:
            write_json(self.out / "result.json", dataclasses.asdict(result))
        return result
