/*
 * Caller-owned CUDA memory as tessera tensors: allocates device buffers with the CUDA driver
 * (loaded at run time, so that the program builds without the CUDA toolkit), wraps them without a
 * copy, runs a linear layer from one into another, and checks the result against a plain loop,
 * that the memory was used in place (a guard before the output stays untouched), that bad
 * addresses and ranges are refused, and that tessera never frees the memory (cuMemFree succeeds
 * afterwards, which it would not on freed memory). Where there is no GPU it says so and exits 0;
 * the GPU runner counts that line as a failure.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tessera.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef void *CUcontext;

static struct {
    CUresult (*init)(unsigned int);
    CUresult (*device_get)(CUdevice *, int);
    CUresult (*retain)(CUcontext *, CUdevice);
    CUresult (*release)(CUdevice);
    CUresult (*set_current)(CUcontext);
    CUresult (*alloc)(CUdeviceptr *, size_t);
    CUresult (*free)(CUdeviceptr);
    CUresult (*to_device)(CUdeviceptr, const void *, size_t);
    CUresult (*to_host)(void *, CUdeviceptr, size_t);
    CUresult (*synchronize)(void);
} cu;

static int failures = 0;

#define CHECK(condition)                                                                            \
    do {                                                                                           \
        if (!(condition)) {                                                                        \
            fprintf(stderr, "device_memory.c:%d: %s is false (last error: %s)\n", __LINE__, #condition, \
                    tessera_last_error());                                                         \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static int load_driver(void) {
    void *library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == NULL) return 0;
    const char *names[] = {"cuInit",          "cuDeviceGet",     "cuDevicePrimaryCtxRetain",
                           "cuDevicePrimaryCtxRelease_v2",     "cuCtxSetCurrent", "cuMemAlloc_v2",
                           "cuMemFree_v2",    "cuMemcpyHtoD_v2", "cuMemcpyDtoH_v2",
                           "cuCtxSynchronize"};
    void **slots[] = {(void **)&cu.init,        (void **)&cu.device_get,  (void **)&cu.retain,
                      (void **)&cu.release,     (void **)&cu.set_current, (void **)&cu.alloc,
                      (void **)&cu.free,        (void **)&cu.to_device,   (void **)&cu.to_host,
                      (void **)&cu.synchronize};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *slots[i] = dlsym(library, names[i]);
        if (*slots[i] == NULL) return 0;
    }
    return 1;
}

enum { M = 7, K = 33, N = 17, GUARD = 64 };

int main(void) {
    if (tessera_device_cuda_count() == 0 || !load_driver()) {
        printf("no GPU: caller device memory not exercised\n");
        return 0;
    }
    TesseraDevice *gpu = NULL, *cpu = NULL;
    CHECK(tessera_device_new_cuda(0, &gpu) == TESSERA_STATUS_OK);
    CHECK(tessera_device_new_cpu(&cpu) == TESSERA_STATUS_OK);
    /* The primary context, which tessera uses too (as the CUDA runtime does). */
    CUdevice ordinal = 0;
    CUcontext context = NULL;
    CHECK(cu.init(0) == 0 && cu.device_get(&ordinal, 0) == 0 && cu.retain(&context, ordinal) == 0);
    CHECK(cu.set_current(context) == 0);

    float x[M * K], w[N * K], bias[N], out[GUARD + M * N], x_back[M * K];
    for (int i = 0; i < M * K; i++) x[i] = (float)sin(0.37 * i + 0.2);
    for (int i = 0; i < N * K; i++) w[i] = (float)cos(0.61 * i) * 0.5f;
    for (int i = 0; i < N; i++) bias[i] = 0.125f * (float)i - 1.0f;
    for (int i = 0; i < GUARD + M * N; i++) out[i] = NAN;
    CUdeviceptr x_memory = 0, out_memory = 0;
    CHECK(cu.alloc(&x_memory, sizeof x) == 0 && cu.alloc(&out_memory, sizeof out) == 0);
    CHECK(cu.to_device(x_memory, x, sizeof x) == 0 && cu.to_device(out_memory, out, sizeof out) == 0);
    /* tessera's stream does not wait for the caller's work: finish it first. */
    CHECK(cu.synchronize() == 0);

    const size_t x_shape[2] = {M, K}, w_shape[2] = {N, K}, b_shape[1] = {N}, out_shape[2] = {M, N};
    const int64_t out_strides[2] = {N, 1};
    void *x_address = (void *)(uintptr_t)x_memory, *out_address = (void *)(uintptr_t)(out_memory + GUARD * 4);
    TesseraTensor *tx = NULL, *tw = NULL, *tb = NULL, *tout = NULL, *refused = NULL;
    CHECK(tessera_tensor_wrap_device(gpu, x_address, sizeof x, TESSERA_DTYPE_F32, x_shape, 2, NULL, &tx) ==
          TESSERA_STATUS_OK);
    CHECK(tessera_tensor_wrap_device(gpu, out_address, M * N * 4, TESSERA_DTYPE_F32, out_shape, 2, out_strides,
                                     &tout) == TESSERA_STATUS_OK);
    CHECK(tessera_tensor_new_from_host(gpu, TESSERA_DTYPE_F32, w_shape, 2, w, sizeof w, &tw) == TESSERA_STATUS_OK);
    CHECK(tessera_tensor_new_from_host(gpu, TESSERA_DTYPE_F32, b_shape, 1, bias, sizeof bias, &tb) ==
          TESSERA_STATUS_OK);

    /* Refused: past the allocation, inside it but running past its end, misaligned, host
     * memory, an address CUDA never gave out, and device memory on the CPU device. */
    const size_t long_shape[1] = {M * K + 1}, one[1] = {1};
    CHECK(tessera_tensor_wrap_device(gpu, x_address, (M * K + 1) * 4, TESSERA_DTYPE_F32, long_shape, 1, NULL,
                                     &refused) == TESSERA_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(tessera_last_error(), "allocation") != NULL);
    CHECK(tessera_tensor_wrap_device(gpu, (char *)x_address + 256, sizeof x, TESSERA_DTYPE_F32, x_shape, 2, NULL,
                                     &refused) == TESSERA_STATUS_INVALID_ARGUMENT);
    CHECK(tessera_tensor_wrap_device(gpu, (char *)x_address + 4, 4, TESSERA_DTYPE_F32, one, 1, NULL, &refused) ==
          TESSERA_STATUS_INVALID_ARGUMENT);
    _Alignas(256) static float host_memory[64];
    CHECK(tessera_tensor_wrap_device(gpu, host_memory, 4, TESSERA_DTYPE_F32, one, 1, NULL, &refused) ==
          TESSERA_STATUS_INVALID_ARGUMENT);
    CHECK(tessera_tensor_wrap_device(gpu, (void *)(uintptr_t)0x100000, 4, TESSERA_DTYPE_F32, one, 1, NULL,
                                     &refused) == TESSERA_STATUS_INVALID_ARGUMENT);
    CHECK(tessera_tensor_wrap_device(cpu, x_address, sizeof x, TESSERA_DTYPE_F32, x_shape, 2, NULL, &refused) ==
          TESSERA_STATUS_INVALID_ARGUMENT);
    CHECK(refused == NULL);

    /* out = x·wᵀ + bias, written into the caller's buffer by tessera's stream. */
    TesseraMatmulOptions linear = tessera_matmul_options_default();
    linear.trans_b = 1;
    CHECK(tessera_matmul(tx, tw, tb, tout, &linear) == TESSERA_STATUS_OK);
    CHECK(tessera_matmul(tx, tw, tb, tx, &linear) == TESSERA_STATUS_INVALID_ARGUMENT);
    TesseraStream *stream = NULL;
    void *native = NULL;
    CHECK(tessera_stream_new(gpu, &stream) == TESSERA_STATUS_OK);
    CHECK(tessera_stream_native(stream, &native) == TESSERA_STATUS_OK && native != NULL);
    CHECK(tessera_stream_synchronize(stream) == TESSERA_STATUS_OK);
    float through_tessera[M * N];
    CHECK(tessera_tensor_copy_to_host(tout, through_tessera, sizeof through_tessera) == TESSERA_STATUS_OK);

    TesseraTensor *all[] = {tx, tw, tb, tout};
    for (size_t i = 0; i < 4; i++) CHECK(tessera_tensor_free(all[i]) == TESSERA_STATUS_OK);
    CHECK(tessera_stream_synchronize(stream) == TESSERA_STATUS_OK);
    CHECK(tessera_stream_free(stream) == TESSERA_STATUS_OK);

    CHECK(cu.to_host(out, out_memory, sizeof out) == 0 && cu.to_host(x_back, x_memory, sizeof x_back) == 0);
    int guard_kept = 1, right = 1;
    for (int i = 0; i < GUARD; i++) guard_kept &= isnan(out[i]);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double want = bias[n];
            for (int k = 0; k < K; k++) want += (double)x[m * K + k] * w[n * K + k];
            float got = out[GUARD + m * N + n];
            right &= fabs(got - want) <= 1e-5 * (1 + fabs(want)) && got == through_tessera[m * N + n];
        }
    }
    CHECK(guard_kept);
    CHECK(right);
    CHECK(memcmp(x, x_back, sizeof x) == 0);
    /* The memory is still the caller's to free, once. */
    CHECK(cu.free(x_memory) == 0 && cu.free(out_memory) == 0);
    CHECK(cu.release(ordinal) == 0);
    CHECK(tessera_device_free(gpu) == TESSERA_STATUS_OK && tessera_device_free(cpu) == TESSERA_STATUS_OK);
    CHECK(tessera_live_handle_count() == 0);
    printf("device_memory.c: %s\n", failures == 0 ? "ok" : "FAILED");
    return failures == 0 ? 0 : 1;
}
