/*
 * Feeds bad input to every entry point of the C API and checks that each call returns the right
 * error code with a message, never crashes, and leaves its outputs untouched. Run under valgrind
 * by scripts/test-capi: no invalid access and no leak, and every handle freed at the end.
 * scripts/test-capi also checks that every function the header declares is called here.
 */
/* mkdtemp, nftw and unlink for the checkpoint directory the model and trainer tests write. */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tessera.h"

static int passed = 0;
static int failed = 0;

static void check(int ok, int line, const char *what, const char *why) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "bad_input.c:%d: %s: %s\n", line, what, why);
    }
}

/* The call must fail with `want` and leave a non-empty message. */
static void expect_status(TesseraStatus got, TesseraStatus want, int line, const char *what) {
    const char *message = tessera_last_error();
    char why[512];
    snprintf(why, sizeof why, "returned %s, expected %s (message: \"%s\")", tessera_status_name(got),
             tessera_status_name(want), message ? message : "(NULL)");
    if (getenv("BAD_INPUT_VERBOSE") != NULL && message != NULL && message[0] != '\0') {
        printf("%s\n    -> %s: %s\n", what, tessera_status_name(got), message);
    }
    check(got == want && message != NULL && (want == TESSERA_STATUS_OK) == (message[0] == '\0'), line,
          what, why);
}

#define EXPECT(status, call) expect_status((call), (status), __LINE__, #call)
#define EXPECT_OK(call) EXPECT(TESSERA_STATUS_OK, call)
#define INVALID TESSERA_STATUS_INVALID_ARGUMENT
#define HANDLE TESSERA_STATUS_INVALID_HANDLE
#define CHECK(condition) check((condition), __LINE__, #condition, "is false")

/* A handle value tessera never returned. */
#define FORGED(type) ((type *)(uintptr_t)0x7ff0)

static float sum_floats(const float *values, size_t count) {
    float sum = 0;
    for (size_t i = 0; i < count; i++) sum += values[i];
    return sum;
}

static void version_and_status(void) {
    CHECK(tessera_version() != NULL && strlen(tessera_version()) >= 5);
    CHECK(tessera_abi_version() == TESSERA_ABI_VERSION);
    CHECK(strcmp(tessera_status_name(TESSERA_STATUS_OK), "TESSERA_STATUS_OK") == 0);
    CHECK(strcmp(tessera_status_name(TESSERA_STATUS_BUSY), "TESSERA_STATUS_BUSY") == 0);
    CHECK(strcmp(tessera_status_name(-1), "TESSERA_STATUS_UNKNOWN") == 0);
    CHECK(strcmp(tessera_status_name(1000), "TESSERA_STATUS_UNKNOWN") == 0);
    CHECK(tessera_last_error() != NULL);
}

static void devices(void) {
    TesseraDevice *device = FORGED(TesseraDevice);
    bool is_cuda = true;

    EXPECT(INVALID, tessera_device_new_cpu(NULL));
    EXPECT(INVALID, tessera_device_new_cuda(0, NULL));
    EXPECT(TESSERA_STATUS_NO_CUDA, tessera_device_new_cuda((size_t)1 << 40, &device));
    CHECK(device == NULL);
    if (tessera_device_cuda_count() == 0) {
        device = FORGED(TesseraDevice);
        EXPECT(TESSERA_STATUS_NO_CUDA, tessera_device_new_cuda(0, &device));
        CHECK(device == NULL);
    }

    EXPECT_OK(tessera_device_new_cpu(&device));
    EXPECT(INVALID, tessera_device_is_cuda(device, NULL));
    EXPECT(INVALID, tessera_device_is_cuda(NULL, &is_cuda));
    EXPECT(HANDLE, tessera_device_is_cuda(FORGED(TesseraDevice), &is_cuda));
    EXPECT_OK(tessera_device_is_cuda(device, &is_cuda));
    CHECK(!is_cuda);
    EXPECT(INVALID, tessera_device_synchronize(NULL));
    EXPECT_OK(tessera_device_synchronize(device));

    /* Freed, then used and freed again: detected. */
    EXPECT_OK(tessera_device_free(device));
    EXPECT(HANDLE, tessera_device_is_cuda(device, &is_cuda));
    EXPECT(HANDLE, tessera_device_synchronize(device));
    EXPECT(HANDLE, tessera_device_free(device));
    EXPECT(HANDLE, tessera_device_free(FORGED(TesseraDevice)));
    EXPECT_OK(tessera_device_free(NULL));
    EXPECT_OK(tessera_device_free(NULL));
}

static void tensors(TesseraDevice *cpu) {
    const size_t shape[2] = {2, 3};
    const size_t too_big[2] = {SIZE_MAX / 2, 4};
    const size_t nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    float data[6] = {1, 2, 3, 4, 5, 6};
    float back[6] = {0};
    _Alignas(8) unsigned char bytes[32] = {0};
    TesseraTensor *t = FORGED(TesseraTensor);
    TesseraTensor *w = NULL;
    TesseraDevice *device = NULL;
    int32_t dtype = -1;
    size_t rank = 99, numel = 0, size = 0, dims[TESSERA_MAX_RANK] = {0};

    /* new_zeros */
    EXPECT(INVALID, tessera_tensor_new_zeros(NULL, TESSERA_DTYPE_F32, shape, 2, &t));
    CHECK(t == NULL);
    EXPECT(HANDLE, tessera_tensor_new_zeros(FORGED(TesseraDevice), TESSERA_DTYPE_F32, shape, 2, &t));
    EXPECT(INVALID, tessera_tensor_new_zeros(cpu, 99, shape, 2, &t));
    EXPECT(INVALID, tessera_tensor_new_zeros(cpu, -1, shape, 2, &t));
    EXPECT(INVALID, tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, NULL, 2, &t));
    EXPECT(INVALID, tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, nine, 9, &t));
    EXPECT(INVALID, tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, too_big, 2, &t));
    EXPECT(INVALID, tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, shape, 2, NULL));
    CHECK(t == NULL);

    /* new_from_host */
    EXPECT(INVALID, tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, shape, 2, data, 20, &t));
    EXPECT(INVALID, tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, shape, 2, NULL, 24, &t));
    EXPECT(INVALID, tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, shape, 2, bytes + 1, 24, &t));
    EXPECT(INVALID, tessera_tensor_new_from_host(cpu, 6, shape, 2, data, 24, &t));
    EXPECT(INVALID, tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, shape, 2, data, 24, NULL));
    CHECK(t == NULL);

    /* wrap_host */
    const int64_t good_strides[2] = {3, 1};
    const int64_t column_major[2] = {1, 2};
    EXPECT(INVALID, tessera_tensor_wrap_host(NULL, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &w));
    EXPECT(INVALID, tessera_tensor_wrap_host(bytes + 2, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &w));
    EXPECT(INVALID, tessera_tensor_wrap_host(data, 23, TESSERA_DTYPE_F32, shape, 2, NULL, &w));
    EXPECT(INVALID, tessera_tensor_wrap_host(data, 24, 42, shape, 2, NULL, &w));
    EXPECT(INVALID, tessera_tensor_wrap_host(data, 24, TESSERA_DTYPE_F32, NULL, 2, NULL, &w));
    EXPECT(INVALID, tessera_tensor_wrap_host(data, 24, TESSERA_DTYPE_F32, nine, 9, NULL, &w));
    EXPECT(INVALID, tessera_tensor_wrap_host(data, 24, TESSERA_DTYPE_F32, shape, 2, NULL, NULL));
    EXPECT(TESSERA_STATUS_UNSUPPORTED,
           tessera_tensor_wrap_host(data, 24, TESSERA_DTYPE_F32, shape, 2, column_major, &w));
    CHECK(w == NULL);
    EXPECT_OK(tessera_tensor_wrap_host(data, 24, TESSERA_DTYPE_F32, shape, 2, good_strides, &w));

    /* wrap_device: every check that needs no GPU runs before the device is looked at, so each
     * is reached with the CPU device; an address that passes them all is refused for the CPU. */
    void *device_address = (void *)(uintptr_t)0x7f0000000000;
    void *misaligned = (void *)(uintptr_t)(0x7f0000000000 + 128);
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    CHECK(strstr(tessera_last_error(), "argument `device`") != NULL);
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, NULL, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    CHECK(strstr(tessera_last_error(), "argument `data`") != NULL);
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, misaligned, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    CHECK(strstr(tessera_last_error(), "aligned to 256 bytes") != NULL);
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, data, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 20, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    CHECK(strstr(tessera_last_error(), "argument `bytes`") != NULL);
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 24, 6, shape, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 24, -1, shape, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 24, TESSERA_DTYPE_F32, NULL, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 24, TESSERA_DTYPE_F32, nine, 9, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, SIZE_MAX, TESSERA_DTYPE_F32, too_big, 2, NULL, &t));
    EXPECT(TESSERA_STATUS_UNSUPPORTED,
           tessera_tensor_wrap_device(cpu, device_address, 24, TESSERA_DTYPE_F32, shape, 2, column_major, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 24, TESSERA_DTYPE_F32, shape, 2, good_strides, &t));
    CHECK(strstr(tessera_last_error(), "argument `device`") != NULL);
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, NULL, 0, TESSERA_DTYPE_F32, (const size_t[2]){0, 3}, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(NULL, device_address, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    EXPECT(HANDLE, tessera_tensor_wrap_device(FORGED(TesseraDevice), device_address, 24, TESSERA_DTYPE_F32, shape, 2,
                                              NULL, &t));
    EXPECT(HANDLE, tessera_tensor_wrap_device((TesseraDevice *)w, device_address, 24, TESSERA_DTYPE_F32, shape, 2,
                                              NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, device_address, 24, TESSERA_DTYPE_F32, shape, 2, NULL, NULL));
    CHECK(t == NULL);

    /* copies in and out */
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, shape, 2, &t));
    EXPECT(INVALID, tessera_tensor_copy_from_host(t, data, 25));
    EXPECT(INVALID, tessera_tensor_copy_from_host(t, NULL, 24));
    EXPECT(INVALID, tessera_tensor_copy_from_host(t, bytes + 1, 24));
    EXPECT(INVALID, tessera_tensor_copy_from_host(NULL, data, 24));
    EXPECT(INVALID, tessera_tensor_copy_to_host(t, back, 4));
    EXPECT(INVALID, tessera_tensor_copy_to_host(t, NULL, 24));
    EXPECT(INVALID, tessera_tensor_copy_to_host(NULL, back, 24));
    /* A wrapped buffer copied onto itself: the memory overlaps. */
    EXPECT(INVALID, tessera_tensor_copy_from_host(w, data, 24));
    EXPECT(INVALID, tessera_tensor_copy_to_host(w, data + 1, 20));
    EXPECT_OK(tessera_tensor_copy_to_host(t, back, 24));
    CHECK(sum_floats(back, 6) == 0.0f);
    EXPECT_OK(tessera_tensor_copy_to_host(w, back, 24));
    CHECK(sum_floats(back, 6) == 21.0f);

    /* to_device */
    TesseraTensor *copy = FORGED(TesseraTensor);
    EXPECT(INVALID, tessera_tensor_to_device(w, cpu, NULL));
    EXPECT(INVALID, tessera_tensor_to_device(w, NULL, &copy));
    CHECK(copy == NULL);
    EXPECT(HANDLE, tessera_tensor_to_device(w, (TesseraDevice *)w, &copy));
    EXPECT(HANDLE, tessera_tensor_to_device((TesseraTensor *)cpu, cpu, &copy));
    EXPECT_OK(tessera_tensor_to_device(w, cpu, &copy));
    EXPECT_OK(tessera_tensor_free(copy));

    /* metadata */
    EXPECT(INVALID, tessera_tensor_dtype(w, NULL));
    EXPECT(INVALID, tessera_tensor_dtype(NULL, &dtype));
    EXPECT_OK(tessera_tensor_dtype(w, &dtype));
    CHECK(dtype == TESSERA_DTYPE_F32);
    EXPECT(INVALID, tessera_tensor_rank(w, NULL));
    EXPECT_OK(tessera_tensor_rank(w, &rank));
    CHECK(rank == 2);
    EXPECT(INVALID, tessera_tensor_shape(w, dims, 1));
    EXPECT(INVALID, tessera_tensor_shape(w, NULL, 2));
    EXPECT_OK(tessera_tensor_shape(w, dims, TESSERA_MAX_RANK));
    CHECK(dims[0] == 2 && dims[1] == 3);
    EXPECT(INVALID, tessera_tensor_size(NULL, &numel, &size));
    EXPECT_OK(tessera_tensor_size(w, &numel, &size));
    CHECK(numel == 6 && size == 24);
    EXPECT(INVALID, tessera_tensor_device(w, NULL));
    EXPECT(HANDLE, tessera_tensor_device((TesseraTensor *)cpu, &device));
    CHECK(device == NULL);
    EXPECT_OK(tessera_tensor_device(w, &device));
    EXPECT_OK(tessera_device_free(device));

    /* Freed, then used and freed again; a device handle is not a tensor handle. */
    EXPECT_OK(tessera_tensor_free(t));
    EXPECT(HANDLE, tessera_tensor_copy_to_host(t, back, 24));
    EXPECT(HANDLE, tessera_tensor_copy_from_host(t, data, 24));
    EXPECT(HANDLE, tessera_tensor_dtype(t, &dtype));
    EXPECT(HANDLE, tessera_tensor_rank(t, &rank));
    EXPECT(HANDLE, tessera_tensor_shape(t, dims, 2));
    EXPECT(HANDLE, tessera_tensor_size(t, &numel, NULL));
    EXPECT(HANDLE, tessera_tensor_free(t));
    EXPECT(HANDLE, tessera_tensor_free((TesseraTensor *)cpu));
    EXPECT_OK(tessera_tensor_free(NULL));
    EXPECT_OK(tessera_tensor_free(w));
    /* The wrapped memory is the caller's and untouched by free. */
    CHECK(data[5] == 6.0f);
}

static TesseraTensor *make(TesseraDevice *device, int32_t dtype, size_t rank, size_t d0, size_t d1, size_t d2,
                           float fill) {
    size_t shape[3] = {d0, d1, d2};
    TesseraTensor *t = NULL;
    EXPECT_OK(tessera_tensor_new_zeros(device, dtype, shape, rank, &t));
    if (dtype == TESSERA_DTYPE_F32 && t != NULL) {
        size_t numel = 0;
        EXPECT_OK(tessera_tensor_size(t, &numel, NULL));
        float values[64];
        for (size_t i = 0; i < numel && i < 64; i++) values[i] = fill + 0.25f * (float)i;
        EXPECT_OK(tessera_tensor_copy_from_host(t, values, numel * sizeof(float)));
    }
    return t;
}

/* The sum of a small f32 tensor's values, to see that an error left it unchanged. */
static float sum_of(TesseraTensor *t) {
    float values[64] = {0};
    size_t numel = 0;
    tessera_tensor_size(t, &numel, NULL);
    if (numel > 64) return NAN;
    tessera_tensor_copy_to_host(t, values, numel * sizeof(float));
    return sum_floats(values, numel);
}

