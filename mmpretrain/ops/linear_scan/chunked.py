"""The diagonal linear recurrence as a chunked parallel scan in plain PyTorch (any device).

The sequence is cut into chunks of T steps. With zero state at a chunk's start, the states inside it are

    h_i = sum_{j <= i} lam^(i - j) x_j          (i, j in 0..T-1)

a product with the lower-triangular Toeplitz matrix of powers of lam, one (T, T) matrix per state
channel. All chunks of all batch rows share it, so the whole level is ONE batched real matrix product:
complex numbers are handled as real pairs, the (T, T) complex matrix as the (2T, 2T) real block
[[Re, -Im], [Im, Re]], the batch being the N channels and the columns every (batch row, chunk). Then the
states entering each chunk are needed: the chunk-end states obey the same recurrence with lam^T,

    H_k = lam^T H_{k-1} + e_k,

which is a scan of length L / T, done by the same function (a second level, a third for very long
sequences): depth log_T(L), each level one matrix product. Finally h_i += lam^(i+1) H_{k-1}. ``reverse``
uses the upper-triangular matrix and carries from the right instead.

No cumulative sums or divisions by powers of lam: every power is a product of factors of modulus <= 1
(the LRU's stable regime), so nothing overflows and nothing cancels. Working memory is O(batch * L * N)
(a permuted copy of x and the states) plus the (N, 2T, 2T) matrix: never (batch, L, N, T) or more.
Plain autograd differentiates it (the backward is again matrix products of the same size).

Precision: computed in float32 (float64 for double-precision inputs) with autocast switched off, so a
bf16-autocast model still scans in float32. On GPUs the float32 matrix product follows
``torch.backends.cuda.matmul.allow_tf32`` (``torch.set_float32_matmul_precision("high")`` turns TF32 on):
then states carry about 1e-3 relative error, below bf16's resolution.
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


def cmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Complex product of real pairs (..., 2) (broadcasting)."""
    ar, ai = a.unbind(-1)
    br, bi = b.unbind(-1)
    return torch.stack((ar * br - ai * bi, ar * bi + ai * br), dim=-1)


def powers(lam: torch.Tensor, count: int) -> torch.Tensor:
    """(N, 2) -> (N, count, 2): lam^0 .. lam^(count-1), by doubling (log2(count) products, exact at lam = 0)."""
    p = torch.stack((torch.ones_like(lam[:, 0]), torch.zeros_like(lam[:, 0])), dim=-1)[:, None]  # (N, 1, 2)
    step = lam  # lam^(p.shape[1])
    while p.shape[1] < count:
        p = torch.cat((p, cmul(p, step[:, None])), dim=1)
        if p.shape[1] < count:
            step = cmul(step, step)
    return p[:, :count]


def toeplitz_block(p: torch.Tensor, T: int, reverse: bool) -> torch.Tensor:
    """(N, >=T, 2) powers -> (N, 2T, 2T) real block [[Re W, -Im W], [Im W, Re W]].

    W[i, j] = lam^(i-j) for i >= j (0 above the diagonal); transposed for ``reverse``.
    """
    N = p.shape[0]
    # q[m] = lam^(T-1-m) for m < T, 0 after: row i of W is q[T-1-i : 2T-1-i]
    q = torch.cat((p[:, :T].flip(1), p.new_zeros(N, T - 1, 2)), dim=1)  # (N, 2T-1, 2)
    W = q.unfold(1, T, 1).flip(1)  # (N, T rows, 2, T cols): window s = T-1-i starts at q[T-1-i]
    Wr, Wi = W[:, :, 0], W[:, :, 1]  # (N, T, T)
    if reverse:
        Wr, Wi = Wr.transpose(1, 2), Wi.transpose(1, 2)
    return torch.cat((torch.cat((Wr, -Wi), dim=2), torch.cat((Wi, Wr), dim=2)), dim=1)


def scan_pairs(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None, reverse: bool, T: int) -> torch.Tensor:
    """The chunked scan on real pairs, all in one dtype: lam (N, 2), x (batch, L, N, 2), h0 (batch, N, 2) or None.

    Returns the states (batch, L, N, 2).
    """
    batch, L, N, _ = x.shape
    if L == 0:
        return x.new_zeros(batch, 0, N, 2)
    nc = math.ceil(L / T)
    pad = nc * T - L
    if pad:  # zeros where the scan ends (reverse: at the front), so they never reach a real step
        x = F.pad(x, (0, 0, 0, 0, pad, 0) if reverse else (0, 0, 0, 0, 0, pad))
    p = powers(lam, T + 1)  # lam^0 .. lam^T
    W = toeplitz_block(p, T, reverse)  # (N, 2T, 2T)
    cols = x.reshape(batch, nc, T, N, 2).permute(3, 4, 2, 0, 1).reshape(N, 2 * T, batch * nc)
    local = torch.bmm(W, cols).view(N, 2, T, batch, nc).permute(3, 4, 2, 0, 1)  # (batch, nc, T, N, 2)
    if nc == 1 and h0 is None:
        h = local
    else:
        zero = x.new_zeros(batch, 1, N, 2)
        start = zero if h0 is None else h0[:, None]
        if nc == 1:
            carry = start  # (batch, 1, N, 2): the state entering each chunk
        elif reverse:
            ends = local[:, 1:, 0]  # chunk k's state at its first step, k = 1..nc-1
            carry = torch.cat((scan_pairs(p[:, T], ends, h0, True, T), start), dim=1)
        else:
            ends = local[:, :-1, T - 1]  # chunk k's state at its last step, k = 0..nc-2
            carry = torch.cat((start, scan_pairs(p[:, T], ends, h0, False, T)), dim=1)
        # how far the carried state decays by step i of the chunk: lam^(i+1), or lam^(T-i) in reverse
        decay = p[:, 1:].flip(1) if reverse else p[:, 1:]  # (N, T, 2)
        h = local + cmul(decay.transpose(0, 1), carry[:, :, None])
    h = h.reshape(batch, nc * T, N, 2)
    if pad:
        h = h[:, pad:] if reverse else h[:, :L]
    return h


def linear_scan_chunked(
    lam: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    reverse: bool = False,
    return_last_state: bool = False,
    chunk_size: int | None = None,
):
    """Chunked parallel linear scan; same arguments and results as ``linear_scan_reference``.

    ``chunk_size``: steps per chunk T, at least 2 (default :func:`auto_chunk_size`: 8..64).
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
        T = chunk_size or auto_chunk_size(x_p.shape[1])
        h = scan_pairs(lam_p, x_p, h0_p, reverse, T)
        if return_last_state:
            if h.shape[1] == 0:
                last = h0_p if h0_p is not None else h.new_zeros(h.shape[0], h.shape[2], 2)
            else:
                last = h[:, 0] if reverse else h[:, -1]
    if not pairs:
        h = torch.view_as_complex(h.contiguous())
        if return_last_state:
            last = torch.view_as_complex(last.contiguous())
    return (h, last) if return_last_state else h
