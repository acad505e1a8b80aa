// tessera from C++: handles owned by std::unique_ptr, errors as exceptions. Tensors created by
// tessera (copies in and out), a matmul with a transposed operand, and the learnable wavelet
// variant at its initial taps checked against the box window it starts as.
#include <cmath>
#include <cstdio>
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
using Device = std::unique_ptr<TesseraDevice, FreeDevice>;
using Tensor = std::unique_ptr<TesseraTensor, FreeTensor>;
using WaveletConfig = std::unique_ptr<TesseraWaveletConfig, FreeConfig>;

Tensor upload(TesseraDevice *device, const std::vector<float> &data, std::vector<size_t> shape) {
    TesseraTensor *t = nullptr;
    check(tessera_tensor_new_from_host(device, TESSERA_DTYPE_F32, shape.data(), shape.size(), data.data(),
                                       data.size() * sizeof(float), &t),
          "tessera_tensor_new_from_host");
    return Tensor(t);
}

Tensor zeros(TesseraDevice *device, std::vector<size_t> shape) {
    TesseraTensor *t = nullptr;
    check(tessera_tensor_new_zeros(device, TESSERA_DTYPE_F32, shape.data(), shape.size(), &t),
          "tessera_tensor_new_zeros");
    return Tensor(t);
}

std::vector<float> download(TesseraTensor *t) {
    size_t numel = 0;
    check(tessera_tensor_size(t, &numel, nullptr), "tessera_tensor_size");
    std::vector<float> data(numel);
    check(tessera_tensor_copy_to_host(t, data.data(), numel * sizeof(float)), "tessera_tensor_copy_to_host");
    return data;
}

bool close(const std::vector<float> &got, const std::vector<double> &want, const char *what) {
    if (got.size() != want.size()) return false;
    for (size_t i = 0; i < got.size(); i++) {
        if (!(std::fabs(got[i] - want[i]) <= 1e-5 * (1.0 + std::fabs(want[i])))) {
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
