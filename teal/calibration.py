"""Offline calibration of TEAL thresholds on a text: histograms, sequential correction, greedy.

1. Dense pass: stream the model over the calibration windows and count |x| of every projection
   input in fixed log2-spaced bins (256 per octave from 2^-24 to 2^16, so a quantile read back by
   interpolating inside a bin is off by well under 0.3% of its value; activations are never kept).
   The s-quantile of those counts is the reference protocol's threshold ("uniform-dense").
2. Sequential correction: thresholds from the dense model make the model sparser than asked,
   because upstream sparsity shrinks downstream activations. So each level gets one more forward,
   over the correction windows in a single batch, with every projection's forward pre-hook reading
   the quantiles of its own input (upstream projections already sparsified) and setting its
   thresholds before it runs: layer by layer, the realized sparsity of every segment is its
   target on those tokens.
3. Greedy allocation (TEAL): per block, on the dense block inputs of a few windows, start from 0
   and repeatedly raise by `step` the sparsity of the one projection (q, k, v, o, gate, up, down)
   whose raise adds the least block-output error (per token, relative to the dense output's norm)
   per weight skipped, until the block's parameter-weighted sparsity passes the highest requested
   level. The path is then read at the requested levels (linear between the two greedy states
   around each level).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from linear import PROJECTION_TABLE, PROJECTIONS, pack_model, packed_projections, segments
from teal.sparsify import densify, every_token_sparse, segment_weights

MAX_SEGMENT_SPARSITY = 0.99  # greedy never empties a projection
# Projections whose inputs live in the attention half of a block (a change there re-runs it).
ATTENTION_LABELS = frozenset(label for path, labels in PROJECTION_TABLE.items()
                             if path.startswith("attention.") for label in labels)


class LogHistogram:
    """Counts of |x| per input tensor in log2-spaced bins; bin 0 collects |x| < 2^lo (zeros)."""

    def __init__(self, n_inputs: int, lo: int = -24, hi: int = 16, bins_per_octave: int = 256,
                 device: torch.device | str = "cpu") -> None:
        self.lo, self.bpo = lo, bins_per_octave
        self.n_bins = (hi - lo) * bins_per_octave + 1
        self.counts = torch.zeros(n_inputs, self.n_bins, dtype=torch.int64, device=device)

    def add(self, i: int, x: Tensor) -> None:
        b = ((x.detach().abs().float().log2() - self.lo) * self.bpo + 1).clamp_(0, self.n_bins - 1)
        self.counts[i] += torch.bincount(b.long().flatten(), minlength=self.n_bins)

    def quantiles(self, i: int, levels: Tensor) -> Tensor:
        """|x| values below which a fraction `levels` of input i's entries lie (0 for level 0)."""
        levels = levels.to(self.counts.device, torch.float64)
        c = self.counts[i].double()
        cdf = c.cumsum(0)
        target = levels * cdf[-1]
        b = torch.searchsorted(cdf, target).clamp(max=self.n_bins - 1)
        prev = torch.where(b > 0, cdf[(b - 1).clamp(min=0)], torch.zeros_like(target))
        frac = ((target - prev) / c[b].clamp(min=1)).clamp(0, 1)
        value = torch.exp2(self.lo + (b - 1 + frac) / self.bpo)
        return torch.where((b == 0) | (levels <= 0), torch.zeros_like(value), value).float().cpu()


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file; ValueError with one line if missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def text_windows(ids: list[int] | Tensor, n_windows: int, window_len: int) -> Tensor:
    """Windows k = 0..n-1 of ids[L*k : L*k+L] (no BOS, no overlap) as [n, L]."""
    if n_windows < 1 or window_len < 2:
        raise ValueError(f"need at least one window of at least 2 tokens "
                         f"(got {n_windows} windows of {window_len})")
    if len(ids) < n_windows * window_len:
        raise ValueError(f"text has {len(ids)} tokens, fewer than the {n_windows * window_len} needed "
                         f"({n_windows} windows of {window_len}); use a longer text or fewer tokens")
    return torch.as_tensor(ids[: n_windows * window_len]).view(n_windows, window_len)


