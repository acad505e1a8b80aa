/*
 * tessera from C: wrap your own host arrays as tensors (no copy), run a linear layer (matmul),
 * wavelet mixing, one AdamW step, a binarized (1-bit) layer and a LoRA layer on them, and check
 * each result against a plain C loop.
 * Uses the first CUDA GPU when there is one (copying in and out), else the CPU.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static int close_within(const float *got, const double *want, size_t count, double tolerance, const char *what) {
    for (size_t i = 0; i < count; i++) {
        if (!(fabs(got[i] - want[i]) <= tolerance * (1.0 + fabs(want[i])))) {
            fprintf(stderr, "%s[%zu]: got %g, expected %g\n", what, i, got[i], want[i]);
            return 0;
        }
    }
    return 1;
}

static int close_enough(const float *got, const double *want, size_t count, const char *what) {
    return close_within(got, want, count, 1e-5, what);
}

/* bf16 is the top half of an f32, rounded to nearest even (no NaN here). */
static uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static float from_bf16(uint16_t half) {
    uint32_t bits = (uint32_t)half << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
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

    /* A binarized layer: the latent weight's signs packed 32 to a u32 word, with the xnor scales
     * alpha and beta per input, on bf16 activations (what the GPU's packed GEMV takes). */
    enum { BI = 40, BO = 3, BT = 2 };
    float latent[BO * BI], alpha[BI], beta[BI], y_bin[BT * BO];
    uint16_t x_bf16[BT * BI], y_bf16[BT * BO];
    for (int i = 0; i < BO * BI; i++) latent[i] = (float)sin(0.9 * i + 0.3);
    for (int i = 0; i < BT * BI; i++) x_bf16[i] = to_bf16((float)cos(0.4 * i));
    const size_t latent_shape[2] = {BO, BI}, column_shape[1] = {BI}, bits_shape[2] = {BO, (BI + 31) / 32};
    const size_t xb_shape[2] = {BT, BI}, yb_shape[2] = {BT, BO};
    TesseraTensor *tlatent = tensor_of(device, on_gpu, latent, latent_shape, 2);
    TesseraTensor *talpha = NULL, *tbeta = NULL, *tbits = NULL, *txb = NULL, *tyb = NULL;
    TRY(tessera_tensor_new_zeros(device, TESSERA_DTYPE_F32, column_shape, 1, &talpha));
    TRY(tessera_tensor_new_zeros(device, TESSERA_DTYPE_F32, column_shape, 1, &tbeta));
    TRY(tessera_tensor_new_zeros(device, TESSERA_DTYPE_U32, bits_shape, 2, &tbits));
    TRY(tessera_tensor_new_from_host(device, TESSERA_DTYPE_BF16, xb_shape, 2, x_bf16, sizeof x_bf16, &txb));
    TRY(tessera_tensor_new_zeros(device, TESSERA_DTYPE_BF16, yb_shape, 2, &tyb));
    TRY(tessera_binary_init(tlatent, talpha, tbeta));
    TRY(tessera_binary_pack(tlatent, tbits));
    TRY(tessera_binary_packed_forward(txb, tbits, talpha, tbeta, NULL, BI, tyb));
    TRY(tessera_tensor_copy_to_host(talpha, alpha, sizeof alpha));
    TRY(tessera_tensor_copy_to_host(tbeta, beta, sizeof beta));
    TRY(tessera_tensor_copy_to_host(tyb, y_bf16, sizeof y_bf16));
    for (int t = 0; t < BT; t++) {
        for (int o = 0; o < BO; o++) {
            double sum = 0;
            for (int j = 0; j < BI; j++) {
                double sign = latent[o * BI + j] < 0 ? -1.0 : 1.0;
                sum += (alpha[j] * sign + beta[j]) * from_bf16(x_bf16[t * BI + j]);
            }
            want[t * BO + o] = sum;
            y_bin[t * BO + o] = from_bf16(y_bf16[t * BO + o]);
        }
    }
    ok &= close_within(y_bin, want, BT * BO, 1e-2, "binary");

    /* LoRA beside the linear layer's (updated) weight w: one adapter of rank 2, scale 0.5, for
     * every row of x; the base refers to w's tensor, so it sees w's current values. */
    enum { R = 2 };
    float lora_a[R * K], lora_b[N * R];
    for (int i = 0; i < R * K; i++) lora_a[i] = (float)sin(1.7 * i + 0.5);
    for (int i = 0; i < N * R; i++) lora_b[i] = (float)cos(0.8 * i);
    const size_t a_shape[3] = {1, R, K}, b_shape3[3] = {1, N, R}, ranks[1] = {R};
    const float scales[1] = {0.5f};
    TesseraTensor *tla = tensor_of(device, on_gpu, lora_a, a_shape, 3);
    TesseraTensor *tlb = tensor_of(device, on_gpu, lora_b, b_shape3, 3);
    TesseraLoraAdapters *adapters = NULL;
    TesseraLoraRouting *routing = NULL;
    TesseraLoraBase *base = NULL;
    TRY(tessera_lora_adapters_new(tla, tlb, ranks, scales, 1, &adapters));
    TRY(tessera_lora_routing_new_single(device, M, 0, &routing));
    TRY(tessera_lora_base_new_dense(tw, &base));
    TRY(tessera_lora_forward(tx, base, tb, adapters, routing, ty));
    fetch(ty, on_gpu, y, M * N);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double sum = bias[n];
            for (int k = 0; k < K; k++) sum += (double)x[m * K + k] * w[n * K + k];
            for (int r = 0; r < R; r++) {
                double t = 0;
                for (int k = 0; k < K; k++) t += (double)x[m * K + k] * lora_a[r * K + k];
                sum += 0.5 * t * lora_b[n * R + r];
            }
            want[m * N + n] = sum;
        }
    }
    ok &= close_enough(y, want, M * N, "lora");
    TRY(tessera_lora_base_free(base));
    TRY(tessera_lora_routing_free(routing));
    TRY(tessera_lora_adapters_free(adapters));

    TesseraTensor *all[] = {tx, tw, tb, ty, ts, tm, tg, t1, t2, tlatent, talpha, tbeta, tbits, txb, tyb, tla, tlb};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) TRY(tessera_tensor_free(all[i]));
    TRY(tessera_wavelet_config_free(config));
    TRY(tessera_device_free(device));
    if (tessera_live_handle_count() != 0) ok = 0;
    printf("example.c: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
