"""The diagonal linear recurrence as a chunked parallel scan in plain PyTorch (any device).

The sequence is cut into chunks of T steps. With zero state at a chunk's start, the states inside it are

    h_i = sum_{j <= i} lam^(i - j) x_j          (i, j in 0..T-1)

a product with the lower-triangular Toeplitz matrix of powers of lam, one (T, T) matrix per state
channel. All chunks of all batch rows share it, so the whole level is ONE batched real matrix product:
complex numbers are handled as real pairs, the (T, T) complex matrix as a (2T, 2T) real block, the
batch of the product being the N channels and its rows every (batch row, chunk), each row holding the
chunk's real parts then its imaginary parts. The computation is laid out channels first, (N, 2, batch, L),
so those rows are copied out in runs of T contiguous steps; a (batch, L, N) input is transposed to it
and back (``channels_first=True`` skips both). Then the states entering each chunk are needed: the
chunk-end states obey the same recurrence with lam^T,

    H_k = lam^T H_{k-1} + e_k,

which is a scan of length L / T, done by the same function (a second level, a third for very long
sequences): depth log_T(L), each level one matrix product. Finally h_i += lam^(i+1) H_{k-1}, a second
small product fused into the first (``baddbmm``). ``reverse`` uses the upper-triangular matrix and
carries from the right instead.

No cumulative sums and no divisions by powers of lam: the powers (computed once per level, in polar form
in float64) have modulus <= 1 in the LRU's stable regime, so nothing overflows and nothing cancels.
Working memory is O(batch * L * N) (a chunked copy of x and the states) plus the (N, 2T, 2T) matrix:
never (batch, L, N, T) or more. Autograd differentiates it (the backward is again matrix products of
the same size; only the powers have a hand-written backward). All arithmetic is real: under
torch.compile the whole scan is traced into one graph with nothing complex in it.

Precision: computed in float32 (float64 for double-precision inputs) with autocast switched off, so a
bf16-autocast model still scans in float32. On GPUs the float32 matrix product follows
``torch.backends.cuda.matmul.allow_tf32`` (``torch.set_float32_matmul_precision("high")`` turns TF32 on):
then states carry about 3e-4 relative error (measured, H200), below bf16's resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import compute_dtype


def auto_chunk_size(L: int) -> int:
    """T = the power of two nearest above sqrt(L), between 8 and 64, and no longer than L needs.

    Work per element grows with T (a T-long dot product); levels of recursion shrink with it. sqrt(L)
    makes the two levels about equal; 64 keeps one matrix at (N, 128, 128).
    """
    t = 8
    while t < 64 and t * t < L:
        t *= 2
    while t > 2 and t // 2 >= L:  # L = 1..4: no padding to 8
        t //= 2
    return max(t, 2)


class _Powers(torch.autograd.Function):
    """Real pairs (N, 2) -> (N, count, 2): lam^0 .. lam^(count-1), in polar form computed in float64.

    |lam|^k (cos k phi, sin k phi) is accurate to float64 rounding whatever k (a running product in float32
    would drift by k roundings), stays real arithmetic (nothing complex for torch.compile), and lam = 0
    gives 1, 0, 0, ... The backward uses d lam^k / d lam = k lam^(k-1), read off the powers themselves, so
    it is exact at lam = 0 too (where the polar angle has no derivative).
    """

    @staticmethod
    def forward(lam: torch.Tensor, count: int) -> torch.Tensor:
        lam64 = lam.double()
        mod = torch.hypot(lam64[:, 0], lam64[:, 1])[:, None]
        phase = torch.atan2(lam64[:, 1], lam64[:, 0])[:, None]
        k = torch.arange(count, device=lam.device, dtype=torch.float64)
        mag = mod.pow(k)
        return torch.stack((mag * torch.cos(phase * k), mag * torch.sin(phase * k)), dim=-1).to(lam.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        k = torch.arange(1, p.shape[1], device=p.device, dtype=p.dtype)[:, None]
        da = p[:, :-1] * k  # k lam^(k-1) = a + ib, for k = 1 .. count-1
        gu, gv = grad[:, 1:, 0], grad[:, 1:, 1]
        # lam^k is holomorphic: d(u + iv)/d re(lam) = a + ib and d(u + iv)/d im(lam) = i (a + ib)
        g_re = (gu * da[..., 0] + gv * da[..., 1]).sum(dim=1)
        g_im = (gv * da[..., 0] - gu * da[..., 1]).sum(dim=1)
        return torch.stack((g_re, g_im), dim=-1), None


def powers(lam: torch.Tensor, count: int) -> torch.Tensor:
    """Real pairs (N, 2) -> (N, count, 2): lam^0 .. lam^(count-1) (see :class:`_Powers`)."""
    return _Powers.apply(lam, count)


def _make_matrix_index(T: int, reverse: bool, device: torch.device) -> torch.Tensor:
    """Flat indices into the table of :func:`matrices` for its (2T + 2, 2T) result (see there)."""
    r = torch.arange(2 * T, device=device)
    c, t = r // T, r % T  # output column r holds part c (0 real, 1 imaginary) of step t
    # which entry of [re, im, -im, 0] each (in part, out part) takes: re->re re, im->re -im, re->im im, im->im re
    part = torch.tensor([[0, 1], [2, 0]], device=device)
    k = (t[:, None] - t[None, :]) if reverse else (t[None, :] - t[:, None])  # power of lam from step row to col
    w_idx = torch.where(k >= 0, 4 * k + part[c[:, None], c[None, :]], 3)  # 3: the zero slot
    # decay of the carried state at step t: lam^(t+1) forward, lam^(T-t) in reverse
    kd = (T - t) if reverse else (t + 1)
    d_idx = 4 * kd[None, :] + part[torch.arange(2, device=device)[:, None], c[None, :]]
    return torch.cat((w_idx, d_idx), dim=0).flatten()


_INDEX_CACHE: dict[tuple[int, bool, torch.device], torch.Tensor] = {}


def matrix_index(T: int, reverse: bool, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # built in the graph (a cached tensor would leak out of tracing)
        return _make_matrix_index(T, reverse, device)
    key = (T, reverse, device)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = _make_matrix_index(T, reverse, device)
    return _INDEX_CACHE[key]


def matrices(p: torch.Tensor, T: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Powers (N, T+1, 2) -> the real blocks W (N, 2T, 2T) and D (N, 2, 2T), gathered in one op.

    They act from the right on rows of (real parts of T steps, imaginary parts of T steps): W is the
    chunk's Toeplitz matrix as a real block, row (c, j) and column (c', i) holding part c -> c' of
    lam^(i-j) for i >= j (j >= i in reverse), i.e. [[Re, Im], [-Im, Re]]. D maps the (real, imaginary)
    state entering the chunk to its contribution at each step: lam^(i+1) (lam^(T-i) in reverse).
    """
    N = p.shape[0]
    table = torch.cat((p, -p[..., 1:], torch.zeros_like(p[..., :1])), dim=-1).reshape(N, 4 * (T + 1))
    both = table.index_select(1, matrix_index(T, reverse, p.device)).view(N, 2 * T + 2, 2 * T)
    return both[:, : 2 * T], both[:, 2 * T:]