static void matmul(TesseraDevice *cpu) {
    TesseraTensor *a = make(cpu, TESSERA_DTYPE_F32, 2, 2, 3, 0, 1.0f);
    TesseraTensor *b = make(cpu, TESSERA_DTYPE_F32, 2, 3, 4, 0, 2.0f);
    TesseraTensor *out = make(cpu, TESSERA_DTYPE_F32, 2, 2, 4, 0, -1.0f);
    TesseraTensor *wrong_k = make(cpu, TESSERA_DTYPE_F32, 2, 5, 4, 0, 0.5f);
    TesseraTensor *bytes = make(cpu, TESSERA_DTYPE_U8, 2, 2, 3, 0, 0);
    TesseraTensor *bias = make(cpu, TESSERA_DTYPE_F32, 1, 3, 0, 0, 0.5f);
    const float before = sum_of(out);
    TesseraMatmulOptions options = tessera_matmul_options_default();
    CHECK(options.trans_a == 0 && options.trans_b == 0 && options.alpha == 1.0f && options.beta == 0.0f);

    EXPECT(INVALID, tessera_matmul(NULL, b, NULL, out, NULL));
    EXPECT(INVALID, tessera_matmul(a, NULL, NULL, out, NULL));
    EXPECT(INVALID, tessera_matmul(a, b, NULL, NULL, NULL));
    EXPECT(HANDLE, tessera_matmul(a, FORGED(TesseraTensor), NULL, out, NULL));
    EXPECT(HANDLE, tessera_matmul(a, b, (TesseraTensor *)cpu, out, NULL));
    EXPECT(INVALID, tessera_matmul(a, wrong_k, NULL, out, NULL));
    EXPECT(INVALID, tessera_matmul(bytes, b, NULL, out, NULL));
    EXPECT(INVALID, tessera_matmul(a, b, bias, out, NULL));
    EXPECT(INVALID, tessera_matmul(a, b, NULL, a, NULL));
    EXPECT(INVALID, tessera_matmul(a, b, NULL, b, NULL));
    options.trans_a = 2;
    EXPECT(INVALID, tessera_matmul(a, b, NULL, out, &options));
    options.trans_a = 0;
    options.trans_b = -1;
    EXPECT(INVALID, tessera_matmul(a, b, NULL, out, &options));
    CHECK(sum_of(out) == before);

    /* Two wraps of one buffer: out would overwrite its own input. */
    float shared[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    const size_t square[2] = {2, 2};
    TesseraTensor *left = NULL, *right = NULL, *product = NULL;
    EXPECT_OK(tessera_tensor_wrap_host(shared, 16, TESSERA_DTYPE_F32, square, 2, NULL, &left));
    EXPECT_OK(tessera_tensor_wrap_host(shared + 2, 16, TESSERA_DTYPE_F32, square, 2, NULL, &right));
    EXPECT_OK(tessera_tensor_wrap_host(shared + 8, 16, TESSERA_DTYPE_F32, square, 2, NULL, &product));
    EXPECT(INVALID, tessera_matmul(left, left, NULL, right, NULL));
    CHECK(shared[2] == 3.0f && shared[5] == 6.0f);
    EXPECT_OK(tessera_matmul(left, left, NULL, product, NULL));
    CHECK(shared[8] == 7.0f && shared[9] == 10.0f && shared[10] == 15.0f && shared[11] == 22.0f);

    EXPECT_OK(tessera_tensor_free(left));
    EXPECT_OK(tessera_tensor_free(right));
    EXPECT_OK(tessera_tensor_free(product));
    EXPECT_OK(tessera_tensor_free(a));
    EXPECT(HANDLE, tessera_matmul(a, b, NULL, out, NULL));
    EXPECT_OK(tessera_tensor_free(b));
    EXPECT_OK(tessera_tensor_free(out));
    EXPECT_OK(tessera_tensor_free(wrong_k));
    EXPECT_OK(tessera_tensor_free(bytes));
    EXPECT_OK(tessera_tensor_free(bias));
}

static void adamw(TesseraDevice *cpu) {
    TesseraTensor *param = make(cpu, TESSERA_DTYPE_F32, 1, 4, 0, 0, 1.0f);
    TesseraTensor *grad = make(cpu, TESSERA_DTYPE_F32, 1, 4, 0, 0, 0.5f);
    TesseraTensor *m = make(cpu, TESSERA_DTYPE_F32, 1, 4, 0, 0, 0.0f);
    TesseraTensor *v = make(cpu, TESSERA_DTYPE_F32, 1, 4, 0, 0, 0.0f);
    TesseraTensor *short_grad = make(cpu, TESSERA_DTYPE_F32, 1, 3, 0, 0, 0.5f);
    TesseraTensor *byte_grad = make(cpu, TESSERA_DTYPE_U8, 1, 4, 0, 0, 0);
    TesseraTensor *not_bf16 = make(cpu, TESSERA_DTYPE_F32, 1, 4, 0, 0, 0);
    const float before = sum_of(param);
    TesseraAdamWConfig config = tessera_adamw_config_default();
    CHECK(fabsf(config.lr - 1e-3f) < 1e-9f && config.beta1 == 0.9f);
    TesseraAdamWTensor entry = {param, grad, m, v, NULL, 1};

    EXPECT(INVALID, tessera_adamw_step(NULL, 1, NULL, 1, 1.0f));
    EXPECT_OK(tessera_adamw_step(NULL, 0, NULL, 1, 1.0f));
    EXPECT(INVALID, tessera_adamw_step(&entry, 1, NULL, 0, 1.0f));
    EXPECT(INVALID, tessera_adamw_step(&entry, 1, NULL, 1, NAN));
    config.eps = 0.0f;
    EXPECT(INVALID, tessera_adamw_step(&entry, 1, &config, 1, 1.0f));
    config = tessera_adamw_config_default();
    config.beta1 = 1.0f;
    EXPECT(INVALID, tessera_adamw_step(&entry, 1, &config, 1, 1.0f));
    config = tessera_adamw_config_default();
    config.lr = -1.0f;
    EXPECT(INVALID, tessera_adamw_step(&entry, 1, &config, 1, 1.0f));

    TesseraAdamWTensor bad = entry;
    bad.grad = short_grad;
    EXPECT(INVALID, tessera_adamw_step(&bad, 1, NULL, 1, 1.0f));
    bad = entry;
    bad.grad = byte_grad;
    EXPECT(INVALID, tessera_adamw_step(&bad, 1, NULL, 1, 1.0f));
    bad = entry;
    bad.param_bf16 = not_bf16;
    EXPECT(INVALID, tessera_adamw_step(&bad, 1, NULL, 1, 1.0f));
    bad = entry;
    bad.weight_decay = 2;
    EXPECT(INVALID, tessera_adamw_step(&bad, 1, NULL, 1, 1.0f));
    bad = entry;
    bad.exp_avg = param;
    EXPECT(INVALID, tessera_adamw_step(&bad, 1, NULL, 1, 1.0f));
    bad = entry;
    bad.param = NULL;
    EXPECT(INVALID, tessera_adamw_step(&bad, 1, NULL, 1, 1.0f));
    bad = entry;
    bad.exp_avg_sq = FORGED(TesseraTensor);
    EXPECT(HANDLE, tessera_adamw_step(&bad, 1, NULL, 1, 1.0f));
    /* The same tensor twice in the list: written twice. */
    TesseraAdamWTensor twice[2] = {entry, entry};
    EXPECT(INVALID, tessera_adamw_step(twice, 2, NULL, 1, 1.0f));
    CHECK(sum_of(param) == before);

    EXPECT_OK(tessera_adamw_step(&entry, 1, NULL, 1, 1.0f));
    CHECK(sum_of(param) < before);

    EXPECT_OK(tessera_tensor_free(grad));
    EXPECT(HANDLE, tessera_adamw_step(&entry, 1, NULL, 2, 1.0f));
    EXPECT_OK(tessera_tensor_free(param));
    EXPECT_OK(tessera_tensor_free(m));
    EXPECT_OK(tessera_tensor_free(v));
    EXPECT_OK(tessera_tensor_free(short_grad));
    EXPECT_OK(tessera_tensor_free(byte_grad));
    EXPECT_OK(tessera_tensor_free(not_bf16));
}

static void wavelet(TesseraDevice *cpu) {
    TesseraWaveletConfig *config = FORGED(TesseraWaveletConfig);
    const size_t windows[2] = {2, 3};
    const size_t zero_window[2] = {2, 0};
    size_t dim = 0, taps = 0;

    EXPECT(INVALID, tessera_wavelet_config_new_exponential(0, 0, 1, 2, 4, 8, 0, &config));
    CHECK(config == NULL);
    EXPECT(INVALID, tessera_wavelet_config_new_exponential(4, 2, 2, 2, 4, 8, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_exponential(4, 0, 5, 2, 4, 8, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_exponential(4, 0, 2, 8, 4, 8, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_exponential(4, 0, 2, 2, 16, 8, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_exponential(4, 0, 2, 2, 4, 8, 7, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_exponential(4, 0, 2, 2, 4, 8, 0, NULL));
    EXPECT(INVALID, tessera_wavelet_config_new_paper_default(0, 8, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_paper_default(8, 1, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_paper_default(8, 8, NULL));
    EXPECT(INVALID, tessera_wavelet_config_new_windows(4, 1, NULL, 2, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_windows(4, 1, windows, 0, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_windows(4, 3, windows, 2, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_windows(4, 1, zero_window, 2, 0, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_windows(4, 1, windows, 2, -3, &config));
    EXPECT(INVALID, tessera_wavelet_config_new_windows(4, 1, windows, 2, 0, NULL));
    CHECK(config == NULL);

    EXPECT_OK(tessera_wavelet_config_new_windows(4, 1, windows, 2, TESSERA_WAVELET_DIVISOR_AVAILABLE, &config));
    EXPECT(INVALID, tessera_wavelet_config_info(NULL, &dim, &taps));
    EXPECT_OK(tessera_wavelet_config_info(config, &dim, &taps));
    CHECK(dim == 4 && taps == 5);

    TesseraTensor *x = make(cpu, TESSERA_DTYPE_F32, 3, 1, 3, 4, 1.0f);
    TesseraTensor *out = make(cpu, TESSERA_DTYPE_F32, 3, 1, 3, 4, 0.0f);
    TesseraTensor *narrow = make(cpu, TESSERA_DTYPE_F32, 3, 1, 3, 5, 0.0f);
    TesseraTensor *flat = make(cpu, TESSERA_DTYPE_F32, 2, 3, 4, 0, 0.0f);
    TesseraTensor *halves = make(cpu, TESSERA_DTYPE_F16, 3, 1, 3, 4, 0.0f);
    TesseraTensor *tap = make(cpu, TESSERA_DTYPE_F32, 1, 5, 0, 0, 0.2f);
    TesseraTensor *d_tap = make(cpu, TESSERA_DTYPE_F32, 1, 5, 0, 0, 0.0f);
    TesseraTensor *short_tap = make(cpu, TESSERA_DTYPE_F32, 1, 4, 0, 0, 0.2f);
    const float before = sum_of(out);

    EXPECT(INVALID, tessera_wavelet_forward(NULL, NULL, config, out));
    EXPECT(INVALID, tessera_wavelet_forward(x, NULL, NULL, out));
    EXPECT(HANDLE, tessera_wavelet_forward(x, NULL, (TesseraWaveletConfig *)x, out));
    EXPECT(INVALID, tessera_wavelet_forward(x, NULL, config, x));
    EXPECT(INVALID, tessera_wavelet_forward(narrow, NULL, config, out));
    EXPECT(INVALID, tessera_wavelet_forward(flat, NULL, config, out));
    EXPECT(INVALID, tessera_wavelet_forward(x, NULL, config, halves));
    EXPECT(INVALID, tessera_wavelet_forward(x, narrow, config, out));
    EXPECT(INVALID, tessera_wavelet_backward(x, config, x));
    EXPECT(INVALID, tessera_wavelet_backward(x, config, NULL));
    EXPECT(INVALID, tessera_wavelet_backward(x, config, narrow));
    EXPECT(INVALID, tessera_wavelet_taps_init(config, short_tap));
    EXPECT(INVALID, tessera_wavelet_taps_init(config, NULL));
    EXPECT(INVALID, tessera_wavelet_learnable_forward(x, short_tap, config, out));
    EXPECT(INVALID, tessera_wavelet_learnable_forward(x, tap, config, tap));
    EXPECT(INVALID, tessera_wavelet_learnable_forward(x, tap, config, narrow));
    EXPECT(INVALID, tessera_wavelet_learnable_backward(x, x, tap, config, out, out));
    EXPECT(INVALID, tessera_wavelet_learnable_backward(x, x, tap, config, out, short_tap));
    EXPECT(INVALID, tessera_wavelet_learnable_backward(x, narrow, tap, config, out, d_tap));
    EXPECT(INVALID, tessera_wavelet_learnable_backward(x, x, tap, config, x, d_tap));
    CHECK(sum_of(out) == before);

    EXPECT_OK(tessera_wavelet_forward(x, NULL, config, out));
    EXPECT_OK(tessera_wavelet_backward(x, config, out));
    EXPECT_OK(tessera_wavelet_taps_init(config, tap));
    EXPECT_OK(tessera_wavelet_learnable_forward(x, tap, config, out));
    EXPECT_OK(tessera_wavelet_learnable_backward(x, x, tap, config, out, d_tap));

    EXPECT_OK(tessera_wavelet_config_free(config));
    EXPECT(HANDLE, tessera_wavelet_forward(x, NULL, config, out));
    EXPECT(HANDLE, tessera_wavelet_config_info(config, &dim, NULL));
    EXPECT(HANDLE, tessera_wavelet_config_free(config));
    EXPECT(HANDLE, tessera_wavelet_config_free((TesseraWaveletConfig *)x));
    EXPECT_OK(tessera_wavelet_config_free(NULL));

    TesseraTensor *all[] = {x, out, narrow, flat, halves, tap, d_tap, short_tap};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_OK(tessera_tensor_free(all[i]));
}
/* Attention shapes for the checks below: one sequence of 5 queries and keys, 4 query heads over
 * 2 key/value heads (grouped), head dimension 8. */
enum { AS = 5, AHQ = 4, AHK = 2, AD = 8 };

/* The f64 reference: out, lse and the gradients of attention under `visible(p, j)`. */
static int attention_sees(const TesseraAttentionOptions *o, long p, long j) {
    switch (o->mask) {
    case TESSERA_ATTENTION_MASK_CAUSAL: return j <= p;
    case TESSERA_ATTENTION_MASK_WINDOW: return j >= p - (long)o->window_left && j <= p + (long)o->window_right;
    case TESSERA_ATTENTION_MASK_LAMBDA:
        return j <= p && (p - j < (long)o->lambda_window || j < (long)o->lambda_global);
    default: return 1;
    }
}

static void attention_reference(const TesseraAttentionOptions *o, const float *q, const float *k, const float *v,
                                const float *d_out, double *out, double *lse, double *d_q, double *d_k,
                                double *d_v) {
    double scale = o->scale != 0.0f ? o->scale : 1.0 / sqrt((double)AD);
    memset(d_q, 0, sizeof(double) * AS * AHQ * AD);
    memset(d_k, 0, sizeof(double) * AS * AHK * AD);
    memset(d_v, 0, sizeof(double) * AS * AHK * AD);
    for (size_t h = 0; h < AHQ; h++) {
        size_t g = h / (AHQ / AHK);
        for (size_t i = 0; i < AS; i++) {
            const float *qi = q + (i * AHQ + h) * AD;
            double s[AS], p[AS], m = -INFINITY, sum = 0, dp[AS], dsum = 0;
            for (size_t j = 0; j < AS; j++) {
                const float *kj = k + (j * AHK + g) * AD;
                double dot = 0;
                for (size_t d = 0; d < AD; d++) dot += (double)qi[d] * kj[d];
                s[j] = attention_sees(o, (long)i, (long)j) ? scale * dot : -INFINITY;
                if (s[j] > m) m = s[j];
            }
            for (size_t j = 0; j < AS; j++) sum += s[j] == -INFINITY ? 0 : exp(s[j] - m);
            lse[i * AHQ + h] = sum > 0 ? m + log(sum) : -INFINITY;
            const float *doi = d_out + (i * AHQ + h) * AD;
            for (size_t d = 0; d < AD; d++) out[(i * AHQ + h) * AD + d] = 0;
            for (size_t j = 0; j < AS; j++) {
                p[j] = s[j] == -INFINITY ? 0 : exp(s[j] - m) / sum;
                const float *vj = v + (j * AHK + g) * AD;
                dp[j] = 0;
                for (size_t d = 0; d < AD; d++) {
                    out[(i * AHQ + h) * AD + d] += p[j] * vj[d];
                    dp[j] += (double)doi[d] * vj[d];
                    d_v[(j * AHK + g) * AD + d] += p[j] * doi[d];
                }
                dsum += p[j] * dp[j];
            }
            for (size_t j = 0; j < AS; j++) {
                double ds = p[j] * (dp[j] - dsum) * scale;
                const float *kj = k + (j * AHK + g) * AD;
                for (size_t d = 0; d < AD; d++) {
                    d_q[(i * AHQ + h) * AD + d] += ds * kj[d];
                    d_k[(j * AHK + g) * AD + d] += ds * qi[d];
                }
            }
        }
    }
}

static int attention_close(const float *got, const double *want, size_t count) {
    for (size_t i = 0; i < count; i++) {
        if (isinf(want[i]) ? got[i] != (float)want[i] : !(fabs(got[i] - want[i]) <= 1e-5 * (1 + fabs(want[i]))))
            return 0;
    }
    return 1;
}

static void attention(TesseraDevice *cpu) {
    const size_t q_shape[4] = {1, AS, AHQ, AD}, kv_shape[4] = {1, AS, AHK, AD}, lse_shape[3] = {1, AS, AHQ};
    float q[AS * AHQ * AD], k[AS * AHK * AD], v[AS * AHK * AD], d_out[AS * AHQ * AD];
    for (size_t i = 0; i < AS * AHQ * AD; i++) {
        q[i] = (float)sin(0.37 * (double)i + 0.1);
        d_out[i] = (float)cos(0.23 * (double)i);
    }
    for (size_t i = 0; i < AS * AHK * AD; i++) {
        k[i] = (float)cos(0.41 * (double)i + 0.3);
        v[i] = (float)sin(0.19 * (double)i - 0.7);
    }
    TesseraTensor *tq = NULL, *tk = NULL, *tv = NULL, *tdo = NULL, *out = NULL, *lse = NULL;
    TesseraTensor *dq = NULL, *dk = NULL, *dv = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, q_shape, 4, q, sizeof q, &tq));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, kv_shape, 4, k, sizeof k, &tk));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, kv_shape, 4, v, sizeof v, &tv));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, q_shape, 4, d_out, sizeof d_out, &tdo));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, q_shape, 4, &out));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, lse_shape, 3, &lse));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, q_shape, 4, &dq));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, kv_shape, 4, &dk));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, kv_shape, 4, &dv));

    /* Every mask, grouped heads, against the f64 reference. */
    TesseraAttentionOptions cases[4];
    for (size_t c = 0; c < 4; c++) cases[c] = tessera_attention_options_default();
    cases[1].mask = TESSERA_ATTENTION_MASK_CAUSAL;
    cases[1].scale = 0.3f;
    cases[2].mask = TESSERA_ATTENTION_MASK_WINDOW;
    cases[2].window_left = 1;
    cases[2].window_right = 1;
    cases[3].mask = TESSERA_ATTENTION_MASK_LAMBDA;
    cases[3].lambda_global = 1;
    cases[3].lambda_window = 2;
    for (size_t c = 0; c < 4; c++) {
        double want_out[AS * AHQ * AD], want_lse[AS * AHQ], want_dq[AS * AHQ * AD], want_dk[AS * AHK * AD],
            want_dv[AS * AHK * AD];
        float got_out[AS * AHQ * AD], got_lse[AS * AHQ], got_dq[AS * AHQ * AD], got_dk[AS * AHK * AD],
            got_dv[AS * AHK * AD];
        attention_reference(&cases[c], q, k, v, d_out, want_out, want_lse, want_dq, want_dk, want_dv);
        EXPECT_OK(tessera_attention_forward(tq, tk, tv, &cases[c], out, lse));
        EXPECT_OK(tessera_attention_backward(tdo, tq, tk, tv, out, lse, &cases[c], dq, dk, dv));
        EXPECT_OK(tessera_tensor_copy_to_host(out, got_out, sizeof got_out));
        EXPECT_OK(tessera_tensor_copy_to_host(lse, got_lse, sizeof got_lse));
        EXPECT_OK(tessera_tensor_copy_to_host(dq, got_dq, sizeof got_dq));
        EXPECT_OK(tessera_tensor_copy_to_host(dk, got_dk, sizeof got_dk));
        EXPECT_OK(tessera_tensor_copy_to_host(dv, got_dv, sizeof got_dv));
        CHECK(attention_close(got_out, want_out, AS * AHQ * AD));
        CHECK(attention_close(got_lse, want_lse, AS * AHQ));
        CHECK(attention_close(got_dq, want_dq, AS * AHQ * AD));
        CHECK(attention_close(got_dk, want_dk, AS * AHK * AD));
        CHECK(attention_close(got_dv, want_dv, AS * AHK * AD));
    }
    /* lse may be skipped in the forward. */
    EXPECT_OK(tessera_attention_forward(tq, tk, tv, NULL, out, NULL));

    /* Varlen: the one sequence given as offsets, with RoPE inside; the batch dimension goes. */
    const size_t packed_q[3] = {AS, AHQ, AD}, packed_kv[3] = {AS, AHK, AD}, packed_lse[2] = {AS, AHQ};
    const size_t cu[2] = {0, AS};
    const double bases[1] = {10000.0};
    TesseraAttentionOptions varlen = tessera_attention_options_default();
    varlen.mask = TESSERA_ATTENTION_MASK_CAUSAL;
    varlen.varlen_count = 1;
    varlen.cu_seqlens_q = cu;
    varlen.cu_seqlens_k = cu;
    varlen.rope_base_count = 1;
    varlen.rope_bases = bases;
    TesseraTensor *pq = NULL, *pk = NULL, *pv = NULL, *pout = NULL, *plse = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, packed_q, 3, q, sizeof q, &pq));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, packed_kv, 3, k, sizeof k, &pk));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, packed_kv, 3, v, sizeof v, &pv));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, packed_q, 3, &pout));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, packed_lse, 2, &plse));
    EXPECT_OK(tessera_attention_forward(pq, pk, pv, &varlen, pout, plse));
    /* The first query sees only the first key, at distance 0 where RoPE changes nothing. */
    float first[AS * AHQ * AD];
    EXPECT_OK(tessera_tensor_copy_to_host(pout, first, sizeof first));
    CHECK(fabsf(first[0] - v[0]) < 1e-6f && fabsf(first[2 * AD + 3] - v[AD + 3]) < 1e-6f);

    /* Bad input: the outputs keep their values. */
    float before = sum_of(lse);
    TesseraAttentionOptions bad = tessera_attention_options_default();
    bad.mask = 4;
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, &bad, out, lse));
    bad.mask = -1;
    EXPECT(INVALID, tessera_attention_backward(tdo, tq, tk, tv, out, lse, &bad, dq, dk, dv));
    bad = tessera_attention_options_default();
    bad.scale = -1.0f;
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, &bad, out, lse));
    bad.scale = NAN;
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, &bad, out, lse));
    bad = tessera_attention_options_default();
    bad.mask = TESSERA_ATTENTION_MASK_LAMBDA;
    bad.lambda_window = 0;
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, &bad, out, lse));
    bad = varlen;
    bad.cu_seqlens_q = NULL;
    EXPECT(INVALID, tessera_attention_forward(pq, pk, pv, &bad, pout, plse));
    bad = varlen;
    const size_t short_cu[2] = {0, AS - 1};
    bad.cu_seqlens_k = short_cu;
    EXPECT(INVALID, tessera_attention_forward(pq, pk, pv, &bad, pout, plse));
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, &varlen, out, lse));
    bad = varlen;
    bad.rope_bases = NULL;
    EXPECT(INVALID, tessera_attention_forward(pq, pk, pv, &bad, pout, plse));
    bad = varlen;
    bad.rope_convention = 2;
    EXPECT(INVALID, tessera_attention_forward(pq, pk, pv, &bad, pout, plse));
    bad = varlen;
    const double three_bases[3] = {1e4, 2e4, 3e4};
    bad.rope_bases = three_bases;
    bad.rope_base_count = 3;
    EXPECT(INVALID, tessera_attention_forward(pq, pk, pv, &bad, pout, plse));
    /* Shapes, dtypes, grouped heads, aliasing, handles. */
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, NULL, dk, lse));
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, NULL, out, out));
    EXPECT(INVALID, tessera_attention_forward(tk, tq, tv, NULL, dk, NULL));
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, NULL, tq, lse));
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, NULL, lse, NULL));
    EXPECT(INVALID, tessera_attention_forward(NULL, tk, tv, NULL, out, lse));
    EXPECT(INVALID, tessera_attention_forward(tq, tk, tv, NULL, NULL, lse));
    EXPECT(HANDLE, tessera_attention_forward(tq, FORGED(TesseraTensor), tv, NULL, out, lse));
    EXPECT(HANDLE, tessera_attention_forward(tq, tk, tv, NULL, out, (TesseraTensor *)cpu));
    /* A bf16 query with f32 keys; 3 query heads over 2 key/value heads. */
    TesseraTensor *bf = NULL, *bf_out = NULL, *odd = NULL, *odd_out = NULL, *odd_lse = NULL;
    const size_t odd_shape[4] = {1, AS, 3, AD}, odd_lse_shape[3] = {1, AS, 3};
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_BF16, q_shape, 4, &bf));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_BF16, q_shape, 4, &bf_out));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, odd_shape, 4, &odd));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, odd_shape, 4, &odd_out));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, odd_lse_shape, 3, &odd_lse));
    EXPECT(INVALID, tessera_attention_forward(bf, tk, tv, NULL, bf_out, lse));
    EXPECT(INVALID, tessera_attention_forward(odd, tk, tv, NULL, odd_out, odd_lse));
    EXPECT(INVALID, tessera_attention_backward(tdo, tq, tk, tv, out, lse, NULL, dq, dq, dv));
    EXPECT(INVALID, tessera_attention_backward(tdo, tq, tk, tv, out, lse, NULL, dq, dk, tv));
    EXPECT(INVALID, tessera_attention_backward(tdo, tq, tk, tv, out, NULL, NULL, dq, dk, dv));
    EXPECT(INVALID, tessera_attention_backward(tdo, tq, tk, tv, out, tdo, NULL, dq, dk, dv));
    EXPECT(INVALID, tessera_attention_backward(tdo, tq, tk, tv, out, lse, NULL, dk, dq, dv));
    EXPECT(INVALID, tessera_attention_backward(NULL, tq, tk, tv, out, lse, NULL, dq, dk, dv));
    EXPECT(HANDLE, tessera_attention_backward(tdo, tq, tk, tv, out, lse, NULL, dq, dk, FORGED(TesseraTensor)));
    CHECK(sum_of(lse) == before);

    /* RoPE on its own: rotate-half pairs (i, i + 2) of 2 heads of 4 at positions 0, 5 and 17,
     * and the backward undoing the forward. */
    {
        float rx[3 * 2 * 4], rout[3 * 2 * 4], rback[3 * 2 * 4];
        uint32_t pos[3] = {0, 5, 17};
        for (size_t i = 0; i < 24; i++) rx[i] = (float)sin(0.77 * (double)i + 0.2);
        const size_t r_shape[3] = {3, 2, 4}, p_shape[1] = {3};
        TesseraTensor *trx = NULL, *tpos = NULL, *trout = NULL, *trback = NULL;
        EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, r_shape, 3, rx, sizeof rx, &trx));
        EXPECT_OK(tessera_tensor_wrap_host(pos, sizeof pos, TESSERA_DTYPE_U32, p_shape, 1, NULL, &tpos));
        EXPECT_OK(tessera_tensor_wrap_host(rout, sizeof rout, TESSERA_DTYPE_F32, r_shape, 3, NULL, &trout));
        EXPECT_OK(tessera_tensor_wrap_host(rback, sizeof rback, TESSERA_DTYPE_F32, r_shape, 3, NULL, &trback));
        EXPECT_OK(tessera_rope(trx, tpos, bases, 1, TESSERA_ROPE_CONVENTION_ROTATE_HALF, 0, trout));
        int rope_right = 1;
        for (size_t t = 0; t < 3; t++) {
            for (size_t h = 0; h < 2; h++) {
                for (size_t i = 0; i < 2; i++) {
                    double angle = pos[t] * pow(10000.0, -2.0 * (double)i / 4), c = cos(angle), sn = sin(angle);
                    size_t at = (t * 2 + h) * 4;
                    double a = rx[at + i], b = rx[at + i + 2];
                    rope_right &= fabs(rout[at + i] - (a * c - b * sn)) <= 1e-5;
                    rope_right &= fabs(rout[at + i + 2] - (b * c + a * sn)) <= 1e-5;
                }
            }
        }
        CHECK(rope_right);
        EXPECT_OK(tessera_rope(trout, tpos, bases, 1, TESSERA_ROPE_CONVENTION_ROTATE_HALF, 1, trback));
        int undone = 1;
        for (size_t i = 0; i < 24; i++) undone &= fabsf(rback[i] - rx[i]) <= 1e-5f;
        CHECK(undone);
        float kept_rope = rout[1];
        EXPECT(INVALID, tessera_rope(trx, tpos, bases, 1, 2, 0, trout));
        EXPECT(INVALID, tessera_rope(trx, tpos, bases, 1, 0, 2, trout));
        EXPECT(INVALID, tessera_rope(trx, tpos, NULL, 1, 0, 0, trout));
        EXPECT(INVALID, tessera_rope(trx, tpos, bases, 0, 0, 0, trout));
        EXPECT(INVALID, tessera_rope(trx, tpos, three_bases, 3, 0, 0, trout));
        EXPECT(INVALID, tessera_rope(trx, trx, bases, 1, 0, 0, trout));
        EXPECT(INVALID, tessera_rope(trx, tpos, bases, 1, 0, 0, trx));
        EXPECT(INVALID, tessera_rope(trx, tpos, bases, 1, 0, 0, tq));
        EXPECT(HANDLE, tessera_rope(trx, FORGED(TesseraTensor), bases, 1, 0, 0, trout));
        CHECK(rout[1] == kept_rope);
        TesseraTensor *rope_tensors[] = {trx, tpos, trout, trback};
        for (size_t i = 0; i < 4; i++) EXPECT_OK(tessera_tensor_free(rope_tensors[i]));
    }

    TesseraTensor *all[] = {tq, tk, tv, tdo, out, lse, dq, dk, dv, pq, pk, pv, pout, plse, bf, bf_out, odd, odd_out, odd_lse};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_OK(tessera_tensor_free(all[i]));
    EXPECT(HANDLE, tessera_attention_forward(tq, tk, tv, NULL, out, lse));
}

