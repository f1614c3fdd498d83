"""Where one training step of MPMA spends its time, and the same step of open_clip's ViT-B/16 beside it (issue 15).

    python benchmarks/bench_step.py [--models mpma_base mpma_small] [--steps 3] [--variants before after]

The step is the one a user compares first: batch 8, ``image_size`` px (288 for ``mpma_base``), 64 text tokens of
which 10 are [MASK]ed, ``model(batch)["loss"].backward()``, AdamW, under bf16 autocast, one process. Beside it,
open_clip's ``create_model("ViT-B-16")`` (random weights, nothing downloaded), batch 8, 224 px, context 77,
``ClipLoss``, bf16 autocast, AdamW: ``pip install .[bench]``.

For each model and variant ("before" = the settings of before issue 15: checkpointing on, SDPA, torch's default
AdamW, glibc's malloc settings; "after" = today's defaults as ``build_engine`` runs them on a CPU: ``AdamW(fused=True)``
and the host memory a step frees kept for the next (`mpma_ds.training.host_memory`); "after+glibc_malloc" = the
same with glibc's settings, i.e. before that; "+full" / "+full_image" = with that ``align_on``)
it prints one table row per part of the step (each open_clip step uses the AdamW of the rows it is compared with):

- time: one step under ``torch.profiler``. The forward of each part is the time inside a ``record_function``
  range that module hooks open around it (nested parts are subtracted from their parent); its backward is the
  time of the autograd nodes created inside those ranges (matched by the profiler's sequence numbers), the
  recomputation of checkpointed blocks included; "optimizer" is ``AdamW.step`` + ``zero_grad``.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one step (forward + backward, per module, as
  `mpma_ds.models.flops` counts the whole model): matmul / attention work, recomputation left out (model FLOPs).
- share of the step and achieved FLOP/s, also as a fraction of the bf16 matmul peak measured in the same run.

Samples/s come from un-profiled steps, the models taking turns step by step (median of each), so load on a
shared machine hits every setting alike; the ratio to open_clip (run with the same AdamW and the same malloc
settings) is printed, and the minor page faults of each step. The malloc settings are the process's: each round
runs the settings with glibc's first, then those that keep freed memory, and a step right after a switch is run
untimed first (it pays the switch: the pages glibc handed back fault in again, or the kept ones are handed
back), so each timed step is one of its setting's steady state. Writes
benchmarks/results/bench_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import matmul_peak, run_info, sync  # noqa: E402 -- the same peak bench_model measures

from mpma_ds.models import MPMA, MPMAConfig, get_model_config  # noqa: E402
from mpma_ds.training.host_memory import keep_freed_host_memory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

BATCH, TEXT_LEN, N_MASKED = 8, 64, 10
# The settings before issue 15 (checkpointing on for base/small, SDPA attention on CPU, torch's default AdamW,
# a for-loop over the parameters on CPU); "after" is today's defaults with the fused AdamW.
BEFORE = dict(grad_checkpointing=True, attn_impl="sdpa")
VARIANTS: dict[str, dict[str, Any]] = {
    "before": BEFORE,
    "after": {},
    "after+glibc_malloc": {},
    "before+full": {**BEFORE, "align_on": "full"},
    "after+full": dict(align_on="full"),
    "after+full_image": dict(align_on="full_image"),
}
ADAMW = {"before": "default"}
"""The AdamW implementation of a variant (by its name before "+"): "default" (``torch.optim.AdamW(...)``) or
"fused" (``fused=True``: one kernel over all parameters, ~5x faster on CPU); the rest use "fused"."""


def variant_adamw(variant: str) -> str:
    return ADAMW.get(variant.split("+")[0], "fused")


GLIBC_MALLOC = "+glibc_malloc"


def malloc_twin(setting: Setting, variant: str) -> Setting:
    """``setting``'s model, batch and optimizer run as ``variant`` ("...+glibc_malloc": with glibc's malloc
    settings): the two rows share one model (the weights they step do not change what a step costs), so a run
    holds one copy of the model and its AdamW state, not two."""
    twin = copy.copy(setting)
    mpma = hasattr(setting.model, "fusion")
    twin.label = f"{setting.label.rsplit(' ', 1)[0]} {variant}" if mpma else f"{setting.label}, glibc malloc"
    twin.keep_host_memory = variant_keeps_host_memory(variant)
    twin.times, twin.faults = [], []
    return twin


def variant_keeps_host_memory(variant: str) -> bool:
    """Whether a variant's steps keep freed host memory (``build_engine`` on CPU since issue 15): not "before",
    not "+glibc_malloc"."""
    return not (variant.startswith("before") or variant.endswith(GLIBC_MALLOC))


ROWS = (
    "image encoder",
    "text encoder",
    "align_on full: extra pass",
    "fusion: self-attention",
    "fusion: cross-attention",
    "fusion: memory top-k",
    "fusion: FFN, norms, in-proj",
    "MAE decoder",
    "MLM head",
    "GLA projections",
    "global loss",
    "local loss",
    "ITM head",
    "other (masking, pooling, MIM loss)",
    "grad accumulation",
    "optimizer (AdamW)",
)
_FUSION_PARTS = {
    "t_self": "fusion: self-attention",
    "v_self": "fusion: self-attention",
    "t_cross": "fusion: cross-attention",
    "v_cross": "fusion: cross-attention",
    "memory": "fusion: memory top-k",
}
_TOP = {
    "image_encoder": "image encoder",
    "text_encoder": "text encoder",
    "fusion": "fusion: FFN, norms, in-proj",
    "text_to_fusion": "fusion: FFN, norms, in-proj",
    "image_to_fusion": "fusion: FFN, norms, in-proj",
    "modality_embed": "fusion: FFN, norms, in-proj",
    "mae_decoder": "MAE decoder",
    "mlm_head": "MLM head",
    "image_proj": "GLA projections",
    "text_proj": "GLA projections",
    "global_loss": "global loss",
    "local_loss": "local loss",
    "itm_head": "ITM head",
}
OTHER = "other (masking, pooling, MIM loss)"
RANGE_PREFIX = "mpma."


ALIGN_FULL = "align_full."
"""Name part of the encoders' second call in one forward: the extra unmasked pass of ``align_on: full``."""
_ROW_KEY = "bench_step_row"


