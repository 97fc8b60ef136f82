//! The host-side checks every device operation makes before it runs, written once for
//! [`crate::CudaDevice`] (before a kernel launch) and [`crate::SimDevice`] (before the CPU
//! twin): a mismatch is a [`CudaError::Shape`] naming the operation.

use crate::error::CudaError;
use crate::layout::{BlockEntry, KvLayout, validate_entries};

pub(crate) fn shape(op: &'static str, message: String) -> CudaError {
    CudaError::Shape { op, message }
}

/// A buffer of `have` elements where `need` are read or written.
pub(crate) fn check_len(
    op: &'static str,
    what: &str,
    have: usize,
    need: usize,
) -> Result<(), CudaError> {
    if have < need {
        return Err(shape(
            op,
            format!("{what} has {have} elements, needs {need}"),
        ));
    }
    Ok(())
}

/// An embedding gather of `ids` from a table of `table_len` elements in rows of `hidden`
/// into `out_len` elements; returns the vocabulary size.
pub(crate) fn check_embedding(
    table_len: usize,
    hidden: usize,
    ids: &[u32],
    out_len: usize,
) -> Result<usize, CudaError> {
    const OP: &str = "embedding gather";
    if hidden == 0 || !table_len.is_multiple_of(hidden) {
        return Err(shape(
            OP,
            format!("table of {table_len} elements is not rows of hidden {hidden}"),
        ));
    }
    let vocab = table_len / hidden;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(shape(
            OP,
            format!("token id {bad} outside the vocabulary of {vocab}"),
        ));
    }
    check_len(OP, "out", out_len, ids.len() * hidden)?;
    Ok(vocab)
}

/// A quantized embedding table of rows `cols` wide read in rows of `hidden`.
pub(crate) fn check_quant_table(cols: usize, hidden: usize) -> Result<(), CudaError> {
    if cols != hidden {
        return Err(shape(
            "embedding gather",
            format!("quantized table rows of {cols} read as rows of hidden {hidden}"),
        ));
    }
    Ok(())
}

/// RoPE over `n_tokens` x `n_heads` heads of `head_dim`, rotating `rotary_dim` of them.
pub(crate) fn check_rope(
    lens: [usize; 3],
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
) -> Result<(), CudaError> {
    const OP: &str = "rope";
    if rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
        return Err(shape(
            OP,
            format!("rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}"),
        ));
    }
    let [x, positions, inv_freq] = lens;
    check_len(OP, "x", x, n_tokens * n_heads * head_dim)?;
    check_len(OP, "positions", positions, n_tokens)?;
    check_len(OP, "inv_freq", inv_freq, rotary_dim / 2)
}

/// M-RoPE over `n_tokens` x `n_heads` heads of `head_dim` with three positions per token and
/// sections `section` (temporal, row, column frequency pairs, summing to `head_dim / 2`).
pub(crate) fn check_rope_mrope(
    [x, positions3, inv_freq]: [usize; 3],
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    section: [usize; 3],
) -> Result<(), CudaError> {
    const OP: &str = "rope mrope";
    if !head_dim.is_multiple_of(2) || section.iter().sum::<usize>() != head_dim / 2 {
        return Err(shape(
            OP,
            format!(
                "mrope_section {section:?} must cover head_dim / 2 = {} frequency pairs (head_dim {head_dim} even)",
                head_dim / 2
            ),
        ));
    }
    check_len(OP, "x", x, n_tokens * n_heads * head_dim)?;
    check_len(OP, "positions", positions3, 3 * n_tokens)?;
    check_len(OP, "inv_freq", inv_freq, head_dim / 2)
}

/// A quantized matrix of `have = (rows, cols)` used as `want = (rows, cols)`.
pub(crate) fn check_quant_shape(
    have: (usize, usize),
    want: (usize, usize),
) -> Result<(), CudaError> {
    if have != want {
        return Err(shape(
            "quantized gemv",
            format!(
                "matrix is {}x{}, the product needs {}x{}",
                have.0, have.1, want.0, want.1
            ),
        ));
    }
    Ok(())
}