def chunk_scan(lam: torch.Tensor, xs: torch.Tensor, h0s: torch.Tensor | None, reverse: bool, T: int):
    """One level. lam (N, 2); xs (N, 2, M, L) real (any strides); h0s (N, 2, M) or None.

    Returns the states as (N, M, nc, 2, T) (part c of step t of chunk k of row m at [:, m, k, c, t])
    and the padding added (at the end of the sequence, or at its front in reverse).
    """
    N, _, M, L = xs.shape
    nc = math.ceil(L / T)
    pad = nc * T - L
    if pad:  # zeros where the scan ends (reverse: at the front), so they never reach a real step
        xs = F.pad(xs, (pad, 0) if reverse else (0, pad))
    p = powers(lam, T + 1)
    W, D = matrices(p, T, reverse)
    # rows (batch row, chunk), columns (part, step): copied in runs of T contiguous steps
    rows = xs.unflatten(3, (nc, T)).permute(0, 2, 3, 1, 4).reshape(N, M * nc, 2 * T)
    local = torch.bmm(rows, W)  # the states with zero state entering each chunk
    if nc > 1 or h0s is not None:
        local5 = local.view(N, M, nc, 2, T)
        start = h0s[..., None] if h0s is not None else local.new_zeros(N, 2, M, 1)
        if nc == 1:
            carry = start
        elif reverse:  # chunk ends: each chunk's state at its first step, carried right to left with lam^T
            ends = local5[:, :, 1:, :, 0].permute(0, 3, 1, 2)
            carry = torch.cat((scan_levels(p[:, T], ends, h0s, True, T), start), dim=3)
        else:  # each chunk's state at its last step, carried left to right
            ends = local5[:, :, :-1, :, T - 1].permute(0, 3, 1, 2)
            carry = torch.cat((start, scan_levels(p[:, T], ends, h0s, False, T)), dim=3)
        local = torch.baddbmm(local, carry.permute(0, 2, 3, 1).reshape(N, M * nc, 2), D)
    return local.view(N, M, nc, 2, T), pad