/* The sparse linear layer on a 64x64 weight (the smallest the double-pruned backward takes) and
 * 3 tokens, against plain loops. */
enum { SR = 64, SC = 64, SN = 3 };

static void sparse(TesseraDevice *cpu) {
    static float w[SR * SC], pruned[SR * SC], dense[SR * SC], dp_t[SC * SR];
    float x[SN * SC], dy[SN * SR], bias[SR], y[SN * SR], d_x[SN * SC], d_bias[SR];
    static float d_values[SR * SC / 2];
    for (size_t i = 0; i < SR * SC; i++) w[i] = (float)sin(1.7 * (double)i + 0.3);
    for (size_t i = 0; i < SN * SC; i++) x[i] = (float)cos(0.9 * (double)i);
    for (size_t i = 0; i < SN * SR; i++) dy[i] = (float)sin(0.61 * (double)i + 1.0);
    for (size_t i = 0; i < SR; i++) bias[i] = 0.01f * (float)i;
    const size_t w_shape[2] = {SR, SC}, x_shape[2] = {SN, SC}, y_shape[2] = {SN, SR}, b_shape[1] = {SR};
    const size_t dv_shape[2] = {SR, SC / 2};
    TesseraTensor *tw = NULL, *tpruned = NULL, *tdense = NULL, *tdp = NULL, *tx = NULL, *tdy = NULL, *tb = NULL;
    TesseraTensor *ty = NULL, *tdx = NULL, *tdv = NULL, *tdb = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, w_shape, 2, w, sizeof w, &tw));
    EXPECT_OK(tessera_tensor_wrap_host(pruned, sizeof pruned, TESSERA_DTYPE_F32, w_shape, 2, NULL, &tpruned));
    EXPECT_OK(tessera_tensor_wrap_host(dense, sizeof dense, TESSERA_DTYPE_F32, w_shape, 2, NULL, &tdense));
    EXPECT_OK(tessera_tensor_wrap_host(dp_t, sizeof dp_t, TESSERA_DTYPE_F32, w_shape, 2, NULL, &tdp));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, x_shape, 2, x, sizeof x, &tx));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, y_shape, 2, dy, sizeof dy, &tdy));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, b_shape, 1, bias, sizeof bias, &tb));
    EXPECT_OK(tessera_tensor_wrap_host(y, sizeof y, TESSERA_DTYPE_F32, y_shape, 2, NULL, &ty));
    EXPECT_OK(tessera_tensor_wrap_host(d_x, sizeof d_x, TESSERA_DTYPE_F32, x_shape, 2, NULL, &tdx));
    EXPECT_OK(tessera_tensor_wrap_host(d_values, sizeof d_values, TESSERA_DTYPE_F32, dv_shape, 2, NULL, &tdv));
    EXPECT_OK(tessera_tensor_wrap_host(d_bias, sizeof d_bias, TESSERA_DTYPE_F32, b_shape, 1, NULL, &tdb));

    /* Pruning keeps the two of largest magnitude in every group of four. */
    EXPECT_OK(tessera_nm_prune(tw, 2, 4, tpruned));
    int kept_right = 1;
    for (size_t g = 0; g < SR * SC / 4; g++) {
        for (size_t e = 0; e < 4; e++) {
            size_t larger = 0;
            for (size_t o = 0; o < 4; o++) larger += fabsf(w[4 * g + o]) > fabsf(w[4 * g + e]);
            float want = larger < 2 ? w[4 * g + e] : 0.0f;
            kept_right &= pruned[4 * g + e] == want;
        }
    }
    CHECK(kept_right);

    TesseraSparse24 *s = FORGED(TesseraSparse24), *s_dp = NULL, *again = NULL;
    EXPECT_OK(tessera_sparse24_prune_compress(tw, 2, 4, &s));
    EXPECT_OK(tessera_sparse24_decompress(s, tdense));
    CHECK(memcmp(dense, pruned, sizeof dense) == 0);
    EXPECT_OK(tessera_sparse24_compress(tpruned, &again));
    size_t rows = 0, cols = 0;
    int32_t dtype = -1;
    EXPECT_OK(tessera_sparse24_info(again, &rows, &cols, &dtype));
    CHECK(rows == SR && cols == SC && dtype == TESSERA_DTYPE_F32);
    EXPECT_OK(tessera_sparse24_info(again, NULL, NULL, NULL));

    /* Forward: y = x·denseᵀ + bias. */
    EXPECT_OK(tessera_sparse_linear_forward(tx, s, tb, ty));
    int forward_right = 1;
    for (size_t n = 0; n < SN; n++) {
        for (size_t r = 0; r < SR; r++) {
            double want = bias[r];
            for (size_t c = 0; c < SC; c++) want += (double)x[n * SC + c] * dense[r * SC + c];
            forward_right &= fabs(y[n * SR + r] - want) <= 1e-5 * (1 + fabs(want));
        }
    }
    CHECK(forward_right);
    float with_bias[SN * SR];
    memcpy(with_bias, y, sizeof y);
    EXPECT_OK(tessera_sparse_linear_forward(tx, s, NULL, ty));
    int no_bias_right = 1;
    for (size_t i = 0; i < SN * SR; i++) no_bias_right &= fabsf(y[i] - (with_bias[i] - bias[i % SR])) <= 1e-5f;
    CHECK(no_bias_right);

    /* Backward: d_x through the double-pruned transpose, d_bias the column sums, and d_values
     * summing dyᵀ·x over the kept positions. */
    EXPECT_OK(tessera_sparse24_double_prune(s, &s_dp));
    EXPECT_OK(tessera_sparse24_decompress(s_dp, tdp));
    EXPECT_OK(tessera_sparse_linear_backward(tdy, tx, s, s_dp, tdx, tdv, tdb));
    int backward_right = 1;
    for (size_t n = 0; n < SN; n++) {
        for (size_t c = 0; c < SC; c++) {
            double want = 0;
            for (size_t r = 0; r < SR; r++) want += (double)dy[n * SR + r] * dp_t[c * SR + r];
            backward_right &= fabs(d_x[n * SC + c] - want) <= 1e-5 * (1 + fabs(want));
        }
    }
    double kept_sum = 0, got_sum = 0;
    for (size_t r = 0; r < SR; r++) {
        double want = 0;
        for (size_t n = 0; n < SN; n++) want += dy[n * SR + r];
        backward_right &= fabs(d_bias[r] - want) <= 1e-5 * (1 + fabs(want));
        for (size_t c = 0; c < SC; c++) {
            if (dense[r * SC + c] == 0.0f) continue;
            for (size_t n = 0; n < SN; n++) kept_sum += (double)dy[n * SR + r] * x[n * SC + c];
        }
    }
    for (size_t i = 0; i < SR * SC / 2; i++) got_sum += d_values[i];
    CHECK(backward_right);
    CHECK(fabs(got_sum - kept_sum) <= 1e-4 * (1 + fabs(kept_sum)));
    EXPECT_OK(tessera_sparse_linear_backward(tdy, tx, s, s_dp, tdx, tdv, NULL));

    /* Bad input. */
    TesseraSparse24 *bad = FORGED(TesseraSparse24);
    EXPECT(INVALID, tessera_nm_prune(tw, 3, 2, tpruned));
    EXPECT(INVALID, tessera_nm_prune(tw, 0, 4, tpruned));
    EXPECT(INVALID, tessera_nm_prune(tw, 2, 128, tpruned));
    EXPECT(INVALID, tessera_nm_prune(tw, 2, 4, tw));
    EXPECT(INVALID, tessera_nm_prune(tw, 2, 4, ty));
    EXPECT(INVALID, tessera_nm_prune(tw, 2, 4, NULL));
    EXPECT(HANDLE, tessera_nm_prune(FORGED(TesseraTensor), 2, 4, tpruned));
    EXPECT(INVALID, tessera_sparse24_prune_compress(tw, 2, 8, &bad));
    CHECK(bad == NULL);
    EXPECT(INVALID, tessera_sparse24_prune_compress(tw, 2, 4, NULL));
    EXPECT(INVALID, tessera_sparse24_prune_compress(tx, 2, 4, &bad));
    EXPECT(HANDLE, tessera_sparse24_prune_compress((TesseraTensor *)s, 2, 4, &bad));
    EXPECT(INVALID, tessera_sparse24_compress(tw, &bad));
    EXPECT(INVALID, tessera_sparse24_compress(NULL, &bad));
    EXPECT(INVALID, tessera_sparse24_compress(tpruned, NULL));
    CHECK(bad == NULL);
    /* The first 16 rows of w: too few rows for the double-pruned transpose. */
    const size_t short_shape[2] = {16, SC};
    TesseraTensor *short_w = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, short_shape, 2, w, 16 * SC * sizeof(float), &short_w));
    TesseraSparse24 *short_s = NULL;
    EXPECT_OK(tessera_sparse24_prune_compress(short_w, 2, 4, &short_s));
    EXPECT(INVALID, tessera_sparse24_double_prune(short_s, &bad));
    EXPECT(INVALID, tessera_sparse24_double_prune(s, NULL));
    EXPECT(HANDLE, tessera_sparse24_double_prune(FORGED(TesseraSparse24), &bad));
    CHECK(bad == NULL);
    EXPECT(INVALID, tessera_sparse24_decompress(short_s, tdense));
    EXPECT(INVALID, tessera_sparse24_decompress(s, NULL));
    EXPECT(HANDLE, tessera_sparse24_decompress((TesseraSparse24 *)tw, tdense));
    EXPECT(HANDLE, tessera_sparse24_info(FORGED(TesseraSparse24), &rows, &cols, &dtype));
    float y_before = y[0];
    EXPECT(INVALID, tessera_sparse_linear_forward(tw, s, tb, ty));
    EXPECT(INVALID, tessera_sparse_linear_forward(tx, s, tx, ty));
    EXPECT(INVALID, tessera_sparse_linear_forward(tx, s, tb, tx));
    EXPECT(INVALID, tessera_sparse_linear_forward(tx, s, tb, tdv));
    EXPECT(INVALID, tessera_sparse_linear_forward(tx, short_s, NULL, ty));
    EXPECT(INVALID, tessera_sparse_linear_forward(tx, NULL, tb, ty));
    EXPECT(HANDLE, tessera_sparse_linear_forward(tx, FORGED(TesseraSparse24), tb, ty));
    CHECK(y[0] == y_before);
    float dx_before = d_x[0];
    EXPECT(INVALID, tessera_sparse_linear_backward(tdy, tx, s, short_s, tdx, tdv, tdb));
    EXPECT(INVALID, tessera_sparse_linear_backward(tdy, tx, s, s_dp, tdx, tdx, tdb));
    EXPECT(INVALID, tessera_sparse_linear_backward(tdy, tx, s, s_dp, tdx, tdv, tdv));
    EXPECT(INVALID, tessera_sparse_linear_backward(tdy, tx, s, s_dp, tx, tdv, tdb));
    EXPECT(INVALID, tessera_sparse_linear_backward(tdy, tx, s, s_dp, tdx, tdense, tdb));
    EXPECT(INVALID, tessera_sparse_linear_backward(tb, tx, s, s_dp, tdx, tdv, tdb));
    EXPECT(INVALID, tessera_sparse_linear_backward(tdy, tx, s, NULL, tdx, tdv, tdb));
    EXPECT(HANDLE, tessera_sparse_linear_backward(tdy, tx, s, s_dp, tdx, FORGED(TesseraTensor), tdb));
    CHECK(d_x[0] == dx_before);

    EXPECT(HANDLE, tessera_tensor_free((TesseraTensor *)s));
    EXPECT(HANDLE, tessera_sparse24_free((TesseraSparse24 *)tw));
    TesseraSparse24 *handles[] = {s, s_dp, again, short_s};
    for (size_t i = 0; i < 4; i++) EXPECT_OK(tessera_sparse24_free(handles[i]));
    EXPECT(HANDLE, tessera_sparse24_free(s));
    EXPECT(HANDLE, tessera_sparse_linear_forward(tx, s, tb, ty));
    EXPECT_OK(tessera_sparse24_free(NULL));
    TesseraTensor *all[] = {tw, tpruned, tdense, tdp, tx, tdy, tb, ty, tdx, tdv, tdb, short_w};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_OK(tessera_tensor_free(all[i]));
}