/// `len` tokens written into block `block` of a pool of `blocks` blocks from slot
/// `tok_offset`.
pub(crate) fn check_span(
    op: &'static str,
    layout: &KvLayout,
    blocks: usize,
    block: usize,
    tok_offset: usize,
    len: usize,
) -> Result<(), CudaError> {
    if block >= blocks || len == 0 || tok_offset + len > layout.block_tokens {
        return Err(shape(
            op,
            format!(
                "block {block} slots {tok_offset}..{} (pool has {blocks} blocks of {} tokens)",
                tok_offset + len,
                layout.block_tokens
            ),
        ));
    }
    Ok(())
}

/// Per-channel keys quantize a whole block at once.
pub(crate) fn check_frame_offset(
    op: &'static str,
    layout: &KvLayout,
    tok_offset: usize,
) -> Result<(), CudaError> {
    if layout.key_per_channel && tok_offset != 0 {
        return Err(shape(
            op,
            format!("per-channel keys quantize whole blocks; got slot offset {tok_offset}"),
        ));
    }
    Ok(())
}

/// An attention of `n_q` queries with `q_heads` heads over `entries` of pools with `layout`
/// and (`text`, `frame`) blocks.
pub(crate) fn check_attention(
    layout: &KvLayout,
    blocks: (usize, usize),
    q_heads: usize,
    entries: &[BlockEntry],
    n_q: usize,
) -> Result<(), CudaError> {
    const OP: &str = "mixed attention";
    if q_heads == 0 || !q_heads.is_multiple_of(layout.kv_heads) {
        return Err(shape(
            OP,
            format!(
                "q_heads {q_heads} is not a multiple of kv_heads {}",
                layout.kv_heads
            ),
        ));
    }
    if n_q == 0 || n_q > 65_535 {
        return Err(shape(OP, format!("{n_q} queries in one call (1 to 65535)")));
    }
    validate_entries(layout, entries, blocks.0, blocks.1)
}

/// The window starts `q_from` of an attention of `n_q` queries: none, or one per query.
pub(crate) fn check_q_from(q_from: &[i32], n_q: usize) -> Result<(), CudaError> {
    if !q_from.is_empty() && q_from.len() != n_q {
        return Err(shape(
            "mixed attention",
            format!(
                "{} window starts for {n_q} queries (none or one each)",
                q_from.len()
            ),
        ));
    }
    Ok(())
}

/// A plan made for `plan` (layout, blocks) run on pools of `pools` (layout, blocks).
pub(crate) fn check_plan_on_pools(
    plan: (&KvLayout, (usize, usize)),
    pools: (&KvLayout, (usize, usize)),
) -> Result<(), CudaError> {
    let ((pl, pb), (l, b)) = (plan, pools);
    if pl != l || pb.0 > b.0 || pb.1 > b.1 {
        return Err(shape(
            "mixed attention",
            format!(
                "plan for {pl:?} with {}/{} blocks used on pools {l:?} with {}/{} blocks",
                pb.0, pb.1, b.0, b.1
            ),
        ));
    }
    Ok(())
}

/// A copy of the first `blocks` of pools `src` (layout, blocks) into `dst`.
pub(crate) fn check_pool_copy(
    src: (&KvLayout, (usize, usize)),
    dst: (&KvLayout, (usize, usize)),
    blocks: (usize, usize),
) -> Result<(), CudaError> {
    let ((sl, sb), (dl, db)) = (src, dst);
    if dl != sl || blocks.0 > sb.0.min(db.0) || blocks.1 > sb.1.min(db.1) {
        return Err(shape(
            "kv offload copy",
            format!(
                "{blocks:?} blocks from pools of {}/{} into {}/{}",
                sb.0, sb.1, db.0, db.1
            ),
        ));
    }
    Ok(())
}

/// RMSNorm of `rows` rows of `dim`.
pub(crate) fn check_rmsnorm(
    [x, out, weight]: [usize; 3],
    rows: usize,
    dim: usize,
) -> Result<(), CudaError> {
    const OP: &str = "rmsnorm";
    check_len(OP, "x", x, rows * dim)?;
    check_len(OP, "out", out, rows * dim)?;
    check_len(OP, "weight", weight, dim)
}

/// `y[n_tok][rows] = x[n_tok][cols] W^T`.
pub(crate) fn check_gemv(
    [w, x, y]: [usize; 3],
    rows: usize,
    cols: usize,
    n_tok: usize,
) -> Result<(), CudaError> {
    const OP: &str = "gemv";
    check_len(OP, "w", w, rows * cols)?;
    check_len(OP, "x", x, n_tok * cols)?;
    check_len(OP, "y", y, n_tok * rows)
}