def scan_levels(lam: torch.Tensor, xs: torch.Tensor, h0s: torch.Tensor | None, reverse: bool, T: int) -> torch.Tensor:
    """The scan of xs (N, 2, M, L) as a contiguous (N, 2, M, L), recursing over chunk ends (depth log_T(L))."""
    L = xs.shape[3]
    h5, pad = chunk_scan(lam, xs, h0s, reverse, T)
    h = h5.permute(0, 3, 1, 2, 4).flatten(3)
    return (h[..., pad:] if reverse else h[..., :L]).contiguous() if pad else h


def linear_scan_chunked(
    lam: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    reverse: bool = False,
    return_last_state: bool = False,
    chunk_size: int | None = None,
    channels_first: bool = False,
):
    """Chunked parallel linear scan; same arguments and results as ``linear_scan_reference``.

    ``chunk_size``: steps per chunk T, at least 2 (default :func:`auto_chunk_size`: 8..64).
    ``channels_first``: x is real pairs (N, 2, batch, L), h0 (N, 2, batch); the scan's own layout, so no
    transposes at all (the LRU's projections read and write it directly).
    """
    if chunk_size is not None and chunk_size < 2:
        raise ValueError(f"linear_scan: chunk_size must be at least 2 (or None for automatic), got {chunk_size}")
    pairs = not x.is_complex()
    rt = compute_dtype(x)

    def as_pairs(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return (torch.view_as_real(t.resolve_conj()) if t.is_complex() else t).to(rt)

    with torch.autocast(x.device.type, enabled=False):
        lam_p, x_p, h0_p = as_pairs(lam), as_pairs(x), as_pairs(h0)
        if not channels_first:  # (batch, L, N, 2) -> (N, 2, batch, L), as views
            x_p = x_p.permute(2, 3, 0, 1)
            h0_p = None if h0_p is None else h0_p.permute(1, 2, 0)
        N, _, batch, L = x_p.shape
        if L == 0:
            h = x_p.new_zeros(N, 2, batch, 0)
        else:
            h = scan_levels(lam_p, x_p, h0_p, reverse, chunk_size or auto_chunk_size(L))
        if return_last_state:
            if L == 0:
                last = h0_p if h0_p is not None else h.new_zeros(N, 2, batch)
            else:
                last = h[..., 0] if reverse else h[..., -1]
        if not channels_first:
            # (a new tensor when empty: an empty permuted tensor counts as contiguous with any strides)
            h = h.permute(2, 3, 0, 1).contiguous() if L else x_p.new_zeros(batch, 0, N, 2)
            if return_last_state:
                last = last.permute(2, 0, 1)
    if not pairs:
        h = torch.view_as_complex(h)
        if return_last_state:
            last = torch.view_as_complex(last.contiguous())
    return (h, last) if return_last_state else h