/* GELU, SwiGLU, cross-entropy and the gradient norm against plain loops, then bad input. */
static double gelu_ref(double x) { return 0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }

static void transformer_ops(TesseraDevice *cpu) {
    enum { R = 3, W = 4, V = 5 };
    float x[R * 2 * W], d_out[R * 2 * W], out[R * 2 * W], d_x[R * 2 * W];
    for (size_t i = 0; i < R * 2 * W; i++) {
        x[i] = (float)sin(0.9 * (double)i) * 2.0f;
        d_out[i] = (float)cos(0.5 * (double)i);
    }
    const size_t full[2] = {R, 2 * W}, half[2] = {R, W};
    TesseraTensor *tx = NULL, *tdo = NULL, *tdo_half = NULL, *tout = NULL, *tout_half = NULL, *tdx = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, full, 2, x, sizeof x, &tx));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, full, 2, d_out, sizeof d_out, &tdo));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, half, 2, d_out, sizeof d_out / 2, &tdo_half));
    EXPECT_OK(tessera_tensor_wrap_host(out, sizeof out, TESSERA_DTYPE_F32, full, 2, NULL, &tout));
    EXPECT_OK(tessera_tensor_wrap_host(out, sizeof out / 2, TESSERA_DTYPE_F32, half, 2, NULL, &tout_half));
    EXPECT_OK(tessera_tensor_wrap_host(d_x, sizeof d_x, TESSERA_DTYPE_F32, full, 2, NULL, &tdx));

    EXPECT_OK(tessera_activation_forward(TESSERA_ACTIVATION_GELU, tx, tout));
    EXPECT_OK(tessera_activation_backward(TESSERA_ACTIVATION_GELU, tx, tdo, tdx));
    int gelu_right = 1;
    for (size_t i = 0; i < R * 2 * W; i++) {
        double h = 1e-4, slope = (gelu_ref(x[i] + h) - gelu_ref(x[i] - h)) / (2 * h);
        gelu_right &= fabs(out[i] - gelu_ref(x[i])) <= 1e-5 * (1 + fabs(gelu_ref(x[i])));
        gelu_right &= fabs(d_x[i] - d_out[i] * slope) <= 1e-4 * (1 + fabs(d_out[i] * slope));
    }
    CHECK(gelu_right);
    EXPECT_OK(tessera_activation_forward(TESSERA_ACTIVATION_SWIGLU, tx, tout_half));
    EXPECT_OK(tessera_activation_backward(TESSERA_ACTIVATION_SWIGLU, tx, tdo_half, tdx));
    int swiglu_right = 1;
    for (size_t r = 0; r < R; r++) {
        for (size_t j = 0; j < W; j++) {
            double g = x[r * 2 * W + j], u = x[r * 2 * W + W + j], sg = 1 / (1 + exp(-g)), d = d_out[r * W + j];
            swiglu_right &= fabs(out[r * W + j] - g * sg * u) <= 1e-5 * (1 + fabs(g * sg * u));
            double d_gate = d * u * sg * (1 + g * (1 - sg)), d_up = d * g * sg;
            swiglu_right &= fabs(d_x[r * 2 * W + j] - d_gate) <= 1e-5 * (1 + fabs(d_gate));
            swiglu_right &= fabs(d_x[r * 2 * W + W + j] - d_up) <= 1e-5 * (1 + fabs(d_up));
        }
    }
    CHECK(swiglu_right);
    float kept = out[0];
    EXPECT(INVALID, tessera_activation_forward(2, tx, tout));
    EXPECT(INVALID, tessera_activation_forward(-1, tx, tout));
    EXPECT(INVALID, tessera_activation_forward(TESSERA_ACTIVATION_GELU, tx, tout_half));
    EXPECT(INVALID, tessera_activation_forward(TESSERA_ACTIVATION_SWIGLU, tx, tout));
    EXPECT(INVALID, tessera_activation_forward(TESSERA_ACTIVATION_GELU, tx, tx));
    EXPECT(INVALID, tessera_activation_forward(TESSERA_ACTIVATION_GELU, tout, tout_half));
    EXPECT(INVALID, tessera_activation_forward(TESSERA_ACTIVATION_GELU, NULL, tout));
    EXPECT(HANDLE, tessera_activation_forward(TESSERA_ACTIVATION_GELU, tx, FORGED(TesseraTensor)));
    CHECK(out[0] == kept);
    kept = d_x[0];
    EXPECT(INVALID, tessera_activation_backward(7, tx, tdo, tdx));
    EXPECT(INVALID, tessera_activation_backward(TESSERA_ACTIVATION_GELU, tx, tdo_half, tdx));
    EXPECT(INVALID, tessera_activation_backward(TESSERA_ACTIVATION_SWIGLU, tx, tdo, tdx));
    EXPECT(INVALID, tessera_activation_backward(TESSERA_ACTIVATION_GELU, tx, tdo, tdo));
    EXPECT(INVALID, tessera_activation_backward(TESSERA_ACTIVATION_GELU, tx, tdo, NULL));
    EXPECT(HANDLE, tessera_activation_backward(TESSERA_ACTIVATION_GELU, (TesseraTensor *)cpu, tdo, tdx));
    CHECK(d_x[0] == kept);

    /* Cross-entropy over 3 rows of 5 logits, the last row's target ignored. */
    float logits[R * V], losses[R], mean[1], d_logits[R * V];
    uint32_t targets[R] = {4, 0, 2};
    for (size_t i = 0; i < R * V; i++) logits[i] = (float)sin(1.3 * (double)i);
    const size_t l_shape[2] = {R, V}, t_shape[1] = {R}, one[1] = {1};
    TesseraTensor *tl = NULL, *tt = NULL, *tlosses = NULL, *tmean = NULL, *tdl = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, l_shape, 2, logits, sizeof logits, &tl));
    EXPECT_OK(tessera_tensor_wrap_host(targets, sizeof targets, TESSERA_DTYPE_U32, t_shape, 1, NULL, &tt));
    EXPECT_OK(tessera_tensor_wrap_host(losses, sizeof losses, TESSERA_DTYPE_F32, t_shape, 1, NULL, &tlosses));
    EXPECT_OK(tessera_tensor_wrap_host(mean, sizeof mean, TESSERA_DTYPE_F32, one, 1, NULL, &tmean));
    EXPECT_OK(tessera_tensor_wrap_host(d_logits, sizeof d_logits, TESSERA_DTYPE_F32, l_shape, 2, NULL, &tdl));
    TesseraCrossEntropyOptions ce = tessera_cross_entropy_options_default();
    CHECK(ce.use_ignore_index == 0 && ce.grad_scale == 1.0f);
    ce.use_ignore_index = 1;
    ce.ignore_index = 2;
    ce.grad_scale = 0.5f;
    EXPECT_OK(tessera_cross_entropy(tl, tt, &ce, tlosses, tmean, tdl));
    int ce_right = 1;
    double total = 0;
    for (size_t r = 0; r < R; r++) {
        double m = -INFINITY, sum = 0;
        for (size_t v = 0; v < V; v++) m = fmax(m, logits[r * V + v]);
        for (size_t v = 0; v < V; v++) sum += exp(logits[r * V + v] - m);
        double loss = r == 2 ? 0 : m + log(sum) - logits[r * V + targets[r]];
        total += loss;
        ce_right &= fabs(losses[r] - loss) <= 1e-5 * (1 + loss);
        for (size_t v = 0; v < V; v++) {
            double grad = r == 2 ? 0 : 0.5 * (exp(logits[r * V + v] - m) / sum - (v == targets[r])) / 2;
            ce_right &= fabs(d_logits[r * V + v] - grad) <= 1e-6;
        }
    }
    ce_right &= fabs(mean[0] - total / 2) <= 1e-5 * (1 + total);
    CHECK(ce_right);
    EXPECT_OK(tessera_cross_entropy(tl, tt, NULL, tlosses, tmean, NULL));
    CHECK(losses[2] > 0);
    kept = mean[0];
    ce.use_ignore_index = 2;
    EXPECT(INVALID, tessera_cross_entropy(tl, tt, &ce, tlosses, tmean, tdl));
    ce.use_ignore_index = 0;
    ce.grad_scale = NAN;
    EXPECT(INVALID, tessera_cross_entropy(tl, tt, &ce, tlosses, tmean, tdl));
    targets[1] = V;
    EXPECT(INVALID, tessera_cross_entropy(tl, tt, NULL, tlosses, tmean, tdl));
    targets[1] = 0;
    EXPECT(INVALID, tessera_cross_entropy(tl, tl, NULL, tlosses, tmean, tdl));
    EXPECT(INVALID, tessera_cross_entropy(tl, tt, NULL, tmean, tlosses, tdl));
    EXPECT(INVALID, tessera_cross_entropy(tl, tt, NULL, tlosses, tlosses, tdl));
    EXPECT(INVALID, tessera_cross_entropy(tl, tt, NULL, tlosses, tmean, tl));
    EXPECT(INVALID, tessera_cross_entropy(tl, tt, NULL, tlosses, NULL, tdl));
    EXPECT(HANDLE, tessera_cross_entropy(tl, FORGED(TesseraTensor), NULL, tlosses, tmean, tdl));
    CHECK(mean[0] == kept);

    /* The global norm of two tensors, then clipping to half of it. */
    TesseraTensor *norm = NULL, *wrong_norm = NULL;
    float norm_value[1] = {0};
    EXPECT_OK(tessera_tensor_wrap_host(norm_value, sizeof norm_value, TESSERA_DTYPE_F32, one, 1, NULL, &norm));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, half, 2, &wrong_norm));
    const TesseraTensor *pair[2] = {tx, tdo};
    EXPECT_OK(tessera_grad_norm(pair, 2, norm));
    double squares = 0;
    for (size_t i = 0; i < R * 2 * W; i++) squares += (double)x[i] * x[i] + (double)d_out[i] * d_out[i];
    CHECK(fabs(norm_value[0] - sqrt(squares)) <= 1e-5 * sqrt(squares));
    EXPECT_OK(tessera_grad_norm(NULL, 0, norm));
    CHECK(norm_value[0] == 0.0f);
    TesseraTensor *clipped[2] = {tx, tdo};
    float max_norm = (float)(sqrt(squares) / 2);
    EXPECT_OK(tessera_clip_grad_norm(clipped, 2, max_norm, norm));
    float back[R * 2 * W];
    EXPECT_OK(tessera_tensor_copy_to_host(tx, back, sizeof back));
    double scale = max_norm / (sqrt(squares) + 1e-6);
    CHECK(fabs(back[3] - x[3] * scale) <= 1e-5 * (1 + fabs(x[3])));
    const TesseraTensor *twice[2] = {tx, tx};
    TesseraTensor *clip_twice[2] = {tx, tx};
    const TesseraTensor *with_bad[2] = {tx, FORGED(TesseraTensor)};
    const TesseraTensor *with_norm[2] = {tx, norm};
    const TesseraTensor *with_targets[2] = {tx, tt};
    kept = norm_value[0];
    EXPECT(INVALID, tessera_grad_norm(NULL, 2, norm));
    EXPECT(INVALID, tessera_grad_norm(twice, 2, norm));
    EXPECT(HANDLE, tessera_grad_norm(with_bad, 2, norm));
    EXPECT(INVALID, tessera_grad_norm(with_norm, 2, norm));
    EXPECT(INVALID, tessera_grad_norm(with_targets, 2, norm));
    EXPECT(INVALID, tessera_grad_norm(pair, 2, wrong_norm));
    EXPECT(INVALID, tessera_grad_norm(pair, 2, NULL));
    EXPECT(INVALID, tessera_clip_grad_norm(clip_twice, 2, 1.0f, norm));
    EXPECT(INVALID, tessera_clip_grad_norm(clipped, 2, -1.0f, norm));
    EXPECT(INVALID, tessera_clip_grad_norm(clipped, 2, INFINITY, norm));
    EXPECT(INVALID, tessera_clip_grad_norm(NULL, 1, 1.0f, norm));
    EXPECT(INVALID, tessera_clip_grad_norm(clipped, 2, 1.0f, wrong_norm));
    CHECK(norm_value[0] == kept);

    TesseraTensor *all[] = {tx, tdo, tdo_half, tout, tout_half, tdx, tl, tt, tlosses, tmean, tdl, norm, wrong_norm};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_OK(tessera_tensor_free(all[i]));
}

