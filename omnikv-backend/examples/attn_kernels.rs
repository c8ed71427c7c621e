//! Time the attention kernels on one SmolLM2-135M-shaped layer (9 query
//! heads, 3 KV heads, head dim 64): a prompt pass of `n` tokens with the
//! exact (stock arithmetic) and the tiled kernel.
//!
//! `cargo build --workspace --examples && target/debug/examples/attn_kernels 4096`

use std::time::Instant;

use candle_core::{Device, Tensor};
use omnikv_backend::attention::{exact_attention, tiled_causal_attention};

fn main() -> candle_core::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, 9, n, 64), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, 3, n, 64), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, 3, n, 64), &dev)?;
    for _ in 0..2 {
        let t = Instant::now();
        tiled_causal_attention(&q, &k, &v, 0.125)?;
        let tiled = t.elapsed().as_secs_f64();
        if std::env::args().nth(2).as_deref() == Some("tiled") {
            println!("n={n}: tiled {tiled:.3} s");
            continue;
        }
        let t = Instant::now();
        exact_attention(&q, &k, &v, 0.125)?;
        let exact = t.elapsed().as_secs_f64();
        println!(
            "n={n}: tiled {tiled:.3} s, exact {exact:.3} s, ratio {:.1}x",
            exact / tiled
        );
    }
    Ok(())
}