def classify(names: list[str]) -> str:
    """The table row of an op, from the names of the tracked ranges around it (outermost first)."""
    for name in reversed(names):
        if not name.startswith(RANGE_PREFIX):
            continue
        path = name[len(RANGE_PREFIX) :]
        if path.startswith(ALIGN_FULL):
            return "align_on full: extra pass"
        parts = path.split(".")
        if parts[0] == "fusion" and parts[-1] in _FUSION_PARTS:
            return _FUSION_PARTS[parts[-1]]
        if parts[0] in _TOP:
            return _TOP[parts[0]]
    return OTHER


def tracked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules the table names: MPMA's top-level children and each fusion layer's attention / memory."""
    out = {name: mod for name, mod in model.named_children() if mod is not None}
    fusion = getattr(model, "fusion", None)
    if fusion is not None:
        for name, mod in fusion.named_modules():
            if name.split(".")[-1] in _FUSION_PARTS and mod is not None:
                out[f"fusion.{name}"] = mod
    return out


class StepInstrument:
    """Module hooks that name each tracked module's forward ``mpma.<path>`` (``mpma.align_full.<encoder>`` for an
    encoder's second call in one forward) and, as asked, open a profiler ``record_function`` range of that name
    (``ranges``) or label the autograd nodes its forward created with its table row (``label``), so the
    backward's work can be charged to the part whose forward it differentiates."""

    def __init__(self, model: nn.Module, *, ranges: bool = False, label: bool = False) -> None:
        self.ranges, self.label = ranges, label
        self.stack: list[str] = []
        self.calls: dict[str, int] = defaultdict(int)
        self.handles = [model.register_forward_pre_hook(lambda *_: self.calls.clear())]
        for name, mod in tracked_modules(model).items():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(), always_call=True))

    def _pre(self, name: str) -> Callable:
        def hook(_module, _args):  # noqa: ANN001, ANN202
            self.calls[name] += 1
            second = name in ("image_encoder", "text_encoder") and self.calls[name] > 1
            full = RANGE_PREFIX + (ALIGN_FULL if second else "") + name
            record = torch.ops.profiler._record_function_enter_new(full, None) if self.ranges else None
            self.stack.append((full, record, _peek_sequence_nr() if self.label else 0))

        return hook

    def _post(self) -> Callable:
        def hook(_module, _args, output):  # noqa: ANN001, ANN202
            full, record, first_seq = self.stack.pop()
            if record is not None:
                torch.ops.profiler._record_function_exit._RecordFunction(record)
            if self.label:
                _label_graph(output, classify([n for n, _, _ in self.stack] + [full]), first_seq)

        return hook

    def names(self) -> list[str]:
        return [n for n, _, _ in self.stack]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _peek_sequence_nr() -> int:
    """The sequence number the next autograd node will get (that of a throw-away node, + 1)."""
    with torch.enable_grad():
        return torch.ones((), requires_grad=True).mul(1.0).grad_fn._sequence_nr() + 1