/* Embedding and LayerNorm/RMSNorm against plain loops, then bad input. */
static void embedding_and_norm(TesseraDevice *cpu) {
    enum { B = 2, T = 3, VOC = 7, CTX = 4, WD = 5 };
    uint32_t ids[B * T] = {1, 6, 1, 0, 3, 3};
    float wte[VOC * WD], wpe[CTX * WD], emb[B * T * WD], grad[B * T * WD], d_wte[VOC * WD], d_wpe[CTX * WD];
    for (size_t i = 0; i < VOC * WD; i++) wte[i] = (float)sin(0.7 * (double)i);
    for (size_t i = 0; i < CTX * WD; i++) wpe[i] = (float)cos(0.3 * (double)i);
    for (size_t i = 0; i < B * T * WD; i++) grad[i] = (float)sin(0.45 * (double)i + 2);
    const size_t id_shape[2] = {B, T}, wte_shape[2] = {VOC, WD}, wpe_shape[2] = {CTX, WD}, e_shape[3] = {B, T, WD};
    TesseraTensor *tids = NULL, *twte = NULL, *twpe = NULL, *temb = NULL, *tgrad = NULL, *tdwte = NULL, *tdwpe = NULL;
    EXPECT_OK(tessera_tensor_wrap_host(ids, sizeof ids, TESSERA_DTYPE_U32, id_shape, 2, NULL, &tids));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, wte_shape, 2, wte, sizeof wte, &twte));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, wpe_shape, 2, wpe, sizeof wpe, &twpe));
    EXPECT_OK(tessera_tensor_wrap_host(emb, sizeof emb, TESSERA_DTYPE_F32, e_shape, 3, NULL, &temb));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, e_shape, 3, grad, sizeof grad, &tgrad));
    EXPECT_OK(tessera_tensor_wrap_host(d_wte, sizeof d_wte, TESSERA_DTYPE_F32, wte_shape, 2, NULL, &tdwte));
    EXPECT_OK(tessera_tensor_wrap_host(d_wpe, sizeof d_wpe, TESSERA_DTYPE_F32, wpe_shape, 2, NULL, &tdwpe));
    EXPECT_OK(tessera_embedding_forward(tids, twte, twpe, temb));
    int emb_right = 1;
    for (size_t p = 0; p < B * T; p++)
        for (size_t c = 0; c < WD; c++)
            emb_right &= fabsf(emb[p * WD + c] - (wte[ids[p] * WD + c] + wpe[(p % T) * WD + c])) <= 1e-6f;
    CHECK(emb_right);
    /* Accumulating: onto ones for the token table, onto zeros for the positions. */
    for (size_t i = 0; i < VOC * WD; i++) d_wte[i] = 1.0f;
    for (size_t i = 0; i < CTX * WD; i++) d_wpe[i] = 0.0f;
    EXPECT_OK(tessera_embedding_backward(tids, tgrad, tdwte, tdwpe, 1));
    int grad_right = 1;
    for (size_t v = 0; v < VOC; v++) {
        for (size_t c = 0; c < WD; c++) {
            double want = 1.0;
            for (size_t p = 0; p < B * T; p++)
                if (ids[p] == v) want += grad[p * WD + c];
            grad_right &= fabs(d_wte[v * WD + c] - want) <= 1e-5;
        }
    }
    for (size_t t = 0; t < CTX; t++) {
        for (size_t c = 0; c < WD; c++) {
            double want = 0;
            for (size_t b = 0; t < T && b < B; b++) want += grad[(b * T + t) * WD + c];
            grad_right &= t < T ? fabs(d_wpe[t * WD + c] - want) <= 1e-5 : 1;
        }
    }
    CHECK(grad_right);
    EXPECT_OK(tessera_embedding_forward(tids, twte, NULL, temb));
    CHECK(emb[WD] == wte[6 * WD]);
    float kept = emb[0];
    ids[4] = VOC;
    EXPECT(INVALID, tessera_embedding_forward(tids, twte, twpe, temb));
    EXPECT(INVALID, tessera_embedding_backward(tids, tgrad, tdwte, NULL, 0));
    ids[4] = 3;
    EXPECT(INVALID, tessera_embedding_forward(twte, twte, twpe, temb));
    EXPECT(INVALID, tessera_embedding_forward(tids, twte, twpe, twpe));
    EXPECT(INVALID, tessera_embedding_forward(tids, twte, twpe, NULL));
    EXPECT(HANDLE, tessera_embedding_forward(tids, FORGED(TesseraTensor), twpe, temb));
    CHECK(emb[0] == kept);
    kept = d_wte[0];
    EXPECT(INVALID, tessera_embedding_backward(tids, tgrad, tdwte, tdwpe, 2));
    EXPECT(INVALID, tessera_embedding_backward(twte, tgrad, tdwte, tdwpe, 0));
    EXPECT(INVALID, tessera_embedding_backward(tids, tgrad, tdwte, tdwte, 0));
    EXPECT(INVALID, tessera_embedding_backward(tids, tgrad, tgrad, tdwpe, 0));
    EXPECT(INVALID, tessera_embedding_backward(tids, twte, tdwte, tdwpe, 0));
    EXPECT(INVALID, tessera_embedding_backward(NULL, tgrad, tdwte, tdwpe, 0));
    EXPECT(HANDLE, tessera_embedding_backward(tids, tgrad, (TesseraTensor *)cpu, tdwpe, 0));
    CHECK(d_wte[0] == kept);

    /* LayerNorm of x + residual over rows of 5, then its backward through the weight. */
    float x[B * T * WD], res[B * T * WD], sum[B * T * WD], y[B * T * WD], w[WD], bias[WD], mean[B * T], rstd[B * T];
    float d_in[B * T * WD], d_w[WD], d_b[WD];
    for (size_t i = 0; i < B * T * WD; i++) {
        x[i] = (float)sin(1.1 * (double)i);
        res[i] = (float)cos(0.8 * (double)i);
    }
    for (size_t i = 0; i < WD; i++) {
        w[i] = 1.0f + 0.1f * (float)i;
        bias[i] = 0.05f * (float)i;
    }
    const size_t row_shape[1] = {B * T}, w_shape[1] = {WD};
    TesseraTensor *tx = NULL, *tres = NULL, *tsum = NULL, *ty = NULL, *tw = NULL, *tb = NULL, *tmean = NULL;
    TesseraTensor *trstd = NULL, *tdin = NULL, *tdw = NULL, *tdb = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, e_shape, 3, x, sizeof x, &tx));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, e_shape, 3, res, sizeof res, &tres));
    EXPECT_OK(tessera_tensor_wrap_host(sum, sizeof sum, TESSERA_DTYPE_F32, e_shape, 3, NULL, &tsum));
    EXPECT_OK(tessera_tensor_wrap_host(y, sizeof y, TESSERA_DTYPE_F32, e_shape, 3, NULL, &ty));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, w_shape, 1, w, sizeof w, &tw));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, w_shape, 1, bias, sizeof bias, &tb));
    EXPECT_OK(tessera_tensor_wrap_host(mean, sizeof mean, TESSERA_DTYPE_F32, row_shape, 1, NULL, &tmean));
    EXPECT_OK(tessera_tensor_wrap_host(rstd, sizeof rstd, TESSERA_DTYPE_F32, row_shape, 1, NULL, &trstd));
    EXPECT_OK(tessera_tensor_wrap_host(d_in, sizeof d_in, TESSERA_DTYPE_F32, e_shape, 3, NULL, &tdin));
    EXPECT_OK(tessera_tensor_wrap_host(d_w, sizeof d_w, TESSERA_DTYPE_F32, w_shape, 1, NULL, &tdw));
    EXPECT_OK(tessera_tensor_wrap_host(d_b, sizeof d_b, TESSERA_DTYPE_F32, w_shape, 1, NULL, &tdb));
    EXPECT_OK(tessera_norm_forward(TESSERA_NORM_KIND_LAYER_NORM, 1e-5f, tx, tres, tsum, tw, tb, ty, tmean, trstd));
    int norm_right = 1;
    double want_dw[WD] = {0}, want_db[WD] = {0};
    for (size_t r = 0; r < B * T; r++) {
        double mu = 0, var = 0;
        for (size_t c = 0; c < WD; c++) mu += (double)x[r * WD + c] + res[r * WD + c];
        mu /= WD;
        for (size_t c = 0; c < WD; c++) var += pow((double)x[r * WD + c] + res[r * WD + c] - mu, 2);
        double inv = 1 / sqrt(var / WD + 1e-5);
        norm_right &= fabs(mean[r] - mu) <= 1e-5 && fabs(rstd[r] - inv) <= 1e-4 * inv;
        for (size_t c = 0; c < WD; c++) {
            double s_val = (double)x[r * WD + c] + res[r * WD + c], xhat = (s_val - mu) * inv;
            norm_right &= fabs(sum[r * WD + c] - s_val) <= 1e-6;
            norm_right &= fabs(y[r * WD + c] - (xhat * w[c] + bias[c])) <= 1e-5 * (1 + fabs(xhat * w[c]));
            want_dw[c] += grad[r * WD + c] * xhat;
            want_db[c] += grad[r * WD + c];
        }
    }
    CHECK(norm_right);
    EXPECT_OK(tessera_norm_backward(TESSERA_NORM_KIND_LAYER_NORM, 1e-5f, tgrad, NULL, tsum, tw, tmean, trstd, tdin,
                                    tdw, tdb, 0));
    int dnorm_right = 1;
    for (size_t c = 0; c < WD; c++)
        dnorm_right &= fabs(d_w[c] - want_dw[c]) <= 1e-5 * (1 + fabs(want_dw[c])) &&
                       fabs(d_b[c] - want_db[c]) <= 1e-5 * (1 + fabs(want_db[c]));
    /* d_input of each row: rstd·(g - mean(g) - xhat·mean(g·xhat)) with g = d_out·weight. */
    for (size_t r = 0; r < B * T; r++) {
        double mg = 0, mgx = 0;
        for (size_t c = 0; c < WD; c++) {
            double xhat = (sum[r * WD + c] - mean[r]) * rstd[r], g = grad[r * WD + c] * w[c];
            mg += g / WD;
            mgx += g * xhat / WD;
        }
        for (size_t c = 0; c < WD; c++) {
            double xhat = (sum[r * WD + c] - mean[r]) * rstd[r], g = grad[r * WD + c] * w[c];
            double want = rstd[r] * (g - mg - xhat * mgx);
            dnorm_right &= fabs(d_in[r * WD + c] - want) <= 1e-4 * (1 + fabs(want));
        }
    }
    CHECK(dnorm_right);
    EXPECT_OK(tessera_norm_forward(TESSERA_NORM_KIND_RMS_NORM, 1e-6f, tx, NULL, NULL, tw, NULL, ty, tmean, trstd));
    CHECK(mean[0] == 0.0f);
    EXPECT_OK(tessera_norm_backward(TESSERA_NORM_KIND_RMS_NORM, 1e-6f, tgrad, tres, tx, tw, tmean, trstd, tdin, tdw,
                                    NULL, 1));

    kept = y[0];
    float kept_rstd = rstd[0];
    EXPECT(INVALID, tessera_norm_forward(2, 1e-5f, tx, NULL, NULL, tw, NULL, ty, tmean, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, -1.0f, tx, NULL, NULL, tw, NULL, ty, tmean, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, NAN, tx, NULL, NULL, tw, NULL, ty, tmean, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, tres, NULL, tw, NULL, ty, tmean, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, NULL, tsum, tw, NULL, ty, tmean, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, NULL, NULL, tmean, NULL, ty, tmean, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, NULL, NULL, tw, NULL, ty, trstd, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, NULL, NULL, tw, NULL, tx, tmean, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, NULL, NULL, tw, NULL, ty, tw, trstd));
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, NULL, NULL, tw, NULL, NULL, tmean, trstd));
    EXPECT(HANDLE, tessera_norm_forward(0, 1e-5f, tx, NULL, NULL, tw, NULL, ty, tmean, FORGED(TesseraTensor)));
    /* Statistics of the wrong shape: refused, and the caller's tensor is intact afterwards. */
    EXPECT(INVALID, tessera_norm_forward(0, 1e-5f, tx, NULL, NULL, tw, NULL, ty, tdw, trstd));
    size_t lent_numel = 0;
    EXPECT_OK(tessera_tensor_size(tdw, &lent_numel, NULL));
    CHECK(lent_numel == WD);
    CHECK(y[0] == kept && rstd[0] == kept_rstd);
    EXPECT(INVALID, tessera_norm_backward(5, 1e-5f, tgrad, NULL, tx, tw, tmean, trstd, tdin, tdw, NULL, 0));
    EXPECT(INVALID, tessera_norm_backward(0, 1e-5f, tgrad, NULL, tx, tw, tmean, trstd, tdin, tdw, NULL, 3));
    EXPECT(INVALID, tessera_norm_backward(0, 1e-5f, tgrad, NULL, tx, tw, tw, trstd, tdin, tdw, NULL, 0));
    EXPECT(INVALID, tessera_norm_backward(0, 1e-5f, tgrad, NULL, tx, tw, tmean, trstd, tdin, tdin, NULL, 0));
    EXPECT(INVALID, tessera_norm_backward(0, 1e-5f, tgrad, NULL, tx, tw, tmean, trstd, tdin, tw, NULL, 0));
    EXPECT(INVALID, tessera_norm_backward(0, 1e-5f, tgrad, NULL, tx, tw, tmean, trstd, tdin, tdw, tdin, 0));
    EXPECT(INVALID, tessera_norm_backward(0, 1e-5f, NULL, NULL, tx, tw, tmean, trstd, tdin, tdw, NULL, 0));
    EXPECT(HANDLE, tessera_norm_backward(0, 1e-5f, tgrad, FORGED(TesseraTensor), tx, tw, tmean, trstd, tdin, tdw, NULL,
                                         0));

    TesseraTensor *all[] = {tids, twte, twpe, temb, tgrad, tdwte, tdwpe, tx, tres, tsum, ty, tw, tb, tmean, trstd,
                            tdin, tdw, tdb};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_OK(tessera_tensor_free(all[i]));
}

/* A model small enough to train and run in moments, even under valgrind. */
static const char *const TINY_TOML =
    "[model]\nlayers = 1\nheads = 2\nkv_heads = 2\nwidth = 16\nffn_width = 32\ncontext = 16\n"
    "[train]\nbatch = 2\nseq = 8\nsteps = 4\nwarmup = 1\neval_windows = 4\n";

