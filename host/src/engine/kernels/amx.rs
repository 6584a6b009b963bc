//! Intel AMX (Advanced Matrix Extensions): eight tile registers of 16 rows × 64 bytes and
//! `tdpbf16ps`, which multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32 sums
//! in one instruction. Measured on a Sapphire Rapids class core with the four sums of a
//! 2 × 2 block of tiles in flight: about 3 TFLOP/s, seventeen times the core's f32 FMA peak.
//!
//! The dense bf16 products of the embedding model use it where the CPU has it, the kernel
//! lets this process use the tile registers (Linux grants them on request,
//! `arch_prctl(ARCH_REQ_XCOMP_PERM)`), and [`ISA_VARIABLE`](super::ISA_VARIABLE) does not
//! cap the kernels below `avx512-amx`. Rust's AMX intrinsics are not stable, so the few
//! instructions are written as inline assembly; the arithmetic is the same as `vdpbf16ps`'s
//! (bf16 products summed in f32), in another order.

use std::sync::OnceLock;

use super::{ISA_VARIABLE, Isa};

/// The name that lets [`ISA_VARIABLE`] keep AMX (the default where present).
pub const NAME: &str = "avx512-amx";

/// Whether the dense bf16 products may use AMX on this machine: decided once per process
/// (and the kernel's permission asked then), and logged.
pub fn active() -> bool {
    static ACTIVE: OnceLock<bool> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let capped = std::env::var(ISA_VARIABLE).is_ok_and(|v| v.trim() != NAME);
        let usable = !capped && Isa::active() == Isa::Avx512Vnni && detected() && granted();
        tracing::info!(amx = usable, capped, "CPU matrix tiles");
        usable
    })
}

/// Whether the CPU has AMX tiles with bf16 products and AVX-512 BF16 beside them.
fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (bf16, tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        bf16 && tile && super::dense::bf16_supported(Isa::Avx512Vnni)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Ask Linux for the tile data state (process-wide, for every thread); false if refused.
fn granted() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes which processor state this
        // process may use; it reads and writes no memory of ours.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if r != 0 {
            tracing::info!(
                error = %std::io::Error::last_os_error(),
                "the kernel refused the AMX tile state"
            );
        }
        r == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// Tokens per product tile (two tiles of 16 rows).
pub const TOKENS: usize = 32;
/// Outputs per product tile (two tiles of 16 columns): the dense kernels' block of rows.
pub const OUTPUTS: usize = 32;
/// Columns (bf16 values) per step of a product: one tile row of 64 bytes.
pub const STEP: usize = 32;

/// The tile configuration (palette 1): tiles 0–3 hold 16 × 16 f32 sums, 4–5 the
/// activations (16 tokens × 32 bf16), 6–7 the weights (16 column pairs × 16 outputs × 2).
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = {
    let mut c = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [0; 16],
        rows: [0; 16],
    };
    let mut t = 0;
    while t < 8 {
        c.bytes_per_row[t] = 64;
        c.rows[t] = 16;
        t += 1;
    }
    c
};

/// The tiles of the calling thread, configured; released when dropped, so that a thread
/// switch does not save 8 KiB of tile data the thread no longer needs.
pub struct Tiles(());

impl Tiles {
    /// Configure the calling thread's tiles. Only after [`active`] returned true.
    pub fn configure() -> Tiles {
        assert!(active(), "AMX is not active");
        // SAFETY: the CPU has AMX and the kernel granted its state (`active`); the
        // configuration is 64 bytes, aligned, with valid shapes.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::asm!("ldtilecfg [{0}]", in(reg) &CONFIG, options(nostack, readonly));
        }
        Tiles(())
    }

    /// `sums[t][o] = Σ_k x[t][k] · w[o][k]` for 32 tokens (`pairs` = 2: rows `x` and
    /// `x + x_stride·16`) or 16 (`pairs` = 1) and 32 outputs, over `steps` × 32 columns.
    ///
    /// `x` points at the first token's bf16 row (`x_stride` bytes apart); `w` at the block's
    /// weights as [`DensePacked`](super::dense::DensePacked) packs them in bf16: for each
    /// pair of columns, the 32 outputs' two weights side by side (128 bytes), which is the
    /// layout `tdpbf16ps` wants of its second operand.
    ///
    /// # Safety
    /// `x` must be readable for `16·pairs` rows of `steps·64` bytes `x_stride` apart, and
    /// `w` for `steps·16` rows of 128 bytes.
    #[allow(unsafe_code)]
    pub unsafe fn product(
        &self,
        x: *const u16,
        x_stride: usize,
        w: *const u16,
        steps: usize,
        pairs: usize,
        sums: &mut [[f32; OUTPUTS]; TOKENS],
    ) {
        use std::arch::asm;
        const W_STRIDE: usize = 2 * OUTPUTS * 2;
        let sums = sums.as_mut_ptr().cast::<f32>();
        // SAFETY (every block below): the caller's promise on `x` and `w`; the tiles were
        // configured by `configure` on this thread; `sums` is 32 × 32 f32 (128-byte rows).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for k in 0..steps {
                let (xk, wk) = (x.byte_add(k * 64), w.byte_add(k * 16 * W_STRIDE));
                if pairs == 2 {
                    asm!(
                        "tileloadd tmm4, [{x} + {xs} * 1]",
                        "tileloadd tmm5, [{x2} + {xs} * 1]",
                        "tileloadd tmm6, [{w} + {ws} * 1]",
                        "tileloadd tmm7, [{w} + {ws} * 1 + 64]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        x = in(reg) xk,
                        x2 = in(reg) xk.byte_add(16 * x_stride),
                        xs = in(reg) x_stride,
                        w = in(reg) wk,
                        ws = in(reg) W_STRIDE,
                        options(nostack, readonly)
                    );
                } else {
                    asm!(
                        "tileloadd tmm4, [{x} + {xs} * 1]",
                        "tileloadd tmm6, [{w} + {ws} * 1]",
                        "tileloadd tmm7, [{w} + {ws} * 1 + 64]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        x = in(reg) xk,
                        xs = in(reg) x_stride,
                        w = in(reg) wk,
                        ws = in(reg) W_STRIDE,
                        options(nostack, readonly)
                    );
                }
            }
            const ROW: usize = OUTPUTS * 4;
            asm!(
                "tilestored [{s} + {rs} * 1], tmm0",
                "tilestored [{s} + {rs} * 1 + 64], tmm1",
                s = in(reg) sums,
                rs = in(reg) ROW,
                options(nostack)
            );
            if pairs == 2 {
                asm!(
                    "tilestored [{s} + {rs} * 1], tmm2",
                    "tilestored [{s} + {rs} * 1 + 64], tmm3",
                    s = in(reg) sums.byte_add(16 * ROW),
                    rs = in(reg) ROW,
                    options(nostack)
                );
            }
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure`; releasing them returns the thread
        // to the initial state.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}