/// `y[t][r] += b[r]` over `n_tok` rows of `rows`.
pub(crate) fn check_bias_add(
    [y, b]: [usize; 2],
    rows: usize,
    n_tok: usize,
) -> Result<(), CudaError> {
    const OP: &str = "bias add";
    check_len(OP, "y", y, rows * n_tok)?;
    check_len(OP, "b", b, rows)
}

/// `x[..n] += y[..n]`.
pub(crate) fn check_residual_add([x, y]: [usize; 2], n: usize) -> Result<(), CudaError> {
    const OP: &str = "residual add";
    check_len(OP, "x", x, n)?;
    check_len(OP, "y", y, n)
}

/// `out[..n] = silu(gate) * up`.
pub(crate) fn check_swiglu(lens: [usize; 3], n: usize) -> Result<(), CudaError> {
    check_gated("swiglu", lens, n)
}

/// `out[..n] = act(gate) * up` of operation `op` (SwiGLU, GeGLU).
pub(crate) fn check_gated(
    op: &'static str,
    [out, gate, up]: [usize; 3],
    n: usize,
) -> Result<(), CudaError> {
    check_len(op, "out", out, n)?;
    check_len(op, "gate", gate, n)?;
    check_len(op, "up", up, n)
}

/// The element range of tokens `src_token..src_token + len` of K and V buffers of
/// `[k_len, v_len]` elements in rows of `row`.
pub(crate) fn token_rows(
    op: &'static str,
    [k_len, v_len]: [usize; 2],
    src_token: usize,
    len: usize,
    row: usize,
) -> Result<std::ops::Range<usize>, CudaError> {
    let r = src_token * row..(src_token + len) * row;
    check_len(op, "k", k_len, r.end)?;
    check_len(op, "v", v_len, r.end)?;
    Ok(r)
}

/// A quantized checkpoint matrix (`t`, its view `q`) in the kernels' host layout (the
/// simulated device's copy).
pub(crate) fn quant_matrix(
    t: &jetvlm_decoder::Tensor,
    q: &jetvlm_decoder::QuantData<'_>,
) -> Result<crate::reference::QuantMatrix, CudaError> {
    check_quant_tensor(t, q)?;
    Ok(crate::reference::QuantMatrix {
        format: q.format,
        rows: q.rows(),
        cols: q.cols,
        codes: q.codes.to_vec(),
        scales: q.scales.to_vec(),
        zeros: q.zeros.to_vec(),
    })
}

/// The parts of quantized tensor `t` (its view `q`) hold a whole `[rows, cols]` matrix of its
/// format, the tensor's shape: an error naming the tensor and its file otherwise.
pub(crate) fn check_quant_tensor(
    t: &jetvlm_decoder::Tensor,
    q: &jetvlm_decoder::QuantData<'_>,
) -> Result<(), CudaError> {
    let bad = |message: String| CudaError::Model {
        path: t.path().to_path_buf(),
        message: format!("tensor `{}`: {message}", t.name()),
    };
    let f = q.format;
    let (rows, cols) = match t.shape() {
        &[r, c] => (r, c),
        s => {
            return Err(bad(format!(
                "a quantized matrix of shape {s:?} (needs 2 dims)"
            )));
        }
    };
    f.check_cols(cols).map_err(|e| bad(e.to_string()))?;
    let groups = rows
        .checked_mul(f.groups_per_row(cols))
        .ok_or_else(|| bad(format!("{rows}x{cols} overflows")))?;
    let code_bytes = rows
        .checked_mul(f.code_bytes_per_row(cols))
        .ok_or_else(|| bad(format!("{rows}x{cols} overflows")))?;
    let want = [
        ("codes", q.codes.len(), code_bytes),
        ("scales", q.scales.len(), groups),
        (
            "zeros",
            q.zeros.len(),
            if f.has_zeros() { groups } else { 0 },
        ),
    ];
    for (what, have, need) in want {
        if have != need || q.cols != cols {
            return Err(bad(format!(
                "{what}: {have} elements for a {rows}x{cols} INT{} g{} matrix (needs {need})",
                f.bits(),
                f.group()
            )));
        }
    }
    Ok(())
}