static int remove_entry(const char *path, const struct stat *info, int flag, struct FTW *ftw) {
    (void)info;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void write_file(const char *path, const char *text) {
    FILE *file = fopen(path, "w");
    CHECK(file != NULL);
    if (file == NULL) return;
    fputs(text, file);
    fclose(file);
}

static void trainer_and_model(TesseraDevice *cpu) {
    char dir[] = "/tmp/tessera-bad-input-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char run[256], text[256], small[256], config[256], checkpoint_file[256];
    snprintf(run, sizeof run, "%s/run", dir);
    snprintf(text, sizeof text, "%s/text.txt", dir);
    snprintf(small, sizeof small, "%s/small.txt", dir);
    snprintf(config, sizeof config, "%s/config.toml", dir);
    snprintf(checkpoint_file, sizeof checkpoint_file, "%s/run/step-00000003/model.safetensors", dir);
    char corpus[2048];
    for (size_t i = 0; i + 1 < sizeof corpus; i++) corpus[i] = "the quick brown fox jumps. "[i % 27];
    corpus[sizeof corpus - 1] = '\0';
    write_file(text, corpus);
    write_file(small, "ab");
    write_file(config, TINY_TOML);

    TesseraTrainer *trainer = FORGED(TesseraTrainer);
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", TINY_TOML, NULL, NULL));
    EXPECT(INVALID, tessera_trainer_new(NULL, "tiny", TINY_TOML, NULL, &trainer));
    CHECK(trainer == NULL);
    EXPECT(HANDLE, tessera_trainer_new(FORGED(TesseraDevice), "tiny", TINY_TOML, NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, NULL, TINY_TOML, NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "huge", TINY_TOML, NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", "[model", NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", "[optimizer]\nlr = 1.0\n", NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", "[model]\ndepth = 3\n", NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", "[train]\nbatch = \"two\"\n", NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", "[model]\nwidth = 15\n", NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", "[train]\nseq = 129\n", NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", "\xff", NULL, &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", TINY_TOML, config, &trainer));
    EXPECT(TESSERA_STATUS_FILE, tessera_trainer_new(cpu, "tiny", NULL, "/nonexistent/tessera.toml", &trainer));
    EXPECT(INVALID, tessera_trainer_new(cpu, "tiny", NULL, "", &trainer));
    CHECK(trainer == NULL);
    EXPECT_OK(tessera_trainer_new(cpu, "tiny", NULL, config, &trainer));
    EXPECT_OK(tessera_trainer_free(trainer));
    EXPECT_OK(tessera_trainer_new(cpu, "tiny", TINY_TOML, NULL, &trainer));

    TesseraModelInfo info = {0};
    uint64_t step = 99;
    EXPECT(HANDLE, tessera_trainer_info(FORGED(TesseraTrainer), &info, &step));
    EXPECT(INVALID, tessera_trainer_info(NULL, &info, &step));
    EXPECT(HANDLE, tessera_trainer_info((TesseraTrainer *)cpu, &info, &step));
    EXPECT_OK(tessera_trainer_info(trainer, NULL, NULL));
    EXPECT_OK(tessera_trainer_info(trainer, &info, &step));
    CHECK(info.vocab == 256 && info.context == 16 && info.layers == 1 && info.width == 16 && step == 0);
    CHECK(info.parameters > 256 * 16);

    uint32_t tokens[64];
    for (size_t i = 0; i < 64; i++) tokens[i] = (uint32_t)((i * 7 + 3) % 256);
    TesseraStepRecord record = {.step = 77};
    EXPECT(INVALID, tessera_trainer_train_tokens(trainer, NULL, 64, 1, &record));
    EXPECT(INVALID, tessera_trainer_train_tokens(trainer, (const uint32_t *)((const char *)tokens + 1), 32, 1, &record));
    EXPECT(INVALID, tessera_trainer_train_tokens(trainer, tokens, 8, 1, &record));
    EXPECT(HANDLE, tessera_trainer_train_tokens(FORGED(TesseraTrainer), tokens, 64, 1, &record));
    tokens[40] = 256;
    EXPECT(INVALID, tessera_trainer_train_tokens(trainer, tokens, 64, 1, &record));
    tokens[40] = 5;
    CHECK(record.step == 77);
    EXPECT_OK(tessera_trainer_info(trainer, NULL, &step));
    CHECK(step == 0);
    EXPECT_OK(tessera_trainer_train_tokens(trainer, tokens, 64, 0, &record));
    CHECK(record.step == 77);
    EXPECT_OK(tessera_trainer_train_tokens(trainer, tokens, 64, 2, &record));
    CHECK(record.step == 2 && isfinite(record.loss) && record.loss > 0 && record.tokens == 16);
    CHECK(isfinite(record.grad_norm) && record.lr > 0);

    EXPECT(INVALID, tessera_trainer_train_file(trainer, NULL, 1, &record));
    EXPECT(INVALID, tessera_trainer_train_file(trainer, "", 1, &record));
    EXPECT(TESSERA_STATUS_FILE, tessera_trainer_train_file(trainer, "/nonexistent/text.txt", 1, &record));
    EXPECT(TESSERA_STATUS_FILE, tessera_trainer_train_file(trainer, small, 1, &record));
    EXPECT(HANDLE, tessera_trainer_train_file(FORGED(TesseraTrainer), text, 1, &record));
    CHECK(record.step == 2);
    EXPECT_OK(tessera_trainer_train_file(trainer, text, 1, NULL));
    EXPECT_OK(tessera_trainer_info(trainer, NULL, &step));
    CHECK(step == 3);

    float loss = -1.0f;
    EXPECT(INVALID, tessera_trainer_validate_tokens(trainer, tokens, 64, NULL));
    EXPECT(INVALID, tessera_trainer_validate_tokens(trainer, NULL, 64, &loss));
    EXPECT(INVALID, tessera_trainer_validate_tokens(trainer, tokens, 8, &loss));
    EXPECT(HANDLE, tessera_trainer_validate_tokens(FORGED(TesseraTrainer), tokens, 64, &loss));
    tokens[3] = 1000;
    EXPECT(INVALID, tessera_trainer_validate_tokens(trainer, tokens, 64, &loss));
    tokens[3] = 3;
    CHECK(loss == -1.0f);
    EXPECT_OK(tessera_trainer_validate_tokens(trainer, tokens, 64, &loss));
    CHECK(isfinite(loss) && loss > 0);
    loss = -1.0f;
    EXPECT(INVALID, tessera_trainer_validate_file(trainer, text, NULL));
    EXPECT(INVALID, tessera_trainer_validate_file(trainer, NULL, &loss));
    EXPECT(TESSERA_STATUS_FILE, tessera_trainer_validate_file(trainer, "/nonexistent/text.txt", &loss));
    EXPECT(HANDLE, tessera_trainer_validate_file(FORGED(TesseraTrainer), text, &loss));
    CHECK(loss == -1.0f);
    EXPECT_OK(tessera_trainer_validate_file(trainer, text, &loss));
    CHECK(isfinite(loss) && loss > 0);

    EXPECT(INVALID, tessera_trainer_save(trainer, NULL));
    EXPECT(INVALID, tessera_trainer_save(trainer, ""));
    EXPECT(TESSERA_STATUS_FILE, tessera_trainer_save(trainer, text));
    EXPECT(HANDLE, tessera_trainer_save(FORGED(TesseraTrainer), run));
    EXPECT_OK(tessera_trainer_save(trainer, run));

    TesseraTrainer *resumed = FORGED(TesseraTrainer);
    EXPECT(INVALID, tessera_trainer_resume(cpu, run, NULL));
    EXPECT(INVALID, tessera_trainer_resume(cpu, NULL, &resumed));
    CHECK(resumed == NULL);
    EXPECT(HANDLE, tessera_trainer_resume(FORGED(TesseraDevice), run, &resumed));
    EXPECT(TESSERA_STATUS_FILE, tessera_trainer_resume(cpu, dir, &resumed));
    CHECK(resumed == NULL);
    EXPECT_OK(tessera_trainer_resume(cpu, run, &resumed));
    EXPECT_OK(tessera_trainer_info(resumed, &info, &step));
    CHECK(step == 3 && info.width == 16);
    /* The resumed run takes the step the saved one would have taken. */
    TesseraStepRecord next = {0}, resumed_next = {0};
    EXPECT_OK(tessera_trainer_train_tokens(trainer, tokens, 64, 1, &next));
    EXPECT_OK(tessera_trainer_train_tokens(resumed, tokens, 64, 1, &resumed_next));
    CHECK(next.step == 4 && resumed_next.step == 4 && next.loss == resumed_next.loss);
    CHECK(next.grad_norm == resumed_next.grad_norm);
    EXPECT(HANDLE, tessera_model_free((TesseraModel *)resumed));
    EXPECT_OK(tessera_trainer_free(resumed));
    EXPECT(HANDLE, tessera_trainer_free(resumed));
    EXPECT(HANDLE, tessera_trainer_info(resumed, NULL, NULL));
    EXPECT_OK(tessera_trainer_free(NULL));

    TesseraModel *model = FORGED(TesseraModel);
    EXPECT(INVALID, tessera_model_load(cpu, run, NULL, NULL));
    EXPECT(INVALID, tessera_model_load(cpu, NULL, NULL, &model));
    CHECK(model == NULL);
    EXPECT(HANDLE, tessera_model_load((TesseraDevice *)trainer, run, NULL, &model));
    EXPECT(TESSERA_STATUS_FILE, tessera_model_load(cpu, "/nonexistent/run", NULL, &model));
    EXPECT(TESSERA_STATUS_FILE, tessera_model_load(cpu, text, NULL, &model));
    EXPECT(INVALID, tessera_model_load(cpu, run, "huge", &model));
    CHECK(model == NULL);
    EXPECT_OK(tessera_model_load(cpu, checkpoint_file, NULL, &model));
    EXPECT_OK(tessera_model_free(model));
    EXPECT_OK(tessera_model_load(cpu, run, NULL, &model));

    EXPECT(INVALID, tessera_model_info(model, NULL));
    EXPECT(HANDLE, tessera_model_info(FORGED(TesseraModel), &info));
    EXPECT(HANDLE, tessera_model_info((TesseraModel *)trainer, &info));
    memset(&info, 0, sizeof info);
    EXPECT_OK(tessera_model_info(model, &info));
    CHECK(info.vocab == 256 && info.context == 16 && info.heads == 2 && info.kv_heads == 2);

    /* The logits land in caller memory through a wrapped host buffer. */
    const size_t logits_shape[2] = {8, 256};
    float *buffer = malloc(8 * 256 * sizeof(float));
    CHECK(buffer != NULL);
    if (buffer == NULL) return;
    for (size_t i = 0; i < 8 * 256; i++) buffer[i] = 7.0f;
    TesseraTensor *logits = NULL;
    EXPECT_OK(tessera_tensor_wrap_host(buffer, 8 * 256 * sizeof(float), TESSERA_DTYPE_F32, logits_shape, 2, NULL,
                                       &logits));
    const size_t narrow_shape[2] = {8, 255};
    TesseraTensor *wrong_shape = NULL, *wrong_dtype = NULL;
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, narrow_shape, 2, &wrong_shape));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_BF16, logits_shape, 2, &wrong_dtype));
    EXPECT(INVALID, tessera_model_logits(model, tokens, 2, 4, wrong_shape));
    EXPECT(INVALID, tessera_model_logits(model, tokens, 2, 4, wrong_dtype));
    EXPECT(INVALID, tessera_model_logits(model, tokens, 2, 4, NULL));
    EXPECT(INVALID, tessera_model_logits(model, NULL, 2, 4, logits));
    EXPECT(INVALID, tessera_model_logits(model, tokens, 1, 17, logits));
    EXPECT(INVALID, tessera_model_logits(model, tokens, 0, 4, logits));
    EXPECT(INVALID, tessera_model_logits(model, tokens, SIZE_MAX, 2, logits));
    EXPECT(INVALID, tessera_model_logits(model, tokens, 4, 4, logits));
    EXPECT(HANDLE, tessera_model_logits(FORGED(TesseraModel), tokens, 2, 4, logits));
    EXPECT(HANDLE, tessera_model_logits(model, tokens, 2, 4, (TesseraTensor *)model));
    tokens[7] = 256;
    EXPECT(INVALID, tessera_model_logits(model, tokens, 2, 4, logits));
    tokens[7] = 7;
    int untouched = 1;
    for (size_t i = 0; i < 8 * 256; i++) untouched &= buffer[i] == 7.0f;
    CHECK(untouched);
    EXPECT_OK(tessera_model_logits(model, tokens, 2, 4, logits));
    int finite = 1;
    for (size_t i = 0; i < 8 * 256; i++) finite &= isfinite(buffer[i]) && buffer[i] != 7.0f;
    CHECK(finite);

    loss = -1.0f;
    EXPECT(INVALID, tessera_model_loss(model, tokens, tokens + 1, 2, 4, NULL));
    EXPECT(INVALID, tessera_model_loss(model, tokens, NULL, 2, 4, &loss));
    EXPECT(INVALID, tessera_model_loss(model, tokens, tokens + 1, 2, 17, &loss));
    EXPECT(HANDLE, tessera_model_loss(FORGED(TesseraModel), tokens, tokens + 1, 2, 4, &loss));
    CHECK(loss == -1.0f);
    EXPECT_OK(tessera_model_loss(model, tokens, tokens + 1, 2, 4, &loss));
    CHECK(isfinite(loss) && loss > 0);

    TesseraSampling sampling = tessera_sampling_default();
    CHECK(sampling.temperature == 0.0f && sampling.top_k == 0 && sampling.top_p == 1.0f);
    uint32_t prompt[3] = {116, 104, 101};
    uint32_t out[12], again[12];
    for (size_t i = 0; i < 12; i++) out[i] = again[i] = 1000;
    EXPECT(INVALID, tessera_model_generate(model, prompt, 0, 12, NULL, 1, out));
    EXPECT(INVALID, tessera_model_generate(model, NULL, 3, 12, NULL, 1, out));
    EXPECT(INVALID, tessera_model_generate(model, prompt, 3, 12, NULL, 1, NULL));
    sampling.temperature = -1.0f;
    EXPECT(INVALID, tessera_model_generate(model, prompt, 3, 12, &sampling, 1, out));
    sampling.temperature = NAN;
    EXPECT(INVALID, tessera_model_generate(model, prompt, 3, 12, &sampling, 1, out));
    sampling.temperature = 0.8f;
    sampling.top_p = 0.0f;
    EXPECT(INVALID, tessera_model_generate(model, prompt, 3, 12, &sampling, 1, out));
    sampling.top_p = 1.5f;
    EXPECT(INVALID, tessera_model_generate(model, prompt, 3, 12, &sampling, 1, out));
    prompt[1] = 300;
    EXPECT(INVALID, tessera_model_generate(model, prompt, 3, 12, NULL, 1, out));
    prompt[1] = 104;
    EXPECT(HANDLE, tessera_model_generate(FORGED(TesseraModel), prompt, 3, 12, NULL, 1, out));
    CHECK(out[0] == 1000 && out[11] == 1000);
    EXPECT_OK(tessera_model_generate(model, prompt, 3, 0, NULL, 1, NULL));

    /* Greedy: the first token is the arg-max of the last prompt position's logits. */
    EXPECT_OK(tessera_model_generate(model, prompt, 3, 12, NULL, 1, out));
    const size_t prompt_shape[2] = {3, 256};
    TesseraTensor *prompt_logits = NULL;
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, prompt_shape, 2, &prompt_logits));
    EXPECT_OK(tessera_model_logits(model, prompt, 1, 3, prompt_logits));
    float last[3 * 256];
    EXPECT_OK(tessera_tensor_copy_to_host(prompt_logits, last, sizeof last));
    size_t best = 0;
    for (size_t i = 1; i < 256; i++)
        if (last[2 * 256 + i] > last[2 * 256 + best]) best = i;
    CHECK(out[0] == best);
    int in_vocab = 1;
    for (size_t i = 0; i < 12; i++) in_vocab &= out[i] < 256;
    CHECK(in_vocab);
    /* Sampling: the same seed draws the same tokens. */
    sampling.top_p = 0.9f;
    sampling.top_k = 40;
    EXPECT_OK(tessera_model_generate(model, prompt, 3, 12, &sampling, 42, out));
    EXPECT_OK(tessera_model_generate(model, prompt, 3, 12, &sampling, 42, again));
    CHECK(memcmp(out, again, sizeof out) == 0);

    EXPECT_OK(tessera_tensor_free(prompt_logits));
    EXPECT_OK(tessera_tensor_free(logits));
    free(buffer);
    EXPECT_OK(tessera_tensor_free(wrong_shape));
    EXPECT_OK(tessera_tensor_free(wrong_dtype));
    EXPECT(HANDLE, tessera_trainer_free((TesseraTrainer *)model));
    EXPECT_OK(tessera_model_free(model));
    EXPECT(HANDLE, tessera_model_free(model));
    EXPECT(HANDLE, tessera_model_loss(model, tokens, tokens + 1, 2, 4, &loss));
    EXPECT_OK(tessera_model_free(NULL));
    EXPECT_OK(tessera_trainer_free(trainer));
    EXPECT(HANDLE, tessera_trainer_save(trainer, run));
    CHECK(nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS) == 0);
}


static int all_close(const float *got, const double *want, size_t count, double tolerance) {
    for (size_t i = 0; i < count; i++) {
        if (!(fabs(got[i] - want[i]) <= tolerance * (1 + fabs(want[i])))) {
            fprintf(stderr, "element %zu: got %.9g, expected %.9g\n", i, got[i], want[i]);
            return 0;
        }
    }
    return 1;
}

static void fill_nan(float *values, size_t count) {
    for (size_t i = 0; i < count; i++) values[i] = NAN;
}

/* Binarized linears (37 inputs: two u32 words per packed row, the second padded), the xnor
 * initialisation, the training form's backward and the distillation loss, against plain loops. */
enum { BO = 5, BI = 37, BW = 2, BT = 3, DR = 4, DV = 6 };

