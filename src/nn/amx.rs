//! Intel AMX (Advanced Matrix Extensions) for the reduced-precision dense
//! layers: eight tile registers of 16 rows x 64 bytes and one instruction
//! that multiplies two tiles into a third.
//!
//! - `tdpbusd` (AMX-INT8): 16 x 64 u8 inputs times 64 x 16 i8 weights,
//!   summed into 16 x 16 i32: 16,384 multiply-adds.
//! - `tdpbf16ps` (AMX-BF16): 16 x 32 bf16 inputs times 32 x 16 bf16 weights,
//!   summed into 16 x 16 f32: 8,192 multiply-adds.
//!
//! A weight tile is 16 rows of 64 bytes, each holding 16 output columns x 4
//! bytes (4 int8 or 2 bf16 inputs of one column): exactly 16 rows of the
//! panel layout of [`super::tiling::Panels`], so both layers keep their one
//! packing. Linux lends the tile registers to a process that asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once; the tile shapes are configured
//! per thread for the length of a product ([`TileConfig`]).
//!
//! The intrinsics for AMX are not stable in Rust; the instructions are
//! written as inline assembly, which is.

use super::tiling::{Panels, LANES};

/// Rows of one tile.
pub(super) const TILE_ROWS: usize = 16;
/// Rows and panels (16 columns each) one [`multiply`] call computes: 2 x 2
/// accumulator tiles, so that every input tile and every weight tile loaded
/// serves two products. Inputs are padded to a multiple of these rows.
pub(super) const ROWS: usize = 2 * TILE_ROWS;
pub(super) const PANELS: usize = 2;

/// The accumulator tiles of one call, `[2 * row_tile + panel][row][column]`:
/// i32 sums, or the bits of f32 sums.
pub(super) type Sums = [[i32; TILE_ROWS * 16]; 4];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Product {
    Int8,
    Bf16,
}

/// Whether this CPU has AMX for `product` (and AVX-512 for the work around
/// it), and the kernel lends this process the tile registers.
pub(super) fn usable(product: Product) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static CPU: OnceLock<(bool, bool)> = OnceLock::new();
        // CPUID leaf 7, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8.
        let (int8, bf16) = *CPU.get_or_init(|| {
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            let tiles = edx & (1 << 24) != 0
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && request_tile_permission();
            (tiles && edx & (1 << 25) != 0, tiles && edx & (1 << 22) != 0)
        });
        match product {
            Product::Int8 => int8,
            Product::Bf16 => bf16,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = product;
        false
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which register state
    // this process may use; it reads no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> bool {
    false
}

/// Where one call reads its operands.
pub(super) struct Operands {
    /// The first input row of the call (u8 codes or bf16 values).
    pub inputs: *const u8,
    /// Bytes from one input row to the next.
    pub input_stride: usize,
    /// The first panel of the call.
    pub weights: *const u8,
    /// Bytes from one panel to the next.
    pub panel_bytes: usize,
    /// Bytes of one input row that take part (a multiple of 64).
    pub depth_bytes: usize,
}

