// tessera from C++: handles owned by std::unique_ptr, errors as exceptions. Tensors created by
// tessera (copies in and out), a matmul with a transposed operand, the learnable wavelet variant at
// its initial taps checked against the box window it starts as, a packed binarized layer, and two
// LoRA adapters routed per sequence, then merged into the base.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <tessera.h>

namespace {

void check(TesseraStatus status, const char *what) {
    if (status != TESSERA_STATUS_OK) {
        throw std::runtime_error(std::string(what) + ": " + tessera_status_name(status) + ": " +
                                 tessera_last_error());
    }
}

struct FreeDevice {
    void operator()(TesseraDevice *d) const { tessera_device_free(d); }
};
struct FreeTensor {
    void operator()(TesseraTensor *t) const { tessera_tensor_free(t); }
};
struct FreeConfig {
    void operator()(TesseraWaveletConfig *c) const { tessera_wavelet_config_free(c); }
};
struct FreeAdapters {
    void operator()(TesseraLoraAdapters *a) const { tessera_lora_adapters_free(a); }
};
struct FreeRouting {
    void operator()(TesseraLoraRouting *r) const { tessera_lora_routing_free(r); }
};
struct FreeBase {
    void operator()(TesseraLoraBase *b) const { tessera_lora_base_free(b); }
};
using Device = std::unique_ptr<TesseraDevice, FreeDevice>;
using LoraAdapters = std::unique_ptr<TesseraLoraAdapters, FreeAdapters>;
using LoraRouting = std::unique_ptr<TesseraLoraRouting, FreeRouting>;
using LoraBase = std::unique_ptr<TesseraLoraBase, FreeBase>;
using Tensor = std::unique_ptr<TesseraTensor, FreeTensor>;
using WaveletConfig = std::unique_ptr<TesseraWaveletConfig, FreeConfig>;

Tensor upload(TesseraDevice *device, const std::vector<float> &data, std::vector<size_t> shape) {
    TesseraTensor *t = nullptr;
    check(tessera_tensor_new_from_host(device, TESSERA_DTYPE_F32, shape.data(), shape.size(), data.data(),
                                       data.size() * sizeof(float), &t),
          "tessera_tensor_new_from_host");
    return Tensor(t);
}

Tensor zeros(TesseraDevice *device, std::vector<size_t> shape, int32_t dtype = TESSERA_DTYPE_F32) {
    TesseraTensor *t = nullptr;
    check(tessera_tensor_new_zeros(device, dtype, shape.data(), shape.size(), &t), "tessera_tensor_new_zeros");
    return Tensor(t);
}

// bf16 is the top half of an f32, rounded to nearest even (no NaN here).
uint16_t to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t half) {
    uint32_t bits = static_cast<uint32_t>(half) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

std::vector<float> download(TesseraTensor *t) {
    size_t numel = 0;
    check(tessera_tensor_size(t, &numel, nullptr), "tessera_tensor_size");
    std::vector<float> data(numel);
    check(tessera_tensor_copy_to_host(t, data.data(), numel * sizeof(float)), "tessera_tensor_copy_to_host");
    return data;
}

bool close(const std::vector<float> &got, const std::vector<double> &want, const char *what,
           double tolerance = 1e-5) {
    if (got.size() != want.size()) return false;
    for (size_t i = 0; i < got.size(); i++) {
        if (!(std::fabs(got[i] - want[i]) <= tolerance * (1.0 + std::fabs(want[i])))) {
            std::fprintf(stderr, "%s[%zu]: got %g, expected %g\n", what, i, got[i], want[i]);
            return false;
        }
    }
    return true;
}

bool run() {
    TesseraDevice *raw = nullptr;
    if (tessera_device_new_cuda(0, &raw) != TESSERA_STATUS_OK) {
        std::printf("no GPU (%s): running on the CPU\n", tessera_last_error());
        check(tessera_device_new_cpu(&raw), "tessera_device_new_cpu");
    }
    Device device(raw);

    // out = 0.5 · aᵀ·b with a stored (k, m) = (9, 4) and b (k, n) = (9, 2).
    const size_t m = 4, n = 2, k = 9;
    std::vector<float> a(k * m), b(k * n);
    for (size_t i = 0; i < a.size(); i++) a[i] = static_cast<float>(std::sin(0.37 * i));
    for (size_t i = 0; i < b.size(); i++) b[i] = static_cast<float>(std::cos(0.11 * i + 1));
    Tensor ta = upload(device.get(), a, {k, m});
    Tensor tb = upload(device.get(), b, {k, n});
    Tensor out = zeros(device.get(), {m, n});
    TesseraMatmulOptions options = tessera_matmul_options_default();
    options.trans_a = 1;
    options.alpha = 0.5f;
    check(tessera_matmul(ta.get(), tb.get(), nullptr, out.get(), &options), "tessera_matmul");
    std::vector<double> want(m * n);
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double sum = 0;
            for (size_t p = 0; p < k; p++) sum += static_cast<double>(a[p * m + i]) * b[p * n + j];
            want[i * n + j] = 0.5 * sum;
        }
    bool ok = close(download(out.get()), want, "matmul");

    // The learnable variant at its initial taps (1/k) equals the box window divided by k.
    TesseraWaveletConfig *raw_config = nullptr;
    check(tessera_wavelet_config_new_exponential(8, 0, 4, 2, 8, 16, TESSERA_WAVELET_DIVISOR_WINDOW, &raw_config),
          "tessera_wavelet_config_new_exponential");
    WaveletConfig config(raw_config);
    size_t dim = 0, tap_count = 0;
    check(tessera_wavelet_config_info(config.get(), &dim, &tap_count), "tessera_wavelet_config_info");
    const size_t batch = 2, seq = 11;
    std::vector<float> x(batch * seq * dim);
    for (size_t i = 0; i < x.size(); i++) x[i] = static_cast<float>(std::sin(0.9 * i) + 0.5);
    Tensor tx = upload(device.get(), x, {batch, seq, dim});
    Tensor box = zeros(device.get(), {batch, seq, dim});
    Tensor fir = zeros(device.get(), {batch, seq, dim});
    Tensor taps = zeros(device.get(), {tap_count});
    check(tessera_wavelet_forward(tx.get(), nullptr, config.get(), box.get()), "tessera_wavelet_forward");
    check(tessera_wavelet_taps_init(config.get(), taps.get()), "tessera_wavelet_taps_init");
    check(tessera_wavelet_learnable_forward(tx.get(), taps.get(), config.get(), fir.get()),
          "tessera_wavelet_learnable_forward");
    std::vector<float> box_values = download(box.get());
    ok &= close(download(fir.get()), std::vector<double>(box_values.begin(), box_values.end()), "wavelet");

    // A binarized layer: signs of a (5, 70) latent weight packed into (5, 3) u32 words, given
    // scales alpha and beta, on 3 tokens of bf16 activations.
    const size_t d_out = 5, d_in = 70, tokens = 3;
    std::vector<float> latent(d_out * d_in), alpha(d_in), beta(d_in);
    std::vector<uint16_t> activations(tokens * d_in), result(tokens * d_out);
    for (size_t i = 0; i < latent.size(); i++) latent[i] = static_cast<float>(std::sin(0.31 * i + 0.1));
    for (size_t j = 0; j < d_in; j++) {
        alpha[j] = 0.5f + 0.01f * static_cast<float>(j);
        beta[j] = 0.02f * static_cast<float>(std::cos(0.7 * j));
    }
    for (size_t i = 0; i < activations.size(); i++) activations[i] = to_bf16(static_cast<float>(std::cos(0.23 * i)));
    Tensor tlatent = upload(device.get(), latent, {d_out, d_in});
    Tensor talpha = upload(device.get(), alpha, {d_in});
    Tensor tbeta = upload(device.get(), beta, {d_in});
    Tensor bits = zeros(device.get(), {d_out, (d_in + 31) / 32}, TESSERA_DTYPE_U32);
    TesseraTensor *raw_x = nullptr;
    const size_t x_shape[2] = {tokens, d_in};
    check(tessera_tensor_new_from_host(device.get(), TESSERA_DTYPE_BF16, x_shape, 2, activations.data(),
                                       activations.size() * sizeof(uint16_t), &raw_x),
          "tessera_tensor_new_from_host");
    Tensor tbx(raw_x);
    Tensor tby = zeros(device.get(), {tokens, d_out}, TESSERA_DTYPE_BF16);
    check(tessera_binary_pack(tlatent.get(), bits.get()), "tessera_binary_pack");
    check(tessera_binary_packed_forward(tbx.get(), bits.get(), talpha.get(), tbeta.get(), nullptr, d_in, tby.get()),
          "tessera_binary_packed_forward");
    check(tessera_tensor_copy_to_host(tby.get(), result.data(), result.size() * sizeof(uint16_t)),
          "tessera_tensor_copy_to_host");
    std::vector<float> binary_got(tokens * d_out);
    std::vector<double> binary_want(tokens * d_out);
    for (size_t t = 0; t < tokens; t++)
        for (size_t o = 0; o < d_out; o++) {
            double sum = 0;
            for (size_t j = 0; j < d_in; j++)
                sum += (alpha[j] * (latent[o * d_in + j] < 0 ? -1.0 : 1.0) + beta[j]) * from_bf16(activations[t * d_in + j]);
            binary_want[t * d_out + o] = sum;
            binary_got[t * d_out + o] = from_bf16(result[t * d_out + o]);
        }
    ok &= close(binary_got, binary_want, "binary", 1e-2);

    // LoRA: adapters of ranks 1 and 2 (padded to 2) on a (3, 4) base; two sequences of 2 rows
    // use adapter 1, then 0. Merging adapter 1 into the base makes the base alone give the first
    // sequence's rows.
    const size_t lo = 3, li = 4, rows = 4;
    std::vector<float> w(lo * li), la(2 * 2 * li), lb(2 * lo * 2), lx(rows * li);
    for (size_t i = 0; i < w.size(); i++) w[i] = static_cast<float>(std::cos(0.5 * i));
    for (size_t i = 0; i < la.size(); i++) la[i] = static_cast<float>(std::sin(0.9 * i + 0.2));
    for (size_t i = 0; i < lb.size(); i++) lb[i] = static_cast<float>(std::cos(1.3 * i));
    for (size_t i = 0; i < lx.size(); i++) lx[i] = static_cast<float>(std::sin(0.4 * i));
    const size_t ranks[2] = {1, 2};
    const float scales[2] = {2.0f, 0.25f};
    const uint32_t sequence_adapters[2] = {1, 0};
    Tensor tw = upload(device.get(), w, {lo, li});
    Tensor tla = upload(device.get(), la, {2, 2, li});
    Tensor tlb = upload(device.get(), lb, {2, lo, 2});
    Tensor tlx = upload(device.get(), lx, {rows, li});
    Tensor tly = zeros(device.get(), {rows, lo});
    TesseraLoraAdapters *raw_adapters = nullptr;
    check(tessera_lora_adapters_new(tla.get(), tlb.get(), ranks, scales, 2, &raw_adapters), "tessera_lora_adapters_new");
    LoraAdapters adapters(raw_adapters);
    TesseraLoraRouting *raw_routing = nullptr;
    check(tessera_lora_routing_new_per_sequence(device.get(), sequence_adapters, 2, 2, &raw_routing),
          "tessera_lora_routing_new_per_sequence");
    LoraRouting routing(raw_routing);
    TesseraLoraBase *raw_base = nullptr;
    check(tessera_lora_base_new_dense(tw.get(), &raw_base), "tessera_lora_base_new_dense");
    LoraBase base(raw_base);
    check(tessera_lora_forward(tlx.get(), base.get(), nullptr, adapters.get(), routing.get(), tly.get()),
          "tessera_lora_forward");
    std::vector<double> lora_want(rows * lo);
    for (size_t r = 0; r < rows; r++) {
        size_t a = sequence_adapters[r / 2];
        for (size_t o = 0; o < lo; o++) {
            double sum = 0;
            for (size_t k = 0; k < li; k++) sum += static_cast<double>(lx[r * li + k]) * w[o * li + k];
            for (size_t q = 0; q < ranks[a]; q++) {
                double t = 0;
                for (size_t k = 0; k < li; k++) t += static_cast<double>(lx[r * li + k]) * la[(a * 2 + q) * li + k];
                sum += scales[a] * t * lb[(a * lo + o) * 2 + q];
            }
            lora_want[r * lo + o] = sum;
        }
    }
    ok &= close(download(tly.get()), lora_want, "lora");
    TesseraMatmulOptions linear = tessera_matmul_options_default();
    linear.trans_b = 1;
    check(tessera_lora_merge(base.get(), adapters.get(), 1), "tessera_lora_merge");
    check(tessera_matmul(tlx.get(), tw.get(), nullptr, tly.get(), &linear), "tessera_matmul");
    std::vector<float> merged = download(tly.get());
    ok &= close(std::vector<float>(merged.begin(), merged.begin() + 2 * lo),
                std::vector<double>(lora_want.begin(), lora_want.begin() + 2 * lo), "lora merged");
    return ok;
}

}  // namespace

int main() {
    std::printf("tessera %s\n", tessera_version());
    try {
        bool ok = run();
        ok &= tessera_live_handle_count() == 0;
        std::printf("example.cpp: %s\n", ok ? "ok" : "FAILED");
        return ok ? 0 : 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "example.cpp: %s\n", e.what());
        return 1;
    }
}