static void binary(TesseraDevice *cpu) {
    float w[BO * BI], x[BT * BI], bias[BO], dy[BT * BO], alpha[BI], beta[BI], y[BT * BO], y_train[BT * BO];
    float d_x[BT * BI], d_w[BO * BI], d_alpha[BI], d_beta[BI], d_bias[BO];
    uint32_t bits[BO * BW];
    for (size_t i = 0; i < BO * BI; i++) w[i] = (float)sin(1.3 * (double)i + 0.2);
    for (size_t i = 0; i < BT * BI; i++) x[i] = (float)cos(0.7 * (double)i);
    for (size_t i = 0; i < BO; i++) bias[i] = 0.1f * (float)i - 0.2f;
    for (size_t i = 0; i < BT * BO; i++) dy[i] = (float)sin(0.45 * (double)i + 1.1);
    fill_nan(alpha, BI);
    fill_nan(beta, BI);
    fill_nan(y, BT * BO);
    fill_nan(y_train, BT * BO);
    memset(bits, 0xff, sizeof bits);
    const size_t w_shape[2] = {BO, BI}, x_shape[2] = {BT, BI}, b_shape[1] = {BO}, v_shape[1] = {BI};
    const size_t y_shape[2] = {BT, BO}, bits_shape[2] = {BO, BW}, wide_bits[2] = {BO, 3};
    TesseraTensor *tw = NULL, *tx = NULL, *tb = NULL, *tdy = NULL, *ta = NULL, *tbeta = NULL, *tbits = NULL;
    TesseraTensor *ty = NULL, *tyt = NULL, *tdx = NULL, *tdw = NULL, *tda = NULL, *tdb = NULL, *tdbias = NULL;
    TesseraTensor *bf_x = NULL, *f32_bits = NULL, *bits3 = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, w_shape, 2, w, sizeof w, &tw));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, x_shape, 2, x, sizeof x, &tx));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, b_shape, 1, bias, sizeof bias, &tb));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, y_shape, 2, dy, sizeof dy, &tdy));
    EXPECT_OK(tessera_tensor_wrap_host(alpha, sizeof alpha, TESSERA_DTYPE_F32, v_shape, 1, NULL, &ta));
    EXPECT_OK(tessera_tensor_wrap_host(beta, sizeof beta, TESSERA_DTYPE_F32, v_shape, 1, NULL, &tbeta));
    EXPECT_OK(tessera_tensor_wrap_host(bits, sizeof bits, TESSERA_DTYPE_U32, bits_shape, 2, NULL, &tbits));
    EXPECT_OK(tessera_tensor_wrap_host(y, sizeof y, TESSERA_DTYPE_F32, y_shape, 2, NULL, &ty));
    EXPECT_OK(tessera_tensor_wrap_host(y_train, sizeof y_train, TESSERA_DTYPE_F32, y_shape, 2, NULL, &tyt));
    EXPECT_OK(tessera_tensor_wrap_host(d_x, sizeof d_x, TESSERA_DTYPE_F32, x_shape, 2, NULL, &tdx));
    EXPECT_OK(tessera_tensor_wrap_host(d_w, sizeof d_w, TESSERA_DTYPE_F32, w_shape, 2, NULL, &tdw));
    EXPECT_OK(tessera_tensor_wrap_host(d_alpha, sizeof d_alpha, TESSERA_DTYPE_F32, v_shape, 1, NULL, &tda));
    EXPECT_OK(tessera_tensor_wrap_host(d_beta, sizeof d_beta, TESSERA_DTYPE_F32, v_shape, 1, NULL, &tdb));
    EXPECT_OK(tessera_tensor_wrap_host(d_bias, sizeof d_bias, TESSERA_DTYPE_F32, b_shape, 1, NULL, &tdbias));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_BF16, x_shape, 2, &bf_x));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, bits_shape, 2, &f32_bits));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_U32, wide_bits, 2, &bits3));

    /* xnor init: beta the column mean, alpha the column's mean absolute deviation from it. */
    EXPECT_OK(tessera_binary_init(tw, ta, tbeta));
    double want_alpha[BI], want_beta[BI];
    for (size_t j = 0; j < BI; j++) {
        double mean = 0, spread = 0;
        for (size_t i = 0; i < BO; i++) mean += w[i * BI + j];
        mean /= BO;
        for (size_t i = 0; i < BO; i++) spread += fabs(w[i * BI + j] - mean);
        want_beta[j] = mean;
        want_alpha[j] = spread / BO;
    }
    CHECK(all_close(alpha, want_alpha, BI, 1e-6) && all_close(beta, want_beta, BI, 1e-6));

    /* Packing: bit j % 32 of word j / 32 set for a negative weight, padding bits 0. */
    EXPECT_OK(tessera_binary_pack(tw, tbits));
    int packed_right = 1;
    for (size_t i = 0; i < BO; i++) {
        for (size_t word = 0; word < BW; word++) {
            uint32_t want = 0;
            for (size_t b = 0; b < 32 && word * 32 + b < BI; b++) want |= (uint32_t)(w[i * BI + word * 32 + b] < 0) << b;
            packed_right &= bits[i * BW + word] == want;
        }
    }
    CHECK(packed_right);

    /* Both forms against y = x·(alpha·sign(W) + beta)ᵀ + bias (no weight is exactly 0). */
    EXPECT_OK(tessera_binary_packed_forward(tx, tbits, ta, tbeta, tb, BI, ty));
    EXPECT_OK(tessera_binary_linear_forward(tx, tw, ta, tbeta, tb, tyt));
    double want_y[BT * BO];
    for (size_t n = 0; n < BT; n++) {
        for (size_t i = 0; i < BO; i++) {
            double sum = bias[i];
            for (size_t j = 0; j < BI; j++) {
                double sign = w[i * BI + j] < 0 ? -1.0 : 1.0;
                sum += (alpha[j] * sign + beta[j]) * x[n * BI + j];
            }
            want_y[n * BO + i] = sum;
        }
    }
    CHECK(all_close(y, want_y, BT * BO, 1e-5));
    CHECK(all_close(y_train, want_y, BT * BO, 1e-5));
    EXPECT_OK(tessera_binary_packed_forward(tx, tbits, ta, tbeta, NULL, BI, ty));
    CHECK(fabs(y[1] - (want_y[1] - bias[1])) <= 1e-5 * (1 + fabs(want_y[1])));

    /* The straight-through backward. */
    fill_nan(d_x, BT * BI);
    fill_nan(d_w, BO * BI);
    fill_nan(d_alpha, BI);
    fill_nan(d_beta, BI);
    fill_nan(d_bias, BO);
    EXPECT_OK(tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, tb, tdx, tdw, tda, tdb, tdbias));
    double want_dx[BT * BI], want_dw[BO * BI], want_da[BI] = {0}, want_db[BI] = {0}, want_dbias[BO] = {0};
    for (size_t n = 0; n < BT; n++) {
        for (size_t j = 0; j < BI; j++) {
            double sum = 0;
            for (size_t i = 0; i < BO; i++) {
                double sign = w[i * BI + j] < 0 ? -1.0 : 1.0;
                sum += dy[n * BO + i] * (alpha[j] * sign + beta[j]);
            }
            want_dx[n * BI + j] = sum;
        }
    }
    for (size_t i = 0; i < BO; i++) {
        for (size_t j = 0; j < BI; j++) {
            double g = 0, sign = w[i * BI + j] < 0 ? -1.0 : 1.0;
            for (size_t n = 0; n < BT; n++) g += dy[n * BO + i] * x[n * BI + j];
            want_dw[i * BI + j] = alpha[j] * g;
            want_da[j] += g * sign;
            want_db[j] += g;
        }
        for (size_t n = 0; n < BT; n++) want_dbias[i] += dy[n * BO + i];
    }
    CHECK(all_close(d_x, want_dx, BT * BI, 1e-5) && all_close(d_w, want_dw, BO * BI, 1e-5));
    CHECK(all_close(d_alpha, want_da, BI, 1e-5) && all_close(d_beta, want_db, BI, 1e-5));
    CHECK(all_close(d_bias, want_dbias, BO, 1e-5));
    EXPECT_OK(tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, NULL, tdx, tdw, tda, tdb, NULL));

    /* Bad input: outputs keep their values. */
    float kept_y = y[2], kept_dx = d_x[3], kept_alpha = alpha[0];
    uint32_t kept_bits = bits[1];
    EXPECT(INVALID, tessera_binary_pack(tw, f32_bits));
    EXPECT(INVALID, tessera_binary_pack(tw, bits3));
    EXPECT(INVALID, tessera_binary_pack(tw, tw));
    EXPECT(INVALID, tessera_binary_pack(tbits, tbits));
    EXPECT(INVALID, tessera_binary_pack(tx, tbits));
    EXPECT(INVALID, tessera_binary_pack(NULL, tbits));
    EXPECT(INVALID, tessera_binary_pack(tw, NULL));
    EXPECT(HANDLE, tessera_binary_pack(FORGED(TesseraTensor), tbits));
    EXPECT(HANDLE, tessera_binary_pack(tw, (TesseraTensor *)cpu));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, ta, tbeta, tb, 0, ty));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, ta, tbeta, tb, 70, ty));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, ta, tbeta, tb, 36, ty));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, f32_bits, ta, tbeta, tb, BI, ty));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, tb, tbeta, tb, BI, ty));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, ta, tbeta, ta, BI, ty));
    EXPECT(INVALID, tessera_binary_packed_forward(bf_x, tbits, ta, tbeta, tb, BI, ty));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, ta, tbeta, tb, BI, tx));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, ta, tbeta, tb, BI, tdx));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, ta, tbeta, tb, BI, NULL));
    EXPECT(INVALID, tessera_binary_packed_forward(tx, tbits, NULL, tbeta, tb, BI, ty));
    EXPECT(HANDLE, tessera_binary_packed_forward(tx, FORGED(TesseraTensor), ta, tbeta, tb, BI, ty));
    EXPECT(INVALID, tessera_binary_linear_forward(tx, tw, ta, tbeta, tb, tx));
    EXPECT(INVALID, tessera_binary_linear_forward(tx, tw, ta, tbeta, tb, tdx));
    EXPECT(INVALID, tessera_binary_linear_forward(bf_x, tw, ta, tbeta, tb, ty));
    EXPECT(INVALID, tessera_binary_linear_forward(tx, tbits, ta, tbeta, tb, ty));
    EXPECT(INVALID, tessera_binary_linear_forward(tx, tw, ta, NULL, tb, ty));
    EXPECT(HANDLE, tessera_binary_linear_forward(tx, tw, FORGED(TesseraTensor), tbeta, tb, ty));
    EXPECT(INVALID, tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, NULL, tdx, tdw, tda, tdb, tdbias));
    EXPECT(INVALID, tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, tb, tdx, tdx, tda, tdb, tdbias));
    EXPECT(INVALID, tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, tb, tdx, tdw, ta, tdb, tdbias));
    EXPECT(INVALID, tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, tb, tdw, tdx, tda, tdb, tdbias));
    EXPECT(INVALID, tessera_binary_linear_backward(tx, tx, tw, ta, tbeta, tb, tdx, tdw, tda, tdb, tdbias));
    EXPECT(INVALID, tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, tb, NULL, tdw, tda, tdb, tdbias));
    EXPECT(HANDLE, tessera_binary_linear_backward(tdy, tx, tw, ta, tbeta, tb, tdx, tdw, tda, FORGED(TesseraTensor),
                                                  tdbias));
    EXPECT(INVALID, tessera_binary_init(tw, ta, ta));
    EXPECT(INVALID, tessera_binary_init(tw, tw, tbeta));
    EXPECT(INVALID, tessera_binary_init(tw, tb, tbeta));
    EXPECT(INVALID, tessera_binary_init(tbits, ta, tbeta));
    EXPECT(INVALID, tessera_binary_init(tw, NULL, tbeta));
    EXPECT(HANDLE, tessera_binary_init(tw, ta, FORGED(TesseraTensor)));
    CHECK(y[2] == kept_y && d_x[3] == kept_dx && alpha[0] == kept_alpha && bits[1] == kept_bits);

    /* The distillation loss with half next-token cross-entropy. */
    float student[DR * DV], teacher[DR * DV], grad[DR * DV], loss = NAN;
    uint32_t labels[DR] = {0, 5, 2, 3};
    for (size_t i = 0; i < DR * DV; i++) {
        student[i] = (float)sin(0.83 * (double)i) * 3.0f;
        teacher[i] = (float)cos(0.57 * (double)i + 0.4) * 2.0f;
    }
    fill_nan(grad, DR * DV);
    const size_t logits_shape[2] = {DR, DV}, label_shape[1] = {DR}, loss_shape[1] = {1};
    TesseraTensor *ts = NULL, *tt = NULL, *tl = NULL, *tloss = NULL, *tgrad = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, logits_shape, 2, student, sizeof student, &ts));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, logits_shape, 2, teacher, sizeof teacher, &tt));
    EXPECT_OK(tessera_tensor_wrap_host(labels, sizeof labels, TESSERA_DTYPE_U32, label_shape, 1, NULL, &tl));
    EXPECT_OK(tessera_tensor_wrap_host(&loss, sizeof loss, TESSERA_DTYPE_F32, loss_shape, 1, NULL, &tloss));
    EXPECT_OK(tessera_tensor_wrap_host(grad, sizeof grad, TESSERA_DTYPE_F32, logits_shape, 2, NULL, &tgrad));
    EXPECT_OK(tessera_distill_loss(ts, tt, tl, 0.5f, tloss, tgrad));
    double want_loss = 0, want_grad[DR * DV];
    for (size_t r = 0; r < DR; r++) {
        double ms = -INFINITY, mt = -INFINITY, ss = 0, st = 0;
        for (size_t c = 0; c < DV; c++) {
            ms = fmax(ms, student[r * DV + c]);
            mt = fmax(mt, teacher[r * DV + c]);
        }
        for (size_t c = 0; c < DV; c++) {
            ss += exp(student[r * DV + c] - ms);
            st += exp(teacher[r * DV + c] - mt);
        }
        for (size_t c = 0; c < DV; c++) {
            double log_ps = student[r * DV + c] - ms - log(ss), pt = exp(teacher[r * DV + c] - mt) / st;
            double ps = exp(log_ps), onehot = c == labels[r];
            want_loss -= 0.5 * pt * log_ps / DR + (c == labels[r] ? 0.5 * log_ps / DR : 0);
            want_grad[r * DV + c] = (0.5 * (ps - pt) + 0.5 * (ps - onehot)) / DR;
        }
    }
    CHECK(fabs(loss - want_loss) <= 1e-5 * (1 + fabs(want_loss)));
    CHECK(all_close(grad, want_grad, DR * DV, 1e-5));
    EXPECT_OK(tessera_distill_loss(ts, tt, NULL, 0.0f, tloss, tgrad));
    float kept_loss = loss, kept_grad = grad[4];
    EXPECT(INVALID, tessera_distill_loss(ts, tt, NULL, 0.5f, tloss, tgrad));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, 1.5f, tloss, tgrad));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, NAN, tloss, tgrad));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, -0.1f, tloss, tgrad));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, 0.5f, tgrad, tloss));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, 0.5f, tloss, tloss));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, 0.5f, tloss, ts));
    EXPECT(INVALID, tessera_distill_loss(ts, tx, tl, 0.5f, tloss, tgrad));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tb, 0.5f, tloss, tgrad));
    EXPECT(INVALID, tessera_distill_loss(NULL, tt, tl, 0.5f, tloss, tgrad));
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, 0.5f, NULL, tgrad));
    EXPECT(HANDLE, tessera_distill_loss(ts, FORGED(TesseraTensor), tl, 0.5f, tloss, tgrad));
    labels[2] = DV;
    EXPECT(INVALID, tessera_distill_loss(ts, tt, tl, 0.5f, tloss, tgrad));
    labels[2] = 2;
    CHECK(loss == kept_loss && grad[4] == kept_grad);

    TesseraTensor *all[] = {tw, tx, tb, tdy, ta, tbeta, tbits, ty, tyt, tdx, tdw, tda, tdb, tdbias,
                            bf_x, f32_bits, bits3, ts, tt, tl, tloss, tgrad};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_OK(tessera_tensor_free(all[i]));
    EXPECT(HANDLE, tessera_binary_pack(tw, tbits));
    EXPECT(HANDLE, tessera_distill_loss(ts, tt, tl, 0.5f, tloss, tgrad));
}

/* LoRA with two adapters of ranks 2 and 3 (padded to 3) over a 5x6 dense base and 4 rows, against
 * plain loops; routing, merging and the weights' round trip. */
enum { LI = 6, LO = 5, LR = 3, LC = 2, LM = 4 };

static const size_t lora_ranks[LC] = {2, 3};
static const float lora_scales[LC] = {0.5f, 2.0f};

/* x·Aᵀ of row `r` for adapter `a`, rank index `q`. */
static double lora_t(const float *x, const float *a, size_t r, size_t adapter, size_t q) {
    double t = 0;
    for (size_t k = 0; k < LI; k++) t += (double)x[r * LI + k] * a[(adapter * LR + q) * LI + k];
    return t;
}

