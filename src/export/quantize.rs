//! Symmetric INT8 quantisation of weights: per output channel, or per block along the input
//! axis for `MatMulNBits`.

/// Largest magnitude of a symmetric int8 code (-127..=127 keeps the range symmetric).
const QMAX: f32 = 127.0;

/// A matrix quantised per row (one scale per row).
pub struct RowQuantized {
    /// `rows * cols` codes, row-major.
    pub codes: Vec<i8>,
    /// One scale per row.
    pub scales: Vec<f32>,
}

fn scale_of(values: &[f32]) -> f32 {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max > 0.0 { max / QMAX } else { 1.0 }
}

fn code(v: f32, scale: f32) -> i8 {
    (v / scale).round().clamp(-QMAX, QMAX) as i8
}

/// Quantises a row-major `[rows, cols]` matrix with one scale per row.
pub fn quantize_rows(values: &[f32], cols: usize) -> RowQuantized {
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / cols.max(1));
    for row in values.chunks_exact(cols) {
        let s = scale_of(row);
        scales.push(s);
        codes.extend(row.iter().map(|&v| code(v, s)));
    }
    RowQuantized { codes, scales }
}

/// A `[rows, cols]` matrix quantised in blocks of `block` along each row, in the layout of
/// ONNX Runtime's `MatMulNBits` with 8 bits: unsigned codes offset by 128 (its default zero
/// point), rows padded with zeros to whole blocks.
pub struct BlockQuantized {
    /// `rows * blocks * block` unsigned codes.
    pub codes: Vec<u8>,
    /// `rows * blocks` scales.
    pub scales: Vec<f32>,
    /// Blocks per row.
    pub blocks: usize,
}

/// Quantises a row-major `[rows, cols]` matrix in blocks of `block` columns.
pub fn quantize_blocks(values: &[f32], cols: usize, block: usize) -> BlockQuantized {
    let blocks = cols.div_ceil(block);
    let rows = values.len() / cols.max(1);
    let mut codes = Vec::with_capacity(rows * blocks * block);
    let mut scales = Vec::with_capacity(rows * blocks);
    for row in values.chunks_exact(cols) {
        for chunk in row.chunks(block) {
            let s = scale_of(chunk);
            scales.push(s);
            codes.extend(chunk.iter().map(|&v| (i16::from(code(v, s)) + 128) as u8));
            codes.extend(std::iter::repeat_n(128u8, block - chunk.len()));
        }
    }
    BlockQuantized { codes, scales, blocks }
}

/// Transposes a row-major `[rows, cols]` matrix, in tiles so both sides stay in cache (the
/// embedding of a 1.5B student is 233M elements).
pub fn transpose<T: Copy + Default>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 64;
    let mut out = vec![T::default(); values.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_quantization_round_trips_within_half_a_step() {
        let w = [0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 2.0, -0.1, 0.3];
        let q = quantize_rows(&w, 3);
        assert_eq!(q.codes[1], -127);
        assert_eq!(q.scales[1], 1.0, "an all-zero row keeps a usable scale");
        for (i, &v) in w.iter().enumerate() {
            let back = f32::from(q.codes[i]) * q.scales[i / 3];
            assert!((back - v).abs() <= q.scales[i / 3] / 2.0 + 1e-6, "{v} -> {back}");
        }
    }

    #[test]
    fn block_quantization_pads_and_offsets() {
        let w: Vec<f32> = (0..20).map(|i| i as f32 - 10.0).collect();
        let q = quantize_blocks(&w, 20, 16);
        assert_eq!((q.blocks, q.codes.len(), q.scales.len()), (2, 32, 2));
        assert_eq!(q.codes[0], 1, "-10 is the block's largest magnitude: code -127 + 128");
        assert!(q.codes[20..].iter().all(|&c| c == 128), "padding is the zero point");
    }

    #[test]
    fn transpose_swaps_axes() {
        assert_eq!(transpose(&[1, 2, 3, 4, 5, 6], 2, 3), vec![1, 4, 2, 5, 3, 6]);
    }
}