def _label_graph(output: Any, row: str, first_seq: int) -> None:
    """Label every autograd node behind ``output`` created since ``first_seq`` and not labelled yet with ``row``
    (inner modules' hooks run first, so a node keeps the innermost part's row)."""
    todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    seen = set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or node._sequence_nr() < first_seq:
            continue  # None / a leaf's AccumulateGrad (its number is huge but it has no metadata worth setting)
        seen.add(id(node))
        if type(node).__name__ == "AccumulateGrad":
            continue
        node.metadata.setdefault(_ROW_KEY, row)
        todo.extend(n for n, _ in node.next_functions)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return []


class RowFlopCounter(FlopCounterMode):
    """`FlopCounterMode` that also adds each op's FLOPs to a table row: in the forward, the row of the tracked
    modules it runs in; in the backward, the row its autograd node was labelled with (`StepInstrument`)."""

    def __init__(self, instrument: StepInstrument) -> None:
        super().__init__(display=False)
        self.instrument = instrument
        self.rows: dict[str, float] = defaultdict(float)

    def _count_flops(self, func_packet, out, args, kwargs):  # noqa: ANN001, ANN202 -- FlopCounterMode's hook
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            node = torch._C._current_autograd_node()
            if node is None:
                row = classify(self.instrument.names())
            else:
                row = node.metadata.get(_ROW_KEY, OTHER) if hasattr(node, "metadata") else OTHER
            self.rows[row] += flops
        return super()._count_flops(func_packet, out, args, kwargs)


