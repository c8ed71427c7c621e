//! Rotary position embedding tables (RoPE) shared by the model, which
//! rotates queries and keys at their positions, and the window selectors,
//! which re-rotate a filter layer's past queries to the current decode
//! position (spec: "Selection at a filter layer"; published code: every
//! window query is scored with the rotary embedding of the current position).
//!
//! A rotation by angle `pos * inv_freq` composes additively, also under
//! llama3 rope scaling (which only changes `inv_freq`): a query rotated at
//! position `p` and then by `t - p` equals the same query rotated at `t`.

use candle_core::{DType, Device, Result, Tensor};

/// Precomputed cos/sin tables `(max_positions, head_dim / 2)`.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// Adjacent pairs (GGUF) instead of halves (HF).
    interleaved: bool,
    max_positions: usize,
}

impl Rotary {
    /// Tables for positions `0 .. max_positions` from `inv_freq`
    /// (`head_dim / 2` values), in `dtype` on `device`; `interleaved` rotates
    /// adjacent pairs (GGUF) instead of halves (HF).
    ///
    /// # Errors
    /// If a tensor cannot be created or converted on `device`.
    pub fn new(
        inv_freq: &[f32],
        max_positions: usize,
        interleaved: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv = Tensor::from_slice(inv_freq, (1, inv_freq.len()), device)?;
        let t = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = t.matmul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            interleaved,
            max_positions,
        })
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)
        }
    }

    /// Rotate `q` `(b, h, s, d)` and `k` `(b, kv_h, s, d)`; sequence `i` of the
    /// batch starts at position `offsets[i]`.
    ///
    /// # Errors
    /// If `offsets` does not hold one offset per sequence, a position reaches
    /// `max_positions`, or the rotation fails (an empty batch is refused).
    pub fn apply(&self, q: &Tensor, k: &Tensor, offsets: &[usize]) -> Result<(Tensor, Tensor)> {
        let (b, _, s, _) = q.dims4()?;
        if offsets.len() != b || b == 0 {
            candle_core::bail!("{} position offsets for a batch of {b}", offsets.len());
        }
        if let Some(&last) = offsets.iter().max() {
            if last + s > self.max_positions {
                candle_core::bail!(
                    "position {} is beyond the model's context length of {} tokens",
                    last + s - 1,
                    self.max_positions
                );
            }
        }
        if offsets.windows(2).all(|w| w[0] == w[1]) {
            let cos = self.cos.narrow(0, offsets[0], s)?;
            let sin = self.sin.narrow(0, offsets[0], s)?;
            return Ok((self.rotate(q, &cos, &sin)?, self.rotate(k, &cos, &sin)?));
        }
        let mut qs = Vec::with_capacity(b);
        let mut ks = Vec::with_capacity(b);
        for (i, &off) in offsets.iter().enumerate() {
            let cos = self.cos.narrow(0, off, s)?;
            let sin = self.sin.narrow(0, off, s)?;
            qs.push(self.rotate(&q.narrow(0, i, 1)?, &cos, &sin)?);
            ks.push(self.rotate(&k.narrow(0, i, 1)?, &cos, &sin)?);
        }
        Ok((Tensor::cat(&qs, 0)?, Tensor::cat(&ks, 0)?))
    }
}

impl Rotary {
    /// Longest context the tables cover, in tokens.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Re-rotate post-RoPE queries `(w, h, d)` from their own positions
    /// `positions` (one per row) to position `target`, in the dtype of
    /// `queries`: row `i` turns by `target - positions[i]`, which equals
    /// rotating its pre-RoPE query at `target`.
    ///
    /// # Errors
    /// If `positions` does not hold one position per row, a position is after
    /// `target`, or a tensor operation fails.
    pub fn rotate_to(
        &self,
        queries: &Tensor,
        positions: &[usize],
        target: usize,
    ) -> Result<Tensor> {
        let (w, _h, _d) = queries.dims3()?;
        if positions.len() != w {
            candle_core::bail!("{} positions for {w} queries", positions.len());
        }
        let mut deltas = Vec::with_capacity(w);
        for &p in positions {
            if p > target || target - p >= self.max_positions {
                candle_core::bail!("cannot rotate a query at position {p} to position {target}");
            }
            deltas.push((target - p) as u32);
        }
        let idx = Tensor::from_vec(deltas, w, self.cos.device())?;
        let cos = self.cos.index_select(&idx, 0)?;
        let sin = self.sin.index_select(&idx, 0)?;
        let dtype = queries.dtype();
        let x = queries
            .to_dtype(self.cos.dtype())?
            .transpose(0, 1)? // (h, w, d)
            .unsqueeze(0)?;
        self.rotate(&x, &cos, &sin)?
            .squeeze(0)?
            .transpose(0, 1)?
            .contiguous()?
            .to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(seed)) >> 16) as f32 / 65536.0 - 0.5
            })
            .collect()
    }

    /// A query rotated at its own position and then re-rotated to `target`
    /// equals the pre-RoPE query rotated at `target`, for both layouts and
    /// with llama3-scaled frequencies.
    #[test]
    fn rotate_to_equals_rotating_at_the_target() {
        let dev = Device::Cpu;
        let (h, d) = (3, 8);
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 500_000f32.powf(2.0 * i as f32 / d as f32) / (1 + i % 2) as f32)
            .collect();
        for interleaved in [false, true] {
            let rot = Rotary::new(&inv_freq, 64, interleaved, DType::F32, &dev).unwrap();
            let positions = [3usize, 17, 40, 41];
            let target = 41;
            let raw = Tensor::from_vec(values(4 * h * d, 5), (4, h, d), &dev).unwrap();
            // Post-RoPE at each row's own position (the model's rotation).
            let mut own = Vec::new();
            let mut at_target = Vec::new();
            for (i, &p) in positions.iter().enumerate() {
                let q = raw
                    .narrow(0, i, 1)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let (qp, _) = rot.apply(&q, &q, &[p]).unwrap();
                own.push(qp.squeeze(0).unwrap().transpose(0, 1).unwrap());
                let (qt, _) = rot.apply(&q, &q, &[target]).unwrap();
                at_target.push(qt.squeeze(0).unwrap().transpose(0, 1).unwrap());
            }
            let own = Tensor::cat(&own, 0).unwrap();
            let want = Tensor::cat(&at_target, 0).unwrap();
            let got = rot.rotate_to(&own, &positions, target).unwrap();
            let diff = omnikv_kernels::testing::max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "interleaved {interleaved}: {diff}");
            // Not rotating would be wrong: the test can tell.
            let unrotated = (own - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(unrotated.to_scalar::<f32>().unwrap() > 1e-2);
            assert!(rot.rotate_to(&want, &[42, 0, 0, 0], 41).is_err());
        }
    }
}