static void lora(TesseraDevice *cpu) {
    float w[LO * LI], a[LC * LR * LI], b[LC * LO * LR], x[LM * LI], bias[LO], dy[LM * LO];
    float out[LM * LO], d_x[LM * LI], d_a[LC * LR * LI], d_b[LC * LO * LR], d_w[LO * LI];
    for (size_t i = 0; i < LO * LI; i++) w[i] = (float)sin(0.77 * (double)i + 0.3);
    for (size_t i = 0; i < LC * LR * LI; i++) a[i] = (float)cos(1.31 * (double)i);
    for (size_t i = 0; i < LC * LO * LR; i++) b[i] = (float)sin(0.53 * (double)i + 2.0);
    for (size_t i = 0; i < LM * LI; i++) x[i] = (float)cos(0.91 * (double)i + 0.5);
    for (size_t i = 0; i < LO; i++) bias[i] = 0.05f * (float)i;
    for (size_t i = 0; i < LM * LO; i++) dy[i] = (float)sin(0.37 * (double)i - 0.4);
    const uint32_t ids[LM] = {1, 0, 1, 1};
    const size_t a_shape[3] = {LC, LR, LI}, b_shape[3] = {LC, LO, LR}, w_shape[2] = {LO, LI};
    const size_t x_shape[2] = {LM, LI}, o_shape[2] = {LM, LO}, bias_shape[1] = {LO};
    TesseraTensor *ta = NULL, *tb = NULL, *tw = NULL, *tx = NULL, *tbias = NULL, *tdy = NULL, *tout = NULL;
    TesseraTensor *tdx = NULL, *tda = NULL, *tdb = NULL, *tdw = NULL, *bf_x = NULL, *a_bf = NULL;
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, a_shape, 3, a, sizeof a, &ta));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, b_shape, 3, b, sizeof b, &tb));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, w_shape, 2, w, sizeof w, &tw));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, x_shape, 2, x, sizeof x, &tx));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, bias_shape, 1, bias, sizeof bias, &tbias));
    EXPECT_OK(tessera_tensor_new_from_host(cpu, TESSERA_DTYPE_F32, o_shape, 2, dy, sizeof dy, &tdy));
    EXPECT_OK(tessera_tensor_wrap_host(out, sizeof out, TESSERA_DTYPE_F32, o_shape, 2, NULL, &tout));
    EXPECT_OK(tessera_tensor_wrap_host(d_x, sizeof d_x, TESSERA_DTYPE_F32, x_shape, 2, NULL, &tdx));
    EXPECT_OK(tessera_tensor_wrap_host(d_a, sizeof d_a, TESSERA_DTYPE_F32, a_shape, 3, NULL, &tda));
    EXPECT_OK(tessera_tensor_wrap_host(d_b, sizeof d_b, TESSERA_DTYPE_F32, b_shape, 3, NULL, &tdb));
    EXPECT_OK(tessera_tensor_wrap_host(d_w, sizeof d_w, TESSERA_DTYPE_F32, w_shape, 2, NULL, &tdw));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_BF16, x_shape, 2, &bf_x));
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_BF16, a_shape, 3, &a_bf));

    /* Adapters: copies of a and b; bad ranks, scales, counts and shapes refused. */
    TesseraLoraAdapters *adapters = FORGED(TesseraLoraAdapters);
    const size_t bad_ranks[LC] = {0, 3}, big_ranks[LC] = {2, 4};
    const float bad_scales[LC] = {1.0f, INFINITY};
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, lora_ranks, lora_scales, LC, NULL));
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, NULL, lora_scales, LC, &adapters));
    CHECK(adapters == NULL);
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, lora_ranks, NULL, LC, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, lora_ranks, lora_scales, 1, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, lora_ranks, lora_scales, 0, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, bad_ranks, lora_scales, LC, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, big_ranks, lora_scales, LC, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(ta, tb, lora_ranks, bad_scales, LC, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(tb, ta, lora_ranks, lora_scales, LC, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(a_bf, tb, lora_ranks, lora_scales, LC, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(tw, tb, lora_ranks, lora_scales, LC, &adapters));
    EXPECT(INVALID, tessera_lora_adapters_new(NULL, tb, lora_ranks, lora_scales, LC, &adapters));
    EXPECT(HANDLE, tessera_lora_adapters_new(ta, FORGED(TesseraTensor), lora_ranks, lora_scales, LC, &adapters));
    CHECK(adapters == NULL);
    EXPECT_OK(tessera_lora_adapters_new(ta, tb, lora_ranks, lora_scales, LC, &adapters));
    size_t count = 0, max_rank = 0, d_in = 0, d_out = 0;
    int32_t dtype = -1;
    EXPECT_OK(tessera_lora_adapters_info(adapters, &count, &max_rank, &d_in, &d_out, &dtype));
    CHECK(count == LC && max_rank == LR && d_in == LI && d_out == LO && dtype == TESSERA_DTYPE_F32);
    EXPECT_OK(tessera_lora_adapters_info(adapters, NULL, NULL, NULL, NULL, NULL));
    EXPECT(HANDLE, tessera_lora_adapters_info(FORGED(TesseraLoraAdapters), &count, NULL, NULL, NULL, NULL));
    EXPECT(INVALID, tessera_lora_adapters_info(NULL, &count, NULL, NULL, NULL, NULL));

    /* Routings. */
    TesseraLoraRouting *routing = FORGED(TesseraLoraRouting), *by_sequence = NULL, *single = NULL, *short_routing = NULL;
    TesseraLoraRouting *far = NULL;
    const uint32_t sequence_ids[2] = {0, 1}, huge_id[1] = {0x7fffffffu};
    EXPECT(INVALID, tessera_lora_routing_new_per_row(cpu, ids, 0, &routing));
    CHECK(routing == NULL);
    EXPECT(INVALID, tessera_lora_routing_new_per_row(cpu, NULL, LM, &routing));
    EXPECT(INVALID, tessera_lora_routing_new_per_row(cpu, ids, (size_t)1 << 31, &routing));
    EXPECT(INVALID, tessera_lora_routing_new_per_row(cpu, huge_id, 1, &routing));
    EXPECT(INVALID, tessera_lora_routing_new_per_row(cpu, ids, LM, NULL));
    EXPECT(INVALID, tessera_lora_routing_new_per_row(NULL, ids, LM, &routing));
    EXPECT(HANDLE, tessera_lora_routing_new_per_row(FORGED(TesseraDevice), ids, LM, &routing));
    EXPECT(HANDLE, tessera_lora_routing_new_per_row((TesseraDevice *)tx, ids, LM, &routing));
    EXPECT(INVALID, tessera_lora_routing_new_per_sequence(cpu, sequence_ids, SIZE_MAX, 2, &by_sequence));
    EXPECT(INVALID, tessera_lora_routing_new_per_sequence(cpu, sequence_ids, 2, 0, &by_sequence));
    EXPECT(INVALID, tessera_lora_routing_new_per_sequence(cpu, NULL, 2, 2, &by_sequence));
    EXPECT(INVALID, tessera_lora_routing_new_per_sequence(cpu, sequence_ids, 2, 2, NULL));
    EXPECT(HANDLE, tessera_lora_routing_new_per_sequence(FORGED(TesseraDevice), sequence_ids, 2, 2, &by_sequence));
    EXPECT(INVALID, tessera_lora_routing_new_single(cpu, 0, 0, &single));
    EXPECT(INVALID, tessera_lora_routing_new_single(cpu, SIZE_MAX, 0, &single));
    EXPECT(INVALID, tessera_lora_routing_new_single(cpu, LM, 0, NULL));
    EXPECT(HANDLE, tessera_lora_routing_new_single(FORGED(TesseraDevice), LM, 0, &single));
    CHECK(routing == NULL && by_sequence == NULL && single == NULL);
    EXPECT_OK(tessera_lora_routing_new_per_row(cpu, ids, LM, &routing));
    EXPECT_OK(tessera_lora_routing_new_per_sequence(cpu, sequence_ids, 2, 2, &by_sequence));
    EXPECT_OK(tessera_lora_routing_new_single(cpu, LM, 1, &single));
    EXPECT_OK(tessera_lora_routing_new_single(cpu, LM - 1, 0, &short_routing));
    EXPECT_OK(tessera_lora_routing_new_single(cpu, LM, LC, &far));

    /* The base. */
    TesseraLoraBase *base = FORGED(TesseraLoraBase), *flat = NULL;
    TesseraTensor *vector = NULL;
    EXPECT_OK(tessera_tensor_new_zeros(cpu, TESSERA_DTYPE_F32, bias_shape, 1, &vector));
    EXPECT(INVALID, tessera_lora_base_new_dense(vector, &flat));
    EXPECT(INVALID, tessera_lora_base_new_dense(tw, NULL));
    EXPECT(INVALID, tessera_lora_base_new_dense(NULL, &base));
    CHECK(base == NULL);
    EXPECT(HANDLE, tessera_lora_base_new_dense(FORGED(TesseraTensor), &base));
    EXPECT(HANDLE, tessera_lora_base_new_dense((TesseraTensor *)adapters, &base));
    CHECK(base == NULL && flat == NULL);
    EXPECT_OK(tessera_lora_base_new_dense(tw, &base));

    /* Forward and backward against the loops, each row through its own adapter. */
    fill_nan(out, LM * LO);
    EXPECT_OK(tessera_lora_forward(tx, base, tbias, adapters, routing, tout));
    double want_out[LM * LO];
    for (size_t r = 0; r < LM; r++) {
        size_t ad = ids[r];
        for (size_t o = 0; o < LO; o++) {
            double sum = bias[o];
            for (size_t k = 0; k < LI; k++) sum += (double)x[r * LI + k] * w[o * LI + k];
            for (size_t q = 0; q < lora_ranks[ad]; q++) sum += lora_scales[ad] * lora_t(x, a, r, ad, q) * b[(ad * LO + o) * LR + q];
            want_out[r * LO + o] = sum;
        }
    }
    CHECK(all_close(out, want_out, LM * LO, 1e-5));
    fill_nan(d_x, LM * LI);
    fill_nan(d_a, LC * LR * LI);
    fill_nan(d_b, LC * LO * LR);
    fill_nan(d_w, LO * LI);
    EXPECT_OK(tessera_lora_backward(tdy, tx, base, adapters, routing, tdx, tda, tdb, tdw));
    double want_dx[LM * LI] = {0}, want_da[LC * LR * LI] = {0}, want_db[LC * LO * LR] = {0}, want_dw[LO * LI] = {0};
    for (size_t r = 0; r < LM; r++) {
        size_t ad = ids[r];
        double s = lora_scales[ad];
        for (size_t k = 0; k < LI; k++) {
            for (size_t o = 0; o < LO; o++) {
                want_dx[r * LI + k] += (double)dy[r * LO + o] * w[o * LI + k];
                want_dw[o * LI + k] += (double)dy[r * LO + o] * x[r * LI + k];
            }
        }
        for (size_t q = 0; q < lora_ranks[ad]; q++) {
            double u = 0, t = lora_t(x, a, r, ad, q);
            for (size_t o = 0; o < LO; o++) u += (double)dy[r * LO + o] * b[(ad * LO + o) * LR + q];
            for (size_t k = 0; k < LI; k++) {
                want_dx[r * LI + k] += s * u * a[(ad * LR + q) * LI + k];
                want_da[(ad * LR + q) * LI + k] += s * u * x[r * LI + k];
            }
            for (size_t o = 0; o < LO; o++) want_db[(ad * LO + o) * LR + q] += s * dy[r * LO + o] * t;
        }
    }
    CHECK(all_close(d_x, want_dx, LM * LI, 1e-5) && all_close(d_w, want_dw, LO * LI, 1e-5));
    CHECK(all_close(d_a, want_da, LC * LR * LI, 1e-5) && all_close(d_b, want_db, LC * LO * LR, 1e-5));
    EXPECT_OK(tessera_lora_backward(tdy, tx, base, adapters, by_sequence, tdx, tda, tdb, NULL));
    EXPECT_OK(tessera_lora_forward(tx, base, NULL, adapters, single, tout));

    /* Merging adapter 1 makes the base alone give what base and adapter gave; unmerging undoes it. */
    float merged[LO * LI], restored[LO * LI];
    EXPECT_OK(tessera_lora_merge(base, adapters, 1));
    EXPECT_OK(tessera_tensor_copy_to_host(tw, merged, sizeof merged));
    double want_merged[LO * LI], want_w[LO * LI];
    for (size_t o = 0; o < LO; o++) {
        for (size_t k = 0; k < LI; k++) {
            double sum = w[o * LI + k];
            for (size_t q = 0; q < lora_ranks[1]; q++) sum += lora_scales[1] * b[(LO + o) * LR + q] * a[(LR + q) * LI + k];
            want_merged[o * LI + k] = sum;
            want_w[o * LI + k] = w[o * LI + k];
        }
    }
    CHECK(all_close(merged, want_merged, LO * LI, 1e-6));
    EXPECT_OK(tessera_lora_unmerge(base, adapters, 1));
    EXPECT_OK(tessera_tensor_copy_to_host(tw, restored, sizeof restored));
    CHECK(all_close(restored, want_w, LO * LI, 1e-5));

    /* The weights' round trip: what is set is what is read back. */
    float a_back[LC * LR * LI], b_back[LC * LO * LR];
    TesseraTensor *ta_back = NULL, *tb_back = NULL;
    EXPECT_OK(tessera_tensor_wrap_host(a_back, sizeof a_back, TESSERA_DTYPE_F32, a_shape, 3, NULL, &ta_back));
    EXPECT_OK(tessera_tensor_wrap_host(b_back, sizeof b_back, TESSERA_DTYPE_F32, b_shape, 3, NULL, &tb_back));
    EXPECT_OK(tessera_lora_adapters_set_weights(adapters, tda, tdb));
    EXPECT_OK(tessera_lora_adapters_get_weights(adapters, ta_back, tb_back));
    CHECK(memcmp(a_back, d_a, sizeof a_back) == 0 && memcmp(b_back, d_b, sizeof b_back) == 0);
    EXPECT_OK(tessera_lora_adapters_set_weights(adapters, ta, tb));

    /* Bad input: the outputs keep their values. */
    float kept_out = out[3], kept_dx = d_x[2], kept_a = a_back[5];
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, adapters, routing, tx));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, adapters, routing, tw));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, adapters, routing, tdx));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, adapters, short_routing, tout));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, adapters, far, tout));
    EXPECT(INVALID, tessera_lora_forward(bf_x, base, tbias, adapters, routing, tout));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tx, adapters, routing, tout));
    EXPECT(INVALID, tessera_lora_forward(NULL, base, tbias, adapters, routing, tout));
    EXPECT(INVALID, tessera_lora_forward(tx, NULL, tbias, adapters, routing, tout));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, NULL, routing, tout));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, adapters, NULL, tout));
    EXPECT(INVALID, tessera_lora_forward(tx, base, tbias, adapters, routing, NULL));
    EXPECT(HANDLE, tessera_lora_forward(tx, FORGED(TesseraLoraBase), tbias, adapters, routing, tout));
    EXPECT(HANDLE, tessera_lora_forward(tx, base, tbias, (TesseraLoraAdapters *)routing, routing, tout));
    EXPECT(HANDLE, tessera_lora_forward(tx, base, tbias, adapters, (TesseraLoraRouting *)adapters, tout));
    EXPECT(INVALID, tessera_lora_backward(tdy, tx, base, adapters, routing, tdx, tdx, tdb, NULL));
    EXPECT(INVALID, tessera_lora_backward(tdy, tx, base, adapters, routing, tdx, tdb, tda, NULL));
    EXPECT(INVALID, tessera_lora_backward(tdy, tx, base, adapters, routing, tdx, tda, tdb, tw));
    EXPECT(INVALID, tessera_lora_backward(tdy, tx, base, adapters, routing, tdx, tda, tdb, tdx));
    EXPECT(INVALID, tessera_lora_backward(tx, tx, base, adapters, routing, tdx, tda, tdb, NULL));
    EXPECT(INVALID, tessera_lora_backward(tdy, tx, base, adapters, far, tdx, tda, tdb, NULL));
    EXPECT(INVALID, tessera_lora_backward(tdy, tx, base, adapters, routing, NULL, tda, tdb, NULL));
    EXPECT(HANDLE, tessera_lora_backward(tdy, tx, base, FORGED(TesseraLoraAdapters), routing, tdx, tda, tdb, NULL));
    EXPECT(INVALID, tessera_lora_merge(base, adapters, LC));
    EXPECT(INVALID, tessera_lora_unmerge(base, adapters, SIZE_MAX));
    EXPECT(INVALID, tessera_lora_merge(NULL, adapters, 0));
    EXPECT(HANDLE, tessera_lora_merge(base, FORGED(TesseraLoraAdapters), 0));
    EXPECT(HANDLE, tessera_lora_unmerge(FORGED(TesseraLoraBase), adapters, 0));
    EXPECT(INVALID, tessera_lora_adapters_set_weights(adapters, tb, ta));
    EXPECT(INVALID, tessera_lora_adapters_set_weights(adapters, a_bf, tb));
    EXPECT(INVALID, tessera_lora_adapters_set_weights(adapters, NULL, tb));
    EXPECT(HANDLE, tessera_lora_adapters_set_weights(FORGED(TesseraLoraAdapters), ta, tb));
    EXPECT(INVALID, tessera_lora_adapters_get_weights(adapters, ta_back, ta_back));
    EXPECT(INVALID, tessera_lora_adapters_get_weights(adapters, tb_back, ta_back));
    EXPECT(INVALID, tessera_lora_adapters_get_weights(adapters, ta_back, NULL));
    EXPECT(HANDLE, tessera_lora_adapters_get_weights((TesseraLoraAdapters *)base, ta_back, tb_back));
    CHECK(out[3] == kept_out && d_x[2] == kept_dx && a_back[5] == kept_a);
    EXPECT_OK(tessera_tensor_copy_to_host(tw, restored, sizeof restored));
    CHECK(all_close(restored, want_w, LO * LI, 1e-5));

    /* The base keeps its tensor after the tensor's handle is freed. */
    EXPECT_OK(tessera_tensor_free(tw));
    EXPECT_OK(tessera_lora_forward(tx, base, tbias, adapters, routing, tout));
    CHECK(all_close(out, want_out, LM * LO, 1e-5));

    /* Freed handles are refused; NULL frees are no-ops; a handle of another kind is not freed. */
    EXPECT(HANDLE, tessera_lora_base_free((TesseraLoraBase *)adapters));
    EXPECT(HANDLE, tessera_lora_adapters_free((TesseraLoraAdapters *)routing));
    EXPECT(HANDLE, tessera_lora_routing_free((TesseraLoraRouting *)base));
    EXPECT_OK(tessera_lora_base_free(base));
    EXPECT_OK(tessera_lora_adapters_free(adapters));
    TesseraLoraRouting *routings[] = {routing, by_sequence, single, short_routing, far};
    for (size_t i = 0; i < 5; i++) EXPECT_OK(tessera_lora_routing_free(routings[i]));
    EXPECT(HANDLE, tessera_lora_forward(tx, base, tbias, adapters, routing, tout));
    EXPECT(HANDLE, tessera_lora_merge(base, adapters, 0));
    EXPECT(HANDLE, tessera_lora_adapters_info(adapters, &count, NULL, NULL, NULL, NULL));
    EXPECT(HANDLE, tessera_lora_base_free(base));
    EXPECT(HANDLE, tessera_lora_adapters_free(adapters));
    EXPECT(HANDLE, tessera_lora_routing_free(routing));
    EXPECT_OK(tessera_lora_base_free(NULL));
    EXPECT_OK(tessera_lora_adapters_free(NULL));
    EXPECT_OK(tessera_lora_routing_free(NULL));
    TesseraTensor *all[] = {ta, tb, tx, tbias, tdy, tout, tdx, tda, tdb, tdw, bf_x, a_bf, vector, ta_back, tb_back};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) EXPECT_OK(tessera_tensor_free(all[i]));
}

/* Streams: on the CPU a stream with no native handle that synchronises at once. */
static void streams(TesseraDevice *cpu) {
    TesseraStream *stream = FORGED(TesseraStream);
    void *native = (void *)&stream;
    EXPECT(INVALID, tessera_stream_new(cpu, NULL));
    EXPECT(INVALID, tessera_stream_new(NULL, &stream));
    CHECK(stream == NULL);
    EXPECT(HANDLE, tessera_stream_new(FORGED(TesseraDevice), &stream));
    EXPECT_OK(tessera_stream_new(cpu, &stream));
    TesseraStream *other = FORGED(TesseraStream);
    EXPECT(HANDLE, tessera_stream_new((TesseraDevice *)stream, &other));
    CHECK(other == NULL);
    EXPECT_OK(tessera_stream_native(stream, &native));
    CHECK(native == NULL);
    EXPECT(INVALID, tessera_stream_native(stream, NULL));
    EXPECT(INVALID, tessera_stream_native(NULL, &native));
    EXPECT(HANDLE, tessera_stream_native((TesseraStream *)cpu, &native));
    EXPECT_OK(tessera_stream_synchronize(stream));
    EXPECT(INVALID, tessera_stream_synchronize(NULL));
    EXPECT(HANDLE, tessera_stream_synchronize(FORGED(TesseraStream)));
    EXPECT(HANDLE, tessera_device_free((TesseraDevice *)stream));
    EXPECT(HANDLE, tessera_stream_free((TesseraStream *)cpu));
    EXPECT_OK(tessera_stream_free(stream));
    EXPECT(HANDLE, tessera_stream_synchronize(stream));
    EXPECT(HANDLE, tessera_stream_free(stream));
    EXPECT_OK(tessera_stream_free(NULL));
}

/* Only where a GPU can be used: addresses that are not device memory are refused (ffi/tests/
 * device_memory.c wraps real device memory), the stream has a native handle, and tensors on two
 * devices do not mix. */
static void gpu(void) {
    if (tessera_device_cuda_count() == 0) return;
    TesseraDevice *cuda = NULL;
    TesseraTensor *t = FORGED(TesseraTensor);
    const size_t shape[2] = {2, 2};
    float data[4] = {1, 2, 3, 4};
    EXPECT_OK(tessera_device_new_cuda(0, &cuda));
    bool is_cuda = false;
    EXPECT_OK(tessera_device_is_cuda(cuda, &is_cuda));
    CHECK(is_cuda);
    EXPECT(INVALID,
           tessera_tensor_wrap_device(cuda, (void *)(uintptr_t)0x1000, 16, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    CHECK(t == NULL);
    CHECK(strstr(tessera_last_error(), "device memory") != NULL);
    _Alignas(256) float host_floats[64] = {0};
    EXPECT(INVALID, tessera_tensor_wrap_device(cuda, host_floats, 16, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    TesseraStream *stream = NULL;
    void *native = NULL;
    EXPECT_OK(tessera_stream_new(cuda, &stream));
    EXPECT_OK(tessera_stream_native(stream, &native));
    CHECK(native != NULL);
    EXPECT_OK(tessera_stream_synchronize(stream));
    EXPECT_OK(tessera_stream_free(stream));
    EXPECT(INVALID, tessera_tensor_wrap_device(cuda, NULL, 16, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cuda, (void *)(uintptr_t)0x1002, 16, TESSERA_DTYPE_F32, shape, 2,
                                               NULL, &t));
    TesseraTensor *host = NULL, *device = NULL, *out = NULL;
    EXPECT_OK(tessera_tensor_wrap_host(data, 16, TESSERA_DTYPE_F32, shape, 2, NULL, &host));
    EXPECT_OK(tessera_tensor_to_device(host, cuda, &device));
    EXPECT_OK(tessera_tensor_new_zeros(cuda, TESSERA_DTYPE_F32, shape, 2, &out));
    EXPECT(INVALID, tessera_matmul(host, device, NULL, out, NULL));
    EXPECT(INVALID, tessera_matmul(device, device, NULL, host, NULL));
    EXPECT_OK(tessera_matmul(device, device, NULL, out, NULL));
    float back[4] = {0};
    EXPECT_OK(tessera_tensor_copy_to_host(out, back, sizeof back));
    CHECK(back[0] == 7.0f && back[1] == 10.0f && back[2] == 15.0f && back[3] == 22.0f);
    EXPECT_OK(tessera_device_synchronize(cuda));
    EXPECT_OK(tessera_tensor_free(host));
    EXPECT_OK(tessera_tensor_free(device));
    EXPECT_OK(tessera_tensor_free(out));
    EXPECT_OK(tessera_device_free(cuda));
}

int main(void) {
    TesseraDevice *cpu = NULL;
    version_and_status();
    devices();
    EXPECT_OK(tessera_device_new_cpu(&cpu));
    tensors(cpu);
    matmul(cpu);
    adamw(cpu);
    wavelet(cpu);
    attention(cpu);
    sparse(cpu);
    transformer_ops(cpu);
    embedding_and_norm(cpu);
    trainer_and_model(cpu);
    binary(cpu);
    lora(cpu);
    streams(cpu);
    gpu();
    EXPECT_OK(tessera_device_free(cpu));
    CHECK(tessera_live_handle_count() == 0);
    printf("bad_input: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
