/*
 * Feeds bad input to every entry point of the C API and checks that each call returns the right
 * error code with a message, never crashes, and leaves its outputs untouched. Run under valgrind
 * by scripts/test-capi: no invalid access and no leak, and every handle freed at the end.
 * scripts/test-capi also checks that every function the header declares is called here.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

    /* wrap_device: refused on the CPU; on a CUDA device, unsupported (see the header). */
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, data, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(NULL, data, 24, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    EXPECT(INVALID, tessera_tensor_wrap_device(cpu, data, 24, TESSERA_DTYPE_F32, shape, 2, NULL, NULL));
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

/* Only where a GPU can be used: device memory wrapping is refused as unsupported, and tensors on
 * two devices do not mix. */
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
    EXPECT(TESSERA_STATUS_UNSUPPORTED,
           tessera_tensor_wrap_device(cuda, (void *)(uintptr_t)0x1000, 16, TESSERA_DTYPE_F32, shape, 2, NULL, &t));
    CHECK(t == NULL);
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
    gpu();
    EXPECT_OK(tessera_device_free(cpu));
    CHECK(tessera_live_handle_count() == 0);
    printf("bad_input: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