impl Operands {
    /// The operands of a call whose first input row is `first_row` of
    /// `inputs` (rows of `weights.depth` values) and whose first panel is
    /// `first_panel` of `weights`.
    pub fn of<I, W>(
        inputs: &[I],
        first_row: usize,
        weights: &Panels<W>,
        first_panel: usize,
    ) -> Self {
        // Inputs and weights have the same width (u8 and i8, or two bf16).
        debug_assert_eq!(std::mem::size_of::<I>(), std::mem::size_of::<W>());
        let bytes = std::mem::size_of::<W>();
        let depth = weights.depth;
        Self {
            inputs: inputs[first_row * depth..].as_ptr().cast(),
            input_stride: depth * bytes,
            weights: weights.values[first_panel * LANES * depth..]
                .as_ptr()
                .cast(),
            panel_bytes: LANES * depth * bytes,
            depth_bytes: depth * bytes,
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{multiply, TileConfig};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    use super::{Operands, Product, Sums, TILE_ROWS};

    /// The tile shapes, loaded on the current thread while this value lives:
    /// all eight tiles 16 rows x 64 bytes (tmm0-tmm3 accumulate, tmm4/tmm5
    /// hold inputs, tmm6/tmm7 weights).
    pub struct TileConfig;

    #[repr(C, align(64))]
    struct Palette([u8; 64]);

    impl TileConfig {
        /// Only to be called where [`super::usable`] said yes.
        pub fn load() -> Self {
            let mut palette = Palette([0; 64]);
            palette.0[0] = 1;
            for tile in 0..8 {
                palette.0[16 + 2 * tile] = 64; // bytes per row (u16, little-endian)
                palette.0[48 + tile] = TILE_ROWS as u8;
            }
            // SAFETY: AMX is usable (the caller's contract); the palette is a
            // valid, aligned 64-byte configuration.
            unsafe { asm!("ldtilecfg [{}]", in(reg) palette.0.as_ptr(), options(nostack)) };
            TileConfig
        }
    }

    impl Drop for TileConfig {
        fn drop(&mut self) {
            // Released tiles keep this thread's context switches cheap.
            // SAFETY: tilerelease is valid wherever AMX is usable.
            unsafe { asm!("tilerelease", options(nostack)) };
        }
    }

    /// Multiplies up to 32 input rows by up to 2 panels of weights.
    ///
    /// # Safety
    /// AMX is usable for `product` and a [`TileConfig`] is alive on this
    /// thread; the operands cover 32 rows and `panels` panels of
    /// `depth_bytes` (input rows beyond the real ones exist and are zero).
    pub unsafe fn multiply(
        product: Product,
        operands: &Operands,
        rows: usize,
        panels: usize,
    ) -> Sums {
        // SAFETY: the caller's contract, passed on: the tiles are configured,
        // and the operands cover the rows and panels asked for.
        unsafe {
            match (product, rows > TILE_ROWS, panels > 1) {
                (Product::Int8, true, true) => tiles::<false, 2, 2>(operands),
                (Product::Int8, true, false) => tiles::<false, 2, 1>(operands),
                (Product::Int8, false, true) => tiles::<false, 1, 2>(operands),
                (Product::Int8, false, false) => tiles::<false, 1, 1>(operands),
                (Product::Bf16, true, true) => tiles::<true, 2, 2>(operands),
                (Product::Bf16, true, false) => tiles::<true, 2, 1>(operands),
                (Product::Bf16, false, true) => tiles::<true, 1, 2>(operands),
                (Product::Bf16, false, false) => tiles::<true, 1, 1>(operands),
            }
        }
    }

    /// One product of tiles: `tdpbf16ps` when `BF16`, else `tdpbusd`.
    macro_rules! product {
        ($acc:literal, $a:literal, $b:literal) => {
            if BF16 {
                asm!(
                    concat!("tdpbf16ps tmm", $acc, ", tmm", $a, ", tmm", $b),
                    options(nostack)
                );
            } else {
                asm!(
                    concat!("tdpbusd tmm", $acc, ", tmm", $a, ", tmm", $b),
                    options(nostack)
                );
            }
        };
    }

    macro_rules! load {
        ($tile:literal, $at:expr, $stride:expr) => {
            asm!(
                concat!("tileloadd tmm", $tile, ", [{at} + {stride} * 1]"),
                at = in(reg) $at,
                stride = in(reg) $stride,
                options(nostack)
            );
        };
    }

    macro_rules! store {
        ($tile:literal, $to:expr) => {
            asm!(
                concat!("tilestored [{to} + {stride} * 1], tmm", $tile),
                to = in(reg) $to,
                stride = in(reg) 64usize,
                options(nostack)
            );
        };
    }

    /// `R` row tiles by `P` panels, as [`multiply`].
    ///
    /// # Safety
    /// As [`multiply`], for `R * 16` rows and `P` panels.
    unsafe fn tiles<const BF16: bool, const R: usize, const P: usize>(o: &Operands) -> Sums {
        // SAFETY: the tiles are configured (the caller's contract); zeroing
        // touches no memory.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            );
        }
        for k in (0..o.depth_bytes).step_by(64) {
            // SAFETY: `k` is below `depth_bytes`: each load reads 16 rows of 64
            // bytes from `k` on, of the input rows (`input_stride` apart, 16 or
            // 32 of them) and of the panels (`R` and `P` as the caller covers).
            unsafe {
                // A panel's weight tile: 16 rows of 64 bytes, contiguous.
                let weights = o.weights.add(k * TILE_ROWS);
                load!("4", o.inputs.add(k), o.input_stride);
                load!("6", weights, 64usize);
                product!("0", "4", "6");
                if P > 1 {
                    load!("7", weights.add(o.panel_bytes), 64usize);
                    product!("1", "4", "7");
                }
                if R > 1 {
                    load!(
                        "5",
                        o.inputs.add(TILE_ROWS * o.input_stride + k),
                        o.input_stride
                    );
                    product!("2", "5", "6");
                    if P > 1 {
                        product!("3", "5", "7");
                    }
                }
            }
        }
        let mut sums: Sums = [[0; TILE_ROWS * 16]; 4];
        // SAFETY: each accumulator tile is stored as 16 rows of 64 bytes into
        // one of the four arrays of `sums`, which hold exactly that.
        unsafe {
            store!("0", sums[0].as_mut_ptr());
            if P > 1 {
                store!("1", sums[1].as_mut_ptr());
            }
            if R > 1 {
                store!("2", sums[2].as_mut_ptr());
                if P > 1 {
                    store!("3", sums[3].as_mut_ptr());
                }
            }
        }
        sums
    }
}
