/*
 * tessera from C: wrap your own host arrays as tensors (no copy), run a linear layer (matmul),
 * wavelet mixing and one AdamW step on them, and check each result against a plain C loop.
 * Uses the first CUDA GPU when there is one (copying in and out), else the CPU.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <tessera.h>

#define TRY(call)                                                                                  \
    do {                                                                                           \
        TesseraStatus status_ = (call);                                                            \
        if (status_ != TESSERA_STATUS_OK) {                                                        \
            fprintf(stderr, "%s failed: %s: %s\n", #call, tessera_status_name(status_),            \
                    tessera_last_error());                                                         \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

enum { M = 5, K = 7, N = 3, T = 6, D = 4 };

static int close_enough(const float *got, const double *want, size_t count, const char *what) {
    for (size_t i = 0; i < count; i++) {
        if (!(fabs(got[i] - want[i]) <= 1e-5 * (1.0 + fabs(want[i])))) {
            fprintf(stderr, "%s[%zu]: got %g, expected %g\n", what, i, got[i], want[i]);
            return 0;
        }
    }
    return 1;
}

/* A tensor on `device` holding `data`: the array itself on the CPU, a copy on a GPU. */
static TesseraTensor *tensor_of(TesseraDevice *device, bool on_gpu, float *data, const size_t *shape, size_t rank) {
    size_t bytes = sizeof(float);
    for (size_t i = 0; i < rank; i++) bytes *= shape[i];
    TesseraTensor *t = NULL;
    if (on_gpu) {
        TRY(tessera_tensor_new_from_host(device, TESSERA_DTYPE_F32, shape, rank, data, bytes, &t));
    } else {
        TRY(tessera_tensor_wrap_host(data, bytes, TESSERA_DTYPE_F32, shape, rank, NULL, &t));
    }
    return t;
}

/* Brings a tensor's values into `data` (already there on the CPU, where `data` is wrapped). */
static void fetch(TesseraTensor *t, bool on_gpu, float *data, size_t count) {
    if (on_gpu) TRY(tessera_tensor_copy_to_host(t, data, count * sizeof(float)));
}

int main(void) {
    printf("tessera %s (ABI %u, header ABI %d)\n", tessera_version(), tessera_abi_version(), TESSERA_ABI_VERSION);
    if (tessera_abi_version() != TESSERA_ABI_VERSION) return 1;

    TesseraDevice *device = NULL;
    bool on_gpu = false;
    if (tessera_device_new_cuda(0, &device) == TESSERA_STATUS_OK) {
        on_gpu = true;
    } else {
        printf("no GPU (%s): running on the CPU\n", tessera_last_error());
        TRY(tessera_device_new_cpu(&device));
    }

    /* A linear layer y = x·wᵀ + bias on the caller's arrays. */
    float x[M * K], w[N * K], bias[N], y[M * N];
    double want[M * N > T * D ? M * N : T * D];
    for (int i = 0; i < M * K; i++) x[i] = (float)sin(0.3 * i + 0.1);
    for (int i = 0; i < N * K; i++) w[i] = (float)cos(0.7 * i) * 0.5f;
    for (int i = 0; i < N; i++) bias[i] = 0.25f * (float)(i + 1);
    for (int i = 0; i < M * N; i++) y[i] = NAN;
    const size_t x_shape[2] = {M, K}, w_shape[2] = {N, K}, b_shape[1] = {N}, y_shape[2] = {M, N};
    TesseraTensor *tx = tensor_of(device, on_gpu, x, x_shape, 2);
    TesseraTensor *tw = tensor_of(device, on_gpu, w, w_shape, 2);
    TesseraTensor *tb = tensor_of(device, on_gpu, bias, b_shape, 1);
    TesseraTensor *ty = tensor_of(device, on_gpu, y, y_shape, 2);
    TesseraMatmulOptions linear = tessera_matmul_options_default();
    linear.trans_b = 1;
    TRY(tessera_matmul(tx, tw, tb, ty, &linear));
    fetch(ty, on_gpu, y, M * N);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double sum = bias[n];
            for (int k = 0; k < K; k++) sum += (double)x[m * K + k] * w[n * K + k];
            want[m * N + n] = sum;
        }
    }
    int ok = close_enough(y, want, M * N, "linear");

    /* Wavelet mixing: coordinates 1 and 2 averaged over the last 2 and 3 tokens (divided by the
     * window), the others passed through. */
    const size_t windows[2] = {2, 3};
    TesseraWaveletConfig *config = NULL;
    TRY(tessera_wavelet_config_new_windows(D, 1, windows, 2, TESSERA_WAVELET_DIVISOR_WINDOW, &config));
    float seq[T * D], mixed[T * D];
    for (int i = 0; i < T * D; i++) {
        seq[i] = (float)(1.0 + 0.5 * sin(1.3 * i));
        mixed[i] = NAN;
    }
    const size_t s_shape[3] = {1, T, D};
    TesseraTensor *ts = tensor_of(device, on_gpu, seq, s_shape, 3);
    TesseraTensor *tm = tensor_of(device, on_gpu, mixed, s_shape, 3);
    TRY(tessera_wavelet_forward(ts, NULL, config, tm));
    fetch(tm, on_gpu, mixed, T * D);
    for (int t = 0; t < T; t++) {
        for (int d = 0; d < D; d++) {
            int k = d == 1 ? 2 : d == 2 ? 3 : 0;
            double sum = k == 0 ? seq[t * D + d] : 0.0;
            for (int s = t - k + 1; k > 0 && s <= t; s++) sum += s >= 0 ? seq[s * D + d] : 0.0;
            want[t * D + d] = k == 0 ? sum : sum / k;
        }
    }
    ok &= close_enough(mixed, want, T * D, "wavelet");

    /* One AdamW step on w with a made-up gradient. */
    float grad[N * K], m1[N * K] = {0}, m2[N * K] = {0}, w0[N * K];
    for (int i = 0; i < N * K; i++) {
        grad[i] = (float)sin(2.1 * i);
        w0[i] = w[i];
    }
    TesseraTensor *tg = tensor_of(device, on_gpu, grad, w_shape, 2);
    TesseraTensor *t1 = tensor_of(device, on_gpu, m1, w_shape, 2);
    TesseraTensor *t2 = tensor_of(device, on_gpu, m2, w_shape, 2);
    TesseraAdamWConfig adamw = tessera_adamw_config_default();
    TesseraAdamWTensor entry = {tw, tg, t1, t2, NULL, 1};
    TRY(tessera_adamw_step(&entry, 1, &adamw, 1, 1.0f));
    fetch(tw, on_gpu, w, N * K);
    for (int i = 0; i < N * K; i++) {
        double p = w0[i] * (1.0 - adamw.lr * adamw.weight_decay);
        double g = grad[i];
        double m = (1 - adamw.beta1) * g, v = (1 - adamw.beta2) * g * g;
        double m_hat = m / (1 - adamw.beta1), v_hat = v / (1 - adamw.beta2);
        want[i] = p - adamw.lr * m_hat / (sqrt(v_hat) + adamw.eps);
    }
    ok &= close_enough(w, want, N * K, "adamw");

    TesseraTensor *all[] = {tx, tw, tb, ty, ts, tm, tg, t1, t2};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) TRY(tessera_tensor_free(all[i]));
    TRY(tessera_wavelet_config_free(config));
    TRY(tessera_device_free(device));
    if (tessera_live_handle_count() != 0) ok = 0;
    printf("example.c: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
