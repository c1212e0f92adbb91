//! The feed-forward's gate: SiLU of the gate times the up projection,
//! `g / (1 + e^-g) · u`, with the polynomial `exp` of the attention
//! kernels, compiled per instruction set. As a library call per element
//! it cost a call for each of a layer's 1,536 gates per token.

use crate::attention::exp;
use crate::{Isa, IsaKind};

/// `out[i] = silu(gate[i]) · up[i]`.
///
/// # Panics
/// If the slices' lengths differ.
pub fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    match isa.0 {
        IsaKind::Scalar => silu::<false>(gate, up, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` other than `Scalar` exists only once
        // `available` saw AVX2, FMA and F16C.
        _ => unsafe { silu_avx2(gate, up, out) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu::<true>(gate, up, out);
}

#[inline(always)]
fn silu<const FMA: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp::<FMA>(-g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_gates_as_the_formula_does() {
        let gate: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.213).collect();
        let up: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).cos()).collect();
        for isa in Isa::available() {
            let mut out = vec![0.0; gate.len()];
            silu_mul(isa, &gate, &up, &mut out);
            for ((&g, &u), &o) in gate.iter().zip(&up).zip(&out) {
                let want = f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u);
                assert!(
                    (f64::from(o) - want).abs() <= 1e-6 * want.abs().max(1e-30),
                    "{} silu({g}) * {u} = {o}, want {want}",
                    isa.name()
                );
            }
        }
    }
}