# --------------------------------------------------------------------------------------------- the step
def make_batch(cfg: MPMAConfig, *, batch: int = BATCH, text_len: int = TEXT_LEN, n_masked: int = N_MASKED) -> dict:
    """One pretraining batch: random images at the model's size, ``text_len`` tokens of which ``n_masked`` per
    report are [MASK] (id 4) with their labels, no padding."""
    text_len = min(text_len, cfg.max_text_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    labels = torch.full_like(ids, -100)
    for i in range(batch):
        pos = torch.randperm(text_len - 2, generator=g)[:n_masked] + 1
        labels[i, pos] = ids[i, pos]
        ids[i, pos] = 4
    return {
        "image": torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
        "mlm_labels": labels,
    }


@dataclass
class Setting:
    """One model + batch + optimizer whose ``step()`` runs one training step under bf16 autocast."""

    label: str
    model: nn.Module
    loss_fn: Callable[[], torch.Tensor]
    batch_size: int
    adamw: str = "fused"
    keep_host_memory: bool = True
    optimizer: torch.optim.Optimizer = field(init=False)
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.adamw not in ("default", "fused"):
            raise ValueError(f"adamw must be 'default' or 'fused', got {self.adamw!r}")
        fused = {"fused": True} if self.adamw == "fused" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **fused)

    def forward(self) -> torch.Tensor:
        with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16):
            return self.loss_fn()

    def use_malloc_settings(self) -> None:
        """This setting's malloc settings, process-wide: set before each of its steps (outside the timing)."""
        keep_freed_host_memory(self.keep_host_memory)

    def step(self, ranges: bool = False) -> None:
        rf = torch.profiler.record_function if ranges else _null_range
        with rf("step::forward"):
            loss = self.forward()
        with rf("step::backward"):
            loss.backward()
        with rf("step::optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class _null_range:
    def __init__(self, _name: str) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def mpma_setting(
    model_name: str, variant: str, device: torch.device, *, overrides: dict | None = None, seed: int = 0
) -> Setting:
    """``model_name`` with the ``variant``'s settings (and ``overrides``) on its bench batch."""
    cfg = get_model_config(model_name, **{**variant_overrides(model_name, variant), **(overrides or {})})
    torch.manual_seed(seed)
    model = MPMA(cfg).to(device).train()
    batch = {k: v.to(device) for k, v in make_batch(cfg).items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    loss = lambda: model(batch, generator=gen)["loss"]  # noqa: E731
    return Setting(
        f"{model_name} {variant}",
        model,
        loss,
        BATCH,
        adamw=variant_adamw(variant),
        keep_host_memory=variant_keeps_host_memory(variant),
    )


def variant_overrides(model_name: str, variant: str) -> dict[str, Any]:
    """The MPMAConfig overrides of a variant for ``model_name`` ("before": what that model ran before issue 15)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    out = dict(VARIANTS[variant])
    if variant.startswith("before") and model_name.startswith("mpma_tiny"):
        out["grad_checkpointing"] = False  # tiny never had it on
    return out


def open_clip_setting(device: torch.device, adamw: str = "fused", keep_host_memory: bool = True) -> Setting | None:
    """open_clip ViT-B/16 at 224 px, context 77, ClipLoss, random weights; None when open_clip is missing."""
    try:
        import open_clip
    except ImportError:
        return None
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).to(device).train()
    loss = open_clip.ClipLoss()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 224, 224, generator=g).to(device)
    text = torch.randint(1, model.vocab_size, (BATCH, model.context_length), generator=g).to(device)

    def loss_fn() -> torch.Tensor:
        return loss(*model(images, text)[:3])

    malloc = "" if keep_host_memory else ", glibc malloc"
    return Setting(
        f"open_clip ViT-B-16 {adamw} AdamW{malloc}",
        model,
        loss_fn,
        BATCH,
        adamw=adamw,
        keep_host_memory=keep_host_memory,
    )


# --------------------------------------------------------------------------------------------- measuring
def step_flops(setting: Setting) -> dict[str, float]:
    """Forward+backward FLOPs of one step by `FlopCounterMode`, per table row, "Global" = the whole step.

    Model FLOPs: checkpointing is switched off for the count, so a block's recomputation is not counted."""
    model = setting.model
    setting.use_malloc_settings()
    checkpointing = getattr(model, "grad_checkpointing", False)
    if checkpointing:
        model.set_grad_checkpointing(False)
    instrument = StepInstrument(model, label=True) if hasattr(model, "fusion") else None
    try:
        counter = RowFlopCounter(instrument) if instrument is not None else FlopCounterMode(display=False)
        with counter:
            setting.forward().backward()
    finally:
        if instrument is not None:
            instrument.remove()
        if checkpointing:
            model.set_grad_checkpointing(True)
    model.zero_grad(set_to_none=True)
    rows = dict(counter.rows) if instrument is not None else {}
    rows["Global"] = float(counter.get_total_flops())
    return rows


def profile_step(setting: Setting) -> dict[str, dict[str, float]]:
    """Seconds of forward and backward per table row over one profiled step, plus the optimizer and the total."""
    instrument = StepInstrument(setting.model, ranges=True) if hasattr(setting.model, "fusion") else None
    setting.use_malloc_settings()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            setting.step(ranges=True)
    finally:
        if instrument is not None:
            instrument.remove()
    return step_table(prof.events())


def _chain(event: Any) -> list[str]:
    names = []
    parent = event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names[::-1]


def step_table(events: Any) -> dict[str, dict[str, float]]:
    """Profiler events of one ``Setting.step(ranges=True)`` -> {row: {"fwd": s, "bwd": s}} + "_step" totals."""
    fwd: dict[str, float] = defaultdict(float)
    bwd: dict[str, float] = defaultdict(float)
    seq_row: dict[int, str] = {}
    totals = {}
    for e in events:
        if e.name in ("step::forward", "step::backward", "step::optimizer"):
            totals[e.name] = e.time_range.elapsed_us() / 1e6
    for e in events:
        chain = _chain(e)
        if "step::forward" not in chain and e.name != "step::forward":
            continue
        if e.name.startswith(RANGE_PREFIX):
            # exclusive time of this range: minus the tracked ranges directly nested in it
            inner = sum(c.time_range.elapsed_us() for c in _tracked_children(e))
            fwd[classify([*chain, e.name])] += (e.time_range.elapsed_us() - inner) / 1e6
        elif e.sequence_nr >= 0 and e.sequence_nr not in seq_row:
            seq_row[e.sequence_nr] = classify(chain)
    top = [e for e in events if e.cpu_parent is not None and e.cpu_parent.name == "step::forward"]
    fwd[OTHER] += totals.get("step::forward", 0.0) - sum(
        c.time_range.elapsed_us() / 1e6 for e in top for c in ([e] if _is_tracked(e) else _tracked_children(e))
    )
    for e in events:
        if e.cpu_parent is None or e.cpu_parent.name != "step::backward":
            continue
        if not e.name.startswith("autograd::engine::evaluate_function"):
            continue
        if "AccumulateGrad" in e.name:
            row = "grad accumulation"
        else:
            row = seq_row.get(e.sequence_nr, OTHER)
        bwd[row] += e.time_range.elapsed_us() / 1e6
    attributed = sum(bwd.values())
    bwd[OTHER] += totals.get("step::backward", 0.0) - attributed  # engine overhead between nodes
    out = {row: {"fwd": fwd.get(row, 0.0), "bwd": bwd.get(row, 0.0)} for row in set(fwd) | set(bwd)}
    out["optimizer (AdamW)"] = {"fwd": 0.0, "bwd": 0.0, "opt": totals.get("step::optimizer", 0.0)}
    out["_step"] = {
        "fwd": totals.get("step::forward", 0.0),
        "bwd": totals.get("step::backward", 0.0),
        "opt": totals.get("step::optimizer", 0.0),
    }
    return out


def _is_tracked(e: Any) -> bool:
    return e.name.startswith(RANGE_PREFIX)


def _tracked_children(e: Any) -> list[Any]:
    """The outermost tracked ranges strictly inside ``e``."""
    found, todo = [], list(e.cpu_children)
    while todo:
        c = todo.pop()
        if _is_tracked(c):
            found.append(c)
        else:
            todo.extend(c.cpu_children)
    return found


def table_rows(times: dict[str, dict[str, float]], flops: dict[str, float], peak: float) -> list[dict]:
    """Join profiled seconds and FLOPs per row: time, share of the profiled step, FLOPs, FLOP/s, of peak."""
    total = sum(times["_step"].values())
    rows = []
    for row in ROWS:
        t = times.get(row, {})
        sec = t.get("fwd", 0.0) + t.get("bwd", 0.0) + t.get("opt", 0.0)
        fl = flops.get(row, 0.0)
        if sec == 0.0 and fl == 0.0:
            continue
        rows.append(
            {
                "part": row,
                "fwd_s": t.get("fwd", 0.0),
                "bwd_s": t.get("bwd", 0.0) + t.get("opt", 0.0),
                "time_s": sec,
                "share": sec / total if total else 0.0,
                "gflop": fl / 1e9,
                "gflop_s": fl / sec / 1e9 if sec else 0.0,
                "of_peak": fl / sec / peak if sec and peak else 0.0,
            }
        )
    fl_all = flops.get("Global", sum(flops.values()))
    rows.append(
        {
            "part": "total",
            "fwd_s": times["_step"]["fwd"],
            "bwd_s": times["_step"]["bwd"] + times["_step"]["opt"],
            "time_s": total,
            "share": 1.0,
            "gflop": fl_all / 1e9,
            "gflop_s": fl_all / total / 1e9 if total else 0.0,
            "of_peak": fl_all / total / peak if total and peak else 0.0,
        }
    )
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"{'part':<36} {'fwd s':>7} {'bwd s':>7} {'time s':>7} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>7}"
    )
    for r in rows:
        print(
            f"{r['part']:<36} {r['fwd_s']:>7.3f} {r['bwd_s']:>7.3f} {r['time_s']:>7.3f} {r['share']:>6.1%} "
            f"{r['gflop']:>8.1f} {r['gflop_s']:>8.1f} {r['of_peak']:>7.1%}"
        )


def timed_turns(settings: list[Setting], steps: int, warmup: int = 1) -> None:
    """``steps`` timed steps of each setting, taking turns step by step (after ``warmup`` untimed ones)."""
    settings = sorted(settings, key=lambda s: s.keep_host_memory)  # one switch of malloc settings each way a round
    mode = None
    for i in range(warmup + steps):
        for s in settings:
            s.use_malloc_settings()
            if s.keep_host_memory != mode:
                s.step()  # the switch's cost, untimed
                mode = s.keep_host_memory
            sync(_device(s.model))
            faults = _minor_faults()
            t0 = time.perf_counter()
            s.step()
            sync(_device(s.model))
            if i >= warmup:
                s.times.append(time.perf_counter() - t0)
                s.faults.append(_minor_faults() - faults)
                print(
                    f"  step {i - warmup + 1}/{steps} {s.label}: {s.times[-1]:.2f} s, {s.faults[-1]} page faults",
                    flush=True,
                )


def _minor_faults() -> int:
    """Minor page faults of this process so far (a page touched for the first time since it was mapped)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["vision_layers=1", "align_on=full"]`` -> {"vision_layers": 1, "align_on": "full"} (values read as JSON,
    else kept as strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override {item!r}: expected KEY=VALUE (an MPMAConfig field)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mpma_base", "mpma_small"])
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (median kept)")
    parser.add_argument("--no-open-clip", action="store_true", help="skip the open_clip ViT-B/16 step")
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="time to measure the matmul peak, twice")
    parser.add_argument("--no-table", action="store_true", help="samples/s only (no profiled / counted step)")
    parser.add_argument(
        "--override", nargs="+", default=[], metavar="KEY=VALUE", help="MPMAConfig overrides for every MPMA model"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_step.json")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        overrides = parse_overrides(args.override)
        for m in args.models:
            get_model_config(m, **overrides)
    except ValueError as err:
        parser.error(str(err))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    peak_before = matmul_peak("bf16", device, seconds=args.peak_seconds)

    built: dict[tuple[str, str], Setting] = {}
    settings = []
    for m in args.models:
        for v in sorted(args.variants, key=lambda v: v.endswith(GLIBC_MALLOC)):  # the twins after their models
            twin = built.get(
                (m, v.removesuffix(GLIBC_MALLOC))
            )  # the same model with build_engine's malloc settings
            settings.append(malloc_twin(twin, v) if twin else mpma_setting(m, v, device, overrides=overrides))
            built[(m, v)] = settings[-1]
    clips: dict[tuple[str, bool], Setting] = {}  # (AdamW, keep host memory) -> open_clip run that way
    if not args.no_open_clip:
        for adamw, keep in sorted(
            {(s.adamw, s.keep_host_memory) for s in settings}, key=lambda k: (k[0], not k[1])
        ):
            twin = clips.get((adamw, True))
            oc = malloc_twin(twin, GLIBC_MALLOC) if twin else open_clip_setting(device, adamw, keep)
            if oc is None:
                print("open_clip is not installed (pip install .[bench]); its step is skipped", file=sys.stderr)
                break
            clips[(adamw, keep)] = oc
    everyone = settings + list(clips.values())

    tables = {}
    if not args.no_table:
        for s in everyone:
            tables[s.label] = {"flops": step_flops(s)}  # FLOPs of every model (open_clip's: the total)
            s.use_malloc_settings()
            s.step()  # warm-up
            if s in settings:
                tables[s.label]["times"] = times = profile_step(s)
                print(f"  profiled {s.label}: {sum(times['_step'].values()):.2f} s", flush=True)
    timed_turns(everyone, args.steps, warmup=0 if tables else 1)
    peak = max(peak_before, matmul_peak("bf16", device, seconds=args.peak_seconds))
    print(f"measured bf16 matmul peak: {peak / 1e9:.1f} GFLOP/s (best of before and after the timed steps)")

    results = []
    for s in everyone:
        sec = statistics.median(s.times)
        entry = {
            "setting": s.label,
            "samples_s": s.batch_size / sec,
            "step_s": sec,
            "step_times_s": s.times,
            "page_faults": statistics.median(s.faults),
            "keep_host_memory": s.keep_host_memory,
        }
        if s.label in tables:
            t = tables[s.label]
            entry["gflop_per_sample"] = t["flops"]["Global"] / s.batch_size / 1e9
            entry["achieved_gflop_s"] = t["flops"]["Global"] / sec / 1e9
            entry["of_peak"] = t["flops"]["Global"] / sec / peak
            if "times" in t:
                entry["table"] = table_rows(t["times"], t["flops"], peak)
                print_table(f"{s.label}: one profiled step (bf16 autocast, batch {s.batch_size})", entry["table"])
        results.append(entry)

    print(
        f"\n{'setting':<48} {'samples/s':>9} {'step s':>7} {'faults':>7} {'GFLOP/smp':>9} {'GFLOP/s':>8} "
        f"{'of peak':>7} {'vs oc':>6}"
    )
    by_label = {r["setting"]: r for r in results}
    for s, r in zip(everyone, results, strict=True):
        r["adamw"] = s.adamw
        oc = clips.get((s.adamw, s.keep_host_memory))
        if oc is not None:  # against open_clip with the same AdamW and malloc settings
            r["vs_open_clip"] = r["samples_s"] / by_label[oc.label]["samples_s"]
        vs = f"{r['vs_open_clip']:>5.2f}x" if "vs_open_clip" in r else "     -"
        gf = (
            f"{r['gflop_per_sample']:>9.1f} {r['achieved_gflop_s']:>8.1f} {r['of_peak']:>7.1%}"
            if "of_peak" in r
            else ""
        )
        print(f"{r['setting']:<48} {r['samples_s']:>9.3f} {r['step_s']:>7.2f} {r['page_faults']:>7.0f} {gf} {vs}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **run_info(device),
        "step": f"batch {BATCH}, {TEXT_LEN} text tokens ({N_MASKED} masked), bf16 autocast, AdamW",
        "flop_count": "torch.utils.flop_counter.FlopCounterMode, forward+backward, model FLOPs (no recompute)",
        "matmul_peak_bf16_flops": peak,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    keep_freed_host_memory(False)  # leave the process with glibc's settings (a caller's, e.g. a test run's)
    return 0


if __name__ == "__main__":
    sys.exit(main())
