// Helpers shared by every kernel source: sdk/cuda/src/sources.rs prepends this file to each
// `.cu` file (followed by a `#line 1` directive, so NVRTC messages keep the file's own line
// numbers) before NVRTC compiles it.
//
// FP16 values are carried as their IEEE bits (unsigned short) and converted with PTX cvt, so
// the kernels need no CUDA header: NVRTC compiles them as they are.
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
struct f16_t { unsigned short bits; };   // IEEE FP16
struct bf16_t { unsigned short bits; };  // bfloat16
#define NEG_INF __int_as_float(0xff800000)

// Element `i` of an f32, f16 or bf16 array as f32.
__device__ __forceinline__ float load_elem(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_elem(const f16_t* p, size_t i) { return h2f(p[i].bits); }
__device__ __forceinline__ float load_elem(const bf16_t* p, size_t i) { return bf2f(p[i].bits); }