class Progress:
    """One bar for a whole calibration, with the time left, instead of a bar per pass.

    Work is budgeted up front in token-layers (one token through one decoder block), per kind of
    pass (dense histograms, greedy, sequential thresholds...). The kinds cost different amounts
    per token-layer, and that changes with the code and the machine's load, so the time per
    token-layer is measured per kind as it runs (a kind not started yet is assumed to run at the
    average so far). The bar shows the share of the estimated total time that has passed, and
    never moves back: when a slower pass raises the estimate, the bar waits for the time to catch
    up, while the time left (printed after the bar) is always the current estimate.
    """

    def __init__(self, budgets: dict[str, float], desc: str = "calibrating", leave: bool = True) -> None:
        self.left = dict(budgets)  # kind -> token-layers to do
        self.done = dict.fromkeys(budgets, 0.0)
        self.seconds = dict.fromkeys(budgets, 0.0)
        self.start = self.last = time.perf_counter()
        self.kind, self.name, self.units, self.phase_done = "", "", 0.0, 0.0
        self.remaining = float("nan")  # seconds, the current estimate
        self.bar = tqdm(total=1.0, desc=desc, leave=leave, smoothing=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:  # done: whatever the estimate said
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.set_postfix_str(self.name, refresh=False)
            self.bar.refresh()
        self.bar.close()

    @contextmanager
    def phase(self, kind: str, name: str, units: float) -> Iterator[None]:
        """A pass of `units` token-layers of `kind`: its ticks fill it, its end completes it."""
        self.kind, self.name, self.units, self.phase_done = kind, name, units, 0.0
        self._show()
        self.bar.refresh()
        yield
        self.reach(1.0)

    def reach(self, fraction: float) -> None:
        """The current phase is `fraction` done."""
        self.tick(fraction * self.units - self.phase_done)

    def tick(self, units: float) -> None:
        units = max(0.0, min(units, self.units - self.phase_done))
        now = time.perf_counter()
        self.phase_done += units
        self.left[self.kind] -= units
        self.done[self.kind] += units
        self.seconds[self.kind] += now - self.last
        self.last = now
        average = sum(self.seconds.values()) / max(sum(self.done.values()), 1.0)
        self.remaining = sum(left * (self.seconds[k] / self.done[k] if self.done[k] else average)
                             for k, left in self.left.items())
        elapsed = now - self.start
        share = elapsed / (elapsed + self.remaining) if elapsed + self.remaining > 0 else 0.0
        self.bar.update(max(0.0, min(share, 1.0) - self.bar.n))  # never backwards
        self._show()

    def _show(self) -> None:
        left = "" if self.remaining != self.remaining else f"{tqdm.format_interval(self.remaining)} left, "
        self.bar.set_postfix_str(f"{left}{self.name}", refresh=False)  # shown at the bar's next refresh


def greedy_work(model: nn.Module, windows: Tensor, grid: Tensor, step: float) -> float:
    """Estimated token-layers of greedy_levels' block evaluations: about two per step (measured
    1.9-2.2 on SmolLM2-135M) plus the first scoring of each projection, per block."""
    n_proj = len(PROJECTIONS)
    return windows.numel() * len(model.layers) * (2 * n_proj * float(grid.max()) / step + n_proj)


class _Stop(Exception):
    """Raised at the final norm: calibration never needs logits, so lm_head is skipped."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Stop


@torch.no_grad()
def stream(model: nn.Module, windows: Tensor, batch: int, desc: str, progress: Progress | None = None) -> None:
    """Run the decoder blocks over `windows` [N, L], `batch` windows at a time (hooks do the work).
    Each block ticks `progress`; without one, the pass shows a bar of its own."""
    if progress is None:
        work = windows.numel() * len(model.layers)
        with Progress({desc: work}, desc, leave=False) as own, own.phase(desc, desc, work):
            return stream(model, windows, batch, desc, own)
    device = model.norm.weight.device
    pos = torch.arange(windows.shape[1], device=device)
    handles = [model.norm.register_forward_pre_hook(_stop)] + [
        layer.register_forward_hook(lambda mod, args, out: progress.tick(out.shape[0] * out.shape[1]))
        for layer in model.layers]
    try:
        for chunk in windows.split(batch):
            model.setup_caches(chunk.shape[0], windows.shape[1])
            try:
                model(chunk.to(device), pos)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def segment_inputs(model: nn.Module) -> list[int]:
    """Index of the input tensor (= PackedLinear, in module order) each segment reads."""
    names = list(dict.fromkeys(name for name, _, _ in segments(model)))
    return [names.index(name) for name, _, _ in segments(model)]


def input_histograms(model: nn.Module, windows: Tensor, batch: int,
                     progress: Progress | None = None) -> LogHistogram:
    """Histograms of every projection input (one per PackedLinear) of the dense model."""
    pack_model(model)
    densify(model)
    mods = packed_projections(model)
    hist = LogHistogram(len(mods), device=model.norm.weight.device)
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: hist.add(i, args[0]))
               for i, m in enumerate(mods.values())]
    try:
        stream(model, windows, batch, "dense histograms", progress)
    finally:
        for h in handles:
            h.remove()
    return hist


def thresholds_at(model: nn.Module, hist: LogHistogram, levels: Tensor) -> Tensor:
    """Per-segment thresholds for per-segment sparsity `levels` [n_segments] from `hist`."""
    inputs = torch.tensor(segment_inputs(model))
    out = torch.zeros(len(inputs))
    for i in inputs.unique().tolist():
        sel = inputs == i
        out[sel] = hist.quantiles(i, levels[sel])
    return out


@torch.no_grad()
def sequential_thresholds(model: nn.Module, windows: Tensor, levels: Tensor,
                          progress: Progress | None = None) -> Tensor:
    """Thresholds whose realized per-segment sparsity on `windows` is `levels` [n_segments],
    upstream projections sparsified (one forward, all windows in one batch: memory grows with it).
    """
    pack_model(model)
    names = [name for name, _, _ in segments(model)]
    mods = packed_projections(model)

    def set_from_input(name: str):
        sel = torch.tensor([n == name for n in names])

        def hook(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            hist = LogHistogram(1, device=args[0].device)
            hist.add(0, args[0])
            mod.thresholds.copy_(hist.quantiles(0, levels[sel]))
        return hook

    handles = [m.register_forward_pre_hook(set_from_input(name)) for name, m in mods.items()]
    try:
        with every_token_sparse(model):
            stream(model, windows, len(windows), "sequential thresholds", progress)
    finally:
        for h in handles:
            h.remove()
    thr = torch.cat([mods[name].thresholds.cpu() for name in dict.fromkeys(names)])
    densify(model)
    return thr


class BlockProbe:
    """One decoder block on fixed inputs: its dense output and the error of sparsified variants.

    The block is evaluated as its two residual halves (the two lines of TransformerBlock.forward),
    so a change inside the MLP reuses the cached attention half.
    """

    def __init__(self, model: nn.Module, layer: int, x: Tensor) -> None:
        self.block = model.layers[layer]
        self.x = x
        seq = x.shape[1]
        model.setup_caches(x.shape[0], seq)
        self.pos = torch.arange(seq, device=x.device)
        self.freqs, self.mask = model.freqs_cis[self.pos], model.causal_mask[None, None, self.pos]
        mine = [s for s in segments(model) if s.module.startswith(f"layers.{layer}.")]
        assert [s.label for s in mine] == list(PROJECTIONS)
        self.slots = [(model.get_submodule(s.module), s.index) for s in mine]  # PROJECTIONS order
        self.set(torch.zeros(len(PROJECTIONS)))
        self.ref = self.mlp_half(self.attention_half())
        self.ref_sq = self.ref.pow(2).sum(-1)

    def set(self, thr: Tensor) -> None:
        for (m, j), t in zip(self.slots, thr.tolist()):
            m.thresholds[j] = t

    def attention_half(self) -> Tensor:
        b = self.block
        return self.x + b.attention(b.attention_norm(self.x), self.freqs, self.mask, self.pos)

    def mlp_half(self, h: Tensor) -> Tensor:
        return h + self.block.feed_forward(self.block.ffn_norm(h))

    def error(self, out: Tensor) -> float:
        """Mean over tokens of |out - dense|^2 / |dense|^2. Relative, because the next block reads
        the residual through RMSNorm: with a plain MSE the few tokens with massive activations
        (rms 10-100x the median) carried up to 98% of the error and misled the greedy."""
        return ((out - self.ref).pow(2).sum(-1) / self.ref_sq).mean().item()


@torch.no_grad()
def block_inputs(model: nn.Module, windows: Tensor, progress: Progress | None = None) -> list[Tensor]:
    """Dense inputs of every decoder block on `windows` (one batch)."""
    pack_model(model)
    densify(model)
    captured: list[Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
               for layer in model.layers]
    try:
        stream(model, windows, len(windows), "block inputs", progress)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def greedy_levels(model: nn.Module, windows: Tensor, dense_hist: LogHistogram, grid: Tensor,
                  step: float, exact: bool = False, progress: Progress | None = None) -> Tensor:
    """TEAL's block-wise greedy: per-segment sparsity [len(grid), n_segments] for each level of grid."""
    n_layer, n_proj = len(model.layers), len(PROJECTIONS)
    if progress is None:
        budgets = {"block inputs": windows.numel() * n_layer, "greedy": greedy_work(model, windows, grid, step)}
        with Progress(budgets, "greedy", leave=False) as own:
            return greedy_levels(model, windows, dense_hist, grid, step, exact, own)
    with progress.phase("block inputs", "greedy: block inputs", windows.numel() * n_layer):
        inputs = block_inputs(model, windows, progress)
    weights = segment_weights(model).view(n_layer, n_proj)
    seg_input = torch.tensor(segment_inputs(model)).view(n_layer, n_proj)
    n_max = int(MAX_SEGMENT_SPARSITY / step + 1e-9)
    steps = torch.arange(n_max + 1) * step
    out = torch.zeros(len(grid), n_layer, n_proj)
    with every_token_sparse(model):
        for i in range(n_layer):
            with progress.phase("greedy", f"greedy: block {i + 1}/{n_layer}",
                                greedy_work(model, windows, grid, step) / n_layer):
                # thresholds of every projection at every step count: table[p, n]
                table = torch.stack([dense_hist.quantiles(int(seg_input[i, p]), steps) for p in range(n_proj)])
                probe = BlockProbe(model, i, inputs[i])
                out[:, i] = _greedy_block(probe, table, weights[i], grid, step, exact, progress)
                probe.set(torch.zeros(n_proj))
    densify(model)
    return out.view(len(grid), -1)


def _greedy_block(probe: BlockProbe, table: Tensor, weights: Tensor, grid: Tensor, step: float,
                  exact: bool, progress: Progress) -> Tensor:
    """Greedy path of one block, read at `grid`; table[p, n] = threshold of projection p at n steps.

    Lazy by default: a projection's last score (error added per weight skipped) is kept across
    steps and only the best-looking one is re-evaluated, until the best is a fresh score. Errors
    of different projections add up nearly independently, so this almost always picks what
    re-scoring all seven would (`exact`): on SmolLM2-135M blocks 15 and 29 the lazy path's
    block errors were within 6% of the exact path's, with a third of the block evaluations.
    """
    n_proj, n_max = table.shape[0], table.shape[1] - 1
    count = torch.zeros(n_proj, dtype=torch.long)
    share = weights / weights.sum()
    h, err = probe.attention_half(), 0.0
    score = torch.full((n_proj,), -math.inf, dtype=torch.float64)
    states = [count.clone()]
    target = float(grid.max())
    while float(count.double() @ share) * step < target - 1e-9:
        if exact:
            score.fill_(-math.inf)
        fresh: dict[int, tuple[float, Tensor]] = {}
        while True:
            allowed = [p for p in range(n_proj) if count[p] < n_max]
            if not allowed:
                raise ValueError(f"greedy cannot reach sparsity {target} with every projection at "
                                 f"most {MAX_SEGMENT_SPARSITY}")
            p = min(allowed, key=lambda q: float(score[q]))
            if p in fresh:
                break
            cand = count.clone()
            cand[p] += 1
            probe.set(table[torch.arange(n_proj), cand])
            hc = probe.attention_half() if PROJECTIONS[p] in ATTENTION_LABELS else h
            e = probe.error(probe.mlp_half(hc))
            score[p] = (e - err) / (step * float(weights[p]))
            fresh[p] = (e, hc)
        count[p] += 1
        progress.reach(float(count.double() @ share) * step / target)
        err, h = fresh[p]
        states.append(count.clone())
    return _read_path(torch.stack(states).double() * step, share, grid)


def _read_path(levels: Tensor, share: Tensor, grid: Tensor) -> Tensor:
    """Per-projection levels at each parameter-weighted level of grid, linear between states."""
    pw = levels @ share
    out = torch.zeros(len(grid), levels.shape[1])
    for g, level in enumerate(grid.tolist()):
        k = int(torch.searchsorted(pw, torch.tensor(level - 1e-12, dtype=torch.float64)))
        if k == 0:
            out[g] = levels[0].float()
            continue
        a = (level - pw[k - 1]) / (pw[k] - pw[k - 1])
        out[g] = (levels[k - 1] + a * (levels[k] - levels[k - 1])).float()
    return out


@dataclass
class Allocation:
    """Thresholds along a path of parameter-weighted sparsity levels."""

    levels: Tensor  # [P] parameter-weighted target of each path point (ascending, starts at 0)
    sparsity: Tensor  # [P, n_segments] target sparsity of every segment
    thresholds: Tensor  # [P, n_segments]
    description: str


def calibrate(model: nn.Module, windows: Tensor, batch: int, grid: Tensor, methods: list[str],
              correction_windows: int, greedy_windows: Tensor, greedy_step: float,
              greedy_exact: bool, dense_grid: Tensor) -> dict[str, Allocation]:
    """All allocations asked for in `methods` ("uniform", "greedy"), plus "uniform-dense"."""
    pack_model(model)
    n_seg, n_layer = len(segments(model)), len(model.layers)
    corr = windows[:correction_windows]
    sequential_work = corr.numel() * n_layer  # one pass per level above 0, per method
    budgets = {"dense histograms": windows.numel() * n_layer,
               "sequential": len(methods) * int((grid > 0).sum()) * sequential_work}
    if "greedy" in methods:
        budgets.update({"block inputs": greedy_windows.numel() * n_layer,
                        "greedy": greedy_work(model, greedy_windows, grid, greedy_step)})
    with Progress(budgets) as progress:
        with progress.phase("dense histograms", "dense histograms", windows.numel() * n_layer):
            dense = input_histograms(model, windows, batch, progress)
        ones = torch.ones(n_seg)
        out = {"uniform-dense": Allocation(
            dense_grid, dense_grid[:, None] * ones,
            torch.stack([thresholds_at(model, dense, s * ones) for s in dense_grid]),
            "s-quantile of |x| over the dense model's calibration activations (reference protocol)")}
        targets = {}
        if "uniform" in methods:
            targets["uniform"] = (grid[:, None] * ones, "every segment at s")
        if "greedy" in methods:
            targets["greedy"] = (greedy_levels(model, greedy_windows, dense, grid, greedy_step,
                                               greedy_exact, progress),
                                 f"TEAL block-wise greedy (step {greedy_step}, "
                                 f"{greedy_windows.numel()} tokens per block)")
        for name, (levels, what) in targets.items():
            rows = []
            for level, lv in zip(grid.tolist(), levels):
                if not lv.any():
                    rows.append(torch.zeros(n_seg))
                    continue
                with progress.phase("sequential", f"{name} {level:.2f}", sequential_work):
                    rows.append(sequential_thresholds(model, corr, lv, progress))
            out[name] = Allocation(grid, levels, torch.stack(rows), f"{what}; thresholds corrected for "
                                   f"upstream sparsity (sequential, on {corr.numel()} tokens)")
    return out
