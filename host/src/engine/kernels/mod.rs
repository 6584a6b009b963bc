//! Warden's CPU kernels, shared by the text and embedding engines: one thread pool
//! ([`pool`]) and one run-time choice of instruction set ([`Isa`]), so a single release
//! build runs at full speed on this machine (AVX-512 VNNI) and correctly on any x86-64
//! (AVX2, or portable code), without `-C target-cpu=native`.
//!
//! This module and its children hold the engine's `unsafe` code: SIMD intrinsics behind
//! run-time feature checks, and the pool's hand-over of a borrowed closure to its worker
//! threads. Every SIMD kernel has a plain scalar reference and tests that it agrees.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod dense;
pub mod math;
pub mod pool;
pub mod q4;
pub mod q8;
pub mod span;

use std::sync::OnceLock;

use pool::Pool;
use q4::{GROUP, Q81};

/// A plain loop compiled once per instruction set and chosen at run time: the body is
/// ordinary safe Rust, which the compiler vectorizes for AVX-512 or AVX2 inside a
/// `#[target_feature]` copy, so no `-C target-cpu` is needed for its speed. The copies
/// compute the same operations in the same order (Rust never reassociates or contracts
/// float arithmetic), so every path gives the same bits.
///
/// `per_isa! { /// docs \n pub fn name(a: A, b: B) { body } }` defines
/// `pub fn name(isa: Isa, a: A, b: B)`, which panics if the CPU lacks `isa`.
macro_rules! per_isa {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name(isa: $crate::engine::kernels::Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
            fn avx512($($arg: $ty),*) {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn avx2($($arg: $ty),*) {
                body($($arg),*)
            }
            assert!(isa.supported(), "{} is not supported here", isa.as_str());
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU supports the instruction set (asserted above).
                #[allow(unsafe_code)]
                $crate::engine::kernels::Isa::Avx512Vnni => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                #[allow(unsafe_code)]
                $crate::engine::kernels::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use per_isa;

/// Activation rows computed together against one group's weights (register tile).
const TILE: usize = 4;

/// A matrix repacked in groups of [`GROUP`] rows, whose kernel computes one group's sums
/// for up to [`TILE`] activation rows at a time; [`grouped_matmul`] drives it.
trait Grouped: Sync {
    /// Output width.
    fn rows(&self) -> usize;
    /// Groups of [`GROUP`] rows (the last one may be partial).
    fn groups(&self) -> usize;
    /// Group `g`'s sums for activation rows `start..start + count` (`count` ≤ [`TILE`]),
    /// with the kernels of `isa`, which the CPU supports.
    fn group(
        &self,
        g: usize,
        x: &Q81,
        start: usize,
        count: usize,
        tile: &mut [[f32; GROUP]; TILE],
        isa: Isa,
    );
}

/// `out[n·rows + r] = x_n · W_r` for every activation row `n`: the groups split among the
/// pool's threads, each group run against the activations a tile at a time, so a group's
/// weights are read once per tile while they are in L1.
fn grouped_matmul(w: &impl Grouped, x: &Q81, out: &mut [f32], isa: Isa, pool: &Pool) {
    let (n, rows) = (x.rows(), w.rows());
    assert_eq!(out.len(), n * rows, "output size");
    assert!(isa.supported(), "{} is not supported here", isa.as_str());
    let out_ptr = SendPtr(out.as_mut_ptr());
    pool.for_ranges(w.groups(), 1, &|groups| {
        let mut tile = [[0f32; GROUP]; TILE];
        for g in groups {
            let width = GROUP.min(rows - g * GROUP);
            let mut start = 0;
            while start < n {
                let count = (n - start).min(TILE);
                w.group(g, x, start, count, &mut tile, isa);
                for (i, sums) in tile[..count].iter().enumerate() {
                    let at = (start + i) * rows + g * GROUP;
                    // SAFETY: each group writes only its own columns `g·16..g·16+width` of
                    // each output row, and groups are split among tasks without overlap,
                    // so no two threads write the same element; `at + width` is within
                    // `out` (n·rows long) by the assertion above.
                    #[allow(unsafe_code)]
                    unsafe {
                        std::ptr::copy_nonoverlapping(sums.as_ptr(), out_ptr.get().add(at), width);
                    }
                }
                start += count;
            }
        }
    });
}

/// A raw output pointer that tasks on other threads may write through (disjointly).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used by `grouped_matmul`, whose tasks write disjoint elements and finish
// before it returns.
#[allow(unsafe_code)]
unsafe impl Send for SendPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// An instruction set the kernels can use, in increasing order of capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// AVX2 with FMA and F16C (x86-64 since about 2013).
    Avx2,
    /// AVX-512 (F, BW, VL) with VNNI: `vpdpbusd`, 64 int8 multiply-adds per instruction.
    Avx512Vnni,
}

/// The environment variable that caps the instruction set (`avx512-amx`, `avx512-vnni`,
/// `avx2` or `scalar`), to run and test the fallback paths on a capable machine.
/// `avx512-amx` caps nothing; `avx512-vnni` keeps AVX-512 but not AMX's tiles
/// ([`amx::active`]).
pub const ISA_VARIABLE: &str = "WARDEN_KERNELS";

impl Isa {
    /// Every instruction set, most capable first.
    pub const ALL: [Isa; 3] = [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar];

    /// Its name in settings and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Parse a name as [`Isa::as_str`] writes it.
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.as_str() == name.trim())
    }

    /// Whether this CPU can run kernels written for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512vnni")
                    && Isa::Avx2.supported()
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The most capable instruction set this CPU supports.
    pub fn detected() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Scalar)
    }

    /// The instruction set the kernels use: [`Isa::detected`], capped by
    /// [`ISA_VARIABLE`] if it is set. Decided once per process and logged.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let detected = Isa::detected();
            let chosen = match std::env::var(ISA_VARIABLE) {
                Ok(name) if name.trim() == "avx512-amx" => detected,
                Ok(name) => match Isa::parse(&name) {
                    Some(cap) => cap.min(detected),
                    None => {
                        tracing::warn!(
                            variable = ISA_VARIABLE,
                            value = %name,
                            "unknown instruction set; expected avx512-amx, avx512-vnni, avx2 or scalar"
                        );
                        detected
                    }
                },
                Err(_) => detected,
            };
            tracing::info!(
                kernels = chosen.as_str(),
                detected = detected.as_str(),
                "CPU kernels"
            );
            chosen
        })
    }

    /// The supported instruction sets, for tests that run every path.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_there() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.as_str()), Some(isa));
        }
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Scalar.supported());
        assert!(Isa::available().contains(&Isa::detected()));
        assert!(Isa::active() <= Isa::detected());
    }
}
