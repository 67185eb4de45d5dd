// lab-extends: gemm
//
// Kernel-lab lines for the f32 GEMM (benches/kernels.rs `wgsl_lab`, BENCHMARKS.md sessions 23–24):
// the shipped entry points of shaders/gemm.wgsl (prepended by the line above) with their override
// settings, each checked against the shipped kernel and timed on the GPU machine in the same run,
// so a call has its own baseline. Not part of the product.
//
// - the shipped kernels as they run (`gemm_large` on 128×128 tiles, `gemm_small` on 64×64);
// - `SWIZZLE=0`: the unswizzled staging that shipped before session 24 (an 8-way bank conflict on
//   every store of a k-contiguous operand; gemm.wgsl `swz`), to keep measuring what it is worth;
// - `DOUBLE_BUFFER=1`: two staging buffers, one barrier per slice.
//
// New variants go in a file of their own that extends the shipped shader the same way and adds
// only its new entry points. Session 23's (16-deep k slices, 4-row vec4 staging) were slower than
// the swizzle in session 24's call 2 and were removed; BENCHMARKS.md has their numbers. So were
// session 41's (tiles in groups of 8 tile rows, as the tensor-core kernel takes its blocks, and
// subgroups over 4 × 8 or 8 × 4 thread blocks instead of 2 × 16): within 1.6 % of the shipped
// kernel on an H100.

// lab32: gemm_large nt 128
// lab32: gemm_large nn 128
// lab32: gemm_large tn 128
// lab32: gemm_large nn 128 DOUBLE_BUFFER=1
// lab32: gemm_small nt 64
// lab32: gemm_small nn 64
// lab32: gemm_large nt 128 SWIZZLE=0
// lab32: gemm_large nn 128 SWIZZLE=0
// lab32: gemm_large tn 128 SWIZZLE=0
// lab32: gemm_large nn 128 SWIZZLE=0 DOUBLE_BUFFER=1
// lab32: gemm_small nt 64 SWIZZLE=0
// lab32: gemm_small nn 64 SWIZZLE=0
